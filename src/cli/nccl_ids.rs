//! One NCCL unique id per communicator of a multi-process GPU job. An id's bootstrap root serves a
//! single ncclCommInitRank and then closes its socket, so a second communicator made from the same
//! id hangs (FACTS.md). Communicators over the same ranks in different roles (the world and the
//! shard group under full_shard, the world and the replica group under no_shard, all three at
//! world 1) are different communicators: ids are keyed by role and ranks, never by ranks alone.
//! Pure: rank 0 draws the ids, every rank looks up its own three.

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};

use crate::shard::ShardPlan;

/// Which of a rank's three communicators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CommRole {
    World,
    Shard,
    Replica,
}

impl std::fmt::Display for CommRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl CommRole {
    fn name(self) -> &'static str {
        match self {
            CommRole::World => "world",
            CommRole::Shard => "shard",
            CommRole::Replica => "replica",
        }
    }
}

/// The key a communicator's id is handed out under, e.g. "shard:0,1".
pub(super) fn comm_key(role: CommRole, ranks: &[usize]) -> String {
    let ranks: Vec<String> = ranks.iter().map(usize::to_string).collect();
    format!("{}:{}", role.name(), ranks.join(","))
}

/// Every communicator of the job, each once: the world, every shard group, every replica group.
pub(super) fn job_communicators(plan: &ShardPlan) -> Vec<(CommRole, Vec<usize>)> {
    let world = (CommRole::World, (0..plan.world_size).collect());
    let shards = plan
        .all_shard_groups()
        .into_iter()
        .map(|g| (CommRole::Shard, g));
    let replicas = plan
        .all_replica_groups()
        .into_iter()
        .map(|g| (CommRole::Replica, g));
    std::iter::once(world)
        .chain(shards)
        .chain(replicas)
        .collect()
}

/// The communicators `rank` joins, in the order it creates them.
pub(super) fn rank_communicators(plan: &ShardPlan, rank: usize) -> [(CommRole, Vec<usize>); 3] {
    [
        (CommRole::World, (0..plan.world_size).collect()),
        (CommRole::Shard, plan.shard_group(rank)),
        (CommRole::Replica, plan.replica_group(rank)),
    ]
}

/// Rank 0: one freshly drawn id per communicator of the job.
pub(super) fn draw_ids(
    plan: &ShardPlan,
    mut draw: impl FnMut() -> Result<Vec<u8>>,
) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut ids = BTreeMap::new();
    for (role, ranks) in job_communicators(plan) {
        ids.insert(comm_key(role, &ranks), draw()?);
    }
    Ok(ids)
}

/// The id of this rank's communicator `role` over `ranks`, from what rank 0 handed out.
pub(super) fn id_for<'a>(
    ids: &'a BTreeMap<String, Vec<u8>>,
    role: CommRole,
    ranks: &[usize],
) -> Result<&'a [u8]> {
    let key = comm_key(role, ranks);
    ids.get(&key)
        .map(Vec::as_slice)
        .ok_or_else(|| anyhow!("rank 0 handed out no NCCL id for the {key} communicator"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::config::{ParallelConfig, ShardStrategy};

    fn plan(strategy: ShardStrategy, world: usize, group: usize) -> ShardPlan {
        ShardPlan::new(&ParallelConfig {
            world_size: world,
            strategy,
            shard_group_size: group,
            ..ParallelConfig::default()
        })
    }

    /// Every plan the test covers: each strategy at worlds 1..8, hybrid_shard at every proper
    /// shard group size (2 at world 4 among them).
    fn plans() -> Vec<ShardPlan> {
        let mut plans = Vec::new();
        for world in 1..=8 {
            for s in [
                ShardStrategy::FullShard,
                ShardStrategy::ShardGradOp,
                ShardStrategy::NoShard,
            ] {
                plans.push(plan(s, world, 0));
            }
            for g in (2..world).filter(|g| world % g == 0) {
                plans.push(plan(ShardStrategy::HybridShard, world, g));
            }
        }
        assert!(plans
            .iter()
            .any(|p| p.strategy == ShardStrategy::HybridShard
                && (p.world_size, p.group_size) == (4, 2)));
        plans
    }

    #[test]
    fn every_communicator_has_its_own_id_shared_by_its_members() {
        for p in plans() {
            let what = format!(
                "{:?} world {} group {}",
                p.strategy, p.world_size, p.group_size
            );
            // Distinct ids as a unique id generator would draw them.
            let mut next = 0u32;
            let ids = draw_ids(&p, || {
                next += 1;
                Ok(next.to_le_bytes().to_vec())
            })
            .unwrap();
            for rank in 0..p.world_size {
                let mine = rank_communicators(&p, rank);
                let got: Vec<&[u8]> = mine
                    .iter()
                    .map(|(role, ranks)| id_for(&ids, *role, ranks).unwrap())
                    .collect();
                let distinct: BTreeSet<&[u8]> = got.iter().copied().collect();
                assert_eq!(
                    distinct.len(),
                    mine.len(),
                    "{what}: rank {rank} would make two communicators from one id: {mine:?}"
                );
                for ((role, ranks), id) in mine.iter().zip(&got) {
                    assert!(
                        ranks.contains(&rank),
                        "{what}: rank {rank} not in {ranks:?}"
                    );
                    for &member in ranks {
                        let theirs = rank_communicators(&p, member);
                        let (_, their_ranks) = theirs.iter().find(|(r, _)| r == role).unwrap();
                        assert_eq!(
                            their_ranks, ranks,
                            "{what}: rank {member} sees rank {rank}'s {role:?} group otherwise"
                        );
                        assert_eq!(
                            id_for(&ids, *role, their_ranks).unwrap(),
                            *id,
                            "{what}: ranks {rank}, {member} of one {role:?} communicator, two ids"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_missing_id_names_the_communicator() {
        let ids = BTreeMap::new();
        let e = id_for(&ids, CommRole::Replica, &[1, 3]).unwrap_err();
        assert!(e.to_string().contains("replica:1,3"), "{e}");
    }
}
