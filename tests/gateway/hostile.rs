//! The hostile world (issue 9, SPEC §1–2, §4): every way around a restriction that was once
//! reproduced, one test each, asserting the refusal word for word and that the upstream saw
//! nothing. Deny by default; refuse what a backend could read differently.

use crate::client::HttpResponse;
use crate::support::*;
use serde_json::json;

const A: &str = "3fa85f64-5717-4562-b3fc-2c963f66afa6";
const B: &str = "9b2e8a3c-1111-4222-8333-444455556666";
const SHIPPED_ROUTES: &str = include_str!("../../lua-free-policies/routes.toml");
const NO_SCOPE: &str =
    "This API key is restricted to scopes and this route is granted by none of them";
const NO_INSTANCE_SOURCE: &str = "This API key is restricted to specific instances and this route does not say which instance it acts on";

/// A gateway on the shipped routes.toml and a key of `acme` with the given restrictions.
fn shipped_with_key(scopes: &[&str], instances: &[&str]) -> (Gateway, String) {
    let gw = Gateway::start_with(Setup::new().route_policies(SHIPPED_ROUTES));
    let key = restricted_key(&gw, scopes, instances);
    (gw, key)
}

fn call(gw: &Gateway, method: &str, path: &str, key: &str, body: Option<&str>) -> HttpResponse {
    gw.send(
        method,
        path,
        &[("x-api-key", key), ("content-type", "application/json")],
        body.map(str::as_bytes),
    )
}

/// `GET /api/v1/messages/1?{query}` with `key` (the query-sourced route).
fn read_messages(gw: &Gateway, key: &str, query: &str) -> HttpResponse {
    call(gw, "GET", &format!("/api/v1/messages/1?{query}"), key, None)
}

