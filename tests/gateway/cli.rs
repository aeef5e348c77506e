//! SPEC §8: the real binary's check, keys and jwt commands.

use crate::support::*;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_msgflash-gateway"))
}

/// `msgflash-gateway check -c <config>`, without secrets in the environment.
fn check(config: &std::path::Path) -> std::process::Output {
    bin().args(["check", "-c"]).arg(config).output().unwrap()
}

#[test]
fn check_accepts_the_shipped_configuration() {
    let out = bin()
        .args([
            "check",
            "-c",
            concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.toml"),
        ])
        .env("MSGFLASH_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("MSGFLASH_JWT_SECRET", JWT_SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.ends_with("gateway.toml: ok (3 routes, 2 upstreams, 4 plans, 10 route policies)\n"),
        "{stdout}"
    );
}

#[test]
fn check_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("p")).unwrap();
    std::fs::write(
        dir.path().join("p/plans.toml"),
        "[plans.free]\nmax_keys = 1\nmonthly_requests = 10\nburst = 0\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("gateway.toml"),
        "[server]\nlisten = \"0.0.0.0:80800\"\n[admin]\nlisten = \"127.0.0.1:9090\"\n[policies]\ndir = \"p\"\n\
         [upstreams.api]\naddresses = [\"127.0.0.1:1\"]\nread_timeout = \"soon\"\n\
         [[routes]]\nprefix = \"/api/v1/\"\nauth = \"apikey\"\nupstream = \"apí\"\n\
         [[routes]]\nprefix = \"/api/\"\nauth = \"jwt\"\nupstream = \"api\"\nforward_api_key = true\n",
    )
    .unwrap();
    let out = check(&dir.path().join("gateway.toml"));
    assert_eq!(out.status.code(), Some(1));
    let d = dir.path().display();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "msgflash-gateway: invalid configuration:\n\
             {d}/gateway.toml:2:10: server.listen: \"0.0.0.0:80800\" is not an IP:port address\n\
             {d}/gateway.toml:9:16: upstreams.api.read_timeout: \"soon\" is not a duration (use e.g. \"250ms\", \"5s\", \"1m\")\n\
             {d}/gateway.toml:12:8: routes[0].auth: unknown auth mode \"apikey\" (expected \"api_key\", \"jwt\" or \"open\")\n\
             {d}/gateway.toml:13:12: routes[0].upstream: unknown upstream \"apí\"\n\
             {d}/gateway.toml:16:8: routes[1].forward_api_key: only an api_key route can forward the key it checked\n\
             {d}/p/plans.toml:4:9: plans.free.burst: must be at least 1, got 0\n"
        )
    );

    std::fs::write(
        dir.path().join("gateway.toml"),
        "[server]\nlisten = \"0.0.0.0:8080\"\nthreds = 2\n",
    )
    .unwrap();
    let out = check(&dir.path().join("gateway.toml"));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!("msgflash-gateway: invalid configuration:\n{d}/gateway.toml:3:1: server.threds: unknown field `threds`")),
        "{stderr}"
    );
}

