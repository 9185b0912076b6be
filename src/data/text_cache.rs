//! `data.kind: text`: the text files a config names, tokenized once into shards in a cache next
//! to the run (`<runs>/.token-cache/<key>/`), then read like any shards. The key covers the
//! tokenizer, the validation share and each file's path, size and modification time, so an
//! edited corpus is tokenized again and an unchanged one never is, across runs and resumes.
//!
//! A cache directory appears complete or not at all: it is built under a temporary name and
//! renamed. Ranks of one process take turns (the first builds, the others find it); separate
//! processes may each build one, and the first rename wins.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result};

use super::corpus::{tokenize_corpus, CorpusJob};
use super::shards::match_glob;
use super::tokenizer::Tokenizer;
use crate::config::Config;

/// Directory of the caches, inside the directory that holds the run directories.
pub const CACHE_DIR: &str = ".token-cache";
/// Tokens per cached shard.
const SHARD_TOKENS: usize = 100_000_000;
/// Bump when the cache's contents change meaning.
const CACHE_FORMAT: &str = "shardtrain-text-cache/1";

/// Shard globs of a tokenized text corpus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedText {
    pub dir: PathBuf,
    pub train: String,
    pub val: String,
}

static BUILDING: Mutex<()> = Mutex::new(());

/// The cached shards of `cfg`'s text (building them if needed) for a run in `run_dir`.
pub fn ensure_text_cache(cfg: &Config, run_dir: &Path) -> Result<CachedText> {
    let train_files = match_glob(&cfg.data.train, "text").context("data.train")?;
    let val_files = if cfg.data.val.is_empty() {
        Vec::new()
    } else {
        match_glob(&cfg.data.val, "text").context("data.val")?
    };
    let tokenizer = Tokenizer::new(cfg.data.tokenizer);
    // Validation files given: the training text is all training.
    let held_out = if val_files.is_empty() {
        cfg.data.val_fraction
    } else {
        0.0
    };
    let key = cache_key(&tokenizer, held_out, &train_files, &val_files)?;
    let root = run_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(CACHE_DIR);
    let dir = root.join(format!("{}-{key:016x}", tokenizer.name()));
    let cached = CachedText {
        train: dir.join("text_train_*.bin").to_string_lossy().into_owned(),
        val: if val_files.is_empty() {
            dir.join("text_val_*.bin")
        } else {
            dir.join("valtext_val_*.bin")
        }
        .to_string_lossy()
        .into_owned(),
        dir: dir.clone(),
    };
    let _turn = BUILDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if dir.is_dir() {
        tracing::info!("tokenized text found in {}", dir.display());
        return Ok(cached);
    }
    build(&dir, tokenizer, held_out, &train_files, &val_files)
        .with_context(|| format!("tokenizing data.train into {}", dir.display()))?;
    Ok(cached)
}

/// Tokenizes into a temporary sibling of `dir`, then renames it to `dir`.
fn build(
    dir: &Path,
    tokenizer: Tokenizer,
    held_out: f64,
    train_files: &[PathBuf],
    val_files: &[PathBuf],
) -> Result<()> {
    let nanos = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut tmp_name = dir.as_os_str().to_owned();
    tmp_name.push(format!(".partial-{}-{nanos}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = (|| -> Result<()> {
        let bar = indicatif::ProgressBar::hidden();
        tracing::info!(
            "tokenizing {} text file(s) with the {} tokenizer into {}",
            train_files.len() + val_files.len(),
            tokenizer.name(),
            dir.display()
        );
        let mut job = CorpusJob {
            inputs: train_files,
            tokenizer,
            prefix: &tmp.join("text"),
            shard_tokens: SHARD_TOKENS,
            val_fraction: held_out,
        };
        let train = tokenize_corpus(&job, &bar)?;
        let mut described = serde_json::json!({
            "format": CACHE_FORMAT,
            "tokenizer": tokenizer.name(),
            "train_files": train_files,
            "val_fraction": held_out,
            "train_tokens": train.train_tokens,
            "val_tokens": train.val_tokens,
        });
        if !val_files.is_empty() {
            let prefix = tmp.join("valtext");
            job.inputs = val_files;
            job.prefix = &prefix;
            job.val_fraction = 1.0;
            let val = tokenize_corpus(&job, &bar)?;
            described["val_files"] = serde_json::json!(val_files);
            described["val_tokens"] = serde_json::json!(val.val_tokens);
        }
        tracing::info!("tokenized text: {described}");
        std::fs::write(
            tmp.join("source.json"),
            serde_json::to_vec_pretty(&described)?,
        )?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&tmp, dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another process finished the same cache first: theirs is as good as ours.
        if !dir.is_dir() {
            return Err(e)
                .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()));
        }
    }
    Ok(())
}

