//! Authentication: API keys to principals (cache first, store on miss) and console JWTs.

pub mod api_key;
pub mod jwt;

use crate::cache::BoundedCache;
use crate::clock::Clock;
use crate::store::{Account, KeyRecord, Store, StoreError};
use api_key::KeyHash;
use http::HeaderValue;
use std::sync::Arc;

/// What the request path needs of a key: all the key cache holds. (A full [`KeyRecord`] also
/// carries its name, display prefix, last four characters, timestamps and its own hash, which
/// made a cached key twice as large.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedKey {
    pub id: Box<str>,
    pub account_id: Box<str>,
    pub scopes: Box<[Box<str>]>,
    pub instance_ids: Box<[Box<str>]>,
}

impl From<KeyRecord> for CachedKey {
    fn from(r: KeyRecord) -> Self {
        let boxed = |v: Vec<String>| v.into_iter().map(String::into_boxed_str).collect();
        Self {
            id: r.id.into_boxed_str(),
            account_id: r.account_id.into_boxed_str(),
            scopes: boxed(r.scopes),
            instance_ids: boxed(r.instance_ids),
        }
    }
}

/// The caller behind a valid, unrevoked key, with its ids ready to forward as header values.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key: Arc<CachedKey>,
    pub account: Arc<Account>,
    pub key_id_value: HeaderValue,
    pub account_id_value: HeaderValue,
}

/// What a key lookup found.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// A valid, unrevoked key and its account.
    Found(Principal),
    /// Unknown or revoked (from the store or the negative cache).
    Unknown,
    /// Not in the positive cache, and the caller did not let the lookup go further.
    NotAsked,
}

/// A header value for an id (ids are validated `[A-Za-z0-9._:-]` when created).
fn id_value(id: &str) -> HeaderValue {
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("invalid-id"))
}

/// Key and account lookups with bounded positive and negative caches in front of the store.
pub struct Directory {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    keys: BoundedCache<KeyHash, (Arc<CachedKey>, HeaderValue)>,
    unknown: BoundedCache<KeyHash, ()>,
    accounts: BoundedCache<String, (Arc<Account>, HeaderValue)>,
}

impl Directory {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        capacity: usize,
        negative_capacity: usize,
        ttl_ns: u64,
    ) -> Self {
        Self {
            store,
            clock,
            keys: BoundedCache::new(capacity, ttl_ns),
            unknown: BoundedCache::new(negative_capacity, ttl_ns),
            accounts: BoundedCache::new(capacity, ttl_ns),
        }
    }

    /// The principal for a well-formed key, or `None` when the key is unknown or revoked.
    /// `may_look_further` is asked only when the key is not in the positive cache: `false`
    /// answers [`Lookup::NotAsked`] without a store or negative-cache lookup.
    pub(crate) async fn lookup(
        &self,
        key: &[u8],
        may_look_further: impl FnOnce() -> bool,
    ) -> Result<Lookup, StoreError> {
        let hash = KeyHash::of(key);
        let now = self.clock.now_ns();
        let (record, key_id_value) = match self.keys.get(&hash, now) {
            Some(entry) => entry,
            None if !may_look_further() => return Ok(Lookup::NotAsked),
            None if self.unknown.get(&hash, now).is_some() => return Ok(Lookup::Unknown),
            None => match self.store.key_by_hash(&hash.to_hex()).await? {
                Some(record) if record.is_active() => {
                    let value = id_value(&record.id);
                    let entry = (Arc::new(CachedKey::from(record)), value);
                    self.keys.insert(hash, entry.clone(), now);
                    entry
                }
                _ => {
                    self.unknown.insert(hash, (), now);
                    return Ok(Lookup::Unknown);
                }
            },
        };
        let (account, account_id_value) = match self.accounts.get(&*record.account_id, now) {
            Some(entry) => entry,
            None => match self.store.account(&record.account_id).await? {
                Some(account) => {
                    let entry = (Arc::new(account), id_value(&record.account_id));
                    self.accounts
                        .insert(record.account_id.to_string(), entry.clone(), now);
                    entry
                }
                None => return Ok(Lookup::Unknown),
            },
        };
        Ok(Lookup::Found(Principal {
            key: record,
            account,
            key_id_value,
            account_id_value,
        }))
    }

    /// Drops everything cached about a key (after a create or revoke).
    pub fn forget_key(&self, hash_hex: &str) {
        if let Some(hash) = KeyHash::from_hex(hash_hex) {
            self.keys.remove(&hash);
            self.unknown.remove(&hash);
        }
    }

    /// Drops a cached account (after a plan or subscription change).
    pub fn forget_account(&self, account_id: &str) {
        self.accounts.remove(account_id);
    }

    /// Drops everything cached (after invalidations may have been missed).
    pub fn clear(&self) {
        self.keys.clear();
        self.unknown.clear();
        self.accounts.clear();
    }

    /// Applies a change announced by another node.
    pub fn apply(&self, change: &crate::store::Invalidation) {
        match change {
            crate::store::Invalidation::Key(hash) => self.forget_key(hash),
            crate::store::Invalidation::Account(id) => self.forget_account(id),
            crate::store::Invalidation::All => self.clear(),
        }
    }

    /// Entries held by the positive key cache.
    pub fn cached_keys(&self) -> usize {
        self.keys.len()
    }
}
