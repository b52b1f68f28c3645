//! Per-epoch SAFE controller (paper Sec. 4.2): warm-up, candidate selection at `t_w`, and
//! gradual freezing along the cubic threshold of Eq. 4.

use serde::{Deserialize, Serialize};

use super::schedule::cubic_threshold;
use super::warmup::WarmupDetector;

/// How `tau_T` is chosen. The paper tunes it empirically (footnote 2) without giving values, and
/// LoRA importance scores (1 - CKA, often 1e-4..1e-1) scale with learning rate and model, so a
/// fixed number rarely transfers; `RelativeToMax(f)` uses `f *` the largest importance measured
/// at the end of warm-up, which transfers across runs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum TauTarget {
    Absolute(f64),
    RelativeToMax(f64),
}

impl TauTarget {
    /// Resolve against the scores at `t_w`. Non-finite scores are skipped; a negative maximum
    /// (rounding of CKA ~ 1) counts as 0.
    fn resolve(self, scores: &[f64]) -> f64 {
        match self {
            TauTarget::Absolute(v) => v,
            TauTarget::RelativeToMax(f) => {
                let max = scores
                    .iter()
                    .copied()
                    .filter(|s| s.is_finite())
                    .fold(0.0, f64::max);
                f * max
            }
        }
    }
}

/// Which output CKA compares with and without an adapter (both on the same input).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MonitorPoint {
    /// The adapted linear's output `X = xW^T + b + delta(x)` against `Y = xW^T + b`: both come
    /// out of the forward anyway, so monitoring adds no matmul.
    #[default]
    Linear,
    /// The transformer block's output with every adapter of the block against the same block
    /// with this one adapter removed: what the adapter changes after attention, the MLP and the
    /// norms, at one extra block forward per adapter.
    Block,
}

/// Which forwards SAFE measures importance on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Measure {
    /// Separate inference passes over a fixed, seeded subset of the training data
    /// (`monitor_examples` examples) at each round's end, layer by layer.
    Passes,
    /// The training steps just before each round's end (as many as hold `monitor_examples`
    /// examples): each micro-batch's CKA from the training forward's own rows (dropout
    /// included), averaged. No extra forward; the linear monitoring point only. The default:
    /// as accurate as `Passes` on the validation splits of BBC News and SpamAssassin, with a
    /// tenth of the monitoring FLOPs (BENCHMARKS.md, "SAFE's defaults").
    #[default]
    Steps,
}

/// SAFE settings; missing fields deserialize to their defaults, unknown ones are refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SafeConfig {
    /// `tau_T`; see [`TauTarget`]. Default `RelativeToMax(0.25)`, chosen on validation accuracy
    /// (BENCHMARKS.md, "SAFE's defaults").
    pub tau_final: TauTarget,
    /// `t_f` as a fraction of the total number of epochs:
    /// `t_f = max(t_w + 1, ceil(frac * total))`. Default 0.8.
    pub final_epoch_fraction: f64,
    /// Footnote 1's 5%.
    pub warmup_rel_tol: f64,
    /// Floor for the relative test so near-zero scores do not keep warm-up going. Default 1e-3.
    pub warmup_abs_floor: f64,
    /// Warm-up ends after this many rounds even if scores are still moving. 0 (the default):
    /// half the run's rounds (6 of 12), chosen on validation accuracy; a cap of 3 of 12 ended
    /// warm-up while scores still rose by 20-120% per round.
    pub max_warmup_epochs: usize,
    /// Examples measured per round: the training steps before a round's end that hold this many
    /// ([`Measure::Steps`]), or the size of the seeded monitoring subset ([`Measure::Passes`]).
    /// Default 64, chosen on validation accuracy: 64 and 128 gave the same mean over BBC News and
    /// SpamAssassin (32 and 256 less), 64 at half the monitoring FLOPs.
    pub monitor_examples: usize,
    /// Where CKA looks; see [`MonitorPoint`]. Default `Linear`.
    pub monitor: MonitorPoint,
    /// Which forwards CKA is measured on; see [`Measure`]. The block point always measures on
    /// separate passes.
    pub measure: Measure,
    /// SAFE decisions per epoch. The paper decides once per epoch over runs of 50-100 epochs; a
    /// short run (a few epochs on a CPU) can decide several times per epoch, each decision point
    /// then playing the role of the paper's epoch (`t`, `t_w`, `t_f` count these rounds).
    /// 0 (the default): chosen from the run's length, about 12 rounds per run and at most one
    /// per 24 steps (`train::run::StepPlan`).
    pub rounds_per_epoch: usize,
}

