//! Console tokens: JWT verification with an allow-list of algorithms and an injected clock.

use crate::cache::BoundedCache;
use crate::config::JwtSettings;
use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

/// Tokens verified recently, as Envoy's `jwt_cache_config` keeps them: a repeated token costs a
/// SHA-256 and a lookup instead of a signature check (5.8 µs for HS256, far more for RSA).
/// Bounded; an entry is used only while its token's `exp` (plus leeway) has not passed, and a
/// reload builds a new verifier, so new keys or claims rules never meet old entries.
const VERIFIED_CAPACITY: usize = 10_000;
const VERIFIED_TTL_NS: u64 = 300_000_000_000;

/// Tokens the issuer signed and the gateway refused for what they say (expired, another
/// audience, a refresh token): such a refusal does not count toward the client's failure limit
/// (it is no guess), so without this a replayed one would cost a signature check every time
/// (50–150 µs with RSA or ECDSA keys), unbounded. What they say does not change; a minute. A
/// token not yet valid may become so: held until the next second, one check a second at most.
const REFUSED_CAPACITY: usize = 10_000;
const REFUSED_TTL_NS: u64 = 60_000_000_000;

/// Who a valid console token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleIdentity {
    pub account_id: String,
    pub user_id: Option<String>,
}

/// Why a token was refused (logged, never shown to the client beyond "invalid").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    Malformed,
    AlgorithmNotAllowed,
    NoKey,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    NoAccount,
    /// The header lists critical extensions (`crit`): none is understood here.
    CriticalExtension,
    /// The header's `typ` names another kind of token than an access token.
    NotAnAccessToken,
    /// A header member or a claim is named twice: readers could take different copies.
    DuplicateMember,
}

impl JwtError {
    /// Whether the token carried a valid signature of one of the issuer's keys (refused for
    /// its claims), rather than being no token of the issuer's at all.
    pub fn is_signed(&self) -> bool {
        matches!(
            self,
            Self::Expired
                | Self::NotYetValid
                | Self::WrongIssuer
                | Self::WrongAudience
                | Self::NoAccount
                | Self::CriticalExtension
                | Self::NotAnAccessToken
                | Self::DuplicateMember
        )
    }
}

impl fmt::Display for JwtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Malformed => "malformed token",
            Self::AlgorithmNotAllowed => "algorithm not allowed",
            Self::NoKey => "no key for this token",
            Self::BadSignature => "bad signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not yet valid",
            Self::WrongIssuer => "wrong issuer",
            Self::WrongAudience => "wrong audience",
            Self::NoAccount => "no account claim",
            Self::CriticalExtension => "critical header extension",
            Self::NotAnAccessToken => "not an access token",
            Self::DuplicateMember => "a header member or claim named twice",
        };
        f.write_str(s)
    }
}

impl std::error::Error for JwtError {}

/// Why the configured verification keys cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("jwt.public_keys: {0:?} is not a public-key algorithm")]
    NotPublicKey(Algorithm),
    #[error("jwt.public_keys ({alg:?}): {source}")]
    BadPem {
        alg: Algorithm,
        source: jsonwebtoken::errors::Error,
    },
    #[error("jwt.jwks_file: {0}")]
    BadJwks(serde_json::Error),
}

/// Verifies console tokens against the configured keys.
pub struct JwtVerifier {
    algorithms: Vec<Algorithm>,
    hmac: Option<DecodingKey>,
    keys: Vec<(Algorithm, Option<String>, DecodingKey)>,
    jwks: Option<JwkSet>,
    issuer: Option<String>,
    audience: Option<String>,
    account_claim: String,
    leeway_secs: i64,
    /// SHA-256 of a token -> who it speaks for and the Unix second it stops being valid.
    verified: BoundedCache<[u8; 32], (Arc<ConsoleIdentity>, i64)>,
    /// SHA-256 of a signed token -> why it was refused, and the Unix second the refusal
    /// holds until (the next one for a token not yet valid; for ever, within the TTL, else).
    refused: BoundedCache<[u8; 32], (JwtError, i64)>,
}