#[test]
fn keys_and_jwt_commands_drive_a_running_gateway() {
    let gw = Gateway::start();
    gw.put_account("acme", "pro", "active");
    let run = |args: &[&str]| {
        let out = bin()
            .arg("-c")
            .arg(gw.config_path())
            .args(args)
            .env("TEST_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("TEST_JWT_SECRET", JWT_SECRET)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let key = run(&["keys", "create", "acme", "--name", "ci"]);
    assert!(
        key.starts_with("msgf_live_") && key.len() == 75 && key.ends_with('\n'),
        "{key:?}"
    );
    let key = key.trim();
    echoed(&gw.get("/api/v1/x", &[("x-api-key", key)]));
    let list: serde_json::Value = serde_json::from_str(&run(&["keys", "list", "acme"])).unwrap();
    let id = list["keys"][0]["id"].as_str().unwrap().to_owned();
    run(&["keys", "revoke", "acme", &id]);
    assert_eq!(gw.get("/api/v1/x", &[("x-api-key", key)]).status, 401);
    let shown: serde_json::Value =
        serde_json::from_str(&run(&["accounts", "show", "acme"])).unwrap();
    assert_eq!(shown["keys"]["active"], 0);
    let token = run(&["jwt", "mint", "acme", "--sub", "u9"]);
    let seen = echoed(&gw.get(
        "/api/x",
        &[("authorization", &format!("Bearer {}", token.trim()))],
    ));
    assert_eq!(seen["headers"]["x-user-id"], "u9");
    // The flags also read as the admin API's fields name them; --ttl takes days and seconds.
    let record: serde_json::Value = serde_json::from_str(&run(&[
        "keys",
        "create",
        "acme",
        "--name",
        "scoped",
        "--scopes",
        "messages:send,messages:read",
        "--instance-ids",
        "3fa85f64-5717-4562-b3fc-2c963f66afa6",
        "--json",
    ]))
    .unwrap();
    assert_eq!(
        record["scopes"],
        serde_json::json!(["messages:send", "messages:read"])
    );
    assert_eq!(
        record["instanceIds"],
        serde_json::json!(["3fa85f64-5717-4562-b3fc-2c963f66afa6"])
    );
    let shown: serde_json::Value = serde_json::from_str(&run(&[
        "accounts",
        "put",
        "acme",
        "--quota-anchor-day",
        "15",
    ]))
    .unwrap();
    assert_eq!(shown["quotaAnchorDay"], 15);
    for ttl in ["1d", "3600", "90m"] {
        let token = run(&["jwt", "mint", "acme", "--ttl", ttl]);
        echoed(&gw.get(
            "/api/x",
            &[("authorization", &format!("Bearer {}", token.trim()))],
        ));
    }
    // An argument that is no id cannot name another resource through the path it goes into.
    let (_, other_key) = gw.account_with_key("other", "pro");
    for args in [
        &[
            "keys",
            "revoke",
            "acme",
            &format!("../../other/keys/{other_key}"),
        ][..],
        &["keys", "revoke", "..", "x"],
        &["accounts", "show", "acme/keys"],
    ] {
        let out = bin()
            .arg("-c")
            .arg(gw.config_path())
            .args(args)
            .env("TEST_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("is not an id: ids are 1 to 128 characters of A-Z a-z 0-9 . _ : -"),
            "{err}"
        );
    }
    let other = gw
        .admin_call("GET", "/admin/v1/accounts/other", None)
        .json()
        .unwrap();
    assert_eq!(other["keys"]["active"], 1, "nothing revoked");
}

#[test]
fn check_names_accounts_whose_plan_is_gone() {
    let mut gw = Gateway::start();
    gw.put_account("small", "tiny", "active");
    gw.put_account("acme", "pro", "active");
    if let Some(r) = gw.running.take() {
        r.stop();
    }
    let plans = gw.dir.path().join("policies/plans.toml");
    let text = std::fs::read_to_string(&plans).unwrap();
    std::fs::write(&plans, text.replace("[plans.tiny]", "[plans.micro]")).unwrap();
    let out = bin()
        .args(["check", "-c"])
        .arg(gw.config_path())
        .env("TEST_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("TEST_JWT_SECRET", JWT_SECRET)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "msgflash-gateway: invalid configuration:\n{}:2:1: accounts.small.plan: unknown plan \"tiny\"\n",
            gw.dir.path().join("data/store.jsonl").display()
        )
    );
}

/// Each header the gateway writes upstream has a name of its own (a backend reading `x_request_id`
/// as `x-request-id` would take the request id for the account), and none is the gateway's; no
/// strip list or prefix takes away a header forwarded requests need.
#[test]
fn forwarded_header_names_are_distinct() {
    let dir = tempfile::tempdir().unwrap();
    let config = minimal_config(
        dir.path(),
        "[forward]\naccount_id_header = \"X_Request_Id\"\n\
         key_instances_header = \"x-api-key-scopes\"\nuser_id_header = \"traceparent\"\n\
         strip_header_prefixes = [\"uber ctx\", \"content-\"]\nstrip_request_headers = [\"Host\"]",
    );
    let out = check(&config);
    assert_eq!(out.status.code(), Some(1));
    let d = dir.path().display();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "msgflash-gateway: invalid configuration:\n\
             {d}/gateway.toml:12:26: forward.strip_header_prefixes: \"uber ctx\" is not a valid header name\n\
             {d}/gateway.toml:11:18: forward.user_id_header: \"traceparent\" is a header the gateway sets or removes itself\n\
             {d}/gateway.toml:9:21: forward.account_id_header: \"X_Request_Id\" is forward.request_id_header too: each header the gateway writes needs its own name\n\
             {d}/gateway.toml:10:24: forward.key_instances_header: \"x-api-key-scopes\" is forward.key_scopes_header too: each header the gateway writes needs its own name\n\
             {d}/gateway.toml:13:26: forward.strip_request_headers: \"Host\" would remove host, which forwarded requests need\n\
             {d}/gateway.toml:12:38: forward.strip_header_prefixes: \"content-\" would remove content-length, which forwarded requests need\n"
        )
    );
}

