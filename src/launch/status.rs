//! What a rank that failed because of another tells its launcher: which rank it blames and why.
//!
//! A rank whose collective broke on a peer (the peer exited, hung or was stopped) exits with
//! [`PeerFailed::EXIT_CODE`]; its own error names the peer, but the launcher only sees exit
//! statuses, and the exit status of the victim is what it saw first. So `shardtrain launch` gives
//! its ranks a private directory (`SHARDTRAIN_STATUS_DIR`), and a rank that fails with a
//! [`PeerFailed`] writes `rank-R.json` there before it exits (written whole, then renamed, so the
//! launcher never reads half a report). The launcher reads the reports of its exit-3 ranks to
//! name the rank that caused the failure, also when that rank itself never exits on its own
//! (stopped, or stuck in a loop) or runs on another node.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::comm::PeerFailed;

/// The variable naming the directory where ranks leave their reports.
pub const DIR_VAR: &str = "SHARDTRAIN_STATUS_DIR";

/// One rank's account of why it failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blame {
    /// The rank that wrote it.
    pub rank: usize,
    /// The rank it failed because of.
    pub blames: usize,
    /// Its error, as it printed it.
    pub reason: String,
}

fn report_path(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("rank-{rank}.json"))
}

/// Rank side, on the way out: if this process was started by `shardtrain launch` and `err` says
/// another rank caused it, leave a report for the launcher. Best effort: a report that cannot be
/// written leaves the launcher with the exit status alone, as before.
pub fn report_peer_failure(err: &anyhow::Error) {
    let Some(peer) = err.chain().find_map(|e| e.downcast_ref::<PeerFailed>()) else {
        return;
    };
    let Some(dir) = std::env::var_os(DIR_VAR).map(PathBuf::from) else {
        return;
    };
    let Some(rank) = std::env::var("SHARDTRAIN_RANK")
        .ok()
        .and_then(|r| r.parse::<usize>().ok())
    else {
        return;
    };
    let blame = Blame {
        rank,
        blames: peer.rank,
        reason: peer.message.clone(),
    };
    if let Err(e) = write(&dir, &blame) {
        tracing::warn!("could not tell the launcher which rank failed: {e}");
    }
}

fn write(dir: &Path, blame: &Blame) -> std::io::Result<()> {
    let path = report_path(dir, blame.rank);
    let partial = path.with_extension("json.partial");
    std::fs::write(&partial, serde_json::to_vec(blame)?)?;
    std::fs::rename(&partial, &path)
}

/// Launcher side: the directory its ranks report into, removed when the launcher is done.
pub struct StatusDir {
    dir: tempfile::TempDir,
}

impl StatusDir {
    pub fn create() -> std::io::Result<StatusDir> {
        let dir = tempfile::Builder::new()
            .prefix("shardtrain-launch-")
            .tempdir()?;
        Ok(StatusDir { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The report of `rank`, if it left one that reads.
    pub fn read(&self, rank: usize) -> Option<Blame> {
        let bytes = std::fs::read(report_path(self.path(), rank)).ok()?;
        serde_json::from_slice::<Blame>(&bytes)
            .ok()
            .filter(|b| b.rank == rank)
    }

    /// Forgets the reports of an attempt, before the next one starts.
    pub fn clear(&self) {
        if let Ok(entries) = std::fs::read_dir(self.path()) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_round_trips_and_a_foreign_one_is_ignored() {
        let dir = StatusDir::create().unwrap();
        let blame = Blame {
            rank: 0,
            blames: 1,
            reason: "all_reduce: rank 1 sent nothing within 2s".into(),
        };
        write(dir.path(), &blame).unwrap();
        assert_eq!(dir.read(0), Some(blame));
        assert_eq!(dir.read(1), None);
        // A file under one rank's name that claims another rank is not taken.
        std::fs::write(
            report_path(dir.path(), 2),
            br#"{"rank":3,"blames":0,"reason":"x"}"#,
        )
        .unwrap();
        assert_eq!(dir.read(2), None);
        std::fs::write(report_path(dir.path(), 4), b"{not json").unwrap();
        assert_eq!(dir.read(4), None);
        dir.clear();
        assert_eq!(dir.read(0), None);
    }
}
