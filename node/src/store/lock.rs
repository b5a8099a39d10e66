//! One process per store: an exclusive advisory lock on `<store>/lock`, which also names the holder's pid so
//! that a second process is told who holds the store (sled's own lock only says "WouldBlock").

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use super::error::{StoreError, StoreResult};

/// Held for as long as the store is open; the operating system releases it when the process ends, however
/// it ends, so a crashed node never leaves a stale lock behind.
#[derive(Debug)]
pub(crate) struct StoreLock {
    _file: File,
}

impl StoreLock {
    /// Takes the lock of the store in `dir`, or says which process holds it.
    pub fn acquire(dir: &Path) -> StoreResult<StoreLock> {
        let path = dir.join("lock");
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let pid = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(StoreError::InUse {
                    dir: dir.to_path_buf(),
                    pid,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(StoreLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_told_the_first_ones_pid() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = StoreLock::acquire(dir.path()).expect("first lock");
        let err = StoreLock::acquire(dir.path()).expect_err("held");
        assert!(
            matches!(&err, StoreError::InUse { pid: Some(pid), .. } if *pid == std::process::id()),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains(&format!("in use by pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        StoreLock::acquire(dir.path()).expect("free again once the holder is gone");
    }
}
