//! The embedded store's data file: an append-only journal of JSON lines (one upserted record
//! per line, fsynced before the write returns), rewritten compactly with write + fsync + rename
//! when the store opens and whenever it has grown well past the live state.

use super::{Account, KeyRecord, StoreError};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Version of the data file's format (its first line).
const FORMAT_VERSION: u32 = 2;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    version: u32,
}

/// One line of the journal: the latest state of one record, or a revoked key forgotten (by
/// id; see `REVOKED_KEYS_KEPT`). A binary older than `forget` refuses a file with one until
/// a compaction has dropped it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Entry {
    Account(Account),
    Key(KeyRecord),
    Forget(String),
}

pub(super) struct Journal {
    path: PathBuf,
    file: File,
    /// Bytes known to be whole lines: a failed append is cut back to this.
    len: u64,
    /// Lines appended since the last compaction.
    pub appended: usize,
    /// A compaction replaced the file but could not make the replacement durable: `file` may
    /// no longer be what `path` names, so appends are refused (never written where a restart
    /// would not find them).
    broken: bool,
}

fn persist_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Persist(format!("{}: {e}", path.display()))
}

impl Journal {
    /// Reads the records in `path` (none when it does not exist yet), in write order.
    pub(super) fn read(path: &Path) -> Result<Vec<Entry>, StoreError> {
        Ok(Self::read_lines(path)?
            .into_iter()
            .map(|(_, e)| e)
            .collect())
    }

