#!/usr/bin/env python3
"""Markdown report of a bench/run.sh output directory (medians over the rounds).

usage: report.py OUT_DIR [--peak TARGET | --tune | --callgrind | --tls]"""
import statistics
import sys
from collections import defaultdict

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
CLK_TCK = 100  # /proc/<pid>/stat's utime and stime unit (sysconf(_SC_CLK_TCK) on Linux)
KEYS = 10_000
LIMIT_PER_KEY = 10.0
NAMES = {
    "direct": "upstream direct (floor)",
    "passthrough": "pingora passthrough",
    "nginx_proxy": "nginx plain proxy",
    "nginx_gw": "nginx API-key gateway",
    "kong_local": "Kong-shaped (nginx + Lua), local counters",
    "kong_redis": "Kong-shaped (nginx + Lua), Redis counters",
    "gw_embedded": "msgflash-gateway, embedded store",
    "gw_redis": "msgflash-gateway, Redis store",
    "gw_redis_b": "msgflash-gateway at GW_B (A/B), same Redis",
    "refuser": "pingora answering the gateway's 401 itself (floor)",
}
SCENARIOS = {
    "valid": "(a) valid traffic, 10k keys",
    "abusive": "(b) one abusive key (429 path)",
    "bogus": "(c) random unknown keys (401 path)",
    "bogus_repeat": "(c') one repeated unknown key",
    "jwt": "(d) console JWT `GET /api/dashboard`",
}
AUTH_TARGETS = {"nginx_gw", "kong_local", "kong_redis", "gw_embedded", "gw_redis", "gw_redis_b"}


def ms(text):
    for unit in ("us", "ms", "s", "m"):
        if text.endswith(unit) and text[: -len(unit)].replace(".", "", 1).isdigit():
            return float(text[: -len(unit)]) * UNITS[unit]
    raise ValueError(text)


def parse_wrk(path):
    r = {"rps": 0.0, "p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "requests": 0,
         "non2xx": 0, "errors": 0}
    with open(path) as f:
        for line in f:
            w = line.split()
            if not w:
                continue
            if w[0] == "Requests/sec:":
                r["rps"] = float(w[1])
            elif w[0] == "50%":
                r["p50"] = ms(w[1])
            elif w[0] == "90%":
                r["p90"] = ms(w[1])
            elif w[0] == "99%":
                r["p99"] = ms(w[1])
            elif len(w) > 2 and w[1] == "requests" and w[2] == "in":
                r["requests"] = int(w[0])
            elif line.strip().startswith("Non-2xx"):
                r["non2xx"] = int(w[-1])
            elif w[0] == "Socket" and w[1] == "errors:":
                r["errors"] = sum(int(x.strip(",")) for x in w[3::2])
    return r


FILES = defaultdict(list)  # (tag, scenario, target) -> [wrk output path]


def load(out):
    runs = defaultdict(list)  # (tag, scenario, target) -> [run]
    with open(f"{out}/results.tsv") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            tag, rnd, scenario, target, path, calls, conns = fields[:7]
            r = parse_wrk(path)
            r["round"], r["calls"], r["conns"] = int(rnd), int(calls), int(conns)
            # CPU the proxy's processes used over the run (clock ticks; absent in old runs).
            ticks = int(fields[7]) if len(fields) > 7 and fields[7] else -1
            r["cpu_us"] = (ticks * 1e6 / CLK_TCK / r["requests"]) if ticks >= 0 and r["requests"] else float("nan")
            runs[(tag, scenario, target)].append(r)
            FILES[(tag, scenario, target)].append(path)
    return runs


def med(runs, field):
    vals = [r[field] for r in runs if r[field] == r[field]]
    return statistics.median(vals) if vals else float("nan")


def fmt_ms(v):
    return "n/a" if v != v else (f"{v:.3f}" if v < 1 else f"{v:.2f}")


def ratio(a, b):
    return f"{a / b:.2f}×" if b else "n/a"


def meta(out):
    try:
        with open(f"{out}/meta.txt") as f:
            return dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    except OSError:
        return {}


