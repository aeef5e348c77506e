//! SPEC §5 upstream failures: refused (502), timed out (504), none healthy (503), failover.

use crate::support::*;
use std::net::TcpListener;

/// A gateway whose `api` upstream is at `addresses`, with short timeouts.
fn upstream(addresses: Vec<At>, health_check: Option<&'static str>) -> Setup {
    Setup::new().api_upstream(ApiUpstream {
        addresses,
        connect_timeout: "500ms",
        read_timeout: "300ms",
        health_check,
        tls: None,
        host: None,
    })
}

/// An upstream that accepts connections and never answers.
fn silent_upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().take(16) {
            held.push(conn);
        }
    });
    addr
}

#[test]
fn refused_upstream_is_502() {
    let dead = free_addr().to_string();
    let gw = Gateway::start_with(upstream(vec![At::Addr(dead)], None));
    let (key, _) = gw.account_with_key("acme", "pro");
    let r = gw.get("/api/v1/x", &[("x-api-key", &key)]);
    assert_error(&r, 502, "BAD_GATEWAY", "The upstream service failed");
    assert_eq!(r.header("ratelimit"), Some("\"burst\";r=9;t=1"));
}

#[test]
fn silent_upstream_is_504() {
    let gw = Gateway::start_with(upstream(vec![At::Addr(silent_upstream())], None));
    let (key, _) = gw.account_with_key("acme", "pro");
    let r = gw.get("/api/v1/x", &[("x-api-key", &key)]);
    assert_error(&r, 504, "GATEWAY_TIMEOUT", "The upstream service timed out");
}

#[test]
fn a_dead_address_is_skipped() {
    let dead = free_addr().to_string();
    let gw2 = Gateway::start_with(upstream(vec![At::Addr(dead), At::Echo], None));
    let (key, _) = gw2.account_with_key("acme", "pro");
    // Round robin starts on the dead address half of the time: every request still succeeds.
    // A request that fails over to the next address is rewritten like any other.
    for _ in 0..6 {
        let seen = echoed(&gw2.get(
            "/api/v1//./x",
            &[("x-api-key", &key), ("x-account-id", "spoof")],
        ));
        assert_eq!(seen["uri"], "/api/v1/x");
        assert_eq!(seen["headers"]["x-account-id"], "acme");
        assert!(seen["headers"]["x-api-key-id"].is_string());
        assert!(seen["headers"].get("x-api-key").is_none());
        gw2.clock.advance_ms(100);
    }
}

#[test]
fn no_healthy_address_is_503() {
    let dead = free_addr().to_string();
    let checks = "{ interval = \"1h\", timeout = \"100ms\", unhealthy_threshold = 1 }";
    let gw = Gateway::start_with(upstream(vec![At::Addr(dead)], Some(checks)));
    let (key, _) = gw.account_with_key("acme", "pro");
    // The first probe runs at start; the metrics say when it has taken the address out.
    eventually("the health check takes the dead address out", || {
        let metrics = crate::client::request(gw.admin, "GET", "/metrics", &[], None)
            .unwrap()
            .text();
        metrics.contains("msgflash_upstream_healthy_addresses{upstream=\"api\"} 0\n")
            && metrics.contains("msgflash_upstream_addresses{upstream=\"api\"} 1\n")
    });
    let r = gw.get("/api/v1/x", &[("x-api-key", &key)]);
    assert_error(
        &r,
        503,
        "SERVICE_UNAVAILABLE",
        "No healthy upstream is available",
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    // Nothing went anywhere: no rate-limit token and no quota spent (SPEC §3 counts requests
    // forwarded), and the key is still checked first.
    assert_eq!(r.header("ratelimit"), Some("\"burst\";r=10;t=0"));
    let usage = gw
        .admin_call("GET", "/admin/v1/accounts/acme", None)
        .json()
        .unwrap();
    assert_eq!(usage["usage"]["requests"], 0);
    let r = gw.get("/api/v1/x", &[("x-api-key", "msgf_live_nope")]);
    assert_error(&r, 401, "UNAUTHORIZED", "Invalid or revoked API key");
}

/// What a scripted upstream does once it has written its answer.
#[derive(Clone, Copy)]
enum Then {
    Close,
    /// Holds the connection open, silent.
    Stall,
    /// Echoes whatever comes next (a tunnel).
    Echo,
}

/// An upstream that reads each connection's first request head, writes `answer`, then does
/// what `then` says.
fn scripted_upstream(answer: &'static [u8], then: Then) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(16) {
            let Ok(conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let mut conn = reader.into_inner();
                let _ = conn.write_all(answer);
                match then {
                    Then::Close => {}
                    Then::Stall => std::thread::sleep(std::time::Duration::from_secs(5)),
                    Then::Echo => {
                        let _ = std::io::copy(&mut conn.try_clone().unwrap(), &mut conn);
                    }
                }
            });
        }
    });
    addr
}

