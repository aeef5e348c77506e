//! Prometheus metrics: requests by route and status, a latency histogram, store and cache gauges.

use crate::cache::{keyed_dash_map, KeyedDashMap};
use crate::histogram::Histogram;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Upper bounds of the whole-request latency histogram, in seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Counters shared by every request; cheap atomics, labels from a bounded set.
pub struct Metrics {
    /// (route prefix, status) -> count; requests matching no route use the label `none`.
    /// Bounded: configured prefixes × statuses.
    requests: KeyedDashMap<(Arc<str>, u16), AtomicU64>,
    none: Arc<str>,
    latency: Histogram,
    /// Rejections by error code.
    rejections: KeyedDashMap<&'static str, AtomicU64>,
    store_errors: AtomicU64,
    fail_open: AtomicU64,
    /// Time a request waited on the store (key lookup and admission), when it did.
    store_latency: Histogram,
    /// Time to an upstream's response head, by upstream name (bounded: configured names).
    upstream_latency: KeyedDashMap<String, Histogram>,
    /// Requests between their head and the end of their logging.
    in_flight: Arc<AtomicU64>,
    /// plan -> [rate-limit refusals, quota refusals] (bounded: the plans file's names).
    limit_refusals: KeyedDashMap<String, [AtomicU64; 2]>,
}

