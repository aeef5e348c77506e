//! The house's one rule: dependencies point down. Every top-level module of `src/` has a layer;
//! a module may name (`crate::…`) only modules of lower layers, so there is no import circle.
//! Adding a module means giving it a layer here (the test names any module it does not know).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;

/// Lowest first. Modules of one layer do not name each other.
const LAYERS: &[&[&str]] = &[
    // Pure leaves: no other module of the crate.
    &[
        "path",
        "clock",
        "cache",
        "client_ip",
        "certs",
        "log_limit",
        "proxy_protocol",
        "access_log",
        "trace_context",
        "conn_limit",
        "diagnostics",
        "histogram",
        "echo",
        "body_type",
        "host_name",
    ],
    // Pure logic on top of the leaves.
    &["errors", "limits", "edge_stream", "metrics", "spans"],
    &["before_tls"],
    // Policy files, then the configuration that holds them; reading requests.
    &["policy", "inspect"],
    &["config"],
    // Things the configuration describes.
    &["store", "routing"],
    &["auth"],
    // The reloadable snapshot and the management operations.
    &["live", "manage"],
    &["gateway"],
    // Faces: the pingora proxy and the admin listener.
    &["proxy", "admin"],
    &["server"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The top-level modules a source text names through `crate::`.
fn named_modules(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            group[..end]
                .split(',')
                .map(|s| s.trim().split("::").next().unwrap_or(""))
                .collect()
        } else {
            vec![rest
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
                .unwrap_or("")]
        };
        out.extend(
            names
                .into_iter()
                .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                .map(str::to_owned),
        );
    }
    out
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn dependencies_point_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut problems = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if top == "lib" || top == "main" {
            continue;
        }
        let Some(own) = layer_of(&top) else {
            problems.insert(
                relative.display().to_string(),
                format!("module {top} has no layer"),
            );
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for named in named_modules(&text) {
            if named == top {
                continue;
            }
            match layer_of(&named) {
                Some(l) if l < own => {}
                Some(_) => {
                    problems.insert(
                        format!("{} -> {named}", relative.display()),
                        format!("{top} (layer {own}) may not name {named} (not below it)"),
                    );
                }
                None => {
                    problems.insert(
                        format!("{} -> {named}", relative.display()),
                        format!("module {named} has no layer"),
                    );
                }
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_scanner_sees_grouped_and_plain_paths() {
    assert_eq!(
        named_modules("use crate::a::b; use crate::{c::d, e}; x = crate::f(); // crate::G"),
        ["a", "c", "e", "f"]
    );
}
