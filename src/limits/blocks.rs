//! Keys the store found over their rate, remembered locally until a token can exist again:
//! an abusive key costs no store round trip (as Envoy's ratelimit "local cache" does); and
//! buckets read for refusals before them, remembered for an interval.

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

/// What this node knows of one key's bucket, Unix ns.
#[derive(Debug, Clone, Copy)]
struct Known {
    /// No token before this (0: not blocked).
    until_ns: u64,
    /// The bucket is full again at this time.
    full_at_ns: u64,
    /// The bucket as read for a refusal before it (tokens left, read at), if that is what
    /// this entry holds.
    read: Option<(u32, u64)>,
}

/// key id -> what is known of its bucket. Bounded; an entry is never useful for longer than a
/// bucket takes to refill (seconds).
pub(crate) struct RateBlocks {
    blocks: BoundedCache<String, Known>,
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
        let known = Known {
            until_ns,
            full_at_ns,
            read: None,
        };
        self.blocks.insert(key_id.to_owned(), known, now_ns);
    }

    /// Remembers a bucket read for a refusal before it (`remaining` tokens, full after
    /// `reset_after_ns`): a key refused again and again (a lapsed subscription, a scope it
    /// lacks) costs the store one read per emission interval and node, not one per request.
    /// An admission or a block replaces it.
    pub(crate) fn remember_read(
        &self,
        key_id: &str,
        remaining: u32,
        reset_after_ns: u64,
        now_ns: u64,
    ) {
        let known = Known {
            until_ns: 0,
            full_at_ns: now_ns.saturating_add(reset_after_ns),
            read: Some((remaining, now_ns)),
        };
        self.blocks.insert(key_id.to_owned(), known, now_ns);
    }

    /// A bucket read remembered by [`Self::remember_read`] less than `interval_ns` ago:
    /// `(remaining, reset_after_ns)` at `now_ns`.
    pub(crate) fn recent_read(
        &self,
        key_id: &str,
        now_ns: u64,
        interval_ns: u64,
    ) -> Option<(u32, u64)> {
        let known = self.blocks.get(key_id, now_ns)?;
        let (remaining, read_at) = known.read?;
        (now_ns >= read_at && now_ns - read_at < interval_ns)
            .then(|| (remaining, known.full_at_ns.saturating_sub(now_ns)))
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
            .filter(|k| now_ns < k.until_ns)
            .map(|k| k.full_at_ns.saturating_sub(now_ns))
    }

    /// What the local blocks say about a request of `key_id` at `now_ns`. Within one emission
    /// interval after a block ends, at most one token exists: one request asks the store
    /// (`Probe`) and the others are refused until it has answered.
    pub(crate) fn gate(&self, key_id: &str, now_ns: u64, interval_ns: u64) -> RateGate {
        self.blocks
            .update(key_id, now_ns, |k| {
                if k.read.is_some() {
                    // A read, not a block: nothing to hold the request back for.
                    RateGate::Open
                } else if now_ns < k.until_ns {
                    RateGate::Refuse {
                        retry_after_ns: k.until_ns - now_ns,
                        reset_after_ns: k.full_at_ns.saturating_sub(now_ns),
                    }
                } else if now_ns < k.until_ns.saturating_add(interval_ns) {
                    k.until_ns = now_ns.saturating_add(interval_ns);
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
        // A read for a refusal: kept one interval, never a block, replaced by a block.
        b.remember_read("r", 7, 300, 10_000);
        assert_eq!(b.recent_read("r", 10_100, t), Some((7, 200)));
        assert_eq!(b.recent_read("r", 10_000 + t, t), None);
        assert_eq!(b.blocked_until_full("r", 10_100), None);
        assert_eq!(b.gate("r", 10_100, t), RateGate::Open);
        b.block("r", 20_000, 20_000, 10_200);
        assert_eq!(b.recent_read("r", 10_300, t), None);
        b.unblock("k");
        assert_eq!(b.gate("k", 2_001, t), RateGate::Open);
        b.block("k", 9_000, 9_000, 2_000);
        b.clear();
        assert_eq!(b.gate("k", 2_001, t), RateGate::Open);
        assert_eq!(b.gate("other", 2_001, t), RateGate::Open);
    }
}
