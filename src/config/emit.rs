// Writes a Config back out as YAML: every key, section by section, each under a short comment,
// in the same layout as configs/tiny.yaml. Reading the text back gives an equal Config.

use super::schema::Config;
use serde::Serialize;
use std::collections::BTreeMap;

/// The full YAML text of `config` (see `Config::to_yaml`).
pub(crate) fn to_yaml(config: &Config) -> String {
    let mut out = String::from("# shardtrain configuration: every key, defaults included.\n");
    section(&mut out, "model", "shape of the GPT", &config.model);
    section(
        &mut out,
        "data",
        "where training tokens come from",
        &config.data,
    );
    section(
        &mut out,
        "train",
        "optimisation and evaluation",
        &config.train,
    );
    section(
        &mut out,
        "parallel",
        "ranks, sharding strategy, mixed precision",
        &config.parallel,
    );
    section(
        &mut out,
        "checkpoint",
        "what is saved to the run directory",
        &config.checkpoint,
    );
    section(
        &mut out,
        "logging",
        "console and metrics-file output",
        &config.logging,
    );
    section(
        &mut out,
        "device",
        "which backend runs the job",
        &config.device,
    );
    out
}

/// Appends `# name: comment` and the section as a one-key YAML mapping.
fn section<T: Serialize>(out: &mut String, name: &str, comment: &str, value: &T) {
    out.push_str(&format!("\n# {name}: {comment}\n"));
    let one = BTreeMap::from([(name, value)]);
    match serde_saphyr::to_string(&one) {
        Ok(text) => out.push_str(&text),
        // Plain data cannot fail to serialize; keep the failure visible rather than panic.
        Err(err) => out.push_str(&format!("# could not write {name}: {err}\n")),
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
}
