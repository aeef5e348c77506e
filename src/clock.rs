//! Time as the gateway sees it: injected, so limits and tokens are testable without sleeps.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of the current time, in nanoseconds since the Unix epoch.
pub trait Clock: Send + Sync {
    /// Nanoseconds since the Unix epoch.
    fn now_ns(&self) -> u64;

    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64 {
        self.now_ns() / 1_000_000
    }

    /// Whole seconds since the Unix epoch.
    fn now_unix(&self) -> i64 {
        i64::try_from(self.now_ns() / 1_000_000_000).unwrap_or(i64::MAX)
    }
}

/// The operating system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ns(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to: for tests and benchmarks.
#[derive(Debug)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock frozen at `now_ns`.
    pub fn new(now_ns: u64) -> Self {
        Self(AtomicU64::new(now_ns))
    }

    /// A clock frozen at the given Unix second.
    pub fn at_unix(secs: u64) -> Self {
        Self::new(secs.saturating_mul(1_000_000_000))
    }

    /// Moves the clock forward.
    pub fn advance_ns(&self, ns: u64) {
        self.0.fetch_add(ns, Ordering::SeqCst);
    }

    /// Moves the clock forward by whole milliseconds.
    pub fn advance_ms(&self, ms: u64) {
        self.advance_ns(ms.saturating_mul(1_000_000));
    }

    /// Sets the clock.
    pub fn set_ns(&self, ns: u64) {
        self.0.store(ns, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}
