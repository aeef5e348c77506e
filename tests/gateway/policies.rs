//! SPEC §2–3 check 5 and route policies: scopes, instances (path, query, JSON body),
//! subscription per route, and key creation against the declared scopes.

use crate::support::*;
use serde_json::json;

const A: &str = "3fa85f64-5717-4562-b3fc-2c963f66afa6";
const B: &str = "9b2e8a3c-1111-4222-8333-444455556666";

fn send(gw: &Gateway, key: &str, body: &[u8]) -> crate::client::HttpResponse {
    gw.send(
        "POST",
        "/api/v1/messages/send",
        &[("x-api-key", key), ("content-type", "application/json")],
        Some(body),
    )
}

fn scopes_limit_what_a_key_may_call(b: Backend) {
    let gw = Gateway::on(b);
    let key = restricted_key(&gw, &["messages:read"], &[]);
    let r = send(&gw, &key, format!(r#"{{"instanceId":"{A}"}}"#).as_bytes());
    assert_error(
        &r,
        403,
        "FORBIDDEN",
        "This API key lacks the scope messages:send",
    );
    assert!(!r.text().contains(&key));
    // The key's rate-limit state, as on every /api/v1/ response: a full bucket.
    assert_eq!(r.header("ratelimit"), Some("\"burst\";r=10;t=0"));
    echoed(&gw.get("/api/v1/messages/42", &[("x-api-key", &key)]));
    // Deny by default: a route whose policy names no scope is closed to keys with scopes.
    let other = || gw.get("/api/v1/other", &[("x-api-key", &key)]);
    let r = other();
    assert_error(
        &r,
        403,
        "FORBIDDEN",
        "This API key is restricted to scopes and this route is granted by none of them",
    );
    assert_eq!(r.header("ratelimit"), Some("\"burst\";r=9;t=1"));
    // A refused request consumed nothing: one request went through the limiter so far.
    let v = gw
        .admin_call("GET", "/admin/v1/accounts/acme", None)
        .json()
        .unwrap();
    assert_eq!(v["usage"]["requests"], 1);
    // A key over its rate: its 403s say so too (and still take nothing).
    for _ in 0..9 {
        echoed(&gw.get("/api/v1/messages/42", &[("x-api-key", &key)]));
    }
    assert_eq!(
        gw.get("/api/v1/messages/42", &[("x-api-key", &key)]).status,
        429
    );
    let r = other();
    assert_eq!(r.status, 403);
    assert_eq!(r.header("ratelimit"), Some("\"burst\";r=0;t=1"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(r.header("retry-after"), None);
}

fn instances_are_read_from_the_body_without_changing_it(b: Backend) {
    let gw = Gateway::on(b);
    let key = restricted_key(&gw, &[], &[A]);
    let body = format!(r#"{{"to":"+33612345000","instanceId":"{A}","text":"Hello"}}"#);
    let seen = echoed(&send(&gw, &key, body.as_bytes()));
    assert_eq!(
        seen["body"],
        body.as_str(),
        "the upstream must receive the body unchanged"
    );
    assert_eq!(
        seen["headers"]["content-length"],
        body.len().to_string().as_str()
    );

    let r = send(&gw, &key, format!(r#"{{"instanceId":"{B}"}}"#).as_bytes());
    assert_error(
        &r,
        403,
        "FORBIDDEN",
        &format!("This API key may not use instance {B}"),
    );
    let r = send(&gw, &key, br#"{"to":"+33612345000"}"#);
    assert_error(
        &r,
        403,
        "FORBIDDEN",
        "This API key is restricted to specific instances and the request names none",
    );
    let r = send(&gw, &key, b"not json");
    assert_error(
        &r,
        400,
        "BAD_REQUEST",
        "The request body is not a JSON object",
    );
    // The test configuration inspects at most 2048 bytes.
    let big = format!(r#"{{"instanceId":"{A}","text":"{}"}}"#, "x".repeat(3000));
    let r = send(&gw, &key, big.as_bytes());
    assert_error(&r, 413, "PAYLOAD_TOO_LARGE", "Request body too large");
}

fn unrestricted_keys_are_never_held_up_by_body_inspection(b: Backend) {
    let gw = Gateway::on(b);
    let key = restricted_key(&gw, &[], &[]);
    let big = format!(r#"{{"instanceId":"{B}","text":"{}"}}"#, "x".repeat(3000));
    let seen = echoed(&send(&gw, &key, big.as_bytes()));
    assert_eq!(seen["bodyBytes"], big.len());
    // A query the route reads its instance from is read alike for every key: twice is 400
    // (SPEC §2), any other instance passes.
    let h = [("x-api-key", key.as_str())];
    echoed(&gw.get(&format!("/api/v1/messages/1?instanceId={B}"), &h));
    // The restricted keys' other query rules are theirs alone.
    echoed(&gw.get(&format!("/api/v1/messages/1?instanceId={B};x=1"), &h));
    echoed(&gw.get(&format!("/api/v1/messages/1?instanceId={B}&q=100%"), &h));
    // Twice is twice whatever else the query holds: a ';', 200 parameters.
    for query in [
        format!("instanceId={A}&instance_id={B}"),
        format!("instanceId={A}&instanceId={B};x"),
        format!("{}instanceId={A}&instanceId={B}", "x=1&".repeat(200)),
    ] {
        let r = gw.get(&format!("/api/v1/messages/1?{query}"), &h);
        assert_refused(
            &r,
            400,
            "BAD_REQUEST",
            "The query parameter instanceId is given more than once",
        );
    }
}

fn instances_are_read_from_query_and_path(b: Backend) {
    let gw = Gateway::on(b);
    let key = restricted_key(&gw, &[], &[A]);
    let refused = format!("This API key may not use instance {B}");
    for template in [
        "/api/v1/messages/1?instanceId={}",
        "/api/v1/instances/{}/status",
    ] {
        echoed(&gw.get(&template.replace("{}", A), &[("x-api-key", &key)]));
        let r = gw.get(&template.replace("{}", B), &[("x-api-key", &key)]);
        assert_error(&r, 403, "FORBIDDEN", &refused);
    }
    let r = gw.get("/api/v1/instances/", &[("x-api-key", &key)]);
    assert_error(
        &r,
        403,
        "FORBIDDEN",
        "This API key is restricted to specific instances and the request names none",
    );
}

fn the_route_policy_decides_whether_a_subscription_is_needed(b: Backend) {
    let gw = Gateway::on(b);
    let key = restricted_key(&gw, &[], &[]);
    gw.put_account("acme", "pro", "inactive");
    // Reading message status: the policy does not require a subscription.
    echoed(&gw.get("/api/v1/messages/42", &[("x-api-key", &key)]));
    let r = send(&gw, &key, format!(r#"{{"instanceId":"{A}"}}"#).as_bytes());
    assert_error(
        &r,
        403,
        "SUBSCRIPTION_INACTIVE",
        "The account has no active subscription for this action",
    );
}

fn keys_only_take_declared_scopes(b: Backend) {
    let gw = Gateway::on(b);
    gw.put_account("acme", "pro", "active");
    let r = gw.admin_call(
        "POST",
        "/admin/v1/accounts/acme/keys",
        Some(json!({"name": "x", "scopes": ["messages:send", "billing:admin"]})),
    );
    assert_error(&r, 400, "BAD_REQUEST", "Unknown scope \"billing:admin\"");
}

/// A restricted key's restrictions go upstream with it, so that a backend serving an item by
/// id (`GET /api/v1/messages/{id}?instanceId=MINE`: the gateway checks the instance named, not
/// the one behind the id) can hold the item to them; a client's copies never do.
fn restrictions_are_forwarded_and_client_copies_are_not(b: Backend) {
    let gw = Gateway::on(b);
    let forged = [
        ("x-api-key-scopes", "admin"),
        ("x_api_key_instance_ids", B),
        ("X-Api-Key-Instance-Ids", B),
    ];
    let restricted = restricted_key(&gw, &["messages:read", "instances:read"], &[B, A]);
    let mut h = vec![("x-api-key", restricted.as_str())];
    h.extend(forged);
    let seen = echoed(&gw.get(&format!("/api/v1/messages/42?instanceId={A}"), &h));
    let headers = seen["headers"].as_object().unwrap();
    assert_eq!(headers["x-api-key-scopes"], "messages:read,instances:read");
    assert_eq!(
        headers["x-api-key-instance-ids"],
        format!("{B},{A}").as_str()
    );
    assert!(
        !headers.contains_key("x_api_key_instance_ids"),
        "{headers:?}"
    );

    // Restricted in one way only: the other header is absent.
    let scoped = restricted_key(&gw, &["messages:read"], &[]);
    let mut h = vec![("x-api-key", scoped.as_str())];
    h.extend(forged);
    let seen = echoed(&gw.get("/api/v1/messages/42", &h));
    assert_eq!(seen["headers"]["x-api-key-scopes"], "messages:read");
    assert!(seen["headers"].get("x-api-key-instance-ids").is_none());

    let unrestricted = restricted_key(&gw, &[], &[]);
    let mut h = vec![("x-api-key", unrestricted.as_str())];
    h.extend(forged);
    let seen = echoed(&gw.get("/api/v1/messages/42", &h));
    let headers = seen["headers"].as_object().unwrap();
    for name in [
        "x-api-key-scopes",
        "x-api-key-instance-ids",
        "x_api_key_instance_ids",
    ] {
        assert!(!headers.contains_key(name), "{name}: {headers:?}");
    }
}

crate::on_both_stores!(
    restrictions_are_forwarded_and_client_copies_are_not,
    scopes_limit_what_a_key_may_call,
    instances_are_read_from_the_body_without_changing_it,
    unrestricted_keys_are_never_held_up_by_body_inspection,
    instances_are_read_from_query_and_path,
    the_route_policy_decides_whether_a_subscription_is_needed,
    keys_only_take_declared_scopes,
);
