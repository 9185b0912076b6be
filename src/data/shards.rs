//! Token shard files in llm.c's format, the format of the nanoGPT / llm.c data pipelines
//! (`fineweb_train_000001.bin`): a header of 256 little-endian `i32` (`[0]` the magic 20240520,
//! `[1]` the version 1, `[2]` the number of tokens, the rest zero), then that many little-endian
//! `u16` tokens. A file is exactly `1024 + 2 * ntok` bytes.
//!
//! Shards are read through a read-only memory map and validated once when opened (header against
//! file size, every token against the vocabulary), so reading windows later cannot fail on bad
//! data. Shards are written once, atomically (`.partial`, then a rename), and never modified in
//! place: that is what makes mapping them safe.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use memmap2::Mmap;

/// `header[0]` of every shard.
pub const SHARD_MAGIC: i32 = 20240520;
/// The only version of the format this reader knows (`header[1]`).
pub const SHARD_VERSION: i32 = 1;
/// Bytes of the header: 256 little-endian `i32`.
pub const HEADER_BYTES: usize = 1024;
/// Bytes of one token (`u16`).
const TOKEN_BYTES: usize = 2;
/// Suffix of a shard being written; renamed away once complete.
const PARTIAL_SUFFIX: &str = ".partial";

/// One shard file, memory-mapped (read-only), validated.
#[derive(Debug)]
pub struct Shard {
    path: PathBuf,
    mmap: Mmap,
    ntok: usize,
}

/// The `i`-th little-endian `i32` of the header.
fn header_field(bytes: &[u8], i: usize) -> i32 {
    let at = 4 * i;
    i32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Checks a shard's header against the file's size and returns its token count; errors name the
/// file.
fn parse_header(path: &Path, bytes: &[u8]) -> anyhow::Result<usize> {
    let shown = path.display();
    if bytes.len() < HEADER_BYTES {
        bail!(
            "{shown}: {} bytes is too short for the {HEADER_BYTES}-byte header",
            bytes.len()
        );
    }
    let magic = header_field(bytes, 0);
    if magic != SHARD_MAGIC {
        bail!("{shown}: magic {magic} is not {SHARD_MAGIC} (not a token shard)");
    }
    let version = header_field(bytes, 1);
    if version != SHARD_VERSION {
        bail!("{shown}: version {version}, this reader knows {SHARD_VERSION}");
    }
    let count = header_field(bytes, 2);
    let Ok(ntok) = usize::try_from(count) else {
        bail!("{shown}: header says {count} tokens, a negative token count (damaged header?)");
    };
    let expected = HEADER_BYTES as u64 + TOKEN_BYTES as u64 * ntok as u64;
    let actual = bytes.len() as u64;
    if expected != actual {
        let hint = if actual < expected {
            "truncated?"
        } else {
            "trailing bytes after the last token?"
        };
        bail!(
            "{shown}: header says {ntok} tokens ({expected} bytes) but the file has {actual} \
             bytes ({hint})"
        );
    }
    Ok(ntok)
}

impl Shard {
    /// Maps the shard at `path` and validates it: the header (magic, version, a token count that
    /// matches the file's size) and every token `< vocab_size` (one scan; the error reports the
    /// first bad token's position and value). Every error names the file.
    pub fn open(path: &Path, vocab_size: usize) -> anyhow::Result<Shard> {
        let shown = path.display();
        let file = File::open(path).with_context(|| format!("opening the shard {shown}"))?;
        // SAFETY: the map is read-only and shards are never modified in place (they are written
        // to `.partial` and renamed into place). Another process truncating the file while it
        // is mapped is outside this contract, as with any memory-mapped reader.
        let mmap =
            unsafe { Mmap::map(&file) }.with_context(|| format!("memory-mapping {shown}"))?;
        let ntok = parse_header(path, &mmap)?;
        let body = &mmap[HEADER_BYTES..];
        if let Some((pos, tok)) = body
            .chunks_exact(TOKEN_BYTES)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
            .enumerate()
            .find(|&(_, tok)| tok >= vocab_size)
        {
            bail!(
                "{shown}: token {tok} at position {pos} is outside the vocabulary of {vocab_size}"
            );
        }
        Ok(Shard {
            path: path.to_path_buf(),
            mmap,
            ntok,
        })
    }

    /// The file this shard was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tokens in the shard.
    pub fn len(&self) -> usize {
        self.ntok
    }

    /// Whether the shard holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.ntok == 0
    }

    /// Copies out the `count` tokens starting at token `start`; a range reaching past the end is
    /// an error naming the file.
    pub fn tokens(&self, start: usize, count: usize) -> anyhow::Result<Vec<u32>> {
        let end = start.checked_add(count).filter(|&end| end <= self.ntok);
        let Some(end) = end else {
            bail!(
                "{}: tokens {start}..{} are past the end of its {} tokens",
                self.path.display(),
                start as u128 + count as u128,
                self.ntok
            );
        };
        let bytes =
            &self.mmap[HEADER_BYTES + TOKEN_BYTES * start..HEADER_BYTES + TOKEN_BYTES * end];
        Ok(bytes
            .chunks_exact(TOKEN_BYTES)
            .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]])))
            .collect())
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters (none included) and
/// `?` exactly one; every other character matches itself.
fn wildcard_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was, and the position in `name` it has been stretched to so far.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == n[ni])) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            // Let the last `*` swallow one more character and retry from there.
            star = Some((sp, sn + 1));
            pi = sp + 1;
            ni = sn + 1;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// All shards matching a glob pattern (sorted by path), e.g. `"data/fineweb_train_*.bin"`,
