//! Ranks end with their launcher, deliberately and through the normal stop path.
//!
//! `shardtrain launch` starts each rank with a parent-death signal (`PR_SET_PDEATHSIG`): when the
//! launcher dies, even by `kill -9`, the kernel sends every rank SIGHUP, which a training rank
//! takes as "finish at the next micro-batch, checkpoint, exit 0" like a Ctrl-C. Without it the
//! ranks ended only by accident: their next write to the output pipe the launcher no longer read
//! failed (and Rust's print macros panic on that), mid-step, with no checkpoint.
//!
//! Why SIGHUP and not SIGTERM: the kernel sends the parent-death signal each time the child is
//! handed from an exiting thread of the launcher to the next, so a launcher with several threads
//! sends it several times as it dies; a second SIGTERM means "quit at once" (exit 130, no
//! checkpoint), while repeated SIGHUPs are one request (see `train::stop_on_hangup`).
//!
//! The same pipes are still without a reader while the stop path runs, so a rank that sees its
//! launcher gone points its standard output and error at `/dev/null` from the SIGHUP handler:
//! the stop path's messages are lost (nobody is left to read them), its checkpoint is not.
//!
//! Linux only: the kernel interface is Linux's. The signal is tied to the thread that spawned the
//! child, so the launcher spawns its ranks from its main thread, which lives as long as the job.

use std::process::Command;

use anyhow::{Context, Result};

/// The launcher's pid, as the ranks see it: a rank whose parent is no longer this pid has lost
/// its launcher.
pub const LAUNCHER_PID_VAR: &str = "SHARDTRAIN_LAUNCHER_PID";

/// Launcher side: `cmd`'s process gets SIGHUP when the calling thread's process dies.
pub fn tie_to_launcher(cmd: &mut Command) {
    let launcher = std::process::id() as libc::pid_t;
    cmd.env(LAUNCHER_PID_VAR, launcher.to_string());
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec the closure calls only prctl and getppid, both
        // async-signal-safe, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGHUP as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The launcher may have died between fork and prctl: then no signal will come,
                // and this rank must not start at all.
                if libc::getppid() != launcher {
                    return Err(std::io::Error::other("the launcher exited"));
                }
                Ok(())
            });
        }
    }
}

/// The pid of the `shardtrain launch` that started this process, if one did.
pub fn launcher_pid() -> Option<libc::pid_t> {
    std::env::var(LAUNCHER_PID_VAR).ok()?.parse().ok()
}

/// Rank side, for a process `shardtrain launch` started (with SIGHUP taken as a stop request,
/// `train::stop_on_hangup`): a SIGHUP that finds the launcher gone also sends further output to
/// `/dev/null`.
pub fn quiet_output_when_orphaned() -> Result<()> {
    let Some(launcher) = launcher_pid() else {
        return Ok(());
    };
    // SAFETY: the handler calls only getppid, open, dup2 and close, all async-signal-safe.
    unsafe {
        signal_hook::low_level::register(signal_hook::consts::SIGHUP, move || {
            if libc::getppid() != launcher {
                let fd = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
                if fd >= 0 {
                    libc::dup2(fd, libc::STDOUT_FILENO);
                    libc::dup2(fd, libc::STDERR_FILENO);
                    libc::close(fd);
                }
            }
        })
    }
    .context("installing the handler for the launcher's death")?;
    Ok(())
}
