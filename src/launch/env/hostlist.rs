//! Slurm hostlists (`SLURM_JOB_NODELIST`): `node[01-03,07],gpu5` and its kin, expanded in order.

/// Most hosts [`expand_hostlist`] will produce, so a typo like `n[0-999999999]` is an error rather
/// than gigabytes of names.
pub(super) const MAX_HOSTS: usize = 1 << 20;

/// Expands a Slurm hostlist (SLURM_JOB_NODELIST) and returns its hosts in order:
/// `"node[01-03,07],gpu5"` -> `["node01","node02","node03","node07","gpu5"]`; also `"a,b"`,
/// `"n[1-2]-ib"`, `"host"` plain, zero-padded ranges keep width. Errors on malformed input.
///
/// A host may hold several bracket groups (`"r[1-2]n[1-2]"`): the leftmost varies slowest, as in
/// Slurm. A range's numbers are padded to the width of its first number (`"[08-10]"` -> `08 09
/// 10`, `"[8-10]"` -> `8 9 10`). Unbalanced or nested brackets, empty hosts or ranges, non-digits
/// inside brackets, backwards ranges and lists of more than 2^20 hosts are errors.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>, String> {
    let list = list.trim();
    if list.is_empty() {
        return Err("the hostlist is empty".into());
    }
    let mut hosts = Vec::new();
    for item in split_top_level(list)? {
        if item.is_empty() {
            return Err(format!("hostlist {list:?} has an empty host name"));
        }
        expand_host(item, &mut hosts).map_err(|e| format!("hostlist {list:?}: {e}"))?;
    }
    Ok(hosts)
}

/// Splits on the commas outside brackets, checking the brackets pair up and do not nest.
fn split_top_level(list: &str) -> Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let mut start = 0;
    let mut open = false;
    for (i, c) in list.char_indices() {
        match c {
            '[' if open => return Err(format!("hostlist {list:?} nests brackets")),
            '[' => open = true,
            ']' if !open => return Err(format!("hostlist {list:?} has a ']' without its '['")),
            ']' => open = false,
            ',' if !open => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            c if c.is_whitespace() => {
                return Err(format!("hostlist {list:?} has a space in a host name"))
            }
            _ => {}
        }
    }
    if open {
        return Err(format!("hostlist {list:?} has a '[' that is never closed"));
    }
    items.push(&list[start..]);
    Ok(items)
}

/// One part of a host pattern: literal text, or the numbers of one bracket group.
enum Part<'a> {
    Text(&'a str),
    Numbers(Vec<String>),
}

/// Appends the hosts of one pattern (`"n[1-2]-ib"`) to `hosts`.
fn expand_host(item: &str, hosts: &mut Vec<String>) -> Result<(), String> {
    let mut parts = Vec::new();
    let mut rest = item;
    let mut total: usize = 1;
    while let Some(open) = rest.find('[') {
        if open > 0 {
            parts.push(Part::Text(&rest[..open]));
        }
        // split_top_level checked every '[' has its ']'.
        let close = open + rest[open..].find(']').ok_or("unclosed '['")?;
        let numbers = expand_ranges(&rest[open + 1..close])?;
        total = total
            .checked_mul(numbers.len())
            .filter(|&t| t <= MAX_HOSTS)
            .ok_or_else(|| format!("{item:?} names more than {MAX_HOSTS} hosts"))?;
        parts.push(Part::Numbers(numbers));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest));
    }
    if hosts.len() + total > MAX_HOSTS {
        return Err(format!("more than {MAX_HOSTS} hosts"));
    }
    let mut names = vec![String::new()];
    for part in &parts {
        names = match part {
            Part::Text(text) => names.into_iter().map(|n| n + text).collect(),
            Part::Numbers(numbers) => names
                .iter()
                .flat_map(|n| numbers.iter().map(move |num| format!("{n}{num}")))
                .collect(),
        };
    }
    hosts.extend(names);
    Ok(())
}

