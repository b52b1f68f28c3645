//! The training forward and backward of the trainable layers of a stack, shared by every
//! architecture.
//!
//! The layers below the lowest trainable adapter are not run here (they run in inference mode and
//! keep nothing, or come from the frozen-bottom cache); backward stops at the lowest trainable
//! layer. Each layer from there up either keeps what its backward needs, or, when [`Recompute`]
//! covers it (gradient checkpointing), only its input and the dropout RNG's state: backward then
//! runs that layer's forward again just before its backward. That trades one more forward of the
//! layer for its activation memory; the memory planner (`train/plan.rs`) chooses which layers.

use crate::adapters::LoraGrads;
use crate::nn::offload::{self, SavedTensors, Stashed};
use crate::nn::Pass;
use candle_core::{Result, Tensor};
use rand::rngs::StdRng;
use std::collections::BTreeSet;

/// The layers gradient checkpointing covers, by model layer index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Recompute {
    /// Every layer keeps its state.
    #[default]
    None,
    /// Every layer keeps only its input (`--gradient-checkpointing`).
    All,
    /// `whole` layers keep only their input; the others keep their state less the parts that
    /// backward recomputes: the feed-forward activation's input in `ffn` layers, the attention's
    /// in `attention` layers ([`Parts`]). What `offload` layers keep goes to host memory until
    /// their backward (`nn::offload`).
    Layers {
        whole: BTreeSet<usize>,
        ffn: BTreeSet<usize>,
        attention: BTreeSet<usize>,
        offload: BTreeSet<usize>,
    },
}

/// What a layer's training forward keeps for its backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Nothing: inference, or a checkpointed layer's first forward.
    Nothing,
    /// All that its backward reads, less the parts backward recomputes.
    State(Parts),
}

/// The parts of a layer's state that its backward recomputes instead of keeping, each from a
/// tensor the layer keeps anyway, with the same dropout draws ([`PartSaved`]): one or a few
/// matmuls instead of the whole layer's forward that checkpointing replays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Parts {
    /// The feed-forward activation's input (GELU's, or SwiGLU's gate and up: the widest tensors
    /// of a layer, 36-47% of its state), from the norm output before it.
    pub ffn: bool,
    /// The attention's saved q, k, v, log-sum-exp (and the flash kernels' output), from the
    /// tensor the q, k and v projections read (a third of a LLaMA layer's state for about a
    /// quarter of its forward).
    pub attention: bool,
}

impl Keep {
    /// Everything its backward reads.
    pub const ALL: Keep = Keep::State(Parts {
        ffn: false,
        attention: false,
    });

    /// Whether anything is kept.
    pub fn saves(self) -> bool {
        self != Keep::Nothing
    }

    /// The parts backward recomputes (none when nothing is kept).
    pub fn recomputed(self) -> Parts {
        match self {
            Keep::Nothing => Parts::default(),
            Keep::State(p) => p,
        }
    }

    /// Whether the attention's state is kept: saved, and not recomputed.
    pub fn keeps_attention(self) -> bool {
        self.saves() && !self.recomputed().attention
    }
}

impl Recompute {
    /// Checkpointed layers `whole`, none recomputing only a part.
    pub fn layers(whole: impl IntoIterator<Item = usize>) -> Self {
        Recompute::Layers {
            whole: whole.into_iter().collect(),
            ffn: BTreeSet::new(),
            attention: BTreeSet::new(),
            offload: BTreeSet::new(),
        }
    }

    /// The recomputation under which each `(layer, keep)` keeps that: [`Recompute::keep`]'s
    /// inverse.
    pub fn from_keeps(keeps: impl IntoIterator<Item = (usize, Keep)>) -> Self {
        let (mut whole, mut ffn, mut attention) = Default::default();
        let add = |set: &mut BTreeSet<usize>, on: bool, l: usize| on.then(|| set.insert(l));
        for (l, keep) in keeps {
            let parts = keep.recomputed();
            add(&mut whole, !keep.saves(), l);
            add(&mut ffn, parts.ffn, l);
            add(&mut attention, parts.attention, l);
        }
        Recompute::Layers {
            whole,
            ffn,
            attention,
            offload: BTreeSet::new(),
        }
    }

