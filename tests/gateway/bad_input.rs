//! SPEC §6: oversized, malformed and smuggling-shaped requests are refused cleanly.

use crate::client::request;
use crate::support::*;
use std::io::{Read, Write};

#[test]
fn oversized_headers_are_431() {
    let gw = Gateway::start();
    let big = "a".repeat(9000);
    let r = gw.get("/api/v1/x", &[("x-padding", &big)]);
    assert_error(&r, 431, "HEADERS_TOO_LARGE", "Request headers too large");
}

/// pingora's parser takes at most 256 header lines (a bare 400 past them): one more is a head
/// too large, 431, wherever the bytes stand against the byte bound.
#[test]
fn more_header_lines_than_the_parser_takes_are_431() {
    let gw = Gateway::start();
    let (key, _) = gw.account_with_key("acme", "pro");
    let head = |lines: usize| {
        let mut h = format!("GET /api/v1/x HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\n");
        for i in 0..lines - 2 {
            h.push_str(&format!("x-{i}: 1\r\n"));
        }
        h.push_str("\r\n");
        h
    };
    // (The echo upstream has the same parser: the gateway's own headers must fit in it too.)
    let r = gw.connect().raw(head(248).as_bytes()).unwrap();
    echoed(&r);
    for split in [false, true] {
        let mut conn = gw.connect();
        let bytes = head(257);
        let r = if split {
            let (a, b) = bytes.split_at(bytes.len() / 2);
            conn.write_raw(a.as_bytes()).unwrap();
            conn.raw(b.as_bytes())
        } else {
            conn.raw(bytes.as_bytes())
        };
        let r = r.unwrap();
        assert_refused(&r, 431, "HEADERS_TOO_LARGE", "Request headers too large");
        assert_eq!(r.header("connection"), Some("close"));
    }
}

#[test]
fn oversized_management_bodies_are_413() {
    let gw = Gateway::start();
    gw.put_account("acme", "pro", "active");
    let auth = format!("Bearer {}", gw.token("acme", 3600));
    let body = format!("{{\"name\":\"{}\"}}", "n".repeat(5000));
    let r = gw.send(
        "POST",
        "/api/api-keys",
        &[("authorization", &auth)],
        Some(body.as_bytes()),
    );
    assert_error(&r, 413, "PAYLOAD_TOO_LARGE", "Request body too large");
}

#[test]
fn non_utf8_key_is_401() {
    let gw = Gateway::start();
    let mut conn = gw.connect();
    let r = conn
        .raw(b"GET /api/v1/x HTTP/1.1\r\nhost: x\r\nx-api-key: msgf_live_\xff\xfe\r\n\r\n")
        .unwrap();
    assert_error(&r, 401, "UNAUTHORIZED", "Invalid or revoked API key");
}

/// SPEC §6: invalid UTF-8 in a header value is refused and never reaches the upstream, on
/// every route; UTF-8 beyond ASCII passes.
#[test]
fn header_values_that_are_not_utf8_are_400() {
    let gw = Gateway::start();
    let (key, _) = gw.account_with_key("acme", "pro");
    let token = gw.token("acme", 3600);
    for (path, credential) in [
        ("/api/v1/x", format!("x-api-key: {key}\r\n")),
        (
            "/api/dashboard",
            format!("authorization: Bearer {token}\r\n"),
        ),
        ("/api/auth/login", String::new()),
    ] {
        for bad in [&b"caf\xe9"[..], b"\xc0\xae", b"ok\xed\xa0\x80", b"\xff"] {
            let mut head =
                format!("GET {path} HTTP/1.1\r\nhost: x\r\n{credential}x-note: ").into_bytes();
            head.extend_from_slice(bad);
            head.extend_from_slice(b"\r\n\r\n");
            let r = gw.connect().raw(&head).unwrap();
            assert_refused(
                &r,
                400,
                "BAD_REQUEST",
                "A request header value is not valid UTF-8",
            );
        }
        let mut head =
            format!("GET {path} HTTP/1.1\r\nhost: x\r\n{credential}x-note: ").into_bytes();
        head.extend_from_slice("café ✓".as_bytes());
        head.extend_from_slice(b"\r\n\r\n");
        echoed(&gw.connect().raw(&head).unwrap());
    }
}