/// The shipped policies keep SPEC §3's default: every `/api/v1/` route needs an active
/// subscription, reads and the status route included.
#[test]
fn shipped_routes_need_an_active_subscription_everywhere() {
    let (gw, key) = shipped_with_key(&[], &[]);
    gw.put_account("acme", "pro", "inactive");
    for (method, path) in [
        ("GET", "/api/v1/messages"),
        ("GET", "/api/v1/messages/42"),
        ("GET", &format!("/api/v1/instances/{A}")),
        ("GET", "/api/v1/webhooks"),
        ("GET", "/api/v1/contacts"),
        ("GET", "/api/v1/status"),
        ("POST", "/api/v1/messages/send"),
        ("DELETE", "/api/v1/contacts/7"),
        ("GET", "/api/v1/unlisted"),
    ] {
        let body = (method == "POST").then(|| format!(r#"{{"instanceId":"{A}"}}"#));
        let r = call(&gw, method, path, &key, body.as_deref());
        assert_refused(
            &r,
            403,
            "SUBSCRIPTION_INACTIVE",
            "The account has no active subscription for this action",
        );
    }
    gw.put_account("acme", "pro", "active");
    echoed(&call(&gw, "GET", "/api/v1/status", &key, None));
}

#[test]
fn restricted_keys_are_refused_wherever_no_policy_says_how_their_restriction_applies() {
    let (gw, key) = shipped_with_key(&["messages:read"], &[A]);
    for (method, path, message) in [
        (
            "POST",
            "/api/v1/webhooks",
            "This API key lacks the scope webhooks:write",
        ),
        (
            "GET",
            "/api/v1/instances",
            "This API key lacks the scope instances:read",
        ),
        (
            "POST",
            "/api/v1/contacts",
            "This API key lacks the scope contacts:write",
        ),
        ("POST", "/api/v1/messages/abc", NO_SCOPE),
        ("POST", "/api/v1/Messages/send", NO_SCOPE),
        ("GET", "/api/v1/statusX", NO_SCOPE),
        ("GET", "/api/v1/unknown", NO_SCOPE),
    ] {
        let body = (method == "POST").then_some("{}");
        let r = call(&gw, method, path, &key, body);
        assert_refused(&r, 403, "FORBIDDEN", message);
    }
    // What the restrictions allow still works: HEAD is read as GET, status needs no scope.
    echoed(&call(
        &gw,
        "GET",
        &format!("/api/v1/messages/1?instanceId={A}"),
        &key,
        None,
    ));
    let head = gw.send(
        "HEAD",
        &format!("/api/v1/messages/1?instanceId={A}"),
        &[("x-api-key", &key)],
        None,
    );
    assert_eq!(
        (head.status, head.header("x-echo")),
        (200, Some("msgflash"))
    );
    echoed(&call(&gw, "GET", "/api/v1/status", &key, None));

    // Instance restrictions alone: a route must say where the instance comes from.
    let key = restricted_key(&gw, &[], &[A]);
    for path in ["/api/v1/unknown", "/api/v1/statusX"] {
        let r = call(&gw, "GET", path, &key, None);
        assert_refused(&r, 403, "FORBIDDEN", NO_INSTANCE_SOURCE);
    }
    // Webhooks and contacts are declared instance-free; the status route too.
    for path in ["/api/v1/webhooks", "/api/v1/contacts/7", "/api/v1/status"] {
        echoed(&call(&gw, "GET", path, &key, None));
    }
    // But a webhook hears every instance's events: changing one names no instance.
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        let r = call(&gw, method, "/api/v1/webhooks/7", &key, Some("{}"));
        assert_refused(&r, 403, "FORBIDDEN", NO_INSTANCE_SOURCE);
    }
    let r = call(&gw, "GET", "/api/v1/instances", &key, None);
    assert_refused(
        &r,
        403,
        "FORBIDDEN",
        "This API key is restricted to specific instances and the request names none",
    );

    // A key without restrictions is never held up by any of this.
    let free = restricted_key(&gw, &[], &[]);
    echoed(&call(&gw, "GET", "/api/v1/unknown", &free, None));
}

/// Readings earlier reviews had not met (session 11): a prefixed query key ASP.NET Core binds
/// to a model's property (`query.instanceId`), `%u0049` (`I` to .NET's decoder), a key or a
/// value that a second decoding turns into the parameter, a JSON member name read up to a NUL,
/// and a cookie or header field a backend binds as input (PHP's `$_REQUEST`, classic ASP.NET's
/// `Request[name]`, Spring 6.2's header binding). Each refused for a key held to instance A.
#[test]
fn other_readings_of_the_instance_are_refused() {
    let (gw, key) = shipped_with_key(&[], &[A]);
    let twice = "The query parameter instanceId is given more than once";
    for query in [
        format!("query.instanceId={B}&instanceId={A}"),
        format!("instanceId={A}&!instanceId={B}"),
        format!("instance%2549d={B}&instanceId={A}"),
        format!("instance%25u0049d={B}&instanceId={A}"),
        format!("instanceId={A}&x=a%26instanceId%3D{B}"),
    ] {
        assert_refused(&read_messages(&gw, &key, &query), 400, "BAD_REQUEST", twice);
    }
    let r = read_messages(&gw, &key, &format!("instance%u0049d={B}&instanceId={A}"));
    assert_refused(
        &r,
        400,
        "BAD_REQUEST",
        "The query string has a '%' not followed by two hex digits: instanceId could be read differently",
    );
    let beside =
        "A cookie or header is named instanceId: a backend could read the instance from it";
    for header in [
        ("cookie", format!("theme=dark; instanceId={B}")),
        ("cookie", format!("instance_id={B}")),
        // An RFC 2109 parser (Tomcat's legacy one) splits at `,` too.
        ("cookie", format!("theme=dark,instanceId={B}")),
        ("instance-id", B.to_owned()),
        ("InstanceId", B.to_owned()),
    ] {
        // The instance in the query, and in the path.
        for path in [
            format!("/api/v1/messages/1?instanceId={A}"),
            format!("/api/v1/instances/{A}"),
        ] {
            let r = gw.send(
                "GET",
                &path,
                &[("x-api-key", &key), (header.0, &header.1)],
                None,
            );
            assert_refused(&r, 400, "BAD_REQUEST", beside);
        }
    }
    let body = format!(r#"{{"instanceId\u0000x":"{B}","instanceId":"{A}"}}"#);
    let r = call(&gw, "POST", "/api/v1/messages/send", &key, Some(&body));
    assert_refused(
        &r,
        400,
        "BAD_REQUEST",
        "The JSON field instanceId is given more than once",
    );
    // What names nothing passes: a cookie of another name, an escaped value, the key's own id.
    let r = gw.send(
        "GET",
        &format!("/api/v1/messages/1?instanceId={A}&q=100%25%20sure%26more"),
        &[("x-api-key", &key), ("cookie", "session=instanceId")],
        None,
    );
    echoed(&r);
}

#[test]
fn a_duplicated_inspected_field_or_parameter_is_refused() {
    let gw = Gateway::start_with(Setup::new().more_policies(
        "[[route]]\nprefix = \"/api/v1/messages/\"\nmethods = [\"DELETE\"]\nscope = \"messages:read\"\ninstance = { from = \"query\", param = \"instanceId\" }\n",
    ));
    let key = restricted_key(&gw, &[], &[A]);
    let send = |body: String| call(&gw, "POST", "/api/v1/messages/send", &key, Some(&body));
    let twice = "The JSON field instanceId is given more than once";
    for body in [
        format!(r#"{{"instanceId":"{A}","instanceId":"{B}"}}"#),
        format!(r#"{{"instanceId":"{A}","instance\u0049d":"{B}"}}"#),
        format!(r#"{{"instanceId":"{A}","InstanceID":"{B}"}}"#),
        format!(r#"{{"instanceId":"{B}","instanceId":"{A}"}}"#),
    ] {
        assert_refused(&send(body), 400, "BAD_REQUEST", twice);
    }
    // A nested copy with another value is a second reading (Rails' wrap_parameters leaves a
    // `message` object as sent, and `params.require(:message)` reads the copy inside it); a
    // nested copy of the same value says nothing new.
    for body in [
        format!(r#"{{"instanceId":"{A}","message":{{"instanceId":"{B}"}}}}"#),
        format!(r#"{{"message":{{"instance_id":"{B}"}},"instanceId":"{A}"}}"#),
        format!(r#"{{"instanceId":"{A}","x":[{{"y":{{"InstanceId":"{B}"}}}}]}}"#),
        format!(r#"{{"instanceId":"{A}","x":{{"instanceId":7}}}}"#),
        format!(r#"{{"message":{{"instanceId":"{A}"}}}}"#),
    ] {
        assert_refused(&send(body), 400, "BAD_REQUEST", twice);
    }
    echoed(&send(format!(
        r#"{{"instanceId":"{A}","x":{{"instanceId":"{A}"}},"y":[1,"instanceId",null]}}"#
    )));

    let get = |query: String| read_messages(&gw, &key, &query);
    let twice = "The query parameter instanceId is given more than once";
    for query in [
        format!("instanceId={A}&instanceId={B}"),
        format!("instanceId={A}&instance%49d={B}"),
        format!("instanceId={A}&INSTANCEID={B}"),
    ] {
        assert_refused(&get(query), 400, "BAD_REQUEST", twice);
    }
    assert_refused(
        &get(format!("instanceId={A};instanceId={B}")),
        400,
        "BAD_REQUEST",
        "The query string contains ';': instanceId could be read differently",
    );
    for query in [
        format!("instanceId={A}&instanceId[]={B}"),
        format!("instanceId={A}&instanceId[0]={B}"),
        format!("instanceId={A}&InstanceId.x={B}"),
    ] {
        assert_refused(&get(query), 400, "BAD_REQUEST", twice);
    }
    // Backends drop parameters past their limit (PHP, qs: 1000): an inspected query is short.
    let padded = (0..100)
        .map(|i| format!("p{i}="))
        .collect::<Vec<_>>()
        .join("&");
    assert_refused(
        &get(format!("{padded}&instanceId={A}")),
        400,
        "BAD_REQUEST",
        "The query string has more than 100 parameters: instanceId could be read differently",
    );
    // A body beside an inspected query could carry the field too (Laravel's input() merges);
    // on GET, no body passes at all.
    let beside = |method: &str| {
        gw.send(
            method,
            &format!("/api/v1/messages/1?instanceId={A}"),
            &[("x-api-key", &key), ("content-type", "application/json")],
            Some(format!(r#"{{"instanceId":"{B}"}}"#).as_bytes()),
        )
    };
    assert_refused(
        &beside("GET"),
        400,
        "BAD_REQUEST",
        "A GET or HEAD request cannot have a body",
    );
    assert_refused(
        &beside("DELETE"),
        400,
        "BAD_REQUEST",
        "The request has a body: instanceId could be read from it instead of the query",
    );
    echoed(&get(format!("other=1&instanceId={A}")));
    // Where the body names the instance, the query may not name one too (Symfony's get()
    // reads the query first).
    let r = call(
        &gw,
        "POST",
        &format!("/api/v1/messages/send?instanceId={B}"),
        &key,
        Some(&format!(r#"{{"instanceId":"{A}"}}"#)),
    );
    assert_refused(
        &r,
        400,
        "BAD_REQUEST",
        "The query string names instanceId too: it could be read instead of the body",
    );
}

#[test]
fn method_overrides_in_the_query_are_refused() {
    let (gw, key) = shipped_with_key(&["webhooks:write"], &[]);
    for query in ["_method=GET", "x=1&_METHOD=get", "_method"] {
        let r = call(
            &gw,
            "POST",
            &format!("/api/v1/webhooks?{query}"),
            &key,
            Some("{}"),
        );
        assert_refused(
            &r,
            400,
            "BAD_REQUEST",
            "The query string has a _method parameter: method overrides are refused",
        );
    }
    echoed(&call(
        &gw,
        "POST",
        "/api/v1/webhooks?method=x",
        &key,
        Some("{}"),
    ));
}

#[test]
fn a_second_authorization_header_is_refused_on_the_console() {
    let gw = Gateway::start();
    let auth = format!("Bearer {}", gw.token("acme", 3600));
    let forged = format!(
        "Bearer {}",
        token_with(json!({"account_id": "acc_victim"})).replace('.', "x")
    );
    for pair in [[&auth, &forged], [&forged, &auth], [&auth, &auth]] {
        let r = gw.get(
            "/api/dashboard",
            &[("authorization", pair[0]), ("authorization", pair[1])],
        );
        assert_refused(&r, 401, "UNAUTHORIZED", "Invalid or expired token");
    }
    echoed(&gw.get("/api/dashboard", &[("authorization", &auth)]));
}

#[test]
fn paths_a_backend_could_resolve_differently_are_refused_before_the_credential() {
    let gw = Gateway::start();
    let (key, _) = gw.account_with_key("acme", "pro");
    let unknown = format!("msgf_live_{}", "0".repeat(64));
    let cases = [
        (
            "/api/auth/..%2fapi-keys",
            "an encoded '/' or '\\' (%2F, %5C)",
        ),
        (
            "/api/auth/..%2Fapi-keys",
            "an encoded '/' or '\\' (%2F, %5C)",
        ),
        (
            "/api/auth/..%5capi-keys",
            "an encoded '/' or '\\' (%2F, %5C)",
        ),
        (
            "/api/v1/instances%2f..%2f..%2fapi-keys",
            "an encoded '/' or '\\' (%2F, %5C)",
        ),
        ("/api/auth/..;/api-keys", "a ';' (path parameters)"),
        ("/api/v1/messages;jsessionid=1", "a ';' (path parameters)"),
        ("/api/auth/..\\api-keys", "a backslash"),
        ("/api/v1/%252e%252e/x", "an encoded '%' (%25)"),
        ("/api/v1/messages%00", "a control character"),
        ("/api/v1/messages%0d%0ax:y", "a control character"),
        (
            "/api/v1/messages/x%3FinstanceId%3DB%26",
            "an encoded '?' or '#' (%3F, %23)",
        ),
        ("/api/v1/messages%23x", "an encoded '?' or '#' (%3F, %23)"),
        (
            "/api/v1/%C0%AE%C0%AE/api-keys",
            "percent-encoded bytes that are not UTF-8",
        ),
    ];
    for (path, why) in cases {
        let message = format!("Ambiguous request path: it contains {why}");
        for headers in [
            vec![],
            vec![("x-api-key", key.as_str())],
            vec![("x-api-key", unknown.as_str())],
        ] {
            let r = gw.send("GET", path, &headers, None);
            assert_refused(&r, 400, "BAD_REQUEST", &message);
        }
    }
    // Raw bytes a client library would never send: non-ASCII, even valid UTF-8, is refused by
    // the gateway; invalid UTF-8 already by pingora's parser (answered in the JSON shape, and
    // the connection closes).
    let raw = |path: &[u8]| {
        let mut req = b"GET ".to_vec();
        req.extend_from_slice(path);
        req.extend_from_slice(
            format!(" HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\n\r\n").as_bytes(),
        );
        gw.connect().raw(&req).unwrap()
    };
    assert_refused(
        &raw(b"/api/v1/messages/\xc3\xa9"),
        400,
        "BAD_REQUEST",
        "Ambiguous request path: it contains a raw non-ASCII byte (percent-encode it)",
    );
    assert_refused(
        &raw(b"/api/v1/messages/\xff"),
        400,
        "BAD_REQUEST",
        "Malformed request",
    );
    // What stays allowed: encoded non-ASCII, and encoded unreserved characters (decoded).
    let seen = echoed(&gw.get("/api/v1/messages/%c3%a9/%41", &[("x-api-key", &key)]));
    assert_eq!(seen["uri"], "/api/v1/messages/%C3%A9/A");
}

#[test]
fn absolute_form_targets_are_forwarded_in_origin_form() {
    let gw = Gateway::start();
    let (key, _) = gw.account_with_key("acme", "pro");
    let req = format!(
        "GET http://elsewhere.example/api/v1/messages?x=1 HTTP/1.1\r\nhost: elsewhere.example\r\nx-api-key: {key}\r\n\r\n"
    );
    let seen = echoed(&gw.connect().raw(req.as_bytes()).unwrap());
    assert_eq!(seen["uri"], "/api/v1/messages?x=1");
}

#[test]
fn encoded_slashes_pass_only_where_the_operator_allows_them() {
    let gw = Gateway::start_with(Setup::new().server("allow_encoded_slashes = true"));
    let (key, _) = gw.account_with_key("acme", "pro");
    let seen = echoed(&gw.get("/api/v1/files/a%2fb", &[("x-api-key", &key)]));
    assert_eq!(seen["uri"], "/api/v1/files/a%2Fb");
    // Everything else stays refused, and so does a dot segment behind an encoded slash.
    let r = gw.get(
        "/api/v1/files/a%2F..%2F..%2Fapi-keys",
        &[("x-api-key", &key)],
    );
    assert_refused(
        &r,
        400,
        "BAD_REQUEST",
        "Ambiguous request path: it contains an encoded '/' or '\\' (%2F, %5C)",
    );
    let r = gw.get("/api/v1/files/a;b", &[("x-api-key", &key)]);
    assert_refused(
        &r,
        400,
        "BAD_REQUEST",
        "Ambiguous request path: it contains a ';' (path parameters)",
    );
}

/// A console token with exactly these claims (plus iss, aud, exp), signed with the test secret.
fn token_with(mut claims: serde_json::Value) -> String {
    claims["iss"] = "msgflash".into();
    claims["aud"] = "msgflash-console".into();
    claims["exp"] = (T0 as i64 + 3600).into();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

#[test]
fn an_account_claim_of_the_wrong_type_never_falls_back_to_sub() {
    let gw = Gateway::start();
    for claims in [
        json!({"account_id": 42, "sub": "acc_victim"}),
        json!({"account_id": "", "sub": "acc_victim"}),
        json!({"account_id": {"id": "acc_victim"}, "sub": "acc_victim"}),
        json!({"account_id": "acc_victim\tx", "sub": "acc_victim"}),
        json!({"account_id": "acc_victim x", "sub": "acc_victim"}),
        json!({"account_id": " acc_victim", "sub": "acc_victim"}),
    ] {
        let auth = format!("Bearer {}", token_with(claims));
        let r = gw.get("/api/dashboard", &[("authorization", &auth)]);
        assert_refused(&r, 401, "UNAUTHORIZED", "Invalid or expired token");
    }
    // Absent: the documented fallback to sub.
    let auth = format!("Bearer {}", token_with(json!({"sub": "acc_1"})));
    let seen = echoed(&gw.get("/api/dashboard", &[("authorization", &auth)]));
    assert_eq!(seen["headers"]["x-account-id"], "acc_1");
}

#[test]
fn console_endpoints_match_whole_segments() {
    let gw = Gateway::start();
    let (key, id) = gw.account_with_key("acme", "pro");
    let auth = format!("Bearer {}", gw.token("acme", 3600));
    // Not a key-management call: forwarded to the console backend like any console path.
    let suffix = &id[id.len() - 2..];
    let seen = echoed(&gw.send(
        "DELETE",
        &format!("/api/api-keys{suffix}"),
        &[("authorization", &auth)],
        None,
    ));
    assert_eq!(seen["method"], "DELETE");
    echoed(&gw.get("/api/v1/messages", &[("x-api-key", &key)]));
    // A multi-byte character gets an answer, and revokes nothing.
    let req =
        format!("DELETE /api/api-keys\u{e9} HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\n\r\n");
    let r = gw.connect().raw(req.as_bytes()).unwrap();
    assert_refused(
        &r,
        400,
        "BAD_REQUEST",
        "Ambiguous request path: it contains a raw non-ASCII byte (percent-encode it)",
    );
    let r = gw.send(
        "DELETE",
        &format!("/api/api-keys/{id}/x"),
        &[("authorization", &auth)],
        None,
    );
    assert_refused(&r, 404, "NOT_FOUND", "No such key-management call");
    // Other spellings of the gateway's own endpoint, which a backend routing without regard to
    // case or with format suffixes would serve as its own (no cap, no write limit), are never
    // forwarded.
    let h = [("authorization", auth.as_str())];
    assert_refused(
        &gw.send("POST", "/api/API-keys", &h, Some(br#"{"name":"k"}"#)),
        400,
        "BAD_REQUEST",
        "Ambiguous request path: it contains upper-case letters: in lower case it matches another route",
    );
    assert_refused(
        &gw.get("/api/api-keys.json", &h),
        404,
        "NOT_FOUND",
        "No such key-management call",
    );
    echoed(&gw.get("/api/v1/messages", &[("x-api-key", &key)]));
}

fn a_refused_revoke_changes_nothing(b: Backend) {
    let gw = Gateway::on(b);
    let (key, id) = gw.account_with_key("victim", "pro");
    gw.put_account("other", "pro", "active");
    let statuses: Vec<u16> = (0..11)
        .map(|_| gw.get("/api/v1/messages", &[("x-api-key", &key)]).status)
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 1);
    let data = gw.dir.path().join("data/store.jsonl");
    let before = std::fs::read(&data).ok();
    let auth = format!("Bearer {}", gw.token("other", 3600));
    let r = gw.send(
        "DELETE",
        &format!("/api/api-keys/{id}"),
        &[("authorization", &auth)],
        None,
    );
    assert_refused(&r, 404, "NOT_FOUND", "Unknown API key");
    let r = gw.admin_call(
        "DELETE",
        &format!("/admin/v1/accounts/other/keys/{id}"),
        None,
    );
    assert_refused(&r, 404, "NOT_FOUND", "Unknown API key");
    // The victim's bucket is as empty as before, its key as valid, the data file untouched.
    let r = gw.get("/api/v1/messages", &[("x-api-key", &key)]);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(std::fs::read(&data).ok(), before);
    gw.clock.advance_ms(1_000);
    echoed(&gw.get("/api/v1/messages", &[("x-api-key", &key)]));
}

fn revoking_twice_changes_no_record_but_invalidates_again(b: Backend) {
    let gw = Gateway::on(b);
    let (key, id) = gw.account_with_key("acme", "pro");
    echoed(&gw.get("/api/v1/messages", &[("x-api-key", &key)]));
    let path = format!("/admin/v1/accounts/acme/keys/{id}");
    let first = gw.admin_call("DELETE", &path, None);
    assert_eq!(first.status, 200, "{}", first.text());
    let data = gw.dir.path().join("data/store.jsonl");
    let before = std::fs::read(&data).ok();
    let publishes = |gw: &Gateway| {
        gw.redis
            .as_ref()
            .map(|r| r.command_calls().get("publish").copied().unwrap_or(0))
    };
    let published = publishes(&gw);
    gw.clock.advance_ms(5_000);
    let second = gw.admin_call("DELETE", &path, None);
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(second.json().unwrap(), first.json().unwrap());
    assert_eq!(std::fs::read(&data).ok(), before, "nothing written");
    assert_eq!(
        publishes(&gw),
        published.map(|n| n + 1),
        "invalidated again"
    );
    assert_refused(
        &gw.get("/api/v1/messages", &[("x-api-key", &key)]),
        401,
        "UNAUTHORIZED",
        "Invalid or revoked API key",
    );
}

fn a_new_quota_anchor_day_carries_the_usage_over(b: Backend) {
    let gw = Gateway::on(b);
    let (key, _) = gw.account_with_key("acme", "pro");
    for _ in 0..3 {
        echoed(&gw.get("/api/v1/messages", &[("x-api-key", &key)]));
    }
    // T0 is 2026-11-29: the period from the 1st runs since 2026-11-01, the one from the 15th
    // since 2026-11-15; the three requests stay counted.
    let r = gw.admin_call(
        "PUT",
        "/admin/v1/accounts/acme",
        Some(json!({"plan": "pro", "quotaAnchorDay": 15})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let usage = &r.json().unwrap()["usage"];
    assert_eq!(
        (usage["period"].as_str(), usage["requests"].as_u64()),
        (Some("2026-11-15"), Some(3))
    );
    echoed(&gw.get("/api/v1/messages", &[("x-api-key", &key)]));
    let v = gw
        .admin_call("GET", "/admin/v1/accounts/acme", None)
        .json()
        .unwrap();
    assert_eq!(v["usage"]["requests"], 4);
}

crate::on_both_stores!(
    a_refused_revoke_changes_nothing,
    revoking_twice_changes_no_record_but_invalidates_again,
    a_new_quota_anchor_day_carries_the_usage_over,
    what_changed_while_a_body_arrived_is_seen,
);

#[test]
fn identity_headers_in_any_spelling_never_reach_the_upstream() {
    let gw = Gateway::start();
    let (key, _) = gw.account_with_key("acme", "pro");
    let sent = [
        ("x-api-key", key.as_str()),
        ("x_account_id", "acc_victim"),
        ("x-account_id", "acc_victim"),
        // PHP files `.` as `_`: behind Caddy or FrankenPHP these are HTTP_X_ACCOUNT_ID & co.
        ("x-account.id", "acc_victim"),
        ("x.api.key.id", "key_victim"),
        (
            "x-api-key-instance.ids",
            "3fa85f64-5717-4562-b3fc-2c963f66afa6",
        ),
        ("x-forwarded.host", "evil.example"),
        ("x-http-method.override", "DELETE"),
        ("X_API_KEY_ID", "key_victim"),
        ("x_user_id", "u_victim"),
        ("x_api_key", "msgf_live_forged"),
        ("x_forwarded_for", "10.9.9.9"),
        ("forwarded", "for=10.9.9.9;proto=https"),
        ("x-real-ip", "10.9.9.9"),
        ("x-forwarded-host", "evil.example"),
        ("x-original-url", "/api/api-keys"),
        ("x-rewrite-url", "/api/api-keys"),
        ("x-http-method-override", "DELETE"),
        ("x-http-method", "DELETE"),
        ("x-method-override", "DELETE"),
        ("x-forwarded-ssl", "on"),
        ("x-forwarded-scheme", "https"),
        ("front-end-https", "on"),
        ("client-ip", "10.9.9.9"),
        ("cf-connecting-ip", "10.9.9.9"),
        ("x-internal-user", "root"),
        ("x_internal_user", "root"),
        // The user other authenticating proxies vouch for, in their spellings and others.
        ("x-forwarded-user", "admin"),
        ("X-Auth-Request-Email", "admin@example.com"),
        ("sm_user", "admin"),
        ("remote-user", "admin"),
        ("x-consumer-username", "admin"),
        ("x-ms-client-principal-name", "admin"),
        (
            "x-goog-authenticated-user-email",
            "accounts.google.com:admin@example.com",
        ),
        ("x-amzn-oidc-identity", "admin"),
        ("cf-access-authenticated-user-email", "admin@example.com"),
        // A client certificate a TLS-terminating proxy would vouch for (Tomcat's SSLValve
        // reads ssl_client_cert), and trace baggage naming another account.
        ("ssl_client_cert", "-----BEGIN CERTIFICATE-----victim"),
        (
            "x-forwarded-client-cert",
            "URI=spiffe://cluster.local/ns/admin/sa/admin",
        ),
        ("x-arr-clientcert", "victim"),
        ("x-forwarded-tls-client-cert", "victim"),
        ("ssl-client-verify", "SUCCESS"),
        ("x-ssl-client-verify", "SUCCESS"),
        ("cf-client-cert-sha256", "victim"),
        ("baggage", "account.id=acc_victim"),
        ("correlation-context", "account.id=acc_victim"),
        ("x-original-forwarded-for", "10.9.9.9"),
        // WebLogic's and Jetty's proxy headers, PHP snippets' and hosting platforms'.
        ("wl-proxy-client-ip", "10.9.9.9"),
        ("x-proxied-https", "on"),
        ("x-forwarded", "for=10.9.9.9"),
        ("forwarded-for", "10.9.9.9"),
        ("x-original-uri", "/admin"),
        ("fly-client-ip", "10.9.9.9"),
        ("x-envoy-external-address", "10.9.9.9"),
        // Baggage one entry per header (Jaeger, OpenTracing) and in Jaeger's own header.
        ("uberctx-account.id", "acc_victim"),
        ("uberctx_tenant", "acc_victim"),
        ("ot-baggage-account", "acc_victim"),
        ("baggage-account", "acc_victim"),
        ("jaeger-baggage", "account=acc_victim"),
        // The restrictions the gateway forwards for a restricted key (this one has none).
        ("x-api-key-scopes", "admin"),
        (
            "x_api_key_instance_ids",
            "3fa85f64-5717-4562-b3fc-2c963f66afa6",
        ),
        ("x_custom_header", "kept"),
    ];
    let seen = echoed(&gw.get("/api/v1/messages", &sent));
    let headers = seen["headers"].as_object().unwrap();
    let mut names: Vec<&str> = headers.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "host",
            "traceparent",
            "x-account-id",
            "x-api-key-id",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-request-id",
            "x_custom_header"
        ],
        "{headers:?}"
    );
    assert_eq!(headers["x-account-id"], "acme");
}

#[test]
fn key_management_inputs_are_bounded() {
    let gw = Gateway::start();
    gw.put_account("acme", "pro", "active");
    let ids: Vec<String> = (0..101)
        .map(|i| format!("3fa85f64-5717-4562-b3fc-{i:012x}"))
        .collect();
    let r = gw.admin_call(
        "POST",
        "/admin/v1/accounts/acme/keys",
        Some(json!({"name": "many", "instanceIds": ids})),
    );
    assert_refused(&r, 400, "BAD_REQUEST", "At most 100 instanceIds per key");
    let r = gw.admin_call(
        "POST",
        "/admin/v1/accounts/acme/keys",
        Some(json!({"name": "enough", "instanceIds": &ids[..100]})),
    );
    assert_eq!(r.status, 201, "{}", r.text());

    // A routes.toml that declares no scopes still refuses every scope.
    let gw = Gateway::start_with(Setup::new().route_policies("[[route]]\nprefix = \"/api/v1/\"\n"));
    gw.put_account("acme", "pro", "active");
    let r = gw.admin_call(
        "POST",
        "/admin/v1/accounts/acme/keys",
        Some(json!({"name": "x", "scopes": ["messages:send"]})),
    );
    assert_refused(&r, 400, "BAD_REQUEST", "Unknown scope \"messages:send\"");
}

#[test]
fn console_key_writes_are_limited_per_account() {
    let gw = Gateway::start();
    gw.put_account("acme", "plus", "active");
    gw.put_account("other", "plus", "active");
    let auth = format!("Bearer {}", gw.token("acme", 3600));
    let h = [("authorization", auth.as_str())];
    let create = |h: &[(&str, &str)]| gw.send("POST", "/api/api-keys", h, Some(br#"{"name":"k"}"#));
    // The plan's whole cap (10 on "plus") in one go, and the truthful answer for one more.
    let ids: Vec<String> = (0..10)
        .map(|_| {
            let r = create(&h);
            assert_eq!(r.status, 201);
            r.json().unwrap()["id"].as_str().unwrap().to_owned()
        })
        .collect();
    let r = create(&h);
    assert_refused(
        &r,
        403,
        "API_KEY_LIMIT_REACHED",
        "API key limit reached: the plan allows 10 active key(s)",
    );
    // Every key revoked at once, and every one made again: creations and revocations (even
    // refused ones) share the account's bucket, ten a minute, forty at once with the shipped
    // plans (three times the largest cap, 10, plus 10).
    for id in &ids {
        let r = gw.send("DELETE", &format!("/api/api-keys/{id}"), &h, None);
        assert_eq!(r.status, 200);
    }
    let again: Vec<String> = (0..10)
        .map(|_| {
            let r = create(&h);
            assert_eq!(r.status, 201, "{}", r.text());
            r.json().unwrap()["id"].as_str().unwrap().to_owned()
        })
        .collect();
    // 31 changes so far; nine more, refused ones too, then the limit.
    assert_eq!(
        gw.send("DELETE", "/api/api-keys/key_nope", &h, None).status,
        404
    );
    for _ in 0..8 {
        assert_eq!(create(&h).status, 403);
    }
    let r = create(&h);
    assert_refused(
        &r,
        429,
        "TOO_MANY_REQUESTS",
        "Too many API key changes for this account: at most 10 a minute",
    );
    assert_eq!(r.header("retry-after"), Some("6"));
    assert_eq!(
        gw.get("/api/api-keys", &h).status,
        200,
        "reading has its own limit"
    );
    let other = format!("Bearer {}", gw.token("other", 3600));
    assert_eq!(create(&[("authorization", &other)]).status, 201);
    // Two changes more after 12 s: a key revoked, one made.
    gw.clock.advance_ms(12_000);
    let r = gw.send("DELETE", &format!("/api/api-keys/{}", again[0]), &h, None);
    assert_eq!(r.status, 200);
    assert_eq!(create(&h).status, 201, "past the limit again");
}

/// A listing reads every record the account keeps: sixty in a burst, then one a second (60 a
/// minute) per account and node. Another account's listings are its own.
#[test]
fn console_key_listings_are_limited_per_account() {
    let gw = Gateway::start();
    gw.put_account("acme", "pro", "active");
    gw.put_account("other", "pro", "active");
    let auth = format!("Bearer {}", gw.token("acme", 3600));
    let list = |auth: &str| gw.get("/api/api-keys", &[("authorization", auth)]);
    for _ in 0..60 {
        assert_eq!(list(&auth).status, 200);
    }
    let r = list(&auth);
    assert_refused(
        &r,
        429,
        "TOO_MANY_REQUESTS",
        "Too many API key listings for this account: at most 60 a minute",
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(
        list(&format!("Bearer {}", gw.token("other", 3600))).status,
        200
    );
    gw.clock.advance_ms(1_000);
    assert_eq!(list(&auth).status, 200);
}

/// A key's name shows as itself (no control or text-direction characters, which could make it
/// show as another in a dashboard), and a scope or instance named twice is kept once.
#[test]
fn key_names_show_as_themselves_and_repeats_are_kept_once() {
    let gw = Gateway::start();
    gw.put_account("acme", "pro", "active");
    // JSON escapes, decoded by the parser.
    for name in [
        r"prod\u202eyek",
        r"a\u0007b",
        r"x\u2066y",
        r"tab\tname",
        r"ad\u200bmin",
        r"\ufeffprod",
        r"a\u2028b",
    ] {
        let body = format!(r#"{{"name":"{name}"}}"#);
        let r = gw.admin_call(
            "POST",
            "/admin/v1/accounts/acme/keys",
            Some(serde_json::from_str(&body).unwrap()),
        );
        assert_error(
            &r,
            400,
            "BAD_REQUEST",
            "name must be 1 to 100 characters, without control, invisible or text-direction characters",
        );
    }
    let r = gw.admin_call(
        "POST",
        "/admin/v1/accounts/acme/keys",
        Some(json!({
            "name": "caf\u{e9} \u{1F680}",
            "scopes": ["messages:read", "messages:send", "messages:read"],
            "instanceIds": [A, B, A, A],
        })),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json().unwrap();
    assert_eq!(created["name"], "caf\u{e9} \u{1F680}");
    assert_eq!(created["scopes"], json!(["messages:read", "messages:send"]));
    assert_eq!(created["instanceIds"], json!([A, B]));
}

#[test]
fn the_admin_listener_never_drains_an_unbounded_body() {
    use std::io::{Read, Write};
    let gw = Gateway::start();
    let mut s = std::net::TcpStream::connect(gw.admin).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    // A body announced at 10 GB, never sent: the answer comes, then the connection closes.
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: 10000000000\r\n\r\nabc")
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with(r#"{"status":"ok"}"#), "{text}");
}

/// A key restricted to instance A, POSTing to the body-sourced send route.
fn post_send(gw: &Gateway, key: &str, headers: &[(&str, &str)], body: &str) -> HttpResponse {
    let mut all = vec![("x-api-key", key)];
    all.extend_from_slice(headers);
    gw.send("POST", "/api/v1/messages/send", &all, Some(body.as_bytes()))
}

/// The gateway reads an inspected body as UTF-8 JSON; a backend decodes it by its headers
/// first. A form body naming another instance past the JSON the gateway reads, UTF-7 JSON whose
/// second key decodes to `instanceId`, gzip: the bytes inspected would not be what the backend
/// reads, so they are refused.
#[test]
fn an_inspected_body_is_read_only_as_the_backend_reads_it() {
    let gw = Gateway::start();
    let key = restricted_key(&gw, &[], &[A]);
    let encoded = "instanceId is read from the JSON body: send it as Content-Type: \
                   application/json, UTF-8, without a Content-Encoding";
    let form = format!(r#"{{"instanceId":"{A}","x":"&instanceId={B}&"}}"#);
    for headers in [
        vec![("content-type", "application/x-www-form-urlencoded")],
        vec![("content-type", "multipart/form-data; boundary=x")],
        vec![("content-type", "text/plain")],
        vec![],
        vec![
            ("content-type", "application/json"),
            ("content-type", "application/json"),
        ],
    ] {
        let r = post_send(&gw, &key, &headers, &form);
        assert_refused(&r, 400, "BAD_REQUEST", encoded);
    }
    let utf7 = format!(r#"{{"instanceId":"{A}","instance+AEk-d":"{B}"}}"#);
    for headers in [
        vec![("content-type", "application/json; charset=utf-7")],
        vec![("content-type", "application/json; charset=utf-8; x=1")],
        vec![
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ],
    ] {
        let r = post_send(&gw, &key, &headers, &utf7);
        assert_refused(&r, 400, "BAD_REQUEST", encoded);
    }
    let body = format!(r#"{{"instanceId":"{A}"}}"#);
    for ct in ["application/json", "application/json; charset=UTF-8"] {
        let seen = echoed(&post_send(&gw, &key, &[("content-type", ct)], &body));
        assert_eq!(seen["body"], body.as_str());
    }
    // A key without restrictions is not held to any of this.
    let free = restricted_key(&gw, &[], &[]);
    echoed(&post_send(
        &gw,
        &free,
        &[("content-type", "application/x-www-form-urlencoded")],
        "a=1",
    ));
}

/// A POST body can carry `_method` (a form to Rack, Laravel and Symfony; JSON to Laravel): a
/// POST the policy granted would run as another method at the backend. A restricted key's POST
/// body must be JSON the gateway reads, without that field; other methods are not overridden.
#[test]
fn a_restricted_keys_post_body_may_not_override_its_method() {
    let (gw, key) = shipped_with_key(&["contacts:write"], &[]);
    let post = |ct: Option<&str>, body: &str| {
        let mut headers = vec![("x-api-key", key.as_str())];
        headers.extend(ct.map(|ct| ("content-type", ct)));
        gw.send("POST", "/api/v1/contacts", &headers, Some(body.as_bytes()))
    };
    let not_json = "A restricted key's POST body must be Content-Type: application/json, UTF-8, \
                    without a Content-Encoding: a body can carry a method override (_method)";
    for ct in [
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
        Some("application/json; charset=utf-16"),
    ] {
        assert_refused(&post(ct, "_method=GET"), 400, "BAD_REQUEST", not_json);
    }
    let in_body = "The request body has a _method field: method overrides are refused";
    for body in [
        r#"{"_method":"GET","name":"x"}"#,
        r#"{"name":"x","_METHOD":"GET"}"#,
        r#"{"\u005fmethod":"GET"}"#,
        r#"{"_method":["GET"]}"#,
    ] {
        let r = post(Some("application/json"), body);
        assert_refused(&r, 400, "BAD_REQUEST", in_body);
    }
    assert_refused(
        &post(Some("application/json"), "[1]"),
        400,
        "BAD_REQUEST",
        "The request body is not a JSON object",
    );
    let body = r#"{"name":"x","method":"sms"}"#;
    let seen = echoed(&post(Some("application/json"), body));
    assert_eq!(seen["body"], body);
    // A chunked POST that turns out empty carries nothing to override with.
    let empty = format!(
        "POST /api/v1/contacts HTTP/1.1\r\nhost: gw\r\nx-api-key: {key}\r\n\
         transfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    echoed(&gw.connect().raw(empty.as_bytes()).unwrap());
    // Only POST is overridden: a PATCH keeps its media type and body as sent.
    let seen = echoed(&gw.send(
        "PATCH",
        "/api/v1/contacts/7",
        &[
            ("x-api-key", &key),
            ("content-type", "application/merge-patch+json"),
        ],
        Some(br#"{"_method":"GET"}"#),
    ));
    assert_eq!(seen["method"], "PATCH");
}

/// On a route whose instance is a path segment, a backend may take the instance from the query
/// or the body instead (Laravel's `$request->instanceId` prefers input to the route parameter,
/// Spring binds a request parameter over a URI variable): a restricted key's request may name
/// it in neither, and its body, on any method, must be plain JSON.
#[test]
fn a_path_sourced_instance_is_named_nowhere_else() {
    let (gw, key) = shipped_with_key(&[], &[A]);
    let send = |method: &str, path: &str, ct: Option<&str>, body: Option<&str>| {
        let mut headers = vec![("x-api-key", key.as_str())];
        headers.extend(ct.map(|ct| ("content-type", ct)));
        gw.send(method, path, &headers, body.map(str::as_bytes))
    };
    let mine = format!("/api/v1/instances/{A}");
    let in_query = "The query string names instanceId too: it could be read instead of the path";
    for query in [
        format!("instanceId={B}"),
        format!("instance_id={B}"),
        format!("x=1&instanceId%5B%5D={B}"),
        format!("INSTANCEID={A}"),
    ] {
        let r = send("GET", &format!("{mine}/qr?{query}"), None, None);
        assert_refused(&r, 400, "BAD_REQUEST", in_query);
    }
    let in_body = "The request body names instanceId too: it could be read instead of the path";
    for method in ["PATCH", "PUT", "DELETE", "POST"] {
        for body in [
            format!(r#"{{"instanceId":"{B}"}}"#),
            format!(r#"{{"name":"x","settings":{{"instance_id":"{B}"}}}}"#),
        ] {
            let r = send(method, &mine, Some("application/json"), Some(&body));
            assert_refused(&r, 400, "BAD_REQUEST", in_body);
        }
        let r = send(
            method,
            &mine,
            Some("application/x-www-form-urlencoded"),
            Some(&format!("instanceId={B}")),
        );
        assert_refused(
            &r,
            400,
            "BAD_REQUEST",
            "instanceId is read from the path: a restricted key's body must be Content-Type: \
             application/json, UTF-8, without a Content-Encoding, and not name it",
        );
        let seen = echoed(&send(
            method,
            &mine,
            Some("application/json"),
            Some(r#"{"name":"x"}"#),
        ));
        assert_eq!(seen["method"], method);
        assert_eq!(seen["body"], r#"{"name":"x"}"#);
    }
    echoed(&send("GET", &format!("{mine}/qr?size=2"), None, None));
    // The key's other restriction still holds: another instance in the path.
    let r = send("GET", &format!("/api/v1/instances/{B}/qr"), None, None);
    assert_refused(
        &r,
        403,
        "FORBIDDEN",
        &format!("This API key may not use instance {B}"),
    );
    // Keys without restrictions are never held up by any of this.
    let free = restricted_key(&gw, &[], &[]);
    let r = gw.send(
        "PATCH",
        &format!("{mine}?instanceId={B}"),
        &[("x-api-key", &free), ("content-type", "text/plain")],
        Some(b"instanceId=x"),
    );
    echoed(&r);
}

/// A body the gateway reads itself (a restricted key's, before its rate limit is charged; the
/// small body of a refused request, drained to keep the connection) must come whole within
/// three body idle timeouts: trickled a byte at a time, each within the idle timeout, it would
/// hold its buffer, or the answer, for as long as the client liked.
#[test]
fn a_body_the_gateway_reads_must_come_whole_in_three_idle_timeouts() {
    use std::io::{Read, Write};
    let gw = Gateway::start_with(
        Setup::new()
            .route_policies(SHIPPED_ROUTES)
            .server("body_idle_timeout = \"1s\""),
    );
    let key = restricted_key(&gw, &[], &[A]);
    let unknown = format!("msgf_live_{}", "0".repeat(64));
    let trickled = |key: &str| {
        let mut s = std::net::TcpStream::connect(gw.proxy).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_millis(400)))
            .unwrap();
        s.write_all(
            format!(
                "POST /api/v1/messages/send HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\n\
                 content-type: application/json\r\ncontent-length: 100\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        // A byte every 400 ms (each pause within the 1 s idle timeout), until an answer.
        let mut got = Vec::new();
        let mut sent = 0;
        while got.is_empty() && sent < 99 && s.write_all(b" ").is_ok() {
            sent += 1;
            let mut buf = [0u8; 4096];
            if let Ok(n) = s.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
        assert!(sent < 20, "answered only after {sent} bytes");
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let _ = s.read_to_end(&mut got);
        String::from_utf8_lossy(&got).into_owned()
    };
    let text = trickled(&key);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(
        text.ends_with(
            r#"{"error":{"code":"BAD_REQUEST","message":"Could not read the request body"}}"#
        ),
        "{text}"
    );
    let text = trickled(&unknown);
    assert!(text.starts_with("HTTP/1.1 401 "), "{text}");
    assert!(
        text.ends_with(
            r#"{"error":{"code":"UNAUTHORIZED","message":"Invalid or revoked API key"}}"#
        ),
        "{text}"
    );
}

/// Names as other parsers read them: qs and Rack take `[instanceId]` for `instanceId`, PHP
/// drops leading spaces and reads `.` as `_`, a snake_case converter takes `instance_id`.
#[test]
fn parameters_count_under_every_name_a_backend_reads() {
    let gw = Gateway::start();
    let key = restricted_key(&gw, &[], &[A]);
    let get = |query: String| read_messages(&gw, &key, &query);
    let twice = "The query parameter instanceId is given more than once";
    for query in [
        format!("[instanceId]={B}&instanceId={A}"),
        format!("]instanceId[0]={B}&instanceId={A}"),
        format!("instanceId={A}&+instanceId={B}"),
        format!("instanceId={A}&instance_id={B}"),
        format!("instanceId={A}&Instance-Id={B}"),
        format!("instanceId={A}&instanceId%00={B}"),
    ] {
        assert_refused(&get(query), 400, "BAD_REQUEST", twice);
    }
    echoed(&get(format!("instanceId={A}&instanceIdx=1&x_instanceId=2")));
    let body = format!(r#"{{"instanceId":"{A}","instance_id":"{B}"}}"#);
    let r = call(&gw, "POST", "/api/v1/messages/send", &key, Some(&body));
    assert_refused(
        &r,
        400,
        "BAD_REQUEST",
        "The JSON field instanceId is given more than once",
    );
    // PHP reads `.method` and `[method` as `_method`; Rack reads `[_method]` as `_method`.
    for query in [
        ".method=GET",
        "%2Emethod=GET",
        "[method=GET",
        "[_method]=GET",
        "_method%00=GET",
    ] {
        let r = call(
            &gw,
            "POST",
            &format!("/api/v1/messages/send?{query}"),
            &key,
            Some(&format!(r#"{{"instanceId":"{A}"}}"#)),
        );
        assert_refused(
            &r,
            400,
            "BAD_REQUEST",
            "The query string has a _method parameter: method overrides are refused",
        );
    }
}

/// `Upgrade` (h2c, WebSocket) and the other hop-by-hop headers never go upstream: a backend
/// that accepted an upgrade would tunnel the connection past every check, and a `Connection`
/// naming the identity header would have a proxy behind the gateway drop it. (pingora 0.9.1's
/// default upstream request policy strips most of these itself, but puts `Connection: Upgrade`
/// back for a WebSocket upgrade: the second case holds only through the gateway's own list.)
#[test]
fn protocol_upgrades_and_hop_by_hop_headers_stay_at_the_gateway() {
    let gw = Gateway::start();
    let (key, _) = gw.account_with_key("acme", "pro");
    for sent in [
        vec![
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
        ],
        vec![
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
        ],
        vec![
            ("connection", "keep-alive, x-account-id, x-api-key-id"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
        ],
    ] {
        let mut headers = vec![("x-api-key", key.as_str())];
        headers.extend(sent);
        let seen = echoed(&gw.get("/api/v1/messages", &headers));
        let seen = seen["headers"].as_object().unwrap();
        for name in [
            "connection",
            "upgrade",
            "http2-settings",
            "keep-alive",
            "proxy-connection",
        ] {
            assert!(!seen.contains_key(name), "{name} went upstream: {seen:?}");
        }
        assert_eq!(seen["x-account-id"], "acme");
    }
}

/// `/api/V1/…` matches the console's `/api/` route while `/api/v1/…` is the public API: a
/// backend that routes without regard to case would serve the public API's call under a
/// console token, unmetered. Refused; case inside one route stays the client's.
#[test]
fn a_path_whose_letter_case_picks_another_route_is_refused() {
    let gw = Gateway::start();
    let auth = format!("Bearer {}", gw.token("acme", 3600));
    for path in ["/api/V1/messages/send", "/api/v1/../V1/messages"] {
        let r = gw.get(path, &[("authorization", &auth)]);
        assert_refused(
            &r,
            400,
            "BAD_REQUEST",
            "Ambiguous request path: it contains upper-case letters: in lower case it \
             matches another route",
        );
    }
    echoed(&gw.get("/api/Dashboard", &[("authorization", &auth)]));
    let (key, _) = gw.account_with_key("acme", "pro");
    let seen = echoed(&gw.get(
        "/api/v1/instances/3FA85F64-5717-4562-B3FC-2C963F66AFA6/status",
        &[("x-api-key", &key)],
    ));
    assert_eq!(
        seen["uri"],
        "/api/v1/instances/3FA85F64-5717-4562-B3FC-2C963F66AFA6/status"
    );
}

/// The body that follows a `100 Continue` is a body, not the next request's head: it may take
/// longer than `server.header_timeout` (each read within `body_idle_timeout`). Before, the
/// interim answer made the edge stream watch the body as a head and cut it at the deadline.
#[test]
fn a_body_after_100_continue_is_not_held_to_the_head_deadline() {
    use std::time::Duration;
    let gw = Gateway::start_with(Setup::new().server("header_timeout = \"1s\""));
    let key = restricted_key(&gw, &[], &[A]);
    let body = format!(r#"{{"instanceId":"{A}","text":"slow"}}"#);
    let head = format!(
        "POST /api/v1/messages/send HTTP/1.1\r\nhost: gw\r\nx-api-key: {key}\r\n\
         content-type: application/json\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut conn = gw.connect();
    assert_eq!(conn.raw(head.as_bytes()).unwrap().status, 100);
    // Eight pieces, 250 ms apart: 2 s in all, twice the head deadline.
    let pieces: Vec<&[u8]> = body.as_bytes().chunks(body.len().div_ceil(8)).collect();
    let (last, first) = pieces.split_last().unwrap();
    for piece in first {
        conn.write_raw(piece).unwrap();
        std::thread::sleep(Duration::from_millis(250));
    }
    let seen = echoed(&conn.raw(last).unwrap());
    assert_eq!(seen["body"], body.as_str());
}

/// A client that asks before sending its body (`Expect: 100-continue`, curl's habit for large
/// bodies) gets `100 Continue` where the gateway reads the body itself, and its body is
/// forwarded without the question (the upstream's own `100` would come a second time). Refused
/// before the body, it gets the refusal at once and the connection closes.
#[test]
fn a_client_expecting_100_continue_is_answered_where_the_gateway_reads_the_body() {
    let gw = Gateway::start();
    let key = restricted_key(&gw, &[], &[A]);
    let body = format!(r#"{{"instanceId":"{A}"}}"#);
    let head = format!(
        "POST /api/v1/messages/send HTTP/1.1\r\nhost: gw\r\nx-api-key: {key}\r\n\
         content-type: application/json\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut conn = gw.connect();
    let interim = conn.raw(head.as_bytes()).unwrap();
    assert_eq!(interim.status, 100);
    let r = conn.raw(body.as_bytes()).unwrap();
    let seen = echoed(&r);
    assert_eq!(seen["body"], body.as_str());
    assert!(seen["headers"].get("expect").is_none(), "{seen}");

    let refused = head.replace(&key, &format!("msgf_live_{}", "0".repeat(64)));
    let mut conn = gw.connect();
    let r = conn.raw(refused.as_bytes()).unwrap();
    assert_refused(&r, 401, "UNAUTHORIZED", "Invalid or revoked API key");
    assert_eq!(r.header("connection"), Some("close"));
}

/// A restricted key's body is read before admission, for as long as its client takes. A key
/// revoked, or an account whose subscription ended, while the body was on its way is refused
/// once the body has come (both are looked up again), not admitted on what was true when the
/// head arrived. The `100 Continue` proves the gateway had passed the head and was reading
/// the body when the change was made.
fn what_changed_while_a_body_arrived_is_seen(backend: Backend) {
    let gw = Gateway::on(backend);
    gw.put_account("acme", "pro", "active");
    let created = gw
        .admin_call(
            "POST",
            "/admin/v1/accounts/acme/keys",
            Some(json!({"name": "restricted", "instanceIds": [A]})),
        )
        .json()
        .unwrap();
    let key = created["key"].as_str().unwrap();
    let body = format!(r#"{{"instanceId":"{A}"}}"#);
    let head = format!(
        "POST /api/v1/messages/send HTTP/1.1\r\nhost: gw\r\nx-api-key: {key}\r\n\
         content-type: application/json\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let send_after = |change: &dyn Fn()| {
        let mut conn = gw.connect();
        assert_eq!(conn.raw(head.as_bytes()).unwrap().status, 100);
        change();
        conn.raw(body.as_bytes()).unwrap()
    };

    echoed(&send_after(&|| {}));
    let r = send_after(&|| gw.put_account("acme", "pro", "inactive"));
    assert_refused(
        &r,
        403,
        "SUBSCRIPTION_INACTIVE",
        "The account has no active subscription for this action",
    );
    gw.put_account("acme", "pro", "active");
    let r = send_after(&|| {
        let path = format!(
            "/admin/v1/accounts/acme/keys/{}",
            created["id"].as_str().unwrap()
        );
        assert_eq!(gw.admin_call("DELETE", &path, None).status, 200);
    });
    assert_refused(&r, 401, "UNAUTHORIZED", "Invalid or revoked API key");
}

/// With `server.hosts`, a request naming another host (in `Host`, or the authority of an
/// absolute-form target) is refused before anything else: a backend that builds a password
/// reset link from `Host` would build it to the client's choice. Letter case and the port do
/// not matter; a trailing dot or a longer name does.
#[test]
fn requests_for_hosts_the_gateway_does_not_serve_are_refused() {
    let gw = Gateway::start_with(Setup::new().server("hosts = [\"api.msgflash.test\"]"));
    let reset = |host: &str| {
        let req = format!(
            "POST /api/auth/password-reset HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}"
        );
        gw.connect().raw(req.as_bytes()).unwrap()
    };
    for host in ["api.msgflash.test", "API.MsgFlash.TEST:8443"] {
        let seen = echoed(&reset(host));
        assert_eq!(seen["headers"]["host"], host);
    }
    for host in [
        "attacker.example",
        "api.msgflash.test.",
        "api.msgflash.test.attacker.example",
        "127.0.0.1",
    ] {
        assert_refused(&reset(host), 404, "NOT_FOUND", "No route for this host");
    }
    let absolute =
        b"GET http://attacker.example/api/auth/login HTTP/1.1\r\nhost: attacker.example\r\n\r\n";
    assert_refused(
        &gw.connect().raw(absolute).unwrap(),
        404,
        "NOT_FOUND",
        "No route for this host",
    );
    let no_host = b"GET /api/auth/login HTTP/1.0\r\n\r\n";
    assert_refused(
        &gw.connect().raw(no_host).unwrap(),
        404,
        "NOT_FOUND",
        "No route for this host",
    );
}

#[test]
fn server_hosts_are_host_names_without_ports() {
    let dir = tempfile::tempdir().unwrap();
    let (err, path) = config_errors(
        dir.path(),
        &Setup::new().server("hosts = [\"api.msgflash.test:443\", \"user@api.test\", \"\"]"),
    );
    let p = path.display();
    let at = |col: usize, host: &str| {
        format!("{p}:9:{col}: server.hosts: \"{host}\" is not a host name (use e.g. \"api.example.com\", no port)")
    };
    assert_eq!(
        err,
        [
            at(10, "api.msgflash.test:443"),
            at(35, "user@api.test"),
            at(52, "")
        ]
        .join("\n")
    );
}
