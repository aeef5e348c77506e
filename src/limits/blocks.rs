//! Keys the store found over their rate, remembered locally until a token can exist again:
//! an abusive key costs no store round trip (as Envoy's ratelimit "local cache" does).

use crate::cache::BoundedCache;

/// The local verdict on a key's rate before asking the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RateGate {
    /// Nothing known: ask the store.
    Open,
    /// This request asks the store on behalf of a key that was just blocked.
    Probe,
    /// Refused here, no store call.
    Refuse {
        retry_after_ns: u64,
        reset_after_ns: u64,
    },
}

/// key id -> (blocked until, bucket full at), Unix ns. Bounded; an entry is never useful for
/// longer than a bucket takes to refill (seconds).
pub(crate) struct RateBlocks {
    blocks: BoundedCache<String, (u64, u64)>,
}

impl RateBlocks {
    /// At most `capacity` keys (one per known key at most: size it like the key cache).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            blocks: BoundedCache::new(capacity, 60_000_000_000),
        }
    }

    /// Remembers that `key_id` gets no token before `until_ns`: nothing can give it one
    /// earlier (other nodes only take tokens), so refusing locally until then is exact.
    pub(crate) fn block(&self, key_id: &str, until_ns: u64, full_at_ns: u64, now_ns: u64) {
        self.blocks
            .insert(key_id.to_owned(), (until_ns, full_at_ns), now_ns);
    }

    /// Forgets a key's block (the store admitted it with tokens to spare, or failed).
    pub(crate) fn unblock(&self, key_id: &str) {
        self.blocks.remove(key_id);
    }

    /// Forgets every block (the store may have lost its counters).
    pub(crate) fn clear(&self) {
        self.blocks.clear();
    }

    /// When a blocked key's bucket is full again (nanoseconds from `now_ns`), if it is blocked
    /// now; changes nothing (a refusal before the bucket reports it, and takes no turn).
    pub(crate) fn blocked_until_full(&self, key_id: &str, now_ns: u64) -> Option<u64> {
        self.blocks
            .get(key_id, now_ns)
            .filter(|(until, _)| now_ns < *until)
            .map(|(_, full_at)| full_at.saturating_sub(now_ns))
    }

    /// What the local blocks say about a request of `key_id` at `now_ns`. Within one emission
    /// interval after a block ends, at most one token exists: one request asks the store
    /// (`Probe`) and the others are refused until it has answered.
    pub(crate) fn gate(&self, key_id: &str, now_ns: u64, interval_ns: u64) -> RateGate {
        self.blocks
            .update(key_id, now_ns, |(until, full_at)| {
                if now_ns < *until {
                    RateGate::Refuse {
                        retry_after_ns: *until - now_ns,
                        reset_after_ns: full_at.saturating_sub(now_ns),
                    }
                } else if now_ns < until.saturating_add(interval_ns) {
                    *until = now_ns.saturating_add(interval_ns);
                    RateGate::Probe
                } else {
                    RateGate::Open
                }
            })
            .unwrap_or(RateGate::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_key_is_refused_then_probed_once_then_open() {
        let b = RateBlocks::new(10);
        let t = 100_000_000; // one token every 100 ms
        assert_eq!(b.gate("k", 0, t), RateGate::Open);
        b.block("k", 1_000, 5_000, 0);
        assert_eq!(
            b.gate("k", 400, t),
            RateGate::Refuse {
                retry_after_ns: 600,
                reset_after_ns: 4_600
            }
        );
        // The block is over: one request asks the store, the others wait for its answer.
        assert_eq!(b.gate("k", 1_000, t), RateGate::Probe);
        assert!(matches!(b.gate("k", 1_001, t), RateGate::Refuse { .. }));
        assert_eq!(b.gate("k", 1_000 + 2 * t, t), RateGate::Open);
        assert_eq!(b.blocked_until_full("k", 1_000 + 2 * t), None);
        b.block("k", 9_000, 9_500, 2_000);
        assert_eq!(b.blocked_until_full("k", 2_500), Some(7_000));
        assert_eq!(
            b.gate("k", 2_500, t),
            RateGate::Refuse {
                retry_after_ns: 6_500,
                reset_after_ns: 7_000
            }
        );
        assert_eq!(b.blocked_until_full("k", 9_000), None);
        b.unblock("k");
        assert_eq!(b.gate("k", 2_001, t), RateGate::Open);
        b.block("k", 9_000, 9_000, 2_000);
        b.clear();
        assert_eq!(b.gate("k", 2_001, t), RateGate::Open);
        assert_eq!(b.gate("other", 2_001, t), RateGate::Open);
    }
}
