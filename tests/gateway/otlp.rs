//! OpenTelemetry export (cargo feature `otlp`): one span per request with store and upstream
//! child spans, sent as OTLP/HTTP JSON, received here by an in-process collector; its ids are
//! the W3C ids the upstream saw. Without the feature, asking for it is a configuration error.

use crate::support::*;

#[cfg(feature = "otlp")]
#[test]
fn a_request_is_exported_as_a_span_with_store_and_upstream_children() {
    use serde_json::Value;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::{Arc, Mutex};

    // The collector: answers every POST 200 and keeps the bodies.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let collector = listener.local_addr().unwrap();
    let bodies = Arc::new(Mutex::new(Vec::<Value>::new()));
    {
        let bodies = bodies.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        let mut body = vec![0; length];
                        reader.read_exact(&mut body).unwrap();
                        if let Ok(v) = serde_json::from_slice(&body) {
                            bodies.lock().unwrap().push(v);
                        }
                        let _ = (&conn).write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
                        );
                        length = 0;
                    }
                }
            }
        });
    }
    let gw = Gateway::start_with(Setup::new().log(&format!(
        "access_log = \"off\"\notlp_endpoint = \"http://{collector}/v1/traces\""
    )));
    let (key, _) = gw.account_with_key("acme", "pro");
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let seen = echoed(&gw.get(
        "/api/v1/x",
        &[("x-api-key", &key), ("traceparent", traceparent)],
    ));
    let forwarded = seen["headers"]["traceparent"].as_str().unwrap().to_owned();
    let our_span = &forwarded[36..52];

    let mut spans: Vec<Value> = Vec::new();
    eventually("the collector receives the request's spans", || {
        spans = bodies
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b["resourceSpans"].as_array().cloned().unwrap_or_default())
            .flat_map(|rs| rs["scopeSpans"].as_array().cloned().unwrap_or_default())
            .flat_map(|ss| ss["spans"].as_array().cloned().unwrap_or_default())
            .filter(|s| s["traceId"] == "4bf92f3577b34da6a3ce929d0e0e4736")
            .collect();
        spans.len() >= 3
    });
    let by_name = |name: &str| {
        spans
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no {name} span in {spans:?}"))
    };
    let server = by_name("GET /api/v1/");
    assert_eq!(server["spanId"], our_span);
    assert_eq!(server["parentSpanId"], "00f067aa0ba902b7");
    for child in ["store", "upstream"] {
        assert_eq!(by_name(child)["parentSpanId"], our_span, "{child}");
    }
    let attrs = server["attributes"].to_string();
    assert!(
        attrs.contains("http.response.status_code") && attrs.contains("acme"),
        "{attrs}"
    );
    assert!(!attrs.contains(&key), "the key is in a span");
}

#[cfg(not(feature = "otlp"))]
#[test]
fn without_the_feature_asking_for_span_export_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let (err, _) = config_errors(
        dir.path(),
        &Setup::new().log("otlp_endpoint = \"http://127.0.0.1:4318/v1/traces\""),
    );
    assert!(
        err.ends_with(
            "log.otlp_endpoint: this build exports no spans (build with `--features otlp`)"
        ),
        "{err}"
    );
}
