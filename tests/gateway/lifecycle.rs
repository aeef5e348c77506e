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
    assert!(!gw.dir.path().join("data/store.jsonl.tmp").exists());
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

fn usage_of(gw: &Gateway, account: &str) -> u64 {
    let r = gw.admin_call("GET", &format!("/admin/v1/accounts/{account}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().unwrap()["usage"]["requests"].as_u64().unwrap()
}

/// Quota counts on the embedded store survive a restart (they are written beside the data
/// file at most a second apart, and once more when the gateway stops).
#[test]
fn quota_usage_survives_a_restart_on_the_embedded_store() {
    let mut gw = Gateway::start();
    let (key, _) = gw.account_with_key("acme", "pro");
    for _ in 0..7 {
        echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
    }
    assert_eq!(usage_of(&gw, "acme"), 7);
    gw.restart();
    assert_eq!(usage_of(&gw, "acme"), 7);
    echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
    assert_eq!(usage_of(&gw, "acme"), 8);
}

/// One process owns an embedded data file: a second gateway on the same file is refused at
/// start with the reason, and gets it once the first has stopped.
#[test]
fn a_second_gateway_on_the_same_data_file_is_refused() {
    let gw = Gateway::start();
    let config = msgflash_gateway::config::Config::load_with_env(&gw.config_path(), &env).unwrap();
    let data = gw.dir.path().join("data/store.jsonl");
    let err = msgflash_gateway::server::open_store(&config, false)
        .err()
        .expect("refused")
        .to_string();
    assert_eq!(
        err,
        format!(
            "cannot open the store: store misconfigured: {} is in use by another gateway process \
             (pid {}); stop it first, or start this one with `run --upgrade` to take over from it",
            data.display(),
            std::process::id()
        )
    );
    drop(gw);
    assert!(msgflash_gateway::server::open_store(&config, false).is_ok());
}