#[test]
fn smuggling_shapes_never_reach_the_upstream() {
    let gw = Gateway::start();
    let (key, _) = gw.account_with_key("acme", "pro");
    let shapes = [
        format!("POST /api/v1/x HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"),
        format!("GET /api/v1/x HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\nx-folded: a\r\n b\r\n\r\n"),
    ];
    for (i, shape) in shapes.into_iter().enumerate() {
        let mut s = std::net::TcpStream::connect(gw.proxy).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        s.write_all(shape.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains("x-echo"), "reached the upstream: {text}");
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{text}"
        );
        // The first is the gateway's own check; pingora's parser refuses obs-fold before the
        // gateway sees the request, and the gateway writes its answer in the JSON shape.
        let message = ["Ambiguous request framing", "Malformed request"][i];
        assert!(
            text.ends_with(&format!(
                "{{\"error\":{{\"code\":\"BAD_REQUEST\",\"message\":\"{message}\"}}}}"
            )),
            "{text}"
        );
    }
}

/// Heads pingora's parser refuses (no hook of pingora's reaches them) are answered in the one
/// JSON error shape all the same, on a fresh connection and after a request already answered on
/// it, and the connection closes: what follows such a head cannot be read reliably.
#[test]
fn heads_the_parser_refuses_get_the_json_error_shape() {
    let gw = Gateway::start();
    let (key, _) = gw.account_with_key("acme", "pro");
    let heads: [&[u8]; 4] = [
        b"GET /api/v1/x HTTP/1.1\r\nhost: x\r\nx-folded: a\r\n b\r\n\r\n",
        b"GET /api/v1/x HTTP/1.1\r\nhost: x\r\nbad name: 1\r\n\r\n",
        b"GET /api/v1/\xff HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET /api/v1/x HTTP/1.1\r\nhost: x\r\nx-nul: a\x00b\r\n\r\n",
    ];
    for head in heads {
        for after_one in [false, true] {
            let mut conn = gw.connect();
            let mut bytes = Vec::new();
            if after_one {
                bytes.extend_from_slice(
                    format!("GET /api/v1/first HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\n\r\n")
                        .as_bytes(),
                );
            }
            bytes.extend_from_slice(head);
            let answers = conn.pipelined(&bytes, 3).unwrap();
            let shown = String::from_utf8_lossy(head);
            assert_eq!(answers.len(), 1 + after_one as usize, "{shown}");
            if after_one {
                assert_eq!(answers[0].status, 200, "{shown}");
            }
            let r = answers.last().unwrap();
            assert_refused(r, 400, "BAD_REQUEST", "Malformed request");
            assert_eq!(r.header("connection"), Some("close"), "{shown}");
            assert!(conn.read_until_closed().unwrap().is_empty(), "{shown}");
        }
    }
    let metrics = request(gw.admin, "GET", "/metrics", &[], None)
        .unwrap()
        .text();
    assert!(
        metrics.contains("msgflash_rejections_total{code=\"BAD_REQUEST\"} 8\n"),
        "{metrics}"
    );
}

