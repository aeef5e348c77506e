//! Header values the gateway writes (rate-limit state, request ids, the forwarding chain). The
//! client headers it removes because they would speak for it are `config::OwnedNames`.

use http::{HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

/// The rate-limit state a response reports (IETF ratelimit-headers draft plus X-RateLimit-*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RateHeaders {
    pub burst: u32,
    /// Seconds the burst window spans (`burst / rate`, at least 1).
    pub burst_window: u64,
    pub quota: u64,
    pub period_secs: u64,
    /// (remaining, seconds to refill) once the limiter has been consulted.
    pub live: Option<(u32, u64)>,
}

/// Whole seconds, rounded up.
pub(crate) fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

/// A header value assembled in a stack buffer from text and numbers (`itoa`), without
/// `core::fmt`: on the hot path, `format!` cost more than the rest of a header insert (session 2
/// profile: about 2.9 k instructions per request, docs/lab-notes/). Numbers here are at most 20
/// digits and every value well under the buffer; should one not fit, it is cut, never overrun.
/// Built in place (`&mut self`): a builder passed by value copied its buffer at every step.
struct ValueBuf {
    buf: [u8; 128],
    len: usize,
}

impl ValueBuf {
    fn new() -> Self {
        Self {
            buf: [0; 128],
            len: 0,
        }
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        let n = b.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
        self
    }

    fn num(&mut self, n: u64) -> &mut Self {
        self.bytes(itoa::Buffer::new().format(n).as_bytes())
    }

    fn ip(&mut self, ip: IpAddr) -> &mut Self {
        match ip {
            IpAddr::V4(v4) => {
                let [a, b, c, d] = v4.octets();
                self.num(a.into())
                    .bytes(b".")
                    .num(b.into())
                    .bytes(b".")
                    .num(c.into())
                    .bytes(b".")
                    .num(d.into())
            }
            IpAddr::V6(v6) => self.bytes(v6.to_string().as_bytes()),
        }
    }

    fn value(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.buf[..self.len])
            .unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

impl RateHeaders {
    /// Writes the headers (replacing any of the same name), in the order they are sent.
    pub(crate) fn write_to(&self, headers: &mut HeaderMap) {
        headers.insert(
            RATELIMIT_POLICY.clone(),
            ValueBuf::new()
                .bytes(b"\"burst\";q=")
                .num(self.burst.into())
                .bytes(b";w=")
                .num(self.burst_window)
                .bytes(b", \"monthly\";q=")
                .num(self.quota)
                .bytes(b";w=")
                .num(self.period_secs)
                .value(),
        );
        headers.insert(
            X_RATELIMIT_LIMIT.clone(),
            crate::errors::number_value(self.burst.into()),
        );
        if let Some((remaining, reset)) = self.live {
            headers.insert(
                RATELIMIT.clone(),
                ValueBuf::new()
                    .bytes(b"\"burst\";r=")
                    .num(remaining.into())
                    .bytes(b";t=")
                    .num(reset)
                    .value(),
            );
            headers.insert(
                X_RATELIMIT_REMAINING.clone(),
                crate::errors::number_value(remaining.into()),
            );
            headers.insert(
                X_RATELIMIT_RESET.clone(),
                crate::errors::number_value(reset),
            );
        }
    }
}

/// Removes the headers that say a key's live rate state ([`RateHeaders::write_to`] writes them
/// only when it has that state).
pub(crate) fn remove_live_rate(headers: &mut HeaderMap) {
    for name in [&RATELIMIT, &X_RATELIMIT_REMAINING, &X_RATELIMIT_RESET] {
        headers.remove(name);
    }
}

/// Several `Cookie` fields made one, joined by `; `: HTTP/2 sends each cookie as its own field
/// and RFC 9113 §8.2.3 asks for one before HTTP/1.1, where a backend reading only the first
/// `Cookie` line would see part of what the gateway checked. One field is left as it is.
pub(crate) fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(http::header::COOKIE).iter();
    let (Some(first), Some(second)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for value in std::iter::once(second).chain(values) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(value.as_bytes());
    }
    // Each part was a valid field value, and so is their join.
    if let Ok(one) = HeaderValue::from_bytes(&joined) {
        headers.insert(http::header::COOKIE, one);
    }
}

/// Addresses as one `X-Forwarded-For` value, `a, b, c`.
pub(crate) fn chain_value(ips: impl Iterator<Item = IpAddr>) -> HeaderValue {
    let mut out = Vec::with_capacity(64);
    for (i, ip) in ips.enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        let mut v = ValueBuf::new();
        v.ip(ip);
        out.extend_from_slice(&v.buf[..v.len]);
    }
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `prior` (a trusted chain) with `ip` appended, or `ip` alone.
pub(crate) fn forwarded_for(prior: Option<&HeaderValue>, ip: IpAddr) -> HeaderValue {
    match prior.and_then(|v| v.to_str().ok()).map(str::trim) {
        Some(prior) if !prior.is_empty() => {
            // A chain of proxies can be longer than the stack buffer.
            let mut last = ValueBuf::new();
            last.ip(ip);
            let mut chain = Vec::with_capacity(prior.len() + 2 + last.len);
            chain.extend_from_slice(prior.as_bytes());
            chain.extend_from_slice(b", ");
            chain.extend_from_slice(&last.buf[..last.len]);
            HeaderValue::from_bytes(&chain).unwrap_or_else(|_| last.value())
        }
        _ => ValueBuf::new().ip(ip).value(),
    }
}

