//! Live reload (SIGHUP, POST /admin/v1/reload): atomic, refused when invalid, invisible to
//! traffic; plan changes take effect on the next request, usage carried over.

use crate::redis_server::RedisServer;
use crate::support::*;
use msgflash_gateway::clock::ManualClock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn policies_path(gw: &Gateway) -> std::path::PathBuf {
    gw.dir.path().join("policies/routes.toml")
}

#[test]
fn a_reload_applies_new_policies_and_an_invalid_one_changes_nothing() {
    let gw = Gateway::start();
    gw.put_account("acme", "pro", "active");
    let r = gw.admin_call(
        "POST",
        "/admin/v1/accounts/acme/keys",
        Some(serde_json::json!({"name": "x", "scopes": ["messages:read"]})),
    );
    let key = r.json().unwrap()["key"].as_str().unwrap().to_owned();
    // No entry names a scope for webhooks yet: a key with scopes is refused there.
    assert_error(
        &gw.get("/api/v1/webhooks/1", &[("x-api-key", &key)]),
        403,
        "FORBIDDEN",
        "This API key is restricted to scopes and this route is granted by none of them",
    );

    let mut routes = std::fs::read_to_string(policies_path(&gw)).unwrap();
    routes = routes.replacen(
        "scopes = [\"messages:send\"",
        "scopes = [\"webhooks:read\", \"messages:send\"",
        1,
    );
    routes.push_str("\n[[route]]\nprefix = \"/api/v1/webhooks/\"\nscope = \"webhooks:read\"\n");
    std::fs::write(policies_path(&gw), &routes).unwrap();
    let r = gw.admin_call("POST", "/admin/v1/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json().unwrap(),
        serde_json::json!({"reloaded": true, "routes": 3, "routePolicies": 5, "plans": 6, "needsRestart": []})
    );
    let r = gw.get("/api/v1/webhooks/1", &[("x-api-key", &key)]);
    assert_error(
        &r,
        403,
        "FORBIDDEN",
        "This API key lacks the scope webhooks:read",
    );

    // An invalid set is refused with its reasons, and the set in force stays.
    std::fs::write(
        gw.dir.path().join("policies/plans.toml"),
        "[plans.pro]\nmax_keys = 1\nmonthly_requests = 0\n",
    )
    .unwrap();
    let r = gw.admin_call("POST", "/admin/v1/reload", None);
    let plans = gw.dir.path().join("policies/plans.toml");
    assert_error(
        &r,
        400,
        "BAD_REQUEST",
        &format!(
            "Reload refused: {}:3:20: plans.pro.monthly_requests: must be at least 1, got 0",
            plans.display()
        ),
    );
    assert_eq!(
        gw.get("/api/v1/webhooks/1", &[("x-api-key", &key)]).status,
        403
    );
    echoed(&gw.get("/api/v1/messages/1", &[("x-api-key", &key)]));
}

#[test]
fn reloading_under_continuous_load_fails_no_request() {
    let gw = Arc::new(Gateway::start());
    let keys: Vec<String> = (0..4)
        .map(|i| gw.account_with_key(&format!("acct{i}"), "pro").0)
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = keys
        .into_iter()
        .map(|key| {
            let (gw, stop) = (gw.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut conn = gw.connect();
                let mut statuses = Vec::new();
                // Bounded: at most 5000 requests per worker.
                while !stop.load(Ordering::Relaxed) && statuses.len() < 5000 {
                    let r = conn
                        .send("GET", "/api/v1/x", &[("x-api-key", &key)], None)
                        .expect("request");
                    statuses.push(r.status);
                    // Each key stays under its rate: every worker moves the shared clock 100 ms
                    // per request of its own, so its key always sees a token back.
                    gw.clock.advance_ms(100);
                }
                statuses
            })
        })
        .collect();
    let routes = std::fs::read_to_string(policies_path(&gw)).unwrap();
    for i in 0..20 {
        let extra = format!(
            "\n[[route]]\nprefix = \"/api/v1/reload-{i}/\"\nrequire_subscription = false\n"
        );
        std::fs::write(policies_path(&gw), format!("{routes}{extra}")).unwrap();
        let r = gw.admin_call("POST", "/admin/v1/reload", None);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        let statuses = w.join().unwrap();
        total += statuses.len();
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    }
    assert!(total > 0);
}

#[test]
fn plan_changes_apply_on_the_next_request_on_every_node_and_usage_carries_over() {
    let redis = RedisServer::start();
    let clock = Arc::new(ManualClock::at_unix(T0));
    let n: Vec<Gateway> = (0..2)
        .map(|_| Gateway::start_with(Setup::new().on_redis(redis.url()).sharing(&clock)))
        .collect();
    let (key, _) = n[0].account_with_key("acme", "tiny"); // 5 a month, 2 keys
    for _ in 0..5 {
        assert_eq!(n[1].get("/api/v1/x", &[("x-api-key", &key)]).status, 200);
    }
    assert_eq!(n[1].get("/api/v1/x", &[("x-api-key", &key)]).status, 429);
    // Upgrade on node A; node B applies it on its next request (after the invalidation).
    n[0].put_account("acme", "starter", "active"); // 50 a month, 3 keys
    eventually("node B sees the new plan", || {
        n[1].get("/api/v1/x", &[("x-api-key", &key)]).status == 200
    });
    let r = n[1].get("/api/v1/x", &[("x-api-key", &key)]);
    assert_eq!(
        r.header("ratelimit-policy"),
        Some("\"burst\";q=10;w=1, \"monthly\";q=50;w=2592000")
    );
    let v = n[1]
        .admin_call("GET", "/admin/v1/accounts/acme", None)
        .json()
        .unwrap();
    assert_eq!(v["usage"]["requests"], 7, "the month's usage carried over");
    // The new key cap: 3 keys on starter.
    n[1].create_key("acme");
    n[0].create_key("acme");
    let r = n[1].admin_call(
        "POST",
        "/admin/v1/accounts/acme/keys",
        Some(serde_json::json!({"name": "4th"})),
    );
    assert_eq!(r.status, 403);
    // And a new rate: "slow" refills one token a second.
    n[0].put_account("acme", "slow", "active");
    clock.advance_ms(10_000);
    eventually("node B uses the slow plan", || {
        n[1].get("/api/v1/x", &[("x-api-key", &key)])
            .header("ratelimit-policy")
            == Some("\"burst\";q=10;w=10, \"monthly\";q=1000;w=2592000")
    });
}

#[test]
fn an_account_whose_plan_a_reload_removed_gets_503_naming_the_plan_not_the_store() {
    let gw = Gateway::start();
    let (key, _) = gw.account_with_key("small", "tiny");
    echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
    let plans = gw.dir.path().join("policies/plans.toml");
    let text = std::fs::read_to_string(&plans).unwrap();
    std::fs::write(&plans, text.replace("[plans.tiny]", "[plans.micro]")).unwrap();
    let r = gw.admin_call("POST", "/admin/v1/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = gw.get("/api/v1/x", &[("x-api-key", &key)]);
    assert_refused(
        &r,
        503,
        "SERVICE_UNAVAILABLE",
        "The account's plan is not available on this gateway. Try again shortly.",
    );
    assert_eq!(r.header("retry-after"), Some("1"));
}