/// The JSON answer to a head the parser refuses comes whatever the client sent after it (a
/// body nobody reads; the edge stream reads away what has arrived before the close, since a
/// reset can overtake the answer on a real network: on loopback it arrives either way, so this
/// proves the answer, not the drain), and a refused head that comes in a later read of a
/// kept-alive connection is answered the same way.
#[test]
fn a_refused_head_is_answered_whatever_follows_or_precedes_it() {
    let gw = Gateway::start();
    let (key, _) = gw.account_with_key("acme", "pro");
    let mut conn = gw.connect();
    let mut bytes = format!(
        "POST /api/v1/x HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\ncontent-length: 200000\r\nx-folded: a\r\n b\r\n\r\n"
    )
    .into_bytes();
    bytes.extend(std::iter::repeat_n(b'a', 200_000));
    let r = conn.raw(&bytes).unwrap();
    assert_refused(&r, 400, "BAD_REQUEST", "Malformed request");

    let mut conn = gw.connect();
    let r = conn
        .send("GET", "/api/v1/first", &[("x-api-key", &key)], None)
        .unwrap();
    assert_eq!(r.status, 200);
    let r = conn
        .raw(b"GET /api/v1/x HTTP/1.1\r\nhost: x\r\nbad name: 1\r\n\r\n")
        .unwrap();
    assert_refused(&r, 400, "BAD_REQUEST", "Malformed request");
    assert!(conn.read_until_closed().unwrap().is_empty());
}

/// A client that sends requests and never reads their answers cannot hold its connection: once
/// the answers fill the socket buffers, each write may wait `server.send_timeout` (here 1 s)
/// for progress, heads and flushes included (pingora times none of those on HTTP/1), then the
/// connection is dropped.
#[test]
fn a_client_that_never_reads_holds_no_connection() {
    use std::io::Write;
    // An open route without a per-IP limit, whose answers (the echo of a 6 kB header) soon
    // fill what the kernels hold for a reader that never reads.
    let gw = Gateway::start_with(
        Setup::new()
            .route_policies("scopes = []\n")
            .server("send_timeout = \"1s\""),
    );
    let open = |n: usize| {
        gw.metric_line("msgflash_connections_open ") == format!("msgflash_connections_open {n}")
    };
    // A fixed, small receive buffer (the kernel would otherwise grow it to tens of MiB).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = rt
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.set_recv_buffer_size(4096)?;
            socket.connect(gw.proxy).await?.into_std()
        })
        .unwrap();
    stream.set_nonblocking(false).unwrap();
    let mut writer = stream.try_clone().unwrap();
    // Pipelined requests, written by a thread of their own: its writes block once the gateway
    // stops reading, and fail once it has closed.
    std::thread::spawn(move || {
        let one = format!(
            "GET /api/auth/x HTTP/1.1\r\nhost: x\r\nx-pad: {}\r\n\r\n",
            "p".repeat(6000)
        );
        for _ in 0..4_000 {
            if writer.write_all(one.as_bytes()).is_err() {
                break;
            }
        }
    });
    eventually("the connection is open", || open(1));
    eventually("the gateway dropped the connection that never read", || {
        open(0)
    });
    drop(stream);
}

/// CONNECT would make the connection a tunnel past every check: refused in the JSON shape
/// (pingora's own refusal is a bare 405), and the connection closes.
#[test]
fn connect_is_refused_in_the_json_shape() {
    let gw = Gateway::start();
    let (key, _) = gw.account_with_key("acme", "pro");
    for target in ["api.test:443", "/api/v1/messages"] {
        let mut conn = gw.connect();
        let r = conn
            .raw(
                format!(
                    "CONNECT {target} HTTP/1.1\r\nhost: api.test:443\r\nx-api-key: {key}\r\n\r\n"
                )
                .as_bytes(),
            )
            .unwrap();
        assert_refused(&r, 400, "BAD_REQUEST", "The CONNECT method is not served");
        assert_eq!(r.header("connection"), Some("close"));
        assert!(conn.read_until_closed().unwrap().is_empty());
    }
}

