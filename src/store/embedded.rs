//! The embedded store: one node; accounts and key hashes in a data file, quota counters in a
//! usage file beside it; one process owns both at a time.

use super::file_lock::{self, FileLock};
use super::journal::{Entry, Journal};
use super::usage::{self, Counters, Usage};
use super::{
    Account, Admission, AdmitRequest, CreateKeyError, Invalidation, InvalidationSink, KeyRecord,
    Revoked, Store, StoreError,
};
use crate::cache::{keyed_dash_map, KeyedDashMap};
use crate::limits::gcra::{self, BucketDecision, BucketParams};
use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

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
            Entry::Forget(id) => {
                if let Some(k) = self.keys.remove(&id) {
                    if self.by_hash.get(&k.hash) == Some(&id) {
                        self.by_hash.remove(&k.hash);
                    }
                    if let Some(ids) = self.by_account.get_mut(&k.account_id) {
                        ids.retain(|i| *i != id);
                    }
                }
            }
        }
    }

    fn entries(&self) -> Vec<Entry> {
        let accounts = self.accounts.values().cloned().map(Entry::Account);
        accounts
            .chain(self.keys.values().cloned().map(Entry::Key))
            .collect()
    }

    /// The account's key records, revoked ones included.
    fn keys_of<'a>(&'a self, account_id: &str) -> impl Iterator<Item = &'a KeyRecord> {
        self.by_account
            .get(account_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.keys.get(id))
    }

    fn active_keys(&self, account_id: &str) -> usize {
        self.keys_of(account_id).filter(|k| k.is_active()).count()
    }
}

/// Per-key limiter state.
#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    tat_ns: u64,
    last_used_ms: u64,
}

/// How often a process waiting for the data file (an upgrade) re-reads what the previous
/// owner appends, and tries the lock.
const HANDOVER_POLL: Duration = Duration::from_millis(20);

