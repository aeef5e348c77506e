//! Local token buckets, one per key, bounded in memory: per client IP on open routes, per
//! account on the console's key-management writes. Local to the node.

use crate::cache::{keyed_dash_map, KeyedDashMap};
use crate::limits::gcra::{self, BucketDecision, BucketParams};
use std::hash::Hash;
use std::net::IpAddr;

/// Buckets keyed by `K`: each key's theoretical arrival time and when it was last seen.
/// When full, expired buckets go first (a full bucket is as good as an absent one), then the
/// least recently seen eighth: a flood of new keys never resets the others' buckets.
pub struct LocalLimiter<K: Hash + Eq> {
    buckets: KeyedDashMap<K, (u64, u64)>,
    capacity: usize,
}

/// Per (route index, client IP).
pub(crate) type IpLimiter = LocalLimiter<(usize, IpAddr)>;

impl<K: Hash + Eq> LocalLimiter<K> {
    pub fn new(capacity: usize) -> Self {
        Self {
            buckets: keyed_dash_map(),
            capacity: capacity.max(1),
        }
    }

    /// `Ok(())` when admitted, `Err(retry_after_ns)` when over the limit.
    pub fn check(&self, key: K, now_ns: u64, params: BucketParams) -> Result<(), u64> {
        self.check_every(key, now_ns, params.emission_interval_ns(), params.burst)
    }

    /// As [`Self::check`], for one token every `interval_ns` up to `burst`.
    pub fn check_every(
        &self,
        key: K,
        now_ns: u64,
        interval_ns: u64,
        burst: u32,
    ) -> Result<(), u64> {
        if self.buckets.len() >= self.capacity && !self.buckets.contains_key(&key) {
            self.make_room(now_ns);
        }
        let mut entry = self.buckets.entry(key).or_insert((0, now_ns));
        let (tat, seen) = &mut *entry;
        *seen = now_ns;
        match gcra::decide_every(Some(*tat).filter(|t| *t > 0), now_ns, interval_ns, burst) {
            BucketDecision::Allow { new_tat_ns, .. } => {
                *tat = new_tat_ns;
                Ok(())
            }
            BucketDecision::Deny { retry_after_ns, .. } => Err(retry_after_ns),
        }
    }

    /// `Some(retry_after_ns)` when `key` has no token left now; consumes nothing, but counts
    /// as seeing `key` (a client refused all along is not the first one a full table forgets).
    pub(crate) fn exhausted(
        &self,
        key: &K,
        now_ns: u64,
        interval_ns: u64,
        burst: u32,
    ) -> Option<u64> {
        let tat = self.buckets.get_mut(key).map(|mut e| {
            e.value_mut().1 = now_ns;
            e.value().0
        })?;
        match gcra::decide_every(Some(tat).filter(|t| *t > 0), now_ns, interval_ns, burst) {
            BucketDecision::Deny { retry_after_ns, .. } => Some(retry_after_ns),
            BucketDecision::Allow { .. } => None,
        }
    }

    /// Drops the buckets that are full again, then, if that is not enough, the least recently
    /// seen eighth of the table.
    fn make_room(&self, now_ns: u64) {
        self.buckets.retain(|_, (tat, _)| *tat > now_ns);
        if self.buckets.len() < self.capacity {
            return;
        }
        let mut seen: Vec<u64> = self.buckets.iter().map(|e| e.value().1).collect();
        let cut = (seen.len() / 8).max(1);
        let (_, cutoff, _) = seen.select_nth_unstable(cut - 1);
        let cutoff = *cutoff;
        let mut dropped = 0;
        self.buckets.retain(|_, (_, s)| {
            let drop = *s <= cutoff && dropped < cut;
            dropped += usize::from(drop);
            !drop
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_each_ip_separately_and_stays_bounded() {
        let l = IpLimiter::new(4);
        let p = BucketParams {
            rate_per_second: 1,
            burst: 2,
        };
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(l.check((0, a), 1, p).is_ok());
        assert!(l.check((0, a), 1, p).is_ok());
        assert!(l.check((0, a), 1, p).is_err());
        assert!(l.check((0, b), 1, p).is_ok());
        for i in 0..100u8 {
            let _ = l.check((0, IpAddr::from([10, 1, 0, i])), 1, p);
            assert!(l.buckets.len() <= 4);
        }
    }

    #[test]
    fn a_full_table_forgets_the_least_recently_seen_not_everyone() {
        let l: LocalLimiter<u32> = LocalLimiter::new(16);
        let p = BucketParams {
            rate_per_second: 1,
            burst: 1,
        };
        // Key 0 is seen all along and spends its one token at once.
        assert!(l.check(0, 1, p).is_ok());
        for (now, key) in (2..200u64).zip(1..) {
            let _ = l.check(key, now, p);
            assert!(l.buckets.len() <= 16);
            // The abuser's empty bucket survives the flood of new keys.
            assert!(l.check(0, now, p).is_err(), "key 0 was forgotten at {now}");
        }
    }

    #[test]
    fn slower_than_a_second() {
        let l: LocalLimiter<&str> = LocalLimiter::new(4);
        let six_s = 6_000_000_000;
        for _ in 0..10 {
            assert!(l.check_every("acme", 1, six_s, 10).is_ok());
        }
        assert_eq!(l.check_every("acme", 1, six_s, 10), Err(six_s));
        assert!(l.check_every("acme", 1 + six_s, six_s, 10).is_ok());
        assert!(l.check_every("other", 1, six_s, 10).is_ok());
    }
}
