//! Operations: every metric the Grafana dashboard and the Prometheus alert rules use is exported
//! by a running gateway, with the labels they use; the rules file is valid (`promtool`).

use crate::redis_server::RedisServer;
use crate::support::*;
use crate::tls::Ca;
use std::collections::{BTreeMap, BTreeSet};

const ALERTS: &str = include_str!("../../deploy/prometheus/alerts.yml");
const DASHBOARD: &str = include_str!("../../deploy/grafana/msgflash-gateway.json");
/// Labels Prometheus adds or histograms carry: never the gateway's to export.
const SCRAPE_LABELS: [&str; 3] = ["instance", "job", "le"];

/// Metric family -> label names seen on its samples (families announced without samples, too).
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut families: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap();
            families.entry(name.to_owned()).or_default();
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (name, labels) = match line.split_once('{') {
            Some((n, rest)) => (n, rest.split_once('}').unwrap().0),
            None => (line.split(' ').next().unwrap(), ""),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| families.contains_key(*f)))
            .unwrap_or(name);
        let keys = families.entry(family.to_owned()).or_default();
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            keys.insert(pair.split_once('=').unwrap().0.to_owned());
        }
    }
    families
}

/// The PromQL expressions of the rules and the dashboard.
fn expressions() -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = ALERTS.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let mut expr = rest.trim().to_owned();
        if expr == "|" {
            expr.clear();
            while let Some(next) = lines.peek() {
                if next.trim_start().starts_with("for:") || next.trim_start().starts_with("labels:")
                {
                    break;
                }
                expr.push_str(lines.next().unwrap().trim());
                expr.push(' ');
            }
        }
        out.push(expr);
    }
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["datasource"]["type"] == "loki" {
            continue;
        }
        for target in panel["targets"].as_array().unwrap() {
            out.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    out
}

/// `(metric, label names in its selector)` for every `msgflash_*` name in `expr`, and the
/// label names of its `by (...)` groupings.
fn references(expr: &str) -> (Vec<(String, Vec<String>)>, Vec<String>) {
    let mut metrics = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("msgflash_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..end].to_owned();
        let mut labels = Vec::new();
        if let Some(selector) = tail[end..].strip_prefix('{') {
            let body = selector.split_once('}').unwrap().0;
            for pair in body.split(',') {
                let key = pair.split(['=', '!']).next().unwrap().trim();
                labels.push(key.to_owned());
            }
        }
        metrics.push((name, labels));
        rest = &tail[end..];
    }
    let mut grouped = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("by (") {
        let body = rest[i + 4..].split_once(')').unwrap().0;
        grouped.extend(body.split(',').map(|l| l.trim().to_owned()));
        rest = &rest[i + 4..];
    }
    (metrics, grouped)
}

#[test]
fn every_metric_the_dashboard_and_the_alerts_use_is_exported_with_its_labels() {
    // A gateway that has everything to report: Redis (breakers), TLS (certificates), the access
    // log, a forwarded request, a rate-limit refusal, a failed reload.
    let redis = RedisServer::start();
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    ca.leaf(dir.path(), "api", "api.test");
    let tls_addr = free_addr();
    let gw = Gateway::start_with(
        Setup::new()
            .on_redis(redis.url())
            .server(&format!(
                "tls = {{ listen = \"{tls_addr}\", certificates = [{{ cert = \"{}\", key = \"{}\" }}] }}",
                dir.path().join("api.pem").display(),
                dir.path().join("api.key").display()
            ))
            .log(&format!("access_log = \"{}\"", dir.path().join("access.log").display())),
    );
    let (key, _) = gw.account_with_key("acme", "pro");
    let statuses: Vec<u16> = (0..12)
        .map(|_| gw.get("/api/v1/x", &[("x-api-key", &key)]).status)
        .collect();
    assert!(
        statuses.contains(&200) && statuses.contains(&429),
        "{statuses:?}"
    );
    let families = exported(
        &crate::client::request(gw.admin, "GET", "/metrics", &[], None)
            .unwrap()
            .text(),
    );

    let mut problems = Vec::new();
    for expr in expressions() {
        let (metrics, grouped) = references(&expr);
        assert!(!metrics.is_empty(), "no gateway metric in {expr}");
        let mut labels_here = BTreeSet::new();
        for (name, labels) in metrics {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| families.contains_key(*f)))
                .unwrap_or(&name);
            let Some(exported_labels) = families.get(family) else {
                problems.push(format!("{name} is not exported ({expr})"));
                continue;
            };
            labels_here.extend(exported_labels.iter().cloned());
            for label in labels
                .iter()
                .filter(|l| !SCRAPE_LABELS.contains(&l.as_str()))
            {
                if !exported_labels.contains(label) {
                    problems.push(format!("{name} has no label {label} ({expr})"));
                }
            }
        }
        for label in grouped
            .iter()
            .filter(|l| !SCRAPE_LABELS.contains(&l.as_str()))
        {
            if !labels_here.contains(label) {
                problems.push(format!("no metric of `{expr}` has the label {label}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_alert_rules_are_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");
    let out = std::process::Command::new("promtool")
        .args(["check", "rules", path])
        .output()
        .expect("promtool is required (Debian's prometheus package; .ci/run installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