impl SafeConfig {
    /// Whether importance is measured on the training steps (see [`Measure::Steps`]).
    pub fn in_step(&self) -> bool {
        self.measure == Measure::Steps && self.monitor == MonitorPoint::Linear
    }
}

impl Default for SafeConfig {
    fn default() -> Self {
        Self {
            tau_final: TauTarget::RelativeToMax(0.25),
            final_epoch_fraction: 0.8,
            warmup_rel_tol: 0.05,
            warmup_abs_floor: 1e-3,
            max_warmup_epochs: 0,
            monitor_examples: 64,
            monitor: MonitorPoint::Linear,
            measure: Measure::Steps,
            rounds_per_epoch: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Still measuring; nothing can freeze.
    WarmUp,
    /// Warm-up over and some candidate is still trainable.
    Freezing,
    /// Every candidate is frozen (or there were none): nothing can change any more, so the
    /// trainer may stop measuring CKA.
    Done,
}

/// What [`SafeController::end_of_epoch`] decided.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochDecision {
    pub epoch: usize,
    /// Phase after this epoch's decisions.
    pub phase: Phase,
    /// `tau_t` of Eq. 4 for this epoch (0 during warm-up).
    pub threshold: f64,
    /// Adapters frozen at this epoch, ascending.
    pub newly_frozen: Vec<usize>,
    /// Frozen state of every adapter after this epoch.
    pub frozen: Vec<bool>,
}

/// The SAFE state machine. Serializable so it can live in training checkpoints and resume.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SafeController {
    config: SafeConfig,
    total_epochs: usize,
    n_adapters: usize,
    warmup: WarmupDetector,
    t_w: Option<usize>,
    t_f: Option<usize>,
    tau_final: Option<f64>,
    candidates: Vec<bool>,
    frozen_at: Vec<Option<usize>>,
    /// Scores as passed, one row per epoch; may hold NaN, hence the custom deserializer.
    #[serde(deserialize_with = "crate::safe::nan_serde::vec_vec")]
    history: Vec<Vec<f64>>,
    #[serde(deserialize_with = "crate::safe::nan_serde::vec")]
    thresholds: Vec<f64>,
}

impl SafeController {
    /// Panics on a non-finite `tau_final` or `final_epoch_fraction`, or invalid warm-up settings.
    pub fn new(config: SafeConfig, n_adapters: usize, total_epochs: usize) -> Self {
        let (TauTarget::Absolute(tau) | TauTarget::RelativeToMax(tau)) = config.tau_final;
        assert!(tau.is_finite(), "tau_final must be finite");
        assert!(
            config.final_epoch_fraction.is_finite(),
            "final_epoch_fraction must be finite"
        );
        let warmup = WarmupDetector::new(
            config.warmup_rel_tol,
            config.warmup_abs_floor,
            match config.max_warmup_epochs {
                0 => total_epochs.div_ceil(2).max(1),
                cap => cap,
            },
        );
        Self {
            config,
            total_epochs,
            n_adapters,
            warmup,
            t_w: None,
            t_f: None,
            tau_final: None,
            candidates: vec![false; n_adapters],
            frozen_at: vec![None; n_adapters],
            history: Vec::new(),
            thresholds: Vec::new(),
        }
    }

