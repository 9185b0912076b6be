//! PyTorch's `torchrun`: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, run id
//! `TORCHELASTIC_RUN_ID` (`LOCAL_RANK` alone is set by too many other tools to count).

use super::found::{run_id, Found, Names};
use super::{any_set, Launcher, DEFAULT_RUN_ID};
use crate::error::UsageError;

const TORCHRUN_NAMES: Names = Names {
    rank: "RANK",
    world_size: "WORLD_SIZE",
    local_rank: "LOCAL_RANK",
    local_world_size: "LOCAL_WORLD_SIZE",
};

pub(super) fn detect(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Found>, UsageError> {
    let n = TORCHRUN_NAMES;
    if !any_set(env, &[n.rank, n.world_size, n.local_world_size]) {
        return Ok(None);
    }
    let id = run_id(env, &["TORCHELASTIC_RUN_ID"], DEFAULT_RUN_ID);
    Found::read(Launcher::Torchrun, n, env, id).map(Some)
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;

    #[test]
    fn torchrun_variables() {
        assert_eq!(
            read(TORCHRUN),
            Some(env(
                Launcher::Torchrun,
                (5, 8),
                (1, 4),
                ("10.0.0.7", 29400),
                "job-42"
            ))
        );
        let plain = without(TORCHRUN, &["TORCHELASTIC_RUN_ID", "MASTER_PORT"]);
        assert_eq!(
            read(&plain),
            Some(env(
                Launcher::Torchrun,
                (5, 8),
                (1, 4),
                ("10.0.0.7", 29500),
                "default"
            ))
        );
        // Values are trimmed.
        let spaced = [("RANK", " 1 "), ("WORLD_SIZE", "2\n")];
        assert_eq!(
            read(&spaced),
            Some(env(
                Launcher::Torchrun,
                (1, 2),
                (1, 2),
                ("127.0.0.1", 29500),
                "default"
            ))
        );
    }

    #[test]
    fn torchrun_missing_locals() {
        // Without local variables the job is taken to be on one node.
        assert_eq!(
            read(&[("RANK", "3"), ("WORLD_SIZE", "4")]),
            Some(env(
                Launcher::Torchrun,
                (3, 4),
                (3, 4),
                ("127.0.0.1", 29500),
                "default"
            ))
        );
        // LOCAL_RANK differing from RANK says the job spans nodes: LOCAL_WORLD_SIZE is needed.
        let e = error(&[("RANK", "5"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1")]);
        assert!(e.contains("LOCAL_WORLD_SIZE is not set"), "{e}");
        assert!(e.contains("LOCAL_RANK=1") && e.contains("RANK=5"), "{e}");
        // A local world smaller than the world with no LOCAL_RANK.
        let e = error(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_WORLD_SIZE", "4"),
        ]);
        assert!(e.contains("LOCAL_RANK is not set"), "{e}");
        // A missing world size names its variable, and a flag can supply it.
        let e = error(&[("RANK", "1")]);
        assert!(e.starts_with("WORLD_SIZE is not set"), "{e}");
        let flags = RankFlags {
            world_size: Some(2),
            ..RankFlags::default()
        };
        assert_eq!(
            read_with(&flags, &[("RANK", "1")]).unwrap(),
            Some(env(
                Launcher::Torchrun,
                (1, 2),
                (1, 2),
                ("127.0.0.1", 29500),
                "default"
            ))
        );
        let e = error(&[("WORLD_SIZE", "2")]);
        assert!(e.starts_with("RANK is not set"), "{e}");
    }
}
