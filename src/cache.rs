//! A bounded, sharded TTL cache: the only kind of cache on the request path.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

const MAX_SHARDS: usize = 16;

/// The hasher of every map on the request path (this cache, the limiters' and store's
/// buckets, the metrics): keyed (a random seed per map, so that nobody outside can aim keys at
/// one bucket) and about a fifth of std's SipHash's cost per key (every request looks up two or
/// three cache entries; a `DashMap` hashes each key twice: once for the shard, once in it).
pub(crate) type Keyed = foldhash::quality::RandomState;

/// A concurrent map with the [`Keyed`] hasher.
pub(crate) type KeyedDashMap<K, V> = dashmap::DashMap<K, V, Keyed>;

/// An empty [`KeyedDashMap`] with its own seed.
pub(crate) fn keyed_dash_map<K: Eq + Hash, V>() -> KeyedDashMap<K, V> {
    dashmap::DashMap::with_hasher(Keyed::default())
}

struct Shard<K, V> {
    map: Mutex<HashMap<K, (V, u64), Keyed>>,
    cap: usize,
    /// A full shard is swept for expired entries at most once per `ttl / 8`: sweeping on
    /// every insert would make each insert into a full cache a scan of the whole shard (a
    /// flood of unknown keys would pay it per request).
    sweep_after_ns: AtomicU64,
}

/// A cache of at most `capacity` entries, each living `ttl_ns` nanoseconds after its insert.
///
/// Entries are spread over up to 16 mutex-protected shards. The shard caps add up to
/// exactly `capacity` (each is `floor` or `ceil` of `capacity / shards`), so the total
/// never exceeds it.
pub struct BoundedCache<K, V> {
    shards: Box<[Shard<K, V>]>,
    /// Picks the shard; each shard's map has its own seed.
    hasher: Keyed,
    capacity: usize,
    ttl_ns: u64,
}

impl<K, V> std::fmt::Debug for BoundedCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len: usize = self.shards.iter().map(|s| s.map.lock().len()).sum();
        f.debug_struct("BoundedCache")
            .field("capacity", &self.capacity)
            .field("ttl_ns", &self.ttl_ns)
            .field("shards", &self.shards.len())
            .field("len", &len)
            .finish()
    }
}

impl<K: Eq + Hash + Clone, V: Clone> BoundedCache<K, V> {
    /// capacity: maximum entries in total (>= 1; 0 is treated as 1); ttl_ns: entry lifetime.
    pub fn new(capacity: usize, ttl_ns: u64) -> Self {
        let capacity = capacity.max(1);
        Self::with_shards(capacity, ttl_ns, capacity.min(MAX_SHARDS))
    }

    fn with_shards(capacity: usize, ttl_ns: u64, shard_count: usize) -> Self {
        let shard_count = shard_count.clamp(1, capacity);
        let (base, extra) = (capacity / shard_count, capacity % shard_count);
        let shards = (0..shard_count)
            .map(|i| Shard {
                map: Mutex::new(HashMap::with_hasher(Keyed::default())),
                cap: base + usize::from(i < extra),
                sweep_after_ns: AtomicU64::new(0),
            })
            .collect();
        Self {
            shards,
            hasher: Keyed::default(),
            capacity,
            ttl_ns,
        }
    }

    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> Option<&Shard<K, V>> {
        let n = self.shards.len() as u64; // at most 16
        let index = usize::try_from(self.hasher.hash_one(key) % n).unwrap_or(0);
        self.shards.get(index)
    }

    /// The live value for `key` (any borrowed form, e.g. `&str` for `String` keys); an expired
    /// entry is removed and `None` returned.
    pub fn get<Q>(&self, key: &Q, now_ns: u64) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut map = self.shard(key)?.map.lock();
        match map.get(key) {
            Some((value, expires_at)) if now_ns < *expires_at => Some(value.clone()),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    /// Inserts or replaces `key`. When its shard is full, expired entries of that shard are
    /// dropped first (at most once per `ttl / 8`), then one arbitrary entry if it is still full.
    pub fn insert(&self, key: K, value: V, now_ns: u64) {
        let Some(shard) = self.shard(&key) else {
            return;
        };
        let expires_at = now_ns.saturating_add(self.ttl_ns);
        let mut map = shard.map.lock();
        if let Some(slot) = map.get_mut(&key) {
            *slot = (value, expires_at);
            return;
        }
        if map.len() >= shard.cap && now_ns >= shard.sweep_after_ns.load(Ordering::Relaxed) {
            map.retain(|_, (_, exp)| now_ns < *exp);
            shard.sweep_after_ns.store(
                now_ns.saturating_add((self.ttl_ns / 8).max(1)),
                Ordering::Relaxed,
            );
        }
        while map.len() >= shard.cap {
            let Some(victim) = map.keys().next().cloned() else {
                break;
            };
            map.remove(&victim);
        }
        map.insert(key, (value, expires_at));
    }

    /// Runs `f` on the live value for `key` under the shard's lock (check-and-set in one step);
    /// `None` when there is no live value.
    pub fn update<Q, R>(&self, key: &Q, now_ns: u64, f: impl FnOnce(&mut V) -> R) -> Option<R>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut map = self.shard(key)?.map.lock();
        match map.get_mut(key) {
            Some((value, expires_at)) if now_ns < *expires_at => Some(f(value)),
            _ => None,
        }
    }

