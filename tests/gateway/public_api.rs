//! SPEC §3 checks 1–4, forwarding and headers on /api/v1/.

use crate::support::*;

const UNKNOWN: &str = "msgf_live_0000000000000000000000000000000000000000000000000000000000000000";

fn missing_key_says_where_to_send_it(b: Backend) {
    let gw = Gateway::on(b);
    let r = gw.get("/api/v1/messages/send", &[]);
    assert_error(
        &r,
        401,
        "UNAUTHORIZED",
        "Missing API key. Send it in the x-api-key header.",
    );
    assert!(r.header("x-request-id").is_some());
}

fn bearer_token_on_the_public_api_is_explained(b: Backend) {
    let gw = Gateway::on(b);
    let (key, _) = gw.account_with_key("acme", "pro");
    let auth = format!("Bearer {key}");
    let r = gw.get("/api/v1/messages/send", &[("authorization", &auth)]);
    assert_error(
        &r,
        401,
        "UNAUTHORIZED",
        "Missing API key. The public API expects the x-api-key header, not a Bearer token.",
    );
}

fn malformed_unknown_duplicate_keys_are_401(b: Backend) {
    let gw = Gateway::on(b);
    let (key, _) = gw.account_with_key("acme", "pro");
    let upper = format!("msgf_live_{}", key["msgf_live_".len()..].to_uppercase());
    let short = &key[..key.len() - 1];
    let test_prefix = key.replace("live", "test");
    for bad in [
        upper.as_str(),
        short,
        &test_prefix,
        UNKNOWN,
        "",
        "msgf_live_",
    ] {
        let r = gw.get("/api/v1/x", &[("x-api-key", bad)]);
        assert_error(&r, 401, "UNAUTHORIZED", "Invalid or revoked API key");
        assert!(!r.text().contains(bad) || bad.is_empty());
    }
    let r = gw.get("/api/v1/x", &[("x-api-key", &key), ("x-api-key", &key)]);
    assert_error(&r, 401, "UNAUTHORIZED", "Invalid or revoked API key");
}

