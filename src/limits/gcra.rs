//! Token-bucket rate limiting as GCRA (generic cell rate algorithm) on exact integer nanoseconds.

/// Rate and burst of one bucket. Both should be at least 1; 0 is treated as 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketParams {
    pub rate_per_second: u32,
    pub burst: u32,
}

impl BucketParams {
    /// Nanoseconds between two conforming requests: `1_000_000_000 / rate`, at least 1.
    pub fn emission_interval_ns(&self) -> u64 {
        (1_000_000_000 / u64::from(self.rate_per_second.max(1))).max(1)
    }
}

/// Outcome of [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketDecision {
    /// Request admitted; store `new_tat_ns` as the key's theoretical arrival time.
    Allow {
        new_tat_ns: u64,
        remaining: u32,
        reset_after_ns: u64,
    },
    /// Request rejected; state must NOT change.
    Deny {
        retry_after_ns: u64,
        reset_after_ns: u64,
    },
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// Decides one request arriving at `now_ns` for a key whose stored theoretical arrival
/// time is `tat_ns` (`None` for a fresh key).
///
/// The comparison `now < new_tat - burst*T` is evaluated as `now + burst*T < new_tat`,
/// which is the same wherever neither side saturates and exact near the epoch.
pub fn decide(tat_ns: Option<u64>, now_ns: u64, params: BucketParams) -> BucketDecision {
    decide_every(tat_ns, now_ns, params.emission_interval_ns(), params.burst)
}

/// [`decide`] for a bucket given by its emission interval rather than a rate per second
/// (slower than one a second: ten a minute is one every 6 s).
pub fn decide_every(tat_ns: Option<u64>, now_ns: u64, t: u64, burst: u32) -> BucketDecision {
    let t = t.max(1);
    let tat = tat_ns.map_or(now_ns, |v| v.max(now_ns));
    judge(tat.saturating_add(t), now_ns, t, burst)
}

/// How far out of order concurrent requests of one key may reach the bucket. Each request's
/// time is read before the bucket's atomic step, so under load a burst's requests can reach it
/// in another order than their times say; without slack, the last request of a burst of exactly
/// `burst` was refused whenever one that came after it in time had gone first (with a real
/// clock, not the tests' manual one). Less than half an interval (so the request past the burst
/// in one instant is still refused), and at most a millisecond: a token comes that much early.
const JITTER_NS: u64 = 1_000_000;

fn jitter(t: u64) -> u64 {
    JITTER_NS.min(t / 2)
}

/// Judges a TAT already advanced by one interval, `new_tat = max(tat, now) + t`, as a shared
/// store computes it in one command (`ZADD GT` + `ZINCRBY`): admit with the remaining burst, or
/// refuse with the retry time. [`decide_every`] is this after computing `new_tat` itself.
pub fn judge(new_tat_ns: u64, now_ns: u64, t: u64, burst: u32) -> BucketDecision {
    let t = t.max(1);
    let burst = u64::from(burst.max(1));
    let horizon = now_ns.saturating_add(burst.saturating_mul(t));
    if horizon.saturating_add(jitter(t)) < new_tat_ns {
        BucketDecision::Deny {
            retry_after_ns: new_tat_ns - horizon,
            reset_after_ns: new_tat_ns.saturating_sub(t).saturating_sub(now_ns),
        }
    } else {
        // Within the jitter past the horizon: admitted, with nothing to spare.
        let spare = horizon.saturating_sub(new_tat_ns) / t;
        BucketDecision::Allow {
            new_tat_ns,
            remaining: clamp_u32(spare.min(burst - 1)),
            reset_after_ns: new_tat_ns.saturating_sub(now_ns),
        }
    }
}

/// State without consuming: `(remaining, reset_after_ns)`.
pub fn peek(tat_ns: Option<u64>, now_ns: u64, params: BucketParams) -> (u32, u64) {
    peek_every(tat_ns, now_ns, params.emission_interval_ns(), params.burst)
}