    /// Removes `key`, returning its value (expired or not).
    pub fn remove<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shard(key)?.map.lock().remove(key).map(|(v, _)| v)
    }

    /// Drops every entry for which `f` is false.
    pub fn retain(&self, f: impl Fn(&K, &V) -> bool) {
        for shard in self.shards.iter() {
            shard.map.lock().retain(|k, (v, _)| f(k, v));
        }
    }

    /// Drops every entry.
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            shard.map.lock().clear();
        }
    }

    /// Number of entries held, expired ones not yet dropped included.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.map.lock().len()).sum()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.map.lock().is_empty())
    }

    /// The maximum number of entries.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn get_after_ttl_is_none_and_removed() {
        let cache = BoundedCache::new(8, 100);
        cache.insert("k", 1, 1_000);
        assert_eq!(cache.get(&"k", 1_000), Some(1));
        assert_eq!(cache.get(&"k", 1_099), Some(1));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get(&"k", 1_100), None);
        assert_eq!(cache.len(), 0);
        assert!(cache.is_empty());
    }

    #[test]
    fn shard_caps_add_up_to_capacity() {
        for capacity in [1, 2, 15, 16, 17, 31, 100, 1000] {
            let cache: BoundedCache<u32, u32> = BoundedCache::new(capacity, 1);
            let caps: Vec<usize> = cache.shards.iter().map(|s| s.cap).collect();
            assert_eq!(caps.iter().sum::<usize>(), capacity);
            assert_eq!(caps.len(), capacity.min(16));
            assert!(caps
                .iter()
                .all(|&c| c >= 1 && c <= capacity.div_ceil(caps.len())));
            assert_eq!(cache.capacity(), capacity);
        }
        let zero: BoundedCache<u32, u32> = BoundedCache::new(0, 1);
        assert_eq!(zero.capacity(), 1);
    }

    #[test]
    fn full_shard_drops_expired_before_live() {
        let cache = BoundedCache::with_shards(4, 10, 1);
        cache.insert('a', 1, 0);
        cache.insert('b', 2, 0);
        cache.insert('c', 3, 5);
        cache.insert('d', 4, 5);
        cache.insert('e', 5, 12); // a and b expired at 10
        assert_eq!(cache.len(), 3);
        for (k, v) in [('c', 3), ('d', 4), ('e', 5)] {
            assert_eq!(cache.get(&k, 12), Some(v));
        }
        cache.insert('f', 6, 12);
        cache.insert('g', 7, 12); // all live: one arbitrary entry goes
        assert_eq!(cache.len(), 4);
        assert_eq!(cache.get(&'g', 12), Some(7));
    }

    #[test]
    fn a_full_shard_is_swept_at_most_once_per_eighth_of_the_ttl() {
        let cache = BoundedCache::with_shards(2, 80, 1);
        cache.insert('a', 1, 0);
        cache.insert('b', 2, 0);
        cache.insert('c', 3, 80); // full; a and b expired: swept. Next sweep not before 90.
        assert_eq!(cache.len(), 1);
        cache.insert('d', 4, 81);
        cache.insert('e', 5, 85); // full of live entries, no sweep due: one arbitrary entry goes
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&'e', 85), Some(5));
        // At 161 whichever of c and d is left has expired and a sweep is due: it goes, e stays.
        cache.insert('f', 6, 161);
        assert_eq!(cache.get(&'e', 161), Some(5));
        assert_eq!(cache.get(&'f', 161), Some(6));
    }

    #[test]
    fn capacity_one_keeps_only_the_latest() {
        let cache = BoundedCache::new(1, 1_000);
        cache.insert(1u8, "one", 0);
        cache.insert(2u8, "two", 0);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get(&1, 0), None);
        assert_eq!(cache.get(&2, 0), Some("two"));
    }

    #[test]
    fn remove_retain_clear() {
        let cache = BoundedCache::new(64, 1_000);
        for i in 0..10u32 {
            cache.insert(i, i * 10, 0);
        }
        let held = cache.len();
        assert!(held >= 1);
        let present: Vec<u32> = (0..10).filter(|i| cache.get(i, 0).is_some()).collect();
        assert_eq!(present.len(), held);
        let first = present[0];
        assert_eq!(cache.remove(&first), Some(first * 10));
        assert_eq!(cache.remove(&first), None);
        assert_eq!(cache.len(), held - 1);
        cache.retain(|k, _| k % 2 == 0);
        for i in 0..10u32 {
            let expected = (i % 2 == 0 && i != first && present.contains(&i)).then_some(i * 10);
            assert_eq!(cache.get(&i, 0), expected, "key {i}");
        }
        cache.clear();
        assert!(cache.is_empty());
        assert_eq!(cache.len(), 0);
        assert!(format!("{cache:?}").contains("capacity: 64"));
    }

    #[test]
    fn reinsert_updates_without_evicting() {
        let cache = BoundedCache::new(32, 1_000);
        for i in 0..320u32 {
            cache.insert(i, i, 0);
        }
        let present: Vec<u32> = (0..320).filter(|i| cache.get(i, 0).is_some()).collect();
        assert_eq!(present.len(), cache.len());
        for &k in &present {
            cache.insert(k, k + 1_000, 1);
        }
        assert_eq!(cache.len(), present.len());
        for &k in &present {
            assert_eq!(cache.get(&k, 1), Some(k + 1_000));
        }
        // The refreshed entries live from their new insert time.
        assert_eq!(cache.get(&present[0], 1_000), Some(present[0] + 1_000));
    }

    proptest! {
        #[test]
        fn len_never_exceeds_capacity(
            (capacity, keys) in (1usize..200).prop_flat_map(|c| {
                (Just(c), prop::collection::hash_set(any::<u64>(), c * 10))
            }),
            ttl in 1u64..1_000,
        ) {
            let cache = BoundedCache::new(capacity, ttl);
            for (step, key) in keys.into_iter().enumerate() {
                let now = step as u64;
                cache.insert(key, step, now);
                prop_assert!(cache.len() <= capacity);
                prop_assert_eq!(cache.get(&key, now), Some(step));
            }
        }
    }
}
