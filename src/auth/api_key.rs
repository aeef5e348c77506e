//! API keys: the `msgf_live_` + 64 hex format, generation from the OS CSPRNG, SHA-256 hashing.

use sha2::{Digest, Sha256};
use std::fmt;

/// Every key starts with this.
pub const PREFIX: &str = "msgf_live_";
/// Number of lowercase hex characters after the prefix.
pub const HEX_LEN: usize = 64;
/// Total length of a well-formed key.
pub const KEY_LEN: usize = PREFIX.len() + HEX_LEN;

/// True when `key` is exactly `msgf_live_` followed by 64 lowercase hex characters.
pub fn is_well_formed(key: &[u8]) -> bool {
    key.len() == KEY_LEN
        && key.starts_with(PREFIX.as_bytes())
        && key[PREFIX.len()..]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// SHA-256 of a key: the only form in which keys are stored or cached.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// Hashes a key (well-formedness is the caller's business).
    pub fn of(key: &[u8]) -> Self {
        Self(Sha256::digest(key).into())
    }

    /// Lowercase hex, as stored.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses the stored hex form.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only a short fingerprint: enough to correlate, too little to matter.
        write!(f, "KeyHash({}…)", &self.to_hex()[..8])
    }
}

/// A freshly generated key. Its `Debug` never prints the secret.
pub struct NewKey(String);

impl NewKey {
    /// 32 random bytes from the OS CSPRNG, hex encoded behind the prefix.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes)?;
        Ok(Self(format!("{PREFIX}{}", hex::encode(bytes))))
    }

    /// The full key: shown once to its owner, never stored or logged.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the key.
    pub fn hash(&self) -> KeyHash {
        KeyHash::of(self.0.as_bytes())
    }

    /// Display prefix: `msgf_live_` and the first 4 hex characters.
    pub fn display_prefix(&self) -> String {
        self.0[..PREFIX.len() + 4].to_string()
    }

    /// The last 4 hex characters.
    pub fn last4(&self) -> String {
        self.0[KEY_LEN - 4..].to_string()
    }
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NewKey(<redacted>)")
    }
}

/// Random identifier (`prefix` + 24 hex), for key ids.
pub fn random_id(prefix: &str) -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 12];
    getrandom::getrandom(&mut bytes)?;
    Ok(format!("{prefix}{}", hex::encode(bytes)))
}

/// Compares two secrets in time independent of where they differ (lengths are hashed away).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    // Hashed first, so that the comparison takes the same time whatever the lengths.
    Sha256::digest(a).ct_eq(&Sha256::digest(b)).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = "msgf_live_a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b2";

    #[test]
    fn documented_example_is_well_formed() {
        assert!(is_well_formed(GOOD.as_bytes()));
    }

    #[test]
    fn rejects_near_misses() {
        let upper = GOOD.replace("a1b2", "A1B2");
        let trailing = format!("{GOOD} ");
        let short = &GOOD[..GOOD.len() - 1];
        let long = format!("{GOOD}0");
        let test_prefix = GOOD.replace("live", "test");
        let non_hex = GOOD.replace("a1b2", "g1b2");
        for bad in [
            upper.as_str(),
            &trailing,
            short,
            &long,
            &test_prefix,
            &non_hex,
            "",
        ] {
            assert!(!is_well_formed(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = NewKey::generate().unwrap();
        let b = NewKey::generate().unwrap();
        assert!(is_well_formed(a.expose().as_bytes()));
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.display_prefix().len(), PREFIX.len() + 4);
        assert!(a.expose().ends_with(&a.last4()));
        assert_eq!(format!("{a:?}"), "NewKey(<redacted>)");
    }

    #[test]
    fn hash_is_sha256_hex() {
        // sha256("abc")
        assert_eq!(
            KeyHash::of(b"abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let h = KeyHash::of(GOOD.as_bytes());
        assert_eq!(KeyHash::from_hex(&h.to_hex()), Some(h));
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    proptest! {
        #[test]
        fn any_64_lower_hex_is_well_formed(hexpart in "[0-9a-f]{64}") {
            let key = format!("{PREFIX}{hexpart}");
            prop_assert!(is_well_formed(key.as_bytes()));
        }

        #[test]
        fn wrong_length_is_rejected(hexpart in "[0-9a-f]{0,63}|[0-9a-f]{65,80}") {
            let key = format!("{PREFIX}{hexpart}");
            prop_assert!(!is_well_formed(key.as_bytes()));
        }
    }
}
