//! W3C Trace Context (`traceparent`, `tracestate`): a client's valid trace is continued (its
//! trace id kept, this hop given a new span id), anything else starts a new trace with random
//! ids. The gateway's `traceparent` is what the upstream receives; `tracestate` goes along
//! unchanged when it is well-formed and bounded. Random ids come from the OS's random source,
//! drawn a few kilobytes at a time per thread.

use std::cell::RefCell;

/// Longest `tracestate` passed on (the spec's 32 members of 256 characters would be 8 KiB;
/// real ones are short, and this is a header an attacker writes).
const TRACESTATE_MAX: usize = 512;

/// The trace a request belongs to and this hop's span in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TraceContext {
    pub(crate) trace_id: [u8; 16],
    /// This gateway's span: the parent id the upstream sees.
    pub(crate) span_id: [u8; 8],
    /// The caller's span, when the trace was continued.
    pub(crate) parent_id: Option<[u8; 8]>,
    pub(crate) flags: u8,
}

thread_local! {
    /// Random bytes not handed out yet.
    static POOL: RefCell<(Vec<u8>, usize)> = const { RefCell::new((Vec::new(), 0)) };
}

/// Fills `out` with random bytes (the OS's source, refilled 4 KiB at a time).
fn random(out: &mut [u8]) {
    POOL.with(|pool| {
        let (bytes, used) = &mut *pool.borrow_mut();
        if bytes.len() < *used + out.len() {
            bytes.resize(4096, 0);
            if getrandom::getrandom(bytes).is_err() {
                // Without the OS's source: the process's hash keys (random at start) and the
                // clock, so that ids are at least distinct and never all zero.
                use std::hash::{BuildHasher, Hasher};
                let state = std::collections::hash_map::RandomState::new();
                for (i, chunk) in bytes.chunks_mut(8).enumerate() {
                    let mut h = state.build_hasher();
                    h.write_usize(i);
                    h.write_u128(
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_nanos()),
                    );
                    chunk.copy_from_slice(&h.finish().to_le_bytes()[..chunk.len()]);
                }
            }
            *used = 0;
        }
        out.copy_from_slice(&bytes[*used..*used + out.len()]);
        *used += out.len();
    });
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Lowercase hex into `out`; false on anything else.
fn unhex(s: &[u8], out: &mut [u8]) -> bool {
    s.len() == out.len() * 2
        && s.chunks(2).zip(out.iter_mut()).all(|(pair, o)| {
            match (hex_value(pair[0]), hex_value(pair[1])) {
                (Some(h), Some(l)) => {
                    *o = h << 4 | l;
                    true
                }
                _ => false,
            }
        })
}

/// Parses a `traceparent` value: `00-<32 hex>-<16 hex>-<2 hex>` (a later version may add
/// fields after a `-`); `None` when it is not valid (all-zero ids, version `ff`, upper case).
pub(crate) fn parse_traceparent(v: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    if v.len() < 55 || (v.len() > 55 && (v[..2] == *b"00" || v[55] != b'-')) {
        return None;
    }
    let mut version = [0u8; 1];
    if !unhex(&v[..2], &mut version) || version[0] == 0xff || v[2] != b'-' {
        return None;
    }
    let (mut trace, mut parent, mut flags) = ([0u8; 16], [0u8; 8], [0u8; 1]);
    let ok = unhex(&v[3..35], &mut trace)
        && v[35] == b'-'
        && unhex(&v[36..52], &mut parent)
        && v[52] == b'-'
        && unhex(&v[53..55], &mut flags);
    (ok && trace != [0; 16] && parent != [0; 8]).then_some((trace, parent, flags[0]))
}

/// True for a `tracestate` worth passing on: bounded, printable ASCII.
pub(crate) fn tracestate_ok(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= TRACESTATE_MAX && v.iter().all(|b| (0x20..0x7f).contains(b))
}

impl TraceContext {
    /// No trace yet (before the request head is read): no random draw for it.
    pub(crate) const NONE: Self = Self {
        trace_id: [0; 16],
        span_id: [0; 8],
        parent_id: None,
        flags: 0,
    };

    /// Continues the caller's trace when `traceparent` is valid, else starts one. When
    /// `recorded` (this gateway exports its spans) it is a hop of its own, and the traces it
    /// starts are marked sampled; otherwise a continued trace goes on with the caller's span as
    /// the parent, so that no span points at one that is never exported.
    pub(crate) fn from_request(traceparent: Option<&[u8]>, recorded: bool) -> Self {
        let mut span_id = [0u8; 8];
        match traceparent.and_then(parse_traceparent) {
            Some((trace_id, parent, flags)) => {
                if recorded {
                    random(&mut span_id);
                } else {
                    span_id = parent;
                }
                Self {
                    trace_id,
                    span_id,
                    parent_id: Some(parent),
                    // Only the sampled bit is defined for version 00.
                    flags: flags & 1,
                }
            }
            None => {
                random(&mut span_id);
                let mut trace_id = [0u8; 16];
                random(&mut trace_id);
                Self {
                    trace_id,
                    span_id,
                    parent_id: None,
                    flags: u8::from(recorded),
                }
            }
        }
    }

