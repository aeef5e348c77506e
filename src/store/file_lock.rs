//! One process owns the embedded store's data file at a time: an exclusive OS lock (`flock`)
//! on `<data file>.lock`, which also names the owner's pid for the message another process
//! gets. The lock goes with the process (the OS drops it at exit, a crash included).

use super::StoreError;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The held lock; dropping it lets the data file go.
#[derive(Debug)]
pub(super) struct FileLock {
    _file: File,
}

/// The lock file of the data file at `data_file`.
pub(super) fn lock_path(data_file: &Path) -> PathBuf {
    let mut name = data_file.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

fn open(data_file: &Path) -> Result<(File, PathBuf), StoreError> {
    let path = lock_path(data_file);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Persist(format!("{}: {e}", dir.display())))?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(super::PRIVATE_FILE)
        .open(&path)
        .map_err(|e| StoreError::Persist(format!("{}: {e}", path.display())))?;
    Ok((file, path))
}

/// Writes this process's pid into the held lock file.
fn claimed(mut file: File, path: &Path) -> Result<FileLock, StoreError> {
    let written = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()));
    written.map_err(|e| StoreError::Persist(format!("{}: {e}", path.display())))?;
    Ok(FileLock { _file: file })
}

/// The lock when no other process holds it, else `None`.
pub(super) fn try_acquire(data_file: &Path) -> Result<Option<FileLock>, StoreError> {
    let (file, path) = open(data_file)?;
    match file.try_lock() {
        Ok(()) => claimed(file, &path).map(Some),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(StoreError::Persist(format!("{}: {e}", path.display()))),
    }
}

/// The pid the lock file names (the current or last owner), for messages.
pub(super) fn holder(data_file: &Path) -> String {
    let mut text = String::new();
    let _ = File::open(lock_path(data_file)).and_then(|mut f| f.read_to_string(&mut text));
    let pid = text.trim();
    if pid.is_empty() {
        "unknown".to_owned()
    } else {
        pid.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_the_next_one_gets_it_once_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d/store.jsonl");
        let first = try_acquire(&data).unwrap().expect("free");
        assert!(try_acquire(&data).unwrap().is_none(), "held twice");
        assert_eq!(holder(&data), std::process::id().to_string());
        // Another open of the same file (as another process would) is refused too.
        drop(first);
        let second = try_acquire(&data).unwrap().expect("free once let go");
        assert!(try_acquire(&data).unwrap().is_none());
        drop(second);
    }
}
