//! One writer per run directory: an exclusive lock, held for the run's whole life by the process
//! that owns the directory (the single `train` process, or rank 0's process of a multi-process
//! job; the other ranks never touch it), on the file [`LOCK_FILE`] in the directory. The file
//! records its holder (host, pid, start time), so a refused second writer is told who it is.
//!
//! The lock is `flock(2)` (through `File::try_lock`): the kernel releases it when its holder dies,
//! however it dies, so a lock file whose lock can be taken is stale, whatever it says. A holder
//! that ends normally removes the file while still holding it (and a writer that took the lock of
//! a file just removed notices and tries again), so a leftover file always means a holder died.
//!
//! Shared filesystems: on NFS, Linux turns `flock` into a whole-file POSIX lock held on the server
//! (NLM for NFSv3, lock state for NFSv4), so writers on different hosts exclude each other, unless
//! the filesystem is mounted `nolock` or `local_lock=flock`/`all`, where a lock only excludes
//! processes of the same host. Lustre needs the `flock` mount option (with `localflock` a lock is
//! again per host; without either, taking it fails, and the run refuses to start). Because such
//! a lock can look free from another host while its holder lives, a stale lock recorded by
//! another host is not taken over: the refusal names the holder, and removing the file (once that
//! job is known to be gone) is left to the user.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

use super::run_dir::utc_stamp;
use crate::checkpoint::staging::host_name;
use crate::error::UsageError;

/// The lock file inside a run directory (or an outside checkpoint directory).
pub const LOCK_FILE: &str = ".shardtrain.lock";

/// Who holds a lock, as its file records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// When it took the lock, `YYYYmmdd-HHMMSS` UTC.
    pub since: String,
}

impl Holder {
    fn this_process() -> Holder {
        Holder {
            host: host_name(),
            pid: std::process::id(),
            since: utc_stamp(SystemTime::now()),
        }
    }

    fn describe(&self) -> String {
        format!(
            "pid {} on host {} since {} UTC",
            self.pid, self.host, self.since
        )
    }
}

/// The lock of one directory, held until dropped.
#[derive(Debug)]
pub struct RunLock {
    file: File,
    path: PathBuf,
}

/// How often taking the lock starts again because its file was removed under us (each time by a
/// holder that ended): more than a handful means something else keeps removing it.
const ATTEMPTS: usize = 16;

impl RunLock {
    /// Takes the lock of the existing run directory `dir`, or refuses (a `UsageError`, exit 2)
    /// naming the live holder. A stale lock left by a process of this host that died is taken
    /// over, with a warning naming it.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        Self::acquire_named(dir, "run directory")
    }

    /// [`RunLock::acquire`] of a directory that messages call `what` ("checkpoint directory").
    pub fn acquire_named(dir: &Path, what: &str) -> Result<RunLock> {
        let path = dir.join(LOCK_FILE);
        for _ in 0..ATTEMPTS {
            let (file, created) = open_or_create(&path)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Err(in_use(what, dir, &path)),
                Err(TryLockError::Error(e)) => {
                    return Err(anyhow!(e).context(format!(
                        "locking {} (the run directory must be on a filesystem with flock \
                         support, see the README)",
                        path.display()
                    )))
                }
            }
            if !names_this_file(&path, &file)? {
                // Its holder removed it between our open and our lock: start again on the new one.
                continue;
            }
            let mut lock = RunLock { file, path };
            if !created {
                lock.take_over_stale(what, dir)?;
            }
            lock.record(&Holder::this_process())?;
            return Ok(lock);
        }
        Err(anyhow!(
            "could not lock {}: its lock file kept being removed while taking it",
            path.display()
        ))
    }

    /// The lock is ours and its file was there before: a holder that recorded itself there died
    /// without removing it. Taken over (said so) if that holder was of this host; refused if of
    /// another, whose lock this host may not see (see the module notes on shared filesystems).
    /// An empty file is one another writer has just made and not yet locked: not stale.
    fn take_over_stale(&mut self, what: &str, dir: &Path) -> Result<()> {
        match read_record(&mut self.file) {
            Record::Empty => Ok(()),
            Record::Holder(h) if h.host != host_name() => {
                // Left as it is: this file is the only trace of a writer that may still run.
                self.path = PathBuf::new();
                let file = dir.join(LOCK_FILE);
                Err(UsageError(format!(
                    "{what} {} is locked by {} (its lock file {} shows no live holder \
                     from this host, but a lock of another host is not always visible here): if \
                     that job is gone, remove {} and start again",
                    dir.display(),
                    h.describe(),
                    file.display(),
                    file.display()
                ))
                .into())
            }
            Record::Holder(h) => {
                tracing::warn!(
                    "taking over the stale lock of {what} {}: {} is gone",
                    dir.display(),
                    h.describe()
                );
                Ok(())
            }
            Record::Unreadable => {
                tracing::warn!(
                    "taking over the stale lock of {what} {} (its holder's record is unreadable)",
                    dir.display()
                );
                Ok(())
            }
        }
    }

    fn record(&mut self, holder: &Holder) -> Result<()> {
        let text = serde_json::to_string(holder)? + "\n";
        let f = &mut self.file;
        f.set_len(0)
            .and_then(|()| f.seek(SeekFrom::Start(0)).map(drop))
            .and_then(|()| f.write_all(text.as_bytes()))
            .and_then(|()| f.sync_data())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

impl Drop for RunLock {
    /// The file goes while the lock is still held (a writer that opened it meanwhile finds, once
    /// it gets the lock, that the name is gone, and starts again); the lock goes with the file.
    fn drop(&mut self) {
        if self.path.as_os_str().is_empty() {
            return;
        }
        if names_this_file(&self.path, &self.file).unwrap_or(false) {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!("could not remove {}: {e}", self.path.display());
            }
        }
    }
}