    /// A request id for a request that brought none: the trace id when this request started
    /// the trace; else the trace id and a random suffix (requests of one client trace differ).
    pub(crate) fn request_id(&self) -> String {
        if self.parent_id.is_none() {
            return self.trace_hex();
        }
        let mut suffix = [0u8; 8];
        random(&mut suffix);
        format!("{}-{}", self.trace_hex(), hex::encode(suffix))
    }

    /// The trace id in lowercase hex (32 characters).
    pub(crate) fn trace_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// The `traceparent` the upstream gets: this trace, this hop's span (the reference the
    /// header value is tested against).
    #[cfg(test)]
    pub(crate) fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            self.flags
        )
    }

    /// [`TraceContext::traceparent`] as a header value, built on the stack (once per request).
    pub(crate) fn traceparent_value(&self) -> http::HeaderValue {
        let mut buf = [0u8; 55];
        buf[..3].copy_from_slice(b"00-");
        hex_into(&self.trace_id, &mut buf[3..35]);
        buf[35] = b'-';
        hex_into(&self.span_id, &mut buf[36..52]);
        buf[52] = b'-';
        hex_into(&[self.flags], &mut buf[53..55]);
        http::HeaderValue::from_bytes(&buf).unwrap_or(http::HeaderValue::from_static(""))
    }

    /// [`TraceContext::request_id`] as a header value, without a `String` for the common case
    /// (a trace started here).
    pub(crate) fn request_id_value(&self) -> http::HeaderValue {
        if self.parent_id.is_some() {
            return http::HeaderValue::from_str(&self.request_id())
                .unwrap_or(http::HeaderValue::from_static(""));
        }
        let mut buf = [0u8; 32];
        hex_into(&self.trace_id, &mut buf);
        http::HeaderValue::from_bytes(&buf).unwrap_or(http::HeaderValue::from_static(""))
    }
}

/// Lowercase hex of `bytes` into `out` (twice as long).
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_mut(2)) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0x0f)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_continued_with_a_new_span() {
        // Not recording: the caller's span stays the parent the upstream sees.
        let passed = TraceContext::from_request(Some(VALID.as_bytes()), false);
        assert_eq!(passed.traceparent(), VALID);
        let t = TraceContext::from_request(Some(VALID.as_bytes()), true);
        assert_eq!(t.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id, Some(*b"\x00\xf0\x67\xaa\x0b\xa9\x02\xb7"));
        assert_ne!(t.span_id, t.parent_id.unwrap());
        let out = t.traceparent();
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(out.ends_with("-01"), "{out}");
        assert_eq!(parse_traceparent(out.as_bytes()).unwrap().0, t.trace_id);
        // A later version with more fields is read for what version 00 defines.
        let future = format!("01{}-extra", &VALID[2..]);
        assert!(parse_traceparent(future.as_bytes()).is_some());
    }

    #[test]
    fn invalid_traceparents_start_a_new_random_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad}");
        }
        let a = TraceContext::from_request(Some(b"garbage"), false);
        let b = TraceContext::from_request(None, true);
        assert_eq!(a.parent_id, None);
        assert_ne!(a.trace_id, b.trace_id);
        assert_ne!(a.trace_id, [0; 16]);
        assert_eq!((a.flags, b.flags), (0, 1));
    }

    #[test]
    fn tracestate_is_bounded_printable_ascii() {
        assert!(tracestate_ok(b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"));
        assert!(!tracestate_ok(b""));
        assert!(!tracestate_ok(&[b'a'; 513]));
        assert!(!tracestate_ok(b"a=\x01"));
    }

    #[test]
    fn header_values_are_the_strings() {
        for t in [
            TraceContext::from_request(None, true),
            TraceContext::from_request(Some(VALID.as_bytes()), true),
        ] {
            assert_eq!(t.traceparent_value(), t.traceparent().as_str());
            let id = t.request_id_value();
            let id = id.to_str().unwrap();
            assert!(id.starts_with(&t.trace_hex()), "{id}");
            assert_eq!(id.len(), if t.parent_id.is_some() { 49 } else { 32 });
        }
    }

    proptest! {
        /// What the gateway writes always parses back to the same trace.
        #[test]
        fn written_traceparents_parse_back(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let t = TraceContext::from_request(Some(&bytes), true);
            let out = t.traceparent();
            let (trace, span, flags) = parse_traceparent(out.as_bytes()).unwrap();
            prop_assert_eq!((trace, span, flags), (t.trace_id, t.span_id, t.flags));
        }
    }
}
