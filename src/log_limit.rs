//! Log lines at a bounded rate: during an outage every request fails the same way, and one line
//! per request would flood the disk. At most one line per interval passes, carrying how many
//! were suppressed since the last one.

use std::sync::atomic::{AtomicU64, Ordering};

/// One kind of log line, let through at most once per `interval_ns`.
pub(crate) struct LogLimit {
    interval_ns: u64,
    /// When the last line passed (0: never).
    last_ns: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimit {
    pub(crate) const fn per_second() -> Self {
        Self {
            interval_ns: 1_000_000_000,
            last_ns: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: log now, `n` lines were suppressed since the last one; `None`: count this
    /// one as suppressed.
    pub(crate) fn admit(&self, now_ns: u64) -> Option<u64> {
        let last = self.last_ns.load(Ordering::Acquire);
        if last != 0 && now_ns.saturating_sub(last) < self.interval_ns {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // One thread wins the slot; the others count as suppressed.
        match self.last_ns.compare_exchange(
            last,
            now_ns.max(1),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Some(self.suppressed.swap(0, Ordering::Relaxed)),
            Err(_) => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_with_the_count_of_the_others() {
        let l = LogLimit::per_second();
        assert_eq!(l.admit(5_000_000_000), Some(0));
        for t in 1..=99 {
            assert_eq!(l.admit(5_000_000_000 + t * 1_000_000), None);
        }
        assert_eq!(l.admit(6_000_000_000), Some(99));
        assert_eq!(l.admit(6_500_000_000), None);
        assert_eq!(l.admit(9_000_000_000), Some(1));
    }
}
