// Builds the user-facing text of a ConfigError. Every line starts with where the value came from
// (`file:line`, `--set key=value`, or the file alone for a default) and names the dotted key:
// `configs/bad.yaml:7: model.d_model: 130 is not divisible by model.n_head (4)`.

use super::locate::{KeyLocations, Position};
use super::ConfigError;
use serde_saphyr::{DefaultMessageFormatter, MessageFormatter};

/// Where each value of the final config came from: the file (with key positions) or a `--set`.
pub(crate) struct Sources<'a> {
    origin: &'a str,
    file_keys: &'a KeyLocations,
    /// (dotted key, the override as the user wrote it), in command-line order.
    overrides: Vec<(String, String)>,
}

impl<'a> Sources<'a> {
    pub(crate) fn new(origin: &'a str, file_keys: &'a KeyLocations) -> Self {
        Sources {
            origin,
            file_keys,
            overrides: Vec::new(),
        }
    }

    /// The file name (or embedded-default label) the config was read from.
    pub(crate) fn origin(&self) -> &str {
        self.origin
    }

    /// Records that `key` was set on the command line by `text` (the later of two wins).
    pub(crate) fn add_override(&mut self, key: &str, text: &str) {
        self.overrides.push((key.to_string(), text.to_string()));
    }

    /// `--set key=value` when `key` was overridden.
    fn overridden_at(&self, key: &str) -> Option<String> {
        self.overrides
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, text)| format!("--set {}", capped(text)))
    }

    /// `file:line` when `key` is written in the file.
    fn file_at(&self, key: &str) -> Option<String> {
        self.file_keys
            .line_of(key)
            .map(|line| format!("{}:{line}", self.origin))
    }

    /// Where a problem with `key` should point: an override of the key, else an override of
    /// another key the problem mentions (`model.d_model: 128 is not divisible by model.n_head (3)`
    /// after `--set model.n_head=3`), else the key's line in the file, else a mentioned key's
    /// line, else the file alone (every key involved is at its default).
    fn place(&self, key: &str, problem: &str) -> String {
        self.overridden_at(key)
            .or_else(|| mentioned_keys(problem).find_map(|other| self.overridden_at(other)))
            .or_else(|| self.file_at(key))
            .or_else(|| mentioned_keys(problem).find_map(|other| self.file_at(other)))
            .unwrap_or_else(|| self.origin.to_string())
    }

    /// One line of an error message: `place: key: problem`.
    pub(crate) fn line(&self, key: &str, problem: &str) -> String {
        format!("{}: {key}: {problem}", self.place(key, problem))
    }

    /// All validation problems, one per line, as one error.
    pub(crate) fn validation_error(&self, problems: &[(String, String)]) -> ConfigError {
        let lines: Vec<String> = problems
            .iter()
            .map(|(key, problem)| self.line(key, problem))
            .collect();
        ConfigError::new(lines.join("\n"))
    }
}

/// Words of `text` that look like dotted keys (`train.micro_batch_size`).
fn mentioned_keys(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .map(|word| word.trim_matches('.'))
        .filter(|word| word.contains('.') && word.starts_with(|c: char| c.is_ascii_alphabetic()))
}

/// A parse-level error in the file (bad YAML, unknown key, wrong type): our one-line header with
/// file, line and dotted key, followed by serde-saphyr's own snippet of the offending lines.
pub(crate) fn yaml_error(
    origin: &str,
    err: &serde_saphyr::Error,
    keys: &KeyLocations,
) -> ConfigError {
    let core: String = DefaultMessageFormatter
        .format_message(err.without_snippet())
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let header = match err.location() {
        Some(loc) if loc.line() > 0 => {
            let at = Position {
                line: loc.line(),
                column: loc.column(),
            };
            match keys.key_at(at) {
                Some(key) => format!("{origin}:{}: {key}: {core}", loc.line()),
                None => format!("{origin}:{}: {core}", loc.line()),
            }
        }
        _ => format!("{origin}: {core}"),
    };
    let rendered = err.render_with_options(serde_saphyr::render_options! {
        source_name: Some(origin),
    });
    // The rendering repeats the message on its first line ("error: line L column C: ..."); keep
    // only the snippet below it.
    let mut rendered_lines = rendered.lines();
    let first = rendered_lines.next().unwrap_or_default();
    let snippet: Vec<&str> = rendered_lines.collect();
    if first.starts_with("error:") && !snippet.is_empty() {
        ConfigError::new(format!("{header}\n{}", snippet.join("\n")))
    } else {
        ConfigError::new(header)
    }
}

/// Longest value an error message repeats whole; longer ones are cut, saying how long they were.
const ECHO_LIMIT: usize = 120;

/// `text` as an error message may echo it: whole up to [`ECHO_LIMIT`] bytes, else its start and
/// its length (a 50 MB value must not become a 50 MB error line).
pub(crate) fn capped(text: &str) -> String {
    if text.len() <= ECHO_LIMIT {
        return text.to_string();
    }
    let mut end = ECHO_LIMIT - 20;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &text[..end], text.len())
}
