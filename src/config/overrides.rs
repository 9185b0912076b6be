// Command-line overrides (`--set section.key=value`): each is checked against the schema's key
// tree and its value against the key's type on its own, then all are applied onto the config read
// from the file (through a serde_json::Value tree) before validation.

use super::report::Sources;
use super::schema::Config;
use super::ConfigError;
use serde_json::{Map, Value};

/// One parsed `--set`.
#[derive(Debug, Clone)]
pub(crate) struct Override {
    /// The override exactly as given (`train.lr=1e-3`), for messages.
    pub text: String,
    /// The dotted key (`train.lr`).
    pub key: String,
    /// The value, parsed as a YAML scalar.
    value: Value,
}

/// Parses `section.key=value`, rejecting keys outside the schema and values of the wrong type.
pub(crate) fn parse(text: &str) -> Result<Override, ConfigError> {
    let fail = |key: &str, problem: String| {
        ConfigError::new(if key.is_empty() {
            format!("--set {text}: {problem}")
        } else {
            format!("--set {text}: {key}: {problem}")
        })
    };
    let Some((key, raw)) = text.split_once('=') else {
        return Err(fail("", "expected section.key=value".to_string()));
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(fail(
            "",
            "no key before '=' (expected section.key=value)".to_string(),
        ));
    }
    let schema = default_tree()?;
    let leaf = lookup(&schema, key).map_err(|problem| fail(key, problem))?;
    let value = scalar(raw, leaf).map_err(|problem| fail(key, problem))?;
    // Type-check this value alone, so the error names this override rather than the merged tree.
    let mut sparse = Value::Object(Map::new());
    set(&mut sparse, key, value.clone());
    if let Err(err) = serde_json::from_value::<Config>(sparse) {
        return Err(fail(key, err.to_string()));
    }
    Ok(Override {
        text: text.to_string(),
        key: key.to_string(),
        value,
    })
}

/// Applies the overrides in order (a later one wins) onto `config`.
pub(crate) fn apply(
    config: Config,
    overrides: &[Override],
    sources: &Sources<'_>,
) -> Result<Config, ConfigError> {
    if overrides.is_empty() {
        return Ok(config);
    }
    let mut tree = serde_json::to_value(&config).map_err(internal)?;
    for item in overrides {
        set(&mut tree, &item.key, item.value.clone());
    }
    // serde_json has no NaN or infinity: a non-finite float from the file came through as null.
    let mut lost = Vec::new();
    null_leaves(&tree, "", &mut lost);
    if !lost.is_empty() {
        let lines: Vec<String> = lost
            .iter()
            .map(|key| sources.line(key, "not a finite number"))
            .collect();
        return Err(ConfigError::new(lines.join("\n")));
    }
    serde_json::from_value(tree).map_err(|err| {
        ConfigError::new(format!(
            "{}: after --set overrides: {err}",
            sources.origin()
        ))
    })
}

/// The key tree of the schema: the default config as a JSON value.
fn default_tree() -> Result<Value, ConfigError> {
    serde_json::to_value(Config::default()).map_err(internal)
}

fn internal(err: serde_json::Error) -> ConfigError {
    ConfigError::new(format!(
        "internal error while applying --set overrides: {err}"
    ))
}

/// The default value at a dotted key, which must name a single value (not a section).
fn lookup<'t>(schema: &'t Value, key: &str) -> Result<&'t Value, String> {
    let mut node = schema;
    let mut walked: Vec<&str> = Vec::new();
    for segment in key.split('.') {
        let Value::Object(children) = node else {
            return Err(format!(
                "unknown key ({} is a single value, not a section)",
                walked.join(".")
            ));
        };
        let Some(child) = children.get(segment) else {
            let known: Vec<&str> = children.keys().map(String::as_str).collect();
            let scope = if walked.is_empty() {
                "top-level keys".to_string()
            } else {
                format!("keys of {}", walked.join("."))
            };
            return Err(format!("unknown key ({scope}: {})", known.join(", ")));
        };
        walked.push(segment);
        node = child;
    }
    if let Value::Object(children) = node {
        let known: Vec<String> = children.keys().map(|k| format!("{key}.{k}")).collect();
        return Err(format!(
            "is a section, not a single value; set one of {}",
            known.join(", ")
        ));
    }
    Ok(node)
}

/// Parses the text after '=' as a YAML scalar. For a text-valued key the raw text is taken as is
/// (so `metrics_file=123` is the name "123").
fn scalar(raw: &str, default: &Value) -> Result<Value, String> {
    let parsed = serde_saphyr::from_str::<Value>(raw);
    if default.is_string() {
        return Ok(Value::String(match parsed {
            Ok(Value::String(text)) => text,
            Ok(Value::Null) => String::new(),
            _ => raw.trim().to_string(),
        }));
    }
    match parsed {
        Ok(Value::Null) => Err("no value given after '='".to_string()),
        Ok(Value::Array(_) | Value::Object(_)) => Err(format!(
            "expected a single value, not a YAML list or mapping ({raw})"
        )),
        Ok(value) => Ok(value),
        Err(err) => match err.without_snippet() {
            serde_saphyr::Error::NonFiniteFloat { .. } => {
                Err(format!("{} is not a finite number", raw.trim()))
            }
            plain => Err(format!("{raw} is not a valid YAML value: {plain}")),
        },
    }
}

/// Sets the value at a dotted key, creating sections as needed.
fn set(tree: &mut Value, key: &str, value: Value) {
    let mut node = tree;
    let mut segments = key.split('.').peekable();
    while let Some(segment) = segments.next() {
        if !node.is_object() {
            *node = Value::Object(Map::new());
        }
        let Value::Object(children) = node else {
            return;
        };
        if segments.peek().is_none() {
            children.insert(segment.to_string(), value);
            return;
        }
        node = children
            .entry(segment.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

/// Dotted keys of all null leaves.
fn null_leaves(node: &Value, prefix: &str, out: &mut Vec<String>) {
    match node {
        Value::Null => out.push(prefix.to_string()),
        Value::Object(children) => {
            for (name, child) in children {
                let path = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                null_leaves(child, &path, out);
            }
        }
        _ => {}
    }
}
