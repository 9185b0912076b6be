//! Memory this process may still take from the host: `MemAvailable` of `/proc/meminfo`, lowered
//! to what the cgroup's `memory.max` leaves above its `memory.current` when a limit is set (a
//! container's limit is the one the kernel enforces, by killing the process).

use std::path::Path;

/// Bytes the host can still give this process, and where the figure comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMemory {
    pub available: u64,
    /// "MemAvailable" or "the cgroup's memory.max".
    pub source: &'static str,
}

/// Reads the figures of this machine; `None` when `/proc/meminfo` cannot be read or parsed (not
/// Linux): nothing is then known to refuse on.
pub fn host_memory() -> Option<HostMemory> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let cgroup = cgroup_headroom(Path::new("/sys/fs/cgroup"));
    combine(mem_available(&meminfo)?, cgroup)
}

/// The lower of the two limits, named.
fn combine(mem_available: u64, cgroup: Option<u64>) -> Option<HostMemory> {
    Some(match cgroup {
        Some(left) if left < mem_available => HostMemory {
            available: left,
            source: "the cgroup's memory.max",
        },
        _ => HostMemory {
            available: mem_available,
            source: "MemAvailable",
        },
    })
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        None => Some(value),
        Some(_) => None,
    }
}

/// What the cgroup v2 limit under `root` still allows: `memory.max - memory.current`; `None`
/// without a limit ("max") or a readable cgroup.
fn cgroup_headroom(root: &Path) -> Option<u64> {
    let read = |name: &str| std::fs::read_to_string(root.join(name)).ok();
    let max = read("memory.max")?;
    let max: u64 = max.trim().parse().ok()?; // "max" means no limit
    let current: u64 = read("memory.current")
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or(0);
    Some(max.saturating_sub(current))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       32000000 kB\nMemFree:  1000 kB\nMemAvailable:   22347776 kB\n";
        assert_eq!(mem_available(text), Some(22_347_776 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots kB\n"), None);
    }

    #[test]
    fn a_cgroup_limit_lowers_what_is_available() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(cgroup_headroom(dir.path()), None, "no cgroup files");
        std::fs::write(dir.path().join("memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_headroom(dir.path()), None, "no limit");
        std::fs::write(dir.path().join("memory.max"), "1073741824\n").unwrap();
        std::fs::write(dir.path().join("memory.current"), "73741824\n").unwrap();
        assert_eq!(cgroup_headroom(dir.path()), Some(1_000_000_000));
        let limited = combine(8 << 30, Some(1_000_000_000)).unwrap();
        assert_eq!(limited.available, 1_000_000_000);
        assert_eq!(limited.source, "the cgroup's memory.max");
        assert_eq!(combine(8 << 30, None).unwrap().source, "MemAvailable");
        assert_eq!(combine(1 << 20, Some(1 << 30)).unwrap().available, 1 << 20);
    }
}