fn authorized_requests_carry_identity_and_never_the_key(b: Backend) {
    let gw = Gateway::on(b);
    let (key, key_id) = gw.account_with_key("acme", "pro");
    let r = gw.send(
        "POST",
        "/api/v1/messages/send",
        &[
            ("x-api-key", &key),
            ("x-account-id", "victim"),
            ("X-Api-Key-Id", "forged"),
            ("x-user-id", "forged"),
            ("x-internal-user", "forged"),
            ("x-request-id", "client-req-42"),
            ("x-forwarded-for", "203.0.113.9"),
            (
                "authorization",
                "Bearer eyJhbGciOiJub25lIn0.eyJhY2NvdW50X2lkIjoidmljdGltIn0.",
            ),
            ("content-type", "application/json"),
        ],
        Some(br#"{"instanceId":"3fa85f64-5717-4562-b3fc-2c963f66afa6","to":"+33612345000"}"#),
    );
    let seen = echoed(&r);
    let h = &seen["headers"];
    assert_eq!(h["x-account-id"], "acme");
    assert_eq!(h["x-api-key-id"], key_id.as_str());
    assert!(h.get("x-api-key").is_none(), "the key reached the upstream");
    assert!(h.get("x-user-id").is_none());
    assert!(h.get("x-internal-user").is_none());
    // The key is the one credential: a bearer token beside it (verified by nobody) is not
    // passed on for a backend to decode.
    assert!(h.get("authorization").is_none(), "{h}");
    assert_eq!(h["x-request-id"], "client-req-42");
    // The peer is not a trusted proxy: its X-Forwarded-For is replaced, never extended.
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(seen["uri"], "/api/v1/messages/send");
    assert_eq!(seen["bodyBytes"], 73);
    assert_eq!(r.header("x-request-id"), Some("client-req-42"));
    assert!(!r.text().contains(&key));
}

fn insane_request_ids_are_replaced(b: Backend) {
    let gw = Gateway::on(b);
    let (key, _) = gw.account_with_key("acme", "pro");
    let r = gw.get(
        "/api/v1/x",
        &[("x-api-key", &key), ("x-request-id", "has spaces<script>")],
    );
    let seen = echoed(&r);
    let id = seen["headers"]["x-request-id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 32);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(r.header("x-request-id"), Some(id.as_str()));
}

fn rate_limit_headers_word_for_word(b: Backend) {
    let gw = Gateway::on(b);
    let (key, _) = gw.account_with_key("acme", "starter");
    let r = gw.get("/api/v1/x", &[("x-api-key", &key)]);
    echoed(&r);
    // November 2026 has 30 days.
    assert_eq!(
        r.header("ratelimit-policy"),
        Some("\"burst\";q=10;w=1, \"monthly\";q=50;w=2592000")
    );
    assert_eq!(r.header("ratelimit"), Some("\"burst\";r=9;t=1"));
    assert_eq!(r.header("x-ratelimit-limit"), Some("10"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("9"));
    assert_eq!(r.header("x-ratelimit-reset"), Some("1"));
}

/// A 403 carries the key's rate-limit state as every `/api/v1/` response does (SPEC §3), read
/// without taking a token: three requests spent, the 403s leave seven, and so on.
fn inactive_subscription_is_403_before_any_limit(b: Backend) {
    let gw = Gateway::on(b);
    let (key, _) = gw.account_with_key("acme", "pro");
    for _ in 0..3 {
        echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
    }
    gw.put_account("acme", "pro", "inactive");
    for _ in 0..2 {
        let r = gw.get("/api/v1/x", &[("x-api-key", &key)]);
        assert_error(
            &r,
            403,
            "SUBSCRIPTION_INACTIVE",
            "The account has no active subscription for this action",
        );
        assert_eq!(
            r.header("ratelimit-policy"),
            Some("\"burst\";q=10;w=1, \"monthly\";q=500000;w=2592000")
        );
        assert_eq!(r.header("ratelimit"), Some("\"burst\";r=7;t=1"));
        assert_eq!(r.header("x-ratelimit-limit"), Some("10"));
        assert_eq!(r.header("x-ratelimit-remaining"), Some("7"));
        assert_eq!(r.header("x-ratelimit-reset"), Some("1"));
        assert_eq!(r.header("retry-after"), None);
    }
    gw.put_account("acme", "pro", "active");
    let r = gw.get("/api/v1/x", &[("x-api-key", &key)]);
    echoed(&r);
    assert_eq!(r.header("ratelimit"), Some("\"burst\";r=6;t=1"));
    // A fresh key's bucket is full: nothing to wait for.
    let (fresh, _) = gw.create_key("acme");
    gw.put_account("acme", "pro", "inactive");
    let r = gw.get("/api/v1/x", &[("x-api-key", &fresh)]);
    assert_eq!(r.status, 403);
    assert_eq!(r.header("ratelimit"), Some("\"burst\";r=10;t=0"));
    assert_eq!(r.header("x-ratelimit-reset"), Some("0"));
}

/// A key refused again and again before its bucket (a lapsed subscription) costs the store one
/// read of its bucket per emission interval and node, whatever the number of refusals; an
/// admission in between is never hidden by that read.
#[test]
fn repeated_refusals_read_the_bucket_once_an_interval() {
    let gw = Gateway::on(Backend::Redis);
    let redis = gw.redis.as_ref().expect("a Redis");
    let (key, _) = gw.account_with_key("acme", "pro");
    echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
    gw.put_account("acme", "pro", "inactive");
    let reads = || redis.command_calls().get("zscore").copied().unwrap_or(0);
    for _ in 0..50 {
        let r = gw.get("/api/v1/x", &[("x-api-key", &key)]);
        assert_eq!(r.status, 403);
        assert_eq!(r.header("ratelimit"), Some("\"burst\";r=9;t=1"));
    }
    assert_eq!(reads(), 1);
    gw.clock.advance_ms(100);
    let r = gw.get("/api/v1/x", &[("x-api-key", &key)]);
    assert_eq!(r.header("ratelimit"), Some("\"burst\";r=10;t=0"));
    assert_eq!(reads(), 2);
    gw.put_account("acme", "pro", "active");
    echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
    gw.put_account("acme", "pro", "inactive");
    let r = gw.get("/api/v1/x", &[("x-api-key", &key)]);
    assert_eq!(r.header("ratelimit"), Some("\"burst\";r=9;t=1"));
    assert_eq!(reads(), 3);
}

fn paths_are_normalised_before_routing_and_forwarding(b: Backend) {
    let gw = Gateway::on(b);
    let (key, _) = gw.account_with_key("acme", "pro");
    let seen = echoed(&gw.get("/api/v1//messages/./%73end?to=1", &[("x-api-key", &key)]));
    assert_eq!(seen["uri"], "/api/v1/messages/send?to=1");
    // `..` leaves the public API: the console's rules apply, so the key is not enough.
    let r = gw.get("/api/v1/../internal", &[("x-api-key", &key)]);
    assert_error(
        &r,
        401,
        "UNAUTHORIZED",
        "The console uses Bearer tokens: send Authorization: Bearer <token>, not x-api-key.",
    );
    let r = gw.get("/API/v1/messages", &[("x-api-key", &key)]);
    assert_error(&r, 404, "NOT_FOUND", "No route matches this request");
    let r = gw.get("/api/v1/%zz", &[("x-api-key", &key)]);
    assert_error(&r, 400, "BAD_REQUEST", "Malformed request path");
}

/// A request-target that starts with its query is the path `/` to the `http` crate; pingora
/// would have forwarded it as it came (`GET ?x`), a target the gateway never routed on.
/// Cookie fields sent apart (as HTTP/2 sends them) reach the upstream as one (RFC 9113 §8.2.3).
fn a_target_without_a_path_is_400_and_cookies_go_up_as_one(b: Backend) {
    let gw = Gateway::on(b);
    let (key, _) = gw.account_with_key("acme", "pro");
    for target in ["?instanceId=x", "?", "x"] {
        let r = gw
            .connect()
            .raw(format!("GET {target} HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\n\r\n").as_bytes())
            .unwrap();
        assert_error(&r, 400, "BAD_REQUEST", "Malformed request path");
    }
    let r = gw.send(
        "GET",
        "/api/v1/x",
        &[
            ("x-api-key", &key),
            ("cookie", "a=1"),
            ("cookie", "b=2; c=3"),
        ],
        None,
    );
    assert_eq!(echoed(&r)["headers"]["cookie"], "a=1; b=2; c=3");
    let r = gw.send(
        "GET",
        "/api/v1/x",
        &[("x-api-key", &key), ("cookie", "a=1")],
        None,
    );
    assert_eq!(echoed(&r)["headers"]["cookie"], "a=1");
}

fn unknown_paths_are_404_json(b: Backend) {
    let gw = Gateway::on(b);
    let r = gw.get("/internal/metrics", &[]);
    assert_error(&r, 404, "NOT_FOUND", "No route matches this request");
}

crate::on_both_stores!(
    missing_key_says_where_to_send_it,
    bearer_token_on_the_public_api_is_explained,
    malformed_unknown_duplicate_keys_are_401,
    authorized_requests_carry_identity_and_never_the_key,
    insane_request_ids_are_replaced,
    rate_limit_headers_word_for_word,
    inactive_subscription_is_403_before_any_limit,
    paths_are_normalised_before_routing_and_forwarding,
    a_target_without_a_path_is_400_and_cookies_go_up_as_one,
    unknown_paths_are_404_json,
);
