//! What the classification trainer (`trainer.rs`) and the causal-LM trainer (`lm.rs`) share: the
//! step plan, starting or resuming from a checkpoint, SAFE's rounds, each epoch's memory
//! bookkeeping and the run's totals in `summary.json`.

use super::checkpoint::{self, TrainerState};
use super::config::Method;
use super::fit::EpochLog;
use super::frozen_cache::FrozenCache;
use crate::adapters::{Adapted, AdapterId, ParamId};
use crate::memory::{self, MemTracker};
use crate::model::StepMemory;
use crate::nn::optim::{AdamW, LrScheduler, ParamUpdate};
use crate::safe::{EpochDecision, SafeController};
use anyhow::Result;
use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// How a run's examples become optimizer steps, and where SAFE's rounds end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepPlan {
    /// Examples per forward/backward pass.
    pub micro: usize,
    /// Passes per optimizer step.
    pub accum: usize,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
    /// Linear learning-rate warm-up, in steps.
    pub warmup_steps: usize,
    /// SAFE decisions per epoch: at least 1, at most one per step.
    pub rounds_per_epoch: usize,
}

/// SAFE decisions per run when the run's length chooses them (`rounds_per_epoch` 0): enough for
/// warm-up to end and the threshold to rise while freezing still has steps to pay off.
pub const AUTO_ROUNDS_PER_RUN: usize = 12;
/// ... and no more than one per this many steps, so that a round's scores have moved.
pub const MIN_STEPS_PER_ROUND: usize = 24;

impl StepPlan {
    /// `max_steps_per_epoch` of 0 means whole epochs.
    pub fn new(
        examples: usize,
        batch_size: usize,
        grad_accum: usize,
        max_steps_per_epoch: usize,
        epochs: usize,
        warmup_ratio: f64,
        rounds_per_epoch: usize,
    ) -> Self {
        let (micro, accum) = (batch_size.max(1), grad_accum.max(1));
        let full_steps = examples.div_ceil(micro * accum);
        let steps_per_epoch = match max_steps_per_epoch {
            0 => full_steps,
            m => m.min(full_steps),
        };
        let total_steps = steps_per_epoch * epochs;
        Self {
            micro,
            accum,
            steps_per_epoch,
            total_steps,
            warmup_steps: (warmup_ratio * total_steps as f64).round() as usize,
            rounds_per_epoch: match rounds_per_epoch {
                0 => ((AUTO_ROUNDS_PER_RUN as f64 / epochs.max(1) as f64).round() as usize)
                    .clamp(1, (steps_per_epoch / MIN_STEPS_PER_ROUND).max(1)),
                r => r.clamp(1, steps_per_epoch.max(1)),
            },
        }
    }

    /// The plan of a run stopped after `max_steps` optimizer steps (0 = no limit): the schedule's
    /// length (and its warm-up, `warmup_ratio` of it) becomes the smaller of the two.
    pub fn capped(mut self, max_steps: usize, warmup_ratio: f64) -> Self {
        if max_steps > 0 && max_steps < self.total_steps {
            self.total_steps = max_steps;
            self.warmup_steps = (warmup_ratio * max_steps as f64).round() as usize;
        }
        self
    }

    /// Positions in the epoch's `order` of pass `m` of step `s`, in passes of `rows` examples (the
    /// memory plan's; `micro` without one): the step's examples stay those of `micro * accum`
    /// positions from `s * micro * accum`. `None` past the step's end.
    pub fn pass<'a>(
        &self,
        order: &'a [usize],
        s: usize,
        m: usize,
        rows: usize,
    ) -> Option<&'a [usize]> {
        let step_end = ((s + 1) * self.micro * self.accum).min(order.len());
        let start = s * self.micro * self.accum + m * rows;
        (start < step_end).then(|| &order[start..(start + rows).min(step_end)])
    }

    /// Steps from step `s` (0-based) to the step that ends its SAFE round (0: `s` ends one).
    pub fn steps_to_round_end(&self, s: usize) -> usize {
        (s..self.steps_per_epoch)
            .position(|t| self.round_ending_at(1, t).is_some())
            .unwrap_or(0)
    }

    /// The SAFE round (1-based over the run) that step `s` (0-based) of `epoch` ends, if it ends
    /// one: round k of an epoch ends at step `ceil(k * steps / rounds)`.
    pub fn round_ending_at(&self, epoch: usize, s: usize) -> Option<usize> {
        let done = |steps: usize| steps * self.rounds_per_epoch / self.steps_per_epoch;
        (done(s + 1) > done(s)).then(|| (epoch - 1) * self.rounds_per_epoch + done(s + 1))
    }
}

