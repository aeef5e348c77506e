//! The embedded store: one node; accounts and key hashes in a data file, counters in memory.

use super::{Account, Admission, AdmitRequest, CreateKeyError, KeyRecord, Store, StoreError};
use crate::limits::gcra::{self, BucketDecision};
use async_trait::async_trait;
use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Version of the data file's format.
const FORMAT_VERSION: u32 = 1;

/// What the data file holds.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataFile {
    version: u32,
    accounts: Vec<Account>,
    keys: Vec<KeyRecord>,
}

/// The persistent part, indexed.
#[derive(Debug, Default)]
struct Data {
    accounts: BTreeMap<String, Account>,
    /// key id -> record
    keys: BTreeMap<String, KeyRecord>,
    /// key hash -> key id
    by_hash: HashMap<String, String>,
}

/// Per-key limiter state.
#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    tat_ns: u64,
    last_used_ms: u64,
}

/// Single-node store. Writes go to the data file (write, fsync, rename) before they return.
pub struct EmbeddedStore {
    data: RwLock<Data>,
    /// Serialises writers so that the file always holds the latest state; `None`: memory only.
    file: Mutex<Option<PathBuf>>,
    buckets: DashMap<String, Bucket>,
    /// account id -> (period id, requests counted)
    quotas: DashMap<String, (String, u64)>,
}

impl EmbeddedStore {
    /// A store that keeps nothing on disk.
    pub fn in_memory() -> Self {
        Self::from_data(Data::default(), None)
    }

    /// Opens (or starts) the data file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let data = match std::fs::read(path) {
            Ok(bytes) => {
                let file: DataFile = serde_json::from_slice(&bytes).map_err(|e| {
                    StoreError::Persist(format!("{}: not a valid data file: {e}", path.display()))
                })?;
                if file.version != FORMAT_VERSION {
                    return Err(StoreError::Persist(format!(
                        "{}: unsupported data file version {}",
                        path.display(),
                        file.version
                    )));
                }
                let mut data = Data::default();
                for account in file.accounts {
                    data.accounts.insert(account.id.clone(), account);
                }
                for key in file.keys {
                    data.by_hash.insert(key.hash.clone(), key.id.clone());
                    data.keys.insert(key.id.clone(), key);
                }
                data
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| StoreError::Persist(format!("{}: {e}", dir.display())))?;
                }
                Data::default()
            }
            Err(e) => return Err(StoreError::Persist(format!("{}: {e}", path.display()))),
        };
        Ok(Self::from_data(data, Some(path.to_path_buf())))
    }

    fn from_data(data: Data, file: Option<PathBuf>) -> Self {
        Self {
            data: RwLock::new(data),
            file: Mutex::new(file),
            buckets: DashMap::new(),
            quotas: DashMap::new(),
        }
    }

    /// Applies `change` and persists the result before returning; on a failed write the
    /// change is rolled back, so memory never holds what the disk does not.
    fn write<T>(
        &self,
        change: impl FnOnce(&mut Data) -> Result<(T, Undo), CreateKeyError>,
    ) -> Result<T, CreateKeyError> {
        let file = self.file.lock();
        let (out, undo) = change(&mut self.data.write())?;
        if let Some(path) = file.as_ref() {
            let snapshot = {
                let data = self.data.read();
                let doc = DataFile {
                    version: FORMAT_VERSION,
                    accounts: data.accounts.values().cloned().collect(),
                    keys: data.keys.values().cloned().collect(),
                };
                serde_json::to_vec_pretty(&doc)
            };
            let result = snapshot
                .map_err(|e| e.to_string())
                .and_then(|bytes| write_atomically(path, &bytes).map_err(|e| e.to_string()));
            if let Err(why) = result {
                undo.apply(&mut self.data.write());
                return Err(CreateKeyError::Store(StoreError::Persist(format!(
                    "{}: {why}",
                    path.display()
                ))));
            }
        }
        Ok(out)
    }
}

