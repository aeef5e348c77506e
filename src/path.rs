//! Request path normalisation: the one form that routing matches and upstreams receive.

use std::borrow::Cow;

/// Why a request path was refused. Every variant but the first two is a path that some backend
/// would resolve differently from the gateway (SPEC §1): refused, never guessed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// The path is empty or does not start with `/`.
    NotAbsolute,
    /// A `%` is not followed by two hexadecimal digits.
    BadPercentEncoding,
    /// `%2F` or `%5C`: a separator to a decoding backend, a segment character to the gateway.
    EncodedSlash,
    /// A raw `\`: a separator to some servers (IIS, Windows file APIs, some proxies).
    Backslash,
    /// `;` or `%3B`: path parameters that Tomcat, Jetty and Spring strip before routing.
    Semicolon,
    /// `%25`: double encoding, decoded twice by some chains.
    DoubleEncoding,
    /// A control byte, raw or encoded (`%00`–`%1F`, `%7F`).
    ControlByte,
    /// `%3F` or `%23`: a query or fragment delimiter to a layer that decodes the path and
    /// passes it on (Apache's mod_rewrite, an nginx `proxy_pass` with variables), which would
    /// put a query of the client's choosing in front of the one the gateway checked.
    EncodedDelimiter,
    /// Percent-encoded bytes that are not UTF-8 (`%C0%AE`, an overlong `.`, or a lone
    /// `%E9`): decoders disagree on them (replaced, Latin-1, or a dot to an old one).
    EncodedNotUtf8,
    /// A raw byte outside ASCII (RFC 3986 requires percent-encoding it; servers decode it
    /// as UTF-8, Latin-1 or not at all).
    NonAscii,
    /// Upper-case letters without which the path would match another route: a backend that
    /// routes without regard to case (Express, ASP.NET) would serve the other route's call.
    CaseChangesRoute,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "request path does not start with '/'",
            PathError::BadPercentEncoding => "request path has a malformed percent-encoding",
            PathError::EncodedSlash => "an encoded '/' or '\\' (%2F, %5C)",
            PathError::Backslash => "a backslash",
            PathError::Semicolon => "a ';' (path parameters)",
            PathError::DoubleEncoding => "an encoded '%' (%25)",
            PathError::ControlByte => "a control character",
            PathError::EncodedDelimiter => "an encoded '?' or '#' (%3F, %23)",
            PathError::EncodedNotUtf8 => "percent-encoded bytes that are not UTF-8",
            PathError::NonAscii => "a raw non-ASCII byte (percent-encode it)",
            PathError::CaseChangesRoute => {
                "upper-case letters: in lower case it matches another route"
            }
        })
    }
}

impl std::error::Error for PathError {}

impl PathError {
    /// True for paths that are well formed but that backends may read differently.
    pub fn is_ambiguous(self) -> bool {
        !matches!(self, PathError::NotAbsolute | PathError::BadPercentEncoding)
    }
}

/// What the normaliser lets through beyond the strict default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathRules {
    /// Keep `%2F` / `%5C` as segment characters instead of refusing them (for backends that
    /// need encoded slashes in an id; `server.allow_encoded_slashes`).
    pub allow_encoded_slashes: bool,
}

/// What is wrong with a configured route prefix, if anything: prefixes must start with '/'
/// and already be in the form `normalise` gives, or no request could ever match them.
pub fn prefix_problem(prefix: &str) -> Option<&'static str> {
    if !prefix.starts_with('/') {
        Some("must start with '/'")
    } else if normalise(prefix, PathRules::default()).map_or(true, |p| p != prefix) {
        Some("is not a normalised path")
    } else {
        None
    }
}

/// Whether a route or policy `prefix` covers the normalised `path`, on whole segments: a
/// prefix ending in `/` covers everything below it and the path without that slash
/// (`/api/v1/` covers `/api/v1`); any other prefix covers itself and everything below it
/// (`/api/v1/status` covers `/api/v1/status/x`, never `/api/v1/statusX`).
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix_matches_by(prefix, path, |a, b| a == b)
}

/// [`prefix_matches`] with ASCII letter case ignored on both sides: how a backend that routes
/// without regard to case (Express, ASP.NET) would match.
pub fn prefix_matches_ignoring_case(prefix: &str, path: &str) -> bool {
    prefix_matches_by(prefix, path, <[u8]>::eq_ignore_ascii_case)
}

