//! The key schema: every Redis key and channel the store uses, and how records are encoded.
//!
//! Key patterns. Every key of one account carries the hash tag `{a:<account id>}`, so that the
//! transactions below touch one Redis Cluster slot. Account ids are `[A-Za-z0-9._:-]`, never braces.
//!
//! | key                              | type   | holds                                          | TTL |
//! |----------------------------------|--------|------------------------------------------------|-----|
//! | `mf:{a:<acct>}`                  | STRING | account JSON                                   | none |
//! | `mf:{a:<acct>}:keys`             | HASH   | key id -> key record JSON (SHA-256, no secret)  | none |
//! | `mf:{a:<acct>}:active`           | SET    | ids of active keys: the plan cap counts these; an id enters before its record is written and leaves only with a revoke (or a refusal over the cap) | none |
//! | `mf:{a:<acct>}:used`             | HASH   | key id -> last use, Unix ms (each node writes it at most once a minute per key) | none |
//! | `mf:{a:<acct>}:tat:<key id>`     | ZSET   | member `t`, score = GCRA theoretical arrival time (µs) | burst window + 61 s, refreshed by each node at most once a minute per key |
//! | `mf:{a:<acct>}:q:<period start>` | STRING | requests counted in the quota period            | until 35 days after the period ends |
//! | `mf:kh:<sha256 hex>`             | STRING | key record JSON, for lookup by hash             | none |
//! | channel `mf:invalidate`          | pub/sub| `k <hash>`, `a <acct>`: drop from local caches   | - |
//!

use crate::store::StoreError;

/// Invalidation channel.
pub const CHANNEL: &str = "mf:invalidate";

pub(super) fn account_key(a: &str) -> String {
    account_parts(a).concat()
}
pub(super) fn keys_key(a: &str) -> String {
    format!("mf:{{a:{a}}}:keys")
}
pub(super) fn active_key(a: &str) -> String {
    active_parts(a).concat()
}
pub(super) fn used_key(a: &str) -> String {
    used_parts(a).concat()
}
pub(super) fn tat_key(a: &str, key_id: &str) -> String {
    tat_parts(a, key_id).concat()
}
pub(super) fn quota_key(a: &str, period: &str) -> String {
    quota_parts(a, period).concat()
}
pub(super) fn hash_key(hash: &str) -> String {
    hash_parts(hash).concat()
}

// The request path's keys as parts, written into a command without an allocation
// (`resp::Arg::Concat`); the `*_key` functions above are the same keys as strings.
pub(super) fn account_parts(a: &str) -> [&str; 3] {
    ["mf:{a:", a, "}"]
}
pub(super) fn active_parts(a: &str) -> [&str; 3] {
    ["mf:{a:", a, "}:active"]
}
pub(super) fn used_parts(a: &str) -> [&str; 3] {
    ["mf:{a:", a, "}:used"]
}
pub(super) fn tat_parts<'a>(a: &'a str, key_id: &'a str) -> [&'a str; 4] {
    ["mf:{a:", a, "}:tat:", key_id]
}
pub(super) fn quota_parts<'a>(a: &'a str, period: &'a str) -> [&'a str; 4] {
    ["mf:{a:", a, "}:q:", period]
}
pub(super) fn hash_parts(hash: &str) -> [&str; 2] {
    ["mf:kh:", hash]
}

pub(super) fn decode_bytes<T: serde::de::DeserializeOwned>(json: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(json)
        .map_err(|e| StoreError::Unavailable(format!("corrupt record: {e}")))
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Unavailable(format!("corrupt record: {e}")))
}

pub(super) fn encode<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Persist(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_account_share_a_hash_tag() {
        for k in [
            account_key("acme"),
            keys_key("acme"),
            active_key("acme"),
            used_key("acme"),
            tat_key("acme", "key_1"),
            quota_key("acme", "2026-11-01"),
        ] {
            assert!(k.starts_with("mf:{a:acme}"), "{k}");
        }
    }
}
