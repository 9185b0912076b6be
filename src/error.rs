//! Errors that are the user's to fix (exit code 2), as opposed to a run that failed (exit code 1).
//! Config problems have their own type (`config::ConfigError`); this covers the other inputs.

use std::fmt;

/// Input the user must change: an argument out of range, a run directory that must not be
/// overwritten.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}
