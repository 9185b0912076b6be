//! Token shard files in llm.c's format: what `write_shard` writes is byte for byte the format
//! (checked field by field), hand-built files read back, shards found by a glob come in order, and
//! every kind of damaged or unacceptable file is an error naming it.

use std::path::{Path, PathBuf};

use shardtrain::data::shards::{
    open_glob, write_shard, write_shards, Shard, HEADER_BYTES, SHARD_MAGIC, SHARD_VERSION,
};

const GPT2_VOCAB: usize = 50257;

/// A shard's bytes built by hand: the three header fields, zeros, then `tokens` as u16 LE.
fn shard_bytes(magic: i32, version: i32, ntok: i32, tokens: &[u16]) -> Vec<u8> {
    let mut b = Vec::new();
    for field in [magic, version, ntok] {
        b.extend_from_slice(&field.to_le_bytes());
    }
    b.resize(HEADER_BYTES, 0);
    for t in tokens {
        b.extend_from_slice(&t.to_le_bytes());
    }
    b
}

fn i32_at(bytes: &[u8], field: usize) -> i32 {
    i32::from_le_bytes(bytes[4 * field..4 * field + 4].try_into().unwrap())
}

fn open_err(path: &Path, vocab: usize) -> String {
    format!("{:#}", Shard::open(path, vocab).unwrap_err())
}

#[test]
fn written_shard_has_the_exact_format_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.bin");
    let tokens = [1u32, 2, 65535, 300, 50256]; // an odd count
    write_shard(&path, &tokens).unwrap();

    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 1024 + 2 * tokens.len());
    assert_eq!(i32_at(&bytes, 0), 20240520);
    assert_eq!(i32_at(&bytes, 0), SHARD_MAGIC);
    assert_eq!(i32_at(&bytes, 1), 1);
    assert_eq!(i32_at(&bytes, 1), SHARD_VERSION);
    assert_eq!(i32_at(&bytes, 2), tokens.len() as i32);
    assert!(
        (3..256).all(|f| i32_at(&bytes, f) == 0),
        "header[3..] is zero"
    );
    let body: Vec<u8> = tokens
        .iter()
        .flat_map(|&t| (t as u16).to_le_bytes())
        .collect();
    assert_eq!(&bytes[HEADER_BYTES..], &body[..]);
    assert_eq!(&bytes[HEADER_BYTES..HEADER_BYTES + 2], &[1, 0]);
    assert_eq!(&bytes[HEADER_BYTES + 4..HEADER_BYTES + 6], &[0xFF, 0xFF]);
    assert!(!dir.path().join("s.bin.partial").exists());

    let shard = Shard::open(&path, 65536).unwrap();
    assert_eq!(shard.path(), path);
    assert_eq!(shard.len(), 5);
    assert!(!shard.is_empty());
    assert_eq!(shard.tokens(0, 5).unwrap(), tokens);
    assert_eq!(shard.tokens(2, 2).unwrap(), [65535, 300]);
    assert_eq!(shard.tokens(5, 0).unwrap(), Vec::<u32>::new());
}

#[test]
fn hand_built_shard_reads_back_and_range_reads_are_bounds_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hand.bin");
    let tokens: Vec<u16> = (0..7).map(|i| i * 1000 + 3).collect();
    std::fs::write(&path, shard_bytes(20240520, 1, 7, &tokens)).unwrap();

    let shard = Shard::open(&path, GPT2_VOCAB).unwrap();
    assert_eq!(shard.len(), 7);
    let want: Vec<u32> = tokens.iter().map(|&t| u32::from(t)).collect();
    assert_eq!(shard.tokens(0, 7).unwrap(), want);
    assert_eq!(shard.tokens(3, 4).unwrap(), want[3..]);

    for (start, count) in [(3, 5), (7, 1), (8, 0), (usize::MAX, 2)] {
        let err = format!("{:#}", shard.tokens(start, count).unwrap_err());
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("past the end of its 7 tokens"), "{err}");
    }
}

#[test]
fn empty_shard_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.bin");
    write_shard(&path, &[]).unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        shard_bytes(SHARD_MAGIC, 1, 0, &[])
    );

    let shard = Shard::open(&path, GPT2_VOCAB).unwrap();
    assert!(shard.is_empty());
    assert_eq!(shard.len(), 0);
    assert_eq!(shard.tokens(0, 0).unwrap(), Vec::<u32>::new());
    assert!(shard.tokens(0, 1).is_err());
}

#[test]
fn write_shards_splits_a_stream_and_open_glob_finds_them_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("data").join("fw"); // the directory is created
    let stream: Vec<u32> = (0..10).map(|i| i * 7).collect();
    let paths = write_shards(&prefix, "train", &stream, 3).unwrap();
    let names: Vec<String> = paths
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "fw_train_000000.bin",
            "fw_train_000001.bin",
            "fw_train_000002.bin",
            "fw_train_000003.bin"
        ]
    );
    write_shards(&prefix, "val", &[1, 2], 3).unwrap();
    // Things the glob must pass over: a leftover of an interrupted write, a matching directory.
    let data = dir.path().join("data");
    std::fs::write(data.join("fw_train_000004.bin.partial"), b"junk").unwrap();
    std::fs::create_dir(data.join("fw_train_000005.bin")).unwrap();

    let pattern = format!("{}/fw_train_*.bin", data.display());
    let shards = open_glob(&pattern, GPT2_VOCAB).unwrap();
    let got_paths: Vec<PathBuf> = shards.iter().map(|s| s.path().to_path_buf()).collect();
    assert_eq!(got_paths, paths);
    assert_eq!(
        shards.iter().map(Shard::len).collect::<Vec<_>>(),
        [3, 3, 3, 1]
    );
    let joined: Vec<u32> = shards
        .iter()
        .flat_map(|s| s.tokens(0, s.len()).unwrap())
        .collect();
    assert_eq!(joined, stream);

    let one = open_glob(&format!("{}/fw_???_00000?.bin", data.display()), GPT2_VOCAB).unwrap();
    assert_eq!(one.len(), 1, "only the val shard has a three-letter split");
    assert_eq!(one[0].tokens(0, 2).unwrap(), [1, 2]);
}