/// How to take back one change when it could not be persisted.
enum Undo {
    Account(String, Option<Account>),
    Key(String, Option<KeyRecord>),
}

impl Undo {
    fn apply(self, data: &mut Data) {
        match self {
            Undo::Account(id, Some(old)) => {
                data.accounts.insert(id, old);
            }
            Undo::Account(id, None) => {
                data.accounts.remove(&id);
            }
            Undo::Key(id, Some(old)) => {
                data.keys.insert(id, old);
            }
            Undo::Key(id, None) => {
                if let Some(old) = data.keys.remove(&id) {
                    data.by_hash.remove(&old.hash);
                }
            }
        }
    }
}

/// Write to a temporary file, fsync it, rename it over `path`, fsync the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn store_only(e: CreateKeyError) -> StoreError {
    match e {
        CreateKeyError::Store(e) => e,
        other => StoreError::Persist(format!("{other:?}")),
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

    async fn put_account(&self, account: Account) -> Result<Account, StoreError> {
        self.write(|data| {
            let old = data.accounts.insert(account.id.clone(), account.clone());
            Ok((account.clone(), Undo::Account(account.id.clone(), old)))
        })
        .map_err(store_only)
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
            let active = data
                .keys
                .values()
                .filter(|k| k.account_id == record.account_id && k.is_active())
                .count();
            if active >= max_keys as usize {
                return Err(CreateKeyError::LimitReached { max: max_keys });
            }
            data.by_hash.insert(record.hash.clone(), record.id.clone());
            data.keys.insert(record.id.clone(), record.clone());
            Ok((record.clone(), Undo::Key(record.id.clone(), None)))
        })
    }

    async fn list_keys(&self, account_id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        let data = self.data.read();
        let mut keys: Vec<KeyRecord> = data
            .keys
            .values()
            .filter(|k| k.account_id == account_id)
            .cloned()
            .collect();
        drop(data);
        for key in &mut keys {
            if let Some(bucket) = self.buckets.get(&key.id) {
                key.last_used_at_ms = Some(bucket.last_used_ms);
            }
        }
        keys.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(keys)
    }

    async fn revoke_key(
        &self,
        account_id: &str,
        key_id: &str,
        now_ms: u64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let last_used = self.buckets.remove(key_id).map(|(_, b)| b.last_used_ms);
        self.write(|data| match data.keys.get_mut(key_id) {
            Some(key) if key.account_id == account_id => {
                let old = key.clone();
                if key.revoked_at_ms.is_none() {
                    key.revoked_at_ms = Some(now_ms);
                }
                key.last_used_at_ms = last_used.or(key.last_used_at_ms);
                Ok((Some(key.clone()), Undo::Key(key_id.to_owned(), Some(old))))
            }
            _ => Ok((None, Undo::Key(String::new(), None))),
        })
        .map_err(store_only)
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
        let mut quota = match self.quotas.get_mut(req.account_id) {
            Some(q) => q,
            None => self
                .quotas
                .entry(req.account_id.to_owned())
                .or_insert_with(|| (req.period_id.to_owned(), 0)),
        };
        if quota.0 != req.period_id {
            *quota = (req.period_id.to_owned(), 0);
        }
        if quota.1 >= req.monthly_quota {
            let (remaining, reset_after_ns) = gcra::peek(prior, req.now_ns, req.bucket);
            return Ok(Admission::QuotaExceeded {
                remaining,
                reset_after_ns,
                used: quota.1,
            });
        }
        quota.1 += 1;
        bucket.tat_ns = new_tat_ns;
        bucket.last_used_ms = req.now_ns / 1_000_000;
        Ok(Admission::Allowed {
            remaining,
            reset_after_ns,
            used: quota.1,
        })
    }

    async fn usage(&self, account_id: &str, period_id: &str) -> Result<u64, StoreError> {
        Ok(self
            .quotas
            .get(account_id)
            .filter(|q| q.0 == period_id)
            .map_or(0, |q| q.1))
    }

    async fn ready(&self) -> bool {
        true
    }
}
