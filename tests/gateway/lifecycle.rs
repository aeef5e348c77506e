//! Persistence across restarts, and keep-alive after gateway-made answers.

use crate::support::*;

#[test]
fn restart_keeps_accounts_and_keys_but_never_the_key_itself() {
    let mut gw = Gateway::start();
    let (key, key_id) = gw.account_with_key("acme", "pro");
    let (revoked, revoked_id) = gw.create_key("acme");
    gw.admin_call(
        "DELETE",
        &format!("/admin/v1/accounts/acme/keys/{revoked_id}"),
        None,
    );
    gw.restart();
    let seen = echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
    assert_eq!(seen["headers"]["x-api-key-id"], key_id.as_str());
    assert_error(
        &gw.get("/api/v1/x", &[("x-api-key", &revoked)]),
        401,
        "UNAUTHORIZED",
        "Invalid or revoked API key",
    );
    let data = std::fs::read_to_string(gw.dir.path().join("data/store.jsonl")).unwrap();
    assert!(
        !data.contains(&key) && !data.contains(&key[10..]),
        "the data file holds a key"
    );
    let hash = msgflash_gateway::auth::api_key::KeyHash::of(key.as_bytes()).to_hex();
    assert!(data.contains(&hash));
    assert!(!gw.dir.path().join("data/store.tmp").exists());
}

#[test]
fn keep_alive_survives_rejections_with_bodies() {
    let gw = Gateway::start();
    let (key, _) = gw.account_with_key("acme", "pro");
    let mut conn = gw.connect();
    let r = conn
        .send("POST", "/api/v1/messages/send", &[], Some(&[b'x'; 1000]))
        .unwrap();
    assert_error(
        &r,
        401,
        "UNAUTHORIZED",
        "Missing API key. Send it in the x-api-key header.",
    );
    let r = conn
        .send(
            "POST",
            "/api/v1/messages/send",
            &[("x-api-key", &key)],
            Some(b"{\"a\":1}"),
        )
        .unwrap();
    assert_eq!(echoed(&r)["body"], "{\"a\":1}");
    let r = conn.send("GET", "/nowhere", &[], None).unwrap();
    assert_eq!(r.status, 404);
    let r = conn
        .send("GET", "/api/v1/x", &[("x-api-key", &key)], None)
        .unwrap();
    assert_eq!(r.status, 200);
}
