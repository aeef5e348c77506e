//! Header values the gateway writes: rate-limit state and request ids.

use http::HeaderValue;
use std::sync::atomic::{AtomicU64, Ordering};

/// The rate-limit state a response reports (IETF ratelimit-headers draft plus X-RateLimit-*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateHeaders {
    pub burst: u32,
    /// Seconds the burst window spans (`burst / rate`, at least 1).
    pub burst_window: u64,
    pub quota: u64,
    pub period_secs: u64,
    /// (remaining, seconds to refill) once the limiter has been consulted.
    pub live: Option<(u32, u64)>,
}

/// Whole seconds, rounded up.
pub fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

/// A header value written through a stack buffer: no intermediate `String`.
fn formatted(args: std::fmt::Arguments<'_>) -> HeaderValue {
    use std::io::Write;
    let mut buf = [0u8; 128];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ = cursor.write_fmt(args);
    let n = usize::try_from(cursor.position()).unwrap_or(0);
    HeaderValue::from_bytes(&buf[..n]).unwrap_or_else(|_| HeaderValue::from_static(""))
}

impl RateHeaders {
    /// `(name, value)` pairs, in the order they are sent.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, HeaderValue)> {
        let policy = formatted(format_args!(
            "\"burst\";q={};w={}, \"monthly\";q={};w={}",
            self.burst, self.burst_window, self.quota, self.period_secs
        ));
        let fixed = [
            ("ratelimit-policy", policy),
            ("x-ratelimit-limit", HeaderValue::from(self.burst)),
        ];
        let live = self.live.map(|(remaining, reset)| {
            [
                (
                    "ratelimit",
                    formatted(format_args!("\"burst\";r={remaining};t={reset}")),
                ),
                ("x-ratelimit-remaining", HeaderValue::from(remaining)),
                ("x-ratelimit-reset", HeaderValue::from(reset)),
            ]
        });
        fixed.into_iter().chain(live.into_iter().flatten())
    }
}

/// Request ids: a client's sane one is kept, otherwise 32 hex characters unique to this process.
pub struct RequestIds {
    node: u64,
    counter: AtomicU64,
}

impl RequestIds {
    pub fn new() -> Self {
        let mut seed = [0u8; 8];
        // A failed random source only makes ids less unique across nodes, never wrong here.
        let _ = getrandom::getrandom(&mut seed);
        Self {
            node: u64::from_le_bytes(seed),
            counter: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> HeaderValue {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        formatted(format_args!("{:016x}{n:016x}", self.node))
    }

    /// A client-supplied id is kept when it is 1–128 characters of `[A-Za-z0-9._:-]`.
    pub fn is_sane(id: &[u8]) -> bool {
        !id.is_empty()
            && id.len() <= 128
            && id
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_headers_word_for_word() {
        let h = RateHeaders {
            burst: 10,
            burst_window: 1,
            quota: 1000,
            period_secs: 2_592_000,
            live: Some((9, 1)),
        };
        let pairs: Vec<(&str, String)> = h
            .pairs()
            .map(|(n, v)| (n, v.to_str().unwrap().to_owned()))
            .collect();
        assert_eq!(
            pairs,
            vec![
                (
                    "ratelimit-policy",
                    "\"burst\";q=10;w=1, \"monthly\";q=1000;w=2592000".to_string()
                ),
                ("x-ratelimit-limit", "10".to_string()),
                ("ratelimit", "\"burst\";r=9;t=1".to_string()),
                ("x-ratelimit-remaining", "9".to_string()),
                ("x-ratelimit-reset", "1".to_string()),
            ]
        );
    }

    #[test]
    fn request_ids() {
        let ids = RequestIds::new();
        let (a, b) = (ids.next().to_str().unwrap().to_owned(), ids.next());
        assert_eq!(a.len(), 32);
        assert_ne!(a.as_str(), b.to_str().unwrap());
        assert!(RequestIds::is_sane(b"abc-123_x.y:z"));
        assert!(!RequestIds::is_sane(b""));
        assert!(!RequestIds::is_sane(b"a b"));
        assert!(!RequestIds::is_sane(&[b'a'; 129]));
    }

    #[test]
    fn ceil() {
        assert_eq!(ceil_secs(0), 0);
        assert_eq!(ceil_secs(1), 1);
        assert_eq!(ceil_secs(1_000_000_000), 1);
        assert_eq!(ceil_secs(1_000_000_001), 2);
    }
}
