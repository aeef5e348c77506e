//! Authentication: API keys to principals (cache first, store on miss) and console JWTs.

pub mod api_key;
mod jose;
pub mod jwt;

use crate::cache::BoundedCache;
use crate::clock::Clock;
use crate::store::{Account, KeyRecord, Store, StoreError};
use api_key::KeyHash;
use http::HeaderValue;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// The restrictions as forwarded to the backend, built once per cached key; `None` for a
    /// key without any (most keys: they pay one word).
    pub forwarded: Option<Arc<ForwardedRestrictions>>,
    /// This node's admissions of the key in flight (a shared store's replies may include the
    /// increments of those that went first).
    pub in_flight: crate::store::InFlight,
}

/// A restricted key's scopes and instance ids as header values (`a,b`), so that a backend can
/// hold an item it serves by id to them: the gateway checks the instance a request names, not
/// the one a backend finds behind an id (`GET /api/v1/messages/{id}?instanceId=MINE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedRestrictions {
    /// `None`: the key may use every scope.
    pub scopes: Option<HeaderValue>,
    /// `None`: the key may use every instance.
    pub instance_ids: Option<HeaderValue>,
}

impl ForwardedRestrictions {
    /// `Ok(None)` for a key without restrictions; `Err` when a list cannot be a header value
    /// (the items are checked first: never so).
    fn of(scopes: &[Box<str>], instance_ids: &[Box<str>]) -> Result<Option<Arc<Self>>, ()> {
        if scopes.is_empty() && instance_ids.is_empty() {
            return Ok(None);
        }
        Ok(Some(Arc::new(Self {
            scopes: listed(scopes)?,
            instance_ids: listed(instance_ids)?,
        })))
    }
}

/// `items` comma-separated, or `None` when there are none.
fn listed(items: &[Box<str>]) -> Result<Option<HeaderValue>, ()> {
    if items.is_empty() {
        return Ok(None);
    }
    let joined = items.iter().map(|i| &**i).collect::<Vec<_>>().join(",");
    HeaderValue::from_str(&joined).map(Some).map_err(|_| ())
}

impl CachedKey {
    /// What the cache keeps of a key record. A scope or instance id outside what key creation
    /// accepts (written to the store by something else) is a store fault: forwarded, the list
    /// would say less than the key holds, or nothing, which a backend may read as "any".
    pub fn of(r: KeyRecord) -> Result<Self, StoreError> {
        let plain = r
            .scopes
            .iter()
            .all(|s| crate::policy::routes::valid_scope(s))
            && r.instance_ids.iter().all(|i| crate::store::valid_uuid(i));
        let refused = || {
            StoreError::Misconfigured(
                "a key record holds a scope or instance id key creation would refuse".into(),
            )
        };
        if !plain {
            return Err(refused());
        }
        let boxed = |v: Vec<String>| v.into_iter().map(String::into_boxed_str).collect();
        let scopes: Box<[Box<str>]> = boxed(r.scopes);
        let instance_ids: Box<[Box<str>]> = boxed(r.instance_ids);
        Ok(Self {
            id: r.id.into_boxed_str(),
            account_id: r.account_id.into_boxed_str(),
            forwarded: ForwardedRestrictions::of(&scopes, &instance_ids).map_err(|()| refused())?,
            scopes,
            instance_ids,
            in_flight: crate::store::InFlight::default(),
        })
    }
}

/// The caller behind a valid, unrevoked key, with its ids ready to forward as header values.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key: Arc<CachedKey>,
    pub account: Arc<Account>,
    pub key_id_value: HeaderValue,
    pub account_id_value: HeaderValue,
    /// The store failed during this lookup and the cache answered (the outage rule): the
    /// admission that follows would wait out the same outage, so it is not tried.
    pub store_failed: bool,
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

