//! What a console token's JOSE header and claim set must be, beyond a valid signature: no
//! critical extension, an access-token type, and no member named twice.
//!
//! `jsonwebtoken` ignores header members it does not know (`crit` among them: RFC 7515 §4.1.11
//! requires refusing a token whose listed extensions are not understood, and this gateway
//! understands none) and reads a claim named twice as its last copy, where a backend that reads
//! the forwarded token itself may take the first (RFC 7519 §4: reject, or take the last; refused
//! here, so that no two readers differ). A token whose `typ` says it is something other than an
//! access token (`refresh+jwt`, a reset or invitation token) is refused even when the issuer
//! signed it with the same key and claims (RFC 8725 §3.11).

use super::jwt::JwtError;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};
use std::cell::Cell;
use std::fmt;

/// The `typ` values an access token may carry (compared ignoring case, with or without the
/// `application/` prefix, RFC 7515 §4.1.9); a token without `typ` passes.
const ACCESS_TYPES: [&str; 2] = ["jwt", "at+jwt"];

/// Checks the token's header (run once its signature is known good, so that a refusal here is
/// a signed token's: no guess at a key).
pub(super) fn check_header(token: &str) -> Result<(), JwtError> {
    let encoded = token.split('.').next().ok_or(JwtError::Malformed)?;
    let header = object(encoded)?;
    if header.contains_key("crit") {
        return Err(JwtError::CriticalExtension);
    }
    match header.get("typ") {
        None => Ok(()),
        Some(Value::String(typ)) if is_access_type(typ) => Ok(()),
        Some(_) => Err(JwtError::NotAnAccessToken),
    }
}

/// The claim set (the token's second part): a JSON object, each claim named once.
pub(super) fn claims(token: &str) -> Result<Map<String, Value>, JwtError> {
    let encoded = token.split('.').nth(1).ok_or(JwtError::Malformed)?;
    object(encoded)
}

fn is_access_type(typ: &str) -> bool {
    let lower = typ.to_ascii_lowercase();
    let bare = lower.strip_prefix("application/").unwrap_or(&lower);
    ACCESS_TYPES.contains(&bare)
}

/// A base64url (unpadded) JSON object whose members are each named once
/// ([`JwtError::DuplicateMember`] otherwise).
fn object(encoded: &str) -> Result<Map<String, Value>, JwtError> {
    let json = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| JwtError::Malformed)?;
    let twice = Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(&json);
    let map = de.deserialize_map(OnceNamed(&twice)).map_err(|_| {
        if twice.get() {
            JwtError::DuplicateMember
        } else {
            JwtError::Malformed
        }
    })?;
    de.end().map_err(|_| JwtError::Malformed)?;
    Ok(map)
}

/// Builds a top-level object's map, failing (and saying so) on a member name met twice.
struct OnceNamed<'a>(&'a Cell<bool>);

impl<'de> Visitor<'de> for OnceNamed<'_> {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object naming each member once")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut map = Map::new();
        while let Some(name) = access.next_key::<String>()? {
            if map.contains_key(&name) {
                // Read on past the value would be wasted: the whole token is refused.
                access.next_value::<IgnoredAny>()?;
                self.0.set(true);
                return Err(serde::de::Error::custom("a member named twice"));
            }
            let value = access.next_value::<Value>()?;
            map.insert(name, value);
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    fn token(header: &str, claims: &str) -> String {
        format!("{}.{}.sig", part(header), part(claims))
    }

    #[test]
    fn headers_word_for_word() {
        let claims = r#"{"sub":"u"}"#;
        for (header, expected) in [
            (r#"{"alg":"HS256"}"#, Ok(())),
            (r#"{"alg":"HS256","typ":"JWT"}"#, Ok(())),
            (r#"{"alg":"HS256","typ":"jwt"}"#, Ok(())),
            (r#"{"alg":"HS256","typ":"at+jwt"}"#, Ok(())),
            (r#"{"alg":"HS256","typ":"application/at+JWT"}"#, Ok(())),
            (
                r#"{"alg":"HS256","typ":"refresh+jwt"}"#,
                Err(JwtError::NotAnAccessToken),
            ),
            (
                r#"{"alg":"HS256","typ":7}"#,
                Err(JwtError::NotAnAccessToken),
            ),
            (
                r#"{"alg":"HS256","typ":""}"#,
                Err(JwtError::NotAnAccessToken),
            ),
            (
                r#"{"alg":"HS256","crit":["exp"],"exp":1}"#,
                Err(JwtError::CriticalExtension),
            ),
            (
                r#"{"alg":"HS256","crit":[]}"#,
                Err(JwtError::CriticalExtension),
            ),
            (
                r#"{"alg":"HS256","typ":"JWT","typ":"refresh+jwt"}"#,
                Err(JwtError::DuplicateMember),
            ),
            (r#"["alg"]"#, Err(JwtError::Malformed)),
            (r#"{"alg":"HS256"} x"#, Err(JwtError::Malformed)),
        ] {
            assert_eq!(check_header(&token(header, claims)), expected, "{header}");
        }
        assert_eq!(check_header("%%%.e30.sig"), Err(JwtError::Malformed));
    }

    #[test]
    fn a_claim_named_twice_is_refused() {
        let h = r#"{"alg":"HS256"}"#;
        let ok = claims(&token(h, r#"{"account_id":"a","sub":"u"}"#)).unwrap();
        assert_eq!(ok.get("account_id"), Some(&Value::from("a")));
        for twice in [
            r#"{"account_id":"a","account_id":"b"}"#,
            r#"{"exp":1,"sub":"u","exp":9999999999}"#,
        ] {
            assert_eq!(
                claims(&token(h, twice)),
                Err(JwtError::DuplicateMember),
                "{twice}"
            );
        }
        // Nested objects are the claims' own business; only top-level names are read here.
        assert!(claims(&token(h, r#"{"o":{"a":1,"a":2}}"#)).is_ok());
        assert_eq!(claims("onlyonepart"), Err(JwtError::Malformed));
    }
}
