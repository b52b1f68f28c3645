//! The training loop, written once for every task: epochs of steps (micro-batches accumulated,
//! clipped, AdamW), SAFE's rounds, validation (each epoch's end, and every `eval_steps`), the best
//! adapter and early stopping (`best.rs`), a resumable checkpoint after every epoch (and every
//! `save_steps`), and the memory and FLOPs of each epoch in `metrics.jsonl`. A [`Task`] supplies the data,
//! the loss and its gradients, the importance measurement and the validation metric.

use super::best;
use super::checkpoint::{self, TrainerState};
use super::config::{Method, ReportTo, RunConfig};
use super::importance::{self, StepMonitor};
use super::plan::{self, MemoryPlan};
use super::run::{self, StepPlan};
use super::step_log::{self, StepLine, StepLog};
use crate::adapters::{Adapted, AdapterId, ParamId};
use crate::memory::MemTracker;
use crate::model::stack::Recompute;
use crate::model::StepMemory;
use crate::nn::optim::{clip_factor, AdamW, AdamWConfig};
use crate::nn::{flops, Pass, RowSink};
use crate::report::tensorboard::EventWriter;
use crate::safe::{SafeConfig, SafeController};
use anyhow::Result;
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One micro-batch's forward, loss and backward.
pub struct MicroStep {
    /// The micro-batch's mean loss, not scaled for accumulation.
    pub loss: f64,
    /// Tokens the micro-batch fed the model (for the progress bar's rate).
    pub tokens: usize,
    /// Gradients of every trainable parameter in [`ParamId`] order, scaled by the step's `loss_scale`.
    pub grads: Vec<(ParamId, Tensor)>,
}

/// A validation score: the task's metric and its mean loss.
pub struct Validation {
    pub metric: f64,
    pub loss: f64,
}

/// What differs between tasks (classification or regression, causal LM): everything else of a
/// run is [`fit`]'s.
pub trait Task {
    type Model: StepMemory;

    /// Training examples; steps address them by index.
    fn train_len(&self) -> usize;

    /// Tokens of the longest training example (a batch's rows are padded to its longest): what
    /// the memory plan sizes a row by.
    fn max_tokens(&self) -> usize;

    /// The validation metric's name, and whether a higher value is better.
    fn metric(&self) -> (&'static str, bool);

    /// Forward, loss and backward of the training examples `examples`, gradients scaled by
    /// `loss_scale`; the layers `recompute` covers are checkpointed.
    fn step(
        &mut self,
        model: &Self::Model,
        examples: &[usize],
        pass: &mut Pass,
        loss_scale: f64,
        recompute: &Recompute,
    ) -> Result<MicroStep>;

    /// SAFE's importance of every adapter (in `Adapted::adapters` order) over the training
    /// examples `monitor`.
    fn importance(&mut self, model: &Self::Model, monitor: &[usize]) -> Result<Vec<f64>>;

    fn validate(&mut self, model: &Self::Model) -> Result<Validation>;

    /// Writes the current adapter (and head) as the run's best, in PEFT's format.
    fn save_best(&self, model: &Self::Model, output: &Path) -> Result<()>;
}

/// The run settings the loop reads (both commands' configs give them).
pub struct FitConfig<'a> {
    pub output: &'a Path,
    pub method: &'a Method,
    pub epochs: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_steps_per_epoch: usize,
    /// Stop the run after this many optimizer steps in all (0 = no limit): the epoch it falls in
    /// ends there (validated, checkpointed) and the learning-rate schedule is that long.
    pub max_steps: usize,
    pub lr: f64,
    pub lr_scheduler: crate::nn::optim::LrScheduler,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub seed: u64,
    pub gradient_checkpointing: bool,
    /// Layers whose saved state goes to host memory until their backward (CUDA).
    pub offload_layers: &'a [usize],
    /// The most a step may add to memory, in bytes: the memory plan checkpoints layers and splits
    /// the batch to fit (see `train/plan.rs`).
    pub memory_budget: Option<usize>,
    /// Whether the budget's plan may offload saved state to the host (CUDA).
    pub budget_offload: bool,
    pub safe: &'a SafeConfig,
    pub resume: bool,
    /// Stop after this epoch with its checkpoint written (the run resumes with `--resume`).
    pub stop_after_epoch: Option<usize>,
    /// Validate every this many optimizer steps besides each epoch's end (0: epoch ends only).
    pub eval_steps: usize,
    /// Write a step checkpoint (`checkpoint-STEP/`) every this many optimizer steps (0: none).
    pub save_steps: usize,
    /// Keep only the newest this many step checkpoints (0: all).
    pub save_total_limit: usize,
    /// End the run after this many validations in a row without a better metric (0: never).
    pub early_stopping_patience: usize,
    /// Also write TensorBoard event files (`OUTPUT/runs/`).
    pub report_to: ReportTo,
    pub show_progress: bool,
}

