//! SPEC §9 Redis Sentinel: a `redis+sentinel://` URL, a real primary, replica and three
//! sentinels; when the primary dies, the gateway follows the failover: no caller is told 401,
//! calls are served again once the replica is promoted, and writes land on the new primary.

use crate::redis_server::SentinelSet;
use crate::support::*;

#[test]
fn the_gateway_follows_a_sentinel_failover() {
    // The sentinels know the replica and each other before the primary goes.
    let mut set = SentinelSet::start(&[]);
    let gw = Gateway::start_with(Setup::new().on_redis(set.url()));
    let (key, _) = gw.account_with_key("acme", "pro");
    let call = || {
        gw.clock.advance_ms(200); // a token back each time: the rate limit is not what is tested
        gw.get("/api/v1/x", &[("x-api-key", &key)]).status
    };
    assert_eq!(call(), 200);
    eventually("the replica has the key", || {
        set.replica.cli(&["DBSIZE"]).trim() != "0"
    });

    set.primary.kill();
    let killed = std::time::Instant::now();
    let mut statuses = Vec::new();
    eventually("the sentinels promote the replica", || {
        statuses.push(call());
        set.replica_promoted()
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
    assert!(set.replica.cli(&["ROLE"]).starts_with("master"));
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
        let (err, path) = config_errors(dir.path(), &Setup::new().on_redis(url.to_owned()));
        assert_eq!(
            err,
            format!("{}:18:13: store.redis_url: {why}", path.display())
        );
    }
}
