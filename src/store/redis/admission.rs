//! One authorized request: rate limit and quota in one round trip, without scripts.
//!
//! The pipeline is `ZADD tat GT now t; ZINCRBY tat T t; INCR q; SISMEMBER active key` (plus
//! `EXPIRE q` once per period and node, and `PEXPIRE tat` + `HSET used` at most once a minute
//! per key and node: the TAT's TTL covers a minute without refresh). When the replies say the
//! pipeline created a key the node believed had its expiry (`ZADD` added, `INCR` gave 1), the
//! expiry follows in a second round trip. `ZADD GT` then `ZINCRBY`
//! computes GCRA's `max(tat, now) + T` in Redis; what that TAT means (admit, refuse, remaining, reset) is
//! `limits::gcra::judge`'s arithmetic, the same the embedded store uses. A rejection (rate or
//! quota) is compensated with `ZINCRBY -T` and `DECR`, so it consumes nothing. Between a
//! rejected increment and its compensation another request can only see *more* usage, never
//! less: the limits may briefly refuse early, never admit extra.
//!
//! What a refusal reports leaves out the refusals in flight beside it (each holds an interval of
//! the bucket and a unit of the quota until given back): a rate refusal's retry is at most one
//! interval and its reset at most `burst`. Past the quota, as many intervals as the node's own
//! admissions of the key that went first unfinished (at most the count beyond the quota) are
//! left out of its bucket, so a burst past the quota is refused for the quota as on the
//! embedded store (the count is taken just before the pipeline is queued: across worker
//! threads one request may overtake another in between, one interval off). Only which refusal
//! it is can be wrong: other nodes' refusals are not known
//! here (a request past the burst may read as over the rate), and an admitted request of the
//! key in flight beside other keys' refusals may make one over its rate read as over the quota.
//!
//! No MULTI/EXEC around the pipeline (it cost more client CPU than the commands themselves:
//! eight replies to parse instead of four). Redis runs one connection's commands in order, so a
//! request's `ZADD GT` precedes its `ZINCRBY`; another node's commands may come in between.
//! That only makes the answer more conservative: with requests numbered in `ZINCRBY` order,
//! request k reads `v_k = max(tat₀, now_j of every ZADD before it) + k·T`, and every j ≤ k sent
//! its ZADD before its own ZINCRBY, so `v_k ≥ max(tat₀ + k·T, max_{j≤k} now_j + (k-j+1)·T)`,
//! which is exactly what sequential GCRA would give request k. A request therefore never sees less
//! usage than some serial order would show it. A pipeline cut short by a lost connection can
//! leave a token taken without its request admitted: early refusal again, never extra.
//!
//! `SISMEMBER` makes a revoke final on every node at once, whatever its caches hold: a revoke
//! takes the key out of the account's active set (and waits for a replica) before it answers,
//! and every admission reads that set in the same pipeline, on the same primary, after it. The
//! invalidation a revoke publishes only spares the nodes this refusal; a node that has not yet
//! heard it (a busy subscriber, a message lost in a failover) still refuses the key here, and
//! the admission's increments are undone (`DECR q`, the TAT deleted as the revoke did).

use super::connection::Budget;
use super::resp::{Arg, Commands, Reply};
use super::schema::{active_parts, quota_parts, tat_parts, used_parts};
use super::RedisStore;
use crate::limits::gcra::{self, BucketDecision, BucketParams};
use crate::store::{Admission, AdmitRequest, StoreError};

/// How often one node records a key's last use and pushes back its TAT's expiry.
pub(super) const LAST_USE_EVERY_NS: u64 = 60_000_000_000;

/// A TAT key lives this long past its burst window after each refresh: a node that admits with
/// a key refreshes at least once per `LAST_USE_EVERY_NS`, so the key outlives the last request's
/// TAT (at most a burst window ahead) by a second.
const TAT_TTL_MARGIN_MS: u64 = LAST_USE_EVERY_NS / 1_000_000 + 1_000;

/// A period's counter outlives the period by this long (usage of the last period stays
/// readable).
const QUOTA_TTL_AFTER_PERIOD_SECS: i64 = 35 * 86_400;

