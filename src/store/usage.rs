//! The embedded store's quota counters: in memory (per account, the latest two quota periods)
//! and on disk, so that a restart or a hand-over does not reset every account's month. The
//! disk holds a snapshot of all counts (`<data file>.usage`), rewritten (write, fsync, rename)
//! by a background thread at most once a second while counts change, and once more when the
//! process lets the data file go. A crash loses at most the last second of counts.

use super::StoreError;
use crate::cache::{keyed_dash_map, KeyedDashMap};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often changed counts are written.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// An account's requests counted per quota period: the latest two periods (the current one
/// and the one a change of anchor day moves its count from), older ones forgotten.
#[derive(Debug, Default)]
pub(super) struct PeriodCounts(Vec<(String, u64)>);

impl PeriodCounts {
    pub(super) fn of(&self, period: &str) -> u64 {
        self.0
            .iter()
            .find(|(p, _)| p == period)
            .map_or(0, |(_, n)| *n)
    }

    pub(super) fn of_mut(&mut self, period: &str) -> &mut u64 {
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

    /// From a snapshot: the latest two periods (period ids sort by date).
    fn from_periods(mut periods: Vec<(String, u64)>) -> Self {
        periods.sort();
        let skip = periods.len().saturating_sub(2);
        Self(periods.into_iter().skip(skip).collect())
    }
}

/// Every account's counts, and whether the usage file is behind them.
#[derive(Debug)]
pub(super) struct Counters {
    pub(super) quotas: KeyedDashMap<String, PeriodCounts>,
    /// Counts changed since the last write.
    pub(super) dirty: AtomicBool,
    /// True while this process owns the data file: only the owner writes the usage file.
    owner: AtomicBool,
    file: PathBuf,
    /// One writer of the usage file at a time (the flusher, a hand-over).
    writing: Mutex<()>,
}

impl Counters {
    /// The counts `file` holds; written back only once [`Counters::own`] is called.
    pub(super) fn load(file: PathBuf) -> Result<Arc<Self>, StoreError> {
        let usage = read(&file)?;
        let counters = Arc::new(Self {
            quotas: keyed_dash_map(),
            dirty: AtomicBool::new(false),
            owner: AtomicBool::new(false),
            file,
            writing: Mutex::new(()),
        });
        counters.replace(usage);
        Ok(counters)
    }

    fn replace(&self, usage: Usage) {
        self.quotas.clear();
        for (account, periods) in usage {
            self.quotas
                .insert(account, PeriodCounts::from_periods(periods));
        }
    }

    /// What is counted now.
    pub(super) fn snapshot(&self) -> Usage {
        self.quotas
            .iter()
            .map(|e| (e.key().clone(), e.value().0.clone()))
            .collect()
    }

    /// Takes over from a previous owner: adds, in place (admissions go on meanwhile), what it
    /// counted since this process read `baseline` to what this process counts now.
    pub(super) fn merge(&self, theirs: &Usage, baseline: &Usage) {
        let count = |u: &Usage, account: &str, period: &str| {
            u.get(account)
                .and_then(|v| v.iter().find(|(p, _)| p == period))
                .map_or(0, |(_, n)| i128::from(*n))
        };
        let pairs: std::collections::BTreeSet<(&String, &String)> = theirs
            .iter()
            .chain(baseline)
            .flat_map(|(a, v)| v.iter().map(move |(p, _)| (a, p)))
            .collect();
        for (account, period) in pairs {
            let delta = count(theirs, account, period) - count(baseline, account, period);
            if delta == 0 {
                continue;
            }
            let mut counts = self.quotas.entry(account.clone()).or_default();
            let n = counts.of_mut(period);
            *n = u64::try_from((i128::from(*n) + delta).max(0)).unwrap_or(u64::MAX);
        }
    }

    /// From now on this process writes the usage file (and writes it now).
    pub(super) fn own(&self) -> Result<(), StoreError> {
        self.owner.store(true, Ordering::Release);
        self.dirty.store(true, Ordering::Release);
        self.flush()
    }

    /// Writes the counts if this process owns the file; the last write before letting the
    /// file go passes `release`, after which nothing is written.
    pub(super) fn flush_and(&self, release: bool) -> Result<(), StoreError> {
        let _one = self.writing.lock();
        if !self.owner.load(Ordering::Acquire) {
            return Ok(());
        }
        if release {
            self.owner.store(false, Ordering::Release);
        }
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        write(&self.file, self.snapshot()).inspect_err(|_| {
            self.dirty.store(true, Ordering::Release);
        })
    }

