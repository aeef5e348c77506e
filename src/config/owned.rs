//! The request headers a client may not send upstream, from `[forward]`: what the proxy strips.

use http::{HeaderMap, HeaderName};

/// Headers the gateway writes or verifies itself, beyond the configured ones.
const ALWAYS_OWNED: [&str; 3] = ["x-api-key", "x-forwarded-for", "x-forwarded-proto"];

/// Hop-by-hop headers (RFC 9110 §7.6.1), which speak of the client's connection, not of the
/// request: never forwarded, as nginx does not. `Upgrade` going upstream would let a backend
/// that accepts it (a WebSocket, h2c) turn the connection into a tunnel past every check, and
/// a `Connection` naming an identity header would have a hop-by-hop-aware proxy behind the
/// gateway drop it.
pub(super) const HOP_BY_HOP: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "http2-settings",
];

/// The request headers a client's copy of which never goes upstream: the configured owned ones
/// (identity, request id, strips, overrides) as spelled, and those and [`ALWAYS_OWNED`] with
/// `_`, `-` and `.` exchanged anywhere (`x_account_id` is `HTTP_X_ACCOUNT_ID` to CGI, Rack and
/// PHP, the same variable as the trusted `x-account-id`, and so is `x-account.id` to PHP; a
/// configured `sm_user` is `sm-user` too).
///
/// Kept by length, so that one pass over a request's few names finds every copy at a
/// comparison or two per name, where a map probe per owned name (16 by default) hashed each.
///
/// Names under a configured prefix (`forward.strip_header_prefixes`, `_` and `-` alike there
/// too) are owned whatever follows it.
#[derive(Debug)]
pub(crate) struct OwnedNames {
    /// By name length: each name, and whether only its `_` spellings are owned.
    by_len: Vec<Vec<(Box<[u8]>, bool)>>,
    prefixes: Vec<Box<[u8]>>,
    /// Whether a name starting with this byte may be under a prefix: most names are not, at
    /// one look-up.
    prefix_first: [bool; 256],
}

impl Default for OwnedNames {
    fn default() -> Self {
        Self {
            by_len: Vec::new(),
            prefixes: Vec::new(),
            prefix_first: [false; 256],
        }
    }
}

/// The bytes backends read as one another in a header name.
const SEPARATORS: [u8; 3] = [b'-', b'_', b'.'];

/// Whether `name` reads as `owned` with `-`, `_` and `.` as one character, and whether it took
/// a separator spelled another way to read so. Compares the first `owned.len()` bytes. PHP
/// turns `.` into `_` in every variable name it registers: behind Caddy or FrankenPHP (which
/// pass `x-account.id` on as `HTTP_X_ACCOUNT.ID`), PHP-FPM files it as `HTTP_X_ACCOUNT_ID`.
fn reads_as(name: &[u8], owned: &[u8]) -> (bool, bool) {
    let separator = |b: u8| SEPARATORS.contains(&b);
    let mut respelled = false;
    let same = name.len() >= owned.len()
        && name.iter().zip(owned.iter()).all(|(&c, &o)| {
            let other_separator = c != o && separator(c) && separator(o);
            respelled |= other_separator;
            c == o || other_separator
        });
    (same, respelled)
}

impl OwnedNames {
    pub(crate) fn new(fwd: &super::Forward) -> Self {
        let mut owned = Self::default();
        for name in fwd.owned_headers() {
            owned.add(name.as_str().as_bytes(), false);
        }
        for name in HOP_BY_HOP {
            owned.add(name.as_bytes(), false);
        }
        for name in ALWAYS_OWNED {
            if !fwd.owned_headers().any(|o| o.as_str() == name) {
                owned.add(name.as_bytes(), true);
            }
        }
        owned.prefixes = fwd
            .strip_header_prefixes
            .iter()
            .map(|p| p.as_str().as_bytes().into())
            .collect();
        for first in owned.prefixes.iter().filter_map(|p| p.first()) {
            if SEPARATORS.contains(first) {
                for s in SEPARATORS {
                    owned.prefix_first[usize::from(s)] = true;
                }
            } else {
                owned.prefix_first[usize::from(*first)] = true;
            }
        }
        owned
    }

    fn add(&mut self, name: &[u8], underscored_only: bool) {
        if self.by_len.len() <= name.len() {
            self.by_len.resize_with(name.len() + 1, Vec::new);
        }
        self.by_len[name.len()].push((name.into(), underscored_only));
    }

    /// Whether a client header named `name` (lower case, as `http` keeps names) is owned.
    pub(crate) fn owns(&self, name: &[u8]) -> bool {
        let named = self.by_len.get(name.len()).is_some_and(|same_length| {
            same_length.iter().any(|(owned, underscored_only)| {
                let (same, respelled) = reads_as(name, owned);
                same && (respelled || !underscored_only)
            })
        });
        named
            || name
                .first()
                .is_some_and(|&b| self.prefix_first[usize::from(b)])
                && self.prefixes.iter().any(|p| reads_as(name, p).0)
    }

