//! Learning-rate schedule: linear warmup, then cosine decay to `min_lr` at the last step.

/// Linear warmup + cosine decay, over 1-based step numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub lr: f32,
    pub min_lr: f32,
    pub warmup_steps: u64,
    pub max_steps: u64,
}

impl LrSchedule {
    /// The learning rate of step `step` (1-based).
    pub fn at(&self, step: u64) -> f32 {
        if step <= self.warmup_steps {
            // Reaches `lr` exactly at the end of warmup; never 0 at step 1.
            return self.lr * step as f32 / self.warmup_steps as f32;
        }
        let decay_steps = self.max_steps.saturating_sub(self.warmup_steps);
        if decay_steps == 0 {
            return self.lr;
        }
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        (f64::from(self.min_lr) + cosine * f64::from(self.lr - self.min_lr)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: LrSchedule = LrSchedule {
        lr: 1.0,
        min_lr: 0.1,
        warmup_steps: 10,
        max_steps: 110,
    };

    #[test]
    fn warms_up_linearly() {
        assert!((S.at(1) - 0.1).abs() < 1e-6);
        assert!((S.at(5) - 0.5).abs() < 1e-6);
        assert!((S.at(10) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn decays_along_a_cosine_to_min_lr() {
        assert!((S.at(60) - 0.55).abs() < 1e-6, "midpoint {}", S.at(60));
        assert!((S.at(110) - 0.1).abs() < 1e-6);
        assert!(
            (S.at(500) - 0.1).abs() < 1e-6,
            "stays at min_lr past the end"
        );
        let mut prev = S.at(10);
        for step in 11..=110 {
            assert!(S.at(step) <= prev);
            prev = S.at(step);
        }
    }

    #[test]
    fn no_warmup_starts_at_lr() {
        let s = LrSchedule {
            warmup_steps: 0,
            ..S
        };
        assert!((s.at(1) - 1.0).abs() < 1e-3);
    }
}