    pub(super) fn flush(&self) -> Result<(), StoreError> {
        self.flush_and(false)
    }
}

/// Writes changed counts every [`FLUSH_EVERY`] until the counters are dropped, on a fixed
/// tick (a write's own time does not push the next one later: a crash loses at most one
/// interval's counts, not an interval plus a write).
pub(super) fn spawn_flusher(counters: Weak<Counters>) -> Result<(), StoreError> {
    let mut next = std::time::Instant::now() + FLUSH_EVERY;
    std::thread::Builder::new()
        .name("msgflash-usage".into())
        .spawn(move || loop {
            std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
            // Behind by more than a tick (a stalled disk): start again from now.
            next = (next + FLUSH_EVERY).max(std::time::Instant::now());
            let Some(counters) = counters.upgrade() else {
                return;
            };
            if let Err(e) = counters.flush() {
                static LOG: crate::log_limit::LogLimit = crate::log_limit::LogLimit::per_second();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
                if let Some(suppressed) = LOG.admit(now) {
                    tracing::error!(error = %e, suppressed, "cannot write the quota counters; retrying each second");
                }
            }
        })
        .map(|_| ())
        .map_err(|e| StoreError::Persist(format!("cannot start the usage writer: {e}")))
}

const FORMAT_VERSION: u32 = 1;

/// account id -> [(quota period id, requests counted)]
pub(super) type Usage = BTreeMap<String, Vec<(String, u64)>>;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageFile {
    version: u32,
    usage: Usage,
}

/// The usage file of the data file at `data_file`.
pub(super) fn usage_path(data_file: &Path) -> PathBuf {
    let mut name = data_file.as_os_str().to_owned();
    name.push(".usage");
    PathBuf::from(name)
}

fn err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Persist(format!("{}: {e}", path.display()))
}

/// The counts in `path` (none when it does not exist yet).
pub(super) fn read(path: &Path) -> Result<Usage, StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Usage::new()),
        Err(e) => return Err(err(path, e)),
    };
    let file: UsageFile = serde_json::from_slice(&bytes).map_err(|e| err(path, e))?;
    if file.version != FORMAT_VERSION {
        return Err(err(
            path,
            format!("unsupported usage file version {}", file.version),
        ));
    }
    Ok(file.usage)
}

/// Replaces `path` with `usage`, atomically and durably.
pub(super) fn write(path: &Path, usage: Usage) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(&UsageFile {
        version: FORMAT_VERSION,
        usage,
    })
    .map_err(|e| err(path, e))?;
    let tmp = super::temp_path(path);
    (|| {
        // A fresh file, never one found there (a link to elsewhere), readable by the owner only.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(super::PRIVATE_FILE)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok::<_, std::io::Error>(())
    })()
    .map_err(|e| err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(entries: &[(&str, &str, u64)]) -> Usage {
        let mut u = Usage::new();
        for (a, p, n) in entries {
            u.entry((*a).into()).or_default().push(((*p).into(), *n));
        }
        u
    }

    #[test]
    fn a_take_over_adds_what_this_process_counted_to_the_previous_owners_final_counts() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("store.jsonl.usage");
        let baseline = usage(&[("a", "2026-11-01", 10), ("b", "2026-11-01", 5)]);
        write(&file, baseline.clone()).unwrap();
        let c = Counters::load(file.clone()).unwrap();
        // This process counts 3 for a and 1 for c while it waits; the old one reached 12 and 7.
        *c.quotas.get_mut("a").unwrap().of_mut("2026-11-01") += 3;
        *c.quotas.entry("c".into()).or_default().of_mut("2026-11-01") += 1;
        c.merge(
            &usage(&[("a", "2026-11-01", 12), ("b", "2026-11-01", 7)]),
            &baseline,
        );
        assert_eq!(
            c.snapshot(),
            usage(&[
                ("a", "2026-11-01", 15),
                ("b", "2026-11-01", 7),
                ("c", "2026-11-01", 1)
            ])
        );
        // Not the owner yet: nothing written; then it is.
        c.dirty.store(true, Ordering::Release);
        c.flush().unwrap();
        assert_eq!(read(&file).unwrap(), baseline);
        c.own().unwrap();
        assert_eq!(read(&file).unwrap(), c.snapshot());
        // After the last write on release, nothing more.
        *c.quotas.get_mut("a").unwrap().of_mut("2026-11-01") += 1;
        c.dirty.store(true, Ordering::Release);
        c.flush_and(true).unwrap();
        *c.quotas.get_mut("a").unwrap().of_mut("2026-11-01") += 1;
        c.dirty.store(true, Ordering::Release);
        c.flush().unwrap();
        assert_eq!(read(&file).unwrap()["a"], [("2026-11-01".to_owned(), 16)]);
    }

    #[test]
    fn counts_round_trip_and_other_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = usage_path(&dir.path().join("store.jsonl"));
        assert!(read(&path).unwrap().is_empty());
        let usage = Usage::from([("acme".into(), vec![("2026-11-01".into(), 42)])]);
        write(&path, usage.clone()).unwrap();
        assert_eq!(read(&path).unwrap(), usage);
        std::fs::write(&path, r#"{"version":9,"usage":{}}"#).unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.ends_with("unsupported usage file version 9"), "{e}");
    }
}
