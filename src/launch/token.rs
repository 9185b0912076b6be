//! The job token: the secret every rank of one job holds, with which the ranks authenticate each
//! other (see [`crate::comm::auth`]) before they exchange anything.
//!
//! A token is hex text of 32 to 1024 digits (16 to 512 bytes; what `openssl rand -hex 32` prints,
//! surrounding whitespace ignored). A rank takes it from, first match wins:
//!
//! 1. `--job-token-file PATH`: a regular file that only its owner may read or write. A file that
//!    its group or others can read or write is refused (like ssh refuses a private key): anyone
//!    who can read it can join the job, and anyone who can write it can lock the job out.
//! 2. `SHARDTRAIN_JOB_TOKEN`.
//!
//! A malformed token (empty, not hex, too short) is bad input (exit 2) naming its source and never
//! echoing it. `shardtrain launch` draws a fresh random token per job for its ranks unless the
//! user gave one; a job of several nodes cannot share a drawn token, so there the user gives it.
//! A rank with no token at all still runs, unauthenticated as before, after one warning.

use std::path::Path;

use crate::comm::auth::Key;
use crate::error::UsageError;

/// The environment variable that carries the token to a rank.
pub const ENV_VAR: &str = "SHARDTRAIN_JOB_TOKEN";
/// The flag of `train` that names a token file.
pub const FILE_FLAG: &str = "--job-token-file";
/// Bytes of a drawn token.
const DRAWN_BYTES: usize = 32;
const MIN_HEX: usize = 32;
const MAX_HEX: usize = 1024;