/// A routes.toml entry that would hold keys to a scope, an instance or a subscription on paths
/// only console tokens or open routes reach is enforced nowhere: `check` says so (and still
/// accepts it), while one covering an api_key route too says nothing.
#[test]
fn check_warns_of_key_rules_on_routes_without_keys() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("p")).unwrap();
    std::fs::write(
        dir.path().join("p/plans.toml"),
        "[plans.free]\nmax_keys = 1\nmonthly_requests = 10\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("p/routes.toml"),
        "scopes = [\"a\"]\n\
         [[route]]\nprefix = \"/api/instances\"\nscope = \"a\"\n\
         [[route]]\nprefix = \"/api/auth/login\"\nrequire_subscription = true\n\
         [[route]]\nprefix = \"/api/\"\nscope = \"a\"\n\
         [[route]]\nprefix = \"/api/auth/\"\nip_rate_per_second = 1\nip_burst = 1\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("gateway.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [policies]\ndir = \"p\"\n[jwt]\nissuer = \"i\"\naudience = \"a\"\n\
         [upstreams.api]\naddresses = [\"127.0.0.1:1\"]\n\
         [[routes]]\nprefix = \"/api/v1/\"\nauth = \"api_key\"\nupstream = \"api\"\n\
         [[routes]]\nprefix = \"/api/auth/\"\nauth = \"open\"\nupstream = \"api\"\n\
         [[routes]]\nprefix = \"/api/\"\nauth = \"jwt\"\nupstream = \"api\"\n",
    )
    .unwrap();
    let out = bin()
        .args(["check", "-c"])
        .arg(dir.path().join("gateway.toml"))
        .env("MSGFLASH_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("MSGFLASH_JWT_SECRET", JWT_SECRET)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let p = dir.path().join("p/routes.toml");
    let p = p.display();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "{p}:6:10: warning: route[1] (\"/api/auth/login\"): its scope, instance and subscription rules are not enforced: an open route serves these paths, and only API keys carry them\n\
             {p}:3:10: warning: route[0] (\"/api/instances\"): its scope, instance and subscription rules are not enforced: a jwt route serves these paths, and only API keys carry them\n"
        )
    );
}

/// `[admin]` may be left out: the admin API then listens on 127.0.0.1:9090 (SPEC §7).
#[test]
fn the_admin_listener_has_a_default() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[policies]\ndir = \"{}\"\n\
             [jwt]\nissuer = \"i\"\naudience = \"a\"\n\
             [upstreams.api]\naddresses = [\"127.0.0.1:1\"]\n\
             [[routes]]\nprefix = \"/api/v1/\"\nauth = \"api_key\"\nupstream = \"api\"\n",
            concat!(env!("CARGO_MANIFEST_DIR"), "/lua-free-policies")
        ),
    )
    .unwrap();
    let out = check(&config);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Said so where the listeners are: 9090 is taken by the admin API.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("127.0.0.1:0", "127.0.0.1:9090"),
    )
    .unwrap();
    let out = check(&config);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("overlaps"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A minimal valid gateway.toml (shipped policies) with `jwt` as its [jwt] table.
fn minimal_config(dir: &std::path::Path, jwt: &str) -> std::path::PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [policies]\ndir = \"{}\"\n[jwt]\n{jwt}\n\
             [upstreams.api]\naddresses = [\"127.0.0.1:1\"]\n\
             [[routes]]\nprefix = \"/api/v1/\"\nauth = \"api_key\"\nupstream = \"api\"\n",
            concat!(env!("CARGO_MANIFEST_DIR"), "/lua-free-policies")
        ),
    )
    .unwrap();
    path
}

