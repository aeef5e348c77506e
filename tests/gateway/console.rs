//! SPEC §4: console JWTs, the gateway-served /api/api-keys, open routes with a per-IP limit.

use crate::support::*;
use serde_json::json;

const INVALID_TOKEN: &str = "Invalid or expired token";

fn console_requires_a_bearer_token(b: Backend) {
    let gw = Gateway::on(b);
    let r = gw.get("/api/dashboard", &[]);
    assert_error(
        &r,
        401,
        "UNAUTHORIZED",
        "Missing bearer token. Send it in the Authorization header.",
    );
    let r = gw.get("/api/dashboard", &[("x-api-key", "msgf_live_abc")]);
    assert_error(
        &r,
        401,
        "UNAUTHORIZED",
        "The console uses Bearer tokens: send Authorization: Bearer <token>, not x-api-key.",
    );
    for bad in ["Bearer", "Bearer not.a.jwt", "Basic dXNlcjpwYXNz"] {
        let r = gw.get("/api/dashboard", &[("authorization", bad)]);
        assert_error(&r, 401, "UNAUTHORIZED", INVALID_TOKEN);
    }
}

fn expired_and_forged_tokens_are_refused(b: Backend) {
    let gw = Gateway::on(b);
    let token = gw.token("acme", 60);
    let auth = format!("Bearer {token}");
    echoed(&gw.get("/api/dashboard", &[("authorization", &auth)]));
    // No leeway by default (SPEC §4: expired is 401): still accepted (now from the
    // verified-token cache) one second before `exp`, refused one second after.
    gw.clock.advance_ms(59_000);
    echoed(&gw.get("/api/dashboard", &[("authorization", &auth)]));
    gw.clock.advance_ms(2_000);
    assert_error(
        &gw.get("/api/dashboard", &[("authorization", &auth)]),
        401,
        "UNAUTHORIZED",
        INVALID_TOKEN,
    );
    // alg=none, same claims
    let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJhY2NvdW50X2lkIjoiYWNtZSIsImV4cCI6OTk5OTk5OTk5OSwiaXNzIjoibXNnZmxhc2giLCJhdWQiOiJtc2dmbGFzaC1jb25zb2xlIn0.";
    let r = gw.get(
        "/api/dashboard",
        &[("authorization", &format!("Bearer {none}"))],
    );
    assert_error(&r, 401, "UNAUTHORIZED", INVALID_TOKEN);
    // a flipped signature byte
    let mut forged = gw.token("acme", 3600).into_bytes();
    let last = forged.len() - 2;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let r = gw.get(
        "/api/dashboard",
        &[("authorization", &format!("Bearer {forged}"))],
    );
    assert_error(&r, 401, "UNAUTHORIZED", INVALID_TOKEN);
}

fn console_requests_carry_account_and_user(b: Backend) {
    let gw = Gateway::on(b);
    let auth = format!("Bearer {}", gw.token("acme", 3600));
    let seen = echoed(&gw.get(
        "/api/instances",
        &[
            ("authorization", &auth),
            ("x-account-id", "victim"),
            ("x-user-id", "victim"),
        ],
    ));
    assert_eq!(seen["headers"]["x-account-id"], "acme");
    assert_eq!(seen["headers"]["x-user-id"], "user-1");
    assert!(seen["headers"].get("x-api-key-id").is_none());
    // The token the gateway verified goes on (a public API key's neighbour does not: see
    // `authorized_requests_carry_identity_and_never_the_key`).
    assert_eq!(seen["headers"]["authorization"], auth.as_str());
}