/// Single-node store. One process owns the data file at a time (an OS lock); every change is
/// in the data file (appended and fsynced on a blocking thread, not the caller's) before it
/// returns; quota counters reach the usage file within a second.
///
/// A process started with `run --upgrade` while the previous one still owns the file serves
/// what the file holds (re-read as the previous process appends to it) and refuses writes
/// (503) until the previous process lets the file go when it exits; it then takes the file
/// over: records as they are then, counters as the previous process left them plus what it
/// counted meanwhile.
pub struct EmbeddedStore {
    path: PathBuf,
    data: RwLock<Data>,
    /// The data file while this process owns it; `None` before (an upgrade waiting for the
    /// previous process) and after (stopped): writes are refused then.
    journal: Arc<Mutex<Option<Journal>>>,
    /// One writer at a time, from its decision to its application (held across the append).
    writer: tokio::sync::Mutex<()>,
    lock: Mutex<Option<FileLock>>,
    buckets: KeyedDashMap<String, Bucket>,
    counters: Arc<Counters>,
    /// Where a take-over announces that cached records may be stale.
    sink: Mutex<Option<InvalidationSink>>,
    /// Let go for good (the server stopped): a pending take-over gives up.
    released: std::sync::atomic::AtomicBool,
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

fn read_data(path: &Path) -> Result<Data, StoreError> {
    let mut data = Data::default();
    for entry in Journal::read(path)? {
        data.apply(entry);
    }
    Ok(data)
}

/// The data file's identity and size: it changes when the owner appends or compacts.
fn file_state(path: &Path) -> Option<(u64, u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

fn handing_over() -> StoreError {
    StoreError::Unavailable("the data file is being handed over between gateway processes".into())
}

impl EmbeddedStore {
    /// When the key last authenticated a request (admitted or refused by a limit), if it did
    /// since this process started.
    fn last_used_ms(&self, key_id: &str) -> Option<u64> {
        self.buckets
            .get(key_id)
            .map(|b| b.last_used_ms)
            .filter(|ms| *ms > 0)
    }

    /// Opens (or starts) the data file at `path`, owned by this process from now on, and
    /// compacts it; refused while another process owns it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let lock = file_lock::try_acquire(path)?.ok_or_else(|| {
            StoreError::Misconfigured(format!(
                "{} is in use by another gateway process (pid {}); stop it first, or start \
                 this one with `run --upgrade` to take over from it",
                path.display(),
                file_lock::holder(path)
            ))
        })?;
        let store = Self::unowned(path)?;
        store.own(lock, &store.counters.snapshot())?;
        Ok(store)
    }

    /// For `run --upgrade`: as [`EmbeddedStore::open`] when the data file is free; else
    /// serves it read-only and takes it over when the process that owns it lets it go.
    pub fn open_for_upgrade(path: &Path) -> Result<Arc<Self>, StoreError> {
        if let Some(lock) = file_lock::try_acquire(path)? {
            let store = Self::unowned(path)?;
            store.own(lock, &store.counters.snapshot())?;
            return Ok(Arc::new(store));
        }
        // Measured before the read: a change made in between is read again.
        let seen = file_state(path);
        let store = Arc::new(Self::unowned(path)?);
        let baseline = store.counters.snapshot();
        let weak = Arc::downgrade(&store);
        let path = path.to_path_buf();
        tracing::info!(file = %path.display(), owner = %file_lock::holder(&path), "waiting for the previous process to let the data file go; writes are refused until then");
        std::thread::Builder::new()
            .name("msgflash-takeover".into())
            .spawn(move || wait_and_take_over(&weak, &path, seen, &baseline))
            .map_err(|e| StoreError::Persist(format!("cannot start the take-over: {e}")))?;
        Ok(store)
    }

    /// The data and counters as the files hold them, not owned (no writes) yet.
    fn unowned(path: &Path) -> Result<Self, StoreError> {
        let counters = Counters::load(usage::usage_path(path))?;
        usage::spawn_flusher(Arc::downgrade(&counters))?;
        Ok(Self {
            path: path.to_path_buf(),
            data: RwLock::new(read_data(path)?),
            journal: Arc::new(Mutex::new(None)),
            writer: tokio::sync::Mutex::new(()),
            lock: Mutex::new(None),
            buckets: keyed_dash_map(),
            counters,
            sink: Mutex::new(None),
            released: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Becomes the data file's owner: the records as the file holds them now, compacted, and
    /// the counters as the previous owner left them plus what this process counted since it
    /// read `baseline`.
    fn own(&self, lock: FileLock, baseline: &Usage) -> Result<(), StoreError> {
        // Held from here whatever follows: a failed take-over is tried again, not let go.
        *self.lock.lock() = Some(lock);
        self.own_held(baseline)
    }

    /// As [`EmbeddedStore::own`], the lock held already. Everything that can fail comes
    /// before anything changes; writes are served from the last step.
    fn own_held(&self, baseline: &Usage) -> Result<(), StoreError> {
        let data = read_data(&self.path)?;
        let theirs = usage::read(&usage::usage_path(&self.path))?;
        let journal = Journal::create(&self.path, &data.entries())?;
        *self.data.write() = data;
        self.counters.merge(&theirs, baseline);
        *self.journal.lock() = Some(journal);
        if let Err(e) = self.counters.own() {
            tracing::warn!(error = %e, "cannot write the quota counters yet; retried each second");
        }
        Ok(())
    }

    /// While another process owns the file: re-reads it when it changed (a revoke there is
    /// refused here too, within [`HANDOVER_POLL`]); true when something changed.
    fn follow_owner(&self, seen: &mut Option<(u64, u64, std::time::SystemTime)>) -> bool {
        let now = file_state(&self.path);
        if now == *seen {
            return false;
        }
        match read_data(&self.path) {
            Ok(data) => {
                *self.data.write() = data;
                *seen = now;
                true
            }
            // A compaction's rename in flight: read again next time.
            Err(_) => false,
        }
    }

    fn announce_all(&self) {
        if let Some(sink) = self.sink.lock().as_ref() {
            sink(Invalidation::All);
        }
    }

    /// Forgets the account's revoked records beyond [`super::REVOKED_KEYS_KEPT`], one journal
    /// line each. The revoke is done whatever happens here: a failure is logged and retried
    /// at the next revoke.
    async fn forget_old_revoked(&self, account_id: &str) {
        let doomed: Vec<String> = {
            let data = self.data.read();
            super::revoked_beyond_kept(data.keys_of(account_id))
                .into_iter()
                .map(|k| k.id.clone())
                .collect()
        };
        for id in doomed {
            let forgotten = self
                .write(|_| Ok::<_, StoreError>(((), Some(Entry::Forget(id)))))
                .await;
            if let Err(e) = forgotten {
                tracing::warn!(error = %e, "could not forget an old revoked key");
                return;
            }
        }
    }

    /// Decides a change under the writer lock, persists it (on a blocking thread), then
    /// applies it in memory: memory never holds what the disk does not. `decide` may refuse
    /// with its call's own error.
    async fn write<T, E: From<StoreError>>(
        &self,
        decide: impl FnOnce(&Data) -> Result<(T, Option<Entry>), E>,
    ) -> Result<T, E> {
        let _one_writer = self.writer.lock().await;
        if self.journal.lock().is_none() {
            return Err(handing_over().into());
        }
        let (out, entry) = decide(&self.data.read())?;
        let Some(entry) = entry else { return Ok(out) };
        let journal = self.journal.clone();
        let appended = entry.clone();
        tokio::task::spawn_blocking(move || match journal.lock().as_mut() {
            Some(j) => j.append(std::slice::from_ref(&appended)),
            None => Err(handing_over()),
        })
        .await
        .map_err(|e| StoreError::Persist(format!("the data file writer failed: {e}")))??;
        let compaction = {
            let mut data = self.data.write();
            data.apply(entry);
            let appended = self.journal.lock().as_ref().map_or(0, |j| j.appended);
            // Keep the file near the size of the live state.
            (appended > 1000 && appended > data.keys.len() + data.accounts.len())
                .then(|| data.entries())
        };
        if let Some(entries) = compaction {
            let journal = self.journal.clone();
            let compacted = tokio::task::spawn_blocking(move || match journal.lock().as_mut() {
                Some(j) => j.compact(&entries),
                None => Ok(()),
            })
            .await;
            if let Ok(Err(e)) = compacted {
                tracing::warn!(error = %e, "could not compact the data file; it keeps growing");
            }
        }
        Ok(out)
    }
}

/// Follows the owner's appends and waits for its lock; then takes the file over (tried again
/// each second if that fails). Ends early when the store is dropped or released.
fn wait_and_take_over(
    store: &Weak<EmbeddedStore>,
    path: &Path,
    mut seen: Option<(u64, u64, std::time::SystemTime)>,
    baseline: &Usage,
) {
    let mut held = false;
    loop {
        let Some(s) = store.upgrade() else { return };
        if s.released.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if !held {
            match file_lock::try_acquire(path) {
                Ok(Some(lock)) => {
                    *s.lock.lock() = Some(lock);
                    held = true;
                }
                Ok(None) => {
                    if s.follow_owner(&mut seen) {
                        s.announce_all();
                    }
                    drop(s);
                    std::thread::sleep(HANDOVER_POLL);
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot try the data file's lock; trying again in a second");
                    drop(s);
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            }
        }
        match s.own_held(baseline) {
            Ok(()) => {
                tracing::info!(file = %path.display(), "took the data file over; writes are served");
                s.announce_all();
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "could not take the data file over; writes stay refused; trying again in a second");
                drop(s);
                std::thread::sleep(Duration::from_secs(1));
            }
        }
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
            .await
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
        .await
    }

    async fn list_keys(&self, account_id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        let data = self.data.read();
        let mut keys: Vec<KeyRecord> = data.keys_of(account_id).cloned().collect();
        drop(data);
        for key in &mut keys {
            if let Some(used) = self.last_used_ms(&key.id) {
                key.last_used_at_ms = Some(used);
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
        let revoked: Option<KeyRecord> = self
            .write(|data| match data.keys.get(key_id) {
                Some(key) if key.account_id == account_id && !key.is_active() => {
                    Ok((Some(key.clone()), None))
                }
                Some(key) if key.account_id == account_id => {
                    let mut key = key.clone();
                    key.revoked_at_ms = Some(now_ms);
                    if let Some(used) = self.last_used_ms(key_id) {
                        key.last_used_at_ms = Some(used);
                    }
                    Ok((Some(key.clone()), Some(Entry::Key(key))))
                }
                _ => Ok((None, None)),
            })
            .await?;
        if revoked.is_some() {
            self.buckets.remove(key_id);
            self.forget_old_revoked(account_id).await;
        }
        // One node: the caller's own cache is all there is to tell.
        Ok(revoked.map(|record| Revoked {
            record,
            announced: true,
            replicated: true,
        }))
    }

    async fn admit(&self, req: &AdmitRequest<'_>) -> Result<Admission, StoreError> {
        // Lock order: bucket shard, then quota shard (nothing takes them the other way round).
        let mut bucket = match self.buckets.get_mut(req.key_id) {
            Some(b) => b,
            None => self.buckets.entry(req.key_id.to_owned()).or_default(),
        };
        // Used: it authenticated a request, admitted or refused by a limit (as the Redis
        // store records it).
        bucket.last_used_ms = req.now_ns / 1_000_000;
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
        let quotas = &self.counters.quotas;
        let mut counts = match quotas.get_mut(req.account_id) {
            Some(q) => q,
            None => quotas.entry(req.account_id.to_owned()).or_default(),
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
        self.counters
            .dirty
            .store(true, std::sync::atomic::Ordering::Relaxed);
        bucket.tat_ns = new_tat_ns;
        Ok(Admission::Allowed {
            remaining,
            reset_after_ns,
        })
    }

    async fn bucket_state(
        &self,
        _account_id: &str,
        key_id: &str,
        now_ns: u64,
        bucket: BucketParams,
    ) -> Result<(u32, u64), StoreError> {
        let tat = self
            .buckets
            .get(key_id)
            .map(|b| b.tat_ns)
            .filter(|t| *t > 0);
        Ok(gcra::peek(tat, now_ns, bucket))
    }

    async fn usage(&self, account_id: &str, period_id: &str) -> Result<u64, StoreError> {
        Ok(self
            .counters
            .quotas
            .get(account_id)
            .map_or(0, |q| q.of(period_id)))
    }

    async fn carry_usage(
        &self,
        account_id: &str,
        from: &str,
        to: &str,
        _to_end_unix: i64,
        _now_unix: i64,
    ) -> Result<(), StoreError> {
        if let Some(mut counts) = self.counters.quotas.get_mut(account_id) {
            let moved = std::mem::take(counts.of_mut(from));
            *counts.of_mut(to) += moved;
            self.counters
                .dirty
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    async fn ready(&self) -> bool {
        true
    }

    fn on_invalidation(&self, sink: InvalidationSink) {
        *self.sink.lock() = Some(sink);
    }

    fn release(&self) {
        // Writes refused from here; the counters' last write; then the lock goes.
        self.released
            .store(true, std::sync::atomic::Ordering::Release);
        let journal = self.journal.lock().take();
        if let Err(e) = self.counters.flush_and(true) {
            tracing::error!(error = %e, "could not write the quota counters before letting the data file go");
        }
        drop(journal);
        self.lock.lock().take();
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.release();
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

    /// The files the store creates hold key hashes and account ids: the owner's alone, and a
    /// link left where the usage file's temporary goes is replaced, not written through.
    #[test]
    fn the_store_files_are_private_and_links_are_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.jsonl");
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, "untouched").unwrap();
        let usage = usage::usage_path(&path);
        std::os::unix::fs::symlink(&elsewhere, crate::store::temp_path(&usage)).unwrap();
        let store = EmbeddedStore::open(&path).unwrap();
        rt.block_on(store.put_account(account("pro"))).unwrap();
        usage::write(&usage, usage::Usage::new()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&usage), 0o600);
        assert_eq!(mode(&file_lock::lock_path(&path)), 0o600);
        assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "untouched");
    }

    fn key(id: &str) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            account_id: "acme".into(),
            name: "k".into(),
            hash: format!("hash-{id}"),
            prefix: "msgf_live_".into(),
            last4: "abcd".into(),
            scopes: vec![],
            instance_ids: vec![],
            created_at_ms: 1,
            last_used_at_ms: None,
            revoked_at_ms: None,
        }
    }

    fn admit(store: &EmbeddedStore, rt: &tokio::runtime::Runtime, now_ns: u64) -> Admission {
        rt.block_on(store.admit(&AdmitRequest {
            key_id: "k1",
            account_id: "acme",
            now_ns,
            bucket: crate::limits::gcra::BucketParams {
                rate_per_second: 1000,
                burst: 1000,
            },
            period_id: "2026-11-01",
            period_end_unix: 0,
            monthly_quota: 1_000_000,
            in_flight: &crate::store::InFlight::default(),
        }))
        .unwrap()
    }

    /// Polls `f` (bounded) until it holds.
    fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        let start = std::time::Instant::now();
        while !f() {
            assert!(start.elapsed() < Duration::from_secs(10), "never: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The hand-over, in one process: the waiting store follows the owner's writes, refuses its
    /// own, and takes over (records and counters) once the owner lets go.
    #[test]
    fn a_waiting_store_follows_the_owner_and_takes_over_when_it_lets_go() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.jsonl");
        let old = EmbeddedStore::open(&path).unwrap();
        rt.block_on(old.put_account(account("pro"))).unwrap();
        rt.block_on(old.create_key(key("k1"), 10)).unwrap();
        rt.block_on(old.create_key(key("k2"), 10)).unwrap();
        for i in 0..3 {
            assert!(matches!(admit(&old, &rt, i), Admission::Allowed { .. }));
        }
        old.counters.flush().unwrap();

        let new = EmbeddedStore::open_for_upgrade(&path).unwrap();
        let flushed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = flushed.clone();
        new.on_invalidation(Arc::new(move |_| {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        assert!(matches!(
            rt.block_on(new.put_account(account("plus"))),
            Err(StoreError::Unavailable(_))
        ));
        // A revoke on the owner reaches the waiting store (and flushes its node's caches).
        rt.block_on(old.revoke_key("acme", "k2", 5)).unwrap();
        eventually("the waiting store sees the revoke", || {
            rt.block_on(new.key_by_hash("hash-k2"))
                .unwrap()
                .is_some_and(|k| !k.is_active())
        });
        assert!(flushed.load(std::sync::atomic::Ordering::SeqCst) >= 1);
        // Both count meanwhile: 2 more on the old one, 4 on the new one.
        for i in 10..12 {
            admit(&old, &rt, i);
        }
        for i in 20..24 {
            admit(&new, &rt, i);
        }
        drop(old);
        eventually("the new store takes over", || {
            rt.block_on(new.put_account(account("plus"))).is_ok()
        });
        assert_eq!(
            rt.block_on(new.usage("acme", "2026-11-01")).unwrap(),
            3 + 2 + 4
        );
        assert_eq!(
            rt.block_on(new.account("acme")).unwrap().unwrap().plan,
            "plus"
        );
        new.release();
        let reopened = EmbeddedStore::open(&path).unwrap();
        assert_eq!(
            rt.block_on(reopened.usage("acme", "2026-11-01")).unwrap(),
            9
        );
    }
}