#[test]
fn weak_secrets_are_refused_by_check_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = minimal_config(dir.path(), "issuer = \"msgflash\"\naudience = \"console\"");
    for (admin, jwt, problems) in [
        (
            "short-admin-token",
            "0123456789abcdef0123456789abcdef",
            "the admin token (MSGFLASH_ADMIN_TOKEN) is too short: at least 24 bytes, got 17",
        ),
        (
            "0123456789abcdef01234567",
            "change-me-jwt-secret-0123456789abcdef",
            "the JWT HMAC secret (MSGFLASH_JWT_SECRET) contains the placeholder \"change-me\": generate one, e.g. $(openssl rand -hex 32)",
        ),
        (
            // As `kubectl create secret --from-file` leaves it: a request can never carry it.
            "0123456789abcdef01234567\n",
            "0123456789abcdef0123456789abcdef",
            "the admin token (MSGFLASH_ADMIN_TOKEN) is no header value a request can carry: it starts or ends with whitespace or holds a control byte (a trailing newline from a file?)",
        ),
        (
            "example-admin-token-0123456789",
            "0123456789abcdef0123456789abcde",
            "the admin token (MSGFLASH_ADMIN_TOKEN) contains the placeholder \"example\": generate one, e.g. $(openssl rand -hex 32)\n\
             the JWT HMAC secret (MSGFLASH_JWT_SECRET) is too short: at least 32 bytes, got 31",
        ),
    ] {
        let out = bin()
            .args(["check", "-c"])
            .arg(&config)
            .env("MSGFLASH_ADMIN_TOKEN", admin)
            .env("MSGFLASH_JWT_SECRET", jwt)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!("msgflash-gateway: invalid configuration:\n{problems}\n")
        );
        let out = bin()
            .args(["run", "-c"])
            .arg(&config)
            .env("MSGFLASH_ADMIN_TOKEN", admin)
            .env("MSGFLASH_JWT_SECRET", jwt)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.ends_with(&format!("{}\n", problems.replace('\n', "; "))),
            "{stderr}"
        );
    }
    // Long enough and no placeholder: a secret may hold "secret" or "dev".
    let out = bin()
        .args(["check", "-c"])
        .arg(&config)
        .env("MSGFLASH_ADMIN_TOKEN", "dev-admin-token-0123456789")
        .env("MSGFLASH_JWT_SECRET", "test-jwt-secret-0123456789abcdef")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_warns_when_tokens_are_not_bound_to_an_issuer_and_audience() {
    let dir = tempfile::tempdir().unwrap();
    let config = minimal_config(dir.path(), "algorithms = [\"HS256\"]");
    let out = bin()
        .args(["check", "-c"])
        .arg(&config)
        .env("MSGFLASH_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("MSGFLASH_JWT_SECRET", JWT_SECRET)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let c = config.display();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "{c}:7:1: warning: jwt.issuer is not set: console tokens from any issuer are accepted\n\
             {c}:7:1: warning: jwt.audience is not set: console tokens meant for any audience are accepted\n"
        )
    );
}

/// A minimal config (issuer and audience set) with `lines` first in its `[server]` table.
fn config_with_server(dir: &std::path::Path, lines: &str) -> std::path::PathBuf {
    let config = minimal_config(dir, "issuer = \"i\"\naudience = \"a\"");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("[server]\n", &format!("[server]\n{lines}")),
    )
    .unwrap();
    config
}

#[test]
fn a_keepalive_under_a_second_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_server(dir.path(), "keepalive_timeout = \"500ms\"\n");
    let out = check(&config);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "msgflash-gateway: invalid configuration:\n{}:2:21: server.keepalive_timeout: at least 1s (pingora takes whole seconds and reads 0 as \"never close\"), got \"500ms\"\n",
            config.display()
        )
    );
}

/// A body read for an instance and passed must not be cut on its way upstream by the bound
/// on forwarded bodies: the inspected limit may not exceed it.
#[test]
fn an_inspected_limit_over_the_body_limit_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_server(
        dir.path(),
        "max_body_bytes = 16384\nmax_inspected_body_bytes = 65536\n",
    );
    let out = check(&config);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "msgflash-gateway: invalid configuration:\n{}:3:28: server.max_inspected_body_bytes: at most server.max_body_bytes (16384), got 65536\n",
            config.display()
        )
    );
}