/// Methods are case-sensitive, but Django upper-cases them and ASP.NET Core compares them
/// ignoring case: `post` would match no policy entry for POST and run as one behind. Refused,
/// as nginx does, and so is TRACE (an echo of the request, headers added on the way included).
#[test]
fn methods_not_in_upper_case_and_trace_are_refused() {
    let gw = Gateway::start();
    let (key, _) = gw.account_with_key("acme", "pro");
    let h = [
        ("x-api-key", key.as_str()),
        ("content-type", "application/json"),
    ];
    for (method, message) in [
        ("post", "The request method must be upper-case letters"),
        ("Post", "The request method must be upper-case letters"),
        ("G3T", "The request method must be upper-case letters"),
        ("TRACE", "The TRACE method is not served"),
    ] {
        let r = gw.send(method, "/api/v1/messages/send", &h, Some(b"{}"));
        assert_refused(&r, 400, "BAD_REQUEST", message);
    }
    // Extension methods as spelled go on.
    for method in ["PROPFIND", "M-SEARCH"] {
        let seen = echoed(&gw.send(method, "/api/v1/messages/1", &h, None));
        assert_eq!(seen["method"], method);
    }
}

#[test]
fn plain_chunked_bodies_are_forwarded() {
    let gw = Gateway::start();
    let (key, _) = gw.account_with_key("acme", "pro");
    let mut conn = gw.connect();
    let req = format!(
        "POST /api/v1/messages/send HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let seen = echoed(&conn.raw(req.as_bytes()).unwrap());
    assert_eq!(seen["body"], "hello");
    // and the connection stays usable
    assert_eq!(
        conn.send("GET", "/api/v1/x", &[("x-api-key", &key)], None)
            .unwrap()
            .status,
        200
    );
}

/// SPEC §6: oversized bodies on inspected routes are 413 whatever the key: an unrestricted
/// key's body is not read, but bounded by `server.max_body_bytes`, by its declared length
/// before anything is forwarded, or counted as a chunked body goes.
#[test]
fn oversized_bodies_on_inspected_routes_are_413_for_every_key() {
    let gw = Gateway::start(); // max_body_bytes = 4096
    let (key, _) = gw.account_with_key("acme", "pro");
    let send = |body: &[u8]| {
        gw.send(
            "POST",
            "/api/v1/messages/send",
            &[("x-api-key", &key), ("content-type", "application/json")],
            Some(body),
        )
    };
    let r = send(&[b' '; 4097]);
    assert_refused(&r, 413, "PAYLOAD_TOO_LARGE", "Request body too large");
    // A refusal of step 5: the key's rate-limit state, no token taken.
    assert_eq!(r.header("ratelimit"), Some("\"burst\";r=10;t=0"));
    let seen = echoed(&send(&[b' '; 4096]));
    assert_eq!(seen["bodyBytes"], 4096);
    // Routes that read no body are not bounded by it.
    let r = gw.send(
        "POST",
        "/api/v1/other",
        &[("x-api-key", &key)],
        Some(&[b' '; 10_000]),
    );
    assert_eq!(echoed(&r)["bodyBytes"], 10_000);
    // A chunked body is counted on its way: cut past the limit.
    let chunk = format!("834\r\n{}\r\n", " ".repeat(2100));
    let head = format!(
        "POST /api/v1/messages/send HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    let r = gw
        .connect()
        .raw(format!("{head}{chunk}{chunk}0\r\n\r\n").as_bytes())
        .unwrap();
    assert_refused(&r, 413, "PAYLOAD_TOO_LARGE", "Request body too large");
    let r = gw
        .connect()
        .raw(format!("{head}{chunk}0\r\n\r\n").as_bytes())
        .unwrap();
    assert_eq!(echoed(&r)["bodyBytes"], 2100);
}

#[test]
fn pipelined_requests_are_each_answered_in_order_and_checked_on_their_own() {
    let gw = Gateway::start();
    let (key, _) = gw.account_with_key("acme", "pro");
    let get = |path: &str, key: &str| {
        format!("GET {path} HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\n\r\n")
    };
    let body = r#"{"to":"+33612345000"}"#;
    let post = format!(
        "POST /api/v1/messages/send HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let bytes = [
        get("/api/v1/first", &key),
        get("/api/v1/second", "msgf_live_nope"),
        post,
        get("/api/v1/..%2fapi-keys", &key),
        get("/api/v1/last", &key),
    ]
    .concat();
    let r = gw.connect().pipelined(bytes.as_bytes(), 5).unwrap();
    assert_eq!(r.len(), 5, "every pipelined request gets its answer");
    assert_eq!(echoed(&r[0])["uri"], "/api/v1/first");
    assert_refused(&r[1], 401, "UNAUTHORIZED", "Invalid or revoked API key");
    assert_eq!(echoed(&r[2])["body"], body);
    assert_refused(
        &r[3],
        400,
        "BAD_REQUEST",
        "Ambiguous request path: it contains an encoded '/' or '\\' (%2F, %5C)",
    );
    assert_eq!(echoed(&r[4])["uri"], "/api/v1/last");

    // A smuggling shape ends the pipeline: it is refused and the connection closes, so the
    // request hidden behind it is never read.
    let smuggle = format!(
        "POST /api/v1/x HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    let bytes = [get("/api/v1/a", &key), smuggle, get("/api/v1/hidden", &key)].concat();
    let r = gw.connect().pipelined(bytes.as_bytes(), 3).unwrap();
    assert_eq!(r.len(), 2, "nothing after the smuggling shape");
    assert_eq!(echoed(&r[0])["uri"], "/api/v1/a");
    assert_refused(&r[1], 400, "BAD_REQUEST", "Ambiguous request framing");
}

/// A body's end in any but the one spelling every parser reads alike is refused before any
/// check, and the connection closes (what follows cannot be told from the next request): a
/// transfer coding beside `chunked` (the upstream would get coded bytes, re-chunked, with
/// nothing saying so), a `Content-Length` list or twice. A body on GET or HEAD (a backend
/// that does not expect one could read it as a request of its own) is refused; the
/// connection goes on, the body read away by its length.
#[test]
fn framing_in_more_than_one_spelling_is_refused() {
    let gw = Gateway::start();
    let (key, _) = gw.account_with_key("acme", "pro");
    let get = |path: &str, key: &str| {
        format!("GET {path} HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\n\r\n")
    };
    let post = |framing: &str, body: &str| {
        format!(
            "POST /api/v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\n{framing}\r\n{body}"
        )
    };
    for (framing, body, message) in [
        (
            "transfer-encoding: gzip, chunked\r\n",
            "0\r\n\r\n",
            "Ambiguous request framing: Transfer-Encoding must be chunked alone",
        ),
        (
            "transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n",
            "0\r\n\r\n",
            "Ambiguous request framing: Transfer-Encoding must be chunked alone",
        ),
        (
            "content-length: 2, 2\r\n",
            "{}",
            "Ambiguous request framing: Content-Length must be one number",
        ),
        (
            "content-length: 2\r\ncontent-length: 2\r\n",
            "{}",
            "Ambiguous request framing: Content-Length must be one number",
        ),
    ] {
        let bytes = [post(framing, body), get("/api/v1/hidden", &key)].concat();
        let r = gw.connect().pipelined(bytes.as_bytes(), 2).unwrap();
        assert_eq!(r.len(), 1, "{framing:?}: nothing after it");
        assert_refused(&r[0], 400, "BAD_REQUEST", message);
        assert_eq!(r[0].header("connection"), Some("close"), "{framing:?}");
    }
    let get_with_body = format!(
        "GET /api/v1/a HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\ncontent-length: 42\r\n\r\n\
         GET /api/v1/smuggled HTTP/1.1\r\nhost: x\r\n\r\n"
    );
    let last = format!(
        "GET /api/v1/after HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\nconnection: close\r\n\r\n"
    );
    let r = gw
        .connect()
        .pipelined([get_with_body, last].concat().as_bytes(), 3)
        .unwrap();
    assert_eq!(r.len(), 2, "the body is no request");
    assert_refused(
        &r[0],
        400,
        "BAD_REQUEST",
        "A GET or HEAD request cannot have a body",
    );
    let after = echoed(&r[1]);
    assert_eq!(
        (after["method"].as_str(), after["uri"].as_str()),
        (Some("GET"), Some("/api/v1/after"))
    );
    // An empty body said as such is no body.
    let empty = format!(
        "GET /api/v1/a HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\ncontent-length: 0\r\n\r\n"
    );
    assert_eq!(
        echoed(&gw.connect().raw(empty.as_bytes()).unwrap())["uri"],
        "/api/v1/a"
    );
}

/// Slowloris: hundreds of connections that start a request head and never finish it (or
/// trickle it a byte at a time, each read well inside pingora's per-read timeout) are cut at
/// `server.header_timeout`, while normal clients keep being served beside them.
#[test]
fn slow_request_heads_are_cut_at_the_deadline_while_others_are_served() {
    use std::io::Write;
    use std::time::Duration;
    let gw = Gateway::start_with(Setup::new().server("header_timeout = \"1s\""));
    let (key, _) = gw.account_with_key("acme", "pro");
    let mut stalled: Vec<std::net::TcpStream> = (0..200)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(gw.proxy).unwrap();
            s.write_all(b"GET /api/v1/x HTTP/1.1\r\nhost: x\r\n")
                .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s
        })
        .collect();
    let trickler = {
        let addr = gw.proxy;
        std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            let head = b"GET /api/v1/x HTTP/1.1\r\nx-padding: ";
            s.write_all(head).unwrap();
            // A byte every 100 ms: each read is quick, the head never ends.
            for _ in 0..200 {
                if s.write_all(b"a").is_err() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            false
        })
    };
    // Normal traffic beside them.
    for _ in 0..5 {
        echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
        gw.clock.advance_ms(1_000);
    }
    // Every stalled connection is closed by the gateway (EOF or reset), without an answer.
    for s in &mut stalled {
        assert_closed_without_answer(s, "a stalled head");
    }
    assert!(
        trickler.join().unwrap(),
        "the trickling client was never cut"
    );
    // And a client that sends its head in time is still served afterwards.
    echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
}