/// [`peek`] for a bucket given by its emission interval.
pub fn peek_every(tat_ns: Option<u64>, now_ns: u64, t: u64, burst: u32) -> (u32, u64) {
    let burst = u64::from(burst.max(1));
    let tat = match tat_ns {
        Some(tat) if tat > now_ns => tat,
        _ => return (clamp_u32(burst), 0),
    };
    let t = t.max(1);
    let spare = now_ns
        .saturating_add(burst.saturating_mul(t))
        .saturating_sub(tat)
        / t;
    (clamp_u32(spare.min(burst)), tat - now_ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BASE: u64 = 1_700_000_000_000_000_000;
    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000_000_000;

    fn params(rate_per_second: u32, burst: u32) -> BucketParams {
        BucketParams {
            rate_per_second,
            burst,
        }
    }

    /// Feeds arrivals through the bucket; returns the admitted arrival times.
    fn simulate(arrivals: &[u64], p: BucketParams) -> Vec<u64> {
        let mut tat = None;
        let mut admitted = Vec::new();
        for &now in arrivals {
            if let BucketDecision::Allow { new_tat_ns, .. } = decide(tat, now, p) {
                tat = Some(new_tat_ns);
                admitted.push(now);
            }
        }
        admitted
    }

    #[test]
    fn emission_interval() {
        assert_eq!(params(10, 1).emission_interval_ns(), 100 * MS);
        assert_eq!(params(0, 0).emission_interval_ns(), SEC);
        assert_eq!(params(u32::MAX, 1).emission_interval_ns(), 1);
    }

    #[test]
    fn a_burst_reaching_the_bucket_out_of_order_is_admitted_whole() {
        // Ten requests read their times within half a millisecond; the latest reaches the
        // bucket first. Without slack the tenth was refused; the eleventh still is, even one
        // read a little later still.
        let p = params(10, 10);
        let times: Vec<u64> = [500, 0, 100, 200, 300, 400, 50, 150, 250, 350]
            .iter()
            .map(|us| BASE + us * 1_000)
            .collect();
        let mut tat = None;
        for (i, now) in times.iter().enumerate() {
            match decide(tat, *now, p) {
                BucketDecision::Allow { new_tat_ns, .. } => tat = Some(new_tat_ns),
                other => panic!("request {i} at +{} ns: {other:?}", now - BASE),
            }
        }
        for late_us in [0, 500, 900] {
            assert!(
                matches!(
                    decide(tat, BASE + late_us * 1_000, p),
                    BucketDecision::Deny { .. }
                ),
                "an eleventh at +{late_us} µs"
            );
        }
    }

    #[test]
    fn fresh_bucket_admits_burst_then_denies() {
        let p = params(10, 10);
        let mut tat = None;
        for expected in (0..10u32).rev() {
            match decide(tat, BASE, p) {
                BucketDecision::Allow {
                    new_tat_ns,
                    remaining,
                    reset_after_ns,
                } => {
                    assert_eq!(remaining, expected);
                    assert_eq!(reset_after_ns, new_tat_ns - BASE);
                    tat = Some(new_tat_ns);
                }
                other => panic!("expected Allow, got {other:?}"),
            }
        }
        assert_eq!(peek(tat, BASE, p), (0, SEC));
        assert_eq!(
            decide(tat, BASE, p),
            BucketDecision::Deny {
                retry_after_ns: 100 * MS,
                reset_after_ns: SEC,
            }
        );
    }

    #[test]
    fn steady_rate_is_always_allowed() {
        let p = params(10, 10);
        let mut tat = None;
        for i in 0..1000 {
            match decide(tat, BASE + i * 100 * MS, p) {
                BucketDecision::Allow {
                    new_tat_ns,
                    remaining,
                    ..
                } => {
                    assert_eq!(remaining, 9);
                    tat = Some(new_tat_ns);
                }
                other => panic!("step {i}: expected Allow, got {other:?}"),
            }
        }
    }

    #[test]
    fn double_rate_admits_burst_plus_rate_times_duration() {
        // One request every 50 ms over [0 s, 10 s]: 10 (burst) + 10 s * 10 r/s.
        let arrivals: Vec<u64> = (0..=200).map(|i| BASE + i * 50 * MS).collect();
        let admitted = simulate(&arrivals, params(10, 10)).len();
        assert!((109..=111).contains(&admitted), "admitted {admitted}");
    }

    #[test]
    fn deny_does_not_change_state() {
        let p = params(10, 2);
        let mut tat = None;
        for _ in 0..2 {
            if let BucketDecision::Allow { new_tat_ns, .. } = decide(tat, BASE, p) {
                tat = Some(new_tat_ns);
            }
        }
        let before = peek(tat, BASE, p);
        // Repeated denies at the same instant report the same retry and leave the state alone.
        let first = decide(tat, BASE, p);
        for _ in 0..5 {
            assert_eq!(decide(tat, BASE, p), first);
        }
        assert_eq!(peek(tat, BASE, p), before);
        let BucketDecision::Deny { retry_after_ns, .. } = first else {
            panic!("expected Deny, got {first:?}");
        };
        assert!(matches!(
            decide(tat, BASE + retry_after_ns, p),
            BucketDecision::Allow { .. }
        ));
    }

    #[test]
    fn peek_fresh_and_recovered() {
        let p = params(10, 5);
        assert_eq!(peek(None, BASE, p), (5, 0));
        let tat = Some(BASE + 300 * MS);
        assert_eq!(peek(tat, BASE, p), (2, 300 * MS));
        assert_eq!(peek(tat, BASE + 300 * MS, p), (5, 0));
        assert_eq!(peek(tat, BASE + SEC, p), (5, 0));
    }

    #[test]
    fn near_epoch_and_far_future_do_not_overflow() {
        let p = params(1, u32::MAX);
        assert!(matches!(
            decide(None, 0, p),
            BucketDecision::Allow { remaining, .. } if remaining == u32::MAX - 1
        ));
        assert!(matches!(
            decide(Some(u64::MAX), u64::MAX, p),
            BucketDecision::Allow { .. } | BucketDecision::Deny { .. }
        ));
        let _ = peek(Some(u64::MAX), 0, p);
        let _ = peek(Some(u64::MAX), u64::MAX - 1, params(0, 0));
    }

    proptest! {
        #[test]
        fn admitted_in_any_window_is_bounded(
            rate in 1u32..1000,
            burst in 1u32..100,
            gaps in prop::collection::vec(
                prop_oneof![Just(0u64), 0u64..2_000_000, 0u64..100_000_000],
                1..300,
            ),
        ) {
            let mut now = BASE;
            let arrivals: Vec<u64> = gaps
                .iter()
                .map(|g| {
                    now += g;
                    now
                })
                .collect();
            let admitted = simulate(&arrivals, params(rate, burst));
            for (i, &start) in admitted.iter().enumerate() {
                for (j, &end) in admitted.iter().enumerate().skip(i) {
                    let d = end - start;
                    let bound = u64::from(burst) + d * u64::from(rate) / SEC + 1;
                    prop_assert!(
                        (j - i + 1) as u64 <= bound,
                        "{} admitted in {} ns (bound {})",
                        j - i + 1,
                        d,
                        bound
                    );
                }
            }
        }

        #[test]
        fn denied_request_is_allowed_after_retry_after(
            rate in 1u32..1000,
            burst in 1u32..100,
            ahead in 0u64..200 * SEC,
            now_offset in 0u64..1000 * SEC,
        ) {
            let p = params(rate, burst);
            let now = BASE + now_offset;
            let tat = Some(now + ahead);
            if let BucketDecision::Deny { retry_after_ns, reset_after_ns } = decide(tat, now, p) {
                prop_assert!(retry_after_ns >= 1);
                prop_assert_eq!(reset_after_ns, ahead);
                prop_assert!(
                    matches!(decide(tat, now + retry_after_ns, p), BucketDecision::Allow { .. }),
                    "not allowed after retry_after"
                );
                // The jitter lets a request in that much before the advertised time, never
                // earlier.
                let early = jitter(p.emission_interval_ns());
                prop_assert!(retry_after_ns > early);
                prop_assert!(
                    matches!(
                        decide(tat, now + retry_after_ns - early - 1, p),
                        BucketDecision::Deny { .. }
                    ),
                    "admitted before retry_after less the jitter"
                );
            }
        }
    }
}