    /// Epochs are 1-based; call exactly once at the end of each epoch, in order (panics
    /// otherwise, and if `scores.len() != n_adapters`), with every adapter's importance. Frozen
    /// adapters' scores are recorded but ignored. A NaN score means "unknown": it blocks the
    /// end of warm-up by stability (not by `max_warmup_epochs`) and never freezes an adapter.
    ///
    /// * Warm-up: scores go to the [`WarmupDetector`]; the epoch at which it ends is `t_w`.
    ///   There `tau_T` is resolved, candidates = `{i : score_i < tau_T}` (fixed from then on),
    ///   and `t_f = max(t_w + 1, ceil(final_epoch_fraction * total_epochs))`.
    /// * `t > t_w`: `tau_t` from Eq. 4; every candidate not yet frozen whose current score is
    ///   `< tau_t` freezes. Eq. 4 gives `tau_{t_w} = 0`, so freezing starts at `t_w + 1` (an
    ///   importance slightly below 0 from rounding does not freeze at `t_w` either). After `t_f`
    ///   the threshold stays at `tau_T` and still-trainable candidates can freeze later.
    /// * Frozen adapters never unfreeze.
    pub fn end_of_epoch(&mut self, epoch: usize, scores: &[f64]) -> EpochDecision {
        assert_eq!(scores.len(), self.n_adapters, "one score per adapter");
        assert_eq!(
            epoch,
            self.history.len() + 1,
            "end_of_epoch must be called once per epoch, in order, 1-based"
        );
        self.history.push(scores.to_vec());
        if self.t_w.is_none() && self.warmup.observe(scores) {
            let tau = self.config.tau_final.resolve(scores);
            self.t_w = Some(epoch);
            self.tau_final = Some(tau);
            self.candidates = scores.iter().map(|&s| s < tau).collect();
            // The small epsilon keeps e.g. 0.14 * 50 = 7.000000000000001 from becoming 8.
            let by_fraction =
                (self.config.final_epoch_fraction * self.total_epochs as f64 - 1e-9).ceil();
            self.t_f = Some((by_fraction.max(0.0) as usize).max(epoch + 1));
        }
        let mut newly_frozen = Vec::new();
        let threshold = match (self.t_w, self.t_f, self.tau_final) {
            (Some(t_w), Some(t_f), Some(tau)) => {
                let threshold = cubic_threshold(epoch, t_w, t_f, tau);
                if epoch > t_w {
                    for (i, &s) in scores.iter().enumerate() {
                        if self.candidates[i] && self.frozen_at[i].is_none() && s < threshold {
                            self.frozen_at[i] = Some(epoch);
                            newly_frozen.push(i);
                        }
                    }
                }
                threshold
            }
            _ => 0.0,
        };
        self.thresholds.push(threshold);
        EpochDecision {
            epoch,
            phase: self.phase(),
            threshold,
            newly_frozen,
            frozen: self.frozen_at.iter().map(Option::is_some).collect(),
        }
    }