/// The whole-segment prefix rule, with `same` deciding when two runs of bytes are equal.
fn prefix_matches_by(prefix: &str, path: &str, same: impl Fn(&[u8], &[u8]) -> bool) -> bool {
    let (prefix, path) = (prefix.as_bytes(), path.as_bytes());
    let starts = |p: &[u8]| path.len() >= p.len() && same(&path[..p.len()], p);
    match prefix.strip_suffix(b"/") {
        Some(bare) => starts(prefix) || (!bare.is_empty() && same(path, bare)),
        None => starts(prefix) && path.get(prefix.len()).is_none_or(|b| *b == b'/'),
    }
}

/// Normalises a request path (without query string):
/// - it must start with `/`;
/// - ambiguous input is refused (see [`PathError`]): `\`, `;`, control bytes and raw
///   non-ASCII bytes, and the encodings `%2F`, `%5C` (unless `rules` allow them), `%3B`,
///   `%25`, `%00`–`%1F`, `%7F`;
/// - `%XX` of an RFC 3986 unreserved character is decoded, any other `%XX` is kept with
///   upper-case hex digits;
/// - runs of `/` collapse, `.` segments are dropped, `..` removes the previous segment
///   (never above the root);
/// - a trailing slash is kept when the input ended with `/` or with a `.`/`..` segment.
///
/// What comes out, fully percent-decoded by a backend, has the same segments as the gateway
/// routed on. Returns the input borrowed when it is already normal.
pub fn normalise(path: &str, rules: PathRules) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if let Some(b) = path.bytes().find(|b| !is_plain(*b)) {
        return Err(match b {
            b'\\' => PathError::Backslash,
            b';' => PathError::Semicolon,
            0x80.. => PathError::NonAscii,
            _ => PathError::ControlByte,
        });
    }
    if !needs_work(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path, rules)?;
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
    if rules.allow_encoded_slashes && segments.iter().any(|s| hides_dot_segment(s)) {
        // `a%2F..%2Fb` is one segment here and `a/../b` to a backend that decodes it.
        return Err(PathError::EncodedSlash);
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

/// True when a segment, split at its encoded slashes, has a `.` or `..` piece.
fn hides_dot_segment(segment: &str) -> bool {
    (segment.contains("%2F") || segment.contains("%5C"))
        && segment
            .split("%2F")
            .flat_map(|s| s.split("%5C"))
            .any(|piece| piece == "." || piece == "..")
}

/// Bytes a path may carry as they are: printable ASCII but `\` and `;`.
fn is_plain(b: u8) -> bool {
    (0x21..0x7f).contains(&b) && b != b'\\' && b != b';'
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

/// Decodes `%XX` of unreserved characters, upper-cases the hex of every other `%XX`, and
/// refuses the encodings that a decoding backend would read as structure.
fn decode_unreserved(path: &str, rules: PathRules) -> Result<String, PathError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut high = false;
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
        match value {
            b'/' | b'\\' if !rules.allow_encoded_slashes => return Err(PathError::EncodedSlash),
            b';' => return Err(PathError::Semicolon),
            b'%' => return Err(PathError::DoubleEncoding),
            0x00..=0x1f | 0x7f => return Err(PathError::ControlByte),
            b'?' | b'#' => return Err(PathError::EncodedDelimiter),
            0x80.. => high = true,
            _ => {}
        }
        if is_unreserved(value) {
            out.push(char::from(value));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(hi)]));
            out.push(char::from(HEX[usize::from(lo)]));
        }
        i = at + 3;
    }
    if high && !decodes_to_utf8(bytes) {
        return Err(PathError::EncodedNotUtf8);
    }
    Ok(out)
}