impl<'a> FitConfig<'a> {
    /// The loop's settings of a command's run: its [`RunConfig`] and SAFE's settings.
    pub fn of(run: &'a RunConfig, safe: &'a SafeConfig, resume: bool, show_progress: bool) -> Self {
        Self {
            output: &run.output,
            method: &run.method,
            epochs: run.epochs,
            batch_size: run.batch_size,
            grad_accum: run.grad_accum,
            max_steps_per_epoch: run.max_steps_per_epoch,
            max_steps: run.max_steps,
            lr: run.lr,
            lr_scheduler: run.lr_scheduler,
            warmup_ratio: run.warmup_ratio,
            weight_decay: run.weight_decay,
            grad_clip: run.grad_clip,
            seed: run.seed,
            gradient_checkpointing: run.gradient_checkpointing,
            offload_layers: &run.offload_layers,
            memory_budget: run.memory_budget.map(|b| b.0),
            budget_offload: run.budget_offload,
            safe,
            resume,
            stop_after_epoch: run.stop_after_epoch,
            eval_steps: run.eval_steps,
            save_steps: run.save_steps,
            save_total_limit: run.save_total_limit,
            early_stopping_patience: run.early_stopping_patience,
            report_to: run.report_to,
            show_progress,
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    /// Optimizer steps done in the run at the epoch's end.
    #[serde(default)]
    pub global_step: usize,
    /// Mean loss of the epoch's micro-batches.
    pub train_loss: f64,
    pub validation_metric: f64,
    pub validation_loss: f64,
    pub lr: f64,
    pub steps: usize,
    pub wall_s: f64,
    /// Matmul FLOPs of this epoch's training steps (forward + backward), as run.
    pub train_flops: u64,
    /// Matmul FLOPs of SAFE's importance measurements this epoch (forward passes on the
    /// monitoring subset), kept apart from training FLOPs.
    #[serde(default)]
    pub monitor_flops: u64,
    /// Peak bytes during this epoch's training steps (allocator level: the heap on the CPU, the
    /// CUDA memory pool on a GPU), everything included.
    pub peak_mem_bytes: usize,
    /// On a GPU, the driver's view at the end of the epoch's steps (`cuMemGetInfo`: all memory in
    /// use on the device, the pool's reserve, cuBLAS workspace and CUDA context included).
    #[serde(default)]
    pub driver_used_bytes: Option<usize>,
    /// Peak heap bytes a training step adds to what is live before it (activations kept for
    /// backward, gradients, temporaries): the part freezing can save.
    #[serde(default)]
    pub step_mem_bytes: usize,
    /// The memory plan in effect at the epoch's end, with its estimate of `step_mem_bytes`.
    #[serde(default)]
    pub plan: Option<MemoryPlan>,
    pub lowest_trainable_layer: Option<usize>,
    pub trainable_params: usize,
    /// SAFE: every adapter's importance (1 - CKA; NaN, written as null, where not measured),
    /// the threshold and the frozen adapters.
    #[serde(default, deserialize_with = "crate::safe::nan_serde::opt_vec")]
    pub importance: Option<Vec<f64>>,
    pub threshold: Option<f64>,
    pub frozen: Vec<String>,
}

/// What a finished (or stopped) run leaves for its summary.
pub struct Fitted {
    pub state: TrainerState,
    /// Every adapter's report name, in `Adapted::adapters` order.
    pub names: Vec<String>,
    /// True when the run stopped (`stop_after_epoch`) and has epochs left: resumable, not
    /// finished. (Early stopping finishes a run: see `state.stopped_early`.)
    pub stopped: bool,
}

/// The adapters whose scores SAFE's next round can use (see `SafeController::needs_scores`):
/// the in-step measurement skips the others.
fn needed_adapters(c: &SafeController, model: &impl Adapted) -> Vec<AdapterId> {
    model
        .adapter_ids()
        .into_iter()
        .zip(c.needs_scores())
        .filter_map(|(id, needed)| needed.then_some(id))
        .collect()
}

/// Report names of a model's adapters, `layer.{l}.{module}` in `Adapted::adapters` order: the
/// module is the shortest end of its path (after the layer index) that tells the layer's adapters
/// apart (`query`, `q_proj`; `attn.c_proj` beside `mlp.c_proj`).
pub fn adapter_names(model: &impl Adapted) -> Vec<String> {
    let adapters = model.adapters();
    let layers = model.adapter_layers();
    let within: Vec<Vec<&str>> = adapters
        .iter()
        .zip(&layers)
        .map(|((path, _), l)| {
            let parts: Vec<&str> = path.split('.').collect();
            let at = parts.iter().position(|p| *p == l.to_string());
            parts[at.map_or(0, |i| i + 1)..].to_vec()
        })
        .collect();
    (0..adapters.len())
        .map(|i| {
            let same_layer: Vec<usize> = (0..adapters.len())
                .filter(|&j| j != i && layers[j] == layers[i])
                .collect();
            let n = (1..=within[i].len())
                .find(|&n| {
                    let tail = |p: &[&str]| p[p.len().saturating_sub(n)..].join(".");
                    same_layer
                        .iter()
                        .all(|&j| tail(&within[j]) != tail(&within[i]))
                })
                .unwrap_or(within[i].len());
            let tail = within[i][within[i].len() - n..].join(".");
            format!("layer.{}.{tail}", layers[i])
        })
        .collect()
}

/// Trains `model` on `task`: see the module doc. Writes `metrics.jsonl`, `safe.jsonl` and the SAFE
/// reports (SAFE runs), the best adapter (by the task's validation metric) and `checkpoint/`.
pub fn fit<T: Task>(
    task: &mut T,
    model: &mut T::Model,
    cfg: &FitConfig,
    mem: &MemTracker,
) -> Result<Fitted> {
    let names = adapter_names(model);
    let layer_of = model.adapter_layers();
    let monitor = run::monitor_subset(task.train_len(), cfg.safe.monitor_examples, cfg.seed);
    let plan = StepPlan::new(
        task.train_len(),
        cfg.batch_size,
        cfg.grad_accum,
        cfg.max_steps_per_epoch,
        cfg.epochs,
        cfg.warmup_ratio,
        cfg.safe.rounds_per_epoch,
    )
    .capped(cfg.max_steps, cfg.warmup_ratio);
    let steps_reached = |global_step: usize| cfg.max_steps > 0 && global_step >= cfg.max_steps;
    let rounds = cfg.epochs * plan.rounds_per_epoch;
    let is_safe = *cfg.method == Method::Safe;
    if is_safe {
        run::ensure_cka_fits(model, cfg.safe.monitor, mem)?;
    }
    if !cfg.offload_layers.is_empty() {
        let n = model.num_layers();
        if let Some(l) = cfg.offload_layers.iter().find(|&&l| l >= n) {
            anyhow::bail!(
                "--offload-layers (offload_layers): layer {l}, but the model's are 0..{n}"
            );
        }
    }
    let mut safe = is_safe.then(|| SafeController::new(cfg.safe.clone(), names.len(), rounds));
    let mut opt = AdamW::new(AdamWConfig {
        weight_decay: cfg.weight_decay,
        ..Default::default()
    });
    let run::Started {
        mut state,
        resumed_at: started_at,
        metrics: mut log,
        mut safe_log,
    } = run::start_or_resume(
        cfg.output, cfg.epochs, cfg.resume, model, &mut opt, &mut safe,
    )?;
    let (metric_name, higher_is_better) = task.metric();
    // The memory plan, made again whenever SAFE freezes adapters.
    let seq = task.max_tokens();
    // In-step importance: the last `window` steps before each round's end are measured.
    let in_step = is_safe && cfg.safe.in_step();
    let replan = |model: &T::Model, safe: &Option<SafeController>| {
        let measuring = in_step && safe.as_ref().is_some_and(SafeController::measures);
        plan::StepPlans::new(measuring, |measured_step| {
            plan::plan(
                model,
                plan.micro,
                plan.accum,
                seq,
                cfg.gradient_checkpointing,
                cfg.offload_layers,
                cfg.memory_budget,
                &plan::PlanDevice::of(mem.device(), model.hidden_size(), cfg.budget_offload),
                measured_step,
            )
        })
    };
    let window = cfg
        .safe
        .monitor_examples
        .div_ceil(plan.micro * plan.accum)
        .max(1);
    let mut step_monitor: Option<StepMonitor> = None;
    if let (Some(budget), true) = (cfg.memory_budget, is_safe && !in_step) {
        plan::ensure_monitoring_fits(model, monitor.len(), seq, budget)?;
    }
    let mut plan_log = plan::PlanLog::open(cfg.output, started_at)?;
    let mut plans = replan(model, &safe)?;
    let steps_in = state.partial_epoch.as_ref().map_or(0, |p| p.steps);
    for p in plans.all() {
        plan_log.write(state.epochs_done + 1, steps_in, state.global_step, p)?;
    }
    let mut step_log = StepLog::open(cfg.output, started_at)?;
    // TensorBoard's scalars (`--report-to tensorboard`): a new event file per (resumed) run.
    let mut events = match cfg.report_to {
        ReportTo::Tensorboard => Some(EventWriter::create(&cfg.output.join("runs"))?),
        ReportTo::None => None,
    };
    // Without a terminal (a job's log, a pipe) a bar shows nothing until it ends: plain lines.
    let plain_progress = cfg.show_progress && !std::io::stderr().is_terminal();
    let progress_every = step_log::progress_every(plan.steps_per_epoch);

    for epoch in state.epochs_done + 1..=cfg.epochs {
        if steps_reached(state.global_step) || state.stopped_early {
            break;
        }
        if cfg.stop_after_epoch.is_some_and(|k| epoch > k) {
            return Ok(Fitted {
                state,
                names,
                stopped: true,
            });
        }
        // A step checkpoint inside this epoch: continue after its steps, with its sums.
        let mut p = state.partial_epoch.take().unwrap_or_default();
        // A step checkpoint inside a measured window: the round's measurement so far.
        if !p.measured.is_empty() {
            let measured = std::mem::take(&mut p.measured);
            if let Some(c) = safe.as_ref() {
                let m = StepMonitor::resumed(&measured, mem.device())?;
                step_monitor = Some(m.only(needed_adapters(c, model)));
            }
        }
        let mut order: Vec<usize> = (0..task.train_len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(
            cfg.seed.wrapping_add(epoch as u64),
        ));
        let bar = progress_bar(
            cfg.show_progress && !plain_progress,
            plan.steps_per_epoch,
            epoch,
            cfg.epochs,
        );
        if let Some(b) = &bar {
            b.set_position(p.steps as u64);
        }
        let mut epoch_mem = run::EpochMemory::start(mem);
        if p.steps == 0 {
            p.trainable_params = model
                .trainable_params()
                .iter()
                .map(|(_, t)| t.elem_count())
                .sum();
        }
        // The validation of the step just taken, when `eval_steps` asked for one.
        let mut last_val: Option<(usize, Validation)> = None;
        for s in p.steps..plan.steps_per_epoch {
            let t_step = Instant::now();
            let flops_before = flops::total();
            let mut drop_rng = run::dropout_rng(cfg.seed, epoch, s);
            let (mut step_loss, mut step_passes, mut step_tokens) = (0f64, 0usize, 0usize);
            epoch_mem.begin_step();
            let mut grads: Vec<(ParamId, Tensor)> = Vec::new();
            let measured = in_step
                && safe.as_ref().is_some_and(SafeController::measures)
                && plan.steps_to_round_end(s) < window;
            if let (true, None, Some(c)) = (measured, step_monitor.as_ref(), safe.as_ref()) {
                step_monitor = Some(StepMonitor::new().only(needed_adapters(c, model)));
            }
            let monitor_flops_before = step_monitor.as_ref().map_or(0, |m| m.flops);
            let mem_plan = plans.step(measured);
            let recompute = mem_plan.recompute();
            for m in 0..mem_plan.accum {
                let Some(examples) = plan.pass(&order, s, m, mem_plan.micro) else {
                    break;
                };
                let mut pass = Pass {
                    training: true,
                    rng: &mut drop_rng,
                    monitor: match step_monitor.as_mut() {
                        Some(m) if measured => Some(m as &mut dyn RowSink),
                        _ => None,
                    },
                };
                let out = task.step(
                    model,
                    examples,
                    &mut pass,
                    1.0 / mem_plan.accum as f64,
                    &recompute,
                )?;
                super::guard::ensure_finite_loss(out.loss, epoch, s + 1)?;
                step_loss += out.loss;
                step_passes += 1;
                step_tokens += out.tokens;
                if grads.is_empty() {
                    grads = out.grads;
                } else {
                    for ((_, acc), (_, g)) in grads.iter_mut().zip(out.grads) {
                        *acc = (&*acc + g)?;
                    }
                }
            }
            p.loss_sum += step_loss;
            p.loss_n += step_passes;
            p.tokens += step_tokens;
            let (_, clip) = clip_factor(&grads, cfg.grad_clip)?;
            let step_mem_bytes = epoch_mem.end_step();
            p.lr = run::optimizer_step(
                model,
                &mut opt,
                &grads,
                clip,
                &plan,
                cfg.lr_scheduler,
                cfg.lr,
                &mut state,
            )?;
            let step_monitor_flops =
                step_monitor.as_ref().map_or(0, |m| m.flops) - monitor_flops_before;
            p.train_flops += flops::total() - flops_before - step_monitor_flops;
            p.monitor_flops += step_monitor_flops;
            let line = StepLine {
                epoch,
                step: s + 1,
                global_step: state.global_step,
                loss: step_loss / step_passes.max(1) as f64,
                lr: p.lr,
                step_s: t_step.elapsed().as_secs_f64(),
                step_mem_bytes,
                tokens: step_tokens,
                measured,
            };
            step_log.write(&line)?;
            if let Some(w) = events.as_mut() {
                w.scalar("train/loss", line.global_step, line.loss)?;
                w.scalar("train/lr", line.global_step, line.lr)?;
                w.scalar(
                    "train/step_mem_bytes",
                    line.global_step,
                    step_mem_bytes as f64,
                )?;
            }
            p.steps = s + 1;
            let stop = steps_reached(state.global_step);
            // SAFE: at each round's end, measure importance and freeze what the schedule says
            // (until every candidate is frozen: then nothing can change).
            let measuring = safe.as_mut().filter(|c| c.measures());
            if let (Some(c), Some(round)) = (measuring, plan.round_ending_at(epoch, s)) {
                let scores = match step_monitor.take().filter(|m| m.batches() > 0) {
                    Some(m) => {
                        m.scores(&model.adapter_ids(), importance::trainable_layers(model))?
                    }
                    // Separate passes; also when a resumed run starts at a round's end.
                    None => {
                        let f0 = flops::total();
                        let scores = task.importance(model, &monitor)?;
                        p.monitor_flops += flops::total() - f0;
                        scores
                    }
                };
                let d = run::finish_safe_round(
                    c,
                    round,
                    epoch,
                    &scores,
                    &names,
                    model,
                    &mut opt,
                    &mut state,
                    safe_log.as_mut(),
                )?;
                p.importance = Some(scores);
                p.threshold = Some(d.threshold);
                // The plans follow the frozen adapters and whether SAFE still measures.
                let still_measuring = in_step && c.measures();
                if !d.newly_frozen.is_empty() || still_measuring != plans.measured.is_some() {
                    let next = replan(model, &safe)?;
                    if next != plans {
                        for p in next.all() {
                            plan_log.write(epoch, s + 1, state.global_step, p)?;
                        }
                        plans = next;
                    }
                }
            }
            p.wall_s += t_step.elapsed().as_secs_f64();
            let secs = p.wall_s.max(1e-9);
            let mean_loss = p.loss_sum / p.loss_n.max(1) as f64;
            if let Some(b) = &bar {
                b.inc(1);
                b.set_message(format!(
                    "loss {mean_loss:.4} | {:.0} tok/s",
                    p.tokens as f64 / secs
                ));
            }
            let epoch_ends = p.steps == plan.steps_per_epoch || stop;
            if plain_progress && (p.steps % progress_every == 0 || epoch_ends) {
                eprintln!(
                    "{}",
                    step_log::progress_line(
                        epoch,
                        cfg.epochs,
                        p.steps,
                        plan.steps_per_epoch,
                        mean_loss,
                        p.lr,
                        p.tokens as f64 / secs
                    )
                );
            }
            // Validation every `eval_steps` (the epoch's end validates anyway).
            if best::due(cfg.eval_steps, state.global_step) && !epoch_ends {
                let val = task.validate(model)?;
                let line = best::StepEval {
                    epoch,
                    step: p.steps,
                    global_step: state.global_step,
                    validation_metric: val.metric,
                    validation_loss: val.loss,
                };
                writeln!(log, "{}", serde_json::to_string(&line)?)?;
                state.step_evals.push(line);
                if cfg.show_progress {
                    eprintln!(
                        "epoch {epoch}/{} step {}/{}: val {metric_name} {:.4}",
                        cfg.epochs, p.steps, plan.steps_per_epoch, val.metric
                    );
                }
                let patience = cfg.early_stopping_patience;
                if best::record(&mut state, val.metric, higher_is_better, patience, epoch) {
                    task.save_best(model, cfg.output)?;
                }
                if let Some(w) = events.as_mut() {
                    validation_scalars(w, metric_name, state.global_step, &val)?;
                }
                last_val = Some((state.global_step, val));
            }
            // A step checkpoint every `save_steps`: the epoch so far travels in its state.
            if best::due(cfg.save_steps, state.global_step) {
                let (peak, step_peak) = epoch_mem.so_far();
                let measured = match &step_monitor {
                    Some(m) => m.measured()?,
                    None => Vec::new(),
                };
                state.partial_epoch = Some(checkpoint::PartialEpoch {
                    peak_mem_bytes: p.peak_mem_bytes.max(peak),
                    step_mem_bytes: p.step_mem_bytes.max(step_peak),
                    measured,
                    ..p.clone()
                });
                state.safe = safe.clone();
                checkpoint::save_step(cfg.output, model, &opt, &state, cfg.save_total_limit)?;
                state.partial_epoch = None;
            }
            if stop || state.stopped_early {
                break;
            }
        }
        let (epoch_peak, step_peak) = epoch_mem.finish();
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        // The epoch's end validates, unless its last step just did.
        let val = match last_val.take() {
            Some((step, val)) if step == state.global_step => val,
            _ => {
                let val = task.validate(model)?;
                let patience = cfg.early_stopping_patience;
                if best::record(&mut state, val.metric, higher_is_better, patience, epoch) {
                    task.save_best(model, cfg.output)?;
                }
                if let Some(w) = events.as_mut() {
                    validation_scalars(w, metric_name, state.global_step, &val)?;
                }
                val
            }
        };
        if let Some(w) = events.as_mut() {
            w.flush()?;
        }
        if let Method::FreezePrefix(k) = *cfg.method {
            for (name, &l) in names.iter().zip(&layer_of) {
                if l < k {
                    state.frozen_at.entry(name.clone()).or_insert(0);
                }
            }
        }
        let entry = EpochLog {
            epoch,
            global_step: state.global_step,
            train_loss: p.loss_sum / p.loss_n.max(1) as f64,
            validation_metric: val.metric,
            validation_loss: val.loss,
            lr: p.lr,
            steps: p.steps,
            wall_s: p.wall_s,
            train_flops: p.train_flops,
            monitor_flops: p.monitor_flops,
            peak_mem_bytes: p.peak_mem_bytes.max(epoch_peak),
            driver_used_bytes: mem.driver().map(|d| d.used),
            step_mem_bytes: p.step_mem_bytes.max(step_peak),
            plan: Some(plans.plain.clone()),
            lowest_trainable_layer: model.lowest_trainable_layer(),
            trainable_params: p.trainable_params,
            importance: p.importance.take(),
            threshold: p.threshold,
            frozen: state.frozen_at.keys().cloned().collect(),
        };
        writeln!(log, "{}", serde_json::to_string(&entry)?)?;
        if cfg.show_progress {
            eprintln!(
                "epoch {epoch}/{}: loss {:.4}  val {metric_name} {:.4}  {:.1}s  peak {:.0} MB  frozen {}/{}",
                cfg.epochs,
                entry.train_loss,
                val.metric,
                entry.wall_s,
                entry.peak_mem_bytes as f64 / 1e6,
                state.frozen_at.len(),
                names.len()
            );
            if state.stopped_early {
                eprintln!(
                    "early stopping: {} validations without improvement; the best adapter is \
                     that of step {}",
                    state.evals_since_best, state.best_step
                );
            }
        }
        state.epochs_done = epoch;
        state.history.push(entry);
        state.safe = safe.clone();
        checkpoint::save(cfg.output, model, &opt, &state)?;
    }
    if let Some(c) = &safe {
        super::reports::write_safe_reports(cfg.output, &names, c, rounds)?;
    }
    Ok(Fitted {
        state,
        names,
        stopped: false,
    })
}

/// A validation's scalars in TensorBoard: the task's metric and the loss.
fn validation_scalars(
    w: &mut EventWriter,
    metric_name: &str,
    step: usize,
    val: &Validation,
) -> Result<()> {
    w.scalar(&format!("eval/{metric_name}"), step, val.metric)?;
    w.scalar("eval/loss", step, val.loss)?;
    w.flush()
}

/// A run's output folder, created if missing and locked for the run (the lock is held while the
/// returned guard lives). A fresh run writes its configuration to `train_config.json` (so `export`
/// and `eval` can rebuild the same model later) and removes an earlier run's checkpoint and
/// summary; a run that resumes a checkpoint keeps the configuration of the run it continues, so a
/// resume that is then refused (`run::start_or_resume`) has changed nothing.
pub fn prepare_output(
    output: &PathBuf,
    config: &impl Serialize,
    resume: bool,
) -> Result<crate::files::OutputLock> {
    use anyhow::Context;
    std::fs::create_dir_all(output)
        .with_context(|| format!("{}: cannot create output folder", output.display()))?;
    let lock = crate::files::lock_output(output)?;
    if resume && checkpoint::exists(output) {
        return Ok(lock);
    }
    checkpoint::remove_all(output)?;
    for stale in ["summary.json", "runs"] {
        checkpoint::remove_any(&output.join(stale))?;
    }
    crate::files::write_atomic(
        &output.join("train_config.json"),
        serde_json::to_string_pretty(config)?.as_bytes(),
    )?;
    Ok(lock)
}

fn progress_bar(show: bool, steps: usize, epoch: usize, epochs: usize) -> Option<ProgressBar> {
    if !show {
        return None;
    }
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "epoch {prefix} [{bar:30}] {pos}/{len} steps | {msg} | eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("{epoch}/{epochs}"));
    Some(bar)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::LoraConfig;
    use crate::model::{CausalLm, Gpt2Config, Gpt2LMHeadModel};
    use candle_core::{DType, Device};

    /// Report names are the layer and the shortest distinguishing end of the module path: GPT-2's
    /// two `c_proj`s keep their parent, the others their last name.
    #[test]
    fn adapter_names_tell_sites_apart() {
        let cfg: Gpt2Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 20, "n_positions": 8, "n_embd": 8, "n_layer": 2, "n_head": 2
        }))
        .unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let mut m = Gpt2LMHeadModel::random(cfg, DType::F32, &Device::Cpu, &mut rng).unwrap();
        let lora = LoraConfig {
            r: 2,
            target_modules: vec!["c_attn".into(), "c_proj".into(), "c_fc".into()],
            ..Default::default()
        };
        CausalLm::add_lora(&mut m, &lora, None, &mut rng).unwrap();
        let names = adapter_names(&m);
        assert_eq!(
            &names[..4],
            [
                "layer.0.c_attn",
                "layer.0.attn.c_proj",
                "layer.0.c_fc",
                "layer.0.mlp.c_proj"
            ]
        );
        assert_eq!(names[4], "layer.1.c_attn");
    }
}