/// Seconds a period's counter is kept from `now_unix`: to its period's end and
/// [`QUOTA_TTL_AFTER_PERIOD_SECS`] more (at least one). Relative to the gateway's clock, not an
/// instant for Redis's: Redis deletes a key at once when told to expire it at an instant its
/// own clock has passed, so a gateway whose clock is behind Redis's (an injected clock in
/// tests, a node set back) would have had every counter deleted as it was made, and the quota
/// never reached.
pub(super) fn quota_ttl_secs(period_end_unix: i64, now_unix: i64) -> i64 {
    period_end_unix
        .saturating_add(QUOTA_TTL_AFTER_PERIOD_SECS)
        .saturating_sub(now_unix)
        .max(1)
}

/// `PEXPIRE tat …`: the TAT outlives a minute without refresh and its burst window.
fn tat_expiry<'a>(tat: &'a [&'a str], burst_us: u64) -> [Arg<'a>; 3] {
    [
        Arg::Str("PEXPIRE"),
        Arg::Concat(tat),
        Arg::UInt(burst_us / 1000 + TAT_TTL_MARGIN_MS),
    ]
}

/// `EXPIRE q …`: the period's counter outlives the period.
fn quota_expiry<'a>(quota: &'a [&'a str], period_end_unix: i64, now_unix: i64) -> [Arg<'a>; 3] {
    [
        Arg::Str("EXPIRE"),
        Arg::Concat(quota),
        Arg::Int(quota_ttl_secs(period_end_unix, now_unix)),
    ]
}

