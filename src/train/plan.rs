//! The memory plan of a training step: how many rows a forward/backward pass takes and which
//! trainable layers are checkpointed, estimated from shapes ([`StepMemory`]) and chosen to fit a
//! memory budget. SAFE freezes adapters as training goes, so the loop plans again after every
//! round: checkpointing is dropped and the micro-batch grows as the trainable part shrinks.

use crate::device::GpuRates;
use crate::model::stack::{Keep, Recompute};
use crate::model::{LayerMemory, StepMemory};
use crate::nn::cka;
#[cfg(test)]
use search::choices;
use search::{cheapest_recompute, Chosen, OffloadPrice};
use serde::{Deserialize, Serialize};

mod search;

/// A memory size as people write it (`6GB`, `900MB`, `1.5GiB`, or bytes), for `--memory-budget`
/// and `memory_budget` in TOML (a string or a number of bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_bytes(s).map(ByteSize)
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format_bytes(self.0))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0 as u64)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) if b > 0 => Ok(ByteSize(b as usize)),
            Raw::Bytes(_) => Err(serde::de::Error::custom("a memory size must be positive")),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// How one optimizer step of `batch` examples runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryPlan {
    /// Examples per forward/backward pass.
    pub micro: usize,
    /// Passes per optimizer step (`micro * accum` is the step's batch).
    pub accum: usize,
    /// The lowest layer backprop reaches (the number of layers when only the head trains).
    pub first_trained_layer: usize,
    /// Layers above it whose adapters are all frozen: backprop only passes through them.
    pub pass_through: Vec<usize>,
    /// What the pass-through layers that are not checkpointed keep for backward in a pass: what
    /// checkpointing them would free first.
    #[serde(default)]
    pub pass_through_bytes: usize,
    /// Checkpointed layers: they keep their input and run again in backward.
    pub checkpointed: Vec<usize>,
    /// Layers that keep their state less the feed-forward activation's input, which backward
    /// recomputes from the norm before it (one or two matmuls, not the whole layer).
    #[serde(default)]
    pub ffn_recomputed: Vec<usize>,
    /// Layers that keep their state less the attention's, which backward recomputes from the
    /// input of the q, k and v projections (those projections and the attention's forward).
    #[serde(default)]
    pub attention_recomputed: Vec<usize>,
    /// Layers whose saved state goes to host memory until their backward (`--offload-layers`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offloaded: Vec<usize>,
    /// The estimated peak a pass adds to what is live before it, in bytes.
    pub estimated_step_bytes: usize,
    /// The budget it was planned for.
    pub budget_bytes: Option<usize>,
    /// Planned for the steps SAFE measures on (its in-step importance's temporaries included).
    #[serde(default)]
    pub measuring: bool,
}

/// A run's plans for now: `plain` for the steps SAFE does not measure on, and while it measures
/// on training steps, `measured` for those it does. Apart, an unmeasured step keeps no room for
/// the measurement's temporaries (at LLaMA-7B's width they outweigh a layer's own), so it may
/// checkpoint fewer layers or split the batch less.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepPlans {
    pub plain: MemoryPlan,
    pub measured: Option<MemoryPlan>,
}

impl StepPlans {
    /// The plain plan from `make(false)` and, when `measuring`, the measured one from
    /// `make(true)` (`make`: [`plan`] with its other arguments fixed).
    pub fn new(
        measuring: bool,
        make: impl Fn(bool) -> anyhow::Result<MemoryPlan>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            plain: make(false)?,
            measured: if measuring { Some(make(true)?) } else { None },
        })
    }

    /// The plan of a step that SAFE measures on (`measured`) or not.
    pub fn step(&self, measured: bool) -> &MemoryPlan {
        match &self.measured {
            Some(m) if measured => m,
            _ => &self.plain,
        }
    }

    /// Every plan, the plain one first.
    pub fn all(&self) -> impl Iterator<Item = &MemoryPlan> {
        std::iter::once(&self.plain).chain(&self.measured)
    }
}

impl MemoryPlan {
    pub fn recompute(&self) -> Recompute {
        Recompute::Layers {
            whole: self.checkpointed.iter().copied().collect(),
            ffn: self.ffn_recomputed.iter().copied().collect(),
            attention: self.attention_recomputed.iter().copied().collect(),
            offload: self.offloaded.iter().copied().collect(),
        }
    }

