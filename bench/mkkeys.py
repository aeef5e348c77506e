#!/usr/bin/env python3
"""Creates ACCOUNTS accounts on the bench plan with KEYS_PER_ACCOUNT keys each through the
gateway's admin API and writes the full keys, one a line, to OUT.

usage: mkkeys.py ADMIN_ADDR OUT [ACCOUNTS] [KEYS_PER_ACCOUNT] [PREFIX]
(the admin token comes from MSGFLASH_ADMIN_TOKEN; BENCH_PLAN names another plan than "bench")"""
import http.client
import json
import os
import sys
import threading

addr, out = sys.argv[1], sys.argv[2]
accounts = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
per = int(sys.argv[4]) if len(sys.argv) > 4 else 10
prefix = sys.argv[5] if len(sys.argv) > 5 else "bench"
plan = os.environ.get("BENCH_PLAN", "bench")
host, port = addr.rsplit(":", 1)
headers = {
    "authorization": "Bearer " + os.environ["MSGFLASH_ADMIN_TOKEN"],
    "content-type": "application/json",
}
keys = [None] * (accounts * per)
errors = []


def call(conn, method, path, body, want):
    conn.request(method, path, json.dumps(body), headers)
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != want:
        raise RuntimeError(f"{method} {path}: {resp.status} {data[:200]!r}")
    return json.loads(data)


def worker(part, parts):
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        for a in range(part, accounts, parts):
            acct = f"{prefix}{a:05d}"
            call(conn, "PUT", f"/admin/v1/accounts/{acct}",
                 {"plan": plan, "subscription": "active"}, 200)
            for k in range(per):
                rec = call(conn, "POST", f"/admin/v1/accounts/{acct}/keys", {"name": f"k{k}"}, 201)
                keys[a * per + k] = rec["key"]
    except Exception as e:  # reported below
        errors.append(e)


threads = [threading.Thread(target=worker, args=(i, 4)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if errors:
    sys.exit(f"mkkeys: {errors[0]}")
with open(out, "w") as f:
    f.write("\n".join(keys) + "\n")
print(f"mkkeys: {len(keys)} keys on {accounts} accounts -> {out}")
