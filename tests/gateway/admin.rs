//! SPEC §7: the admin listener, its token, account and key management, health and metrics.

use crate::client::request;
use crate::support::*;
use serde_json::json;
use std::sync::{Arc, Barrier};

fn admin_api_needs_the_token(b: Backend) {
    let gw = Gateway::on(b);
    for auth in [None, Some("Bearer wrong"), Some(ADMIN_TOKEN)] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let r = request(gw.admin, "GET", "/admin/v1/accounts/acme", &headers, None).unwrap();
        assert_error(&r, 401, "UNAUTHORIZED", "Invalid or missing admin token");
    }
    // Refusals on the admin listener are counted like those on the public one.
    let metrics = request(gw.admin, "GET", "/metrics", &[], None)
        .unwrap()
        .text();
    assert!(
        metrics.contains("msgflash_rejections_total{code=\"UNAUTHORIZED\"} 3\n"),
        "{metrics}"
    );
}

fn health_readiness_and_metrics(b: Backend) {
    let gw = Gateway::on(b);
    let r = request(gw.admin, "GET", "/healthz", &[], None).unwrap();
    assert_eq!(
        (r.status, r.json().unwrap()),
        (200, json!({"status": "ok"}))
    );
    let r = request(gw.admin, "GET", "/readyz", &[], None).unwrap();
    assert_eq!(
        (r.status, r.json().unwrap()),
        (200, json!({"status": "ready"}))
    );
    gw.get("/nowhere", &[]);
    let (key, _) = gw.account_with_key("acme", "pro");
    gw.get("/api/v1/x", &[("x-api-key", &key)]);
    // Metrics are recorded once a response is out, so the client may be a moment ahead.
    let mut r = request(gw.admin, "GET", "/metrics", &[], None).unwrap();
    eventually("both requests are counted", || {
        r = request(gw.admin, "GET", "/metrics", &[], None).unwrap();
        r.text()
            .contains("msgflash_request_duration_seconds_count 2\n")
    });
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
    let text = r.text();
    assert!(
        text.contains("msgflash_requests_total{route=\"none\",status=\"404\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("msgflash_requests_total{route=\"/api/v1/\",status=\"200\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("msgflash_request_duration_seconds_count 2\n"),
        "{text}"
    );
    assert!(
        text.contains("msgflash_rejections_total{code=\"NOT_FOUND\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("msgflash_refunds_failed_total 0\n"), "{text}");
    // On Redis the forwarded request waited on the store (its admission at least), and the
    // histogram says so with the access log off, as here.
    if matches!(b, Backend::Redis) {
        assert!(
            text.contains("msgflash_store_duration_seconds_count 1\n"),
            "{text}"
        );
    }
    assert!(!text.contains(&key));
}

fn accounts_are_put_and_shown(b: Backend) {
    let gw = Gateway::on(b);
    let r = gw.admin_call(
        "PUT",
        "/admin/v1/accounts/acme",
        Some(json!({"plan": "pro", "quotaAnchorDay": 15})),
    );
    assert_eq!(r.status, 200);
    gw.create_key("acme");
    let v = gw
        .admin_call("GET", "/admin/v1/accounts/acme", None)
        .json()
        .unwrap();
    assert_eq!(
        v,
        json!({
            "id": "acme", "plan": "pro", "subscription": "active", "quotaAnchorDay": 15,
            "usage": {"period": "2026-11-15", "requests": 0, "quota": 500000},
            "keys": {"active": 1, "max": 10}
        })
    );
    let r = gw.admin_call("GET", "/admin/v1/accounts/nobody", None);
    assert_error(&r, 404, "NOT_FOUND", "Unknown account");
    let r = gw.admin_call(
        "PUT",
        "/admin/v1/accounts/acme",
        Some(json!({"plan": "gold"})),
    );
    assert_error(
        &r,
        400,
        "BAD_REQUEST",
        "Unknown plan \"gold\" (known: free, plus, pro, slow, starter, tiny)",
    );
    let r = gw.admin_call(
        "PUT",
        "/admin/v1/accounts/acme",
        Some(json!({"plan": "pro", "colour": "red"})),
    );
    assert_eq!(r.status, 400);
    // What a PUT leaves out, the account keeps: a plan change lifts no suspension and moves
    // no quota period.
    gw.put_account("acme", "pro", "inactive");
    let r = gw.admin_call(
        "PUT",
        "/admin/v1/accounts/acme",
        Some(json!({"plan": "starter"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    assert_eq!(
        (&v["plan"], &v["subscription"], &v["quotaAnchorDay"]),
        (&json!("starter"), &json!("inactive"), &json!(15))
    );
    // The plan too: a subscription alone turns it back on, on the plan it had.
    let r = gw.admin_call(
        "PUT",
        "/admin/v1/accounts/acme",
        Some(json!({"subscription": "active"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    assert_eq!(
        (&v["plan"], &v["subscription"], &v["quotaAnchorDay"]),
        (&json!("starter"), &json!("active"), &json!(15))
    );
    // A new account has nothing to keep: it needs its plan.
    let r = gw.admin_call(
        "PUT",
        "/admin/v1/accounts/newco",
        Some(json!({"subscription": "active"})),
    );
    assert_error(&r, 400, "BAD_REQUEST", "A new account needs a plan");
}

fn keys_are_created_listed_and_revoked(b: Backend) {
    let gw = Gateway::on(b);
    gw.put_account("acme", "starter", "active");
    let r = gw.admin_call(
        "POST",
        "/admin/v1/accounts/acme/keys",
        Some(json!({"name": "prod", "scopes": ["messages:send"], "instanceIds": ["3fa85f64-5717-4562-b3fc-2c963f66afa6"]})),
    );
    assert_eq!(r.status, 201);
    // The one answer that carries the full key: no cache on the way may keep it.
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let created = r.json().unwrap();
    let key = created["key"].as_str().unwrap();
    assert_eq!(created["createdAt"], "2026-11-29T00:00:00.000Z");
    assert_eq!(
        created["instanceIds"],
        json!(["3fa85f64-5717-4562-b3fc-2c963f66afa6"])
    );
    let list = gw
        .admin_call("GET", "/admin/v1/accounts/acme/keys", None)
        .json()
        .unwrap();
    assert_eq!(list["keys"][0]["id"], created["id"]);
    assert!(!list.to_string().contains(key));
    // `null` restrictions are none, as leaving them out is.
    let r = gw.admin_call(
        "POST",
        "/admin/v1/accounts/acme/keys",
        Some(json!({"name": "plain", "scopes": null, "instanceIds": null})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let plain = r.json().unwrap();
    assert_eq!(
        (&plain["scopes"], &plain["instanceIds"]),
        (&json!([]), &json!([]))
    );
    let r = gw.admin_call(
        "DELETE",
        &format!(
            "/admin/v1/accounts/acme/keys/{}",
            created["id"].as_str().unwrap()
        ),
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json().unwrap()["revokedAt"], "2026-11-29T00:00:00.000Z");
    let r = gw.admin_call("DELETE", "/admin/v1/accounts/acme/keys/key_nope", None);
    assert_error(&r, 404, "NOT_FOUND", "Unknown API key");
    let r = gw.admin_call(
        "POST",
        "/admin/v1/accounts/nobody/keys",
        Some(json!({"name": "x"})),
    );
    assert_error(&r, 404, "NOT_FOUND", "Unknown account");
    let r = gw.admin_call(
        "POST",
        "/admin/v1/accounts/acme/keys",
        Some(json!({"name": "x", "instanceIds": ["nope"]})),
    );
    assert_error(
        &r,
        400,
        "BAD_REQUEST",
        "Invalid instance id \"nope\": expected a UUID",
    );
}

fn revocation_is_effective_on_the_next_request(b: Backend) {
    let gw = Gateway::on(b);
    let (key, key_id) = gw.account_with_key("acme", "pro");
    let mut conn = gw.connect();
    assert_eq!(
        conn.send("GET", "/api/v1/x", &[("x-api-key", &key)], None)
            .unwrap()
            .status,
        200
    );
    let r = gw.admin_call(
        "DELETE",
        &format!("/admin/v1/accounts/acme/keys/{key_id}"),
        None,
    );
    assert_eq!(r.status, 200);
    let r = conn
        .send("GET", "/api/v1/x", &[("x-api-key", &key)], None)
        .unwrap();
    assert_error(&r, 401, "UNAUTHORIZED", "Invalid or revoked API key");
}

fn concurrent_creates_never_exceed_the_plan_cap(b: Backend) {
    let gw = Arc::new(Gateway::on(b));
    gw.put_account("acme", "starter", "active"); // cap 3
    let barrier = Arc::new(Barrier::new(12));
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let (gw, barrier) = (gw.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                gw.admin_call(
                    "POST",
                    "/admin/v1/accounts/acme/keys",
                    Some(json!({"name": format!("k{i}")})),
                )
                .status
            })
        })
        .collect();
    let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 403).count(),
        9,
        "{statuses:?}"
    );
    // Revoked keys do not count.
    let list = gw
        .admin_call("GET", "/admin/v1/accounts/acme/keys", None)
        .json()
        .unwrap();
    let id = list["keys"][0]["id"].as_str().unwrap().to_owned();
    gw.admin_call(
        "DELETE",
        &format!("/admin/v1/accounts/acme/keys/{id}"),
        None,
    );
    gw.create_key("acme");
}

/// An account keeps its newest 100 revoked records; an older one is forgotten when another key
/// is revoked (a create-and-revoke loop grew the records, and every listing, without end). A
/// forgotten key is refused as an unknown one is.
fn old_revoked_keys_are_forgotten(b: Backend) {
    let mut gw = Gateway::on(b);
    gw.put_account("acme", "pro", "active");
    let mut revoked = Vec::new();
    for _ in 0..101 {
        let (key, id) = gw.create_key("acme");
        let r = gw.admin_call(
            "DELETE",
            &format!("/admin/v1/accounts/acme/keys/{id}"),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.text());
        revoked.push((key, id));
        gw.clock.advance_ms(1);
    }
    // Forgotten for good: the embedded store's data file says so after a restart.
    gw.restart();
    let list = gw
        .admin_call("GET", "/admin/v1/accounts/acme/keys", None)
        .json()
        .unwrap();
    let listed: Vec<&str> = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 100);
    assert!(!listed.contains(&revoked[0].1.as_str()));
    assert!(listed.contains(&revoked[1].1.as_str()));
    for (key, _) in [&revoked[0], &revoked[100]] {
        let r = gw.get("/api/v1/x", &[("x-api-key", key)]);
        assert_error(&r, 401, "UNAUTHORIZED", "Invalid or revoked API key");
    }
    let r = gw.admin_call(
        "DELETE",
        &format!("/admin/v1/accounts/acme/keys/{}", revoked[0].1),
        None,
    );
    assert_eq!(r.status, 404);
    let (key, _) = gw.create_key("acme");
    echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
}

crate::on_both_stores!(
    old_revoked_keys_are_forgotten,
    admin_api_needs_the_token,
    health_readiness_and_metrics,
    accounts_are_put_and_shown,
    keys_are_created_listed_and_revoked,
    revocation_is_effective_on_the_next_request,
    concurrent_creates_never_exceed_the_plan_cap,
);

/// The admin listener has the proxy's head deadline and caps of its own (100 connections, 25 per
/// client address): a caller that reaches it can neither hold its one thread with a head it
/// never finishes nor take every connection the probes need.
/// A page in an operator's browser that rebinds its DNS name to 127.0.0.1 reaches a loopback
/// admin listener under that name: what needs no token (metrics, readiness) is not for it.
/// The machine's own names and addresses pass.
#[test]
fn a_loopback_admin_listener_answers_only_local_names() {
    let gw = Gateway::start();
    let get = |host: Option<&str>| {
        let head = match host {
            Some(h) => format!("GET /metrics HTTP/1.1\r\nhost: {h}\r\n\r\n"),
            None => "GET /metrics HTTP/1.0\r\n\r\n".to_owned(),
        };
        crate::client::Connection::open(gw.admin)
            .unwrap()
            .raw(head.as_bytes())
            .unwrap()
    };
    for host in [
        "evil.example",
        "evil.example:9090",
        "localhost.evil.example",
        "127.0.0.1.nip.io",
    ] {
        assert_error(&get(Some(host)), 404, "NOT_FOUND", "No route for this host");
    }
    // Liveness tells nothing: any name.
    let r = crate::client::Connection::open(gw.admin)
        .unwrap()
        .raw(b"GET /healthz HTTP/1.1\r\nhost: evil.example\r\n\r\n")
        .unwrap();
    assert_eq!(r.status, 200);
    let port = gw.admin.port();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "LOCALHOST.".to_owned(),
        "app.localhost".to_owned(),
        format!("[::1]:{port}"),
        "10.1.2.3".to_owned(),
    ] {
        let r = get(Some(&host));
        assert_eq!(r.status, 200, "{host}");
        assert!(r.text().contains("msgflash_"), "{host}");
    }
    assert_eq!(get(None).status, 200, "no Host at all (HTTP/1.0)");
}

#[test]
fn the_admin_listener_bounds_heads_and_connections() {
    use std::io::Write;
    let gw = Gateway::start_with(Setup::new().server("header_timeout = \"1s\""));
    let mut slow = std::net::TcpStream::connect(gw.admin).unwrap();
    slow.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    assert_closed_without_answer(&mut slow, "an admin head never finished");

    // 25 connections, each served once and kept alive: all admitted, all still open.
    let mut kept: Vec<crate::client::Connection> = (0..25)
        .map(|_| {
            let mut c = crate::client::Connection::open(gw.admin).unwrap();
            assert_eq!(c.send("GET", "/healthz", &[], None).unwrap().status, 200);
            c
        })
        .collect();
    assert!(
        request(gw.admin, "GET", "/healthz", &[], None).is_err(),
        "the 26th connection from this address is refused"
    );
    kept.truncate(20);
    eventually("room again once some close", || {
        request(gw.admin, "GET", "/healthz", &[], None).is_ok_and(|r| r.status == 200)
    });
}
