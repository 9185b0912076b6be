//! What a collective costs: ring algorithms over a link with a bus bandwidth and a latency per
//! hop, and which link a group of ranks runs at (inside one node, or across nodes).
//!
//! Ring costs per rank for an array of S bytes (S = the full gathered array, the nccl-tests
//! convention, so a bandwidth here is nccl-tests' "busbw"), n ranks, bus bandwidth B and hop
//! latency a:
//! - all-gather and reduce-scatter: (n-1)/n * S / B + (n-1) * a
//! - all-reduce (a reduce-scatter then an all-gather): 2(n-1)/n * S / B + 2(n-1) * a

use serde::Serialize;

/// One kind of link between GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Link {
    /// Bus bandwidth a ring achieves over it, GB/s (1e9 bytes per second).
    pub bus_gb_per_s: f64,
    /// Latency of one ring step, microseconds.
    pub hop_latency_us: f64,
}

/// How GPUs are connected: `gpus_per_node` GPUs per node on the intra-node link, nodes on the
/// inter-node link. Ranks are numbered node by node (ranks 0..G-1 on node 0, ...), as launchers do.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Topology {
    pub gpus_per_node: usize,
    pub intra: Link,
    pub inter: Link,
}

impl Topology {
    /// Whether `ranks` live on more than one node.
    pub fn spans_nodes(&self, ranks: &[usize]) -> bool {
        let node = |r: &usize| r / self.gpus_per_node;
        match ranks.first() {
            Some(first) => ranks.iter().any(|r| node(r) != node(first)),
            None => false,
        }
    }

    /// The link a collective over every group of `groups` (running at once, in lockstep) runs at:
    /// the inter-node link as soon as one group's ring crosses nodes, since a ring goes at the
    /// pace of its slowest hop and the step waits for the slowest group.
    pub fn link_for(&self, groups: &[Vec<usize>]) -> Link {
        if groups.iter().any(|g| self.spans_nodes(g)) {
            self.inter
        } else {
            self.intra
        }
    }
}

/// Seconds for `passes` ring passes over `ranks` ranks moving `bytes` (see the module doc).
fn ring_seconds(bytes: f64, ranks: usize, passes: f64, link: Link) -> f64 {
    if ranks <= 1 {
        return 0.0;
    }
    let n = ranks as f64;
    let transfer = (n - 1.0) / n * bytes / (link.bus_gb_per_s * 1e9);
    let latency = (n - 1.0) * link.hop_latency_us * 1e-6;
    passes * (transfer + latency)
}

/// Seconds to all-gather an array of `bytes` (gathered size) over `ranks` ranks.
pub fn all_gather_seconds(bytes: f64, ranks: usize, link: Link) -> f64 {
    ring_seconds(bytes, ranks, 1.0, link)
}

/// Seconds to reduce-scatter an array of `bytes` (full size) over `ranks` ranks.
pub fn reduce_scatter_seconds(bytes: f64, ranks: usize, link: Link) -> f64 {
    ring_seconds(bytes, ranks, 1.0, link)
}

/// Seconds to all-reduce an array of `bytes` over `ranks` ranks.
pub fn all_reduce_seconds(bytes: f64, ranks: usize, link: Link) -> f64 {
    ring_seconds(bytes, ranks, 2.0, link)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NVLINK: Link = Link {
        bus_gb_per_s: 400.0,
        hop_latency_us: 2.0,
    };
    const IB: Link = Link {
        bus_gb_per_s: 50.0,
        hop_latency_us: 5.0,
    };

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 + 1e-9 * b.abs()
    }

    #[test]
    fn ring_costs_match_hand_computed_numbers() {
        // 8 ranks, 1 GB over 400 GB/s: 7/8 * 1e9 / 400e9 = 2.1875 ms, + 7 hops x 2 µs = 14 µs.
        assert!(close(all_gather_seconds(1e9, 8, NVLINK), 2.1875e-3 + 14e-6));
        assert!(close(
            reduce_scatter_seconds(1e9, 8, NVLINK),
            2.1875e-3 + 14e-6
        ));
        // All-reduce is two passes: 4.375 ms + 28 µs.
        assert!(close(all_reduce_seconds(1e9, 8, NVLINK), 4.375e-3 + 28e-6));
        // 2 ranks over 50 GB/s, 100 MB: 1/2 * 1e8 / 50e9 = 1 ms, + 1 hop x 5 µs.
        assert!(close(all_gather_seconds(1e8, 2, IB), 1e-3 + 5e-6));
        assert!(close(all_reduce_seconds(1e8, 2, IB), 2e-3 + 10e-6));
        // One rank moves nothing.
        assert_eq!(all_reduce_seconds(1e9, 1, IB), 0.0);
    }

    #[test]
    fn groups_inside_a_node_use_the_intra_node_link_and_spanning_groups_the_inter_node_one() {
        let t = Topology {
            gpus_per_node: 8,
            intra: NVLINK,
            inter: IB,
        };
        assert!(!t.spans_nodes(&[0, 1, 2, 3, 4, 5, 6, 7]));
        assert!(t.spans_nodes(&[6, 7, 8, 9]));
        assert!(t.spans_nodes(&[0, 8]));
        assert!(!t.spans_nodes(&[]));
        assert_eq!(t.link_for(&[(0..8).collect(), (8..16).collect()]), NVLINK);
        assert_eq!(t.link_for(&[(0..16).collect()]), IB);
        // Replica groups of hybrid sharding with node-sized shard groups: one rank per node.
        assert_eq!(t.link_for(&[vec![0, 8], vec![1, 9]]), IB);
        // Groups of 4 inside nodes of 8: intra; groups of 12 straddle a node boundary: inter.
        assert_eq!(t.link_for(&[(0..4).collect(), (4..8).collect()]), NVLINK);
        assert_eq!(t.link_for(&[(0..12).collect(), (12..24).collect()]), IB);
    }
}