    /// Every layer keeps all its state, and what `layers` keep goes to host memory until their
    /// backward.
    pub fn offloading(layers: impl IntoIterator<Item = usize>) -> Self {
        Recompute::None.with_offload(layers)
    }

    /// The same recomputation with what `layers` keep going to host memory until their backward
    /// (instead of any offload it had). Under [`Recompute::All`] no layer keeps a state to move,
    /// so it stays as it is.
    pub fn with_offload(self, layers: impl IntoIterator<Item = usize>) -> Self {
        match self {
            Recompute::None => Recompute::Layers {
                whole: BTreeSet::new(),
                ffn: BTreeSet::new(),
                attention: BTreeSet::new(),
                offload: layers.into_iter().collect(),
            },
            Recompute::All => Recompute::All,
            Recompute::Layers {
                whole,
                ffn,
                attention,
                ..
            } => Recompute::Layers {
                whole,
                ffn,
                attention,
                offload: layers.into_iter().collect(),
            },
        }
    }

    /// Whether what `layer` keeps goes to host memory until its backward.
    pub fn offloads(&self, layer: usize) -> bool {
        matches!(self, Recompute::Layers { offload, .. } if offload.contains(&layer))
    }

    /// Whether `layer` is checkpointed whole.
    pub fn covers(&self, layer: usize) -> bool {
        match self {
            Recompute::None => false,
            Recompute::All => true,
            Recompute::Layers { whole, .. } => whole.contains(&layer),
        }
    }

    /// What `layer`'s first training forward keeps.
    pub fn keep(&self, layer: usize) -> Keep {
        match self {
            _ if self.covers(layer) => Keep::Nothing,
            Recompute::Layers { ffn, attention, .. } => Keep::State(Parts {
                ffn: ffn.contains(&layer),
                attention: attention.contains(&layer),
            }),
            _ => Keep::ALL,
        }
    }

    /// `--gradient-checkpointing`: all layers or none.
    pub fn all_if(on: bool) -> Self {
        if on {
            Recompute::All
        } else {
            Recompute::None
        }
    }
}

/// A part of a layer's saved state `S` that backward may recompute ([`Parts`]): kept, or the RNG
/// state the part's first linear started from and what else its forward needs (`R`), so that
/// backward runs it again with the same dropout draws and gets the same state.
pub enum PartSaved<S, R = ()> {
    Kept(S),
    Recompute(Box<StdRng>, R),
}

impl<S: SavedTensors, R: SavedTensors> SavedTensors for PartSaved<S, R> {
    fn each_tensor(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        match self {
            PartSaved::Kept(s) => s.each_tensor(f),
            PartSaved::Recompute(_, r) => r.each_tensor(f),
        }
    }
}

/// Taken just before the feed-forward's first linear runs: the RNG state to replay when `keep`
/// recomputes the activation's input ([`PartSaved::new`]).
pub fn ffn_start(keep: Keep, pass: &Pass) -> Option<Box<StdRng>> {
    keep.recomputed().ffn.then(|| Box::new(pass.rng.clone()))
}

/// Taken just before the q, k and v projections run: the RNG state to replay when `keep`
/// recomputes the attention's state.
pub fn attention_start(keep: Keep, pass: &Pass) -> Option<Box<StdRng>> {
    keep.recomputed()
        .attention
        .then(|| Box::new(pass.rng.clone()))
}

impl<S> PartSaved<S> {
    /// What the forward keeps: the replay point from [`ffn_start`], else the part's own state
    /// (None when nothing is saved).
    pub fn new(start: Option<Box<StdRng>>, saved: Option<S>) -> Option<Self> {
        Self::with(start.map(|rng| (rng, ())), saved)
    }
}

impl<S, R> PartSaved<S, R> {
    /// What the forward keeps: the replay point and what the part's forward needs, else the
    /// part's own state (None when nothing is saved).
    pub fn with(start: Option<(Box<StdRng>, R)>, saved: Option<S>) -> Option<Self> {
        match start {
            Some((rng, r)) => Some(PartSaved::Recompute(rng, r)),
            None => saved.map(PartSaved::Kept),
        }
    }