/// A connection that never sends a byte holds a place of the connection caps: it has the header
/// timeout to begin its first head, not the keep-alive timeout (an hour here), after which the
/// gateway closes it without an answer. Kept-alive connections keep the keep-alive timeout.
#[test]
fn a_silent_new_connection_is_closed_at_the_header_timeout() {
    use std::time::Duration;
    let gw = Gateway::start_with(
        Setup::new()
            .server("header_timeout = \"1s\"")
            .server("keepalive_timeout = \"1h\""),
    );
    let (key, _) = gw.account_with_key("acme", "pro");
    let mut silent = std::net::TcpStream::connect(gw.proxy).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut kept = gw.connect();
    echoed(
        &kept
            .send("GET", "/api/v1/x", &[("x-api-key", &key)], None)
            .unwrap(),
    );
    assert_closed_without_answer(&mut silent, "a connection that never spoke");
    // The kept-alive one outlived it and still serves.
    echoed(
        &kept
            .send("GET", "/api/v1/x", &[("x-api-key", &key)], None)
            .unwrap(),
    );
}

/// With h2c on, pingora peeks for 24 bytes (the HTTP/2 preface) before anything reads the
/// connection: a silent client, or one that sends 23 bytes and stops, was held with no deadline.
/// The first-byte deadline holds there too; a normal HTTP/1.1 client is served beside them.
#[test]
fn with_h2c_on_a_client_short_of_24_bytes_is_closed_at_the_header_timeout() {
    use std::io::Write;
    use std::time::Duration;
    let gw = Gateway::start_with(
        Setup::new()
            .server("h2c = true")
            .server("header_timeout = \"1s\"")
            .server("keepalive_timeout = \"1h\""),
    );
    let (key, _) = gw.account_with_key("acme", "pro");
    for sent in [&b""[..], b"GET / HTTP/1.1\r\nHost: a"] {
        let mut slow = std::net::TcpStream::connect(gw.proxy).unwrap();
        slow.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        slow.write_all(sent).unwrap();
        assert_closed_without_answer(&mut slow, "a client short of the peek's 24 bytes");
    }
    echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
}

