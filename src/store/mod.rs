//! The key store: one trait for accounts, key records and counters, whatever holds them.

pub mod breaker;
pub mod embedded;
mod file_lock;
mod journal;
pub mod redis;
mod usage;

/// The mode of the files the embedded store creates (data, usage, lock): they hold key hashes
/// and account ids, for the gateway's user alone.
const PRIVATE_FILE: u32 = 0o600;

/// Where a file is written before it is renamed over `path`: the whole name and `.tmp`
/// (`with_extension` would make `store.tmp`'s temporary file the data file itself, and
/// `a.jsonl` share one with `a.json`).
fn temp_path(path: &std::path::Path) -> std::path::PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    tmp.into()
}

use crate::limits::gcra::BucketParams;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::fmt;

pub use embedded::EmbeddedStore;
pub use redis::RedisStore;
use std::sync::Arc;

/// Something other nodes changed: drop it from the local caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// A key, by its SHA-256 hex.
    Key(String),
    Account(String),
    /// Everything (after missing messages).
    All,
}

/// Where a store delivers invalidations.
pub type InvalidationSink = Arc<dyn Fn(Invalidation) + Send + Sync>;

/// Whether an account may use routes that require a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Subscription {
    Active,
    Inactive,
}

/// A customer account: its plan, subscription and quota anchor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Account {
    pub id: String,
    pub plan: String,
    pub subscription: Subscription,
    /// Day of the month (1..=31, UTC) on which the monthly quota resets.
    pub quota_anchor_day: u8,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// One API key as stored: the SHA-256 of the secret, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyRecord {
    pub id: String,
    pub account_id: String,
    pub name: String,
    /// Lowercase hex SHA-256 of the full key.
    pub hash: String,
    pub prefix: String,
    pub last4: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub instance_ids: Vec<String>,
    pub created_at_ms: u64,
    #[serde(default)]
    pub last_used_at_ms: Option<u64>,
    #[serde(default)]
    pub revoked_at_ms: Option<u64>,
}

impl KeyRecord {
    pub fn is_active(&self) -> bool {
        self.revoked_at_ms.is_none()
    }
}

/// A revoked key, and whether the other nodes were told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub record: KeyRecord,
    /// False when the invalidation could not be published: other nodes may still accept the
    /// key from their caches until it is (or for `cache.ttl` at most).
    pub announced: bool,
    /// False when the store has replicas and none confirmed the revoke in time: a failover
    /// could undo it.
    pub replicated: bool,
}

/// Revoked key records an account keeps (listed with their `revokedAt`); older ones are
/// forgotten when another key is revoked. Without a bound, a caller creating and revoking keys
/// in a loop grew its records, and every listing of them, without end. A forgotten key is
/// refused as any unknown key is.
pub const REVOKED_KEYS_KEPT: usize = 100;

/// `keys`' revoked records beyond the newest [`REVOKED_KEYS_KEPT`] (by revocation time, ties
/// by id): the ones to forget.
pub(crate) fn revoked_beyond_kept<'a>(
    keys: impl Iterator<Item = &'a KeyRecord>,
) -> Vec<&'a KeyRecord> {
    let mut revoked: Vec<&KeyRecord> = keys.filter(|k| !k.is_active()).collect();
    revoked.sort_by(|a, b| (b.revoked_at_ms, &b.id).cmp(&(a.revoked_at_ms, &a.id)));
    revoked.split_off(revoked.len().min(REVOKED_KEYS_KEPT))
}

/// The order keys are listed in: oldest first, ties by id.
pub fn oldest_first(keys: &mut [KeyRecord]) {
    keys.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
}

/// Everything the store needs to decide one authorized request's rate limit and quota.
#[derive(Debug, Clone)]
pub struct AdmitRequest<'a> {
    pub key_id: &'a str,
    pub account_id: &'a str,
    pub now_ns: u64,
    pub bucket: BucketParams,
    /// Identifier of the current quota period (its start date).
    pub period_id: &'a str,
    /// End of the current quota period (Unix seconds): counters may expire after it.
    pub period_end_unix: i64,
    pub monthly_quota: u64,
    /// The key's admissions in flight on this node (see [`InFlight`]).
    pub in_flight: &'a InFlight,
}

/// Admissions of one key in flight on this node, shared by its requests (the cached key holds
/// it): a shared store counts how many of the key's own requests went to the store before this
/// one and are not finished, whose increments its replies may still include.
#[derive(Debug, Default)]
pub struct InFlight(std::sync::atomic::AtomicU32);

impl InFlight {
    /// Enters one admission: how many of the key's were in flight before it, and a guard that
    /// leaves when dropped.
    pub fn enter(&self) -> (u32, InFlightGuard<'_>) {
        let ahead = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (ahead, InFlightGuard(self))
    }
}