    /// One line for people: passes, checkpointed layers, pass-through layers and what they hold.
    pub fn describe(&self) -> String {
        let layers = |ls: &[usize]| match ls {
            [] => "none".to_string(),
            [l] => format!("layer {l}"),
            _ if ls.windows(2).all(|w| w[1] == w[0] + 1) => {
                format!("layers {}-{}", ls[0], ls[ls.len() - 1])
            }
            _ => format!("layers {ls:?}"),
        };
        let mut d = format!(
            "{} pass(es) of {}, checkpointed: {}",
            self.accum,
            self.micro,
            layers(&self.checkpointed)
        );
        if !self.ffn_recomputed.is_empty() {
            d += &format!(
                ", feed-forward input recomputed: {}",
                layers(&self.ffn_recomputed)
            );
        }
        if !self.attention_recomputed.is_empty() {
            d += &format!(
                ", attention recomputed: {}",
                layers(&self.attention_recomputed)
            );
        }
        if !self.offloaded.is_empty() {
            d += &format!(", offloaded: {}", layers(&self.offloaded));
        }
        if !self.pass_through.is_empty() {
            d += &format!(
                ", pass-through: {} ({} kept)",
                layers(&self.pass_through),
                format_bytes(self.pass_through_bytes)
            );
        }
        d
    }
}

/// A plan's estimate fits the budget less 1/12 of it (8%), the memory model's error margin.
const BUDGET_MARGIN: usize = 12;

/// Tokens below which a pass's time no longer falls with its size, so that splitting a batch
/// into smaller passes costs time while recomputing a layer costs a third of its passes. On a GPU
/// two floors: kernel launches (a layer's take about as long as 30 GFLOP of work, 150 us at 200
/// TFLOP/s, and a token costs a layer about 24 hidden^2 FLOP: 8,500 tokens at MiniLM's width 384),
/// and filling the GPU's multiprocessors with a projection's output tiles
/// ([`crate::device::matmul_wave`] over `hidden` columns: an H100's 132 SMs x 128 x 256 make
/// about 1,060 tokens at LLaMA-7B's 4096). Measured at 7B on the H200 (batch 4 x 128): passes of
/// 2 sequences took 81 ms a step against 62 ms for one pass of 4, while checkpointing every layer
/// took 85 ms. A CPU is compute-bound from a few rows on.
pub fn efficient_tokens(device: &candle_core::Device, hidden: usize) -> usize {
    let h = hidden.max(1) as f64;
    match device {
        candle_core::Device::Cpu => 256,
        _ => crate::model::memory::launch_bound_tokens(hidden)
            .max(crate::device::matmul_wave(device) as f64 / h)
            .clamp(64.0, 65536.0) as usize,
    }
}

/// What the plan needs to know of the device: the tokens below which a pass's time stops falling
/// with its size ([`efficient_tokens`]), and the rates that price offloading saved state to the
/// host (None on the CPU, or with offloading turned off).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlanDevice {
    pub efficient_tokens: usize,
    pub offload: Option<GpuRates>,
}

impl PlanDevice {
    /// `device` for layers of width `hidden`; `offload`: whether a budget's plan may offload.
    pub fn of(device: &candle_core::Device, hidden: usize, offload: bool) -> Self {
        Self {
            efficient_tokens: efficient_tokens(device, hidden),
            offload: crate::device::gpu_rates(device).filter(|_| offload && device.is_cuda()),
        }
    }
}

/// Whether the frozen bottom's cache on disk (`train::frozen_cache`) beats recomputing the
/// frozen layers, for passes of `tokens` tokens. On a CPU a layer's forward costs far more than
/// reading its rows back. On a GPU only while a layer's forward is launch-bound (MiniLM or
/// SmolLM2 at their default batches): above that the GPU recomputes a frozen layer faster than
/// the cache moves its rows (a miss copies them to the host and writes them, a hit reads and
/// uploads them). Measured at LLaMA-7B's shape on an H200 (passes of 4 x 128 tokens, layer 0
/// frozen for the last 14 of 58 steps): 37.0 ms a step there without the cache, 40.9 with it.
pub fn frozen_cache_pays(on_gpu: bool, hidden: usize, tokens: usize) -> bool {
    !on_gpu || (tokens as f64) < crate::model::memory::launch_bound_tokens(hidden)
}

