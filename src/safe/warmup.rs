//! End of the warm-up stage (paper Sec. 4, footnote 1): warm-up lasts until the importance score
//! of every adapter changes by less than 5% between consecutive epochs.

use serde::{Deserialize, Serialize};

/// Detects the first epoch at which every adapter's importance moved by at most `rel_tol`
/// relative to the previous epoch:
/// `|s_t - s_{t-1}| <= rel_tol * max(|s_{t-1}|, abs_floor)`.
///
/// `abs_floor` exists because importance scores of LoRA adapters can be ~1e-4: a purely relative
/// test would see noise at that scale as large moves and never end. Warm-up also ends once
/// `max_epochs` epochs have been observed, so a noisy run still reaches the freezing stage.
/// Stability needs two observations, so with `max_epochs >= 2` the earliest end is epoch 2;
/// `max_epochs` of 0 or 1 ends warm-up at the first observation.
/// A non-finite score or a change in the number of scores counts as "not stable".
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WarmupDetector {
    rel_tol: f64,
    abs_floor: f64,
    max_epochs: usize,
    epochs_observed: usize,
    #[serde(deserialize_with = "crate::safe::nan_serde::opt_vec")]
    previous: Option<Vec<f64>>,
    ended: bool,
}

impl Default for WarmupDetector {
    /// 5% (footnote 1), floor 1e-3, at most 3 warm-up epochs.
    fn default() -> Self {
        Self::new(0.05, 1e-3, 3)
    }
}

impl WarmupDetector {
    /// Panics on a negative or non-finite `rel_tol` / `abs_floor`.
    pub fn new(rel_tol: f64, abs_floor: f64, max_epochs: usize) -> Self {
        assert!(
            rel_tol.is_finite() && rel_tol >= 0.0,
            "rel_tol must be >= 0"
        );
        assert!(
            abs_floor.is_finite() && abs_floor >= 0.0,
            "abs_floor must be >= 0"
        );
        Self {
            rel_tol,
            abs_floor,
            max_epochs,
            epochs_observed: 0,
            previous: None,
            ended: false,
        }
    }

    /// Feed the scores measured at the end of one epoch; returns true when warm-up has ended
    /// (now or before). Once ended, further calls change nothing.
    pub fn observe(&mut self, scores: &[f64]) -> bool {
        if self.ended {
            return true;
        }
        self.epochs_observed += 1;
        let stable = self.previous.as_deref().is_some_and(|prev| {
            prev.len() == scores.len()
                && prev
                    .iter()
                    .zip(scores)
                    .all(|(&p, &s)| (s - p).abs() <= self.rel_tol * p.abs().max(self.abs_floor))
        });
        self.ended = stable || self.epochs_observed >= self.max_epochs;
        self.previous = Some(scores.to_vec());
        self.ended
    }

    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Number of epochs fed to [`observe`](Self::observe) before (and including) the end.
    pub fn epochs_observed(&self) -> usize {
        self.epochs_observed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_at_first_stable_epoch() {
        let mut d = WarmupDetector::new(0.05, 1e-3, 10);
        assert!(!d.observe(&[0.1, 0.01]));
        // Adapter 0 doubled: not stable.
        assert!(!d.observe(&[0.2, 0.0105]));
        // 0.2 -> 0.215 is 7.5% (> 5%) even though adapter 1 moved only ~1%: still not stable.
        assert!(!d.observe(&[0.215, 0.0106]));
        assert!(!d.ended());
        // 0.215 -> 0.22: 2.3%; 0.0106 -> 0.0109: 2.8% -> ends at epoch 4.
        assert!(d.observe(&[0.22, 0.0109]));
        assert!(d.ended());
        assert_eq!(d.epochs_observed(), 4);
        // Stays ended even if scores jump afterwards.
        assert!(d.observe(&[0.9, 0.9]));
        assert_eq!(d.epochs_observed(), 4);
    }

    #[test]
    fn boundary_is_inclusive_and_downward_moves_count() {
        // Powers of two keep the arithmetic exact: the bound is 0.25 * 0.5 = 0.125.
        let mut d = WarmupDetector::new(0.25, 0.0, 10);
        d.observe(&[1.0]);
        assert!(!d.observe(&[0.5])); // -50%
        assert!(d.observe(&[0.625])); // +0.125: exactly on the bound, counts as stable
        let mut above = WarmupDetector::new(0.25, 0.0, 10);
        above.observe(&[0.5]);
        assert!(!above.observe(&[0.625 + 1e-9]));
    }

    #[test]
    fn abs_floor_keeps_tiny_scores_from_flapping() {
        // 1e-5 -> 5e-5 is a 400% move, but |4e-5| <= 0.05 * max(1e-5, 1e-3) = 5e-5.
        let mut with_floor = WarmupDetector::new(0.05, 1e-3, 10);
        with_floor.observe(&[1e-5, 0.5]);
        assert!(with_floor.observe(&[5e-5, 0.51]));
        let mut no_floor = WarmupDetector::new(0.05, 0.0, 10);
        no_floor.observe(&[1e-5, 0.5]);
        assert!(!no_floor.observe(&[5e-5, 0.51]));
        // 1e-5 -> 7e-5 moves 6e-5 > 5e-5: the floor is a bound, not a free pass.
        let mut d = WarmupDetector::new(0.05, 1e-3, 10);
        d.observe(&[1e-5]);
        assert!(!d.observe(&[7e-5]));
    }

    #[test]
    fn max_epochs_forces_the_end() {
        let mut d = WarmupDetector::new(0.05, 1e-3, 3);
        assert!(!d.observe(&[0.1]));
        assert!(!d.observe(&[0.3]));
        assert!(d.observe(&[0.9]));
        let mut one = WarmupDetector::new(0.05, 1e-3, 1);
        assert!(one.observe(&[0.1]));
    }

    #[test]
    fn nan_is_never_stable_and_survives_serde() {
        let mut d = WarmupDetector::new(0.05, 1e-3, 5);
        d.observe(&[0.1, f64::NAN]);
        let json = serde_json::to_string(&d).unwrap();
        let mut back: WarmupDetector = serde_json::from_str(&json).unwrap();
        assert!(!back.observe(&[0.1, f64::NAN]));
        assert!(!d.observe(&[0.1, f64::NAN]));
        assert!(back.observe(&[0.1, 0.2]) == d.observe(&[0.1, 0.2]));
        assert!(back.observe(&[0.1, 0.2]));
    }
}