/// Empty lines before a request line (which pingora's parser skips, as RFC 9112 allows) are
/// part of the next head: they start its clock and count toward its bound, on a fresh
/// connection and on a kept-alive one. Before, `\r\n\r\n` read as a whole head: the clock
/// stopped and the bound was off, and a kept-alive connection could be held without end.
#[test]
fn empty_lines_before_a_request_line_start_the_head_clock() {
    use std::io::Write;
    use std::time::Duration;
    // Before, nothing closed such a connection (a finished head waits on no clock, and the
    // edge stream turns pingora's keep-alive timeout off). Now the head deadline does, or, when
    // the empty lines came in while the previous request was still ending (read then, before
    // the next head began), the keep-alive timeout: either within the read timeout below.
    let gw = Gateway::start_with(
        Setup::new()
            .server("header_timeout = \"1s\"")
            .server("keepalive_timeout = \"5s\""),
    );
    let (key, _) = gw.account_with_key("acme", "pro");

    let mut fresh = std::net::TcpStream::connect(gw.proxy).unwrap();
    fresh
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    fresh.write_all(b"\r\n\r\n").unwrap();
    assert_closed_without_answer(&mut fresh, "empty lines on a fresh connection");

    let mut kept = gw.connect();
    echoed(
        &kept
            .send("GET", "/api/v1/x", &[("x-api-key", &key)], None)
            .unwrap(),
    );
    kept.write_raw(b"\r\n\r\n").unwrap();
    assert_eq!(
        kept.read_until_closed()
            .expect("closed at the head deadline"),
        b"",
        "empty lines on a kept-alive connection"
    );

    // Empty lines and then a request: served.
    let head = format!("\r\n\r\nGET /api/v1/x HTTP/1.1\r\nhost: gw\r\nx-api-key: {key}\r\n\r\n");
    let seen = echoed(&gw.connect().raw(head.as_bytes()).unwrap());
    assert_eq!(seen["uri"], "/api/v1/x");

    // Empty lines alone past the bound: 431, as any other head.
    let r = gw
        .connect()
        .pipelined("\r\n".repeat(60_000).as_bytes(), 2)
        .unwrap();
    assert_eq!(r.len(), 1);
    assert_refused(&r[0], 431, "HEADERS_TOO_LARGE", "Request headers too large");
}