impl RedisStore {
    pub(super) async fn admit(&self, req: &AdmitRequest<'_>) -> Result<Admission, StoreError> {
        let t_us = (1_000_000 / u64::from(req.bucket.rate_per_second.max(1))).max(1);
        let burst_us = u64::from(req.bucket.burst.max(1)) * t_us;
        let now_us = req.now_ns / 1000;
        let now_unix = i64::try_from(req.now_ns / 1_000_000_000).unwrap_or(i64::MAX);
        let tat = tat_parts(req.account_id, req.key_id);
        let quota = quota_parts(req.account_id, req.period_id);
        // Counter expiry once per period and node; TAT expiry and last use at most once a
        // minute per key and node: the usual pipeline is ZADD, ZINCRBY, INCR. No MULTI: see the
        // module doc for why interleaving with other nodes' pipelines can only refuse early.
        let set_expiry = self
            .quota_expiry_set
            .get(req.account_id, req.now_ns)
            .is_none_or(|p| p != req.period_id);
        let touch = self.key_touched.get(req.key_id, req.now_ns).is_none();
        let mut c = Commands::new();
        c.push(&[
            Arg::Str("ZADD"),
            Arg::Concat(&tat),
            Arg::Str("GT"),
            Arg::UInt(now_us),
            Arg::Str("t"),
        ])
        .push(&[
            Arg::Str("ZINCRBY"),
            Arg::Concat(&tat),
            Arg::UInt(t_us),
            Arg::Str("t"),
        ])
        .push(&[Arg::Str("INCR"), Arg::Concat(&quota)])
        .push(&[
            Arg::Str("SISMEMBER"),
            Arg::Concat(&active_parts(req.account_id)),
            Arg::Str(req.key_id),
        ]);
        if set_expiry {
            c.push(&quota_expiry(&quota, req.period_end_unix, now_unix));
        }
        if touch {
            c.push(&tat_expiry(&tat, burst_us)).push(&[
                Arg::Str("HSET"),
                Arg::Concat(&used_parts(req.account_id)),
                Arg::Str(req.key_id),
                Arg::UInt(req.now_ns / 1_000_000),
            ]);
        }
        // Left when this admission is done, its refund included.
        let (ahead, _in_flight) = req.in_flight.enter();
        let replies = self.run(Budget::Admission, &c).await?;
        let (Some(new_tat), Some(used), Some(active)) = (
            replies.get(1).and_then(Reply::as_f64),
            replies.get(2).and_then(Reply::as_i64),
            replies.get(3).and_then(Reply::as_i64),
        ) else {
            return Err(StoreError::Unavailable(
                "unexpected reply to the admission".into(),
            ));
        };
        // A key this pipeline created anew (gone meanwhile: expired between the node's
        // refreshes, evicted, lost in a failover, deleted by hand) has no expiry when the node's
        // caches said it was set: it gets one now, or it would outlive its use for good.
        let tat_created = !touch && replies.first().and_then(Reply::as_i64) == Some(1);
        let quota_created = !set_expiry && used == 1;
        if tat_created || quota_created {
            let mut c = Commands::new();
            if tat_created {
                c.push(&tat_expiry(&tat, burst_us));
            }
            if quota_created {
                c.push(&quota_expiry(&quota, req.period_end_unix, now_unix));
            }
            if let Err(e) = self.run(Budget::Admission, &c).await {
                tracing::warn!(error = %e, "could not set the expiry of a recreated counter");
            }
        }
        if active == 0 {
            self.undo_revoked(&tat, &quota).await;
            return Ok(Admission::Revoked);
        }
        let used = u64::try_from(used).unwrap_or(0);
        if set_expiry {
            self.quota_expiry_set.insert(
                req.account_id.to_owned(),
                req.period_id.to_owned(),
                req.now_ns,
            );
        }
        if touch {
            self.key_touched
                .insert(req.key_id.to_owned(), (), req.now_ns);
        }
        // Redis keeps microseconds; the decision is limits::gcra's, in nanoseconds.
        let (new_tat_ns, now_ns, t_ns) = ((new_tat as u64) * 1000, now_us * 1000, t_us * 1000);
        let burst = req.bucket.burst;
        let over_quota = used > req.monthly_quota;
        // Over the quota, the requests counted beyond it before this one are refusals in flight,
        // each holding an interval of its key's bucket until given back. As many as this
        // node's own admissions of the key that went first unfinished (at most the count
        // beyond the quota) are left out of this key's bucket: a key with a token is refused
        // for the quota (step 7), as the embedded store answers, not for a rate only its own
        // refusals in flight exhausted. Only the label can be wrong, never an admission: an
        // admitted request of the key still in flight, beside other keys' refusals, can make a
        // key over its rate read as over the quota (both are refusals).
        let settled_tat_ns = if over_quota {
            let refusals = u64::from(ahead).min(used - req.monthly_quota - 1);
            new_tat_ns
                .saturating_sub(refusals.saturating_mul(t_ns))
                .max(now_ns.saturating_add(t_ns))
        } else {
            new_tat_ns
        };
        let judged = gcra::judge(new_tat_ns, now_ns, t_ns, burst);
        let admits = |d: BucketDecision| matches!(d, BucketDecision::Allow { .. });
        if over_quota
            && (admits(judged) || admits(gcra::judge(settled_tat_ns, now_ns, t_ns, burst)))
        {
            self.compensate(&tat, &quota, t_us).await;
            let (remaining, reset_after_ns) =
                gcra::peek_every(Some(settled_tat_ns - t_ns), now_ns, t_ns, burst);
            return Ok(Admission::QuotaExceeded {
                remaining,
                reset_after_ns,
            });
        }
        match judged {
            BucketDecision::Deny {
                retry_after_ns,
                reset_after_ns,
            } => {
                self.compensate(&tat, &quota, t_us).await;
                // Concurrent refusals not yet taken back inflate the TAT this pipeline read
                // (each added an interval). Admissions alone never leave a bucket more than
                // `burst` intervals from full, nor its next token more than one away: the
                // answer says what the bucket holds, not what is in flight.
                Ok(Admission::RateLimited {
                    retry_after_ns: retry_after_ns.min(t_ns),
                    reset_after_ns: reset_after_ns.min(u64::from(burst.max(1)) * t_ns),
                })
            }
            BucketDecision::Allow {
                remaining,
                reset_after_ns,
                ..
            } => Ok(Admission::Allowed {
                remaining,
                reset_after_ns,
            }),
        }
    }

