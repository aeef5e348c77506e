//! The embedded store: one node; accounts and key hashes in a data file, counters in memory.

use super::journal::{Entry, Journal};
use super::{
    Account, Admission, AdmitRequest, CreateKeyError, KeyRecord, Revoked, Store, StoreError,
};
use crate::limits::gcra::{self, BucketDecision};
use async_trait::async_trait;
use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The persistent part, indexed.
#[derive(Debug, Default)]
struct Data {
    accounts: BTreeMap<String, Account>,
    /// key id -> record
    keys: BTreeMap<String, KeyRecord>,
    /// key hash -> key id
    by_hash: HashMap<String, String>,
    /// account id -> its key ids
    by_account: HashMap<String, Vec<String>>,
}

impl Data {
    fn apply(&mut self, entry: Entry) {
        match entry {
            Entry::Account(a) => {
                self.accounts.insert(a.id.clone(), a);
            }
            Entry::Key(k) => {
                if !self.keys.contains_key(&k.id) {
                    self.by_account
                        .entry(k.account_id.clone())
                        .or_default()
                        .push(k.id.clone());
                }
                self.by_hash.insert(k.hash.clone(), k.id.clone());
                self.keys.insert(k.id.clone(), k);
            }
        }
    }

    fn entries(&self) -> Vec<Entry> {
        let accounts = self.accounts.values().cloned().map(Entry::Account);
        accounts
            .chain(self.keys.values().cloned().map(Entry::Key))
            .collect()
    }

    fn active_keys(&self, account_id: &str) -> usize {
        self.by_account.get(account_id).map_or(0, |ids| {
            ids.iter()
                .filter(|id| self.keys.get(*id).is_some_and(KeyRecord::is_active))
                .count()
        })
    }
}

/// Per-key limiter state.
#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    tat_ns: u64,
    last_used_ms: u64,
}

/// An account's requests counted per quota period: the latest two periods (the current one
/// and the one a change of anchor day moves its count from), older ones forgotten.
#[derive(Debug, Default)]
struct PeriodCounts(Vec<(String, u64)>);

impl PeriodCounts {
    fn of(&self, period: &str) -> u64 {
        self.0
            .iter()
            .find(|(p, _)| p == period)
            .map_or(0, |(_, n)| *n)
    }

    fn of_mut(&mut self, period: &str) -> &mut u64 {
        let i = match self.0.iter().position(|(p, _)| p == period) {
            Some(i) => i,
            None => {
                if self.0.len() >= 2 {
                    self.0.remove(0);
                }
                self.0.push((period.to_owned(), 0));
                self.0.len() - 1
            }
        };
        &mut self.0[i].1
    }
}

/// Single-node store. Every change is in the data file (appended and fsynced) before it returns.
pub struct EmbeddedStore {
    data: RwLock<Data>,
    /// The data file; its lock serialises writers.
    journal: Mutex<Journal>,
    buckets: DashMap<String, Bucket>,
    quotas: DashMap<String, PeriodCounts>,
}

/// Accounts in the data file at `path` (their latest line), for `check` to validate.
pub fn accounts_in(path: &Path) -> Result<Vec<(usize, Account)>, StoreError> {
    let mut latest: BTreeMap<String, (usize, Account)> = BTreeMap::new();
    for (line, entry) in Journal::read_lines(path)? {
        if let Entry::Account(a) = entry {
            latest.insert(a.id.clone(), (line, a));
        }
    }
    let mut accounts: Vec<(usize, Account)> = latest.into_values().collect();
    accounts.sort_by_key(|(line, _)| *line);
    Ok(accounts)
}

