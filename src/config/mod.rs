// The typed, validated training configuration, loaded from YAML plus `--set` overrides.
// This file holds the public API (load, from_yaml_str, to_yaml, validate) and ConfigError;
// schema.rs has the types, and locate/overrides/validate/report/emit.rs one step each.

mod emit;
mod locate;
mod overrides;
mod report;
mod schema;
pub mod sizes;
mod validate;

pub use schema::{
    CheckpointConfig, Config, DataConfig, DataKind, DeviceKind, LoggingConfig, MixedPrecision,
    ModelConfig, ParallelConfig, ProgressMode, ShardStrategy, SyntheticConfig, TokenizerKind,
    TrainConfig,
};

use std::fmt;
use std::path::Path;

/// The default job (configs/tiny.yaml), used when no --config is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../configs/tiny.yaml");

/// How error messages name the embedded default.
pub const EMBEDDED_ORIGIN: &str = "<embedded configs/tiny.yaml>";

/// Any problem with a configuration: unreadable file, bad YAML, unknown key, wrong type, bad
/// override, or failed validation. The CLI maps it to exit code 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The complete user-facing text (several lines when several problems were found).
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        ConfigError {
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads `path` (or the embedded configs/tiny.yaml when None), applies `overrides`
    /// (`section.key=value`, later ones win) and validates the result.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Config::from_yaml_str(EMBEDDED_DEFAULT, EMBEDDED_ORIGIN, overrides);
        };
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|err| ConfigError::new(format!("{origin}: cannot read config file: {err}")))?;
        let no_keys = text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
        if no_keys {
            // Legal (every key has a default), but more often a truncated or wrong file.
            tracing::warn!(
                "{origin} sets no keys: every value is a default (the built-in job's model, data \
                 and schedule)"
            );
        }
        Config::from_yaml_str(&text, &origin, overrides)
    }

    /// Parses YAML `text` (named `origin` in messages), applies `overrides` and validates.
    ///
    /// The text is deserialized straight into `Config` first, so bad YAML, unknown keys and wrong
    /// types keep serde-saphyr's message and snippet; then the overrides are applied and every
    /// validation problem comes back at once, one per line, each naming `file:line` (or the
    /// `--set`) and the dotted key. Keys left out keep their defaults, so an empty document (or
    /// one with only comments) means all defaults.
    pub fn from_yaml_str(
        text: &str,
        origin: &str,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let keys = locate::KeyLocations::scan(text);
        let from_file: Config =
            serde_saphyr::from_str(text).map_err(|err| report::yaml_error(origin, &err, &keys))?;
        let parsed = overrides
            .iter()
            .map(|text| overrides::parse(text))
            .collect::<Result<Vec<_>, _>>()?;
        let mut sources = report::Sources::new(origin, &keys);
        for item in &parsed {
            sources.add_override(&item.key, &item.text);
        }
        let config = overrides::apply(from_file, &parsed, &sources)?;
        config
            .validate()
            .map_err(|problems| sources.validation_error(&problems))?;
        Ok(config)
    }

    /// The whole config as YAML: every key, section by section, under a leading comment.
    /// `Config::from_yaml_str(&cfg.to_yaml(), ..)` gives back an equal config.
    pub fn to_yaml(&self) -> String {
        emit::to_yaml(self)
    }

    /// Checks for impossible or unsupported values; on failure, every problem as
    /// (dotted key, what is wrong).
    pub fn validate(&self) -> Result<(), Vec<(String, String)>> {
        let problems = validate::problems(self);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}
