//! A circuit breaker: after repeated store failures, fail fast for a cool-down instead of
//! adding a deadline's worth of latency to every request.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

pub struct Breaker {
    epoch: Instant,
    /// Consecutive failures; at `threshold` the breaker opens.
    failures: AtomicU32,
    /// Nanoseconds since `epoch` until which calls are refused.
    open_until: AtomicU64,
    threshold: u32,
    cooldown_ns: u64,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown_ns: u64) -> Self {
        Self {
            epoch: Instant::now(),
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            threshold: threshold.max(1),
            cooldown_ns,
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// False while open: the caller must not touch the store.
    pub fn allows(&self) -> bool {
        self.now() >= self.open_until.load(Ordering::Relaxed)
    }

    /// True while open or half-open (tripped and not yet proven healthy).
    pub fn is_tripped(&self) -> bool {
        self.failures.load(Ordering::Relaxed) >= self.threshold
    }

    pub fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// Counts a failure; opens at the threshold, and again at once on a failed half-open probe.
    pub fn failure(&self) {
        let n = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if n >= self.threshold {
            self.failures.store(self.threshold, Ordering::Relaxed);
            self.open_until.store(
                self.now().saturating_add(self.cooldown_ns),
                Ordering::Relaxed,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_at_the_threshold_and_closes_on_success() {
        let b = Breaker::new(3, 60_000_000_000);
        b.failure();
        b.failure();
        assert!(b.allows() && !b.is_tripped());
        b.failure();
        assert!(!b.allows() && b.is_tripped());
        b.success();
        assert!(!b.is_tripped());
    }

    #[test]
    fn a_failed_probe_reopens_at_once() {
        let b = Breaker::new(3, 0);
        for _ in 0..3 {
            b.failure();
        }
        assert!(b.allows(), "zero cool-down: half-open at once");
        b.failure();
        assert!(b.is_tripped());
    }
}
