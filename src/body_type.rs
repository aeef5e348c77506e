//! What a request's headers say its body is (media type, charset, content coding): how a
//! backend will decode the bytes the gateway inspects.

use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use http::HeaderMap;

/// True when `headers` declare plain JSON: one `Content-Type`, `application/json`, with no
/// parameter but `charset=utf-8`, and no content coding but `identity`: the bytes are then the
/// document every backend parses. Anything else (a form, which Rack, PHP and Express read as
/// `key=value` pairs; JSON in another charset or gzipped, which a backend decodes first; no
/// type, or two) is not.
pub(crate) fn is_plain_json(headers: &HeaderMap) -> bool {
    let mut types = headers.get_all(CONTENT_TYPE).iter();
    let (Some(value), None) = (types.next(), types.next()) else {
        return false;
    };
    let mut parts = value.as_bytes().split(|&b| b == b';');
    let media = parts.next().map(<[u8]>::trim_ascii).unwrap_or_default();
    let utf8_only = parts.all(|p| {
        let p = p.trim_ascii();
        p.is_empty() || {
            let (name, value) = p.split_at(p.iter().position(|&b| b == b'=').unwrap_or(p.len()));
            let value = value.get(1..).map(unquoted).unwrap_or_default();
            name.trim_ascii().eq_ignore_ascii_case(b"charset")
                && value.eq_ignore_ascii_case(b"utf-8")
        }
    });
    let uncoded = headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .all(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"));
    media.eq_ignore_ascii_case(b"application/json") && utf8_only && uncoded
}

/// A parameter value without its quotes (`"utf-8"` is `utf-8`).
fn unquoted(v: &[u8]) -> &[u8] {
    let v = v.trim_ascii();
    v.strip_prefix(b"\"")
        .and_then(|v| v.strip_suffix(b"\""))
        .unwrap_or(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn of(pairs: &[(&'static str, &'static str)]) -> bool {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        is_plain_json(&h)
    }

    #[test]
    fn plain_json_is_json_in_utf8_uncoded() {
        for ct in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json;charset=UTF-8",
            "application/json; charset=\"utf-8\"",
            "application/json;",
        ] {
            assert!(of(&[("content-type", ct)]), "{ct}");
        }
        assert!(of(&[
            ("content-type", "application/json"),
            ("content-encoding", "identity")
        ]));
    }

    #[test]
    fn json_a_backend_decodes_first_is_encoded() {
        for ct in [
            "application/json; charset=utf-7",
            "application/json; charset=utf-16",
            "application/json; charset=latin1",
            "application/json; charset=utf-8; charset=utf-7",
            "application/json; boundary=x",
            "application/json; charset",
        ] {
            assert!(!of(&[("content-type", ct)]), "{ct}");
        }
        assert!(!of(&[
            ("content-type", "application/json"),
            ("content-encoding", "gzip")
        ]));
    }

    #[test]
    fn other_types_and_none_or_two_are_not_json() {
        assert!(!of(&[]));
        assert!(!of(&[
            ("content-type", "application/json"),
            ("content-type", "application/json")
        ]));
        for ct in [
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/plain",
            "application/jsonx",
            "application/vnd.api+json",
            "",
        ] {
            assert!(!of(&[("content-type", ct)]), "{ct}");
        }
    }
}
