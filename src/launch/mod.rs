//! Multi-process jobs: where a process learns its rank (`env`), the secret the ranks of a job
//! share (`token`), how the ranks find each other ([`join`]: the rendezvous, then the TCP mesh,
//! both authenticated with the token), and `shardtrain launch` (`supervise`), whose ranks end
//! with it (`parent`) and tell it which rank made them fail (`status`).

pub mod env;
pub mod parent;
pub mod status;
pub mod supervise;
pub mod token;

use std::net::{TcpListener, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::comm::auth::Key;
use crate::comm::rendezvous::{rendezvous, RendezvousConfig};
use crate::comm::tcp::TcpWorld;
use env::RankEnv;

/// The GPU this process uses: the slot `shardtrain launch` gave it (it skips slots of ranks it
/// dropped after failures, `--min-nproc`), else its local rank.
pub fn device_ordinal(env: &RankEnv) -> usize {
    std::env::var("SHARDTRAIN_DEVICE_ORDINAL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(env.local_rank)
}

/// This process, joined to its job.
pub struct Joined {
    /// The connections to every other rank.
    pub world: Arc<TcpWorld>,
    /// What rank 0 handed out at the rendezvous.
    pub payload: Vec<u8>,
}

/// The local address other hosts reach this one by: the one the route to the master uses.
fn local_ip_towards(master: &str, port: u16) -> Result<std::net::IpAddr> {
    let probe = UdpSocket::bind("0.0.0.0:0").context("opening a UDP socket")?;
    probe
        .connect((master, port))
        .with_context(|| format!("finding a route to MASTER_ADDR {master}"))?;
    Ok(probe.local_addr()?.ip())
}

/// Joins the job `env` describes: opens this rank's data port, meets the others at the
/// rendezvous (rank 0 hands out `payload`), and connects the mesh. Every step has `timeout`; with
/// a job token (`key`, see [`token::for_rank`]) every connection is authenticated first.
pub fn join(env: &RankEnv, key: Option<&Key>, payload: &[u8], timeout: Duration) -> Result<Joined> {
    let ip = local_ip_towards(&env.master_addr, env.master_port)?;
    let listener = TcpListener::bind((ip, 0))
        .with_context(|| format!("rank {}: opening a data port on {ip}", env.rank))?;
    let data_addr = listener.local_addr()?.to_string();
    let cfg = RendezvousConfig {
        master_addr: env.master_addr.clone(),
        master_port: env.master_port,
        rank: env.rank,
        world_size: env.world_size,
        run_id: env.run_id.clone(),
        timeout,
        key: key.cloned(),
    };
    let members = rendezvous(&cfg, &data_addr, payload)?;
    let world = TcpWorld::connect(env.rank, &members.addrs, listener, timeout, key)?;
    Ok(Joined {
        world: Arc::new(world),
        payload: members.payload,
    })
}