/// A header value for an id. Ids are validated `[A-Za-z0-9._:-]` when created; a record
/// holding another (written to the store by something else) is a store fault, never a shared
/// placeholder identity for the backend.
fn id_value(id: &str) -> Result<HeaderValue, StoreError> {
    if !crate::store::valid_id(id) {
        return Err(StoreError::Misconfigured(format!(
            "a record holds an invalid id ({} bytes)",
            id.len()
        )));
    }
    HeaderValue::from_str(id)
        .map_err(|_| StoreError::Misconfigured("a record holds an invalid id".into()))
}

/// Key and account lookups with bounded positive and negative caches in front of the store.
pub struct Directory {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    keys: BoundedCache<KeyHash, (Arc<CachedKey>, HeaderValue)>,
    unknown: BoundedCache<KeyHash, ()>,
    /// Keys this node found valid in the store within [`RECENTLY_VALID_NS`]: over a client's
    /// limit on failed authentications they are still looked up, so that one client's guesses
    /// do not lock out every legitimate key behind the same address (a NAT, a platform's egress)
    /// once its cache entry expires. A guess is never in it.
    recent: BoundedCache<KeyHash, ()>,
    accounts: BoundedCache<String, (Arc<Account>, HeaderValue)>,
    /// Invalidation counters. A lookup that read the store while its record's counter moved
    /// does not cache what it read: the record may predate the change (a revoke, a plan change)
    /// whose invalidation was already applied, and caching it would undo that invalidation.
    generations: Generations,
    /// Cached records read again from the store because invalidations were not confirmed.
    unconfirmed_reads: AtomicU64,
    /// Whole-cache flushes (a resubscription to the invalidation channel, or `clear`).
    flushes: AtomicU64,
    /// Key lookups answered by the positive cache, by the negative cache, and by the store.
    lookups: [AtomicU64; 3],
}

/// Invalidation counters: one bumped by a flush, and one per slot of keys and of accounts
/// (bumped by their invalidations), so that unrelated changes do not stop other records from
/// being cached.
struct Generations {
    all: AtomicU64,
    keys: Box<[AtomicU64]>,
    accounts: Box<[AtomicU64]>,
    /// Keyed per process: a client cannot aim an account id at another's slot.
    hasher: crate::cache::Keyed,
}

const GENERATION_SLOTS: usize = 1024;

/// How long a key found valid stays exempt from a client's failure limit (see
/// [`Directory::recent`]).
const RECENTLY_VALID_NS: u64 = 24 * 3600 * 1_000_000_000;

/// What a lookup saw of the counters that guard one record.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Seen(u64, u64);

impl Generations {
    fn new() -> Self {
        let slots = || (0..GENERATION_SLOTS).map(|_| AtomicU64::new(0)).collect();
        Self {
            all: AtomicU64::new(0),
            keys: slots(),
            accounts: slots(),
            hasher: crate::cache::Keyed::default(),
        }
    }

    fn key_slot(&self, hash: &KeyHash) -> &AtomicU64 {
        let n = usize::from(u16::from_le_bytes([hash.0[0], hash.0[1]]));
        &self.keys[n % GENERATION_SLOTS]
    }

    fn account_slot(&self, account_id: &str) -> &AtomicU64 {
        use std::hash::BuildHasher;
        let n = self.hasher.hash_one(account_id);
        &self.accounts[usize::try_from(n % GENERATION_SLOTS as u64).unwrap_or(0)]
    }