#[test]
fn check_validates_certificate_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = minimal_config(dir.path(), "issuer = \"i\"\naudience = \"a\"");
    let write_pair = |name: &str, expired: bool| {
        let mut params = rcgen::CertificateParams::new(vec!["api.test".to_owned()]).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(1999, 1, 1);
            params.not_after = rcgen::date_time_ymd(2000, 1, 1);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
    };
    write_pair("old", true);
    write_pair("other", false);
    let text = std::fs::read_to_string(&config).unwrap();
    let with_tls = |cert: &str, key: &str| {
        text.replace(
            "[server]\n",
            &format!("[server]\ntls = {{ listen = \"127.0.0.1:0\", certificates = [{{ cert = \"{cert}\", key = \"{key}\" }}] }}\n"),
        )
    };
    let run_check = || {
        bin()
            .args(["check", "-c"])
            .arg(&config)
            .env("MSGFLASH_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("MSGFLASH_JWT_SECRET", JWT_SECRET)
            .output()
            .unwrap()
    };
    let c = config.display();
    std::fs::write(&config, with_tls("old.pem", "old.key")).unwrap();
    let out = run_check();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("{c}:2:58: warning: old.pem has expired\n")
    );
    std::fs::write(&config, with_tls("old.pem", "other.key")).unwrap();
    let out = run_check();
    assert_eq!(out.status.code(), Some(1));
    let d = dir.path().display();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "msgflash-gateway: invalid configuration:\n{c}:2:58: server.tls.certificates: the key in {d}/other.key does not go with the certificate in {d}/old.pem\n"
        )
    );
}

/// `check` refuses what `run` could not start or would run broken: two listeners on one port,
/// a timeout of zero, a duration past a day, a public key that does not parse, a public-key
/// algorithm with no key to check it. Each is named by file, line and field.
#[test]
fn check_refuses_what_run_could_not_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.pem"), "not a key\n").unwrap();
    std::fs::write(
        dir.path().join("gateway.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:18080\"\nkeepalive_timeout = \"25h\"\n\
             [admin]\nlisten = \"0.0.0.0:18080\"\n\
             [store]\ntimeout = \"0ms\"\n\
             [policies]\ndir = \"{}\"\n\
             [jwt]\nalgorithms = [\"HS256\", \"RS256\", \"ES256\"]\n\
             public_keys = [{{ alg = \"RS256\", pem_file = \"bad.pem\" }}]\n\
             [upstreams.api]\naddresses = [\"127.0.0.1:1\"]\nconnect_timeout = \"0s\"\n\
             [[routes]]\nprefix = \"/api/v1/\"\nauth = \"api_key\"\nupstream = \"api\"\n",
            concat!(env!("CARGO_MANIFEST_DIR"), "/lua-free-policies")
        ),
    )
    .unwrap();
    let out = check(&dir.path().join("gateway.toml"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let d = dir.path().display();
    for line in [
        format!("{d}/gateway.toml:3:21: server.keepalive_timeout: must be at most 24h, got \"25h\""),
        format!("{d}/gateway.toml:5:10: admin.listen: 0.0.0.0:18080 overlaps server.listen: each listener needs its own address"),
        format!("{d}/gateway.toml:7:11: store.timeout: must be more than 0, got \"0ms\""),
        format!("{d}/gateway.toml:11:33: jwt.algorithms: \"ES256\" is allowed but no key checks it: add jwt.public_keys or jwt.jwks_file"),
        format!("{d}/gateway.toml:15:19: upstreams.api.connect_timeout: must be more than 0, got \"0s\""),
    ] {
        assert!(err.contains(&line), "{line}\nnot in:\n{err}");
    }
    assert!(
        err.contains(&format!(
            "{d}/gateway.toml:12:44: jwt.public_keys.pem_file: {d}/bad.pem: not a RS256 public key in PEM:"
        )),
        "{err}"
    );
    // No algorithm at all: every console token would be refused.
    let config = minimal_config(dir.path(), "algorithms = []");
    let out = check(&config);
    assert_eq!(out.status.code(), Some(1));
    let none = String::from_utf8_lossy(&out.stderr);
    let line = format!(
        "{d}/gateway.toml:8:14: jwt.algorithms: no algorithm allowed: every console token would be refused"
    );
    assert!(none.contains(&line), "{line}\nnot in:\n{none}");
}

/// A listening address that is taken stops `run` with the reason, before anything serves
/// (pingora would panic on that listener's thread alone and leave the rest up, ready).
#[test]
fn run_stops_when_an_address_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = minimal_config(dir.path(), "issuer = \"msgflash\"\naudience = \"console\"");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replacen("127.0.0.1:0", &addr.to_string(), 1)).unwrap();
    let out = bin()
        .args(["run", "-c"])
        .arg(&config)
        .env("MSGFLASH_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("MSGFLASH_JWT_SECRET", JWT_SECRET)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot listen on {addr}: ")), "{err}");
}
