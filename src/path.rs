//! Request path normalisation: the one form that routing matches and upstreams receive.

use std::borrow::Cow;

/// Why a request path was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// The path is empty or does not start with `/`.
    NotAbsolute,
    /// A `%` is not followed by two hexadecimal digits.
    BadPercentEncoding,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "request path does not start with '/'",
            PathError::BadPercentEncoding => "request path has a malformed percent-encoding",
        })
    }
}

impl std::error::Error for PathError {}

/// What is wrong with a configured route prefix, if anything: prefixes must start with '/'
/// and already be in the form `normalise` gives, or no request could ever match them.
pub fn prefix_problem(prefix: &str) -> Option<&'static str> {
    if !prefix.starts_with('/') {
        Some("must start with '/'")
    } else if normalise(prefix).map_or(true, |p| p != prefix) {
        Some("is not a normalised path")
    } else {
        None
    }
}

/// Normalises a request path (without query string):
/// - it must start with `/`;
/// - `%XX` of an RFC 3986 unreserved character is decoded, any other `%XX` is kept with
///   upper-case hex digits (so `%2F` stays an ordinary segment character);
/// - runs of `/` collapse, `.` segments are dropped, `..` removes the previous segment
///   (never above the root);
/// - a trailing slash is kept when the input ended with `/` or with a `.`/`..` segment.
///
/// Returns the input borrowed when it is already normal.
pub fn normalise(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if !needs_work(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    // `decoded` starts with '/' because `path` does and decoding never touches it.
    for segment in decoded.split('/').skip(1) {
        match segment {
            "" | "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            _ => {
                segments.push(segment);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if segments.is_empty() || trailing_slash {
        out.push('/');
    }
    if out == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(out))
    }
}

fn needs_work(path: &str) -> bool {
    path.contains('%')
        || path.contains("//")
        || path.contains("/./")
        || path.contains("/../")
        || path.ends_with("/.")
        || path.ends_with("/..")
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes `%XX` of unreserved characters and upper-cases the hex of every other `%XX`.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let Some(offset) = bytes[i..].iter().position(|&b| b == b'%') else {
            out.push_str(&path[i..]);
            break;
        };
        // Slicing at an ASCII '%' always falls on a char boundary.
        out.push_str(&path[i..i + offset]);
        let at = i + offset;
        let hi = bytes.get(at + 1).copied().and_then(hex_value);
        let lo = bytes.get(at + 2).copied().and_then(hex_value);
        let (Some(hi), Some(lo)) = (hi, lo) else {
            return Err(PathError::BadPercentEncoding);
        };
        let value = hi * 16 + lo;
        if is_unreserved(value) {
            out.push(char::from(value));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(hi)]));
            out.push(char::from(HEX[usize::from(lo)]));
        }
        i = at + 3;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefix_problems_are_named() {
        assert_eq!(prefix_problem("/api/v1/"), None);
        assert_eq!(prefix_problem("api/"), Some("must start with '/'"));
        assert_eq!(
            prefix_problem("/api//v1/"),
            Some("is not a normalised path")
        );
        assert_eq!(
            prefix_problem("/api/%7e/"),
            Some("is not a normalised path")
        );
    }

    fn norm(p: &str) -> String {
        match normalise(p) {
            Ok(n) => n.into_owned(),
            Err(e) => panic!("{p:?}: {e}"),
        }
    }

    #[test]
    fn spec_examples() {
        assert_eq!(norm("/api/v1/../internal"), "/api/internal");
        assert_eq!(norm("/api//v1///x"), "/api/v1/x");
        assert_eq!(norm("/api/v1/%6Dessages"), "/api/v1/messages");
        assert_eq!(norm("/api/%2e%2e/admin"), "/admin");
        assert_eq!(norm("/a/%2fb"), "/a/%2Fb");
        assert_eq!(norm("/.."), "/");
        assert_eq!(norm("/a/./b/."), "/a/b/");
        assert_eq!(norm("/API/v1/"), "/API/v1/");
        assert_eq!(normalise("/a%zz"), Err(PathError::BadPercentEncoding));
        assert_eq!(normalise("/a%2"), Err(PathError::BadPercentEncoding));
        assert_eq!(normalise("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(normalise(""), Err(PathError::NotAbsolute));
    }

    #[test]
    fn more_cases() {
        assert_eq!(norm("/"), "/");
        assert_eq!(norm("//"), "/");
        assert_eq!(norm("/a/b/.."), "/a/");
        assert_eq!(norm("/a/b/../"), "/a/");
        assert_eq!(norm("/a/../../b"), "/b");
        assert_eq!(norm("/."), "/");
        assert_eq!(norm("/..."), "/...");
        assert_eq!(norm("/a/.b/..c"), "/a/.b/..c");
        assert_eq!(norm("/%7euser/%41%5a"), "/~user/AZ");
        assert_eq!(norm("/a%20b/%c3%a9"), "/a%20b/%C3%A9");
        assert_eq!(norm("/caf\u{e9}/./x"), "/caf\u{e9}/x");
        assert_eq!(norm("/%25"), "/%25");
        assert_eq!(normalise("/%"), Err(PathError::BadPercentEncoding));
        assert_eq!(normalise("/%g0"), Err(PathError::BadPercentEncoding));
        assert_eq!(normalise("/%\u{e9}"), Err(PathError::BadPercentEncoding));
        assert_eq!(normalise("?a"), Err(PathError::NotAbsolute));
        assert!(!PathError::NotAbsolute.to_string().is_empty());
    }

    #[test]
    fn borrows_when_unchanged() {
        for p in [
            "/",
            "/api/v1/messages",
            "/API/v1/",
            "/a/%2Fb",
            "/.well-known/x",
        ] {
            assert!(
                matches!(normalise(p), Ok(Cow::Borrowed(s)) if s == p),
                "{p}"
            );
        }
        assert!(matches!(normalise("/a/%2fb"), Ok(Cow::Owned(_))));
    }

    fn path_strategy() -> impl Strategy<Value = String> {
        let token = prop_oneof![
            Just("/"),
            Just("//"),
            Just("."),
            Just(".."),
            Just("a"),
            Just("B"),
            Just("-"),
            Just("~"),
            Just("\u{e9}"),
            Just("%2e"),
            Just("%2E"),
            Just("%2f"),
            Just("%2F"),
            Just("%41"),
            Just("%7e"),
            Just("%25"),
            Just("%3a"),
            Just("%c3%a9"),
        ];
        prop::collection::vec(token, 0..24).prop_map(|t| format!("/{}", t.concat()))
    }

    fn has_encoded_unreserved(s: &str) -> bool {
        s.as_bytes()
            .windows(3)
            .any(|w| match (hex_value(w[1]), hex_value(w[2])) {
                (Some(h), Some(l)) => w[0] == b'%' && is_unreserved(h * 16 + l),
                _ => false,
            })
    }

    proptest! {
        #[test]
        fn normalise_is_idempotent(p in path_strategy()) {
            let once = norm(&p);
            let twice = norm(&once);
            prop_assert_eq!(&twice, &once);
            prop_assert!(matches!(normalise(&once), Ok(Cow::Borrowed(_))));
        }

        #[test]
        fn output_is_canonical(p in path_strategy()) {
            let out = norm(&p);
            prop_assert!(out.starts_with('/'));
            prop_assert!(!out.contains("//"), "{}", out);
            prop_assert!(out.split('/').all(|s| s != "." && s != ".."), "{}", out);
            prop_assert!(!has_encoded_unreserved(&out), "{}", out);
            let lower_hex = out
                .as_bytes()
                .windows(3)
                .any(|w| w[0] == b'%' && (w[1].is_ascii_lowercase() || w[2].is_ascii_lowercase()));
            prop_assert!(!lower_hex, "{}", out);
        }

        #[test]
        fn arbitrary_input_never_panics(p in any::<String>()) {
            let _ = normalise(&p);
            let _ = normalise(&format!("/{p}"));
        }
    }
}