/// The inside of one bracket group: `"01-03,07"` -> `["01","02","03","07"]`.
fn expand_ranges(ranges: &str) -> Result<Vec<String>, String> {
    if ranges.is_empty() {
        return Err("empty brackets \"[]\"".into());
    }
    let mut numbers = Vec::new();
    for range in ranges.split(',') {
        let (lo_text, hi_text) = range.split_once('-').unwrap_or((range, range));
        let number = |text: &str| -> Result<u64, String> {
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("range {range:?} is not N or N-M"));
            }
            text.parse()
                .map_err(|_| format!("range {range:?} has a number too large"))
        };
        let (lo, hi) = (number(lo_text)?, number(hi_text)?);
        if lo > hi {
            return Err(format!("range {range:?} runs backwards"));
        }
        if hi - lo >= (MAX_HOSTS - numbers.len()) as u64 {
            return Err(format!("range {range:?} names more than {MAX_HOSTS} hosts"));
        }
        let width = lo_text.len();
        numbers.extend((lo..=hi).map(|n| format!("{n:0width$}")));
    }
    Ok(numbers)
}

#[cfg(test)]
mod tests {
    use super::expand_hostlist;

    fn hosts(list: &str) -> Vec<String> {
        expand_hostlist(list).unwrap_or_else(|e| panic!("{list}: {e}"))
    }

    #[test]
    fn hostlist_expansion() {
        assert_eq!(
            hosts("node[01-03,07],gpu5"),
            ["node01", "node02", "node03", "node07", "gpu5"]
        );
        assert_eq!(hosts("host"), ["host"]);
        assert_eq!(hosts(" host \n"), ["host"]);
        assert_eq!(hosts("a,b"), ["a", "b"]);
        assert_eq!(hosts("n[1-2]-ib"), ["n1-ib", "n2-ib"]);
        assert_eq!(hosts("n[1-2]-ib,m7"), ["n1-ib", "n2-ib", "m7"]);
        // Zero padding keeps the first number's width, also across a power of ten.
        assert_eq!(hosts("n[08-11]"), ["n08", "n09", "n10", "n11"]);
        assert_eq!(hosts("n[098-101]"), ["n098", "n099", "n100", "n101"]);
        assert_eq!(hosts("n[8-10]"), ["n8", "n9", "n10"]);
        assert_eq!(hosts("n[007]"), ["n007"]);
        // Several ranges and singles in one group, and commas inside brackets.
        assert_eq!(hosts("x[1-2,5,7-8]"), ["x1", "x2", "x5", "x7", "x8"]);
        assert_eq!(hosts("a[1,3],b[2-3],c"), ["a1", "a3", "b2", "b3", "c"]);
        // Several groups in one name: the leftmost varies slowest.
        assert_eq!(hosts("r[1-2]n[1-2]"), ["r1n1", "r1n2", "r2n1", "r2n2"]);
        assert_eq!(hosts("[1-2]"), ["1", "2"]);
        assert_eq!(
            hosts("node-1.cluster,node-2.cluster"),
            ["node-1.cluster", "node-2.cluster"]
        );
    }

    #[test]
    fn malformed_hostlists() {
        for bad in [
            "",
            " ",
            "node[1-",
            "node[3-1]",
            "node[]",
            "node[1-2",
            "node1-2]",
            "node[[1-2]]",
            "node[a-b]",
            "node[1-x]",
            "node[1,]",
            "node[-2]",
            "node[1-2-3]",
            "a,,b",
            "a,",
            ",a",
            "a b",
            "n[0-99999999999999999999]",
            "n[0-9999999]",
            "n[0-1999]m[0-1999]",
        ] {
            assert!(expand_hostlist(bad).is_err(), "{bad:?} should be an error");
        }
        assert!(expand_hostlist("node[3-1]")
            .unwrap_err()
            .contains("backwards"));
        assert!(expand_hostlist("node[1-")
            .unwrap_err()
            .contains("never closed"));
    }
}
