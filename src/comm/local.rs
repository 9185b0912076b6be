//! The `local` transport: ranks are threads of one process sharing one address space (CPU threads
//! today, threads sharing one GPU later). Each rank reads its peers' buffers directly with the
//! Backend's ops; a mutex and condvar per group order the two phases of every collective.
//!
//! A collective on one rank: record an event after the work issued so far (its inputs are ready
//! for the peers), *arrive* (deposit handles to its buffers, the event and a signature, wait for
//! every rank), check that the ranks agree, then on its comm lane wait for every rank's event and
//! do its own share of the work reading the peers' deposited buffers, record a *done* event, and
//! *depart* (deposit it, wait for every rank). The caller's later work waits for every rank's done
//! event ([`Pending::wait`]), so no rank overwrites an input a peer still reads, and nobody reads an
//! output before it is written; the host never blocks on the device. On the CPU, events are empty
//! and every op has finished when it returns, so this is a plain two-phase rendezvous. A phase ends
//! when the last rank of the group arrives; waiting ranks watch a generation counter, so
//! consecutive collectives cannot mix. Every wait has a deadline, and every
//! wait also ends as soon as the world records a failure ([`LocalWorld::fail`]: [`run_ranks`] calls
//! it for a rank's error or panic, a collective for a device error or for the ranks it timed out
//! waiting for).

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use super::{all_gather_problem, reduce_scatter_problem, Communicator, Pending, ReduceOp};
use crate::backend::{Backend, Buffer};

/// Locks `m`, ignoring poisoning: no code here panics while holding a lock, and a failed rank is
/// reported through the world's failure record instead.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A rank's failure, as recorded by [`LocalWorld::fail`].
#[derive(Clone, Debug)]
struct Failure {
    rank: usize,
    reason: String,
}

/// What every group of one job shares.
struct WorldShared {
    size: usize,
    timeout: Duration,
    /// Every failure recorded, in order: the first is the root cause.
    failures: Mutex<Vec<Failure>>,
    /// The groups to wake when a rank fails.
    groups: Mutex<Vec<Weak<Group>>>,
}

impl WorldShared {
    fn first_failure(&self) -> Option<Failure> {
        lock(&self.failures).first().cloned()
    }

    fn fail(&self, rank: usize, reason: &str) {
        lock(&self.failures).push(Failure {
            rank,
            reason: reason.to_string(),
        });
        let groups: Vec<Arc<Group>> = lock(&self.groups)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for group in groups {
            // Taking the group's lock before notifying means no waiter is between its check of the
            // failure record and its wait: the wake-up cannot be lost.
            let _state = lock(&group.state);
            group.changed.notify_all();
        }
    }
}

/// The shared failure state of all groups of one job (cheap to clone: a handle).
///
/// A world serves one job: a failure is permanent, and every later collective of every group fails.
#[derive(Clone)]
pub struct LocalWorld {
    shared: Arc<WorldShared>,
}