/// A head that grows past `server.max_header_bytes` plus the request-line allowance (64 KiB) is
/// answered 431 as it arrives, and the connection closed, without waiting for its end (pingora
/// alone would buffer up to 1 MiB of it, then wait out the head deadline and answer nothing).
#[test]
fn a_head_past_its_bound_is_answered_431_before_it_ends() {
    let gw = Gateway::start();
    let (key, _) = gw.account_with_key("acme", "pro");
    let mut head = format!("GET /api/v1/x HTTP/1.1\r\nx-api-key: {key}\r\n");
    let padding = "a".repeat(1000);
    for i in 0..100 {
        head.push_str(&format!("x-pad-{i}: {padding}\r\n"));
    }
    // No blank line: the head never ends.
    let r = gw.connect().pipelined(head.as_bytes(), 2).unwrap();
    assert_eq!(r.len(), 1, "one answer, then the connection closes");
    assert_refused(&r[0], 431, "HEADERS_TOO_LARGE", "Request headers too large");
    assert_eq!(r[0].header("connection"), Some("close"));
    // Others are served as before.
    echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
}

/// Slow POST: request bodies that stop arriving for `server.body_idle_timeout` (a hundred of
/// them, beside normal traffic) end their connections without an answer (the upstream's half request is dropped with it), while a body
/// that keeps trickling within the idle time is forwarded whole, however long it takes in all.
#[test]
fn a_stalled_request_body_is_cut_after_the_idle_timeout() {
    use std::io::Write;
    use std::time::Duration;
    let gw = Gateway::start_with(Setup::new().server("body_idle_timeout = \"2s\""));
    let (key, _) = gw.account_with_key("acme", "pro");
    let head = |key: &str, len: usize| {
        format!(
            "POST /api/v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\n\
             content-type: text/plain\r\ncontent-length: {len}\r\n\r\n"
        )
    };
    // A hundred bodies that stop after 10 of their 100 bytes (ten keys: ten requests each fit
    // a key's burst).
    let keys: Vec<String> = (0..10)
        .map(|i| gw.account_with_key(&format!("stall{i}"), "pro").0)
        .collect();
    let mut stalled: Vec<std::net::TcpStream> = (0..100)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(gw.proxy).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s.write_all(head(&keys[i % 10], 100).as_bytes()).unwrap();
            s.write_all(b"0123456789").unwrap();
            s
        })
        .collect();
    // A byte every 250 ms: 3 s in all, never 2 s idle.
    let mut trickled = gw.connect();
    let body = b"abcdefghijkl";
    let slow = std::thread::spawn({
        let head = head(&key, body.len());
        move || {
            let mut bytes = head.into_bytes();
            bytes.push(body[0]);
            for b in &body[1..] {
                trickled.write_raw(&bytes).unwrap();
                std::thread::sleep(Duration::from_millis(250));
                bytes = vec![*b];
            }
            trickled.raw(&bytes).unwrap()
        }
    });
    // Normal traffic beside them.
    for _ in 0..5 {
        echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
        gw.clock.advance_ms(1_000);
    }
    for s in &mut stalled {
        assert_closed_without_answer(s, "a stalled body");
    }
    let seen = echoed(&slow.join().unwrap());
    assert_eq!(seen["body"], "abcdefghijkl");
}