/// An upstream whose body fails after its head went to the client (reset, or past the read
/// timeout) leaves the client a body cut short, which it can tell from the framing: the
/// connection closes before the last chunk or the announced length. No error answer is
/// written into the body (it would end a chunked body as if it were whole).
#[test]
fn an_upstream_failing_midway_through_its_body_leaves_the_body_cut_short() {
    let chunked: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n";
    let sized: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello";
    for (answer, stall) in [
        (chunked, false),
        (chunked, true),
        (sized, false),
        (sized, true),
    ] {
        let then = if stall { Then::Stall } else { Then::Close };
        let gw = Gateway::start_with(upstream(
            vec![At::Addr(scripted_upstream(answer, then))],
            None,
        ));
        let (key, _) = gw.account_with_key("acme", "pro");
        let mut conn = gw.connect();
        conn.write_raw(
            format!("GET /api/v1/x HTTP/1.1\r\nhost: gw\r\nx-api-key: {key}\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let got = conn.read_until_closed().unwrap();
        let text = String::from_utf8_lossy(&got);
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(!text.contains("error"), "{text}");
        if answer == chunked {
            assert_eq!(body, "5\r\nhello\r\n", "stall {stall}");
        } else {
            assert_eq!(body, "hello", "stall {stall}");
        }
    }
}

/// The gateway's own JSON answer replaces only pingora's bare 400 for a head it could not
/// parse: an upstream's empty 400 reaches the client as it is, and the connection stays usable.
#[test]
fn an_upstreams_empty_400_passes_unchanged() {
    let answer: &[u8] =
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nconnection: close\r\n\r\n";
    let gw = Gateway::start_with(upstream(
        vec![At::Addr(scripted_upstream(answer, Then::Close))],
        None,
    ));
    let (key, _) = gw.account_with_key("acme", "pro");
    let mut conn = gw.connect();
    for _ in 0..2 {
        let r = conn
            .send("GET", "/api/v1/x", &[("x-api-key", &key)], None)
            .unwrap();
        assert_eq!((r.status, r.body.len()), (400, 0), "{}", r.text());
        assert_eq!(r.header("content-length"), Some("0"));
        assert_eq!(r.header("content-type"), None);
    }
}

/// What speaks of the upstream's own connection never reaches the client (its keep-alive
/// timeout, what its `Connection` names, `TE`, which HTTP/2 forbids in a response), and a
/// `Content-Length` list pingora framed by arrives as one number.
#[test]
fn an_upstreams_hop_by_hop_headers_stay_behind() {
    let answer: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\
        keep-alive: timeout=300, max=100\r\nconnection: keep-alive, x-debug\r\n\
        x-debug: internal\r\nte: trailers, deflate\r\ntrailer: x-sum\r\n\
        proxy-connection: keep-alive\r\nproxy-authenticate: Basic realm=\"in\"\r\n\
        content-length: 5, 5\r\n\r\nhello";
    let gw = Gateway::start_with(
        upstream(vec![At::Addr(scripted_upstream(answer, Then::Close))], None).server("h2c = true"),
    );
    let (key, _) = gw.account_with_key("acme", "pro");
    let r = gw.get("/api/v1/x", &[("x-api-key", &key)]);
    assert_eq!((r.status, r.text()), (200, "hello".to_string()));
    let mut names: Vec<&str> = r.headers.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(
        names,
        [
            "connection",
            "content-length",
            "content-type",
            "date",
            "ratelimit",
            "ratelimit-policy",
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
            "x-request-id"
        ],
        "{:?}",
        r.headers
    );
    assert_eq!(r.header("content-length"), Some("5"));
    assert_eq!(r.header("connection"), Some("keep-alive"));
    // On HTTP/2 the same answer arrives whole (a TE there reset the stream, no answer).
    let req = http::Request::get(format!("http://{}/api/v1/x", gw.proxy))
        .header("x-api-key", key.as_str())
        .body(())
        .unwrap();
    let (status, headers, body) = crate::tls::h2c_exchange(gw.proxy, req, None);
    assert_eq!((status, body.as_slice()), (200, b"hello".as_slice()));
    assert!(headers.get("te").is_none() && headers.get("x-debug").is_none());
}

/// An HTTP/1.0 client knows neither interim responses nor the chunked coding: an upstream's 103
/// is not passed on, and a body without a length arrives close-delimited, as 1.0 frames it.
#[test]
fn http_1_0_clients_get_no_interim_answers_and_no_chunks() {
    let answer: &[u8] = b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n\
        HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n\
        5\r\nhello\r\n0\r\n\r\n";
    let gw = Gateway::start_with(upstream(
        vec![At::Addr(scripted_upstream(answer, Then::Close))],
        None,
    ));
    let (key, _) = gw.account_with_key("acme", "pro");
    let mut conn = gw.connect();
    conn.write_raw(format!("GET /api/v1/x HTTP/1.0\r\nx-api-key: {key}\r\n\r\n").as_bytes())
        .unwrap();
    let out = String::from_utf8(conn.read_until_closed().unwrap()).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    let head = head.to_ascii_lowercase();
    assert!(!head.contains("transfer-encoding"), "{out}");
    assert!(head.contains("\r\nconnection: close"), "{out}");
    assert_eq!(body, "hello");
}

/// `Upgrade` never goes upstream; an upstream that switches protocols anyway would open a
/// tunnel past every check: the client gets a 502 and the connection is not tunnelled. (The
/// first request asked for no upgrade at all: pingora's own check, for a 101 to a request that
/// asked downstream only, does not see it; the gateway's does.)
#[test]
fn an_upstream_switching_protocols_is_a_bad_gateway() {
    let switching: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n";
    let gw = Gateway::start_with(upstream(
        vec![At::Addr(scripted_upstream(switching, Then::Echo))],
        None,
    ));
    let (key, _) = gw.account_with_key("acme", "pro");
    for headers in [
        vec![("x-api-key", key.as_str())],
        vec![
            ("x-api-key", key.as_str()),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
        ],
    ] {
        let r = gw.get("/api/v1/x", &headers);
        assert_error(&r, 502, "BAD_GATEWAY", "The upstream service failed");
    }
}

/// With `host` set, forwarded requests name the upstream's site, not the client's choice (a
/// shared ingress behind the gateway picks its backend by `Host`); without it, the client's.
#[test]
fn an_upstream_host_replaces_the_clients() {
    let gw = Gateway::start_with(Setup::new().api_upstream(ApiUpstream {
        host: Some("api.internal:8080"),
        ..ApiUpstream::default()
    }));
    let (key, _) = gw.account_with_key("acme", "pro");
    let seen = echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
    assert_eq!(seen["headers"]["host"], "api.internal:8080");
    let auth = format!("Bearer {}", gw.token("acme", 3600));
    let seen = echoed(&gw.get("/api/dashboard", &[("authorization", &auth)]));
    assert_eq!(seen["headers"]["host"], gw.proxy.to_string().as_str());

    let dir = tempfile::tempdir().unwrap();
    for bad in ["user@api.internal", "api internal", "http://api.internal/"] {
        let (err, _) = config_errors(
            dir.path(),
            &Setup::new().api_upstream(ApiUpstream {
                host: Some(bad),
                ..ApiUpstream::default()
            }),
        );
        let expected = format!(
            "upstreams.api.host: \"{bad}\" is not a host (use e.g. \"api.internal\" or \"api.internal:8080\")"
        );
        assert!(err.contains(&expected), "{err}");
    }
}