fn console_manages_the_tokens_own_keys(b: Backend) {
    let gw = Gateway::on(b);
    gw.put_account("acme", "starter", "active");
    gw.put_account("other", "pro", "active");
    let (_, other_key_id) = gw.create_key("other");
    let auth = format!("Bearer {}", gw.token("acme", 3600));
    let h = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];

    let r = gw.send(
        "POST",
        "/api/api-keys",
        &h,
        Some(br#"{"name":"ci","scopes":["messages:send"]}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let created = r.json().unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    assert_eq!(created["prefix"], key[..14]);
    assert_eq!(created["last4"], key[key.len() - 4..]);
    assert_eq!(created["scopes"], json!(["messages:send"]));

    let list = gw.get("/api/api-keys", &h).json().unwrap();
    assert_eq!(list["keys"].as_array().unwrap().len(), 1);
    assert!(
        list["keys"][0].get("key").is_none(),
        "a listing must not show the secret"
    );
    assert!(!list.to_string().contains(&key));

    echoed(&gw.send(
        "POST",
        "/api/v1/messages/send",
        &[("x-api-key", &key), ("content-type", "application/json")],
        Some(b"{}"),
    ));
    let id = created["id"].as_str().unwrap();
    let r = gw.send("DELETE", &format!("/api/api-keys/{id}"), &h, None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json().unwrap()["revokedAt"].is_string());
    assert_error(
        &gw.get("/api/v1/x", &[("x-api-key", &key)]),
        401,
        "UNAUTHORIZED",
        "Invalid or revoked API key",
    );

    // Another account's key is not this token's to revoke.
    let r = gw.send("DELETE", &format!("/api/api-keys/{other_key_id}"), &h, None);
    assert_error(&r, 404, "NOT_FOUND", "Unknown API key");
}

fn console_key_creation_respects_the_plan_cap(b: Backend) {
    let gw = Gateway::on(b);
    gw.put_account("acme", "free", "active");
    let auth = format!("Bearer {}", gw.token("acme", 3600));
    let h = [("authorization", auth.as_str())];
    assert_eq!(
        gw.send("POST", "/api/api-keys", &h, Some(br#"{"name":"a"}"#))
            .status,
        201
    );
    let r = gw.send("POST", "/api/api-keys", &h, Some(br#"{"name":"b"}"#));
    assert_error(
        &r,
        403,
        "API_KEY_LIMIT_REACHED",
        "API key limit reached: the plan allows 1 active key(s)",
    );
    let r = gw.send("POST", "/api/api-keys", &h, Some(br#"{"name":"#));
    assert_eq!(r.status, 400);
    assert_eq!(r.json().unwrap()["error"]["code"], "BAD_REQUEST");
}

fn open_routes_need_no_credential_but_are_limited_per_ip(b: Backend) {
    let gw = Gateway::on(b);
    // ip_burst = 3, ip_rate_per_second = 1
    for _ in 0..3 {
        let seen = echoed(&gw.send("POST", "/api/auth/login", &[], Some(b"{}")));
        assert!(seen["headers"].get("x-account-id").is_none());
    }
    let r = gw.send("POST", "/api/auth/login", &[], Some(b"{}"));
    assert_error(
        &r,
        429,
        "TOO_MANY_REQUESTS",
        "Too many requests from this client",
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    gw.clock.advance_ms(1000);
    echoed(&gw.send("POST", "/api/auth/login", &[], Some(b"{}")));
}

crate::on_both_stores!(
    console_requires_a_bearer_token,
    expired_and_forged_tokens_are_refused,
    console_requests_carry_account_and_user,
    console_manages_the_tokens_own_keys,
    console_key_creation_respects_the_plan_cap,
    open_routes_need_no_credential_but_are_limited_per_ip,
);

/// A token signed by the issuer whose claims a backend could read as another identity: an
/// account id outside the ids accounts have (non-breaking space, comma, accented letter) or a
/// user id with a space, a list or quoting character or non-ASCII bytes is refused, and so is a
/// token with a Unicode space after it; e-mail and provider-style user ids pass.
#[test]
fn claims_that_are_no_plain_id_are_refused() {
    let gw = Gateway::start();
    let token = |account: &str, sub: &str| {
        msgflash_gateway::auth::jwt::mint_hs256(&msgflash_gateway::auth::jwt::MintRequest {
            secret: JWT_SECRET,
            account_claim: "account_id",
            account_id: account,
            sub: Some(sub),
            issuer: Some("msgflash"),
            audience: Some("msgflash-console"),
            now_unix: T0 as i64,
            ttl_secs: 3600,
        })
        .unwrap()
    };
    let call = |t: String| {
        gw.get(
            "/api/instances",
            &[("authorization", &format!("Bearer {t}"))],
        )
    };
    for (account, sub) in [
        ("acme\u{a0}", "user-1"),
        ("acme,other", "user-1"),
        ("acm\u{e9}", "user-1"),
        ("", "user-1"),
        ("acme", "user 1"),
        ("acme", "us\u{e9}r"),
        // A backend reading `x-user-id` as a list, or a parameter, would see two users.
        ("acme", "u1,u2"),
        ("acme", "u1;admin"),
        ("acme", "\"u1\""),
    ] {
        assert_error(
            &call(token(account, sub)),
            401,
            "UNAUTHORIZED",
            INVALID_TOKEN,
        );
    }
    for sub in ["ann@example.com", "auth0|5f7c8ec7c33c6c004bbafe82"] {
        let seen = echoed(&call(token("acme", sub)));
        assert_eq!(seen["headers"]["x-user-id"], sub);
    }
    // Spaces and tabs around the token are HTTP's; a Unicode space is part of what the backend
    // gets, so it is no token the gateway verified.
    let good = token("acme", "user-1");
    echoed(&call(format!("{good} \t")));
    for space in ['\u{3000}', '\u{a0}'] {
        assert_error(
            &call(format!("{good}{space}")),
            401,
            "UNAUTHORIZED",
            INVALID_TOKEN,
        );
    }
}

/// Tokens the issuer signed that are not plain access tokens: a critical header extension the
/// gateway does not understand (RFC 7515 §4.1.11), a `typ` naming another kind of token (a
/// refresh token signed with the same key and claims), a claim or header member named twice
/// (the gateway and a backend reading the forwarded token could take different copies).
#[test]
fn tokens_that_are_no_plain_access_token_are_refused() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let gw = Gateway::start();
    gw.put_account("acme", "pro", "active");
    gw.put_account("victim", "pro", "active");
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes());
    let sign = |header: &str, claims: &str| {
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let sig =
            jsonwebtoken::crypto::sign(message.as_bytes(), &key, jsonwebtoken::Algorithm::HS256)
                .unwrap();
        format!("Bearer {message}.{sig}")
    };
    let claims = |account: &str| {
        format!(
            r#"{{"account_id":"{account}","sub":"u1","exp":{},"iss":"msgflash","aud":"msgflash-console"}}"#,
            T0 + 3600
        )
    };
    let call = |auth: String| gw.get("/api/instances", &[("authorization", &auth)]);
    // The same claims pass under a plain header, with or without an access-token typ.
    for header in [
        r#"{"alg":"HS256"}"#,
        r#"{"alg":"HS256","typ":"JWT"}"#,
        r#"{"alg":"HS256","typ":"at+jwt"}"#,
    ] {
        let seen = echoed(&call(sign(header, &claims("acme"))));
        assert_eq!(seen["headers"]["x-account-id"], "acme", "{header}");
    }
    let twice = format!(
        r#"{{"account_id":"acme","account_id":"victim","exp":{},"iss":"msgflash","aud":"msgflash-console"}}"#,
        T0 + 3600
    );
    for (header, claims) in [
        (
            r#"{"alg":"HS256","crit":["b64"],"b64":false}"#,
            claims("acme"),
        ),
        (r#"{"alg":"HS256","typ":"refresh+jwt"}"#, claims("acme")),
        // A member jsonwebtoken does not know, twice (one it knows twice it refuses itself).
        (r#"{"alg":"HS256","x":"a","x":"b"}"#, claims("acme")),
        (r#"{"alg":"HS256"}"#, twice),
    ] {
        let r = call(sign(header, &claims));
        assert_refused(&r, 401, "UNAUTHORIZED", INVALID_TOKEN);
    }
}

/// Failed console authentications count toward the client's limit as failed keys do
/// (SPEC §10): over it, a token not verified before is refused without its signature being
/// checked, while one verified before still passes.
#[test]
fn failed_tokens_are_limited_per_client() {
    let gw = Gateway::start_with(Setup::new().server("auth_failures_per_minute = 3"));
    let known = format!("Bearer {}", gw.token("acme", 3600));
    echoed(&gw.get("/api/instances", &[("authorization", &known)]));
    // A token the issuer signed, refused for its claims (a tab left open past its session),
    // is no guess: it does not count.
    let expired = format!("Bearer {}", gw.token("acme", -3600));
    for _ in 0..5 {
        let r = gw.get("/api/instances", &[("authorization", &expired)]);
        assert_error(&r, 401, "UNAUTHORIZED", INVALID_TOKEN);
    }
    let bad = format!("{}x", gw.token("acme", 3600));
    for _ in 0..3 {
        let r = gw.get(
            "/api/instances",
            &[("authorization", &format!("Bearer {bad}"))],
        );
        assert_error(&r, 401, "UNAUTHORIZED", INVALID_TOKEN);
    }
    let fresh = format!("Bearer {}", gw.token("other", 3600));
    for auth in [
        format!("Bearer {bad}"),
        "Bearer nope".to_owned(),
        fresh.clone(),
    ] {
        let r = gw.get("/api/instances", &[("authorization", &auth)]);
        assert_error(
            &r,
            429,
            "TOO_MANY_REQUESTS",
            "Too many failed authentications from this client",
        );
        assert_eq!(r.header("retry-after"), Some("20"));
    }
    echoed(&gw.get("/api/instances", &[("authorization", &known)]));
    // A missing token is no failed guess.
    let r = gw.get("/api/instances", &[]);
    assert_eq!(r.status, 401);
    gw.clock.advance_ms(20_000);
    echoed(&gw.get("/api/instances", &[("authorization", &fresh)]));
}
