//! The test helpers every launcher's tests share, and the tests of the shared resolution:
//! precedence between launchers, flags, defaults and validation.

use super::*;

pub(super) fn lookup<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name| {
        pairs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_string())
    }
}

pub(super) fn read_with(
    flags: &RankFlags,
    pairs: &[(&str, &str)],
) -> Result<Option<RankEnv>, UsageError> {
    from_env(flags, &lookup(pairs))
}

pub(super) fn read(pairs: &[(&str, &str)]) -> Option<RankEnv> {
    read_with(&RankFlags::default(), pairs).expect("valid environment")
}

pub(super) fn error_with(flags: &RankFlags, pairs: &[(&str, &str)]) -> String {
    match read_with(flags, pairs) {
        Err(e) => e.0,
        Ok(found) => panic!("expected an error, got {found:?}"),
    }
}

pub(super) fn error(pairs: &[(&str, &str)]) -> String {
    error_with(&RankFlags::default(), pairs)
}

pub(super) fn env(
    launcher: Launcher,
    (rank, world_size): (usize, usize),
    (local_rank, local_world_size): (usize, usize),
    (master_addr, master_port): (&str, u16),
    run_id: &str,
) -> RankEnv {
    RankEnv {
        rank,
        world_size,
        local_rank,
        local_world_size,
        master_addr: master_addr.to_string(),
        master_port,
        run_id: run_id.to_string(),
        launcher,
    }
}

pub(super) const TORCHRUN: &[(&str, &str)] = &[
    ("RANK", "5"),
    ("WORLD_SIZE", "8"),
    ("LOCAL_RANK", "1"),
    ("LOCAL_WORLD_SIZE", "4"),
    ("MASTER_ADDR", "10.0.0.7"),
    ("MASTER_PORT", "29400"),
    ("TORCHELASTIC_RUN_ID", "job-42"),
];

pub(super) const SLURM: &[(&str, &str)] = &[
    ("SLURM_STEP_ID", "0"),
    ("SLURM_PROCID", "6"),
    ("SLURM_NTASKS", "8"),
    ("SLURM_LOCALID", "2"),
    ("SLURM_NNODES", "2"),
    ("SLURM_NODEID", "1"),
    ("SLURM_STEP_TASKS_PER_NODE", "4(x2)"),
    ("SLURM_STEP_NODELIST", "gpu[07-08]"),
    ("SLURM_JOB_NODELIST", "gpu[01-08]"),
    ("SLURM_JOB_ID", "123456"),
];

pub(super) const MPI: &[(&str, &str)] = &[
    ("OMPI_COMM_WORLD_RANK", "3"),
    ("OMPI_COMM_WORLD_SIZE", "4"),
    ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
    ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
    ("MASTER_ADDR", "head"),
    ("OMPI_MCA_orte_ess_jobid", "1234567"),
];

pub(super) fn with(
    base: &[(&'static str, &'static str)],
    extra: &[(&'static str, &'static str)],
) -> Vec<(&'static str, &'static str)> {
    // Later entries override earlier ones: `lookup` finds the first, so put extras first.
    let mut all = extra.to_vec();
    all.extend_from_slice(base);
    all
}

pub(super) fn without(
    base: &[(&'static str, &'static str)],
    names: &[&str],
) -> Vec<(&'static str, &'static str)> {
    base.iter()
        .filter(|(n, _)| !names.contains(n))
        .copied()
        .collect()
}

#[test]
fn no_flags_and_no_launcher_is_none() {
    assert_eq!(read(&[]), None);
    assert_eq!(
        read(&[
            ("PATH", "/usr/bin"),
            ("HOME", "/root"),
            ("MASTER_PORT", "1234")
        ]),
        None
    );
    // LOCAL_RANK alone is set by too many tools to mean torchrun.
    assert_eq!(read(&[("LOCAL_RANK", "0")]), None);
    assert_eq!(read(&[("SHARDTRAIN_RUN_ID", "x")]), None);
}