    /// Removes every owned header from `h`.
    pub(crate) fn remove_from(&self, h: &mut HeaderMap) {
        let mut doomed: Option<Vec<HeaderName>> = None;
        for name in h.keys() {
            if self.owns(name.as_str().as_bytes()) {
                doomed.get_or_insert_with(Vec::new).push(name.clone());
            }
        }
        for name in doomed.iter().flatten() {
            h.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule `OwnedNames` implements, spelled out: owned when it reads as an owned name with
    /// `_` and `-` as one character, or as an always-owned name spelled otherwise.
    fn owned_by_rule(fwd: &super::super::Forward, name: &str) -> bool {
        let dashed = |n: &str| n.replace(['_', '.'], "-");
        let configured = fwd
            .owned_headers()
            .map(|o| o.as_str().to_owned())
            .chain(HOP_BY_HOP.iter().map(|h| h.to_string()));
        configured.into_iter().any(|o| dashed(&o) == dashed(name))
            || fwd
                .strip_header_prefixes
                .iter()
                .any(|p| dashed(name).starts_with(&dashed(p.as_str())))
            || ALWAYS_OWNED
                .iter()
                .any(|a| dashed(a) == dashed(name) && *a != name)
    }

    fn forward() -> super::super::Forward {
        let name = |n: &str| HeaderName::from_bytes(n.as_bytes()).unwrap();
        super::super::Forward {
            account_id_header: name("x-account-id"),
            key_id_header: name("x-api-key-id"),
            user_id_header: name("x-user-id"),
            request_id_header: name("x-request-id"),
            key_scopes_header: name("x-api-key-scopes"),
            key_instances_header: name("x-api-key-instance-ids"),
            strip_request_headers: vec![name("x-internal-user"), name("x_odd")],
            strip_override_headers: vec![name("forwarded"), name("x-http-method-override")],
            strip_header_prefixes: vec![name("uberctx-"), name("ot-baggage-"), name("baggage-")],
        }
    }

    #[test]
    fn owned_names_word_for_word() {
        let fwd = forward();
        let owned = OwnedNames::new(&fwd);
        for (name, expected) in [
            ("x-account-id", true),
            ("x_account_id", true),
            ("x-account_id", true),
            ("x-api-key-id", true),
            ("x_api_key", true),
            ("x-api-key", false), // removed per route (forward_api_key), not here
            ("x_forwarded_for", true),
            ("x-forwarded-for", false), // replaced, not removed
            ("x_odd", true),
            ("x-odd", true),
            ("forwarded", true),
            ("x_internal_user", true),
            ("x-internal-users", false),
            ("x_custom_header", false),
            ("content-type", false),
            ("connection", true),
            ("upgrade", true),
            ("http2-settings", true),
            ("http2_settings", true),
            ("keep-alive", true),
            ("te", false),
            ("x-api-key-scopes", true),
            ("x_api_key_instance_ids", true),
            ("uberctx-account.id", true),
            ("uberctx_account", true),
            ("uberctx-", true),
            ("uberctx", false),
            ("ot-baggage-tenant", true),
            ("ot_baggage_tenant", true),
            ("x-uberctx-a", false),
            ("baggage-tenant", true),
            ("x-account.id", true),
            ("x.api.key.id", true),
            ("x-api-key-instance.ids", true),
            ("x-forwarded.for", true),
            ("x-api.key", true),
            ("uberctx.tenant", true),
            ("content.type", false),
            ("baggage", false), // a name of the override list, not configured in this test
            ("", false),
        ] {
            assert_eq!(owned.owns(name.as_bytes()), expected, "{name}");
            assert_eq!(owned_by_rule(&fwd, name), expected, "{name} by the rule");
        }
        let mut h = HeaderMap::new();
        for n in ["x_account_id", "content-type", "forwarded", "x-custom"] {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                http::HeaderValue::from_static("v"),
            );
        }
        h.append("forwarded", http::HeaderValue::from_static("second"));
        owned.remove_from(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-custom"]);
    }

    proptest::proptest! {
        #[test]
        fn owned_names_follow_the_rule(name in "[a-z_.-]{0,20}|x[-_.](account|api|forwarded|user)[-_.][a-z_.-]{0,12}|(uberctx|ot[-_.]baggage)[-_.]?[a-z_.-]{0,8}") {
            let fwd = forward();
            proptest::prop_assert_eq!(OwnedNames::new(&fwd).owns(name.as_bytes()), owned_by_rule(&fwd, &name));
        }
    }
}