    /// Resuming: the controller of this run (`current`, None without SAFE) takes over the state
    /// of the checkpoint's (`saved`), which must have been made for the same run: both with SAFE
    /// or both without, the same settings, the same number of adapters (target modules and
    /// layers) and of epochs. Otherwise an error says what differs (the checkpoint's value first).
    pub fn resume(current: Option<&mut Self>, saved: Option<&Self>) -> Result<(), String> {
        let (c, saved) = match (current, saved) {
            (None, None) => return Ok(()),
            (Some(_), None) => {
                return Err(
                    "the checkpoint was written by a run without SAFE; this run uses \
                     SAFE (resume with the method it was started with)"
                        .into(),
                )
            }
            (None, Some(_)) => {
                return Err(
                    "the checkpoint was written by a SAFE run; this run does not use \
                     SAFE (resume with the method it was started with)"
                        .into(),
                )
            }
            (Some(c), Some(s)) => (c, s),
        };
        let mut diffs = Vec::new();
        let (was, now) = (
            serde_json::to_value(&saved.config).map_err(|e| e.to_string())?,
            serde_json::to_value(&c.config).map_err(|e| e.to_string())?,
        );
        if let (Some(was), Some(now)) = (was.as_object(), now.as_object()) {
            for (k, v) in was {
                if now.get(k) != Some(v) {
                    let n = now.get(k).map_or("nothing".into(), |n| n.to_string());
                    diffs.push(format!("SAFE setting {k}: {v} in the checkpoint, {n} now"));
                }
            }
        }
        if saved.n_adapters != c.n_adapters {
            diffs.push(format!(
                "adapters: {} in the checkpoint, {} now (other target modules or layers)",
                saved.n_adapters, c.n_adapters
            ));
        }
        if saved.total_epochs != c.total_epochs {
            diffs.push(format!(
                "SAFE rounds: {} in the checkpoint, {} now",
                saved.total_epochs, c.total_epochs
            ));
        }
        if !diffs.is_empty() {
            return Err(format!(
                "the checkpoint was written with other settings: {}",
                diffs.join("; ")
            ));
        }
        *c = saved.clone();
        Ok(())
    }

    /// Whether a round can still change anything (not [`Phase::Done`]): only then does the
    /// trainer measure importance.
    pub fn measures(&self) -> bool {
        self.phase() != Phase::Done
    }

    /// Which adapters' scores a round can use: during warm-up every adapter's; after it, only
    /// the candidates not yet frozen (the others' scores are recorded but change nothing), so
    /// the trainer measures only those.
    pub fn needs_scores(&self) -> Vec<bool> {
        self.candidates
            .iter()
            .zip(&self.frozen_at)
            .map(|(&c, f)| (self.t_w.is_none() || c) && f.is_none())
            .collect()
    }

    /// Current phase (see [`Phase`]); useful after resuming from a checkpoint.
    pub fn phase(&self) -> Phase {
        if self.t_w.is_none() {
            Phase::WarmUp
        } else if self
            .candidates
            .iter()
            .zip(&self.frozen_at)
            .all(|(&c, f)| !c || f.is_some())
        {
            Phase::Done
        } else {
            Phase::Freezing
        }
    }

    /// Epoch at which each adapter froze.
    pub fn frozen_at(&self) -> &[Option<usize>] {
        &self.frozen_at
    }

    /// Scores passed to each call of `end_of_epoch`, in epoch order.
    pub fn history(&self) -> &[Vec<f64>] {
        &self.history
    }

    /// Threshold used at each epoch (0 during warm-up).
    pub fn thresholds(&self) -> &[f64] {
        &self.thresholds
    }

    /// `t_w`: the epoch at which warm-up ended.
    pub fn warmup_end(&self) -> Option<usize> {
        self.t_w
    }

    /// `t_f`: the epoch from which the threshold equals `tau_T` (known once warm-up ended).
    pub fn final_epoch(&self) -> Option<usize> {
        self.t_f
    }

    /// Freezing candidates chosen at `t_w` (all false before).
    pub fn candidates(&self) -> &[bool] {
        &self.candidates
    }

    /// Resolved `tau_T` (known once warm-up ended).
    pub fn tau_final_value(&self) -> Option<f64> {
        self.tau_final
    }