def main_report(out, runs):
    m = meta(out)
    targets = []
    for (tag, _, target) in runs:
        if (tag == "main" or tag.startswith("half")) and target not in targets:
            targets.append(target)
    scenarios = [s for s in SCENARIOS if any(k[0] == "main" and k[1] == s for k in runs)]
    k = max((r["round"] for v in runs.values() for r in v), default=0)
    print(f"### Run of {m.get('date_utc', '?')} (git {m.get('git', '?')})\n")
    print(f"{m.get('cpu', '?')}; kernel {m.get('kernel', '?')}; {m.get('nginx', '')}".replace(" wrk=", ", wrk ").replace(" redis=", ", redis ").replace("nginx=", "nginx ") + ".")
    print(f"`{m.get('mode', '')}`; medians of {k} rounds, targets alternated round-robin. "
          f"Load average (1/5/15 min) at start {m.get('loadavg_start', '?')}, at end {m.get('loadavg_end', '?')}.\n")
    print("| scenario | target | req/s | proxy CPU µs/req | p50 ms | p99 ms | × passthrough | × nginx gw | non-2xx | Redis cmds/req |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    warnings = []
    for s in scenarios:
        base_pt = med(runs.get(("main", s, "passthrough"), []), "rps")
        base_ng = med(runs.get(("main", s, "nginx_gw"), []), "rps")
        for t in targets:
            rs = runs.get(("main", s, t))
            if not rs:
                continue
            rps = med(rs, "rps")
            non2xx = statistics.median(r["non2xx"] / r["requests"] if r["requests"] else 0 for r in rs)
            cmds = "–"
            if t in ("gw_redis", "gw_redis_b"):
                cmds = f"{statistics.median(r['calls'] / r['requests'] if r['requests'] else 0 for r in rs):.4f}"
            cpu = med(rs, "cpu_us")
            cpu = "–" if cpu != cpu else f"{cpu:.1f}"
            print(f"| {SCENARIOS[s]} | {NAMES.get(t, t)} | {rps:,.0f} | {cpu} | {fmt_ms(med(rs, 'p50'))} | "
                  f"{fmt_ms(med(rs, 'p99'))} | {ratio(rps, base_pt)} | {ratio(rps, base_ng)} | "
                  f"{non2xx:.1%} | {cmds} |")
            errs = sum(r["errors"] for r in rs)
            if errs:
                warnings.append(f"{s}/{t}: {errs} socket errors over the rounds")
            if s == "valid" and t in AUTH_TARGETS:
                peak = max(r["rps"] for r in rs)
                if peak / KEYS >= LIMIT_PER_KEY:
                    warnings.append(f"valid/{t}: {peak:,.0f} req/s over {KEYS} keys is "
                                    f"{peak / KEYS:.1f} req/s per key, at or over the limit")
    valid_peak = max((r["rps"] for (tag, s, t), rs in runs.items() if tag == "main" and s == "valid"
                      and t in AUTH_TARGETS for r in rs), default=0)
    print(f"\nPer-key rate check (valid traffic, round robin over {KEYS:,} keys): highest gateway rate "
          f"{valid_peak:,.0f} req/s = {valid_peak / KEYS:.2f} req/s per key (limit {LIMIT_PER_KEY:.0f}).")
    for w in warnings:
        print(f"\n**warning**: {w}")

    redis_report(runs, FILES)

    halves = {}  # gateway -> {target: runs}
    for (tag, s, t), rs in runs.items():
        if tag.startswith("half_"):
            halves.setdefault(tag[len("half_"):], {})[t] = rs
    for gw, half in halves.items():
        print(f"\n#### Latency at half of the peak of {NAMES.get(gw, gw)} (valid traffic, "
              f"{m.get(f'half_{gw}_rate', '?')} req/s offered open loop over {m.get('open_conns', '?')} "
              f"connections by examples/openloop.rs; peak {m.get(f'half_{gw}_peak', '?')} req/s; "
              f"latency from send to response; added = target − direct, medians of the rounds)\n")
        print("| target | req/s achieved | p50 ms | p90 ms | p99 ms | p50 added | p90 added | p99 added |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        direct = {q: med(half.get("direct", []), q) for q in ("p50", "p90", "p99")}
        for t in targets:
            if t not in half:
                continue
            v = {q: med(half[t], q) for q in ("p50", "p90", "p99")}
            added = ["–"] * 3 if t == "direct" else [f"{v[q] - direct[q]:+.3f}" for q in ("p50", "p90", "p99")]
            print(f"| {NAMES.get(t, t)} | {med(half[t], 'rps'):,.0f} | {fmt_ms(v['p50'])} | {fmt_ms(v['p90'])} | "
                  f"{fmt_ms(v['p99'])} | {' | '.join(added)} |")

    def get(s, t):
        return med(runs.get(("main", s, t), []), "rps")

    print("\n#### Targets (reported, not asserted)\n")
    pt = get("valid", "passthrough")
    for t, goal in (("gw_embedded", 0.90), ("gw_redis", 0.80)):
        v = get("valid", t)
        if v == v and pt:
            pairs = {r["round"]: r["rps"] for r in runs.get(("main", "valid", t), [])}
            per_round = [pairs[r["round"]] / r["rps"] for r in runs.get(("main", "valid", "passthrough"), [])
                         if r["round"] in pairs and r["rps"]]
            pr = statistics.median(per_round) if per_round else float("nan")
            print(f"- valid traffic, {NAMES[t]}: {v / pt:.2f}× passthrough as a ratio of medians, "
                  f"{pr:.2f}× as the median of the per-round ratios "
                  f"({', '.join(f'{x:.2f}' for x in per_round)}) (target ≥ {goal:.2f}×): "
                  f"{'met' if min(v / pt, pr) >= goal else ('NOT met' if max(v / pt, pr) < goal else 'inconclusive')}")
    for gw, half in halves.items():
        if gw in half and "direct" in half:
            added = med(half[gw], "p99") - med(half["direct"], "p99")
            print(f"- p99 added over direct at half peak, {NAMES[gw]}: {added:+.3f} ms (target ≤ 0.5 ms): "
                  f"{'met' if added <= 0.5 else 'NOT met'}")
    for s in ("abusive", "bogus_repeat", "bogus"):
        rs = runs.get(("main", s, "gw_redis"))
        if rs:
            calls = [r["calls"] for r in rs]
            reqs = [r["requests"] for r in rs]
            print(f"- {SCENARIOS[s]}, Redis: {statistics.median(calls):,.0f} Redis commands for a median "
                  f"{statistics.median(reqs):,.0f} requests per run (per round: {calls})")


def redis_breakdown(path):
    """Per-command call deltas of one gw_redis run (from the INFO commandstats snapshots)."""
    def snap(suffix):
        calls = {}
        try:
            with open(path + suffix) as f:
                for line in f:
                    name, rest = line.strip().split(":", 1)
                    fields = dict(kv.split("=", 1) for kv in rest.split(","))
                    calls[name[len("cmdstat_"):]] = int(fields["calls"])
        except OSError:
            pass
        return calls

    before, after = snap(".redis-before"), snap(".redis-after")
    return {k: v - before.get(k, 0) for k, v in after.items() if k != "info" and v - before.get(k, 0) > 0}


def redis_report(runs, files):
    rows = []
    for s in SCENARIOS:
        rs = runs.get(("main", s, "gw_redis"))
        if not rs:
            continue
        per_cmd = defaultdict(list)
        for r, path in zip(rs, files[("main", s, "gw_redis")]):
            for cmd, n in redis_breakdown(path).items():
                per_cmd[cmd].append(n / r["requests"] if r["requests"] else 0)
        parts = ", ".join(f"{cmd} {statistics.median(v + [0] * (len(rs) - len(v))):.4f}"
                          for cmd, v in sorted(per_cmd.items(), key=lambda kv: -sum(kv[1])))
        rows.append(f"| {SCENARIOS[s]} | {parts or 'none'} |")
    if rows:
        print("\n#### Redis commands per request by command (gateway on Redis; medians over the rounds)\n")
        print("An admission is one pipeline (ZADD, ZINCRBY, INCR, SISMEMBER; EXPIRE once per period, "
              "PEXPIRE + HSET once a minute per key and node), so round trips per request = INCR "
              "+ the lone GETs (key and account lookups on a cache miss) + DECR (refund of a "
              "refused token, sent with its ZINCRBY).\n")
        print("| scenario | commands per request |")
        print("|---|---|")
        for row in rows:
            print(row)


def tune_report(out, runs):
    m = meta(out)
    print(f"### pingora knobs on the passthrough, {m.get('date_utc', '?')} (`{m.get('mode', '')}`; "
          f"load average {m.get('loadavg_start', '?')} at start, {m.get('loadavg_end', '?')} at end)\n")
    print("| target | req/s | p50 ms | p99 ms | × default passthrough | × nginx plain proxy |")
    print("|---|---:|---:|---:|---:|---:|")
    base = med(runs.get(("tune", "valid", "passthrough_default"), []), "rps")
    ngx = med(runs.get(("tune", "valid", "nginx_proxy"), []), "rps")
    for (tag, s, t), rs in runs.items():
        if tag != "tune":
            continue
        rps = med(rs, "rps")
        print(f"| {t} | {rps:,.0f} | {fmt_ms(med(rs, 'p50'))} | {fmt_ms(med(rs, 'p99'))} | "
              f"{ratio(rps, base)} | {ratio(rps, ngx)} |")


CG_SCENARIOS = {
    "valid": "forwarded (200)",
    "abusive": "one key over its rate (429)",
    "bogus_repeat": "one repeated unknown key (401)",
    "refused": "every request answered 401 by pingora itself",
}


def callgrind_report(out):
    m = meta(out)
    with open(f"{out}/callgrind.tsv") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    base = next((int(r[4]) / int(r[2]) for r in rows if r[0] == "passthrough"), float("nan"))
    print(f"### Instructions per request under callgrind, {m.get('date_utc', '?')} (git {m.get('git', '?')})\n")
    print("One keep-alive client, POST /api/v1/messages/send; whole-process instructions "
          "(all threads) over the measured requests, after a warm-up.\n")
    print("| target | scenario | responses | instructions per request | × passthrough |")
    print("|---|---|---|---:|---:|")
    for name, scenario, n, statuses, total in rows:
        per = int(total) / int(n) if total else float("nan")
        print(f"| {NAMES.get(name, name)} | {CG_SCENARIOS.get(scenario, scenario)} | {statuses} | "
              f"{per / 1000:,.1f} k | {per / base:.2f}× |")


TLS_SCENARIOS = {
    "tls_keepalive": "HTTP/1.1 keep-alive over TLS, valid keys (req/s)",
    "tls_handshake": "a new TLS connection per request, valid keys (handshakes/s)",
    "h2": "HTTP/2 over TLS, 10 streams a connection, console JWT (req/s)",
}


def parse_h2load(path):
    """Requests per second and the non-2xx count from h2load's summary."""
    r = {"rps": 0.0, "non2xx": 0, "errors": 0}
    with open(path) as f:
        for line in f:
            w = line.split()
            if line.startswith("finished in"):
                r["rps"] = float(w[3])
            elif line.startswith("status codes:"):
                counts = [int(x) for x in line.replace(",", " ").split() if x.isdigit()]
                r["non2xx"] = sum(counts[1:])  # 2xx, 3xx, 4xx, 5xx
            elif line.startswith("requests:"):
                r["errors"] = int(w[w.index("errored,") - 1]) if "errored," in w else 0
    return r


def tls_report(out):
    """Medians over the rounds of bench/run.sh tls, the gateway against nginx."""
    runs = defaultdict(list)
    with open(f"{out}/tls.tsv") as f:
        for line in f:
            rnd, scenario, target, path = line.rstrip("\n").split("\t")
            runs[(scenario, target)].append(parse_h2load(path) if scenario == "h2" else parse_wrk(path))
    print("| scenario | nginx API-key gateway | msgflash-gateway | ratio | non-2xx (nginx / ours) |")
    print("|---|---:|---:|---:|---:|")
    for scenario, label in TLS_SCENARIOS.items():
        a, b = runs.get((scenario, "nginx_gw"), []), runs.get((scenario, "gw_embedded"), [])
        if not a or not b:
            continue
        ra, rb = med(a, "rps"), med(b, "rps")
        na, nb = sum(r["non2xx"] for r in a), sum(r["non2xx"] for r in b)
        print(f"| {label} | {ra:,.0f} | {rb:,.0f} | {rb / ra:.2f}× | {na} / {nb} |")


def main():
    out = sys.argv[1]
    if len(sys.argv) > 2 and sys.argv[2] == "--callgrind":
        callgrind_report(out)
        return
    if len(sys.argv) > 2 and sys.argv[2] == "--tls":
        tls_report(out)
        return
    runs = load(out)
    if len(sys.argv) > 3 and sys.argv[2] == "--peak":
        print(f"{med(runs[('main', 'valid', sys.argv[3])], 'rps'):.0f}")
    elif len(sys.argv) > 2 and sys.argv[2] == "--tune":
        tune_report(out, runs)
    else:
        main_report(out, runs)


if __name__ == "__main__":
    main()