/// Estimated peak bytes of one pass of `rows` rows of `seq` tokens over and above what is live
/// before it: the layers below the lowest trainable one run in inference mode (one layer's
/// temporaries at a time); from there up each layer keeps its state, or its input when
/// checkpointed; the head and loss; then backward from the top, where a checkpointed layer's state
/// exists again while its backward runs.
pub fn step_bytes(
    model: &impl StepMemory,
    recompute: &Recompute,
    rows: usize,
    seq: usize,
) -> usize {
    step_bytes_measured(model, recompute, rows, seq, 0)
}

/// [`step_bytes`] of a step whose forward also measures SAFE's importance (`measure` bytes, see
/// [`measure_bytes`], beside each trainable layer's state while its linears run).
pub fn step_bytes_measured(
    model: &impl StepMemory,
    recompute: &Recompute,
    rows: usize,
    seq: usize,
    measure: usize,
) -> usize {
    PassMemory::of(model, rows, seq).peak(recompute, measure)
}

/// What a pass of a given size keeps and holds, by layer: computed once, so that a plan can
/// estimate many recomputations of the same pass.
struct PassMemory {
    /// The lowest trainable layer.
    first: usize,
    /// One hidden state of the pass.
    x: usize,
    /// The peak of the inference-mode layers below `first`.
    below: usize,
    /// Each layer from `first` up.
    layers: Vec<(usize, LayerMemory)>,
    /// The head and its loss.
    head: usize,
}

impl PassMemory {
    fn of(model: &impl StepMemory, rows: usize, seq: usize) -> Self {
        let n = model.num_layers();
        let first = model.lowest_trainable_layer().unwrap_or(n);
        let x = model.hidden_bytes(rows, seq);
        let below = (0..first)
            .map(|l| 2 * x + model.layer_memory(l, rows, seq).transient)
            .max()
            .unwrap_or(x);
        let layers = (first..n)
            .map(|l| (l, model.layer_memory(l, rows, seq)))
            .collect();
        let head = model.head_bytes(rows, seq);
        Self {
            first,
            x,
            below,
            layers,
            head,
        }
    }

    fn layer(&self, l: usize) -> LayerMemory {
        self.layers[l - self.first].1
    }

    /// What layer `m` keeps for backward as `keep` says (a checkpointed layer: its input).
    fn kept(&self, m: &LayerMemory, keep: Keep) -> usize {
        match keep {
            Keep::Nothing => self.x,
            keep => m.kept(keep),
        }
    }

    /// The most the pass holds at layer `m` beside what the layers below it keep: in its forward
    /// its input, what it holds of its state, and its temporaries or SAFE's `measure`; in its
    /// backward a checkpointed layer's input, its state, temporaries and the gradients in and out.
    fn at_layer(&self, m: &LayerMemory, keep: Keep, measure: usize) -> usize {
        let x = self.x;
        let live = m.live(keep);
        let input = if keep.saves() { 0 } else { x };
        (x + live + (m.transient + x).max(measure)).max(input + live + m.transient + 2 * x)
    }

    /// The pass's estimated peak with `recompute` and `measure` bytes of SAFE's measurement. An
    /// offloaded layer's state is on the device while it is the nearest offloaded layer below the
    /// running one (`model::stack`: freed when the next one is stashed, fetched back when the one
    /// above it is back), and not at the head.
    fn peak(&self, recompute: &Recompute, measure: usize) -> usize {
        let mut peak = self.below;
        // What the layers below keep on the device, and what the nearest offloaded one holds.
        let (mut below, mut held) = (0, 0);
        for (l, m) in &self.layers {
            let keep = recompute.keep(*l);
            peak = peak.max(below + held + self.at_layer(m, keep, measure));
            match keep.saves() && recompute.offloads(*l) {
                true => held = self.kept(m, keep),
                false => below += self.kept(m, keep),
            }
        }
        peak.max(below + self.x + self.head)
    }
}