#[test]
fn launchers_in_order() {
    let ours = [("SHARDTRAIN_RANK", "0"), ("SHARDTRAIN_WORLD_SIZE", "2")];
    let all: Vec<_> = [&ours[..], TORCHRUN, SLURM, MPI].concat();
    assert_eq!(read(&all).unwrap().launcher, Launcher::Shardtrain);
    assert_eq!(read(&all).unwrap().rank, 0);
    let no_ours: Vec<_> = [TORCHRUN, SLURM, MPI].concat();
    assert_eq!(read(&no_ours).unwrap().launcher, Launcher::Torchrun);
    assert_eq!(read(&no_ours).unwrap().rank, 5);
    // mpirun inside a Slurm job: its processes inherit the srun step of Open MPI's daemons,
    // whose SLURM_PROCID is the node's index; Open MPI's own variables are the true ones.
    let mpi_in_slurm: Vec<_> = [MPI, SLURM].concat();
    let found = read(&mpi_in_slurm).unwrap();
    assert_eq!(
        (found.launcher, found.rank, found.world_size),
        (Launcher::OpenMpi, 3, 4)
    );
    assert_eq!(read(SLURM).unwrap().launcher, Launcher::Slurm);
}

#[test]
fn flags_alone() {
    let flags = RankFlags {
        rank: Some(1),
        world_size: Some(2),
        ..RankFlags::default()
    };
    assert_eq!(
        read_with(&flags, &[]).unwrap(),
        Some(env(
            Launcher::Flags,
            (1, 2),
            (1, 2),
            ("127.0.0.1", 29500),
            "default"
        ))
    );
    let flags = RankFlags {
        rank: Some(5),
        world_size: Some(8),
        local_rank: Some(1),
        master_addr: Some("node0".into()),
        master_port: Some(4000),
    };
    assert_eq!(
        read_with(&flags, &[]).unwrap(),
        Some(env(
            Launcher::Flags,
            (5, 8),
            (1, 8),
            ("node0", 4000),
            "default"
        ))
    );
    // A local rank other than the rank means several nodes: an address is needed.
    let e = error_with(
        &RankFlags {
            master_addr: None,
            ..flags.clone()
        },
        &[],
    );
    assert!(
        e.starts_with("MASTER_ADDR is not set (and --master-addr was not given)"),
        "{e}"
    );
}

#[test]
fn partial_flags_name_what_is_missing() {
    let e = error_with(
        &RankFlags {
            rank: Some(0),
            ..RankFlags::default()
        },
        &[],
    );
    assert!(e.starts_with("--world is missing"), "{e}");
    let e = error_with(
        &RankFlags {
            world_size: Some(2),
            ..RankFlags::default()
        },
        &[],
    );
    assert!(e.starts_with("--rank is missing"), "{e}");
    let e = error_with(
        &RankFlags {
            master_port: Some(1234),
            ..RankFlags::default()
        },
        &[],
    );
    assert!(e.starts_with("--rank and --world are missing"), "{e}");
}

#[test]
fn flags_win_field_by_field() {
    let flags = RankFlags {
        rank: Some(4),
        master_port: Some(1234),
        ..RankFlags::default()
    };
    assert_eq!(
        read_with(&flags, TORCHRUN).unwrap(),
        Some(env(
            Launcher::Torchrun,
            (4, 8),
            (1, 4),
            ("10.0.0.7", 1234),
            "job-42"
        ))
    );
    let flags = RankFlags {
        local_rank: Some(3),
        master_addr: Some("elsewhere".into()),
        world_size: Some(16),
        ..RankFlags::default()
    };
    assert_eq!(
        read_with(&flags, SLURM).unwrap(),
        Some(env(
            Launcher::Slurm,
            (6, 16),
            (3, 4),
            ("elsewhere", 29956),
            "123456"
        ))
    );
    // A flag that breaks the job is named as the flag.
    let flags = RankFlags {
        rank: Some(9),
        ..RankFlags::default()
    };
    assert_eq!(
        error_with(&flags, TORCHRUN),
        "--rank 9 is not below WORLD_SIZE=8"
    );
    let flags = RankFlags {
        master_port: Some(0),
        ..RankFlags::default()
    };
    assert!(error_with(&flags, TORCHRUN).starts_with("--master-port 0 is not a TCP port"));
    let flags = RankFlags {
        master_addr: Some(" ".into()),
        ..RankFlags::default()
    };
    assert!(error_with(&flags, TORCHRUN).starts_with("--master-addr is set but empty"));
}

