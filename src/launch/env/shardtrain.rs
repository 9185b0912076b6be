//! shardtrain's own launcher (`shardtrain launch`): `SHARDTRAIN_RANK`, `SHARDTRAIN_WORLD_SIZE`,
//! `SHARDTRAIN_LOCAL_RANK`, `SHARDTRAIN_LOCAL_WORLD_SIZE`, run id `SHARDTRAIN_RUN_ID`.

use super::found::{run_id, Found, Names};
use super::{any_set, Launcher, DEFAULT_RUN_ID};
use crate::error::UsageError;

const SHARDTRAIN_NAMES: Names = Names {
    rank: "SHARDTRAIN_RANK",
    world_size: "SHARDTRAIN_WORLD_SIZE",
    local_rank: "SHARDTRAIN_LOCAL_RANK",
    local_world_size: "SHARDTRAIN_LOCAL_WORLD_SIZE",
};

pub(super) fn detect(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Found>, UsageError> {
    let n = SHARDTRAIN_NAMES;
    if !any_set(
        env,
        &[n.rank, n.world_size, n.local_rank, n.local_world_size],
    ) {
        return Ok(None);
    }
    let id = run_id(env, &["SHARDTRAIN_RUN_ID"], DEFAULT_RUN_ID);
    Found::read(Launcher::Shardtrain, n, env, id).map(Some)
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;

    #[test]
    fn shardtrain_variables() {
        let vars = [
            ("SHARDTRAIN_RANK", "2"),
            ("SHARDTRAIN_WORLD_SIZE", "4"),
            ("SHARDTRAIN_LOCAL_RANK", "0"),
            ("SHARDTRAIN_LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node1"),
            ("MASTER_PORT", "31000"),
            ("SHARDTRAIN_RUN_ID", "r-7"),
        ];
        assert_eq!(
            read(&vars),
            Some(env(
                Launcher::Shardtrain,
                (2, 4),
                (0, 2),
                ("node1", 31000),
                "r-7"
            ))
        );
        // One node: address, port and run id default.
        let vars = [
            ("SHARDTRAIN_RANK", "1"),
            ("SHARDTRAIN_WORLD_SIZE", "2"),
            ("SHARDTRAIN_LOCAL_RANK", "1"),
            ("SHARDTRAIN_LOCAL_WORLD_SIZE", "2"),
        ];
        assert_eq!(
            read(&vars),
            Some(env(
                Launcher::Shardtrain,
                (1, 2),
                (1, 2),
                ("127.0.0.1", 29500),
                "default"
            ))
        );
    }
}