fn is_hmac(a: Algorithm) -> bool {
    matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

fn same_family(a: Algorithm, b: Algorithm) -> bool {
    use Algorithm::*;
    let fam = |x| match x {
        HS256 | HS384 | HS512 => 0,
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => 1,
        ES256 | ES384 => 2,
        EdDSA => 3,
    };
    fam(a) == fam(b)
}

impl JwtVerifier {
    /// Builds the verifier; an unusable key is an error naming it.
    pub fn new(s: &JwtSettings) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        for (alg, kid, pem) in &s.public_keys {
            let key = match alg {
                Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512 => DecodingKey::from_rsa_pem(pem),
                Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem),
                Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
                _ => return Err(KeyError::NotPublicKey(*alg)),
            }
            .map_err(|source| KeyError::BadPem { alg: *alg, source })?;
            keys.push((*alg, kid.clone(), key));
        }
        let jwks = match &s.jwks {
            Some(text) => Some(serde_json::from_str(text).map_err(KeyError::BadJwks)?),
            None => None,
        };
        Ok(Self {
            algorithms: s.algorithms.clone(),
            hmac: s
                .secret
                .as_ref()
                .map(|secret| DecodingKey::from_secret(secret.as_bytes())),
            keys,
            jwks,
            issuer: s.issuer.clone(),
            audience: s.audience.clone(),
            account_claim: s.account_claim.clone(),
            leeway_secs: i64::try_from(s.leeway.as_secs()).unwrap_or(0),
            verified: BoundedCache::new(VERIFIED_CAPACITY, VERIFIED_TTL_NS),
            refused: BoundedCache::new(REFUSED_CAPACITY, REFUSED_TTL_NS),
        })
    }

    /// Signed tokens held as refused.
    pub fn refused_tokens(&self) -> usize {
        self.refused.len()
    }

    /// Tokens held in the verified-token cache.
    pub fn cached_tokens(&self) -> usize {
        self.verified.len()
    }

    fn key_for(&self, alg: Algorithm, kid: Option<&str>) -> Option<DecodingKey> {
        if is_hmac(alg) {
            return self.hmac.clone();
        }
        let by_kid = |k: &Option<String>| kid.is_none() || k.is_none() || k.as_deref() == kid;
        if let Some((_, _, key)) = self
            .keys
            .iter()
            .find(|(a, k, _)| same_family(*a, alg) && by_kid(k))
        {
            return Some(key.clone());
        }
        let jwks = self.jwks.as_ref()?;
        let jwk = match kid {
            Some(kid) => jwks.find(kid)?,
            None => jwks.keys.first()?,
        };
        // A JWK that says what it is for is used for nothing else (RFC 8725 §3.1): `use` other
        // than `sig` (an encryption key) verifies no signature, and a key naming its `alg` no
        // token of another algorithm, even one of its family.
        let common = &jwk.common;
        if common
            .public_key_use
            .as_ref()
            .is_some_and(|u| *u != jsonwebtoken::jwk::PublicKeyUse::Signature)
            || common
                .key_algorithm
                .is_some_and(|named| format!("{named:?}") != format!("{alg:?}"))
        {
            return None;
        }
        DecodingKey::from_jwk(jwk).ok()
    }

    /// Checks signature, algorithm, `exp`, `nbf`, `iss`, `aud` and extracts the account; a
    /// token verified before and not yet expired is answered from the cache.
    pub fn verify(&self, token: &str, now_unix: i64) -> Result<Arc<ConsoleIdentity>, JwtError> {
        // Always allowed: never None.
        self.verify_if(token, now_unix, || true)?
            .ok_or(JwtError::Malformed)
    }

    /// [`Self::verify`], where a token the cache does not hold is verified only when `allowed`
    /// says so (a client over its failure limit): `Ok(None)` when it was not.
    pub fn verify_if(
        &self,
        token: &str,
        now_unix: i64,
        allowed: impl FnOnce() -> bool,
    ) -> Result<Option<Arc<ConsoleIdentity>>, JwtError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now_ns = u64::try_from(now_unix)
            .unwrap_or(0)
            .saturating_mul(1_000_000_000);
        if let Some((identity, valid_until)) = self.verified.get(&digest, now_ns) {
            if now_unix < valid_until {
                return Ok(Some(identity));
            }
        }
        if let Some((why, until)) = self.refused.get(&digest, now_ns) {
            if now_unix < until {
                return Err(why);
            }
        }
        if !allowed() {
            return Ok(None);
        }
        let (identity, valid_until) = match self.verify_uncached(token, now_unix) {
            Ok(verified) => verified,
            Err(why) => {
                // Signed and refused for good, or (not yet valid) until the next second.
                if why.is_signed() {
                    let until = if why == JwtError::NotYetValid {
                        now_unix.saturating_add(1)
                    } else {
                        i64::MAX
                    };
                    self.refused.insert(digest, (why, until), now_ns);
                }
                return Err(why);
            }
        };
        let identity = Arc::new(identity);
        self.verified
            .insert(digest, (Arc::clone(&identity), valid_until), now_ns);
        Ok(Some(identity))
    }

    /// The full check, without the cache (also what the benchmarks compare the cache with);
    /// returns the identity and the Unix second from which the token is expired.
    pub fn verify_uncached(
        &self,
        token: &str,
        now_unix: i64,
    ) -> Result<(ConsoleIdentity, i64), JwtError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
        if !self.algorithms.contains(&header.alg) {
            return Err(JwtError::AlgorithmNotAllowed);
        }
        let key = self
            .key_for(header.alg, header.kid.as_deref())
            .ok_or(JwtError::NoKey)?;
        let mut validation = Validation::new(header.alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims = HashSet::new();
        // The signature checked here; the claims read below, each named once.
        jsonwebtoken::decode::<serde::de::IgnoredAny>(token, &key, &validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => JwtError::BadSignature,
                jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => JwtError::AlgorithmNotAllowed,
                _ => JwtError::Malformed,
            },
        )?;
        super::jose::check_header(token)?;
        let claims = super::jose::claims(token)?;
        // NumericDate (RFC 7519 §2): seconds, possibly fractional; rounded the strict way
        // (`exp` down, `nbf` up).
        let num = |name: &str, round: fn(f64) -> f64| {
            let v = claims.get(name)?;
            v.as_i64().or_else(|| {
                v.as_f64()
                    .filter(|f| f.is_finite())
                    // Saturating: a float beyond i64 is the farthest time there is.
                    .map(|f| round(f) as i64)
            })
        };
        let valid_until = match num("exp", f64::floor) {
            Some(exp) if now_unix < exp.saturating_add(self.leeway_secs) => {
                exp.saturating_add(self.leeway_secs)
            }
            Some(_) => return Err(JwtError::Expired),
            None => return Err(JwtError::Malformed),
        };
        // Present but not a number is no reason to skip it: refused, as `exp` is.
        match (claims.get("nbf"), num("nbf", f64::ceil)) {
            (None, _) => {}
            (Some(_), None) => return Err(JwtError::Malformed),
            (Some(_), Some(nbf)) if now_unix.saturating_add(self.leeway_secs) < nbf => {
                return Err(JwtError::NotYetValid)
            }
            (Some(_), Some(_)) => {}
        }
        if let Some(iss) = &self.issuer {
            if claims.get("iss").and_then(Value::as_str) != Some(iss.as_str()) {
                return Err(JwtError::WrongIssuer);
            }
        }
        if let Some(aud) = &self.audience {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => a == aud,
                Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(aud.as_str())),
                _ => false,
            };
            if !ok {
                return Err(JwtError::WrongAudience);
            }
        }
        // Absent is absent; present but empty or not a string is a refusal, never a reason to
        // fall back to another claim.
        let text = |name: &str| match claims.get(name) {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(_) => Err(JwtError::NoAccount),
        };
        let user_id = text("sub")?;
        let account_id = text(&self.account_claim)?
            .or_else(|| user_id.clone())
            .ok_or(JwtError::NoAccount)?;
        Ok((
            ConsoleIdentity {
                account_id,
                user_id,
            },
            valid_until,
        ))
    }
}