#[test]
fn glob_without_a_match_names_the_pattern() {
    let dir = tempfile::tempdir().unwrap();
    write_shard(&dir.path().join("fw_val_000000.bin"), &[1]).unwrap();
    let pattern = format!("{}/fw_train_*.bin", dir.path().display());
    let err = format!("{:#}", open_glob(&pattern, GPT2_VOCAB).unwrap_err());
    assert!(err.contains("no shard files match"), "{err}");
    assert!(err.contains(&pattern), "{err}");

    let missing = format!("{}/nowhere/*.bin", dir.path().display());
    let err = format!("{:#}", open_glob(&missing, GPT2_VOCAB).unwrap_err());
    assert!(err.contains(&missing), "{err}");
}

#[test]
fn every_bad_header_is_rejected_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut truncated = shard_bytes(SHARD_MAGIC, 1, 4, &[1, 2, 3, 4]);
    truncated.truncate(truncated.len() - 3);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "empty.bin",
            Vec::new(),
            "too short for the 1024-byte header",
        ),
        (
            "short.bin",
            vec![0; 1023],
            "too short for the 1024-byte header",
        ),
        (
            "magic.bin",
            shard_bytes(123, 1, 0, &[]),
            "magic 123 is not 20240520 (not a token shard)",
        ),
        (
            "version.bin",
            shard_bytes(SHARD_MAGIC, 2, 0, &[]),
            "version 2, this reader knows 1",
        ),
        (
            "negative.bin",
            shard_bytes(SHARD_MAGIC, 1, -5, &[]),
            "negative token count",
        ),
        (
            "truncated.bin",
            truncated,
            "header says 4 tokens (1032 bytes) but the file has 1029 bytes (truncated?)",
        ),
        (
            "long.bin",
            shard_bytes(SHARD_MAGIC, 1, 1, &[1, 2]),
            "header says 1 tokens (1026 bytes) but the file has 1028 bytes",
        ),
    ];
    for (name, bytes, want) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = open_err(&path, GPT2_VOCAB);
        assert!(err.contains(want), "{name}: {err}");
        assert!(err.contains(&path.display().to_string()), "{name}: {err}");
    }
    let gone = dir.path().join("gone.bin");
    assert!(open_err(&gone, GPT2_VOCAB).contains(&gone.display().to_string()));
}

#[test]
fn out_of_vocabulary_token_is_rejected_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.bin");
    write_shard(&path, &[0, 50256, 7, 50257, 60000]).unwrap();
    let err = open_err(&path, GPT2_VOCAB);
    assert!(
        err.contains("token 50257 at position 3 is outside the vocabulary of 50257"),
        "{err}"
    );
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert_eq!(Shard::open(&path, 60001).unwrap().len(), 5);
}

#[test]
fn overwriting_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.bin");
    write_shard(&path, &[1, 2, 3]).unwrap();
    let err = format!("{:#}", write_shard(&path, &[9]).unwrap_err());
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(
        Shard::open(&path, 10).unwrap().tokens(0, 3).unwrap(),
        [1, 2, 3]
    );

    // write_shards checks every target before writing any.
    let prefix = dir.path().join("fw");
    write_shard(&dir.path().join("fw_train_000001.bin"), &[5]).unwrap();
    let err = format!(
        "{:#}",
        write_shards(&prefix, "train", &[1, 2, 3, 4], 2).unwrap_err()
    );
    assert!(err.contains("fw_train_000001.bin already exists"), "{err}");
    assert!(!dir.path().join("fw_train_000000.bin").exists());
}

#[test]
fn tokens_wider_than_16_bits_are_refused_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.bin");
    let err = format!("{:#}", write_shard(&path, &[1, 65535, 65536]).unwrap_err());
    assert!(err.contains("token 65536 at position 2"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(!path.exists());
    assert!(!dir.path().join("s.bin.partial").exists());

    let prefix = dir.path().join("fw");
    let err = format!(
        "{:#}",
        write_shards(&prefix, "val", &[1, 2, 3, 70000], 2).unwrap_err()
    );
    assert!(err.contains("token 70000 at position 3"), "{err}");
    assert!(!dir.path().join("fw_val_000000.bin").exists());
}

#[test]
fn write_shards_checks_its_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("fw");
    assert!(write_shards(&prefix, "test", &[1], 2).is_err());
    assert!(write_shards(&prefix, "train", &[1], 0).is_err());
    assert!(write_shards(&prefix, "train", &[], 2).unwrap().is_empty());
}
