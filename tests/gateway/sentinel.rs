//! SPEC §9 Redis Sentinel: a `redis+sentinel://` URL, a real primary, replica and three
//! sentinels; when the primary dies, the gateway follows the failover: no caller is told 401,
//! calls are served again once the replica is promoted, and writes land on the new primary.

use crate::redis_server::{RedisServer, Sentinel};
use crate::support::*;

fn lines(s: &str) -> Vec<String> {
    s.lines().map(str::to_owned).collect()
}

#[test]
fn the_gateway_follows_a_sentinel_failover() {
    // Replicas get their first copy at once (Redis waits 5 s by default to batch them).
    let mut primary = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
    let port = primary.addr.port().to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
    let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(primary.addr, 2)).collect();
    // The sentinels know the replica and each other before the primary goes.
    eventually("the sentinels see the replica and each other", || {
        sentinels.iter().all(|s| {
            s.cli(&["SENTINEL", "replicas", "mymaster"])
                .contains(&replica.addr.port().to_string())
                && s.cli(&["SENTINEL", "sentinels", "mymaster"])
                    .matches("runid")
                    .count()
                    == 2
        })
    });
    let url = format!(
        "redis+sentinel://{},{},{}/mymaster",
        sentinels[0].addr, sentinels[1].addr, sentinels[2].addr
    );
    let gw = Gateway::start_with(Setup::new().on_redis(url));
    let (key, _) = gw.account_with_key("acme", "pro");
    let call = || {
        gw.clock.advance_ms(200); // a token back each time: the rate limit is not what is tested
        gw.get("/api/v1/x", &[("x-api-key", &key)]).status
    };
    assert_eq!(call(), 200);
    eventually("the replica has the key", || {
        replica.cli(&["DBSIZE"]).trim() != "0"
    });

    primary.kill();
    let killed = std::time::Instant::now();
    let promoted = vec!["127.0.0.1".to_owned(), replica.addr.port().to_string()];
    let mut statuses = Vec::new();
    eventually("the sentinels promote the replica", || {
        statuses.push(call());
        lines(&sentinels[0].cli(&["SENTINEL", "get-master-addr-by-name", "mymaster"])) == promoted
    });
    let promoted_after = killed.elapsed();
    eventually("the gateway serves from the new primary", || {
        statuses.push(call());
        *statuses.last().unwrap() == 200
    });
    println!(
        "failover: promoted after {promoted_after:?}, served again after {:?}; {} calls, {} answered 503",
        killed.elapsed(),
        statuses.len(),
        statuses.iter().filter(|s| **s == 503).count()
    );
    // Meanwhile the known key was served or deferred (503), never refused.
    assert!(
        statuses.iter().all(|s| [200, 503].contains(s)),
        "{statuses:?}"
    );
    // Writes reach the new primary: a new key is made, works, and is revoked.
    let (key2, key2_id) = gw.create_key("acme");
    assert_eq!(gw.get("/api/v1/x", &[("x-api-key", &key2)]).status, 200);
    let r = gw.admin_call(
        "DELETE",
        &format!("/admin/v1/accounts/acme/keys/{key2_id}"),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = gw.get("/api/v1/x", &[("x-api-key", &key2)]);
    assert_refused(&r, 401, "UNAUTHORIZED", "Invalid or revoked API key");
    assert!(replica.cli(&["ROLE"]).starts_with("master"));
}

#[test]
fn a_sentinel_url_that_cannot_be_used_is_refused_with_its_reason() {
    for (url, why) in [
        (
            "redis+sentinel://127.0.0.1:1/",
            "a sentinel URL names the primary: redis+sentinel://host:26379,…/mymaster",
        ),
        (
            "redis+sentinel://127.0.0.1:1/m?x=1",
            "unknown sentinel URL parameter (sentinel_username and sentinel_password are known; \
             percent-encode '&' and '=' in values)",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(
            dir.path(),
            &Setup::new().on_redis(url.to_owned()),
            free_addr(),
            free_addr(),
            free_addr(),
        );
        let err = msgflash_gateway::config::Config::load_with_env(&path, &env)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!("{}:18:13: store.redis_url: {why}", path.display())
        );
    }
}