/// The most SAFE's in-step importance holds at once while it measures a layer's adapters on a
/// pass of `rows` rows of `seq` tokens (`train::importance`): each adapter's measurement in the
/// form and path that run (`nn::cka::batch_bytes`), as many of a layer's widest at once as are
/// measured together (`nn::cka::measured_together`).
pub fn measure_bytes(model: &impl StepMemory, rows: usize, seq: usize) -> usize {
    let n = rows * seq;
    let act = model.hidden_bytes(1, 1) / model.hidden_size().max(1);
    let mut by_layer: std::collections::BTreeMap<usize, Vec<(usize, usize)>> = Default::default();
    for (&layer, (_, a)) in model.adapter_layers().iter().zip(model.adapters()) {
        let (d, r, on_cuda) = (a.b.dims()[0], a.b.dims()[1], a.b.device().is_cuda());
        by_layer.entry(layer).or_default().push((
            cka::batch_bytes(n, d, r, act, on_cuda),
            cka::measured_together(n, d, r, on_cuda),
        ));
    }
    by_layer
        .into_values()
        .map(|mut held| {
            held.sort_unstable_by(|a, b| b.cmp(a));
            let together = held.iter().map(|&(_, k)| k).max().unwrap_or(1);
            held.iter().take(together).map(|&(bytes, _)| bytes).sum()
        })
        .max()
        .unwrap_or(0)
}

/// The layers from `first` (the lowest trainable one) up whose adapters are all frozen.
fn pass_through(model: &impl StepMemory, first: usize) -> Vec<usize> {
    let n = model.num_layers();
    let layers = model.adapter_layers();
    let adapters = model.adapters();
    (first..n)
        .filter(|&l| {
            !layers
                .iter()
                .zip(&adapters)
                .any(|(&al, (_, a))| al == l && a.trainable)
        })
        .collect()
}

/// The step's plan. Without a budget: `micro` rows per pass, `accum` passes, every trainable layer
/// checkpointed when `checkpoint_all`. With `budget` bytes: the plan of least estimated time whose
/// [`step_bytes`] fits (with SAFE's in-step measurement when `measuring`), over micro-batches that
/// divide the step's batch (`micro * accum` examples, so the step's examples and result do not
/// change) and the cheapest recomputation (`cheapest_recompute`: parts of layers and whole
/// layers, pass-through layers first, as they have no weight gradients, only the gradient to pass
/// down). An error when not even one row with every layer checkpointed fits.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    model: &impl StepMemory,
    micro: usize,
    accum: usize,
    seq: usize,
    checkpoint_all: bool,
    offload: &[usize],
    budget: Option<usize>,
    device: &PlanDevice,
    measuring: bool,
) -> anyhow::Result<MemoryPlan> {
    let n = model.num_layers();
    let first = model.lowest_trainable_layer().unwrap_or(n);
    let through = pass_through(model, first);
    let make = |micro: usize, accum: usize, chosen: Chosen| -> MemoryPlan {
        let recompute = chosen.recompute;
        let layers = |f: fn(Keep) -> bool| (first..n).filter(|&l| f(recompute.keep(l))).collect();
        let pass_through_bytes = through
            .iter()
            .map(|&l| model.layer_memory(l, micro, seq).kept(recompute.keep(l)))
            .sum();
        MemoryPlan {
            micro,
            accum,
            first_trained_layer: first,
            pass_through: through.clone(),
            pass_through_bytes,
            estimated_step_bytes: chosen.estimate,
            checkpointed: layers(|k| !k.saves()),
            ffn_recomputed: layers(|k| k.recomputed().ffn),
            attention_recomputed: layers(|k| k.recomputed().attention),
            offloaded: (first..n).filter(|&l| recompute.offloads(l)).collect(),
            budget_bytes: budget,
            measuring,
        }
    };
    let Some(budget) = budget else {
        let recompute = Recompute::layers(if checkpoint_all { first..n } else { n..n })
            .with_offload(offload.iter().copied().filter(|&l| l >= first));
        let estimate = step_bytes(model, &recompute, micro, seq);
        let chosen = Chosen {
            recompute,
            estimate,
            cost_pct: 0,
        };
        return Ok(make(micro, accum, chosen));
    };
    let batch = micro * accum;
    let span = n - first;
    // The estimate is within a few percent of the allocator's count (tests/plan_memory.rs): plan
    // against a little less than the budget so that the measured peak stays under it.
    let target = budget - budget / BUDGET_MARGIN;
    let (hidden, act) = (
        model.hidden_size(),
        model.hidden_bytes(1, 1) / model.hidden_size().max(1),
    );
    let mut best: Option<(usize, MemoryPlan)> = None;
    for rows in (1..=batch).rev().filter(|r| batch.is_multiple_of(*r)) {
        let measure = if measuring {
            measure_bytes(model, rows, seq)
        } else {
            0
        };
        let offload =
            (device.offload.as_ref()).and_then(|r| OffloadPrice::of(r, hidden, rows, seq, act));
        let Some(chosen) = cheapest_recompute(
            model,
            &through,
            rows,
            seq,
            measure,
            target,
            offload.as_ref(),
        ) else {
            continue;
        };
        // Work in hundredths of a layer forward per token: 3 per trained layer (forward,
        // backward), 1 per layer below, up to 1 more per checkpointed layer and a share of one
        // per part a layer recomputes (`LayerMemory`'s costs); a pass counts at
        // least `efficient_tokens`.
        let passes = batch / rows;
        let tokens = (rows * seq).max(device.efficient_tokens);
        let cost = passes * tokens * (100 * (first + 3 * span) + chosen.cost_pct);
        if best.as_ref().is_none_or(|(c, _)| cost < *c) {
            best = Some((cost, make(rows, passes, chosen)));
        }
    }
    match best {
        Some((_, p)) => Ok(p),
        None => {
            let all = Recompute::layers(first..n);
            anyhow::bail!(
                "--memory-budget {}: too small; one example of {seq} tokens with every trained \
                 layer checkpointed needs about {} for a step (layers {first}..{n} train)",
                format_bytes(budget),
                format_bytes(step_bytes(model, &all, 1, seq))
            )
        }
    }
}

