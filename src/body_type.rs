//! What a request's headers say its body is (media type, charset, content coding): how a
//! backend will decode the bytes the gateway inspects.

use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use http::HeaderMap;

/// How the headers declare a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Declared {
    /// `application/json`, with no parameter but `charset=utf-8`, no content coding: the bytes
    /// are the JSON every backend parses.
    PlainJson,
    /// JSON in another charset, with other parameters, or under a content coding (gzip): a
    /// backend decodes it first, so the bytes inspected are not the document it reads.
    EncodedJson,
    /// No `Content-Type`, or more than one.
    Unknown,
    /// Another media type (a form, which Rack, PHP and Express read as `key=value` pairs).
    Other,
}

/// What `headers` declare the body to be.
pub(crate) fn declared(headers: &HeaderMap) -> Declared {
    let mut types = headers.get_all(CONTENT_TYPE).iter();
    let (Some(value), None) = (types.next(), types.next()) else {
        return Declared::Unknown;
    };
    let mut parts = value.as_bytes().split(|&b| b == b';');
    let media = parts.next().map(<[u8]>::trim_ascii).unwrap_or_default();
    if !media.eq_ignore_ascii_case(b"application/json") {
        return Declared::Other;
    }
    let utf8_only = parts.all(|p| {
        let p = p.trim_ascii();
        p.is_empty() || {
            let (name, value) = p.split_at(p.iter().position(|&b| b == b'=').unwrap_or(p.len()));
            let value = value.get(1..).map(unquoted).unwrap_or_default();
            name.trim_ascii().eq_ignore_ascii_case(b"charset")
                && value.eq_ignore_ascii_case(b"utf-8")
        }
    });
    let coded = headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"));
    if utf8_only && !coded {
        Declared::PlainJson
    } else {
        Declared::EncodedJson
    }
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

    fn of(pairs: &[(&'static str, &'static str)]) -> Declared {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        declared(&h)
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
            assert_eq!(of(&[("content-type", ct)]), Declared::PlainJson, "{ct}");
        }
        assert_eq!(
            of(&[
                ("content-type", "application/json"),
                ("content-encoding", "identity")
            ]),
            Declared::PlainJson
        );
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
            assert_eq!(of(&[("content-type", ct)]), Declared::EncodedJson, "{ct}");
        }
        assert_eq!(
            of(&[
                ("content-type", "application/json"),
                ("content-encoding", "gzip")
            ]),
            Declared::EncodedJson
        );
    }

    #[test]
    fn anything_else_is_other_or_unknown() {
        assert_eq!(of(&[]), Declared::Unknown);
        assert_eq!(
            of(&[
                ("content-type", "application/json"),
                ("content-type", "application/json")
            ]),
            Declared::Unknown
        );
        for ct in [
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/plain",
            "application/jsonx",
            "application/vnd.api+json",
            "",
        ] {
            assert_eq!(of(&[("content-type", ct)]), Declared::Other, "{ct}");
        }
    }
}
