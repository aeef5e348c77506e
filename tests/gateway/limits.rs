//! SPEC §3 checks 6–7: the per-key token bucket and the monthly quota, on a manual clock.

use crate::support::*;
use std::sync::{Arc, Barrier};

/// Sends `n` requests at once with `key`, returns the statuses.
fn burst(gw: &Gateway, key: &str, n: usize) -> Vec<u16> {
    burst_answers(gw, key, n)
        .into_iter()
        .map(|r| r.status)
        .collect()
}

/// Sends `n` requests at once with `key`, returns the answers.
fn burst_answers(gw: &Gateway, key: &str, n: usize) -> Vec<crate::client::HttpResponse> {
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let barrier = barrier.clone();
            let key = key.to_owned();
            let mut conn = gw.connect();
            std::thread::spawn(move || {
                barrier.wait();
                conn.send("GET", "/api/v1/messages", &[("x-api-key", &key)], None)
                    .expect("request")
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect()
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

fn concurrent_burst_of_16_lets_exactly_10_through(b: Backend) {
    let gw = Gateway::on(b);
    let (key, _) = gw.account_with_key("acme", "pro");
    let answers = burst_answers(&gw, &key, 16);
    let statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
    assert_eq!(
        (count(&statuses, 200), count(&statuses, 429)),
        (10, 6),
        "{statuses:?}"
    );
    // Every refusal tells what the bucket holds, whatever else was in flight beside it (on
    // Redis each concurrent refusal adds an interval until it is taken back).
    for r in answers.iter().filter(|r| r.status == 429) {
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.header("ratelimit"), Some("\"burst\";r=0;t=1"));
        assert_eq!(r.header("x-ratelimit-reset"), Some("1"));
    }
}

fn the_11th_request_in_the_same_instant_is_429_with_retry_after(b: Backend) {
    let gw = Gateway::on(b);
    let (key, _) = gw.account_with_key("acme", "pro");
    for i in 0..10 {
        let r = gw.get("/api/v1/x", &[("x-api-key", &key)]);
        echoed(&r);
        assert_eq!(
            r.header("x-ratelimit-remaining"),
            Some((9 - i).to_string().as_str())
        );
    }
    let r = gw.get("/api/v1/x", &[("x-api-key", &key)]);
    assert_error(
        &r,
        429,
        "API_RATE_LIMIT_EXCEEDED",
        "Too many requests: more than the allowed requests per second on this API key",
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("ratelimit"), Some("\"burst\";r=0;t=1"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    // 100 ms later exactly one token is back.
    gw.clock.advance_ms(100);
    echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
    assert_eq!(gw.get("/api/v1/x", &[("x-api-key", &key)]).status, 429);
}

fn steady_10_per_second_for_3_seconds_never_sees_429(b: Backend) {
    let gw = Gateway::on(b);
    let (key, _) = gw.account_with_key("acme", "pro");
    for _ in 0..30 {
        let r = gw.get("/api/v1/x", &[("x-api-key", &key)]);
        assert_eq!(r.status, 200, "{}", r.text());
        gw.clock.advance_ms(100);
    }
}

fn offered_20_per_second_gets_10_per_second_through(b: Backend) {
    let gw = Gateway::on(b);
    let (key, _) = gw.account_with_key("acme", "pro");
    let mut ok = 0;
    for _ in 0..60 {
        if gw.get("/api/v1/x", &[("x-api-key", &key)]).status == 200 {
            ok += 1;
        }
        gw.clock.advance_ms(50);
    }
    // The last request goes out at 2.95 s: the burst of 10, plus one token per 100 ms since.
    assert_eq!(ok, 10 + 29);
}

fn keys_have_separate_buckets(b: Backend) {
    let gw = Gateway::on(b);
    let (a, _) = gw.account_with_key("acme", "pro");
    let (b, _) = gw.create_key("acme");
    assert_eq!(count(&burst(&gw, &a, 12), 200), 10);
    assert_eq!(count(&burst(&gw, &b, 12), 200), 10);
}

/// A key of an account on plan `tiny` (5 requests a month), which 8 requests at once used up:
/// 5 forwarded, 3 refused.
fn eight_on_a_quota_of_five(gw: &Gateway) -> String {
    let (key, _) = gw.account_with_key("small", "tiny");
    let statuses = burst(gw, &key, 8);
    assert_eq!(
        (count(&statuses, 200), count(&statuses, 429)),
        (5, 3),
        "{statuses:?}"
    );
    key
}

fn monthly_quota_is_exact_and_retry_after_points_at_the_next_period(b: Backend) {
    let gw = Gateway::on(b);
    let key = eight_on_a_quota_of_five(&gw);
    let r = gw.get("/api/v1/x", &[("x-api-key", &key)]);
    assert_error(
        &r,
        429,
        "MONTHLY_API_REQUEST_QUOTA_EXCEEDED",
        "Monthly API request quota exhausted",
    );
    // T0 is 2026-11-29T00:00:00Z; the period ends 2026-12-01T00:00:00Z.
    assert_eq!(r.header("retry-after"), Some("172800"));
    // Quota rejections consume no token: 5 admitted requests used 5 of the 10.
    assert_eq!(r.header("ratelimit"), Some("\"burst\";r=5;t=1"));
    let usage = gw
        .admin_call("GET", "/admin/v1/accounts/small", None)
        .json()
        .unwrap();
    assert_eq!(
        usage["usage"],
        serde_json::json!({"period": "2026-11-01", "requests": 5, "quota": 5})
    );
    // A key whose only request the quota refused authenticated one: it was used then, on both
    // stores (the embedded one listed such a key as last used at the epoch).
    let (unused, unused_id) = gw.create_key("small");
    assert_eq!(gw.get("/api/v1/x", &[("x-api-key", &unused)]).status, 429);
    let listed = gw
        .admin_call("GET", "/admin/v1/accounts/small/keys", None)
        .json()
        .unwrap();
    let record = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == unused_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(record["lastUsedAt"], "2026-11-29T00:00:00.000Z", "{record}");
    // The next period starts afresh.
    gw.clock.advance_ms(2 * 86_400 * 1000);
    echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
}

/// The quota holds whatever date the gateway's clock says: a Redis store told the counters'
/// expiry as an instant deleted every counter made while the gateway's clock was more than a
/// month behind Redis's (this test's 2020 clock, and, from 2027-01-05, every test's 2026 one),
/// and every request was then the month's first. The usage an anchor-day change carries over
/// is kept the same way.
fn the_quota_holds_whatever_date_the_gateway_clock_says(b: Backend) {
    // 2020-02-10T00:00:00Z: its period (from the 1st) ended in March 2020.
    let clock = Arc::new(msgflash_gateway::clock::ManualClock::at_unix(1_581_292_800));
    let gw = Gateway::start_with_backend(b, Setup::new().sharing(&clock));
    let key = eight_on_a_quota_of_five(&gw);
    let r = gw.admin_call(
        "PUT",
        "/admin/v1/accounts/small",
        Some(serde_json::json!({"plan": "tiny", "quotaAnchorDay": 5})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json().unwrap()["usage"],
        serde_json::json!({"period": "2020-02-05", "requests": 5, "quota": 5})
    );
    assert_error(
        &gw.get("/api/v1/x", &[("x-api-key", &key)]),
        429,
        "MONTHLY_API_REQUEST_QUOTA_EXCEEDED",
        "Monthly API request quota exhausted",
    );
}

/// Past the quota, a burst of concurrent requests is refused for the quota, every one, even
/// past the bucket's burst: the bucket still holds tokens (refusals take none), so step 6
/// passes them all to step 7, and each says the bucket is full. On Redis each refusal holds
/// an interval of the bucket until it is given back; read through them, the 11th looked over
/// its rate.
fn a_burst_past_the_quota_is_refused_for_the_quota(b: Backend) {
    let gw = Gateway::on(b);
    let (key, _) = gw.account_with_key("small", "tiny"); // 5 requests a month
    for _ in 0..5 {
        echoed(&gw.get("/api/v1/x", &[("x-api-key", &key)]));
    }
    gw.clock.advance_ms(1_000);
    // On Redis each request counts the key's admissions ahead of it just before it is queued:
    // across the gateway's two worker threads one may overtake another in between, and its
    // report may then be some intervals off (never the refusal, nor an admission).
    let reported = |state: &str| {
        if b != Backend::Redis {
            return state == "\"burst\";r=10;t=0";
        }
        let Some((r, t)) = state
            .strip_prefix("\"burst\";r=")
            .and_then(|rest| rest.split_once(";t="))
        else {
            return false;
        };
        let (r, t) = (r.parse::<u32>(), t.parse::<u64>());
        matches!((r, t), (Ok(1..=10), Ok(0..=10)))
    };
    // On Redis the count is taken before the pipeline is queued: a worker thread descheduled
    // in between (under load) lets others' refusals run first, and then a request can read as
    // over its rate (docs/contract.md, the Redis store): the label, never an admission (the
    // usage below). The embedded store's answer is exact.
    for r in burst_answers(&gw, &key, 16) {
        if b == Backend::Redis && r.text().contains("API_RATE_LIMIT_EXCEEDED") {
            assert_error(
                &r,
                429,
                "API_RATE_LIMIT_EXCEEDED",
                "Too many requests: more than the allowed requests per second on this API key",
            );
            continue;
        }
        assert_error(
            &r,
            429,
            "MONTHLY_API_REQUEST_QUOTA_EXCEEDED",
            "Monthly API request quota exhausted",
        );
        let state = r.header("ratelimit").unwrap_or("none");
        assert!(reported(state), "{state}");
    }
    let usage = gw
        .admin_call("GET", "/admin/v1/accounts/small", None)
        .json()
        .unwrap();
    assert_eq!(usage["usage"]["requests"], 5);
}

fn rate_limited_requests_do_not_count_toward_the_quota(b: Backend) {
    let gw = Gateway::on(b);
    let (key, _) = gw.account_with_key("acme", "starter"); // quota 50
    let statuses = burst(&gw, &key, 16);
    assert_eq!(count(&statuses, 200), 10);
    let v = gw
        .admin_call("GET", "/admin/v1/accounts/acme", None)
        .json()
        .unwrap();
    assert_eq!(v["usage"]["requests"], 10);
}

fn rejected_before_the_limiter_consumes_nothing(b: Backend) {
    let gw = Gateway::on(b);
    let (key, _) = gw.account_with_key("acme", "pro");
    gw.put_account("acme", "pro", "inactive");
    for _ in 0..20 {
        assert_eq!(gw.get("/api/v1/x", &[("x-api-key", &key)]).status, 403);
    }
    gw.put_account("acme", "pro", "active");
    let r = gw.get("/api/v1/x", &[("x-api-key", &key)]);
    echoed(&r);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("9"));
    let v = gw
        .admin_call("GET", "/admin/v1/accounts/acme", None)
        .json()
        .unwrap();
    assert_eq!(v["usage"]["requests"], 1);
}

crate::on_both_stores!(
    concurrent_burst_of_16_lets_exactly_10_through,
    the_quota_holds_whatever_date_the_gateway_clock_says,
    a_burst_past_the_quota_is_refused_for_the_quota,
    the_11th_request_in_the_same_instant_is_429_with_retry_after,
    steady_10_per_second_for_3_seconds_never_sees_429,
    offered_20_per_second_gets_10_per_second_through,
    keys_have_separate_buckets,
    monthly_quota_is_exact_and_retry_after_points_at_the_next_period,
    rate_limited_requests_do_not_count_toward_the_quota,
    rejected_before_the_limiter_consumes_nothing,
);