/// Opens the lock file, creating it if absent; says whether this call created it.
fn open_or_create(path: &Path) -> Result<(File, bool)> {
    let fresh = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path);
    match fresh {
        Ok(f) => return Ok((f, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
    }
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => Ok((f, false)),
        // Removed by its holder just now: the next attempt creates it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => open_or_create(path),
        Err(e) => Err(e).with_context(|| format!("opening {}", path.display())),
    }
}

/// Whether `path` still names the file `file` is open on.
fn names_this_file(path: &Path, file: &File) -> Result<bool> {
    let open = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(named) => Ok(named.dev() == open.dev() && named.ino() == open.ino()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("checking {}", path.display())),
    }
}

/// What a lock file says about its holder.
enum Record {
    Empty,
    Holder(Holder),
    Unreadable,
}

fn read_record(file: &mut File) -> Record {
    let mut text = String::new();
    if file
        .seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_string(&mut text))
        .is_err()
    {
        return Record::Unreadable;
    }
    if text.trim().is_empty() {
        return Record::Empty;
    }
    serde_json::from_str(text.trim()).map_or(Record::Unreadable, Record::Holder)
}

/// The refusal of a second writer, naming the holder.
fn in_use(what: &str, dir: &Path, path: &Path) -> anyhow::Error {
    let holder = match File::open(path).map(|mut f| read_record(&mut f)) {
        Ok(Record::Holder(h)) => h.describe(),
        _ => "another process (it has not recorded itself yet)".to_string(),
    };
    UsageError(format!(
        "{what} {} is in use by {holder}: one run writes to a directory at a time (wait for it \
         to end, or choose another); nothing was written",
        dir.display()
    ))
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_released_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(tmp.path()).unwrap();
        let err = RunLock::acquire(tmp.path()).unwrap_err();
        assert!(err.downcast_ref::<UsageError>().is_some(), "{err:#}");
        let msg = format!("{err:#}");
        let me = format!("pid {} on host {}", std::process::id(), host_name());
        assert!(msg.contains("is in use by") && msg.contains(&me), "{msg}");
        drop(first);
        assert!(!tmp.path().join(LOCK_FILE).exists(), "removed on release");
        let again = RunLock::acquire(tmp.path()).unwrap();
        drop(again);
    }

    #[test]
    fn a_stale_lock_of_this_host_is_taken_over_and_of_another_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(LOCK_FILE);
        let dead = Holder {
            host: host_name(),
            pid: 4_000_000,
            since: "20260101-000000".into(),
        };
        std::fs::write(&path, serde_json::to_string(&dead).unwrap()).unwrap();
        let lock = RunLock::acquire(tmp.path()).unwrap();
        let now: Holder = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(now.pid, std::process::id());
        drop(lock);

        let elsewhere = Holder {
            host: format!("{}-elsewhere", host_name()),
            ..dead
        };
        let record = serde_json::to_string(&elsewhere).unwrap();
        std::fs::write(&path, &record).unwrap();
        let msg = format!("{:#}", RunLock::acquire(tmp.path()).unwrap_err());
        assert!(
            msg.contains(&elsewhere.host) && msg.contains("remove"),
            "{msg}"
        );
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            record,
            "left as it was"
        );
    }
}