/// each opened with [`Shard::open`]; no match at all is an error naming the pattern.
pub fn open_glob(pattern: &str, vocab_size: usize) -> anyhow::Result<Vec<Shard>> {
    let paths = match_glob(pattern, "shard")?;
    paths.iter().map(|p| Shard::open(p, vocab_size)).collect()
}

/// The files matching a glob pattern, sorted by path. `*` and `?` are matched in the file-name
/// part only; the directory part is taken literally. Unfinished `.partial` files left by an
/// interrupted write are never matched. No match is an error naming the pattern and `what` the
/// files were meant to be ("shard", "text").
pub fn match_glob(pattern: &str, what: &str) -> anyhow::Result<Vec<PathBuf>> {
    let as_path = Path::new(pattern);
    let Some(name_pattern) = as_path.file_name().and_then(|n| n.to_str()) else {
        bail!("{what} pattern {pattern:?} has no file-name part to match");
    };
    let dir = match as_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let entries = std::fs::read_dir(dir).with_context(|| {
        let wild = dir.to_string_lossy().contains(['*', '?']);
        let note = if wild {
            " (wildcards are matched in the file name only; the directory is taken literally)"
        } else {
            ""
        };
        format!(
            "listing the directory {} for the {what} pattern {pattern:?}{note}",
            dir.display()
        )
    })?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| {
            format!(
                "listing the directory {} for the {what} pattern {pattern:?}",
                dir.display()
            )
        })?;
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            continue; // not UTF-8: cannot match a UTF-8 pattern
        };
        if name.ends_with(PARTIAL_SUFFIX) || !wildcard_match(name_pattern, name) {
            continue;
        }
        // Keep the caller's spelling of the directory ("data/x.bin", not "./data/x.bin").
        let path = as_path.with_file_name(name);
        if path.is_file() {
            paths.push(path);
        }
    }
    if paths.is_empty() {
        bail!("no {what} files match {pattern:?}");
    }
    paths.sort();
    Ok(paths)
}

/// The first token that does not fit in a `u16`, as (position, token).
fn first_wide_token(tokens: &[u32]) -> Option<(usize, u32)> {
    tokens
        .iter()
        .copied()
        .enumerate()
        .find(|&(_, t)| t > u32::from(u16::MAX))
}