    /// The part's state: kept, or `run` (the part's forward from a tensor the layer keeps, and
    /// the state from its output) on a training pass from the saved RNG state.
    pub fn get(self, run: impl FnOnce(&mut Pass, R) -> Result<S>) -> Result<S> {
        match self {
            PartSaved::Kept(s) => Ok(s),
            PartSaved::Recompute(mut rng, r) => run(&mut Pass::training(&mut rng), r),
        }
    }
}

/// What a model's gradient tests compare with keeping every state (a model of 3 layers): every
/// layer checkpointed; every layer recomputing its feed-forward input; every layer recomputing
/// its attention; layer 1 checkpointed, the others recomputing both parts; layer 0 recomputing
/// its attention, layer 2 its feed-forward input; every layer offloaded; layer 1 checkpointed
/// and layers 0 and 2 offloaded, layer 2 recomputing its feed-forward input.
#[cfg(test)]
pub(crate) fn test_recomputes() -> [Recompute; 7] {
    let set = |ls: &[usize]| ls.iter().copied().collect();
    let layers = |whole: &[usize], ffn: &[usize], attention: &[usize]| Recompute::Layers {
        whole: set(whole),
        ffn: set(ffn),
        attention: set(attention),
        offload: Default::default(),
    };
    [
        Recompute::All,
        layers(&[], &[0, 1, 2], &[]),
        layers(&[], &[], &[0, 1, 2]),
        layers(&[1], &[0, 1, 2], &[0, 1, 2]),
        layers(&[], &[2], &[0]),
        Recompute::offloading(0..3),
        Recompute::Layers {
            whole: set(&[1]),
            ffn: set(&[2]),
            attention: set(&[]),
            offload: set(&[0, 2]),
        },
    ]
}

/// What a training forward of the stack keeps for backward.
pub struct StackSaved<S> {
    /// Each trainable layer's keep, bottom up.
    kept: Vec<Kept<S>>,
}

enum Kept<S> {
    /// The layer's saved state.
    State(S),
    /// The layer's saved state, its tensors in host memory until its backward.
    Offloaded(Box<Stashed<S>>),
    /// The layer's input and the RNG state its forward started from.
    Checkpoint(Tensor, Box<StdRng>),
}

impl<S> StackSaved<S> {
    /// Layers whose full saved state is kept.
    pub fn states_kept(&self) -> usize {
        self.kept
            .iter()
            .filter(|k| matches!(k, Kept::State(_) | Kept::Offloaded(_)))
            .count()
    }

    /// Layers kept as checkpoints (input and RNG state).
    pub fn checkpoints_kept(&self) -> usize {
        self.kept.len() - self.states_kept()
    }
}

/// Runs `layers` (model layers `first..`, all on the gradient path) on `h`, each saving its state
/// (less the parts `recompute` says) or, when `recompute` covers it, keeping its input. The state
/// of a layer `recompute` offloads starts its copy to the host at once; its device copy is freed
/// when the next offloaded layer's is stashed (or the forward ends), so the copy overlaps every
/// layer's forward in between.
/// `run(layer, x, pass, keep)` is one layer's forward. A monitored pass is told each layer's
/// index, so its adapters' rows are taken once per step (a checkpointed layer's second forward,
/// in backward, has no monitor).
pub fn forward<L, S: SavedTensors>(
    layers: &[L],
    first: usize,
    mut h: Tensor,
    pass: &mut Pass,
    recompute: &Recompute,
    mut run: impl FnMut(&L, &Tensor, &mut Pass, Keep) -> Result<(Tensor, Option<S>)>,
) -> Result<(Tensor, StackSaved<S>)> {
    let mut kept = Vec::with_capacity(layers.len());
    // The last offloaded layer whose device copy is not yet freed.
    let mut in_flight: Option<usize> = None;
    for (i, layer) in layers.iter().enumerate() {
        let keep = recompute.keep(first + i);
        let point = (!keep.saves()).then(|| (h.clone(), pass.rng.clone()));
        pass.monitor_layer(Some(first + i))?;
        let run_layer = run(layer, &h, pass, keep);
        let measured = pass.monitor_layer(None);
        let (out, saved) = run_layer?;
        measured?;
        let entry = match (point, saved) {
            (Some((x, rng)), _) => Kept::Checkpoint(x, Box::new(rng)),
            (None, Some(s)) if recompute.offloads(first + i) => {
                release(&mut kept, in_flight.replace(i))?;
                Kept::Offloaded(Box::new(offload::stash(s, h.device())?))
            }
            (None, Some(s)) => Kept::State(s),
            (None, None) => candle_core::bail!("layer {} run with save kept no state", first + i),
        };
        kept.push(entry);
        h = out;
    }
    release(&mut kept, in_flight)?;
    Ok((h, StackSaved { kept }))
}