/// A fresh token: 32 bytes from the operating system's random source, as hex.
pub fn draw() -> std::io::Result<String> {
    let mut bytes = [0u8; DRAWN_BYTES];
    getrandom::fill(&mut bytes)
        .map_err(|e| std::io::Error::other(format!("the system's random source failed: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The token of this process: from `file`, else from `env`'s [`ENV_VAR`]; `None` if neither.
pub fn resolve(
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Key>, UsageError> {
    if let Some(path) = file {
        return read_file(path).map(Some);
    }
    match env(ENV_VAR) {
        Some(text) => parse(&text, ENV_VAR).map(Some),
        None => Ok(None),
    }
}

/// The token of a rank of a multi-process job (from the process environment), with one warning
/// when there is none.
pub fn for_rank(file: Option<&Path>, rank: usize) -> Result<Option<Key>, UsageError> {
    let key = resolve(file, &|name| std::env::var(name).ok())?;
    if key.is_none() {
        tracing::warn!(
            "rank {rank}: no job token ({ENV_VAR} or {FILE_FLAG}): any process that can reach \
             this job's rendezvous or data ports can join it; give every rank the same token \
             (README: \"What listens where and keeping a job private\")"
        );
    }
    Ok(key)
}

/// What `shardtrain launch` puts in its ranks' environment as [`ENV_VAR`]: a freshly drawn token,
/// or `None` when the ranks already have one (`token_file`, the ranks' `--job-token-file`, or
/// [`ENV_VAR`] in the launcher's own environment, which they inherit) or cannot share a drawn
/// one (several nodes: each node's launcher would draw another). A given token is checked here,
/// before any rank starts.
pub fn for_launched_ranks(
    token_file: Option<&Path>,
    nnodes: usize,
) -> Result<Option<String>, UsageError> {
    launched(token_file, nnodes, &|name| std::env::var(name).ok())
}

/// [`for_launched_ranks`] with the launcher's environment `env`.
fn launched(
    token_file: Option<&Path>,
    nnodes: usize,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, UsageError> {
    if resolve(token_file, env)?.is_some() {
        return Ok(None);
    }
    if nnodes > 1 {
        tracing::warn!(
            "launch: no job token for a job of {nnodes} nodes (the launcher of each node would \
             draw another): the ranks run unauthenticated; set the same {ENV_VAR} on every node, \
             or pass {FILE_FLAG} on a shared filesystem"
        );
        return Ok(None);
    }
    draw()
        .map(Some)
        .map_err(|e| UsageError(format!("launch: cannot draw a job token: {e}")))
}

fn read_file(path: &Path) -> Result<Key, UsageError> {
    let source = format!("{FILE_FLAG} {}", path.display());
    let meta = std::fs::metadata(path)
        .map_err(|e| UsageError(format!("{source}: cannot read it: {e}")))?;
    if !meta.is_file() {
        return Err(UsageError(format!("{source}: not a regular file")));
    }
    check_private(&source, &meta, path)?;
    let bytes =
        std::fs::read(path).map_err(|e| UsageError(format!("{source}: cannot read it: {e}")))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| UsageError(format!("{source}: the token is not text (expected hex)")))?;
    parse(&text, &source)
}

#[cfg(unix)]
fn check_private(source: &str, meta: &std::fs::Metadata, path: &Path) -> Result<(), UsageError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(UsageError(format!(
            "{source}: the token file may be read or written by others (mode {mode:03o}): anyone \
             who can read it can join the job; make it private with `chmod 600 {}`",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_: &str, _: &std::fs::Metadata, _: &Path) -> Result<(), UsageError> {
    Ok(())
}

/// The key of token text from `source`; the error names the source and never shows the text.
pub fn parse(text: &str, source: &str) -> Result<Key, UsageError> {
    let hex = text.trim();
    let bad = |why: String| {
        UsageError(format!(
            "{source}: {why}; a job token is {MIN_HEX} to {MAX_HEX} hex digits, e.g. from \
             `openssl rand -hex 32`"
        ))
    };
    if hex.is_empty() {
        return Err(bad("the token is empty".into()));
    }
    if let Some(at) = hex.find(|c: char| !c.is_ascii_hexdigit()) {
        return Err(bad(format!(
            "the token is not hex (character {} is not a hex digit)",
            hex[..at].chars().count() + 1
        )));
    }
    if !hex.len().is_multiple_of(2) {
        return Err(bad(format!(
            "the token has an odd number of hex digits ({})",
            hex.len()
        )));
    }
    if !(MIN_HEX..=MAX_HEX).contains(&hex.len()) {
        return Err(bad(format!("the token has {} hex digits", hex.len())));
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("checked hex digits"))
        .collect();
    Ok(Key::new(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const TOKEN: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn a_drawn_token_parses_and_two_differ() {
        let a = draw().unwrap();
        assert_eq!(a.len(), 64);
        parse(&a, "drawn").unwrap();
        assert_ne!(a, draw().unwrap());
    }

    #[test]
    fn malformed_tokens_name_their_source_and_hide_the_text() {
        for (text, why) in [
            ("", "empty"),
            ("  \n", "empty"),
            (
                "secret-password-that-is-long-enough-0123",
                "not hex (character 1",
            ),
            (&TOKEN[..31], "odd number"),
            (&TOKEN[..30], "30 hex digits"),
        ] {
            let e = parse(text, ENV_VAR).unwrap_err().0;
            assert!(e.starts_with(ENV_VAR) && e.contains(why), "{e}");
            if text.trim().len() > 4 {
                assert!(!e.contains(text.trim()), "the token leaked: {e}");
            }
        }
        // Whitespace around a good token (a file's newline) is not part of it.
        assert_eq!(
            parse(&format!("{TOKEN}\n"), "f").unwrap(),
            parse(TOKEN, "f").unwrap()
        );
    }

    #[test]
    fn the_file_wins_over_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let env = |name: &str| (name == ENV_VAR).then(|| "ff".repeat(16));
        let from_file = resolve(Some(&path), &env).unwrap().unwrap();
        assert_eq!(from_file, parse(TOKEN, "x").unwrap());
        let from_env = resolve(None, &env).unwrap().unwrap();
        assert_eq!(from_env, parse(&"ff".repeat(16), "x").unwrap());
        assert!(resolve(None, &no_env).unwrap().is_none());
    }

    #[test]
    fn launch_draws_a_token_only_when_none_is_given_and_one_node_can_share_it() {
        let drawn = launched(None, 1, &no_env).unwrap().expect("a drawn token");
        parse(&drawn, "drawn").unwrap();
        // Several nodes: each launcher would draw another, so none is drawn.
        assert_eq!(launched(None, 2, &no_env).unwrap(), None);
        // Given in the environment (the ranks inherit it) or as the ranks' file: none drawn,
        // and a bad one is refused before any rank starts.
        let env = |name: &str| (name == ENV_VAR).then(|| TOKEN.to_string());
        assert_eq!(launched(None, 1, &env).unwrap(), None);
        let bad = |name: &str| (name == ENV_VAR).then(|| "xyz".to_string());
        assert!(launched(None, 1, &bad).unwrap_err().0.starts_with(ENV_VAR));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, TOKEN).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(launched(Some(&path), 1, &no_env).unwrap(), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).unwrap();
        assert!(launched(Some(&path), 1, &no_env).is_err());
    }

    #[test]
    fn a_token_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, TOKEN).unwrap();
        for mode in [0o644, 0o640, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = resolve(Some(&path), &no_env).unwrap_err().0;
            assert!(e.contains(&path.display().to_string()), "{e}");
            assert!(e.contains(&format!("mode {mode:03o}")), "{e}");
            assert!(e.contains("chmod 600"), "{e}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        resolve(Some(&path), &no_env).unwrap().unwrap();
    }

    #[test]
    fn a_missing_or_garbled_token_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let e = resolve(Some(&missing), &no_env).unwrap_err().0;
        assert!(e.contains("--job-token-file") && e.contains("nope"), "{e}");
        let garbled = dir.path().join("garbled");
        std::fs::write(&garbled, b"\xff\xfe binary").unwrap();
        std::fs::set_permissions(&garbled, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = resolve(Some(&garbled), &no_env).unwrap_err().0;
        assert!(e.contains("garbled") && e.contains("not text"), "{e}");
        let e = resolve(Some(dir.path()), &no_env).unwrap_err().0;
        assert!(e.contains("not a regular file"), "{e}");
    }
}
