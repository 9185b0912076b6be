//! Open MPI's `mpirun`: `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE` and the local pair; run id
//! `OMPI_MCA_orte_ess_jobid`, else `PMIX_NAMESPACE`, else `"mpi"`. mpirun does not say where
//! rank 0 runs: `MASTER_ADDR` must be passed to every rank.

use super::found::{run_id, Found, Names};
use super::{any_set, Launcher};
use crate::error::UsageError;

const MPI_NAMES: Names = Names {
    rank: "OMPI_COMM_WORLD_RANK",
    world_size: "OMPI_COMM_WORLD_SIZE",
    local_rank: "OMPI_COMM_WORLD_LOCAL_RANK",
    local_world_size: "OMPI_COMM_WORLD_LOCAL_SIZE",
};

pub(super) fn detect(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Found>, UsageError> {
    let n = MPI_NAMES;
    if !any_set(env, &[n.rank, n.world_size]) {
        return Ok(None);
    }
    let id = run_id(env, &["OMPI_MCA_orte_ess_jobid", "PMIX_NAMESPACE"], "mpi");
    let mut found = Found::read(Launcher::OpenMpi, n, env, id)?;
    found.master_hint = "; mpirun does not say where rank 0 runs, so pass it to every rank, e.g. \
                         `mpirun -x MASTER_ADDR=host -x MASTER_PORT=29500 ...`";
    Ok(Some(found))
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;

    #[test]
    fn open_mpi_variables() {
        assert_eq!(
            read(MPI),
            Some(env(
                Launcher::OpenMpi,
                (3, 4),
                (1, 2),
                ("head", 29500),
                "1234567"
            ))
        );
        let pmix = with(
            &without(MPI, &["OMPI_MCA_orte_ess_jobid"]),
            &[("PMIX_NAMESPACE", "prterun-h-1@1")],
        );
        assert_eq!(read(&pmix).unwrap().run_id, "prterun-h-1@1");
        let neither = without(MPI, &["OMPI_MCA_orte_ess_jobid"]);
        assert_eq!(read(&neither).unwrap().run_id, "mpi");
        assert_eq!(
            read(&with(MPI, &[("MASTER_PORT", "1234")]))
                .unwrap()
                .master_port,
            1234
        );
        // Across nodes MASTER_ADDR is required, and the message says how to pass it.
        let e = error(&without(MPI, &["MASTER_ADDR"]));
        assert!(e.starts_with("MASTER_ADDR is not set"), "{e}");
        assert!(e.contains("mpirun -x MASTER_ADDR="), "{e}");
        // On one node it defaults to loopback.
        let one_node = [
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ];
        assert_eq!(
            read(&one_node),
            Some(env(
                Launcher::OpenMpi,
                (1, 2),
                (1, 2),
                ("127.0.0.1", 29500),
                "mpi"
            ))
        );
    }
}