/// Whether a trusted proxy's `X-Forwarded-Proto` says `https`: its last entry (the last line,
/// the last of a comma list), since a proxy that appends puts its own word after whatever the
/// client sent.
pub(crate) fn last_says_https(h: &HeaderMap) -> bool {
    h.get_all("x-forwarded-proto")
        .iter()
        .next_back()
        .and_then(|v| v.as_bytes().rsplit(|b| *b == b',').next())
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"https"))
}

/// A client-supplied request id is kept when it is 1–128 characters of `[A-Za-z0-9._:-]`.
pub(crate) fn is_sane_request_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trusted_proxy_is_believed_on_its_last_word_about_the_scheme() {
        let says = |lines: &[&str]| {
            let mut h = HeaderMap::new();
            for line in lines {
                h.append("x-forwarded-proto", HeaderValue::from_str(line).unwrap());
            }
            last_says_https(&h)
        };
        assert!(says(&["https"]));
        assert!(says(&["HTTPS "]));
        assert!(says(&["http", "https"]));
        assert!(says(&["http, https"]));
        assert!(!says(&["https", "http"]));
        assert!(!says(&["https, http"]));
        assert!(!says(&["https,"]));
        assert!(!says(&[]));
    }

    #[test]
    fn rate_headers_word_for_word() {
        let h = RateHeaders {
            burst: 10,
            burst_window: 1,
            quota: 1000,
            period_secs: 2_592_000,
            live: Some((9, 1)),
        };
        let mut map = HeaderMap::new();
        h.write_to(&mut map);
        let pairs: Vec<(&str, &str)> = map
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            pairs,
            vec![
                (
                    "ratelimit-policy",
                    "\"burst\";q=10;w=1, \"monthly\";q=1000;w=2592000"
                ),
                ("x-ratelimit-limit", "10"),
                ("ratelimit", "\"burst\";r=9;t=1"),
                ("x-ratelimit-remaining", "9"),
                ("x-ratelimit-reset", "1"),
            ]
        );
        let mut map = HeaderMap::new();
        RateHeaders { live: None, ..h }.write_to(&mut map);
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn value_buf_writes_numbers_like_display() {
        for n in [0, 7, 10, 99, 1_000, 4_294_967_295, u64::MAX] {
            assert_eq!(ValueBuf::new().num(n).value(), n.to_string().as_str());
        }
        let long = "x".repeat(200);
        assert_eq!(ValueBuf::new().bytes(long.as_bytes()).len, 128);
    }

    proptest::proptest! {
        #[test]
        fn value_buf_num_matches_to_string(n: u64) {
            let expected = n.to_string();
            proptest::prop_assert_eq!(ValueBuf::new().num(n).value(), expected.as_str());
        }
    }

    #[test]
    fn forwarded_for_appends_to_a_prior_value() {
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        assert_eq!(forwarded_for(None, ip), "10.0.0.7");
        let blank = HeaderValue::from_static("  ");
        assert_eq!(forwarded_for(Some(&blank), ip), "10.0.0.7");
        let prior = HeaderValue::from_static("203.0.113.9");
        assert_eq!(forwarded_for(Some(&prior), ip), "203.0.113.9, 10.0.0.7");
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(forwarded_for(None, v6), "::1");
        let chain = vec!["203.0.113.9"; 20].join(", ");
        let appended = forwarded_for(Some(&HeaderValue::from_str(&chain).unwrap()), ip);
        assert_eq!(appended, format!("{chain}, 10.0.0.7").as_str());
    }

    #[test]
    fn request_ids() {
        assert!(is_sane_request_id(b"abc-123_x.y:z"));
        assert!(!is_sane_request_id(b""));
        assert!(!is_sane_request_id(b"a b"));
        assert!(!is_sane_request_id(&[b'a'; 129]));
    }

    #[test]
    fn ceil() {
        assert_eq!(ceil_secs(0), 0);
        assert_eq!(ceil_secs(1), 1);
        assert_eq!(ceil_secs(1_000_000_000), 1);
        assert_eq!(ceil_secs(1_000_000_001), 2);
    }

    #[test]
    fn cookie_fields_are_joined_only_when_there_are_several() {
        let mut h = HeaderMap::new();
        join_cookies(&mut h);
        assert!(h.is_empty());
        h.append(http::header::COOKIE, HeaderValue::from_static("a=1"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(http::header::COOKIE).iter().count(), 1);
        h.append(http::header::COOKIE, HeaderValue::from_static("b=2; c=3"));
        h.append(http::header::COOKIE, HeaderValue::from_static("d=4"));
        join_cookies(&mut h);
        let all: Vec<_> = h.get_all(http::header::COOKIE).iter().collect();
        assert_eq!(all, ["a=1; b=2; c=3; d=4"]);
    }
}