impl EmbeddedStore {
    /// Opens (or starts) the data file at `path` and compacts it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut data = Data::default();
        for entry in Journal::read(path)? {
            data.apply(entry);
        }
        let journal = Journal::create(path, &data.entries())?;
        Ok(Self {
            data: RwLock::new(data),
            journal: Mutex::new(journal),
            buckets: DashMap::new(),
            quotas: DashMap::new(),
        })
    }

    /// Decides a change under the writer lock, persists it, then applies it in memory: memory
    /// never holds what the disk does not. `decide` may refuse with its call's own error.
    fn write<T, E: From<StoreError>>(
        &self,
        decide: impl FnOnce(&Data) -> Result<(T, Option<Entry>), E>,
    ) -> Result<T, E> {
        let mut journal = self.journal.lock();
        let (out, entry) = decide(&self.data.read())?;
        let Some(entry) = entry else { return Ok(out) };
        journal.append(std::slice::from_ref(&entry))?;
        let mut data = self.data.write();
        data.apply(entry);
        // Keep the file near the size of the live state.
        if journal.appended > 1000 && journal.appended > data.keys.len() + data.accounts.len() {
            if let Err(e) = journal.compact(&data.entries()) {
                tracing::warn!(error = %e, "could not compact the data file; it keeps growing");
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn key_by_hash(&self, hash_hex: &str) -> Result<Option<KeyRecord>, StoreError> {
        let data = self.data.read();
        Ok(data
            .by_hash
            .get(hash_hex)
            .and_then(|id| data.keys.get(id))
            .cloned())
    }

    async fn account(&self, id: &str) -> Result<Option<Account>, StoreError> {
        Ok(self.data.read().accounts.get(id).cloned())
    }

    async fn put_account(&self, account: Account) -> Result<bool, StoreError> {
        // One node: this node's own cache, which the caller clears, is all there is to tell.
        self.write(|_| Ok::<_, StoreError>((true, Some(Entry::Account(account.clone())))))
    }

    async fn create_key(
        &self,
        record: KeyRecord,
        max_keys: u32,
    ) -> Result<KeyRecord, CreateKeyError> {
        self.write(|data| {
            if !data.accounts.contains_key(&record.account_id) {
                return Err(CreateKeyError::UnknownAccount);
            }
            if data.active_keys(&record.account_id) >= max_keys as usize {
                return Err(CreateKeyError::LimitReached { max: max_keys });
            }
            Ok((record.clone(), Some(Entry::Key(record.clone()))))
        })
    }

    async fn list_keys(&self, account_id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        let data = self.data.read();
        let mut keys: Vec<KeyRecord> = data
            .by_account
            .get(account_id)
            .into_iter()
            .flatten()
            .filter_map(|id| data.keys.get(id))
            .cloned()
            .collect();
        drop(data);
        for key in &mut keys {
            if let Some(bucket) = self.buckets.get(&key.id) {
                key.last_used_at_ms = Some(bucket.last_used_ms);
            }
        }
        super::oldest_first(&mut keys);
        Ok(keys)
    }

    async fn revoke_key(
        &self,
        account_id: &str,
        key_id: &str,
        now_ms: u64,
    ) -> Result<Option<Revoked>, StoreError> {
        // Ownership first: a refused revoke touches nothing, not even the key's bucket. A key
        // already revoked is answered as it is, with nothing written.
        self.write(|data| match data.keys.get(key_id) {
            Some(key) if key.account_id == account_id && !key.is_active() => {
                Ok((Some(key.clone()), None))
            }
            Some(key) if key.account_id == account_id => {
                let mut key = key.clone();
                key.revoked_at_ms = Some(now_ms);
                if let Some(bucket) = self.buckets.get(key_id) {
                    key.last_used_at_ms = Some(bucket.last_used_ms);
                }
                Ok((Some(key.clone()), Some(Entry::Key(key))))
            }
            _ => Ok((None, None)),
        })
        .inspect(|revoked| {
            if revoked.is_some() {
                self.buckets.remove(key_id);
            }
        })
        // One node: the caller's own cache is all there is to tell.
        .map(|revoked: Option<KeyRecord>| {
            revoked.map(|record| Revoked {
                record,
                announced: true,
                replicated: true,
            })
        })
    }

    async fn admit(&self, req: &AdmitRequest<'_>) -> Result<Admission, StoreError> {
        // Lock order: bucket shard, then quota shard (nothing takes them the other way round).
        let mut bucket = match self.buckets.get_mut(req.key_id) {
            Some(b) => b,
            None => self.buckets.entry(req.key_id.to_owned()).or_default(),
        };
        let prior = Some(bucket.tat_ns).filter(|t| *t > 0);
        let (new_tat_ns, remaining, reset_after_ns) =
            match gcra::decide(prior, req.now_ns, req.bucket) {
                BucketDecision::Deny {
                    retry_after_ns,
                    reset_after_ns,
                } => {
                    return Ok(Admission::RateLimited {
                        retry_after_ns,
                        reset_after_ns,
                    })
                }
                BucketDecision::Allow {
                    new_tat_ns,
                    remaining,
                    reset_after_ns,
                } => (new_tat_ns, remaining, reset_after_ns),
            };
        let mut counts = match self.quotas.get_mut(req.account_id) {
            Some(q) => q,
            None => self.quotas.entry(req.account_id.to_owned()).or_default(),
        };
        let used = counts.of_mut(req.period_id);
        if *used >= req.monthly_quota {
            let (remaining, reset_after_ns) = gcra::peek(prior, req.now_ns, req.bucket);
            return Ok(Admission::QuotaExceeded {
                remaining,
                reset_after_ns,
            });
        }
        *used += 1;
        bucket.tat_ns = new_tat_ns;
        bucket.last_used_ms = req.now_ns / 1_000_000;
        Ok(Admission::Allowed {
            remaining,
            reset_after_ns,
        })
    }

    async fn usage(&self, account_id: &str, period_id: &str) -> Result<u64, StoreError> {
        Ok(self.quotas.get(account_id).map_or(0, |q| q.of(period_id)))
    }

    async fn carry_usage(
        &self,
        account_id: &str,
        from: &str,
        to: &str,
        _to_end_unix: i64,
    ) -> Result<(), StoreError> {
        if let Some(mut counts) = self.quotas.get_mut(account_id) {
            let moved = std::mem::take(counts.of_mut(from));
            *counts.of_mut(to) += moved;
        }
        Ok(())
    }

    async fn ready(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Subscription;

    fn account(plan: &str) -> Account {
        Account {
            id: "acme".into(),
            plan: plan.into(),
            subscription: Subscription::Active,
            quota_anchor_day: 1,
            created_at_ms: 1,
            updated_at_ms: 2,
        }
    }

    #[test]
    fn the_data_file_stays_near_the_live_state_and_survives_a_reopen() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.jsonl");
        let store = EmbeddedStore::open(&path).unwrap();
        for i in 0..2500 {
            let plan = if i % 2 == 0 { "free" } else { "pro" };
            rt.block_on(store.put_account(account(plan))).unwrap();
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines <= 1002, "{lines} lines for one account");
        drop(store);
        let store = EmbeddedStore::open(&path).unwrap();
        let acme = rt.block_on(store.account("acme")).unwrap().unwrap();
        assert_eq!(acme.plan, "pro");
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
    }
}