impl LocalWorld {
    /// A world of `world_size` ranks whose collectives give up after waiting `timeout` in any one
    /// phase.
    ///
    /// # Panics
    /// If `world_size` is 0.
    pub fn new(world_size: usize, timeout: Duration) -> Self {
        assert!(
            world_size > 0,
            "LocalWorld::new: world_size must be at least 1"
        );
        LocalWorld {
            shared: Arc::new(WorldShared {
                size: world_size,
                timeout,
                failures: Mutex::new(Vec::new()),
                groups: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Number of ranks in the job.
    pub fn world_size(&self) -> usize {
        self.shared.size
    }

    /// How long a collective waits in one phase before it gives up.
    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    /// Communicators for one group of global ranks; element `i` belongs to the thread running
    /// global rank `ranks[i]` (its group rank is `i`). Groups may overlap across calls (a rank can
    /// be in a shard group and a replica group); each group orders its own collectives.
    ///
    /// # Panics
    /// If `ranks` is empty, repeats a rank, or names a rank outside the world.
    pub fn group(&self, ranks: &[usize]) -> Vec<LocalComm> {
        assert!(
            !ranks.is_empty(),
            "LocalWorld::group: a group needs at least one rank"
        );
        for (i, &r) in ranks.iter().enumerate() {
            assert!(
                r < self.shared.size,
                "LocalWorld::group: rank {r} is outside the world of {} ranks",
                self.shared.size
            );
            assert!(
                !ranks[..i].contains(&r),
                "LocalWorld::group: rank {r} appears twice in {ranks:?}"
            );
        }
        let n = ranks.len();
        let group = Arc::new(Group {
            world: self.shared.clone(),
            ranks: ranks.to_vec(),
            state: Mutex::new(State {
                generation: 0,
                seq: 0,
                arrived: vec![false; n],
                count: 0,
                deposits: [vec![None; n], vec![None; n]],
            }),
            changed: Condvar::new(),
        });
        {
            let mut groups = lock(&self.shared.groups);
            groups.retain(|g| g.strong_count() > 0);
            groups.push(Arc::downgrade(&group));
        }
        (0..n)
            .map(|me| LocalComm {
                group: group.clone(),
                me,
            })
            .collect()
    }

    /// Marks global rank `rank` failed: every pending and later collective of every group returns
    /// an error naming it and `reason`. The first failure recorded is the job's root cause.
    pub fn fail(&self, rank: usize, reason: &str) {
        self.shared.fail(rank, reason);
    }

    /// The first failure recorded (the root cause), as `(global rank, reason)`, if any.
    pub fn failure(&self) -> Option<(usize, String)> {
        self.shared.first_failure().map(|f| (f.rank, f.reason))
    }
}

/// What one rank hands its peers in one phase of a collective.
struct Deposit {
    /// The collective and its operands' lengths and dtypes, e.g. `all_reduce(buf: 7 x f32, sum)`;
    /// every rank's must be equal (arrival only).
    signature: String,
    /// A problem with this rank's own arguments (reported on every rank).
    problem: Option<String>,
    /// Name of the buffer type, for the message when ranks use different backends.
    buf_type: &'static str,
    /// On arrival, clones of the handles of the buffers the peers read and the event after which
    /// they are ready: a `(Vec<B::Buf>, B::Event)`; on departure, the done event `B::Event`
    /// (type-erased because the group is not generic over the backend).
    payload: Box<dyn Any + Send + Sync>,
}

impl Deposit {
    /// A departure's deposit.
    fn departure(payload: Box<dyn Any + Send + Sync>) -> Deposit {
        Deposit {
            signature: String::new(),
            problem: None,
            buf_type: "",
            payload,
        }
    }
}

/// What a rank deposits on arrival at a data-moving collective: its buffers and the event after
/// which they are ready.
type Arrival<B> = (Vec<<B as Backend>::Buf>, <B as Backend>::Event);

/// The synchronisation state of one group.
struct State {
    /// Number of phases completed so far (each collective has two).
    generation: u64,
    /// Sequence number of the collective in progress (number of collectives completed).
    seq: u64,
    /// Which group ranks have arrived in the current phase.
    arrived: Vec<bool>,
    /// How many group ranks have arrived in the current phase.
    count: usize,
    /// Each group rank's deposit of the last two phases, by generation parity. A phase's deposits
    /// are cleared when the phase after it completes: by then every rank has read them.
    deposits: [Vec<Option<Arc<Deposit>>>; 2],
}

/// One group of ranks: its members and the state its collectives synchronise on.
struct Group {
    world: Arc<WorldShared>,
    /// Global ranks, in group-rank order.
    ranks: Vec<usize>,
    state: Mutex<State>,
    /// Signalled when a phase completes and when the world records a failure.
    changed: Condvar,
}

impl Group {
    fn label(&self, op: &str, seq: u64) -> String {
        format!("{op} #{seq} on ranks {:?}", self.ranks)
    }

    fn check_world(&self, label: &str) -> Result<()> {
        match self.world.first_failure() {
            Some(f) => bail!("{label}: rank {} failed: {}", f.rank, f.reason),
            None => Ok(()),
        }
    }

    /// One phase of collective `op` for group rank `me`: arrival, or departure when `departing`
    /// (the last rank to depart completes the collective). Every rank deposits; returns every
    /// rank's deposit of this phase, in group-rank order, and the collective's sequence number.
    fn phase(
        &self,
        me: usize,
        op: &str,
        deposit: Deposit,
        departing: bool,
    ) -> Result<(u64, Vec<Arc<Deposit>>)> {
        let arriving = !departing;
        let timeout = self.world.timeout;
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        let seq = st.seq;
        let label = self.label(op, seq);
        self.check_world(&label)?;
        if st.arrived[me] {
            bail!(
                "{label}: rank {} is already waiting in this group (a communicator must be used \
                 by one thread at a time)",
                self.ranks[me]
            );
        }
        let generation = st.generation;
        let slot = (generation % 2) as usize;
        st.deposits[slot][me] = Some(Arc::new(deposit));
        st.arrived[me] = true;
        st.count += 1;
        if st.count == self.ranks.len() {
            st.count = 0;
            st.arrived.fill(false);
            st.generation += 1;
            // Every rank has arrived here, so every rank has read the previous phase's deposits.
            st.deposits[1 - slot].fill(None);
            if departing {
                st.seq += 1;
            }
            self.changed.notify_all();
        } else {
            while st.generation == generation {
                self.check_world(&label)?;
                let now = Instant::now();
                if now >= deadline {
                    let missing: Vec<usize> = (0..self.ranks.len())
                        .filter(|&i| !st.arrived[i])
                        .map(|i| self.ranks[i])
                        .collect();
                    drop(st);
                    let (stage, stage_missing) = if arriving {
                        ("arrive at", "arrive")
                    } else {
                        ("finish", "finish reading")
                    };
                    let me_global = self.ranks[me];
                    for &r in &missing {
                        self.world.fail(
                            r,
                            &format!(
                                "did not {stage} {label} within {timeout:?} \
                                 (rank {me_global} stopped waiting for it)"
                            ),
                        );
                    }
                    bail!(
                        "{label}: timed out after {timeout:?} on rank {me_global} waiting for \
                         ranks {missing:?} to {stage_missing}"
                    );
                }
                st = self
                    .changed
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        // This phase's deposits stay until the next phase completes, so they are all here.
        let deposits = st.deposits[slot].iter().flatten().cloned().collect();
        Ok((seq, deposits))
    }
}

/// Why the deposits of one collective cannot go together (`None` when they can), the same
/// message on every rank.
fn disagreement(group: &Group, deposits: &[Arc<Deposit>]) -> Option<String> {
    let problems: Vec<String> = deposits
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            d.problem
                .as_ref()
                .map(|p| format!("rank {}: {p}", group.ranks[i]))
        })
        .collect();
    if !problems.is_empty() {
        return Some(problems.join("; "));
    }
    let first = &deposits[0];
    let agree = deposits
        .iter()
        .all(|d| d.signature == first.signature && d.buf_type == first.buf_type);
    if agree {
        return None;
    }
    let calls: Vec<String> = deposits
        .iter()
        .enumerate()
        .map(|(i, d)| format!("rank {}: {} [{}]", group.ranks[i], d.signature, d.buf_type))
        .collect();
    Some(format!(
        "the ranks called different collectives or gave buffers of different lengths or dtypes: {}",
        calls.join("; ")
    ))
}

/// `len x dtype` of a buffer, for signatures.
fn desc<Buf: Buffer>(b: &Buf) -> String {
    format!("{} x {}", b.len(), b.dtype())
}

/// One rank's communicator in a [`LocalWorld`] group. Used by the thread running that rank only.
pub struct LocalComm {
    group: Arc<Group>,
    /// This rank's index in the group.
    me: usize,
}

impl LocalComm {
    fn global_rank(&self) -> usize {
        self.group.ranks[self.me]
    }

    /// A device error on this rank: the rank has failed (its peers must not wait for it).
    fn device<T>(&self, label: &str, r: Result<T>) -> Result<T> {
        r.map_err(|e| {
            let e = e.context(format!(
                "{label}: device error on rank {}",
                self.global_rank()
            ));
            self.group.world.fail(self.global_rank(), &format!("{e:#}"));
            e
        })
    }

    /// Arrives with a deposit and checks that the ranks agree; on disagreement, departs (so the
    /// group stays consistent) and returns the error on every rank. Returns the collective's label
    /// and every rank's deposit.
    fn arrive(&self, op: &'static str, deposit: Deposit) -> Result<(String, Vec<Arc<Deposit>>)> {
        let (seq, deposits) = self.group.phase(self.me, op, deposit, false)?;
        let label = self.group.label(op, seq);
        if let Some(msg) = disagreement(&self.group, &deposits) {
            self.group
                .phase(self.me, op, Deposit::departure(Box::new(())), true)?;
            bail!("{label}: {msg}");
        }
        Ok((label, deposits))
    }

    /// The frame of every data-moving collective (see the module docs): arrive with handles to
    /// `bufs` and a ready event, run `work` on the comm lane over every rank's deposited buffers
    /// (in group-rank order) once every rank's inputs are ready, depart with a done event. Returns
    /// `work`'s value and the pending completion the caller must wait for.
    fn collective<B: Backend, T>(
        &self,
        be: &B,
        op: &'static str,
        signature: String,
        problem: Option<String>,
        bufs: Vec<B::Buf>,
        work: impl FnOnce(&B, &[&Vec<B::Buf>]) -> Result<T>,
    ) -> Result<(T, Pending<B>)> {
        let pre_label = format!("{op} on ranks {:?}", self.group.ranks);
        let ready = self.device(&pre_label, be.record_event())?;
        let deposit = Deposit {
            signature,
            problem,
            buf_type: std::any::type_name::<B::Buf>(),
            payload: Box::new((bufs, ready)),
        };
        let (label, deposits) = self.arrive(op, deposit)?;
        let peers: Option<Vec<&Arrival<B>>> = deposits
            .iter()
            .map(|d| d.payload.downcast_ref::<Arrival<B>>())
            .collect();
        // The buffer type names agreed, so this holds unless two types share a name.
        let peers = self.device(
            &label,
            peers.ok_or_else(|| anyhow!("the ranks' buffers are of different types")),
        )?;
        let lane = be.comm_lane();
        let result = (|| {
            for (_, ready) in &peers {
                lane.wait_event(ready)?;
            }
            let bufs: Vec<&Vec<B::Buf>> = peers.iter().map(|(b, _)| b).collect();
            let value = work(lane, &bufs)?;
            Ok((value, lane.record_event()?))
        })();
        let (value, done) = self.device(&label, result)?;
        drop(peers);
        drop(deposits);
        let (_, dones) = self
            .group
            .phase(self.me, op, Deposit::departure(Box::new(done)), true)?;
        let events: Option<Vec<B::Event>> = dones
            .iter()
            .map(|d| d.payload.downcast_ref::<B::Event>().cloned())
            .collect();
        let events = self.device(
            &label,
            events.ok_or_else(|| anyhow!("the ranks' events are of different types")),
        )?;
        Ok((value, Pending::after(events)))
    }

    /// Waits (device-side) for a collective this rank has just run.
    fn finish<B: Backend, T>(&self, be: &B, op: &str, started: (T, Pending<B>)) -> Result<T> {
        let (value, pending) = started;
        let label = format!("{op} on ranks {:?}", self.group.ranks);
        self.device(&label, pending.wait(be))?;
        Ok(value)
    }
}

/// Sums piece `pieces[i]` of every rank's buffers into `dst` in rank order: copy the first, then
/// accumulate the others (each partial sum stored in `dst`'s dtype); Avg scales by `1 / world`.
fn reduce_into<B: Backend>(be: &B, dst: &B::Buf, pieces: &[B::Buf], op: ReduceOp) -> Result<()> {
    be.copy(dst, &pieces[0])?;
    for p in &pieces[1..] {
        be.accumulate(dst, p)?;
    }
    if op == ReduceOp::Avg {
        be.scale(dst, 1.0 / pieces.len() as f32)?;
    }
    Ok(())
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.me
    }

    fn world_size(&self) -> usize {
        self.group.ranks.len()
    }

    fn ranks(&self) -> &[usize] {
        &self.group.ranks
    }

    fn all_gather<B: Backend>(&self, be: &B, out: &B::Buf, shard: &B::Buf) -> Result<()> {
        let pending = self.all_gather_start(be, out, shard)?;
        self.finish(be, "all_gather", ((), pending))
    }

    fn all_gather_start<B: Backend>(
        &self,
        be: &B,
        out: &B::Buf,
        shard: &B::Buf,
    ) -> Result<Pending<B>> {
        let world = self.world_size();
        let n = shard.len();
        let signature = format!("all_gather(out: {}, shard: {})", desc(out), desc(shard));
        let problem = all_gather_problem(out.len(), n, world);
        let ((), pending) = self.collective(
            be,
            "all_gather",
            signature,
            problem,
            vec![shard.clone()],
            |lane, peers| {
                for (i, p) in peers.iter().enumerate() {
                    lane.copy(&lane.slice(out, i * n, n)?, &p[0])?;
                }
                Ok(())
            },
        )?;
        Ok(pending)
    }

    fn reduce_scatter<B: Backend>(
        &self,
        be: &B,
        out: &B::Buf,
        full: &B::Buf,
        op: ReduceOp,
    ) -> Result<()> {
        let pending = self.reduce_scatter_start(be, out, full, op)?;
        self.finish(be, "reduce_scatter", ((), pending))
    }

    fn reduce_scatter_start<B: Backend>(
        &self,
        be: &B,
        out: &B::Buf,
        full: &B::Buf,
        op: ReduceOp,
    ) -> Result<Pending<B>> {
        let world = self.world_size();
        let n = out.len();
        let signature = format!(
            "reduce_scatter(out: {}, full: {}, {op})",
            desc(out),
            desc(full)
        );
        let problem = reduce_scatter_problem(full.len(), n, world);
        let me = self.me;
        let ((), pending) = self.collective(
            be,
            "reduce_scatter",
            signature,
            problem,
            vec![full.clone()],
            |lane, peers| {
                let pieces = peers
                    .iter()
                    .map(|p| lane.slice(&p[0], me * n, n))
                    .collect::<Result<Vec<_>>>()?;
                reduce_into(lane, out, &pieces, op)
            },
        )?;
        Ok(pending)
    }

    fn all_reduce<B: Backend>(&self, be: &B, buf: &B::Buf, op: ReduceOp) -> Result<()> {
        // As a ring does it: a reduce-scatter, then an all-gather, inside one collective. Each
        // rank sums only its 1/N of the array (N times less work than every rank summing all of
        // it) into a piece of its own; once every rank has (a barrier on the comm lane's events),
        // each copies every rank's piece into its `buf`. Every element is still summed in rank
        // order, so the bits equal those of summing the whole array on one rank.
        let world = self.world_size();
        let signature = format!("all_reduce(buf: {}, {op})", desc(buf));
        let label = format!("all_reduce on ranks {:?}", self.group.ranks);
        let len = buf.len();
        let chunk = len.div_ceil(world).max(1);
        let part = |k: usize| {
            let start = (k * chunk).min(len);
            (start, chunk.min(len - start))
        };
        let piece = self.device(&label, be.alloc(chunk, buf.dtype()))?;
        let me = self.me;
        let started = self.collective(
            be,
            "all_reduce",
            signature,
            None,
            vec![buf.clone(), piece.clone()],
            |lane, peers| {
                let (start, n) = part(me);
                if n > 0 {
                    let parts = peers
                        .iter()
                        .map(|p| lane.slice(&p[0], start, n))
                        .collect::<Result<Vec<_>>>()?;
                    reduce_into(lane, &lane.slice(&piece, 0, n)?, &parts, op)?;
                }
                // Every rank has summed its part, and so has finished reading every `buf`.
                let summed = lane.record_event()?;
                let (_, marks) = self.group.phase(
                    me,
                    "all_reduce",
                    Deposit::departure(Box::new(summed)),
                    false,
                )?;
                for mark in &marks {
                    let event = mark
                        .payload
                        .downcast_ref::<B::Event>()
                        .ok_or_else(|| anyhow!("the ranks' events are of different types"))?;
                    lane.wait_event(event)?;
                }
                for (k, p) in peers.iter().enumerate() {
                    let (start, n) = part(k);
                    if n > 0 {
                        lane.copy(&lane.slice(buf, start, n)?, &lane.slice(&p[1], 0, n)?)?;
                    }
                }
                Ok(())
            },
        )?;
        self.finish(be, "all_reduce", started)
    }

    fn broadcast<B: Backend>(&self, be: &B, buf: &B::Buf, root: usize) -> Result<()> {
        let world = self.world_size();
        let signature = format!("broadcast(buf: {}, root {root})", desc(buf));
        let problem = (root >= world)
            .then(|| format!("broadcast: root {root} is not a group rank (the group has {world})"));
        let me = self.me;
        let started = self.collective(
            be,
            "broadcast",
            signature,
            problem,
            vec![buf.clone()],
            |lane, peers| {
                if me != root {
                    lane.copy(buf, &peers[root][0])?;
                }
                Ok(())
            },
        )?;
        self.finish(be, "broadcast", started)
    }

    fn barrier(&self) -> Result<()> {
        let deposit = Deposit {
            signature: "barrier()".to_string(),
            problem: None,
            buf_type: "none",
            payload: Box::new(()),
        };
        self.arrive("barrier", deposit)?;
        self.group
            .phase(self.me, "barrier", Deposit::departure(Box::new(())), true)?;
        Ok(())
    }
}

/// The text of a panic payload.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-text payload".to_string()
    }
}

/// Runs `f(rank, &world)` on one scoped thread per rank (named `rank-<i>`); an `Err` or a panic
/// in a rank calls `world.fail(rank, message)` at once, so its peers stop waiting. Returns every
/// rank's value in rank order, or an error naming the first rank that failed (the root cause:
/// the first failure the world recorded, not the ranks that merely saw it), with its reason.
pub fn run_ranks<T: Send>(
    world: &LocalWorld,
    f: impl Fn(usize, &LocalWorld) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let f = &f;
    let results: Vec<Result<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world.world_size())
            .map(|rank| {
                let body = move || match catch_unwind(AssertUnwindSafe(|| f(rank, world))) {
                    Ok(Ok(value)) => Ok(value),
                    Ok(Err(e)) => {
                        world.fail(rank, &format!("{e:#}"));
                        Err(e)
                    }
                    Err(payload) => {
                        let msg = format!("panicked: {}", panic_message(payload.as_ref()));
                        world.fail(rank, &msg);
                        Err(anyhow!(msg))
                    }
                };
                let spawned = std::thread::Builder::new()
                    .name(format!("rank-{rank}"))
                    .spawn_scoped(s, body);
                spawned.map_err(|e| {
                    let msg = format!("could not start its thread: {e}");
                    world.fail(rank, &msg);
                    anyhow!(msg)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.and_then(|h| {
                    h.join()
                        .unwrap_or_else(|p| Err(anyhow!("panicked: {}", panic_message(p.as_ref()))))
                })
            })
            .collect()
    });
    let failed: Vec<usize> = (0..results.len())
        .filter(|&r| results[r].is_err())
        .collect();
    // Every failed rank was recorded in the world, so there is a root cause when one failed.
    let root_cause = if failed.is_empty() {
        None
    } else {
        world.failure()
    };
    let Some((root, reason)) = root_cause else {
        return results.into_iter().collect();
    };
    let others: Vec<usize> = failed.into_iter().filter(|&r| r != root).collect();
    if others.is_empty() {
        bail!("rank {root} failed: {reason}");
    }
    bail!("rank {root} failed: {reason} (then ranks {others:?} failed too)")
}