/// `1.2 GB`, `850 MB`, `12 KB` (decimal units, as `--memory-budget` reads them).
pub fn format_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} KB", b / 1e3)
    }
}

/// Reads a size: `6GB`, `900MB`, `1.5GiB`, `512KiB`, or plain bytes.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 6GB, 900MB, 1.5GiB)"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "'{s}': unknown unit '{u}' (use B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let bytes = v * scale;
    if !bytes.is_finite() || bytes < 1.0 {
        return Err(format!("'{s}' is not a positive size"));
    }
    Ok(bytes as usize)
}

/// SAFE's monitoring keeps every monitoring example's hidden state between layers (and the next
/// layer's output beside it): an error before training when that alone exceeds the budget.
pub fn ensure_monitoring_fits(
    model: &impl StepMemory,
    n: usize,
    seq: usize,
    budget: usize,
) -> anyhow::Result<()> {
    let needed = 2 * model.hidden_bytes(n, seq);
    anyhow::ensure!(
        needed <= budget,
        "--memory-budget {}: SAFE's monitoring of {n} examples of {seq} tokens keeps about {}; \
         give a larger budget or fewer --safe-monitor-examples",
        format_bytes(budget),
        format_bytes(needed)
    );
    Ok(())
}

/// `plan.jsonl`: every memory plan a run makes, with the epoch and step from which it holds.
pub struct PlanLog {
    file: std::fs::File,
}

impl PlanLog {
    /// Opens `output/plan.jsonl` for a run resumed at global step `resumed_at` (None: fresh): the
    /// plans made up to that step are kept, those of lost steps dropped (as for `safe.jsonl`,
    /// `steps.jsonl`).
    pub fn open(output: &std::path::Path, resumed_at: Option<usize>) -> anyhow::Result<Self> {
        let path = output.join("plan.jsonl");
        let file = super::reports::reopen_log(&path, "global_step", resumed_at)?;
        Ok(Self { file })
    }

    /// Logs `plan` as in effect from step `step` (0-based, in steps done) of epoch `epoch`, the
    /// run's optimizer step `global_step`.
    pub fn write(
        &mut self,
        epoch: usize,
        step: usize,
        global_step: usize,
        plan: &MemoryPlan,
    ) -> anyhow::Result<()> {
        use std::io::Write;
        #[derive(Serialize)]
        struct Line<'a> {
            epoch: usize,
            step: usize,
            global_step: usize,
            #[serde(flatten)]
            plan: &'a MemoryPlan,
        }
        let line = serde_json::to_string(&Line {
            epoch,
            step,
            global_step,
            plan,
        })?;
        writeln!(self.file, "{line}")?;
        Ok(())
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
