//! The results of a check, one row per case, and their text rendering.

/// How one case (one op, one set of shapes and dtypes) compared.
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// The `Backend` method, for example `matmul`.
    pub op: String,
    /// Shapes and dtypes of the case, for example `m=7 n=13 k=5 aT*b acc, f32`.
    pub case: String,
    /// The largest scaled error over the case's outputs (NaN when the case could not run).
    pub max_err: f64,
    /// The largest `max_err` that passes: 1e-5 when every operand is f32, 1e-2 with any bf16.
    pub tolerance: f64,
    /// What went wrong beyond the error, for example "element 17 of `out` was not written".
    pub problem: Option<String>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.problem.is_none() && self.max_err <= self.tolerance
    }
}

/// Every case of one run of [`super::check_ops`].
#[derive(Clone, Debug)]
pub struct CheckReport {
    pub cases: Vec<CaseResult>,
    /// The backend under test, as its `name()` reports it.
    pub subject: String,
}

impl CheckReport {
    /// The number of cases that did not pass.
    pub fn failures(&self) -> usize {
        self.cases.iter().filter(|c| !c.passed()).count()
    }

    /// An aligned text table (op, case, max err, tolerance, ok/FAIL, problem), one line per case,
    /// under a title naming the subject, ending with the summary line `N cases, M failed`.
    pub fn render(&self) -> String {
        let mut rows = vec![[
            "op".to_string(),
            "case".to_string(),
            "max err".to_string(),
            "tolerance".to_string(),
            "result".to_string(),
            "problem".to_string(),
        ]];
        for c in &self.cases {
            let max_err = if c.max_err.is_nan() {
                "-".to_string()
            } else if c.max_err == 0.0 {
                "0".to_string()
            } else {
                format!("{:.2e}", c.max_err)
            };
            rows.push([
                c.op.clone(),
                c.case.clone(),
                max_err,
                format!("{:.0e}", c.tolerance),
                if c.passed() { "ok" } else { "FAIL" }.to_string(),
                c.problem.clone().unwrap_or_default(),
            ]);
        }
        let mut widths = [0usize; 6];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut text = format!(
            "op check of {} against the CPU reference computing in f64\n",
            self.subject
        );
        for row in &rows {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
                // Text columns align left, numbers right; the last column is not padded.
                match i {
                    2 | 3 => line.push_str(&format!("{cell:>w$}  ")),
                    5 => line.push_str(cell),
                    _ => line.push_str(&format!("{cell:<w$}  ")),
                }
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text.push_str(&format!(
            "{} cases, {} failed\n",
            self.cases.len(),
            self.failures()
        ));
        text
    }
}