    pub fn config(&self) -> &SafeConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tau: TauTarget, frac: f64, max_warmup: usize) -> SafeConfig {
        SafeConfig {
            tau_final: tau,
            final_epoch_fraction: frac,
            max_warmup_epochs: max_warmup,
            ..SafeConfig::default()
        }
    }

    #[test]
    fn resume_takes_the_saved_state_only_for_the_same_run() {
        let cfg = config(TauTarget::Absolute(0.1), 0.8, 5);
        let mut saved = SafeController::new(cfg.clone(), 4, 6);
        saved.end_of_epoch(1, &[0.5, 0.5, 0.1, 0.01]);
        // Same run: the state is taken over, and the next epoch continues it.
        let mut c = SafeController::new(cfg.clone(), 4, 6);
        SafeController::resume(Some(&mut c), Some(&saved)).unwrap();
        assert_eq!(c.history(), saved.history());
        c.end_of_epoch(2, &[0.5, 0.5, 0.1, 0.01]);
        SafeController::resume(None, None).unwrap();
        // Other target modules: another number of adapters.
        let mut other = SafeController::new(cfg.clone(), 6, 6);
        let e = SafeController::resume(Some(&mut other), Some(&saved)).unwrap_err();
        assert!(e.contains("adapters: 4 in the checkpoint, 6 now"), "{e}");
        assert!(
            other.history().is_empty(),
            "a refused state must not be taken"
        );
        // Other SAFE settings: each one named.
        let mut cfg2 = cfg.clone();
        cfg2.tau_final = TauTarget::Absolute(0.2);
        cfg2.rounds_per_epoch = 3;
        let mut other = SafeController::new(cfg2, 4, 6);
        let e = SafeController::resume(Some(&mut other), Some(&saved)).unwrap_err();
        assert!(
            e.contains("SAFE setting tau_final") && e.contains("0.2"),
            "{e}"
        );
        assert!(
            e.contains("SAFE setting rounds_per_epoch: 0 in the checkpoint, 3 now"),
            "{e}"
        );
        let mut other = SafeController::new(cfg.clone(), 4, 12);
        let e = SafeController::resume(Some(&mut other), Some(&saved)).unwrap_err();
        assert!(
            e.contains("SAFE rounds: 6 in the checkpoint, 12 now"),
            "{e}"
        );
        // SAFE on one side only.
        let mut c = SafeController::new(cfg, 4, 6);
        let e = SafeController::resume(Some(&mut c), None).unwrap_err();
        assert!(e.contains("without SAFE"), "{e}");
        let e = SafeController::resume(None, Some(&saved)).unwrap_err();
        assert!(e.contains("written by a SAFE run"), "{e}");
    }

    #[test]
    fn absolute_threshold_freezes_on_schedule() {
        let mut c = SafeController::new(config(TauTarget::Absolute(0.1), 0.5, 3), 4, 10);
        let s = [0.01, 0.05, 0.09, 0.3];
        let d1 = c.end_of_epoch(1, &s);
        assert_eq!((d1.phase, d1.threshold), (Phase::WarmUp, 0.0));
        // Identical scores -> stable -> t_w = 2; candidates = score < 0.1 -> {0, 1, 2};
        // t_f = max(3, ceil(0.5 * 10)) = 5. tau_2 = 0, so nothing freezes at t_w.
        let d2 = c.end_of_epoch(2, &s);
        assert_eq!((d2.phase, d2.threshold), (Phase::Freezing, 0.0));
        assert!(d2.newly_frozen.is_empty());
        assert_eq!(c.warmup_end(), Some(2));
        assert_eq!(c.final_epoch(), Some(5));
        assert_eq!(c.candidates(), &[true, true, true, false]);
        assert_eq!(c.tau_final_value(), Some(0.1));
        // t = 3: tau = 0.1 (1 - (2/3)^3) = 0.1 * 19/27 ~ 0.0704 -> adapters 0, 1 freeze, 2 not.
        let d3 = c.end_of_epoch(3, &s);
        assert!((d3.threshold - 0.1 * 19.0 / 27.0).abs() < 1e-15);
        assert_eq!(d3.newly_frozen, vec![0, 1]);
        assert_eq!(d3.frozen, vec![true, true, false, false]);
        // t = 4: tau = 0.1 * 26/27 ~ 0.0963: adapter 2 at 0.097 stays; adapter 3 at 0.01 is no
        // candidate; frozen adapters' high scores are ignored.
        let d4 = c.end_of_epoch(4, &[0.5, 0.5, 0.097, 0.01]);
        assert!((d4.threshold - 0.1 * 26.0 / 27.0).abs() < 1e-15);
        assert!(d4.newly_frozen.is_empty());
        assert_eq!(d4.phase, Phase::Freezing);
        // t = 5 = t_f: tau = 0.1 -> adapter 2 (0.099) freezes; all candidates frozen -> Done.
        let d5 = c.end_of_epoch(5, &[0.5, 0.5, 0.099, 0.01]);
        assert_eq!((d5.threshold, d5.newly_frozen.clone()), (0.1, vec![2]));
        assert_eq!(d5.phase, Phase::Done);
        let d6 = c.end_of_epoch(6, &[0.0, 0.0, 0.0, 0.0]);
        assert_eq!((d6.phase, d6.newly_frozen.len()), (Phase::Done, 0));
        assert_eq!(c.frozen_at(), &[Some(3), Some(3), Some(5), None]);
        assert_eq!(c.history().len(), 6);
        assert_eq!(c.history()[3], vec![0.5, 0.5, 0.097, 0.01]);
        assert_eq!(c.thresholds().len(), 6);
        assert_eq!(&c.thresholds()[..2], &[0.0, 0.0]);
    }

    /// The scores `needs_scores` leaves out change nothing: a run given NaN there (what the
    /// trainer's measurement gives for adapters it skips) freezes the same adapters at the same
    /// rounds; during warm-up every adapter is needed, after it the unfrozen candidates only.
    #[test]
    fn scores_not_needed_change_no_decision() {
        let cfg = config(TauTarget::Absolute(0.1), 0.5, 3);
        let (mut full, mut partial) = (
            SafeController::new(cfg.clone(), 4, 8),
            SafeController::new(cfg, 4, 8),
        );
        let rounds = [
            [0.02, 0.05, 0.09, 0.3],
            [0.02, 0.05, 0.09, 0.3],
            [0.01, 0.06, 0.098, 0.2],
            [0.03, 0.05, 0.097, 0.01],
            [0.5, 0.5, 0.099, 0.01],
        ];
        let mut needed = Vec::new();
        for (t, s) in rounds.iter().enumerate() {
            let need = partial.needs_scores();
            let given: Vec<f64> = s
                .iter()
                .zip(&need)
                .map(|(&v, &n)| if n { v } else { f64::NAN })
                .collect();
            let (a, b) = (
                full.end_of_epoch(t + 1, s),
                partial.end_of_epoch(t + 1, &given),
            );
            assert_eq!((a.newly_frozen, a.phase), (b.newly_frozen, b.phase));
            needed.push(need);
        }
        assert_eq!(full.frozen_at(), partial.frozen_at());
        // Warm-up ends at round 2 with candidates 0, 1, 2 (t_f = 4); 0 and 1 freeze at round 3
        // (threshold 0.0875), 2 at round 4 (0.1).
        assert_eq!(full.frozen_at(), &[Some(3), Some(3), Some(4), None]);
        assert_eq!(needed[0], vec![true; 4]);
        assert_eq!(needed[2], vec![true, true, true, false]);
        assert_eq!(needed[3], vec![false, false, true, false]);
        assert_eq!(needed[4], vec![false; 4]);
    }

    #[test]
    fn relative_tau_and_forced_warmup_end() {
        let mut c = SafeController::new(config(TauTarget::RelativeToMax(0.5), 0.8, 2), 3, 4);
        assert_eq!(c.end_of_epoch(1, &[0.02, 0.3, 0.1]).phase, Phase::WarmUp);
        // Not stable, but max_warmup_epochs = 2 -> t_w = 2; tau_T = 0.5 * 0.4 = 0.2;
        // candidates: 0.01 < 0.2 yes, 0.4 no, 0.3 no. t_f = max(3, ceil(3.2)) = 4.
        c.end_of_epoch(2, &[0.01, 0.4, 0.3]);
        assert_eq!(c.warmup_end(), Some(2));
        assert!((c.tau_final_value().unwrap() - 0.2).abs() < 1e-15);
        assert_eq!(c.candidates(), &[true, false, false]);
        assert_eq!(c.final_epoch(), Some(4));
        // t = 3: tau = 0.2 (1 - 1/8) = 0.175; 0.18 stays; adapter 2 at 0.0 is no candidate.
        let d3 = c.end_of_epoch(3, &[0.18, 0.4, 0.0]);
        assert!((d3.threshold - 0.175).abs() < 1e-15);
        assert!(d3.newly_frozen.is_empty());
        // t = 4: tau = 0.2; 0.19 freezes.
        let d4 = c.end_of_epoch(4, &[0.19, 0.4, 0.0]);
        assert_eq!((d4.newly_frozen, d4.phase), (vec![0], Phase::Done));
    }

    /// The default warm-up cap (0) is half the run's rounds: scores still moving by 50% a round
    /// end warm-up at round 2 of 4 and at round 6 of 12, not before.
    #[test]
    fn the_default_warmup_cap_is_half_the_rounds() {
        for (rounds, end) in [(4, 2), (12, 6), (1, 1)] {
            let mut c =
                SafeController::new(config(TauTarget::RelativeToMax(0.25), 0.8, 0), 2, rounds);
            let mut scores = [0.1, 0.2];
            for t in 1..=rounds {
                c.end_of_epoch(t, &scores);
                scores = scores.map(|s| s * 1.5);
                if t < end {
                    assert_eq!(c.warmup_end(), None, "{rounds} rounds: ended at {t}");
                }
            }
            assert_eq!(c.warmup_end(), Some(end), "{rounds} rounds");
        }
    }

    #[test]
    fn t_f_rounding_and_floor() {
        // 0.14 * 50 = 7.000000000000001 in f64; t_f must be 7, not 8.
        let mut c = SafeController::new(config(TauTarget::Absolute(0.1), 0.14, 1), 1, 50);
        c.end_of_epoch(1, &[0.5]);
        assert_eq!(c.final_epoch(), Some(7));
        // Fraction before t_w: t_f = t_w + 1, so tau jumps to tau_T at t_w + 1.
        let mut c = SafeController::new(config(TauTarget::Absolute(0.1), 0.1, 1), 1, 10);
        c.end_of_epoch(1, &[0.05]);
        assert_eq!((c.warmup_end(), c.final_epoch()), (Some(1), Some(2)));
        // The comparison is strict: a score equal to tau_t does not freeze.
        assert!(c.end_of_epoch(2, &[0.1]).newly_frozen.is_empty());
        assert_eq!(c.end_of_epoch(3, &[0.05]).newly_frozen, vec![0]);
    }

    #[test]
    fn never_unfreezes_and_keeps_freezing_after_t_f() {
        let mut c = SafeController::new(config(TauTarget::Absolute(0.1), 0.3, 1), 3, 10);
        // t_w = 1 (max 1 warm-up epoch); t_f = max(2, 3) = 3. A score just below 0 does not
        // freeze at t_w.
        let d1 = c.end_of_epoch(1, &[-1e-17, 0.05, 0.02]);
        assert!(d1.newly_frozen.is_empty());
        assert_eq!(c.candidates(), &[true, true, true]);
        let seq = [
            [0.01, 0.2, 0.2], // t=2: tau = 0.1 (1 - 1/8) = 0.0875 -> 0 freezes
            [0.9, 0.2, 0.2],  // t=3 = t_f: 0 stays frozen despite 0.9
            [0.9, 0.2, 0.2],  // nothing
            [0.9, 0.2, 0.05], // t=5 > t_f: 2 freezes at tau_T
            [0.9, 0.09, 0.9], // t=6: 1 freezes
            [0.9, 0.9, 0.9],  // Done, nothing unfreezes
        ];
        let mut prev = vec![false; 3];
        for (k, s) in seq.iter().enumerate() {
            let d = c.end_of_epoch(k + 2, s);
            for (p, f) in prev.iter().zip(&d.frozen) {
                assert!(!p || *f, "an adapter unfroze at epoch {}", k + 2);
            }
            prev = d.frozen;
        }
        assert_eq!(c.frozen_at(), &[Some(2), Some(6), Some(5)]);
        assert_eq!(c.phase(), Phase::Done);
    }

    #[test]
    fn no_candidates_means_done_at_t_w() {
        let mut c = SafeController::new(config(TauTarget::Absolute(0.01), 0.8, 1), 2, 5);
        assert_eq!(c.end_of_epoch(1, &[0.5, 0.2]).phase, Phase::Done);
        assert!(c.end_of_epoch(2, &[0.0, 0.0]).newly_frozen.is_empty());
    }

    #[test]
    fn nan_scores_never_freeze() {
        let mut c = SafeController::new(config(TauTarget::RelativeToMax(0.5), 0.5, 2), 2, 6);
        c.end_of_epoch(1, &[0.01, f64::NAN]);
        c.end_of_epoch(2, &[0.01, f64::NAN]);
        // Max over finite scores only: tau_T = 0.005; NaN is never a candidate.
        assert_eq!(c.tau_final_value(), Some(0.005));
        assert_eq!(c.candidates(), &[false, false]);
    }

    #[test]
    #[should_panic(expected = "in order")]
    fn out_of_order_epoch_panics() {
        let mut c = SafeController::new(SafeConfig::default(), 1, 5);
        c.end_of_epoch(1, &[0.1]);
        c.end_of_epoch(3, &[0.1]);
    }

    #[test]
    fn serde_roundtrip_preserves_decisions() {
        let cfg = SafeConfig {
            warmup_rel_tol: 0.1,
            ..config(TauTarget::RelativeToMax(0.6), 0.8, 4)
        };
        let mut a = SafeController::new(cfg, 4, 8);
        let seq = [
            [0.02, 0.10, 0.05, f64::NAN],
            [0.021, 0.104, 0.052, 0.2],    // NaN before -> not stable
            [0.0205, 0.103, 0.051, 0.198], // stable within 10% -> t_w = 3, tau_T = 0.6*0.198
            [0.02, 0.1, 0.09, 0.2],
            [0.02, 0.1, 0.05, 0.2],
            [0.02, 0.1, 0.05, 0.2],
            [0.02, 0.1, 0.05, 0.2],
            [0.02, 0.1, 0.05, 0.2],
        ];
        for (k, s) in seq[..3].iter().enumerate() {
            a.end_of_epoch(k + 1, s);
        }
        assert_eq!(a.warmup_end(), Some(3));
        let json = serde_json::to_string(&a).unwrap();
        let mut b: SafeController = serde_json::from_str(&json).unwrap();
        assert!(b.history()[0][3].is_nan());
        assert_eq!(b.candidates(), a.candidates());
        let mut froze_any = false;
        for (k, s) in seq.iter().enumerate().skip(3) {
            let (da, db) = (a.end_of_epoch(k + 1, s), b.end_of_epoch(k + 1, s));
            assert_eq!(da, db);
            froze_any |= !da.newly_frozen.is_empty();
        }
        assert!(froze_any, "the sequence should exercise freezing");
        assert_eq!(a.frozen_at(), b.frozen_at());
        assert_eq!(a.thresholds(), b.thresholds());
        // Config: missing fields take defaults; enum form is externally tagged.
        let cfg: SafeConfig =
            serde_json::from_str(r#"{"tau_final":{"Absolute":0.02},"max_warmup_epochs":5}"#)
                .unwrap();
        assert_eq!(cfg.tau_final, TauTarget::Absolute(0.02));
        assert_eq!(cfg.max_warmup_epochs, 5);
        assert_eq!(
            cfg.final_epoch_fraction,
            SafeConfig::default().final_epoch_fraction
        );
    }
}