/// A hash of what decides the cache's contents. (std's hasher may change between Rust releases:
/// that only costs one more tokenization.)
fn cache_key(
    tokenizer: &Tokenizer,
    held_out: f64,
    train_files: &[PathBuf],
    val_files: &[PathBuf],
) -> Result<u64> {
    let mut h = DefaultHasher::new();
    (CACHE_FORMAT, tokenizer.name(), held_out.to_bits()).hash(&mut h);
    for (list, tag) in [(train_files, "train"), (val_files, "val")] {
        tag.hash(&mut h);
        for path in list {
            let meta = std::fs::metadata(path)
                .with_context(|| format!("{}: cannot read it", path.display()))?;
            let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            (abs, meta.len(), modified).hash(&mut h);
        }
    }
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DataKind, TokenizerKind};

    #[test]
    fn builds_once_and_again_when_the_text_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let text = tmp.path().join("corpus.txt");
        std::fs::write(&text, "one two three four five six seven eight nine ten").unwrap();
        let mut cfg = Config::default();
        cfg.data.kind = DataKind::Text;
        cfg.data.tokenizer = TokenizerKind::Gpt2;
        cfg.data.train = text.to_string_lossy().into_owned();
        cfg.data.val_fraction = 0.2;
        let run = tmp.path().join("runs/a");
        let first = ensure_text_cache(&cfg, &run).unwrap();
        assert!(first
            .dir
            .starts_with(tmp.path().join("runs").join(CACHE_DIR)));
        assert_eq!(match_glob(&first.train, "shard").unwrap().len(), 1);
        assert_eq!(match_glob(&first.val, "shard").unwrap().len(), 1);
        // Another run in the same place reuses it.
        let again = ensure_text_cache(&cfg, &tmp.path().join("runs/b")).unwrap();
        assert_eq!(again, first);
        // Edited text, or another tokenizer, is another cache.
        std::fs::write(
            &text,
            "one two three four five six seven eight nine ten eleven",
        )
        .unwrap();
        let edited = ensure_text_cache(&cfg, &run).unwrap();
        assert_ne!(edited.dir, first.dir);
        cfg.data.tokenizer = TokenizerKind::Bytes;
        assert_ne!(ensure_text_cache(&cfg, &run).unwrap().dir, edited.dir);
        // Validation files of their own.
        let val = tmp.path().join("val.txt");
        std::fs::write(&val, "held out text").unwrap();
        cfg.data.val = val.to_string_lossy().into_owned();
        let with_val = ensure_text_cache(&cfg, &run).unwrap();
        let shards = crate::data::shards::open_glob(&with_val.val, 256).unwrap();
        assert_eq!(shards[0].len(), "held out text".len() + 1);
    }

    #[test]
    fn a_missing_corpus_names_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.data.kind = DataKind::Text;
        cfg.data.train = tmp
            .path()
            .join("nothing_*.txt")
            .to_string_lossy()
            .into_owned();
        let err = format!(
            "{:#}",
            ensure_text_cache(&cfg, &tmp.path().join("r")).unwrap_err()
        );
        assert!(
            err.contains("data.train") && err.contains("no text files match"),
            "{err}"
        );
        assert!(!tmp.path().join(CACHE_DIR).exists());
    }
}
