//! What a validation decides: whether the adapter is the run's best so far (the caller then
//! writes it), and when early stopping ends the run. Validations come at every epoch's end and,
//! with `eval_steps`, every that many optimizer steps; each counts once.

use super::checkpoint::TrainerState;
use serde::{Deserialize, Serialize};

/// A validation between epoch ends (`eval_steps`): one line of `metrics.jsonl` (told apart from
/// the epoch lines by its `step`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepEval {
    pub epoch: usize,
    /// Optimizer steps done in the epoch (1-based step the validation followed).
    pub step: usize,
    pub global_step: usize,
    pub validation_metric: f64,
    pub validation_loss: f64,
}

/// Records a validation of `metric` at `epoch` in `state`. The first validation and any better
/// than the best so far become the best (returns true: write the adapter); any other is one more
/// without improvement, and the `patience`-th of those in a row (0: never) ends the run
/// (`state.stopped_early`).
pub fn record(
    state: &mut TrainerState,
    metric: f64,
    higher_is_better: bool,
    patience: usize,
    epoch: usize,
) -> bool {
    let better = if higher_is_better {
        metric > state.best_metric
    } else {
        metric < state.best_metric
    };
    if state.best_epoch == 0 || better {
        state.best_metric = metric;
        state.best_epoch = epoch;
        state.best_step = state.global_step;
        state.evals_since_best = 0;
        return true;
    }
    state.evals_since_best += 1;
    if patience > 0 && state.evals_since_best >= patience {
        state.stopped_early = true;
    }
    false
}

/// Whether the step just taken (`state.global_step`) is one that `every` (0: none) asks for.
pub fn due(every: usize, global_step: usize) -> bool {
    every > 0 && global_step.is_multiple_of(every)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Perplexity-like (lower is better) with patience 2: the first value is the best; a tie is
    /// no improvement; a better value resets the count; two in a row without one stop the run.
    #[test]
    fn patience_counts_validations_without_improvement() {
        let mut s = TrainerState::default();
        let mut kept = Vec::new();
        for (i, m) in [5.0, 4.0, 4.0, 3.5, 3.6, 3.5].into_iter().enumerate() {
            s.global_step = 10 * (i + 1);
            assert!(!s.stopped_early, "stopped before validation {i}");
            kept.push(record(&mut s, m, false, 2, 1));
        }
        assert_eq!(kept, [true, true, false, true, false, false]);
        assert!(s.stopped_early);
        assert_eq!(
            (s.best_metric, s.best_step, s.evals_since_best),
            (3.5, 40, 2)
        );
        // Higher is better, no patience: never stops.
        let mut s = TrainerState::default();
        for m in [0.5, 0.4, 0.3, 0.2] {
            record(&mut s, m, true, 0, 1);
        }
        assert!(!s.stopped_early);
        assert_eq!((s.best_metric, s.evals_since_best), (0.5, 3));
        assert!(due(5, 10) && !due(5, 11) && !due(0, 10));
    }
}
