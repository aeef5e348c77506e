//! Per-client-IP token buckets for open routes: local to the node, bounded in memory.

use crate::limits::gcra::{self, BucketDecision, BucketParams};
use dashmap::DashMap;
use std::net::IpAddr;

/// Buckets keyed by (route index, client IP).
pub struct IpLimiter {
    buckets: DashMap<(usize, IpAddr), u64>,
    capacity: usize,
}

impl IpLimiter {
    pub fn new(capacity: usize) -> Self {
        Self {
            buckets: DashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// `Ok(())` when admitted, `Err(retry_after_ns)` when over the limit.
    pub fn check(
        &self,
        route: usize,
        ip: IpAddr,
        now_ns: u64,
        params: BucketParams,
    ) -> Result<(), u64> {
        if self.buckets.len() >= self.capacity {
            // Full buckets are as good as absent: forget them first.
            self.buckets.retain(|_, tat| *tat > now_ns);
            if self.buckets.len() >= self.capacity {
                self.buckets.clear();
            }
        }
        let mut tat = self.buckets.entry((route, ip)).or_insert(0);
        match gcra::decide(Some(*tat).filter(|t| *t > 0), now_ns, params) {
            BucketDecision::Allow { new_tat_ns, .. } => {
                *tat = new_tat_ns;
                Ok(())
            }
            BucketDecision::Deny { retry_after_ns, .. } => Err(retry_after_ns),
        }
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
        assert!(l.check(0, a, 1, p).is_ok());
        assert!(l.check(0, a, 1, p).is_ok());
        assert!(l.check(0, a, 1, p).is_err());
        assert!(l.check(0, b, 1, p).is_ok());
        for i in 0..100u8 {
            let _ = l.check(0, IpAddr::from([10, 1, 0, i]), 1, p);
            assert!(l.buckets.len() <= 4);
        }
    }
}