/// A copy starts at zero: it counts for whoever holds it, and is no part of what it sits in.
impl Clone for InFlight {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for InFlight {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for InFlight {}

/// One admission in flight; leaves when dropped.
pub struct InFlightGuard<'a>(&'a InFlight);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The store's decision for one request: checks 6 and 7 of SPEC §3, atomically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Forwarded: one token and one quota unit consumed.
    Allowed { remaining: u32, reset_after_ns: u64 },
    /// Over the per-key rate: nothing consumed.
    RateLimited {
        retry_after_ns: u64,
        reset_after_ns: u64,
    },
    /// Over the monthly quota: nothing consumed.
    QuotaExceeded { remaining: u32, reset_after_ns: u64 },
    /// The key was revoked (a node's cache had not heard of it yet): nothing consumed.
    Revoked,
}

/// Account ids and key ids: 1 to 128 of `[A-Za-z0-9._:-]`.
pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Instance ids: a UUID's `8-4-4-4-12` hex digits.
pub(crate) fn valid_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Why a key could not be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateKeyError {
    UnknownAccount,
    LimitReached { max: u32 },
    Store(StoreError),
}

/// The store could not answer: never a reason to say 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    Unavailable(String),
    Persist(String),
    /// The store answers but would not keep what the gateway relies on (start-up checks).
    Misconfigured(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unavailable(why) => write!(f, "store unavailable: {why}"),
            Self::Persist(why) => write!(f, "store could not persist: {why}"),
            Self::Misconfigured(why) => write!(f, "store misconfigured: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<StoreError> for CreateKeyError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// Accounts, keys and counters. Implementations: [`EmbeddedStore`] (one node) and Redis (many).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The key record whose hash is `hash_hex`, revoked or not.
    async fn key_by_hash(&self, hash_hex: &str) -> Result<Option<KeyRecord>, StoreError>;

    /// An account, for the request path.
    async fn account(&self, id: &str) -> Result<Option<Account>, StoreError>;

    /// An account, for management (the admin API). The same read as [`Store::account`], over a
    /// connection of management's own where the store has one: the Redis store's request-path
    /// connections are opened by the first call on the proxy's runtime and must stay there.
    async fn account_for_management(&self, id: &str) -> Result<Option<Account>, StoreError> {
        self.account(id).await
    }

    /// Creates or replaces an account (counters are kept); `Ok(false)` when it is written but
    /// the other nodes could not be told (a retry, which writes the same, tells them again).
    async fn put_account(&self, account: Account) -> Result<bool, StoreError>;

    /// Adds a key to its account unless the account already has `max_keys` active keys.
    async fn create_key(
        &self,
        record: KeyRecord,
        max_keys: u32,
    ) -> Result<KeyRecord, CreateKeyError>;

    /// All keys of an account, revoked ones included, oldest first.
    async fn list_keys(&self, account_id: &str) -> Result<Vec<KeyRecord>, StoreError>;

    /// Marks a key revoked; `None` when the account has no such key.
    /// `None` when the account has no such key. A revoked key is answered with whether every
    /// node was told (a shared store whose announcement failed says so; a retry, which
    /// changes no record, announces again).
    async fn revoke_key(
        &self,
        account_id: &str,
        key_id: &str,
        now_ms: u64,
    ) -> Result<Option<Revoked>, StoreError>;

    /// Rate limit then quota, atomically; a rejection consumes nothing.
    async fn admit(&self, request: &AdmitRequest<'_>) -> Result<Admission, StoreError>;

    /// The key's rate-limit bucket at `now_ns` without taking a token: `(remaining,
    /// reset_after_ns)`, what a request refused before the bucket (SPEC §3 steps 4–5) reports.
    async fn bucket_state(
        &self,
        account_id: &str,
        key_id: &str,
        now_ns: u64,
        bucket: BucketParams,
    ) -> Result<(u32, u64), StoreError>;

    /// Requests counted in the account's period `period_id`.
    async fn usage(&self, account_id: &str, period_id: &str) -> Result<u64, StoreError>;

    /// Moves the requests counted in period `from` to period `to` (the account's quota anchor
    /// day changed: the month's usage carries over). `to_end_unix` is when `to` ends, `now_unix`
    /// the time the move is made at (the gateway's clock).
    async fn carry_usage(
        &self,
        account_id: &str,
        from: &str,
        to: &str,
        to_end_unix: i64,
        now_unix: i64,
    ) -> Result<(), StoreError>;

    /// True when the store can serve requests.
    async fn ready(&self) -> bool;

    /// Delivers changes made through other nodes to `sink` (shared stores only).
    fn on_invalidation(&self, _sink: InvalidationSink) {}

    /// False while this node cannot be sure it hears every invalidation (its subscription is
    /// silent past its heartbeat): caches must then not answer alone.
    fn invalidations_confirmed(&self) -> bool {
        true
    }

    /// Refused requests whose usage could not be given back (they only make the limits
    /// stricter, never looser).
    fn refunds_failed(&self) -> u64 {
        0
    }

    /// Admissions answered 503 whose commands may still have run in the store (a timeout or a
    /// connection lost after sending): each may have consumed a token and a unit of quota.
    fn admissions_uncertain(&self) -> u64 {
        0
    }

    /// Each circuit breaker's name and whether it is tripped (open or probing).
    fn breakers(&self) -> Vec<(&'static str, bool)> {
        Vec::new()
    }

    /// Lets go of what this process owns exclusively (the embedded store's files), after
    /// writing what it holds only in memory; writes are refused from then on. Called when the
    /// server has stopped.
    fn release(&self) {}
}
