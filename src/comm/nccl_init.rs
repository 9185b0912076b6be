//! Creating an NCCL communicator without waiting forever. ncclCommInitRank blocks until every
//! member has joined, so a peer that never comes (it died, hung, or was handed another id) would
//! hang this rank for good. Communicators are made non-blocking instead (ncclCommInitRankConfig
//! with `config.blocking = 0`) and polled with ncclCommGetAsyncError up to the job's collective
//! timeout, then aborted. A non-blocking communicator stays so: a collective may return
//! ncclInProgress before its kernels are on the stream, so the transport waits here for
//! ncclSuccess before it records the collective's done event.

use std::ffi::{c_int, c_uint};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use cudarc::nccl::sys;

use super::nccl_lib::{NcclLib, NCCL_IN_PROGRESS, NCCL_REMOTE_ERROR, NCCL_SUCCESS};
use super::PeerFailed;

/// NCCL_VERSION(2, 30, 0): cudarc's `nccl` feature is nccl-02030, whose ncclConfig_t layout
/// [`nonblocking_config`] fills.
const BINDINGS_VERSION: c_int = 23000;
/// nccl.h: NCCL_CONFIG_INITIALIZER's magic.
const CONFIG_MAGIC: c_uint = 0xcafe_beef;
/// nccl.h: NCCL_CONFIG_UNDEF_INT, "NCCL's default" (NCCL_CONFIG_UNDEF_PTR is null).
const UNDEF_INT: c_int = c_int::MIN;

/// What NCCL_CONFIG_INITIALIZER makes (every setting undefined: NCCL's defaults), but blocking = 0.
/// `version` is the older of our bindings' header and the library: NCCL reads at most
/// `min(size, its own sizeof)` bytes and resets the fields newer than `version` to its defaults,
/// so the prefix both know is what counts.
pub fn nonblocking_config(library_version: c_int) -> sys::ncclConfig_t {
    let version = BINDINGS_VERSION.min(library_version);
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: CONFIG_MAGIC,
        version: version.max(0) as c_uint,
        blocking: 0,
        cgaClusterSize: UNDEF_INT,
        minCTAs: UNDEF_INT,
        maxCTAs: UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: UNDEF_INT,
        trafficClass: UNDEF_INT,
        commName: std::ptr::null(),
        collnetEnable: UNDEF_INT,
        CTAPolicy: UNDEF_INT,
        shrinkShare: UNDEF_INT,
        nvlsCTAs: UNDEF_INT,
        nChannelsPerNetPeer: UNDEF_INT,
        nvlinkCentricSched: UNDEF_INT,
        graphUsageMode: UNDEF_INT,
        numRmaCtx: UNDEF_INT,
        maxP2pPeers: UNDEF_INT,
    }
}

/// Why a communicator's pending call did not finish.
#[derive(Debug, PartialEq)]
pub enum Stalled {
    /// NCCL reported this result code.
    Failed(c_int),
    /// Still in progress at the deadline.
    TimedOut,
}

