//! Console progress: an indicatif bar (step, loss, tokens/s, ETA) on a terminal, plain periodic
//! lines otherwise (logs, CI, pipes). Everything goes to stdout; diagnostics go to stderr.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use super::metrics::StepRecord;
use crate::config::ProgressMode;

pub enum Progress {
    Bar(ProgressBar),
    Plain { every: u64, max_steps: u64 },
}

impl Progress {
    pub fn new(mode: ProgressMode, max_steps: u64, every: u64) -> Progress {
        let bar = match mode {
            ProgressMode::Bar => true,
            ProgressMode::Plain => false,
            ProgressMode::Auto => std::io::stdout().is_terminal(),
        };
        if bar {
            let pb = ProgressBar::new(max_steps);
            let style = ProgressStyle::with_template(
                "{bar:30.cyan/blue} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            pb.set_style(style.progress_chars("=> "));
            Progress::Bar(pb)
        } else {
            Progress::Plain { every, max_steps }
        }
    }

    /// Reports a finished step (plain mode prints every `every` steps, the first, the last, and
    /// any step with a validation loss).
    pub fn step(&self, r: &StepRecord) {
        let val = r
            .val_loss
            .map(|v| format!(" val_loss {v:.4}"))
            .unwrap_or_default();
        match self {
            Progress::Bar(pb) => {
                pb.set_position(r.step);
                pb.set_message(format!("loss {:.4} {:.0} tok/s", r.loss, r.tokens_per_s));
                if r.val_loss.is_some() {
                    pb.println(format!("step {}: loss {:.4}{val}", r.step, r.loss));
                }
            }
            Progress::Plain { every, max_steps } => {
                let due = r.step == 1 || r.step.is_multiple_of(*every) || r.step == *max_steps;
                if due || r.val_loss.is_some() {
                    println!(
                        "step {:>6}/{max_steps} | loss {:.4} | lr {:.2e} | grad_norm {:.3} | {:.0} tok/s | {:.1}s{val}",
                        r.step, r.loss, r.lr, r.grad_norm, r.tokens_per_s, r.elapsed_s
                    );
                }
            }
        }
    }

    /// A line that does not break the bar.
    pub fn message(&self, text: &str) {
        match self {
            Progress::Bar(pb) => pb.println(text),
            Progress::Plain { .. } => println!("{text}"),
        }
    }

    pub fn finish(&self) {
        if let Progress::Bar(pb) = self {
            pb.finish_and_clear();
        }
    }
}