/// The dropout RNG of step `s` (0-based) of `epoch`: one seed per step, so a run resumed inside
/// an epoch draws the same masks as one that was never interrupted.
pub fn dropout_rng(seed: u64, epoch: usize, s: usize) -> StdRng {
    let epoch_seed = seed.wrapping_mul(31).wrapping_add(epoch as u64);
    StdRng::seed_from_u64(epoch_seed ^ (s as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// The layers that get adapters: the upper half for `upper` (the paper's Zhang et al. baseline),
/// every layer (None) otherwise.
pub fn adapted_layers(method: &Method, n_layers: usize) -> Option<Vec<usize>> {
    match method {
        Method::Upper => Some((n_layers / 2..n_layers).collect()),
        _ => None,
    }
}

/// `freeze-prefix:K`: the bottom K layers' adapters frozen from the start.
pub fn freeze_prefix(model: &mut impl Adapted, method: &Method) {
    let Method::FreezePrefix(k) = *method else {
        return;
    };
    for id in model.adapter_ids() {
        if id.layer < k {
            model.adapter_by_id_mut(id).expect("listed").trainable = false;
        }
    }
}

/// SAFE's monitoring subset: `k` of `n` training examples drawn with `seed`, in index order.
pub fn monitor_subset(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(seed ^ 0x5afe));
    idx.truncate(k.min(n));
    idx.sort_unstable();
    idx
}

/// A run's state and open logs, fresh or restored from the newest checkpoint.
pub struct Started {
    pub state: TrainerState,
    /// The global step a resumed run continues after; None for a fresh run.
    pub resumed_at: Option<usize>,
    /// `metrics.jsonl`, holding the checkpoint's epochs when resuming.
    pub metrics: File,
    /// `safe.jsonl` (SAFE runs only), holding the checkpointed rounds when resuming.
    pub safe_log: Option<File>,
}

/// Restores model, optimizer and SAFE controller from the newest checkpoint (`checkpoint/` or a
/// step checkpoint) when `resume` and one exists (refusing a checkpoint of a run of another
/// length), then restarts the logs from the checkpoint's history, so an epoch or validation
/// logged before an interruption is not logged twice.
pub fn start_or_resume(
    output: &Path,
    epochs: usize,
    resume: bool,
    model: &mut impl Adapted,
    opt: &mut AdamW<ParamId>,
    safe: &mut Option<SafeController>,
) -> Result<Started> {
    let mut state = TrainerState {
        total_epochs: epochs,
        ..Default::default()
    };
    let mut resumed_at = None;
    if resume {
        if let Some(s) = checkpoint::load(output, model, opt)? {
            anyhow::ensure!(
                s.total_epochs == epochs,
                "{}: the checkpoint belongs to a run of {} epochs; resume it with --epochs {} \
                 (the learning-rate schedule and SAFE's rounds depend on the run's length)",
                output.join("checkpoint").display(),
                s.total_epochs,
                s.total_epochs
            );
            tracing::info!("resuming after optimizer step {}", s.global_step);
            SafeController::resume(safe.as_mut(), s.safe.as_ref())
                .map_err(|e| anyhow::anyhow!("{}: {e}", output.join("checkpoint").display()))?;
            resumed_at = Some(s.global_step);
            state = s;
        }
    }
    let mut metrics = crate::files::create_file(&output.join("metrics.jsonl"))?;
    // Epoch lines and step validations in the order they were logged: by step, a step's
    // validation before its epoch's line.
    let mut lines: Vec<(usize, usize, String)> = Vec::new();
    for e in &state.history {
        lines.push((e.global_step, 1, serde_json::to_string(e)?));
    }
    for v in &state.step_evals {
        lines.push((v.global_step, 0, serde_json::to_string(v)?));
    }
    lines.sort_by_key(|(step, kind, _)| (*step, *kind));
    for (_, _, l) in lines {
        writeln!(metrics, "{l}")?;
    }
    let safe_log = match safe {
        Some(_) => Some(super::reports::open_safe_log(output, resumed_at)?),
        None => None,
    };
    Ok(Started {
        state,
        resumed_at,
        metrics,
        safe_log,
    })
}

/// The optimizer step of both trainers: this step's learning rate on the run's schedule, AdamW on
/// every gradient times `clip` (the clipping factor), the step counted. Returns the learning rate.
#[allow(clippy::too_many_arguments)]
pub fn optimizer_step(
    model: &mut impl Adapted,
    opt: &mut AdamW<ParamId>,
    grads: &[(ParamId, Tensor)],
    clip: f64,
    plan: &StepPlan,
    schedule: LrScheduler,
    peak_lr: f64,
    state: &mut TrainerState,
) -> Result<f64> {
    let lr = schedule.lr(
        state.global_step,
        plan.warmup_steps,
        plan.total_steps,
        peak_lr,
    );
    adamw_step(model, opt, grads, lr, clip)?;
    state.global_step += 1;
    Ok(lr)
}

/// AdamW on every gradient, each multiplied by `grad_scale` first, the new values put in the
/// model. Where an adapter keeps its weights' copy in the activations' dtype ([`LowCopy`]), the
/// update writes the next copy too: on CUDA one kernel updates every parameter and writes the
/// copies, so a step casts nothing.
///
/// [`LowCopy`]: crate::adapters::lora::LowCopy
pub fn adamw_step<M: Adapted + ?Sized>(
    model: &mut M,
    opt: &mut AdamW<ParamId>,
    grads: &[(ParamId, Tensor)],
    lr: f64,
    grad_scale: f64,
) -> Result<()> {
    let mut items = Vec::with_capacity(grads.len());
    for (id, g) in grads {
        let low = match *id {
            ParamId::Lora { adapter, matrix } => model
                .adapter_by_id_mut(adapter)
                .and_then(|a| a.low.dtype(matrix)),
            ParamId::Head(_) => None,
        };
        let param = model.param_mut(*id).expect("gradient of a known parameter");
        items.push(ParamUpdate {
            key: *id,
            param: param.clone(),
            grad: g.clone(),
            low,
        });
    }
    for ((id, _), new) in grads.iter().zip(opt.update_many(items, lr, grad_scale)?) {
        if let (ParamId::Lora { adapter, matrix }, Some(low)) = (*id, new.low) {
            let ad = model
                .adapter_by_id_mut(adapter)
                .expect("an adapter's parameter");
            ad.low.install(matrix, &new.param, low);
        }
        *model.param_mut(*id).expect("gradient of a known parameter") = new.param;
    }
    Ok(())
}

/// The end of a SAFE round whose `scores` were measured, in either trainer: the controller
/// decides; each newly frozen adapter becomes a constant for good, and `state.frozen_at` records
/// its epoch under its report name (`names`, in the controller's order, which is
/// `Adapted::adapters`' order); the round is appended to `safe.jsonl`.
#[allow(clippy::too_many_arguments)]
pub fn finish_safe_round(
    c: &mut SafeController,
    round: usize,
    epoch: usize,
    scores: &[f64],
    names: &[String],
    model: &mut impl Adapted,
    opt: &mut AdamW<ParamId>,
    state: &mut TrainerState,
    log: Option<&mut File>,
) -> Result<EpochDecision> {
    let d = c.end_of_epoch(round, scores);
    let ids = model.adapter_ids();
    for &i in &d.newly_frozen {
        freeze_adapter(model, opt, ids[i]);
        state.frozen_at.insert(names[i].clone(), epoch);
    }
    let line = serde_json::json!({
        "round": round, "epoch": epoch, "step": state.global_step,
        "importance": scores, "threshold": d.threshold, "phase": d.phase,
        "newly_frozen": d.newly_frozen.iter().map(|&i| &names[i]).collect::<Vec<_>>(),
        "lowest_trainable_layer": model.lowest_trainable_layer(),
    });
    if let Some(f) = log {
        writeln!(f, "{line}")?;
    }
    Ok(d)
}

/// Freezes one adapter for good: a constant from now on, its optimizer state dropped.
pub fn freeze_adapter(model: &mut impl Adapted, opt: &mut AdamW<ParamId>, id: AdapterId) {
    if let Some(ad) = model.adapter_by_id_mut(id) {
        ad.trainable = false;
    }
    for p in ParamId::lora(id) {
        opt.drop_state(&p);
    }
}

/// One epoch's memory: its peak, and the largest amount one step adds to what was live before
/// it (activations saved for backward, gradients, temporaries: what freezing can save).
pub struct EpochMemory<'a> {
    mem: &'a MemTracker,
    live_before: usize,
    epoch_peak: usize,
    step_peak: usize,
}

impl<'a> EpochMemory<'a> {
    pub fn start(mem: &'a MemTracker) -> Self {
        mem.reset_peak();
        Self {
            mem,
            live_before: 0,
            epoch_peak: 0,
            step_peak: 0,
        }
    }

    /// `(epoch peak, step peak)` so far.
    pub fn so_far(&self) -> (usize, usize) {
        (self.epoch_peak.max(self.mem.peak()), self.step_peak)
    }

    /// Before a step's first pass.
    pub fn begin_step(&mut self) {
        self.live_before = self.mem.live();
        self.epoch_peak = self.epoch_peak.max(self.mem.peak());
        self.mem.reset_peak();
    }

    /// After a step's backward passes, before the optimizer update. Returns the step's peak
    /// above what was live before it.
    pub fn end_step(&mut self) -> usize {
        let added = self.mem.peak().saturating_sub(self.live_before);
        self.step_peak = self.step_peak.max(added);
        added
    }

    /// `(epoch peak, step peak)`.
    pub fn finish(self) -> (usize, usize) {
        (self.epoch_peak.max(self.mem.peak()), self.step_peak)
    }
}

/// How a run went, in every command's `summary.json` (flattened into it): the best validation,
/// whether early stopping ended it, its wall time and its totals.
#[derive(Clone, Debug, Serialize)]
pub struct RunOutcome {
    pub best_epoch: usize,
    /// The optimizer step of the best validation.
    pub best_step: usize,
    pub epochs: usize,
    /// The run ended by early stopping (`early_stopping_patience`).
    pub stopped_early: bool,
    pub wall_s: f64,
    /// Time, memory and FLOPs over the run's epochs (`monitor_flops`, SAFE's monitoring passes,
    /// are not part of `train_flops`).
    #[serde(flatten)]
    pub totals: RunTotals,
}

impl RunOutcome {
    /// The outcome of a run of `epochs` epochs that started at `started`, from its final state.
    pub fn of(state: &TrainerState, epochs: usize, started: Instant) -> Self {
        Self {
            best_epoch: state.best_epoch,
            best_step: state.best_step,
            epochs,
            stopped_early: state.stopped_early,
            wall_s: started.elapsed().as_secs_f64(),
            totals: RunTotals::of(&state.history),
        }
    }
}

/// Writes a run's summary to `OUTPUT/summary.json`.
pub fn write_summary(output: &Path, summary: &impl Serialize) -> Result<()> {
    crate::files::write_atomic(
        &output.join("summary.json"),
        serde_json::to_string_pretty(summary)?.as_bytes(),
    )?;
    Ok(())
}

/// The cache of the frozen bottom's outputs on disk (in `output`), when `enabled`, the method
/// freezes layers (SAFE, freeze-prefix) and the cache pays on `device` for `model`'s passes of
/// `tokens` tokens ([`super::plan::frozen_cache_pays`]); None otherwise.
pub fn frozen_cache(
    enabled: bool,
    method: &Method,
    output: &Path,
    device: &candle_core::Device,
    model: &impl StepMemory,
    tokens: usize,
) -> Result<Option<FrozenCache>> {
    let pays = super::plan::frozen_cache_pays(!device.is_cpu(), model.hidden_size(), tokens);
    Ok(match (enabled && pays, method) {
        (true, Method::Safe | Method::FreezePrefix(_)) => Some(FrozenCache::create(output)?),
        _ => None,
    })
}

/// A run's totals over its epoch logs, in both trainers' `summary.json`.
#[derive(Clone, Debug, Serialize)]
pub struct RunTotals {
    pub train_wall_s: f64,
    /// The largest epoch peak; allocator level (heap on the CPU, the CUDA pool on a GPU).
    pub peak_mem_bytes: usize,
    /// Epoch peaks averaged over the run's steps.
    pub mean_epoch_peak_mem_bytes: f64,
    /// The largest step peak (see [`EpochMemory`]) and its step-weighted mean.
    pub step_mem_bytes: usize,
    pub mean_step_mem_bytes: f64,
    pub peak_rss_bytes: Option<usize>,
    /// Trainable parameters at the start.
    pub trainable_params: usize,
    pub train_flops: u64,
    pub monitor_flops: u64,
    /// What the run's training would have cost with every epoch like the first.
    pub unfrozen_train_flops_estimate: u64,
    /// The memory plan in effect at the run's end.
    pub plan: Option<super::plan::MemoryPlan>,
}

impl RunTotals {
    pub fn of(h: &[EpochLog]) -> Self {
        let steps: usize = h.iter().map(|e| e.steps).sum();
        let first = h.first();
        let step_weighted = |bytes: fn(&EpochLog) -> usize| {
            h.iter()
                .map(|e| bytes(e) as f64 * e.steps as f64)
                .sum::<f64>()
                / steps.max(1) as f64
        };
        Self {
            train_wall_s: h.iter().map(|e| e.wall_s).sum(),
            peak_mem_bytes: h.iter().map(|e| e.peak_mem_bytes).max().unwrap_or(0),
            mean_epoch_peak_mem_bytes: step_weighted(|e| e.peak_mem_bytes),
            step_mem_bytes: h.iter().map(|e| e.step_mem_bytes).max().unwrap_or(0),
            mean_step_mem_bytes: step_weighted(|e| e.step_mem_bytes),
            peak_rss_bytes: memory::peak_rss_bytes(),
            trainable_params: first.map(|e| e.trainable_params).unwrap_or(0),
            train_flops: h.iter().map(|e| e.train_flops).sum(),
            monitor_flops: h.iter().map(|e| e.monitor_flops).sum(),
            unfrozen_train_flops_estimate: first
                .map(|e| e.train_flops / e.steps.max(1) as u64 * steps as u64)
                .unwrap_or(0),
            plan: h.last().and_then(|e| e.plan.clone()),
        }
    }
}

/// Memory SAFE's CKA moments take while a round is measured, in bytes. The measurement goes layer
/// by layer (see `train::importance`), so this is the largest layer's share plus the temporaries
/// while one adapter's norms are computed. At the linear (`d` its output width, `r` the rank) an
/// adapter keeps `Y^T Y`, `Y^T U`, `U^T U`, `B` and two sums, and its norms take eight `d x d`
/// temporaries (`X^T X` and `Y^T X` rebuilt, then centered). At the block (`d` the wider of the
/// linear's input and output, a bound) it keeps three `d x d` matrices and two sums, and the norms
/// take four temporaries.
pub fn cka_moment_bytes(model: &impl Adapted, point: crate::safe::MonitorPoint) -> u64 {
    use crate::safe::MonitorPoint;
    let mut per_layer = std::collections::BTreeMap::<usize, u64>::new();
    let mut widest = 0u64;
    for ((_, a), layer) in model.adapters().iter().zip(model.adapter_layers()) {
        let out = a.b.dims().first().copied().unwrap_or(0) as u64;
        let (r, input) = match a.a.dims() {
            [r, i] => (*r as u64, *i as u64),
            _ => (0, 0),
        };
        let (d, floats) = match point {
            MonitorPoint::Linear => (out, out * out + 2 * out * r + r * r + out + r),
            MonitorPoint::Block => {
                let d = out.max(input);
                (d, 3 * d * d + 2 * d)
            }
        };
        *per_layer.entry(layer).or_default() += floats * 8;
        widest = widest.max(d);
    }
    let temporaries = match point {
        MonitorPoint::Linear => 8,
        MonitorPoint::Block => 4,
    };
    per_layer.into_values().max().unwrap_or(0) + temporaries * widest * widest * 8
}

/// Refuses a SAFE run whose CKA moments would not fit in `available` bytes, before it trains,
/// instead of failing for memory at its first round.
pub fn check_cka_memory(needed: u64, available: Option<u64>, adapters: usize) -> Result<()> {
    const GB: f64 = 1e9;
    if needed as f64 > GB {
        tracing::info!(
            "SAFE's CKA moments: {:.1} GB per layer while a round is measured",
            needed as f64 / GB
        );
    }
    if let Some(avail) = available.filter(|&a| needed > a) {
        anyhow::bail!(
            "SAFE's importance monitoring needs {:.1} GB for the CKA moments of one layer's adapters \
             ({adapters} adapters in all; three d x d f64 matrices each), more than the {:.1} GB \
             available; adapt fewer modules, or train with --method lora",
            needed as f64 / GB,
            avail as f64 / GB
        );
    }
    Ok(())
}

/// [`check_cka_memory`] of `model`'s adapters against the memory free where the moments live:
/// the device's on CUDA, the host's otherwise. Called before a SAFE run trains.
pub fn ensure_cka_fits(
    model: &impl Adapted,
    point: crate::safe::MonitorPoint,
    mem: &crate::memory::MemTracker,
) -> Result<()> {
    let needed = cka_moment_bytes(model, point);
    let available = match mem.driver() {
        Some(d) => Some(d.total.saturating_sub(d.used) as u64),
        None => host_memory_available(),
    };
    check_cka_memory(needed, available, model.adapters().len())
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (None where there is no such file).
pub fn host_memory_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_plan_counts_steps_passes_and_rounds() {
        // 10 examples, micro-batches of 2, 2 passes per step: 3 steps (the last one short).
        let p = StepPlan::new(10, 2, 2, 0, 4, 0.25, 2);
        assert_eq!(
            (p.steps_per_epoch, p.total_steps, p.warmup_steps),
            (3, 12, 3)
        );
        let order: Vec<usize> = (0..10).rev().collect();
        assert_eq!(p.pass(&order, 0, 1, p.micro), Some(&[7, 6][..]));
        assert_eq!(p.pass(&order, 2, 0, p.micro), Some(&[1, 0][..]));
        assert_eq!(p.pass(&order, 2, 1, p.micro), None);
        // Two rounds over three steps end at steps ceil(3/2) = 2 and 3 (0-based 1 and 2).
        let rounds: Vec<_> = (0..3).map(|s| p.round_ending_at(2, s)).collect();
        assert_eq!(rounds, vec![None, Some(3), Some(4)]);
        // Capped steps; more rounds than steps become one per step.
        let p = StepPlan::new(100, 4, 1, 5, 1, 0.0, 9);
        assert_eq!((p.steps_per_epoch, p.rounds_per_epoch), (5, 5));
        let rounds: Vec<_> = (0..5).map(|s| p.round_ending_at(1, s)).collect();
        assert_eq!(rounds, vec![Some(1), Some(2), Some(3), Some(4), Some(5)]);
    }

    /// `max_steps` shortens the schedule (warm-up a share of the shorter run) and never lengthens it.
    #[test]
    fn max_steps_caps_the_schedule() {
        let p = StepPlan::new(10, 2, 2, 0, 4, 0.25, 2);
        let c = p.capped(4, 0.25);
        assert_eq!(
            (c.total_steps, c.warmup_steps, c.steps_per_epoch),
            (4, 1, 3)
        );
        assert_eq!(p.capped(0, 0.25), p);
        assert_eq!(p.capped(100, 0.25), p);
    }

    /// Rounds chosen from the run's length: about 12 per run over 1, 3 and 10 epochs when steps
    /// allow, never more than one per 24 steps, at least one per epoch.
    #[test]
    fn auto_rounds_follow_the_run_length() {
        let rounds = |examples, epochs| {
            let p = StepPlan::new(examples, 16, 1, 0, epochs, 0.0, 0);
            (p.rounds_per_epoch, p.rounds_per_epoch * epochs)
        };
        // 300 steps per epoch: 12 rounds in 1 epoch, 4 x 3, 1 x 10.
        assert_eq!(rounds(4800, 1), (12, 12));
        assert_eq!(rounds(4800, 3), (4, 12));
        assert_eq!(rounds(4800, 10), (1, 10));
        // 111 steps per epoch (BBC's training split): at most 4 per epoch.
        assert_eq!(rounds(1776, 1), (4, 4));
        assert_eq!(rounds(1776, 3), (4, 12));
        // Fewer steps than one round's worth: still one per epoch.
        assert_eq!(rounds(100, 2), (1, 2));
        // An explicit count is kept.
        assert_eq!(StepPlan::new(4800, 16, 1, 0, 3, 0.0, 2).rounds_per_epoch, 2);
    }

    /// Passes of another size cover the same examples of a step.
    #[test]
    fn passes_of_any_size_cover_the_step() {
        let p = StepPlan::new(10, 2, 2, 0, 1, 0.0, 1);
        let order: Vec<usize> = (0..10).collect();
        assert_eq!(p.pass(&order, 1, 0, 4), Some(&[4, 5, 6, 7][..]));
        assert_eq!(p.pass(&order, 1, 1, 4), None);
        assert_eq!(p.pass(&order, 1, 3, 1), Some(&[7][..]));
        assert_eq!(p.pass(&order, 2, 0, 4), Some(&[8, 9][..]));
        assert_eq!(p.pass(&order, 0, 1, 2), Some(&[2, 3][..]));
    }

    #[test]
    fn monitor_subset_is_seeded_sorted_and_bounded() {
        let a = monitor_subset(100, 10, 7);
        assert_eq!(a, monitor_subset(100, 10, 7));
        assert_ne!(a, monitor_subset(100, 10, 8));
        assert_eq!(a.len(), 10);
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a[9] < 100);
        assert_eq!(monitor_subset(3, 10, 7), vec![0, 1, 2]);
    }

    /// The CKA moments' size follows the watched widths, and a run that needs more than the host
    /// has is refused with the numbers.
    #[test]
    fn cka_memory_is_estimated_and_checked() {
        use crate::adapters::LoraConfig;
        use crate::model::{CausalLm, LlamaConfig};
        use crate::safe::MonitorPoint;
        let cfg = LlamaConfig {
            vocab_size: 32,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            explicit_head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 1e4,
            rope_scaling: None,
            max_position_embeddings: 16,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_id: Vec::new(),
        };
        let mut rng = StdRng::seed_from_u64(1);
        let mut m = crate::model::llama::LlamaForCausalLM::random(
            cfg,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
            &mut rng,
        )
        .unwrap();
        let lora = LoraConfig {
            r: 2,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            ..Default::default()
        };
        CausalLm::add_lora(&mut m, &lora, None, &mut rng).unwrap();
        // One layer's q and v (rank 2): d = 16 and 2 kv heads x 4 = 8 at the linear, each
        // keeping Y^T Y, Y^T U, U^T U, B and two sums, plus eight 16 x 16 temporaries; 16 (the
        // block's input) for both at the block, three d x d and two sums each, plus four.
        let low_rank = |d: u64| (d * d + 2 * d * 2 + 2 * 2 + d + 2) * 8;
        let linear = cka_moment_bytes(&m, MonitorPoint::Linear);
        assert_eq!(linear, low_rank(16) + low_rank(8) + 8 * 16 * 16 * 8);
        let full = |d: u64| (3 * d * d + 2 * d) * 8;
        assert_eq!(
            cka_moment_bytes(&m, MonitorPoint::Block),
            2 * full(16) + 4 * 16 * 16 * 8
        );
        assert!(check_cka_memory(1000, Some(2000), 4).is_ok());
        assert!(check_cka_memory(1000, None, 4).is_ok());
        let e = check_cka_memory(30_000_000_000, Some(8_000_000_000), 64)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("30.0 GB") && e.contains("8.0 GB") && e.contains("64"),
            "{e}"
        );
    }
}