/// One request in flight: counted while it lives.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<AtomicU64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Limit {
    Rate = 0,
    Quota = 1,
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            requests: keyed_dash_map(),
            none: Arc::from("none"),
            latency: Histogram::new(BUCKETS),
            rejections: keyed_dash_map(),
            store_errors: AtomicU64::new(0),
            fail_open: AtomicU64::new(0),
            store_latency: Histogram::default(),
            upstream_latency: keyed_dash_map(),
            in_flight: Arc::new(AtomicU64::new(0)),
            limit_refusals: keyed_dash_map(),
        }
    }

    /// Counts a request in flight until the guard is dropped.
    pub(crate) fn in_flight(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.in_flight.clone())
    }

    /// A request waited `d` on the store.
    pub(crate) fn store_waited(&self, d: Duration) {
        self.store_latency.observe(d);
    }

    /// Upstream `name` answered its response head after `d`.
    pub(crate) fn upstream_answered(&self, name: &str, d: Duration) {
        match self.upstream_latency.get(name) {
            Some(h) => h.observe(d),
            None => self
                .upstream_latency
                .entry(name.to_owned())
                .or_default()
                .observe(d),
        }
    }

    /// A request of an account on `plan` refused by `limit`.
    pub(crate) fn limit_refused(&self, plan: &str, limit: Limit) {
        match self.limit_refusals.get(plan) {
            Some(c) => c[limit as usize].fetch_add(1, Ordering::Relaxed),
            None => self.limit_refusals.entry(plan.to_owned()).or_default()[limit as usize]
                .fetch_add(1, Ordering::Relaxed),
        };
    }

    /// One finished request.
    pub fn record(&self, route: Option<&Arc<str>>, status: u16, elapsed: Duration) {
        let key = (route.unwrap_or(&self.none).clone(), status);
        match self.requests.get(&key) {
            Some(c) => {
                c.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                self.requests
                    .entry(key)
                    .or_default()
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency.observe(elapsed);
    }

    /// One request the gateway answered itself with `code`.
    pub fn rejected(&self, code: &'static str) {
        self.rejections
            .entry(code)
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn store_error(&self) {
        self.store_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A request forwarded unmetered because the store failed and the route fails open.
    pub fn fail_open(&self) {
        self.fail_open.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self, cached_keys: usize, store_ready: bool) -> String {
        let mut out = String::with_capacity(2048);
        out.push_str(
            "# HELP msgflash_requests_total Requests handled, by route prefix and status.\n",
        );
        out.push_str("# TYPE msgflash_requests_total counter\n");
        let mut rows: Vec<(String, u16, u64)> = self
            .requests
            .iter()
            .map(|e| {
                let (route, status) = e.key();
                (
                    route.to_string(),
                    *status,
                    e.value().load(Ordering::Relaxed),
                )
            })
            .collect();
        rows.sort();
        for (route, status, n) in rows {
            let _ = writeln!(
                out,
                "msgflash_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(&route)
            );
        }
        out.push_str("# HELP msgflash_request_duration_seconds Time from request head to the end of logging.\n");
        out.push_str("# TYPE msgflash_request_duration_seconds histogram\n");
        self.latency
            .render(&mut out, "msgflash_request_duration_seconds", "");
        out.push_str("# HELP msgflash_rejections_total Requests answered by the gateway itself, by error code.\n");
        out.push_str("# TYPE msgflash_rejections_total counter\n");
        let mut codes: Vec<(&str, u64)> = self
            .rejections
            .iter()
            .map(|e| (*e.key(), e.value().load(Ordering::Relaxed)))
            .collect();
        codes.sort();
        for (code, n) in codes {
            let _ = writeln!(out, "msgflash_rejections_total{{code=\"{code}\"}} {n}");
        }
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        single(
            &mut out,
            "msgflash_store_errors_total",
            "counter",
            "Store calls that failed.",
            load(&self.store_errors),
        );
        single(
            &mut out,
            "msgflash_fail_open_total",
            "counter",
            "Requests forwarded unmetered while the store failed.",
            load(&self.fail_open),
        );
        single(
            &mut out,
            "msgflash_key_cache_entries",
            "gauge",
            "Keys held by the local cache.",
            cached_keys as u64,
        );
        single(
            &mut out,
            "msgflash_store_ready",
            "gauge",
            "Whether the key store answers (1) or not (0).",
            u64::from(store_ready),
        );
        single(
            &mut out,
            "msgflash_requests_in_flight",
            "gauge",
            "Requests being handled now.",
            load(&self.in_flight),
        );
        out.push_str("# HELP msgflash_store_duration_seconds Time a request waited on the store (key lookup and admission).\n");
        out.push_str("# TYPE msgflash_store_duration_seconds histogram\n");
        self.store_latency
            .render(&mut out, "msgflash_store_duration_seconds", "");
        out.push_str("# HELP msgflash_upstream_duration_seconds Time to an upstream's response head, by upstream.\n");
        out.push_str("# TYPE msgflash_upstream_duration_seconds histogram\n");
        let mut names: Vec<String> = self
            .upstream_latency
            .iter()
            .map(|e| e.key().clone())
            .collect();
        names.sort();
        for name in names {
            if let Some(h) = self.upstream_latency.get(&name) {
                h.render(
                    &mut out,
                    "msgflash_upstream_duration_seconds",
                    &format!("upstream=\"{}\"", escape(&name)),
                );
            }
        }
        out.push_str("# HELP msgflash_limit_refusals_total Requests refused by the rate limit or the monthly quota, by plan.\n");
        out.push_str("# TYPE msgflash_limit_refusals_total counter\n");
        let mut plans: Vec<(String, u64, u64)> = self
            .limit_refusals
            .iter()
            .map(|e| {
                (
                    e.key().clone(),
                    e.value()[0].load(Ordering::Relaxed),
                    e.value()[1].load(Ordering::Relaxed),
                )
            })
            .collect();
        plans.sort();
        for (plan, rate, quota) in plans {
            let plan = escape(&plan);
            let _ = writeln!(
                out,
                "msgflash_limit_refusals_total{{plan=\"{plan}\",limit=\"rate\"}} {rate}\n\
                 msgflash_limit_refusals_total{{plan=\"{plan}\",limit=\"quota\"}} {quota}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP msgflash_build_info The running build (always 1).\n# TYPE msgflash_build_info gauge\n\
             msgflash_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A metric family of one unlabelled sample.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// Appends the health of each upstream: `(name, addresses in rotation, addresses)`.
/// Appends whether this node is sure it hears every invalidation (1), or reads records from
/// the store instead of trusting its caches (0).
pub(crate) fn render_invalidations(
    out: &mut String,
    confirmed: bool,
    (unconfirmed_reads, flushes): (u64, u64),
) {
    single(
        out,
        "msgflash_invalidations_confirmed",
        "gauge",
        "1 while the invalidation channel is heard (heartbeats); 0: caches are checked against the store.",
        u64::from(confirmed),
    );
    single(
        out,
        "msgflash_cache_unconfirmed_reads_total",
        "counter",
        "Cached records read again from the store because the invalidation channel was not confirmed.",
        unconfirmed_reads,
    );
    single(
        out,
        "msgflash_cache_flushes_total",
        "counter",
        "Whole-cache flushes (each resubscription to the invalidation channel).",
        flushes,
    );
}

/// Appends the open proxy connections, those closed at accept by cap, and those closed for
/// their PROXY protocol header.
pub(crate) fn render_connections(
    out: &mut String,
    (open, idle): (usize, usize),
    refused: &[(&str, u64)],
    reclaimed: u64,
    proxy_headers_refused: u64,
) {
    single(
        out,
        "msgflash_connections_open",
        "gauge",
        "Connections open on the proxy listeners.",
        open as u64,
    );
    single(
        out,
        "msgflash_connections_idle",
        "gauge",
        "Connections kept alive, waiting for their next request (given to new ones at the global cap).",
        idle as u64,
    );
    out.push_str("# HELP msgflash_connections_refused_total Connections closed at accept, by the cap they met.\n");
    out.push_str("# TYPE msgflash_connections_refused_total counter\n");
    for (cap, n) in refused {
        let _ = writeln!(
            out,
            "msgflash_connections_refused_total{{cap=\"{cap}\"}} {n}"
        );
    }
    single(
        out,
        "msgflash_connections_reclaimed_total",
        "counter",
        "Idle kept-alive connections closed at the global cap to admit a new one.",
        reclaimed,
    );
    single(
        out,
        "msgflash_proxy_headers_refused_total",
        "counter",
        "Connections closed because their PROXY protocol header was missing, malformed or late.",
        proxy_headers_refused,
    );
}

/// Appends key-cache lookups by outcome, circuit breaker states, and the reload state.
pub(crate) fn render_operations(
    out: &mut String,
    [hit, negative_hit, store]: [u64; 3],
    breakers: &[(&str, bool)],
    (generation, last_ok, last_at_unix): (u64, bool, u64),
) {
    out.push_str("# HELP msgflash_key_lookups_total Key lookups, by what answered: the cache (hit), the cache of unknown keys (negative_hit), or the store (store).\n");
    out.push_str("# TYPE msgflash_key_lookups_total counter\n");
    let _ = writeln!(
        out,
        "msgflash_key_lookups_total{{result=\"hit\"}} {hit}\n\
         msgflash_key_lookups_total{{result=\"negative_hit\"}} {negative_hit}\n\
         msgflash_key_lookups_total{{result=\"store\"}} {store}"
    );
    out.push_str("# HELP msgflash_store_breaker_open 1 while a store circuit breaker is tripped (calls fail fast or probe), by budget.\n");
    out.push_str("# TYPE msgflash_store_breaker_open gauge\n");
    for (budget, open) in breakers {
        let _ = writeln!(
            out,
            "msgflash_store_breaker_open{{budget=\"{budget}\"}} {}",
            u8::from(*open)
        );
    }
    single(
        out,
        "msgflash_config_generation",
        "gauge",
        "Configurations applied since start (1: the first).",
        generation,
    );
    single(
        out,
        "msgflash_config_last_reload_success",
        "gauge",
        "Whether the last reload was applied (1) or refused (0).",
        u64::from(last_ok),
    );
    single(
        out,
        "msgflash_config_last_reload_timestamp_seconds",
        "gauge",
        "When the last reload was tried (Unix time; 0: none yet).",
        last_at_unix,
    );
}

/// Appends the access log's lines written and dropped (its queue full).
pub(crate) fn render_access_log(out: &mut String, (written, dropped): (u64, u64)) {
    single(
        out,
        "msgflash_access_log_lines_total",
        "counter",
        "Access log lines written.",
        written,
    );
    single(
        out,
        "msgflash_access_log_dropped_total",
        "counter",
        "Access log lines dropped because the writer fell behind (requests never wait for the log).",
        dropped,
    );
}

/// Appends the refunds a shared store did not take, and the refused admissions that may have
/// consumed usage anyway: what makes the limits stricter than the requests answered 2xx.
pub(crate) fn render_refunds(out: &mut String, failed: u64, uncertain: u64) {
    single(
        out,
        "msgflash_refunds_failed_total",
        "counter",
        "Refused requests whose token and quota unit could not be given back (limits stricter, never looser).",
        failed,
    );
    single(
        out,
        "msgflash_admissions_uncertain_total",
        "counter",
        "Requests answered 503 whose admission may still have run in the store (a token and a quota unit possibly consumed).",
        uncertain,
    );
}

/// Appends when each served certificate expires: `(certificate file, Unix seconds)`.
pub(crate) fn render_certificates(out: &mut String, certs: &[(String, i64)]) {
    if certs.is_empty() {
        return;
    }
    out.push_str("# HELP msgflash_tls_certificate_expiry_timestamp_seconds When a served certificate stops being valid (Unix time).\n");
    out.push_str("# TYPE msgflash_tls_certificate_expiry_timestamp_seconds gauge\n");
    for (file, not_after) in certs {
        let _ = writeln!(
            out,
            "msgflash_tls_certificate_expiry_timestamp_seconds{{file=\"{}\"}} {not_after}",
            escape(file)
        );
    }
}

pub(crate) fn render_upstreams(out: &mut String, pools: &[(&str, usize, usize)]) {
    out.push_str("# HELP msgflash_upstream_healthy_addresses Addresses of an upstream in rotation (health checks and passive failures).\n");
    out.push_str("# TYPE msgflash_upstream_healthy_addresses gauge\n");
    for (name, healthy, _) in pools {
        let _ = writeln!(
            out,
            "msgflash_upstream_healthy_addresses{{upstream=\"{}\"}} {healthy}",
            escape(name)
        );
    }
    out.push_str("# HELP msgflash_upstream_addresses Addresses configured for an upstream.\n");
    out.push_str("# TYPE msgflash_upstream_addresses gauge\n");
    for (name, _, total) in pools {
        let _ = writeln!(
            out,
            "msgflash_upstream_addresses{{upstream=\"{}\"}} {total}",
            escape(name)
        );
    }
}

/// A label value as the Prometheus text format writes one: `\`, `"` and line feeds escaped.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::new();
        let route: Arc<str> = Arc::from("/api/v1/");
        m.record(Some(&route), 200, Duration::from_micros(300));
        m.record(Some(&route), 200, Duration::from_millis(20));
        m.record(None, 404, Duration::from_micros(10));
        m.rejected("NOT_FOUND");
        let text = m.render(3, true);
        assert!(text.contains("msgflash_requests_total{route=\"/api/v1/\",status=\"200\"} 2\n"));
        assert!(text.contains("msgflash_requests_total{route=\"none\",status=\"404\"} 1\n"));
        assert!(text.contains("msgflash_request_duration_seconds_bucket{le=\"0.0005\"} 2\n"));
        assert!(text.contains("msgflash_request_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("msgflash_rejections_total{code=\"NOT_FOUND\"} 1\n"));
        assert!(text.contains("msgflash_key_cache_entries 3\n"));
    }
}