/// Polls ncclCommGetAsyncError until the communicator's pending call (its init, or enqueueing a
/// collective) has finished, it failed, or `deadline` passed.
///
/// # Safety
/// `comm` is a live communicator of `lib` (not yet aborted or destroyed).
pub unsafe fn wait_ready(
    lib: &NcclLib,
    comm: sys::ncclComm_t,
    deadline: Instant,
) -> std::result::Result<(), Stalled> {
    // Enqueueing usually finishes within microseconds, an init within a second: start short.
    let mut pause = Duration::from_micros(50);
    loop {
        let mut state = NCCL_IN_PROGRESS;
        // SAFETY: as the caller promises; a valid out-pointer.
        let code = unsafe { (lib.comm_get_async_error)(comm, &mut state) };
        if code != NCCL_SUCCESS {
            return Err(Stalled::Failed(code));
        }
        match state {
            NCCL_SUCCESS => return Ok(()),
            NCCL_IN_PROGRESS if Instant::now() >= deadline => return Err(Stalled::TimedOut),
            NCCL_IN_PROGRESS => {}
            failed => return Err(Stalled::Failed(failed)),
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

/// Creates this rank's communicator of the group `ranks` (global ranks; this rank is `ranks[me]`)
/// from `id`, waiting at most `timeout` for every member to join. On an error or at the deadline
/// the half-made communicator is aborted; a timeout, or an error a peer reported, is a
/// [`PeerFailed`]. NCCL binds the communicator to the calling thread's current CUDA device.
pub fn init_comm(
    lib: &NcclLib,
    ranks: &[usize],
    me: usize,
    id: sys::ncclUniqueId,
    timeout: Duration,
) -> Result<sys::ncclComm_t> {
    let rank = ranks[me];
    let what = format!(
        "creating the NCCL communicator of the group {ranks:?} on rank {rank} (group rank {me} of \
         {})",
        ranks.len()
    );
    let mut config = nonblocking_config(lib.version);
    let mut comm = std::ptr::null_mut();
    let deadline = Instant::now() + timeout;
    // SAFETY: valid out-pointers and an id every member of the group was handed.
    let code = unsafe {
        (lib.comm_init_rank_config)(
            &mut comm,
            ranks.len() as c_int,
            id,
            me as c_int,
            &mut config,
        )
    };
    let stalled = if code == NCCL_SUCCESS || code == NCCL_IN_PROGRESS {
        // SAFETY: NCCL handed back a communicator that nothing else uses yet.
        match unsafe { wait_ready(lib, comm, deadline) } {
            Ok(()) => return Ok(comm),
            Err(s) => s,
        }
    } else {
        Stalled::Failed(code)
    };
    let last = lib.last_error();
    if !comm.is_null() {
        // SAFETY: the communicator is ours and is not used again.
        unsafe {
            let _ = (lib.comm_abort)(comm);
        }
    }
    let peers: Vec<usize> = ranks.iter().copied().filter(|&r| r != rank).collect();
    Err(match stalled {
        Stalled::TimedOut if peers.is_empty() => anyhow!(
            "{what}: not ready within the collective timeout of {timeout:?} (no peer to wait \
             for: NCCL's own set-up did not finish); aborted it"
        ),
        Stalled::TimedOut => PeerFailed {
            // NCCL does not say who is missing: the first peer stands for them.
            rank: peers[0],
            message: format!(
                "{what}: not ready within the collective timeout of {timeout:?}; ranks {peers:?} \
                 may not have joined (one exited or hung before creating it, or was handed \
                 another NCCL id); aborted it"
            ),
        }
        .into(),
        Stalled::Failed(code) => {
            let detail = if last.is_empty() {
                lib.describe(code)
            } else {
                format!("{}: {last}", lib.describe(code))
            };
            let message = format!("{what}: {detail}");
            if code == NCCL_REMOTE_ERROR && !peers.is_empty() {
                PeerFailed {
                    rank: peers[0],
                    message,
                }
                .into()
            } else {
                anyhow!(message)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::Command;

    use super::*;

    /// tests/fixtures/nccl_stub.c, compiled into a libnccl.so.2 of its own.
    fn stub() -> (tempfile::TempDir, NcclLib) {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libnccl.so.2");
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nccl_stub.c");
        let out = Command::new("cc")
            .args(["-shared", "-fPIC", "-O1", "-o"])
            .arg(&lib)
            .arg(&src)
            .output()
            .expect("cc (the C compiler Rust links with) runs");
        assert!(
            out.status.success(),
            "compiling {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let opened = NcclLib::open(&lib).unwrap();
        (dir, opened)
    }

    /// How many times the stub's ncclCommAbort ran (opening its path again gives the same
    /// library).
    fn aborts(lib: &NcclLib) -> c_int {
        // SAFETY: stub_abort_count takes nothing and returns an int.
        unsafe {
            let l = libloading::os::unix::Library::new(&lib.path).unwrap();
            let count: libloading::os::unix::Symbol<unsafe extern "C" fn() -> c_int> =
                l.get(b"stub_abort_count\0").unwrap();
            count()
        }
    }

    fn id() -> sys::ncclUniqueId {
        sys::ncclUniqueId { internal: [7; 128] }
    }

    #[test]
    fn the_config_is_the_initializer_with_blocking_off() {
        let c = nonblocking_config(22803);
        assert_eq!((c.magic, c.version, c.blocking), (0xcafe_beef, 22803, 0));
        assert_eq!(c.size, std::mem::size_of::<sys::ncclConfig_t>());
        assert_eq!((c.minCTAs, c.maxP2pPeers), (c_int::MIN, c_int::MIN));
        assert!(c.netName.is_null() && c.commName.is_null());
        // A newer library is told the version of the layout we fill.
        assert_eq!(nonblocking_config(23203).version, 23000);
    }

    /// With a real NCCL (see `nccl_lib`'s real_nccl test for how to provide one) on a GPU: a
    /// world-1 communicator is made non-blocking and becomes ready. Without a GPU, NCCL 2.2x
    /// stops at cudaGetDevice before it reads the config, so there this only shows the error path
    /// (NCCL's code and its last message, e.g. "CUDA driver version is insufficient").
    #[test]
    #[ignore = "needs a real libnccl.so.2"]
    fn real_nccl_accepts_the_non_blocking_config() {
        let lib = super::super::nccl_lib::get().unwrap();
        match init_comm(lib, &[0], 0, id(), Duration::from_secs(20)) {
            Ok(comm) => {
                // SAFETY: our communicator, not used again.
                unsafe { (lib.comm_destroy)(comm) };
            }
            Err(e) => {
                let msg = format!("{e:#}");
                eprintln!("{msg}");
                assert!(!msg.contains("ncclInvalidArgument"), "{msg}");
            }
        }
    }

    #[test]
    fn non_blocking_init_against_a_stub_nccl() {
        let (_dir, lib) = stub();
        let short = Duration::from_millis(200);

        // A background init that finishes.
        let comm = init_comm(&lib, &[0], 0, id(), short).unwrap();
        assert!(!comm.is_null());
        // A collective that is enqueued after a few polls.
        // SAFETY: the stub ignores the buffers and the stream.
        let code = unsafe {
            (lib.all_reduce)(
                std::ptr::null(),
                std::ptr::null_mut(),
                0,
                0,
                0,
                comm,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(code, NCCL_IN_PROGRESS);
        // SAFETY: a live stub communicator.
        let ready = unsafe { wait_ready(&lib, comm, Instant::now() + short) };
        assert_eq!(ready, Ok(()));

        // A peer that never joins: the deadline, an abort, and the peer named as a PeerFailed.
        let before = aborts(&lib);
        let started = Instant::now();
        let e = init_comm(&lib, &[3, 5], 1, id(), short).unwrap_err();
        assert!(started.elapsed() >= short && started.elapsed() < short * 10);
        assert_eq!(
            aborts(&lib),
            before + 1,
            "the half-made communicator is aborted"
        );
        let msg = format!("{e:#}");
        for needle in ["[3, 5]", "rank 5", "ranks [3]", "may not have joined"] {
            assert!(msg.contains(needle), "{needle:?} missing from {msg}");
        }
        assert_eq!(e.downcast_ref::<PeerFailed>().map(|p| p.rank), Some(3));

        // An error during the init: NCCL's code and last message, aborted, this rank's own.
        let e = init_comm(&lib, &[0, 1, 2], 0, id(), short).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("ncclSystemError") && msg.contains("connection refused"),
            "{msg}"
        );
        assert!(e.downcast_ref::<PeerFailed>().is_none(), "{msg}");
        assert_eq!(aborts(&lib), before + 2);

        // Refused at once: nothing to abort.
        let e = init_comm(&lib, &[0, 1, 2, 3], 2, id(), short).unwrap_err();
        assert!(format!("{e:#}").contains("ncclInvalidUsage"), "{e:#}");
        assert_eq!(aborts(&lib), before + 2);

        // A peer's error is the peer's.
        let e = init_comm(&lib, &[0, 1, 2, 3, 4], 0, id(), short).unwrap_err();
        assert_eq!(
            e.downcast_ref::<PeerFailed>().map(|p| p.rank),
            Some(1),
            "{e:#}"
        );
    }
}