    /// As [`Journal::read`], with the 1-based line of each record.
    pub(super) fn read_lines(path: &Path) -> Result<Vec<(usize, Entry)>, StoreError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(persist_err(path, e)),
        };
        let mut lines = text.split_inclusive('\n').enumerate();
        let header: Header = match lines.next() {
            Some((_, line)) => serde_json::from_str(line.trim_end())
                .map_err(|e| persist_err(path, format!("line 1: not a data file header: {e}")))?,
            None => return Ok(Vec::new()),
        };
        if header.version != FORMAT_VERSION {
            return Err(persist_err(
                path,
                format!("unsupported data file version {}", header.version),
            ));
        }
        let mut entries = Vec::new();
        for (i, line) in lines {
            if !line.ends_with('\n') {
                // The last write was cut short (crash mid-append): it never returned success.
                tracing::warn!(file = %path.display(), line = i + 1, "ignoring a torn last line");
                break;
            }
            let entry = serde_json::from_str(line.trim_end())
                .map_err(|e| persist_err(path, format!("line {}: {e}", i + 1)))?;
            entries.push((i + 1, entry));
        }
        Ok(entries)
    }

    /// Rewrites `path` to hold exactly `entries`, atomically, and opens it for appending.
    pub(super) fn create(path: &Path, entries: &[Entry]) -> Result<Self, StoreError> {
        Self::replace(path, entries).map_err(|(e, _)| e)
    }

    /// As [`Journal::create`]; an error says whether `path` was replaced already (then an
    /// older handle on the file must not be written to any more).
    fn replace(path: &Path, entries: &[Entry]) -> Result<Self, (StoreError, bool)> {
        let before = |e: StoreError| (e, false);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| before(persist_err(dir, e)))?;
        }
        let mut bytes = serde_json::to_vec(&Header {
            version: FORMAT_VERSION,
        })
        .map_err(|e| before(persist_err(path, e)))?;
        bytes.push(b'\n');
        for entry in entries {
            serde_json::to_writer(&mut bytes, entry).map_err(|e| before(persist_err(path, e)))?;
            bytes.push(b'\n');
        }
        let tmp = super::temp_path(path);
        // The handle written here is the one appended to after the rename: nothing to reopen.
        let file = (|| {
            // Append mode (a failed append's cut-back keeps later appends at the end); a
            // leftover temporary file from a crash is removed first.
            match std::fs::remove_file(&tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let mut f = OpenOptions::new()
                .create_new(true)
                .append(true)
                .mode(super::PRIVATE_FILE)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            Ok::<_, std::io::Error>(f)
        })()
        .map_err(|e| before(persist_err(path, e)))?;
        std::fs::rename(&tmp, path).map_err(|e| before(persist_err(path, e)))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| (persist_err(path, e), true))?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            len: bytes.len() as u64,
            appended: 0,
            broken: false,
        })
    }

    /// Appends records and fsyncs; on failure the file is cut back to its last whole line.
    pub(super) fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        if self.broken {
            return Err(persist_err(
                &self.path,
                "a compaction could not be made durable; restart to reopen the data file",
            ));
        }
        let mut bytes = Vec::new();
        for entry in entries {
            serde_json::to_writer(&mut bytes, entry).map_err(|e| persist_err(&self.path, e))?;
            bytes.push(b'\n');
        }
        let result = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = result {
            let _ = self.file.set_len(self.len);
            return Err(persist_err(&self.path, e));
        }
        self.len += bytes.len() as u64;
        self.appended += entries.len();
        Ok(())
    }

    /// Replaces the journal with `entries` (the live state). A failure after the file was
    /// replaced leaves the journal refusing appends.
    pub(super) fn compact(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        match Self::replace(&self.path, entries) {
            Ok(journal) => *self = journal,
            Err((e, replaced)) => {
                self.broken |= replaced;
                return Err(e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Subscription;

    fn account(id: &str, plan: &str) -> Entry {
        Entry::Account(Account {
            id: id.into(),
            plan: plan.into(),
            subscription: Subscription::Active,
            quota_anchor_day: 1,
            created_at_ms: 1,
            updated_at_ms: 2,
        })
    }

    fn plans(entries: &[Entry]) -> Vec<String> {
        entries
            .iter()
            .map(|e| match e {
                Entry::Account(a) => format!("{}={}", a.id, a.plan),
                Entry::Key(k) => k.id.clone(),
                Entry::Forget(id) => format!("-{id}"),
            })
            .collect()
    }

    #[test]
    fn appends_survive_a_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d/store.jsonl");
        let mut j = Journal::create(&path, &[account("a", "free")]).unwrap();
        j.append(&[account("a", "pro"), account("b", "free")])
            .unwrap();
        assert_eq!(
            plans(&Journal::read(&path).unwrap()),
            ["a=free", "a=pro", "b=free"]
        );
        j.compact(&[account("a", "pro"), account("b", "free")])
            .unwrap();
        assert_eq!(plans(&Journal::read(&path).unwrap()), ["a=pro", "b=free"]);
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "a temporary file was left"
        );
    }

    /// A compaction's temporary file is named after the whole data file name: `store.jsonl`'s is
    /// never `store.tmp`, which may be another gateway's data file in the same directory.
    #[test]
    fn a_compaction_touches_no_other_file() {
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("store.tmp");
        Journal::create(&other, &[account("o", "plus")]).unwrap();
        let path = dir.path().join("store.jsonl");
        let mut j = Journal::create(&path, &[account("a", "free")]).unwrap();
        j.compact(&[account("a", "pro")]).unwrap();
        assert_eq!(plans(&Journal::read(&path).unwrap()), ["a=pro"]);
        assert_eq!(plans(&Journal::read(&other).unwrap()), ["o=plus"]);
    }

    #[test]
    fn a_torn_last_line_is_ignored_but_a_corrupt_middle_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.jsonl");
        Journal::create(&path, &[account("a", "free")]).unwrap();
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"account\":{\"id\":\"b\"");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(plans(&Journal::read(&path).unwrap()), ["a=free"]);
        std::fs::write(
            &path,
            text.replace("{\"account\":{\"id\":\"b\"", "garbage\n"),
        )
        .unwrap();
        let err = Journal::read(&path).unwrap_err().to_string();
        assert!(
            err.ends_with("line 3: expected value at line 1 column 1"),
            "{err}"
        );
    }

    #[test]
    fn other_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.jsonl");
        std::fs::write(&path, "{\"version\":1}\n").unwrap();
        let err = Journal::read(&path).unwrap_err().to_string();
        assert!(err.ends_with("unsupported data file version 1"), "{err}");
    }
}