    fn of(&self, slot: &AtomicU64) -> Seen {
        Seen(
            self.all.load(Ordering::Acquire),
            slot.load(Ordering::Acquire),
        )
    }
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
            recent: BoundedCache::new(capacity, RECENTLY_VALID_NS),
            accounts: BoundedCache::new(capacity, ttl_ns),
            generations: Generations::new(),
            unconfirmed_reads: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            lookups: Default::default(),
        }
    }

    /// The principal for a well-formed key, or `None` when the key is unknown or revoked.
    /// `may_look_further` is asked only when the key is not in the positive cache: `false`
    /// answers [`Lookup::NotAsked`] without a store or negative-cache lookup, unless the key
    /// was found valid here recently.
    pub(crate) async fn lookup(
        &self,
        key: &[u8],
        may_look_further: impl FnOnce() -> bool,
    ) -> Result<Lookup, StoreError> {
        let hash = KeyHash::of(key);
        let now = self.clock.now_ns();
        let g = &self.generations;
        let key_seen = g.of(g.key_slot(&hash));
        // Cache what the store said only if no invalidation of it came in meanwhile.
        let key_unchanged = || g.of(g.key_slot(&hash)) == key_seen;
        // While this node cannot be sure it hears every invalidation, a cached record is
        // checked against the store; it answers alone only if the store cannot (the outage
        // rule: known callers keep working, bounded by the cache's TTL).
        let cached = self.keys.get(&hash, now);
        let trust_cache = cached.is_some() && self.confirmed();
        let mut store_failed = false;
        let count = |i: usize| self.lookups[i].fetch_add(1, Ordering::Relaxed);
        let (record, key_id_value) = match cached {
            Some(entry) if trust_cache => {
                count(0);
                entry
            }
            None if !may_look_further() && self.recent.get(&hash, now).is_none() => {
                return Ok(Lookup::NotAsked)
            }
            None if self.unknown.get(&hash, now).is_some() => {
                count(1);
                return Ok(Lookup::Unknown);
            }
            cached => match self.store.key_by_hash(&hash.to_hex()).await.inspect(|_| {
                count(2);
            }) {
                Ok(Some(record)) if record.is_active() => {
                    self.recent.insert(hash, (), now);
                    let value = id_value(&record.id)?;
                    let entry = (Arc::new(CachedKey::of(record)?), value);
                    // Insert, then look again: `forget_*` bumps the generation before it
                    // removes, so an invalidation that slipped in between is seen here.
                    self.keys.insert(hash, entry.clone(), now);
                    if !key_unchanged() {
                        self.keys.remove(&hash);
                    }
                    entry
                }
                Ok(_) => {
                    self.keys.remove(&hash);
                    self.recent.remove(&hash);
                    self.unknown.insert(hash, (), now);
                    if !key_unchanged() {
                        self.unknown.remove(&hash);
                    }
                    return Ok(Lookup::Unknown);
                }
                Err(e) => match cached {
                    Some(entry) => {
                        store_failed = true;
                        entry
                    }
                    None => return Err(e),
                },
            },
        };
        let account_slot = g.account_slot(&record.account_id);
        let account_seen = g.of(account_slot);
        let cached = self.accounts.get(&*record.account_id, now);
        // The store just failed the key's lookup: the cached account answers (the outage
        // rule) without waiting out the same outage a second time.
        let trust_cache = cached.is_some() && (store_failed || self.confirmed());
        let (account, account_id_value) = match cached {
            Some(entry) if trust_cache => entry,
            cached => match self.store.account(&record.account_id).await {
                Ok(Some(account)) => {
                    let entry = (Arc::new(account), id_value(&record.account_id)?);
                    self.accounts
                        .insert(record.account_id.to_string(), entry.clone(), now);
                    if g.of(account_slot) != account_seen {
                        self.accounts.remove(&*record.account_id);
                    }
                    entry
                }
                Ok(None) => return Ok(Lookup::Unknown),
                Err(e) => match cached {
                    Some(entry) => {
                        store_failed = true;
                        entry
                    }
                    None => return Err(e),
                },
            },
        };
        Ok(Lookup::Found(Principal {
            key: record,
            account,
            key_id_value,
            account_id_value,
            store_failed,
        }))
    }

    /// Drops everything cached about a key (after a create or revoke).
    pub fn forget_key(&self, hash_hex: &str) {
        // Bumped before the removal: a lookup that inserts after it sees the bump and undoes.
        let Some(hash) = KeyHash::from_hex(hash_hex) else {
            return;
        };
        self.generations
            .key_slot(&hash)
            .fetch_add(1, Ordering::AcqRel);
        self.keys.remove(&hash);
        self.unknown.remove(&hash);
    }

    /// Drops a cached account (after a plan or subscription change).
    pub fn forget_account(&self, account_id: &str) {
        self.generations
            .account_slot(account_id)
            .fetch_add(1, Ordering::AcqRel);
        self.accounts.remove(account_id);
    }

    /// Drops everything cached (after invalidations may have been missed).
    pub fn clear(&self) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.generations.all.fetch_add(1, Ordering::AcqRel);
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

    /// Whether cached records may answer alone (every invalidation is being heard); counts
    /// the times they may not.
    fn confirmed(&self) -> bool {
        let confirmed = self.store.invalidations_confirmed();
        if !confirmed {
            self.unconfirmed_reads.fetch_add(1, Ordering::Relaxed);
        }
        confirmed
    }

    /// Key lookups answered `[by the positive cache, by the negative cache, by the store]`.
    pub fn lookups(&self) -> [u64; 3] {
        self.lookups.each_ref().map(|n| n.load(Ordering::Relaxed))
    }

    /// `(cached records read again because invalidations were unconfirmed, cache flushes)`.
    pub fn cache_checks(&self) -> (u64, u64) {
        (
            self.unconfirmed_reads.load(Ordering::Relaxed),
            self.flushes.load(Ordering::Relaxed),
        )
    }

    /// Entries held by the positive key cache.
    pub fn cached_keys(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::{
        Admission, AdmitRequest, CreateKeyError, EmbeddedStore, Revoked, Subscription,
    };
    use async_trait::async_trait;
    use tokio::sync::Notify;

    fn record(scopes: &[&str], instance_ids: &[&str]) -> KeyRecord {
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        KeyRecord {
            id: "key_1".into(),
            account_id: "acme".into(),
            name: "k".into(),
            hash: "00".repeat(32),
            prefix: "msgf_live_0000".into(),
            last4: "0000".into(),
            scopes: owned(scopes),
            instance_ids: owned(instance_ids),
            created_at_ms: 0,
            last_used_at_ms: None,
            revoked_at_ms: None,
        }
    }

    #[test]
    fn restrictions_are_forwarded_whole_or_the_record_is_refused() {
        const A: &str = "3fa85f64-5717-4562-b3fc-2c963f66afa6";
        const B: &str = "9b2e8a3c-1111-4222-8333-444455556666";
        assert_eq!(CachedKey::of(record(&[], &[])).unwrap().forwarded, None);
        let both = CachedKey::of(record(&["messages:read", "a.b_c-d"], &[A, B]))
            .unwrap()
            .forwarded
            .unwrap();
        assert_eq!(
            both.scopes.as_ref().map(HeaderValue::as_bytes),
            Some(b"messages:read,a.b_c-d".as_slice())
        );
        let ids = format!("{A},{B}");
        assert_eq!(
            both.instance_ids.as_ref().map(HeaderValue::as_bytes),
            Some(ids.as_bytes())
        );
        let scoped = CachedKey::of(record(&["x"], &[]))
            .unwrap()
            .forwarded
            .unwrap();
        assert_eq!(scoped.instance_ids, None);
        // What key creation would refuse never goes out as a shorter (or empty) list.
        for (scopes, ids) in [
            (&["a,b"][..], &[][..]),
            (&[""][..], &[][..]),
            (&["Admin"][..], &[][..]),
            (&[][..], &["not-a-uuid"][..]),
            (&["x"][..], &[A, "3fa85f64,5717"][..]),
        ] {
            assert!(
                matches!(
                    CachedKey::of(record(scopes, ids)),
                    Err(StoreError::Misconfigured(_))
                ),
                "{scopes:?} {ids:?}"
            );
        }
    }

    /// The embedded store, with key lookups held until the test lets them go.
    struct HeldLookups {
        inner: EmbeddedStore,
        started: Notify,
        release: Notify,
    }

    #[async_trait]
    impl Store for HeldLookups {
        async fn key_by_hash(&self, h: &str) -> Result<Option<KeyRecord>, StoreError> {
            let record = self.inner.key_by_hash(h).await;
            self.started.notify_one();
            self.release.notified().await;
            record
        }
        async fn account(&self, id: &str) -> Result<Option<Account>, StoreError> {
            self.inner.account(id).await
        }
        async fn put_account(&self, a: Account) -> Result<bool, StoreError> {
            self.inner.put_account(a).await
        }
        async fn create_key(&self, r: KeyRecord, max: u32) -> Result<KeyRecord, CreateKeyError> {
            self.inner.create_key(r, max).await
        }
        async fn list_keys(&self, a: &str) -> Result<Vec<KeyRecord>, StoreError> {
            self.inner.list_keys(a).await
        }
        async fn revoke_key(
            &self,
            a: &str,
            k: &str,
            now: u64,
        ) -> Result<Option<Revoked>, StoreError> {
            self.inner.revoke_key(a, k, now).await
        }
        async fn admit(&self, r: &AdmitRequest<'_>) -> Result<Admission, StoreError> {
            self.inner.admit(r).await
        }
        async fn bucket_state(
            &self,
            a: &str,
            k: &str,
            now: u64,
            b: crate::limits::gcra::BucketParams,
        ) -> Result<(u32, u64), StoreError> {
            self.inner.bucket_state(a, k, now, b).await
        }
        async fn usage(&self, a: &str, p: &str) -> Result<u64, StoreError> {
            self.inner.usage(a, p).await
        }
        async fn carry_usage(
            &self,
            a: &str,
            f: &str,
            t: &str,
            e: i64,
            n: i64,
        ) -> Result<(), StoreError> {
            self.inner.carry_usage(a, f, t, e, n).await
        }
        async fn ready(&self) -> bool {
            true
        }
    }

    /// A lookup that read the record before an invalidation was applied must not put that
    /// record back into the cache after it (the cache-fill race).
    #[test]
    fn a_lookup_that_straddles_an_invalidation_does_not_cache_what_it_read() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let inner = EmbeddedStore::open(&dir.path().join("store.jsonl")).unwrap();
        let key = api_key::NewKey::generate().unwrap();
        rt.block_on(async {
            inner
                .put_account(Account {
                    id: "acme".into(),
                    plan: "pro".into(),
                    subscription: Subscription::Active,
                    quota_anchor_day: 1,
                    created_at_ms: 0,
                    updated_at_ms: 0,
                })
                .await
                .unwrap();
            inner
                .create_key(
                    KeyRecord {
                        id: "key_1".into(),
                        account_id: "acme".into(),
                        name: "k".into(),
                        hash: key.hash().to_hex(),
                        prefix: key.display_prefix(),
                        last4: key.last4(),
                        scopes: vec![],
                        instance_ids: vec![],
                        created_at_ms: 0,
                        last_used_at_ms: None,
                        revoked_at_ms: None,
                    },
                    10,
                )
                .await
                .unwrap();
        });
        let store = Arc::new(HeldLookups {
            inner,
            started: Notify::new(),
            release: Notify::new(),
        });
        let clock = Arc::new(ManualClock::at_unix(1_800_000_000));
        let directory = Directory::new(store.clone(), clock, 10, 10, 60_000_000_000);
        let secret = key.expose().as_bytes().to_vec();
        rt.block_on(async {
            let lookup = directory.lookup(&secret, || true);
            let invalidate = async {
                store.started.notified().await;
                // The revoke's invalidation arrives while the lookup holds the old record.
                directory.forget_key(&key.hash().to_hex());
                store.release.notify_one();
            };
            let (found, ()) = tokio::join!(lookup, invalidate);
            assert!(matches!(found, Ok(Lookup::Found(_))));
        });
        // Nothing was cached: the next request must ask the store again.
        let hash = KeyHash::of(&secret);
        assert!(directory
            .keys
            .get(&hash, 1_800_000_000_000_000_000)
            .is_none());
        assert!(directory
            .unknown
            .get(&hash, 1_800_000_000_000_000_000)
            .is_none());
    }
}