/// What a minted development token says.
pub struct MintRequest<'a> {
    pub secret: &'a str,
    pub account_claim: &'a str,
    pub account_id: &'a str,
    pub sub: Option<&'a str>,
    pub issuer: Option<&'a str>,
    pub audience: Option<&'a str>,
    pub now_unix: i64,
    pub ttl_secs: i64,
}

/// Mints an HS256 console token (development and tests).
pub fn mint_hs256(m: &MintRequest<'_>) -> Result<String, jsonwebtoken::errors::Error> {
    let mut claims = Map::new();
    claims.insert(m.account_claim.into(), Value::from(m.account_id));
    if let Some(sub) = m.sub {
        claims.insert("sub".into(), Value::from(sub));
    }
    if let Some(iss) = m.issuer {
        claims.insert("iss".into(), Value::from(iss));
    }
    if let Some(aud) = m.audience {
        claims.insert("aud".into(), Value::from(aud));
    }
    claims.insert("iat".into(), Value::from(m.now_unix));
    claims.insert(
        "exp".into(),
        Value::from(m.now_unix.saturating_add(m.ttl_secs)),
    );
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(m.secret.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const NOW: i64 = 1_800_000_000;

    fn settings() -> JwtSettings {
        JwtSettings {
            algorithms: vec![Algorithm::HS256],
            secret_env: "X".into(),
            secret: Some("s3cret".into()),
            issuer: Some("msgflash".into()),
            audience: Some("console".into()),
            account_claim: "account_id".into(),
            leeway: Duration::ZERO,
            public_keys: Vec::new(),
            jwks: None,
        }
    }

    fn mint(secret: &str, ttl: i64, iss: &str, aud: &str) -> String {
        mint_hs256(&MintRequest {
            secret,
            account_claim: "account_id",
            account_id: "acc_1",
            sub: Some("user_7"),
            issuer: Some(iss),
            audience: Some(aud),
            now_unix: NOW,
            ttl_secs: ttl,
        })
        .unwrap()
    }

    #[test]
    fn valid_token_yields_account_and_user() {
        let v = JwtVerifier::new(&settings()).unwrap();
        let id = v
            .verify(&mint("s3cret", 60, "msgflash", "console"), NOW)
            .unwrap();
        assert_eq!(id.account_id, "acc_1");
        assert_eq!(id.user_id.as_deref(), Some("user_7"));
    }

    #[test]
    fn a_verified_token_is_cached_until_it_expires_and_a_tampered_one_never_hits() {
        let v = JwtVerifier::new(&settings()).unwrap();
        let good = mint("s3cret", 60, "msgflash", "console");
        let first = v.verify(&good, NOW).unwrap();
        assert_eq!(v.cached_tokens(), 1);
        let again = v.verify(&good, NOW + 59).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "answered from the cache");
        // exp = NOW + 60: refused from then on, cached or not.
        assert_eq!(v.verify(&good, NOW + 60), Err(JwtError::Expired));
        // Same header and claims, another signature: a different token, checked in full.
        let (unsigned, _) = good.rsplit_once('.').unwrap();
        let forged = format!("{unsigned}.AAAA");
        assert_eq!(v.verify(&forged, NOW), Err(JwtError::BadSignature));
        assert_eq!(v.cached_tokens(), 1, "failures are not cached");
        // The expired one is held as refused: answered again without a signature check, even
        // where no check is allowed; an unsigned guess never is.
        assert_eq!(v.refused_tokens(), 1);
        assert_eq!(
            v.verify_if(&good, NOW + 61, || false),
            Err(JwtError::Expired)
        );
        assert_eq!(v.verify_if(&forged, NOW, || false), Ok(None));
    }

    #[test]
    fn not_before_is_honoured_and_one_that_is_no_number_refused() {
        let v = JwtVerifier::new(&settings()).unwrap();
        let with_nbf = |nbf: Value| {
            let claims = serde_json::json!({
                "account_id": "acc_1", "iss": "msgflash", "aud": "console",
                "exp": NOW + 60, "nbf": nbf,
            });
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(Algorithm::HS256),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(b"s3cret"),
            )
            .unwrap()
        };
        assert!(v.verify(&with_nbf(NOW.into()), NOW).is_ok());
        assert_eq!(
            v.verify(&with_nbf((NOW + 1).into()), NOW),
            Err(JwtError::NotYetValid)
        );
        // Not yet valid may become valid: held as refused until the next second only (a replay
        // costs one signature check a second, not one each time).
        assert_eq!(v.refused_tokens(), 1);
        assert_eq!(
            v.verify(&with_nbf((NOW + 1).into()), NOW),
            Err(JwtError::NotYetValid)
        );
        assert!(v.verify(&with_nbf((NOW + 1).into()), NOW + 1).is_ok());
        // Fractional seconds are a NumericDate too, rounded the strict way.
        assert!(v
            .verify(&with_nbf(Value::from(NOW as f64 - 0.5)), NOW)
            .is_ok());
        assert_eq!(
            v.verify(&with_nbf(Value::from(NOW as f64 + 0.5)), NOW),
            Err(JwtError::NotYetValid)
        );
        for odd in [Value::from("soon"), Value::Null, Value::from(true)] {
            assert_eq!(v.verify(&with_nbf(odd), NOW), Err(JwtError::Malformed));
        }
    }

    #[test]
    fn each_failure_is_named() {
        let v = JwtVerifier::new(&settings()).unwrap();
        let good = mint("s3cret", 60, "msgflash", "console");
        assert_eq!(v.verify(&good, NOW + 60), Err(JwtError::Expired));
        assert_eq!(
            v.verify(&mint("other", 60, "msgflash", "console"), NOW),
            Err(JwtError::BadSignature)
        );
        assert_eq!(
            v.verify(&mint("s3cret", 60, "evil", "console"), NOW),
            Err(JwtError::WrongIssuer)
        );
        assert_eq!(
            v.verify(&mint("s3cret", 60, "msgflash", "x"), NOW),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(v.verify("not.a.jwt", NOW), Err(JwtError::Malformed));
    }

    #[test]
    fn alg_none_and_unlisted_algorithms_are_refused() {
        let v = JwtVerifier::new(&settings()).unwrap();
        // {"alg":"none","typ":"JWT"} . {"account_id":"acc_1","exp":9999999999} . (empty)
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJhY2NvdW50X2lkIjoiYWNjXzEiLCJleHAiOjk5OTk5OTk5OTl9.";
        assert_eq!(v.verify(none, NOW), Err(JwtError::Malformed));
        let hs384 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &serde_json::json!({"account_id": "a", "exp": NOW + 60}),
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert_eq!(v.verify(&hs384, NOW), Err(JwtError::AlgorithmNotAllowed));
    }

    #[test]
    fn account_falls_back_to_sub() {
        let v = JwtVerifier::new(&settings()).unwrap();
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "u1", "exp": NOW + 60, "iss": "msgflash", "aud": ["console"]}),
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert_eq!(v.verify(&t, NOW).unwrap().account_id, "u1");
    }

    #[test]
    fn a_present_account_claim_of_the_wrong_shape_never_falls_back() {
        let v = JwtVerifier::new(&settings()).unwrap();
        for claims in [
            serde_json::json!({"account_id": 42, "sub": "acc_victim"}),
            serde_json::json!({"account_id": "", "sub": "acc_victim"}),
            serde_json::json!({"account_id": null, "sub": "acc_victim"}),
            serde_json::json!({"account_id": ["acc_victim"], "sub": "acc_victim"}),
            serde_json::json!({"account_id": "acme", "sub": 7}),
        ] {
            let mut claims = claims;
            claims["exp"] = (NOW + 60).into();
            claims["iss"] = "msgflash".into();
            claims["aud"] = "console".into();
            let t = jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(b"s3cret"),
            )
            .unwrap();
            assert_eq!(v.verify(&t, NOW), Err(JwtError::NoAccount), "{claims}");
        }
    }

    /// A JWKS key is used only as it says: for signatures (`use`), with its own algorithm
    /// (`alg`); one that says neither verifies any token of its family.
    #[test]
    fn a_jwks_key_verifies_only_what_it_names() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        let pair = rcgen::KeyPair::generate().unwrap(); // ECDSA P-256
        let point = pair.public_key_raw(); // 0x04 || x || y
        let (x, y) = (
            URL_SAFE_NO_PAD.encode(&point[1..33]),
            URL_SAFE_NO_PAD.encode(&point[33..65]),
        );
        let claims = serde_json::json!({
            "account_id": "acc_1", "iss": "msgflash", "aud": "console", "exp": NOW + 60,
        });
        let signing = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &signing).unwrap();
        let verifier = |extra: &str| {
            let jwks =
                format!(r#"{{"keys":[{{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}"{extra}}}]}}"#);
            JwtVerifier::new(&JwtSettings {
                algorithms: vec![Algorithm::ES256],
                jwks: Some(jwks),
                ..settings()
            })
            .unwrap()
        };
        for fine in ["", r#","use":"sig""#, r#","alg":"ES256","use":"sig""#] {
            let id = verifier(fine).verify(&token, NOW).unwrap();
            assert_eq!(id.account_id, "acc_1", "{fine}");
        }
        for not_for_this in [r#","use":"enc""#, r#","alg":"ES384""#] {
            assert_eq!(
                verifier(not_for_this).verify(&token, NOW),
                Err(JwtError::NoKey),
                "{not_for_this}"
            );
        }
    }
}