/// An upstream that answers `ok` to every request on a connection, after `delay` for a path
/// with `slow` in it and at once otherwise.
fn slow_path_upstream(delay: std::time::Duration) -> String {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(conn);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let slow = line.contains("slow");
                    // The head's other lines (no body: GET requests only).
                    loop {
                        let mut field = String::new();
                        if reader.read_line(&mut field).unwrap_or(0) == 0 {
                            return;
                        }
                        if field == "\r\n" {
                            break;
                        }
                    }
                    if slow {
                        std::thread::sleep(delay);
                    }
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if reader.get_mut().write_all(answer).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// `server.keepalive_timeout` bounds how long a connection waits for its next request (and
/// for its first), and only that: a response that takes longer than it to come back is not
/// cut, and a connection that keeps asking stays open however long it lives.
#[test]
fn idle_connections_close_after_the_keepalive_timeout_and_slow_answers_do_not() {
    use std::time::Duration;
    let upstream = slow_path_upstream(Duration::from_millis(2_500));
    let gw = Gateway::start_with(
        Setup::new()
            .server("keepalive_timeout = \"1s\"")
            .api_upstream(ApiUpstream {
                addresses: vec![At::Addr(upstream)],
                connect_timeout: "1s",
                read_timeout: "10s",
                ..ApiUpstream::default()
            }),
    );
    let (key, _) = gw.account_with_key("acme", "pro");
    let auth = [("x-api-key", key.as_str())];
    // A connection that never sends a byte is closed, without an answer.
    let mut unused = gw.connect();
    assert_eq!(unused.read_until_closed().unwrap(), b"");
    // One that asks, is answered, then says nothing more, likewise.
    let mut idle = gw.connect();
    let r = idle.send("GET", "/api/v1/fast", &auth, None).unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert_eq!(idle.read_until_closed().unwrap(), b"");
    // An answer 2.5 s in coming (the keep-alive timeout is 1 s) arrives, on a connection
    // that was kept alive before it and is kept alive after it.
    let mut patient = gw.connect();
    let r = patient.send("GET", "/api/v1/fast", &auth, None).unwrap();
    assert_eq!(r.status, 200);
    let r = patient.send("GET", "/api/v1/slow", &auth, None).unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert_eq!(r.header("connection"), Some("keep-alive"), "{r:?}");
    let r = patient.send("GET", "/api/v1/fast", &auth, None).unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
}