#[test]
fn each_error_names_its_variable() {
    let base = [("RANK", "1"), ("WORLD_SIZE", "2")];
    let err = |extra: &[(&'static str, &'static str)]| error(&with(&base, extra));
    assert_eq!(err(&[("RANK", "abc")]), "RANK=abc is not a whole number");
    assert_eq!(err(&[("RANK", "-1")]), "RANK=-1 is not a whole number");
    assert_eq!(
        err(&[("WORLD_SIZE", "")]),
        "WORLD_SIZE is set but empty: expected a whole number"
    );
    assert_eq!(
        err(&[("LOCAL_RANK", "x")]),
        "LOCAL_RANK=x is not a whole number"
    );
    assert_eq!(err(&[("RANK", "3")]), "RANK=3 is not below WORLD_SIZE=2");
    assert_eq!(err(&[("RANK", "2")]), "RANK=2 is not below WORLD_SIZE=2");
    assert_eq!(
        err(&[("RANK", "0"), ("WORLD_SIZE", "0")]),
        "WORLD_SIZE=0: the world size must be at least 1"
    );
    assert_eq!(
        err(&[("LOCAL_RANK", "4"), ("LOCAL_WORLD_SIZE", "2")]),
        "LOCAL_RANK=4 is not below LOCAL_WORLD_SIZE=2"
    );
    assert_eq!(
        err(&[("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "4")]),
        "LOCAL_WORLD_SIZE=4 exceeds WORLD_SIZE=2"
    );
    assert_eq!(
        err(&[("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "0")]),
        "LOCAL_WORLD_SIZE=0: the local world size must be at least 1"
    );
    for bad in ["0", "70000", "-1", "http", ""] {
        assert_eq!(
            err(&[("MASTER_PORT", bad)]),
            format!("MASTER_PORT={bad} is not a TCP port (a whole number from 1 to 65535)")
        );
    }
    assert!(err(&[("MASTER_ADDR", "")]).starts_with("MASTER_ADDR is set but empty"));
    assert!(err(&[("MASTER_ADDR", "  ")]).starts_with("MASTER_ADDR is set but empty"));
    // The same checks under the other launchers' names.
    assert_eq!(
        error(&with(MPI, &[("OMPI_COMM_WORLD_RANK", "4")])),
        "OMPI_COMM_WORLD_RANK=4 is not below OMPI_COMM_WORLD_SIZE=4"
    );
    assert_eq!(
        error(&with(SLURM, &[("SLURM_LOCALID", "4")])),
        "SLURM_LOCALID=4 is not below SLURM_STEP_TASKS_PER_NODE=4(x2)"
    );
    assert_eq!(
        error(&[("SHARDTRAIN_RANK", "1"), ("SHARDTRAIN_WORLD_SIZE", "one")]),
        "SHARDTRAIN_WORLD_SIZE=one is not a whole number"
    );
}

#[test]
fn master_addr_defaults_only_on_one_node() {
    let one_node = [
        ("RANK", "1"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "4"),
    ];
    assert_eq!(read(&one_node).unwrap().master_addr, "127.0.0.1");
    let two_nodes = [
        ("RANK", "5"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "4"),
    ];
    let e = error(&two_nodes);
    assert!(e.starts_with("MASTER_ADDR is not set"), "{e}");
    assert!(e.contains("LOCAL_WORLD_SIZE=4 of WORLD_SIZE=8"), "{e}");
    // Rank 0 of a multi-node job is no exception: the others could not reach its loopback.
    let rank0 = [
        ("RANK", "0"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "0"),
        ("LOCAL_WORLD_SIZE", "4"),
    ];
    assert!(error(&rank0).starts_with("MASTER_ADDR is not set"));
    // Slurm without any node list across nodes.
    let slurm = without(SLURM, &["SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"]);
    assert!(error(&slurm).starts_with("MASTER_ADDR is not set"));
}

#[test]
fn process_environment_is_read() {
    // The test process is not started by a launcher with a world of more than one rank
    // unless someone runs the tests under one; either way reading must not fail on flags.
    let flags = RankFlags {
        rank: Some(0),
        world_size: Some(1),
        ..RankFlags::default()
    };
    let found = from_process_env(&flags);
    if let Ok(Some(found)) = found {
        assert_eq!((found.rank, found.world_size), (0, 1));
    }
}