/// `path` with `.partial` appended to its file name.
fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(PARTIAL_SUFFIX);
    PathBuf::from(name)
}

/// Writes header and tokens to `path` (created or truncated) and syncs it to disk.
fn write_file(path: &Path, tokens: &[u32], ntok: i32) -> anyhow::Result<()> {
    let shown = path.display();
    let file = File::create(path).with_context(|| format!("creating {shown}"))?;
    let mut out = BufWriter::with_capacity(1 << 16, file);
    let mut header = [0u8; HEADER_BYTES];
    for (i, field) in [SHARD_MAGIC, SHARD_VERSION, ntok].into_iter().enumerate() {
        header[4 * i..4 * i + 4].copy_from_slice(&field.to_le_bytes());
    }
    out.write_all(&header)
        .with_context(|| format!("writing {shown}"))?;
    for &t in tokens {
        // Checked by the caller: every token fits in a u16.
        out.write_all(&(t as u16).to_le_bytes())
            .with_context(|| format!("writing {shown}"))?;
    }
    let file = out
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {shown}"))?;
    file.sync_all()
        .with_context(|| format!("syncing {shown}"))?;
    Ok(())
}

/// Writes one shard, atomically: to `<path>.partial` (replacing a stale one), then renamed to
/// `path`, so a reader never sees half a shard. Creates missing parent directories. Refuses to
/// overwrite an existing file (an error naming it), and every token must fit in a `u16` (an
/// error naming the first that does not).
pub fn write_shard(path: &Path, tokens: &[u32]) -> anyhow::Result<()> {
    let shown = path.display();
    if let Some((pos, tok)) = first_wide_token(tokens) {
        bail!(
            "{shown}: token {tok} at position {pos} does not fit in a shard's 16-bit tokens \
             (at most 65535)"
        );
    }
    let Ok(ntok) = i32::try_from(tokens.len()) else {
        bail!(
            "{shown}: {} tokens are more than a shard's header can count ({})",
            tokens.len(),
            i32::MAX
        );
    };
    if path.symlink_metadata().is_ok() {
        bail!("{shown} already exists; refusing to overwrite it");
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating the directory {}", parent.display()))?;
    }
    let partial = partial_path(path);
    if let Err(e) = write_file(&partial, tokens, ntok) {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    // The existence check above and this rename are not one atomic step: a file created at
    // `path` in between by another process would be replaced.
    if let Err(e) = std::fs::rename(&partial, path) {
        let _ = std::fs::remove_file(&partial);
        return Err(e).with_context(|| format!("renaming {} to {shown}", partial.display()));
    }
    Ok(())
}

/// The path of shard `index` of a split: `{prefix}_{split}_{index:06}.bin`.
pub(crate) fn shard_path(prefix: &Path, split: &str, index: usize) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    name.push(format!("_{split}_{index:06}.bin"));
    PathBuf::from(name)
}