    /// The key's bucket without taking a token: one `ZSCORE` of its TAT (microseconds).
    pub(super) async fn bucket_state(
        &self,
        account_id: &str,
        key_id: &str,
        now_ns: u64,
        bucket: BucketParams,
    ) -> Result<(u32, u64), StoreError> {
        let mut c = Commands::new();
        c.push(&[
            Arg::Str("ZSCORE"),
            Arg::Concat(&tat_parts(account_id, key_id)),
            Arg::Str("t"),
        ]);
        // A read: the lookups' budget (the admissions' counts admissions that may have run).
        let tat_ns = match self.run(Budget::Lookup, &c).await?.first() {
            Some(Reply::Nil) => None,
            Some(reply) => match reply.as_f64() {
                Some(us) if us.is_finite() && us >= 0.0 => Some((us as u64).saturating_mul(1000)),
                _ => return Err(StoreError::Unavailable("unexpected reply to ZSCORE".into())),
            },
            None => return Err(StoreError::Unavailable("no reply to ZSCORE".into())),
        };
        // Refusals in flight may have inflated the TAT; the bucket itself is never more than
        // `burst` intervals from full.
        let (remaining, reset_after_ns) = gcra::peek(tat_ns, now_ns, bucket);
        let full_ns = u64::from(bucket.burst.max(1)).saturating_mul(bucket.emission_interval_ns());
        Ok((remaining, reset_after_ns.min(full_ns)))
    }

    /// Undoes an admission of a key that turned out revoked: its quota unit back, its TAT
    /// gone again (the `ZADD` made it anew, and without an expiry when the node had touched
    /// the key within the minute).
    async fn undo_revoked(&self, tat: &[&str], quota: &[&str]) {
        let mut c = Commands::new();
        c.push(&[Arg::Str("DEL"), Arg::Concat(tat)])
            .push(&[Arg::Str("DECR"), Arg::Concat(quota)]);
        if let Err(e) = self.run(Budget::Admission, &c).await {
            self.refunds_failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(error = %e, "could not give back a revoked key's usage");
        }
    }

    async fn compensate(&self, tat: &[&str], quota: &[&str], t_us: u64) {
        let mut c = Commands::new();
        c.push(&[
            Arg::Str("ZINCRBY"),
            Arg::Concat(tat),
            Arg::Int(-i64::try_from(t_us).unwrap_or(i64::MAX)),
            Arg::Str("t"),
        ])
        .push(&[Arg::Str("DECR"), Arg::Concat(quota)]);
        // Not retried: a refund whose reply was lost may have been applied, and applying it
        // twice would admit an extra request. A lost one only refuses early; it is counted.
        if let Err(e) = self.run(Budget::Admission, &c).await {
            self.refunds_failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(error = %e, "could not give back a rejected request's usage");
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        /// The module doc's argument for pipelines without MULTI, checked on a model of the
        /// two commands: however other requests' `ZADD GT` / `ZINCRBY` interleave, each
        /// request reads at least the TAT that serial GCRA (in ZINCRBY order) would give it.
        #[test]
        fn interleaved_pipelines_never_read_less_than_serial_gcra(
            nows in proptest::collection::vec(0u64..1_000, 1..8),
            shuffle in proptest::collection::vec(any::<u32>(), 16),
            tat0 in 0u64..1_000,
        ) {
            const T: u64 = 100;
            let n = nows.len();
            // Each request contributes its ZADD (false) and ZINCRBY (true) event, in a random
            // order in which every ZADD precedes its own ZINCRBY.
            let mut events: Vec<(usize, bool)> =
                (0..n).flat_map(|i| [(i, false), (i, true)]).collect();
            events.sort_by_key(|(i, second)| shuffle[(2 * i + usize::from(*second)) % 16]);
            let mut seen = vec![false; n];
            for e in events.iter_mut() {
                e.1 = seen[e.0];
                seen[e.0] = true;
            }
            let (mut tat, mut serial) = (tat0, tat0);
            for (i, is_incr) in events {
                if is_incr {
                    tat += T;
                    serial = serial.max(nows[i]) + T;
                    prop_assert!(tat >= serial, "read {tat}, serial GCRA {serial}");
                } else {
                    tat = tat.max(nows[i]);
                }
            }
        }
    }
}