/// Whether a path whose `%XX` are all well formed decodes to UTF-8 (overlong forms are not).
fn decodes_to_utf8(path: &[u8]) -> bool {
    let mut decoded = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let hex = path
            .get(i + 1..i + 3)
            .filter(|_| path[i] == b'%')
            .and_then(|h| Some(hex_value(h[0])? * 16 + hex_value(h[1])?));
        match hex {
            Some(b) => {
                decoded.push(b);
                i += 3;
            }
            None => {
                decoded.push(path[i]);
                i += 1;
            }
        }
    }
    std::str::from_utf8(&decoded).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STRICT: PathRules = PathRules {
        allow_encoded_slashes: false,
    };
    const SLASHES: PathRules = PathRules {
        allow_encoded_slashes: true,
    };

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
        assert_eq!(prefix_problem("/api;x/"), Some("is not a normalised path"));
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("/api/v1/status", "/api/v1/status"));
        assert!(prefix_matches("/api/v1/status", "/api/v1/status/"));
        assert!(prefix_matches("/api/v1/status", "/api/v1/status/x"));
        assert!(!prefix_matches("/api/v1/status", "/api/v1/statusX"));
        assert!(!prefix_matches("/api/v1/status", "/api/v1/stat"));
        assert!(prefix_matches("/api/v1/", "/api/v1/x"));
        assert!(prefix_matches("/api/v1/", "/api/v1"));
        assert!(!prefix_matches("/api/v1/", "/api/v1x"));
        assert!(prefix_matches("/", "/"));
        assert!(prefix_matches("/", "/anything"));
    }

    fn norm(p: &str) -> String {
        match normalise(p, STRICT) {
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
        assert_eq!(norm("/.."), "/");
        assert_eq!(norm("/a/./b/."), "/a/b/");
        assert_eq!(norm("/API/v1/"), "/API/v1/");
        let e = |p| normalise(p, STRICT);
        assert_eq!(e("/a%zz"), Err(PathError::BadPercentEncoding));
        assert_eq!(e("/a%2"), Err(PathError::BadPercentEncoding));
        assert_eq!(e("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(e(""), Err(PathError::NotAbsolute));
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        let e = |p| normalise(p, STRICT).map(Cow::into_owned);
        for (path, why) in [
            ("/api/auth/..%2fapi-keys", PathError::EncodedSlash),
            ("/api/auth/..%2Fapi-keys", PathError::EncodedSlash),
            ("/api/auth/..%5capi-keys", PathError::EncodedSlash),
            ("/api/auth/..\\api-keys", PathError::Backslash),
            ("/api/auth/..;/api-keys", PathError::Semicolon),
            ("/api/auth/..%3b/api-keys", PathError::Semicolon),
            (
                "/api/v1/instances%2f..%2f..%2fapi-keys",
                PathError::EncodedSlash,
            ),
            ("/api/%252e%252e/x", PathError::DoubleEncoding),
            ("/api/%00", PathError::ControlByte),
            ("/api/%0a", PathError::ControlByte),
            ("/api/%7F", PathError::ControlByte),
            ("/api/\u{1}", PathError::ControlByte),
            ("/api/\u{7f}", PathError::ControlByte),
            ("/api/ x", PathError::ControlByte),
            ("/api/api-keys\u{e9}", PathError::NonAscii),
            ("/api/v1/x%3FinstanceId=B", PathError::EncodedDelimiter),
            ("/api/v1/x%3f", PathError::EncodedDelimiter),
            ("/api/v1/x%23frag", PathError::EncodedDelimiter),
            ("/api/v1/%C0%AE%C0%AE/x", PathError::EncodedNotUtf8),
            ("/api/v1/caf%E9", PathError::EncodedNotUtf8),
            ("/api/v1/%C3", PathError::EncodedNotUtf8),
            ("/api/v1/%C3a%A9", PathError::EncodedNotUtf8),
            ("/api/v1/%ED%A0%80", PathError::EncodedNotUtf8),
        ] {
            assert_eq!(e(path), Err(why), "{path:?}");
            assert!(why.is_ambiguous());
        }
        assert!(!PathError::NotAbsolute.is_ambiguous());
        // The one switch: encoded slashes kept as segment characters.
        assert_eq!(normalise("/a/%2fb", SLASHES).unwrap(), "/a/%2Fb");
        assert_eq!(normalise("/a/%5c...", SLASHES).unwrap(), "/a/%5C...");
        for hidden in [
            "/a/%5c..",
            "/a/x%2F..%2F..%2Fb",
            "/a/%2e%2e%2fb",
            "/a/%2F.%2Fb",
        ] {
            assert_eq!(
                normalise(hidden, SLASHES),
                Err(PathError::EncodedSlash),
                "{hidden}: a dot segment behind an encoded slash"
            );
        }
        assert_eq!(
            normalise("/a/%3b", SLASHES),
            Err(PathError::Semicolon),
            "only slashes are relaxed"
        );
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
        let e = |p| normalise(p, STRICT);
        assert_eq!(e("/%"), Err(PathError::BadPercentEncoding));
        assert_eq!(e("/%g0"), Err(PathError::BadPercentEncoding));
        assert_eq!(e("?a"), Err(PathError::NotAbsolute));
        assert!(!PathError::NotAbsolute.to_string().is_empty());
    }

    #[test]
    fn borrows_when_unchanged() {
        for p in [
            "/",
            "/api/v1/messages",
            "/API/v1/",
            "/a/%C3%A9",
            "/.well-known/x",
        ] {
            assert!(
                matches!(normalise(p, STRICT), Ok(Cow::Borrowed(s)) if s == p),
                "{p}"
            );
        }
        assert!(matches!(normalise("/a/%c3%a9", STRICT), Ok(Cow::Owned(_))));
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
            Just("\\"),
            Just(";"),
            Just("%2e"),
            Just("%2E"),
            Just("%2f"),
            Just("%2F"),
            Just("%5c"),
            Just("%3b"),
            Just("%41"),
            Just("%7e"),
            Just("%25"),
            Just("%252f"),
            Just("%3a"),
            Just("%00"),
            Just("%0d"),
            Just("%c3%a9"),
            Just("api"),
            Just("v1"),
            Just("auth"),
            Just("api-keys"),
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

    /// How a backend that percent-decodes the whole path and then resolves dot segments
    /// (nginx with a URI in `proxy_pass`, Spring, Express's `decodeURIComponent` routers)
    /// reads a forwarded path: its segments, `\` taken as a separator too.
    fn backend_view(forwarded: &str) -> Vec<String> {
        let decoded = percent_encoding::percent_decode_str(forwarded)
            .decode_utf8_lossy()
            .into_owned();
        let mut segments: Vec<String> = Vec::new();
        for s in decoded.split(['/', '\\']) {
            match s {
                "" | "." => {}
                ".." => {
                    segments.pop();
                }
                s => segments.push(s.split(';').next().unwrap_or("").to_owned()),
            }
        }
        segments
    }

    /// The gateway's own view: the segments of its normalised path, decoded.
    fn gateway_view(normalised: &str) -> Vec<String> {
        normalised
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .collect()
    }

    proptest! {
        #[test]
        fn normalise_is_idempotent(p in path_strategy()) {
            if let Ok(once) = normalise(&p, STRICT) {
                let twice = norm(&once);
                prop_assert_eq!(&twice, &once);
                prop_assert!(matches!(normalise(&once, STRICT), Ok(Cow::Borrowed(_))));
            }
        }

        #[test]
        fn output_is_canonical(p in path_strategy()) {
            if let Ok(out) = normalise(&p, STRICT) {
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
        }

        /// Against a reference decoder: whatever is forwarded, a decoding backend sees exactly
        /// the segments the gateway routed on (so it routes to the same place), and nothing
        /// in it is a separator, a parameter or a control byte to anyone.
        #[test]
        fn forwarded_paths_read_the_same_to_a_decoding_backend(p in path_strategy()) {
            if let Ok(out) = normalise(&p, STRICT) {
                let ours = gateway_view(&out);
                prop_assert_eq!(&backend_view(&out), &ours, "{} -> {}", p, out);
                for s in &ours {
                    prop_assert!(
                        !s.contains(['/', '\\', ';', '%']) && !s.chars().any(char::is_control),
                        "{} -> {}: segment {:?}", p, out, s
                    );
                }
                let routes = ["/api/", "/api/v1/", "/api/auth/", "/api/api-keys"];
                let decoded = format!("/{}", ours.join("/"));
                for r in routes {
                    prop_assert_eq!(prefix_matches(r, &out), prefix_matches(r, &decoded), "{} {}", r, out);
                }
            } else {
                // Refused: the input held something ambiguous or malformed.
                let ambiguous = ["\\", ";", "%2f", "%2F", "%5c", "%3b", "%25", "%00", "%0d", "\u{e9}"];
                prop_assert!(ambiguous.iter().any(|a| p.contains(a)), "{} refused", p);
            }
        }

        /// With encoded slashes allowed, a backend that decodes them still sees no dot
        /// segment: nothing can climb out of the segments the gateway checked.
        #[test]
        fn allowed_encoded_slashes_never_hide_a_dot_segment(p in path_strategy()) {
            if let Ok(out) = normalise(&p, SLASHES) {
                let decoded = percent_encoding::percent_decode_str(&out).decode_utf8_lossy().into_owned();
                prop_assert!(
                    decoded.split(['/', '\\']).all(|s| s != "." && s != ".."),
                    "{} -> {}", p, out
                );
            }
        }

        #[test]
        fn arbitrary_input_never_panics(p in any::<String>()) {
            let _ = normalise(&p, STRICT);
            let _ = normalise(&format!("/{p}"), SLASHES);
        }
    }
}