/// Splits a stream of tokens into shards of at most `shard_tokens` tokens (only the last may be
/// shorter) named `{prefix}_{split}_{index:06}.bin`, index from 0, and returns the paths written.
/// `split` is `"train"` or `"val"`. Every token and every target path is checked before the first
/// shard is written, so a bad token or an existing shard writes nothing. No tokens write no
/// shards.
pub fn write_shards(
    prefix: &Path,
    split: &str,
    tokens: &[u32],
    shard_tokens: usize,
) -> anyhow::Result<Vec<PathBuf>> {
    let shown = prefix.display();
    if split != "train" && split != "val" {
        bail!("shards {shown}_*: split {split:?} is neither \"train\" nor \"val\"");
    }
    if shard_tokens == 0 || i32::try_from(shard_tokens).is_err() {
        bail!(
            "shards {shown}_{split}_*: {shard_tokens} tokens per shard is outside 1..={}",
            i32::MAX
        );
    }
    if let Some((pos, tok)) = first_wide_token(tokens) {
        bail!(
            "shards {shown}_{split}_*: token {tok} at position {pos} of the stream does not fit \
             in a shard's 16-bit tokens (at most 65535)"
        );
    }
    let paths: Vec<PathBuf> = (0..tokens.len().div_ceil(shard_tokens))
        .map(|i| shard_path(prefix, split, i))
        .collect();
    if let Some(existing) = paths.iter().find(|p| p.symlink_metadata().is_ok()) {
        bail!(
            "{} already exists; refusing to overwrite it (no shard written)",
            existing.display()
        );
    }
    for (path, chunk) in paths.iter().zip(tokens.chunks(shard_tokens)) {
        write_shard(path, chunk)?;
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_a_shell() {
        let yes = [
            ("*", ""),
            ("*", "abc"),
            ("a*c", "ac"),
            ("a*c", "abbbc"),
            ("a?c", "abc"),
            ("fineweb_train_*.bin", "fineweb_train_000001.bin"),
            ("*_??????.bin", "x_val_000012.bin"),
            ("*a*b", "aaabab"),
            ("**", "x"),
            ("é?", "éü"),
        ];
        for (p, n) in yes {
            assert!(wildcard_match(p, n), "{p:?} should match {n:?}");
        }
        let no = [
            ("a?c", "ac"),
            ("a*c", "abcd"),
            ("?", ""),
            ("abc", "abd"),
            ("*.bin", "x.bin.partial"),
            ("fineweb_val_*.bin", "fineweb_train_000001.bin"),
            ("*a*b", "aaaba"),
        ];
        for (p, n) in no {
            assert!(!wildcard_match(p, n), "{p:?} should not match {n:?}");
        }
    }

    #[test]
    fn shard_names_follow_llm_c() {
        assert_eq!(
            shard_path(Path::new("data/fineweb"), "train", 7),
            PathBuf::from("data/fineweb_train_000007.bin")
        );
        assert_eq!(
            partial_path(Path::new("d/x.bin")),
            PathBuf::from("d/x.bin.partial")
        );
    }

    fn header(magic: i32, version: i32, ntok: i32, body: usize) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_BYTES + body];
        b[0..4].copy_from_slice(&magic.to_le_bytes());
        b[4..8].copy_from_slice(&version.to_le_bytes());
        b[8..12].copy_from_slice(&ntok.to_le_bytes());
        b
    }

    #[test]
    fn headers_are_checked_against_the_file_size() {
        let p = Path::new("s.bin");
        assert_eq!(parse_header(p, &header(SHARD_MAGIC, 1, 3, 6)).unwrap(), 3);
        assert_eq!(parse_header(p, &header(SHARD_MAGIC, 1, 0, 0)).unwrap(), 0);
        let err = |b: Vec<u8>| parse_header(p, &b).unwrap_err().to_string();
        assert!(err(vec![0; 10]).contains("too short for the 1024-byte header"));
        assert!(err(header(7, 1, 0, 0)).contains("magic 7 is not 20240520"));
        assert!(err(header(SHARD_MAGIC, 3, 0, 0)).contains("version 3, this reader knows 1"));
        assert!(err(header(SHARD_MAGIC, 1, -1, 0)).contains("negative token count"));
        assert!(err(header(SHARD_MAGIC, 1, 4, 6)).contains(
            "header says 4 tokens (1032 bytes) but the file has 1030 bytes (truncated?)"
        ));
        assert!(err(header(SHARD_MAGIC, 1, 2, 6)).contains("trailing bytes"));
        assert!(err(vec![0; 10]).starts_with("s.bin: "));
    }

    #[test]
    fn wide_tokens_are_found() {
        assert_eq!(
            first_wide_token(&[0, 65535, 65536, 70000]),
            Some((2, 65536))
        );
        assert_eq!(first_wide_token(&[0, 65535]), None);
    }
}
