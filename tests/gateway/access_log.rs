//! Operations: the access log (one JSON line per request, off the request path; never a key,
//! a token or a secret), W3C trace context (kept, started, forwarded), reopening the log file on
//! SIGUSR1, and the drop counter when the writer cannot keep up.

use crate::client::request;
use crate::processes::Process;
use crate::support::*;
use serde_json::Value;
use std::process::Stdio;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The lines of the access log at `path` once it holds `n`.
fn lines(path: &std::path::Path, n: usize) -> Vec<Value> {
    let mut text = String::new();
    eventually("the access log has its lines", || {
        text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines().count() >= n
    });
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_request_gets_one_line_with_what_happened_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let gw = Gateway::start_with(Setup::new().log(&format!("access_log = \"{}\"", path.display())));
    let (key, key_id) = gw.account_with_key("acme", "pro");
    let ok = gw.get(
        "/api/v1/messages/%73end",
        &[
            ("x-api-key", &key),
            ("user-agent", "test-agent/1.0 \"quoted\""),
            ("traceparent", TRACEPARENT),
        ],
    );
    echoed(&ok);
    let refused = gw.get("/api/v1/messages", &[("x-api-key", "msgf_live_nope")]);
    assert_eq!(refused.status, 401);
    let token = gw.token("acme", 3600);
    let console = gw.get(
        "/api/dashboard",
        &[("authorization", &format!("Bearer {token}"))],
    );
    echoed(&console);
    let l = lines(&path, 3);
    assert_eq!(l.len(), 3, "{l:?}");

    let (a, b, c) = (&l[0], &l[1], &l[2]);
    assert_eq!(a["method"], "GET");
    assert_eq!(a["path"], "/api/v1/messages/send");
    assert_eq!(a["route"], "/api/v1/");
    assert_eq!(a["auth"], "api_key");
    assert_eq!(a["status"], 200);
    assert_eq!(a["account_id"], "acme");
    assert_eq!(a["key_id"], key_id.as_str());
    assert_eq!(a["client"], "127.0.0.1");
    assert_eq!(a["upstream"], gw.echo.to_string());
    assert_eq!(a["upstream_status"], 200);
    assert_eq!(a["user_agent"], "test-agent/1.0 \"quoted\"");
    assert_eq!(a["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(a["request_id"], ok.header("x-request-id").unwrap());
    assert!(a["duration_ms"].as_f64().unwrap() >= a["upstream_ms"].as_f64().unwrap());
    assert!(a.get("code").is_none() && a.get("tls").is_none());
    assert_eq!(a["bytes_in"], 0);
    assert!(a["bytes_out"].as_u64().unwrap() > 0);
    assert!(a["time"].as_str().unwrap().ends_with('Z'));

    assert_eq!(b["status"], 401);
    assert_eq!(b["code"], "UNAUTHORIZED");
    assert!(b.get("account_id").is_none() && b.get("upstream").is_none());
    // A generated request id is the (random) trace id.
    assert_eq!(b["request_id"], b["trace_id"]);
    assert_eq!(b["trace_id"].as_str().unwrap().len(), 32);

    assert_eq!(c["auth"], "jwt");
    assert_eq!(c["route"], "/api/");
    assert_eq!(c["account_id"], "acme");
    assert_eq!(c["user_id"], "user-1");
}

#[test]
fn no_key_token_or_secret_is_ever_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let gw = Gateway::start_with(Setup::new().log(&format!("access_log = \"{}\"", path.display())));
    let (key, key_id) = gw.account_with_key("acme", "pro");
    let token = gw.token("acme", 3600);
    let bearer = format!("Bearer {token}");
    echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
    echoed(&gw.get(
        "/api/v1/x?key=1",
        &[("x-api-key", &key), ("authorization", &bearer)],
    ));
    echoed(&gw.get("/api/dashboard", &[("authorization", &bearer)]));
    gw.admin_call(
        "DELETE",
        &format!("/admin/v1/accounts/acme/keys/{key_id}"),
        None,
    );
    assert_eq!(gw.get("/api/v1/x", &[("x-api-key", &key)]).status, 401);
    assert_eq!(
        gw.get(
            "/api/dashboard",
            &[("authorization", &format!("{bearer}x"))]
        )
        .status,
        401
    );
    // An open route's path past its prefix (a reset link's token) is not written down.
    let reset = "/api/auth/reset/3c7b0e9a54f1d2e8b6a9c0f4e2d1b7a5";
    echoed(&gw.get(reset, &[]));
    // Refused before routing (a GET with a body): judged by the route its path would take.
    assert_eq!(gw.send("GET", reset, &[], Some(b"x")).status, 400);
    // A line is written when its request's last phase ends, which can be after the client
    // has its answer and sent the next: found by what they say, not by their order.
    let lines = lines(&path, 7);
    let reset_lines: Vec<&Value> = lines
        .iter()
        .filter(|l| l["path"] == "/api/auth/…")
        .collect();
    assert_eq!(reset_lines.len(), 2, "{lines:?}");
    assert!(reset_lines
        .iter()
        .any(|l| l["status"] == 200 && l["auth"] == "open"));
    assert!(reset_lines.iter().any(|l| l["status"] == 400));
    let text = lines
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    for secret in [
        key.as_str(),
        &key[10..],
        token.as_str(),
        token.split('.').nth(1).unwrap(),
        token.split('.').nth(2).unwrap(),
        ADMIN_TOKEN,
        JWT_SECRET,
        &reset[16..],
    ] {
        assert!(
            !text.contains(secret),
            "{secret} is in the access log:\n{text}"
        );
    }
}

#[test]
fn a_trace_is_kept_started_and_forwarded() {
    let gw = Gateway::start();
    let (key, _) = gw.account_with_key("acme", "pro");
    // Kept: the upstream sees the client's trace, and the tracestate that goes with it.
    let r = gw.get(
        "/api/v1/x",
        &[
            ("x-api-key", &key),
            ("traceparent", TRACEPARENT),
            ("tracestate", "congo=t61rcWkgMzE"),
        ],
    );
    let seen = echoed(&r);
    // Without span export the gateway is no hop of its own: the client's span stays the
    // parent (a span the gateway never exports would leave the upstream's pointing at nothing).
    assert_eq!(seen["headers"]["traceparent"], TRACEPARENT);
    assert_eq!(seen["headers"]["tracestate"], "congo=t61rcWkgMzE");
    // The generated request id is the trace id with a random suffix: two requests of one
    // client trace are told apart.
    let id = r.header("x-request-id").unwrap().to_owned();
    assert!(id.starts_with("4bf92f3577b34da6a3ce929d0e0e4736-"), "{id}");
    assert_eq!(seen["headers"]["x-request-id"], id.as_str());
    let again = gw.get(
        "/api/v1/x",
        &[("x-api-key", &key), ("traceparent", TRACEPARENT)],
    );
    assert_ne!(again.header("x-request-id").unwrap(), id);
    // Started: an invalid traceparent is replaced by a new random trace, whose id is the
    // generated request id; a tracestate without its trace is dropped.
    let r = gw.get(
        "/api/v1/x",
        &[
            ("x-api-key", &key),
            ("traceparent", "00-zz-00-01"),
            ("tracestate", "a=b"),
        ],
    );
    let seen = echoed(&r);
    let started = seen["headers"]["traceparent"].as_str().unwrap();
    let request_id = r.header("x-request-id").unwrap();
    assert_eq!(started, format!("00-{request_id}-{}-00", &started[36..52]));
    assert!(seen["headers"].get("tracestate").is_none());
    // Random, not a counter: two requests share no prefix to speak of.
    let other = gw.get("/api/v1/x", &[("x-api-key", &key)]);
    let other_id = other.header("x-request-id").unwrap();
    assert_ne!(&other_id[..16], &request_id[..16]);
    // A client's sane request id is kept.
    let r = gw.get(
        "/api/v1/x",
        &[("x-api-key", &key), ("x-request-id", "client-id-1")],
    );
    assert_eq!(r.header("x-request-id"), Some("client-id-1"));
}

fn access_process(log_lines: &str, stdout: Stdio) -> Process {
    let tmp = tempfile::tempdir().unwrap();
    let (proxy, admin, echo) = (free_addr(), free_addr(), free_addr());
    write_config(tmp.path(), &Setup::new().log(log_lines), proxy, admin, echo);
    let mut p = Process::start_with_stdout(tmp.path(), proxy, admin, &[], stdout);
    p._tmp = Some(tmp);
    p
}

/// logrotate: the file is moved away, SIGUSR1, and the next lines go to a new file.
#[test]
fn sigusr1_reopens_the_access_log() {
    let p = access_process("access_log = \"access.log\"", Stdio::null());
    let path = p.dir.join("access.log");
    let call = || {
        request(
            p.proxy,
            "GET",
            "/api/v1/x",
            &[("x-api-key", "msgf_live_nope")],
            None,
        )
    };
    call().unwrap();
    lines(&path, 1);
    std::fs::rename(&path, p.dir.join("access.log.1")).unwrap();
    p.signal("USR1");
    // The reopen happens before the next line after the signal is seen: lines go on to the
    // moved file until then, so wait for the new one to appear.
    eventually("a line reaches the new file", || {
        call().unwrap();
        path.exists()
    });
    assert_eq!(lines(&path, 1)[0]["status"], 401);
}

/// A writer that cannot keep up (its stdout never read) costs dropped lines, counted, never a
/// request's time.
#[test]
fn a_stalled_writer_drops_lines_and_counts_them_without_stalling_requests() {
    let p = access_process(
        "access_log = \"stdout\"\naccess_log_buffer = 10",
        Stdio::piped(),
    );
    let long = format!("agent/{}", "x".repeat(2000));
    for _ in 0..200 {
        let r = request(
            p.proxy,
            "GET",
            "/api/v1/x",
            &[("x-api-key", "msgf_live_nope"), ("user-agent", &long)],
            None,
        )
        .unwrap();
        // Refusals, every one logged (the failed-authentication limit turns them into 429s).
        assert!([401, 429].contains(&r.status), "{}", r.status);
    }
    let metrics = request(p.admin, "GET", "/metrics", &[], None)
        .unwrap()
        .text();
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("msgflash_access_log_dropped_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(dropped > 0, "{metrics}");
}

/// `[log] format = "json"`: the operational lines (start, reload, …) are JSON objects too; every
/// admin call that changes something leaves one (who, what, the answer, a created key's id,
/// never the key), and so does a refused admin token.
#[test]
fn operational_logs_are_json_when_asked_and_admin_calls_are_audited() {
    let tmp = tempfile::tempdir().unwrap();
    let (proxy, admin, echo) = (free_addr(), free_addr(), free_addr());
    let path = write_config(
        tmp.path(),
        &Setup::new().log("format = \"json\"\naccess_log = \"off\""),
        proxy,
        admin,
        echo,
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_msgflash-gateway"))
        .args(["run", "-c"])
        .arg(&path)
        .env("TEST_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("TEST_JWT_SECRET", JWT_SECRET)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listening(admin);
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let r = request(
        admin,
        "POST",
        "/admin/v1/reload",
        &[("authorization", &auth)],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let call = |method: &str, path: &str, auth: &str, body: Option<&[u8]>| {
        request(
            admin,
            method,
            path,
            &[
                ("authorization", auth),
                ("content-type", "application/json"),
            ],
            body,
        )
        .unwrap()
    };
    let r = call(
        "PUT",
        "/admin/v1/accounts/acme",
        &auth,
        Some(br#"{"plan":"pro","subscription":"active"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call(
        "POST",
        "/admin/v1/accounts/acme/keys",
        &auth,
        Some(br#"{"name":"k"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json().unwrap();
    let r = call("GET", "/admin/v1/accounts/acme", "Bearer wrong-token", None);
    assert_eq!(r.status, 401);
    child.kill().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    child.wait().unwrap();
    let lines: Vec<Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "msgflash-gateway starting" && l["level"] == "INFO"),
        "{err}"
    );
    let audit: Vec<(&str, &str, &str, String, &str, &str)> = lines
        .iter()
        .filter(|l| {
            let m = &l["fields"]["message"];
            *m == "admin call" || *m == "admin call refused: invalid or missing token"
        })
        .map(|l| {
            let f = &l["fields"];
            (
                l["level"].as_str().unwrap(),
                f["method"].as_str().unwrap(),
                f["call"].as_str().unwrap(),
                f["status"].to_string(),
                f["peer"].as_str().unwrap(),
                f["created"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    let key_id = created["id"].as_str().unwrap();
    assert_eq!(
        audit,
        [
            ("INFO", "POST", "reload", "200".into(), "127.0.0.1", ""),
            (
                "INFO",
                "PUT",
                "accounts/acme",
                "200".into(),
                "127.0.0.1",
                ""
            ),
            (
                "INFO",
                "POST",
                "accounts/acme/keys",
                "201".into(),
                "127.0.0.1",
                key_id
            ),
            (
                "WARN",
                "GET",
                "accounts/acme",
                "null".into(),
                "127.0.0.1",
                "-"
            ),
        ],
        "{err}"
    );
    assert!(!err.contains(created["key"].as_str().unwrap()), "{err}");
    assert!(
        !err.contains(ADMIN_TOKEN) && !err.contains("wrong-token"),
        "{err}"
    );
}