/// Frees layer `i`'s device copy once its copy to the host is done.
fn release<S: SavedTensors>(kept: &mut [Kept<S>], i: Option<usize>) -> Result<()> {
    match i.map(|i| &mut kept[i]) {
        Some(Kept::Offloaded(stashed)) => stashed.release(),
        _ => Ok(()),
    }
}

/// Starts copying back the highest offloaded layer of `kept` (a no-op when its copy has started).
fn fetch_highest<S: SavedTensors>(kept: &mut [Kept<S>]) -> Result<()> {
    let highest = kept.iter_mut().rev().find_map(|k| match k {
        Kept::Offloaded(stashed) => Some(stashed),
        _ => None,
    });
    highest.map_or(Ok(()), |s| s.fetch())
}

/// Backward from the stack output's gradient `dh` down to the lowest trainable layer.
/// `back(layer, saved, dout, need_dx)` is one layer's backward; `state(layer, x, pass)` rebuilds a
/// checkpointed layer's saved state by running the forward given to [`forward`] again on its
/// input, in training mode (its output is not needed: the first forward gave it, so a layer may
/// skip what only makes the output). The highest offloaded layer's state starts its copy back at
/// once, and each next one down when the one above it is back, so each copy overlaps the
/// backward of every layer in between. Returns each layer's gradients with its index relative to
/// `first`, top layer first.
pub fn backward<L, S: SavedTensors, G>(
    layers: &[L],
    saved: StackSaved<S>,
    mut dh: Tensor,
    mut state: impl FnMut(&L, &Tensor, &mut Pass) -> Result<S>,
    mut back: impl FnMut(&L, S, &Tensor, bool) -> Result<(Option<Tensor>, G)>,
) -> Result<Vec<(usize, G)>> {
    let mut grads = Vec::new();
    let mut kept_below = saved.kept;
    fetch_highest(&mut kept_below)?;
    while let Some(kept) = kept_below.pop() {
        let i = kept_below.len();
        let state = match kept {
            Kept::State(s) => s,
            Kept::Offloaded(stashed) => {
                let s = stashed.restore()?;
                fetch_highest(&mut kept_below)?;
                s
            }
            Kept::Checkpoint(x, mut rng) => {
                let mut pass = Pass::training(&mut rng);
                state(&layers[i], &x, &mut pass)?
            }
        };
        let (dx, g) = back(&layers[i], state, &dh, i > 0)?;
        grads.push((i, g));
        match dx {
            Some(d) => dh = d,
            None => break,
        }
    }
    Ok(grads)
}

/// The adapters' gradients of a [`backward`] run on the layers from `first` up (indices relative
/// to `first`, top layer first), as `(layer, site, grads)` by ascending layer and site.
pub fn by_site<S: Copy + Ord>(
    first: usize,
    per_layer: Vec<(usize, Vec<(S, LoraGrads)>)>,
) -> Vec<(usize, S, LoraGrads)> {
    let mut grads: Vec<_> = per_layer
        .into_iter()
        .flat_map(|(i, grads)| grads.into_iter().map(move |(s, g)| (first + i, s, g)))
        .collect();
    grads.sort_by_key(|(l, s, _)| (*l, *s));
    grads
}
