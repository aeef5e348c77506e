//! What of an upstream's response head reaches the client: none of the headers that speak of
//! the upstream's own connection, and one plain `Content-Length`.
//!
//! pingora strips hop-by-hop headers from requests only. An upstream's `Keep-Alive: timeout=300`
//! reaching the client would have clients that trust it (undici, Apache HttpClient) reuse a
//! connection the gateway closed at its own keep-alive timeout; `TE` in an HTTP/2 response is a
//! protocol error to the h2 crate, which resets the client's stream with no answer; a
//! `Content-Length: 5, 5` pingora frames by is refused by Node and Go clients and by HTTP/2
//! clients, and so is a `Content-Length` on a 204.

use http::header::{
    CONNECTION, CONTENT_LENGTH, PROXY_AUTHENTICATE, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderName, StatusCode};

/// Hop-by-hop response headers (RFC 9110 §7.6.1), `Trailer` (pingora never forwards an
/// HTTP/1 upstream's trailers, so the announcement would be false), and `Proxy-Authenticate`,
/// which asks the client to authenticate to a proxy it never configured.
static DOOMED: [HeaderName; 7] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TE,
    TRAILER,
    UPGRADE,
    PROXY_AUTHENTICATE,
];

/// Takes out of `h` what may not reach the client (see the module doc). One pass over the
/// names, no allocation unless the upstream's `Connection` names a header of its own; the map
/// is touched only when something is found.
pub(super) fn clean(status: StatusCode, h: &mut HeaderMap) {
    // Bit i: `DOOMED[i]` is present.
    let mut found = 0u8;
    let mut lengths = 0usize;
    let mut listed = false;
    for (name, value) in h.iter() {
        if let Some(i) = DOOMED.iter().position(|d| d == name) {
            found |= 1 << i;
        } else if name == CONTENT_LENGTH {
            lengths += 1;
            listed |= value.as_bytes().contains(&b',');
        }
    }
    if found == 0 && lengths == 0 {
        return;
    }
    if found & 1 != 0 {
        // The headers the upstream's `Connection` names are hop-by-hop too (never the framing
        // pingora has read from them); `keep-alive` and `close` name only the connection.
        let named: Vec<HeaderName> = h
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .filter(|n| *n != CONTENT_LENGTH && *n != TRANSFER_ENCODING)
            .collect();
        for name in &named {
            h.remove(name);
        }
    }
    for (i, name) in DOOMED.iter().enumerate() {
        if found & (1 << i) != 0 {
            h.remove(name);
        }
    }
    if lengths == 0 {
        return;
    }
    if status.is_informational() || status == StatusCode::NO_CONTENT {
        h.remove(CONTENT_LENGTH);
    } else if lengths > 1 || listed {
        // pingora refused the response unless every length agrees: the first says it.
        let first = h
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|n| n.trim().parse::<u64>().ok());
        match first {
            Some(n) => {
                h.insert(CONTENT_LENGTH, crate::errors::number_value(n));
            }
            None => {
                h.remove(CONTENT_LENGTH);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// Whether a value is what [`clean`] leaves of a `Content-Length`: one number.
    fn plain_length(v: &HeaderValue) -> bool {
        !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit)
    }

    fn head(fields: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut v: Vec<String> = h
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn upstream_heads_word_for_word() {
        let mut h = head(&[
            ("content-type", "application/json"),
            ("keep-alive", "timeout=300, max=100"),
            ("connection", "keep-alive, x-debug, Content-Length"),
            ("x-debug", "internal"),
            ("te", "trailers, deflate"),
            ("trailer", "x-checksum"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authenticate", "Basic realm=\"internal\""),
            ("content-length", "5"),
            ("content-length", "5"),
        ]);
        clean(StatusCode::OK, &mut h);
        assert_eq!(
            names(&h),
            ["content-length: 5", "content-type: application/json"]
        );
        assert!(plain_length(h.get(CONTENT_LENGTH).unwrap()));

        let mut h = head(&[("content-length", "7, 7")]);
        clean(StatusCode::OK, &mut h);
        assert_eq!(names(&h), ["content-length: 7"]);

        for status in [StatusCode::NO_CONTENT, StatusCode::CONTINUE] {
            let mut h = head(&[("content-length", "7"), ("x-a", "b")]);
            clean(status, &mut h);
            assert_eq!(names(&h), ["x-a: b"], "{status}");
        }
        // A 304 keeps the length of what it stands for.
        let mut h = head(&[("content-length", "7")]);
        clean(StatusCode::NOT_MODIFIED, &mut h);
        assert_eq!(names(&h), ["content-length: 7"]);
        // Nothing to take: nothing touched.
        let mut h = head(&[("content-type", "text/plain"), ("content-length", "12")]);
        clean(StatusCode::OK, &mut h);
        assert_eq!(
            names(&h),
            ["content-length: 12", "content-type: text/plain"]
        );
    }
}
