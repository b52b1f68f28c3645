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
    /// `whole` layers keep only their input; `ffn` layers keep their state less the
    /// feed-forward activation's input ([`Keep::StateLessFfn`]).
    Layers {
        whole: BTreeSet<usize>,
        ffn: BTreeSet<usize>,
    },
}

/// What a layer's training forward keeps for its backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Nothing: inference, or a checkpointed layer's first forward.
    Nothing,
    /// All that its backward reads.
    State,
    /// All but the feed-forward activation's input (GELU's, or SwiGLU's gate and up: the widest
    /// tensors of a layer, 36-47% of its state), which backward recomputes from the norm output
    /// before it with the same dropout draws ([`FfnSaved`]): one or two matmuls instead of the
    /// whole layer's forward that checkpointing replays.
    StateLessFfn,
}

impl Keep {
    /// Whether anything is kept.
    pub fn saves(self) -> bool {
        self != Keep::Nothing
    }
}

impl Recompute {
    /// Checkpointed layers `whole`, none recomputing only its feed-forward input.
    pub fn layers(whole: impl IntoIterator<Item = usize>) -> Self {
        Recompute::Layers {
            whole: whole.into_iter().collect(),
            ffn: BTreeSet::new(),
        }
    }

    /// Whether `layer` is checkpointed whole.
    pub fn covers(&self, layer: usize) -> bool {
        match self {
            Recompute::None => false,
            Recompute::All => true,
            Recompute::Layers { whole, .. } => whole.contains(&layer),
        }
    }

    /// Whether `layer` recomputes its feed-forward input (and is not checkpointed whole).
    pub fn ffn(&self, layer: usize) -> bool {
        matches!(self, Recompute::Layers { ffn, .. } if ffn.contains(&layer)) && !self.covers(layer)
    }

    /// What `layer`'s first training forward keeps.
    pub fn keep(&self, layer: usize) -> Keep {
        if self.covers(layer) {
            Keep::Nothing
        } else if self.ffn(layer) {
            Keep::StateLessFfn
        } else {
            Keep::State
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

/// A feed-forward activation's saved state `S` ([`Keep::StateLessFfn`]): kept, or the RNG state
/// the feed-forward's first linear started from, so that backward runs its linear(s) again with
/// the same dropout draws and gets the same input.
pub enum FfnSaved<S> {
    Kept(S),
    Recompute(Box<StdRng>),
}

/// Taken just before a feed-forward's first linear runs: the RNG state to replay when `keep`
/// recomputes the activation's input ([`FfnSaved::new`]).
pub fn ffn_start(keep: Keep, pass: &Pass) -> Option<Box<StdRng>> {
    (keep == Keep::StateLessFfn).then(|| Box::new(pass.rng.clone()))
}

impl<S> FfnSaved<S> {
    /// What the forward keeps: the replay point from [`ffn_start`], else the activation's own
    /// state (None when nothing is saved).
    pub fn new(start: Option<Box<StdRng>>, saved: Option<S>) -> Option<Self> {
        match start {
            Some(rng) => Some(FfnSaved::Recompute(rng)),
            None => saved.map(FfnSaved::Kept),
        }
    }

    /// The activation's state: kept, or `run` (the feed-forward's linear(s) and the activation's
    /// state from their output) on a training pass from the saved RNG state.
    pub fn get(self, run: impl FnOnce(&mut Pass) -> Result<S>) -> Result<S> {
        match self {
            FfnSaved::Kept(s) => Ok(s),
            FfnSaved::Recompute(mut rng) => run(&mut Pass::training(&mut rng)),
        }
    }
}

/// What a model's gradient tests compare with keeping every state: every layer checkpointed;
/// every layer recomputing its feed-forward input; layer 1 checkpointed and the others
/// recomputing their feed-forward input (a model of 3 layers).
#[cfg(test)]
pub(crate) fn test_recomputes() -> [Recompute; 3] {
    [
        Recompute::All,
        Recompute::Layers {
            whole: BTreeSet::new(),
            ffn: (0..3).collect(),
        },
        Recompute::Layers {
            whole: [1].into(),
            ffn: [0, 1, 2].into(),
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
    /// The layer's input and the RNG state its forward started from.
    Checkpoint(Tensor, Box<StdRng>),
}

impl<S> StackSaved<S> {
    /// Layers whose full saved state is kept.
    pub fn states_kept(&self) -> usize {
        self.kept
            .iter()
            .filter(|k| matches!(k, Kept::State(_)))
            .count()
    }

    /// Layers kept as checkpoints (input and RNG state).
    pub fn checkpoints_kept(&self) -> usize {
        self.kept.len() - self.states_kept()
    }
}

/// Runs `layers` (model layers `first..`, all on the gradient path) on `h`, each saving its state
/// (less its feed-forward input where `recompute` says) or, when `recompute` covers it, keeping
/// its input. `run(layer, x, pass, keep)` is one layer's forward. A monitored pass is told each layer's index, so its adapters' rows are taken once
/// per step (a checkpointed layer's second forward, in backward, has no monitor).
pub fn forward<L, S>(
    layers: &[L],
    first: usize,
    mut h: Tensor,
    pass: &mut Pass,
    recompute: &Recompute,
    mut run: impl FnMut(&L, &Tensor, &mut Pass, Keep) -> Result<(Tensor, Option<S>)>,
) -> Result<(Tensor, StackSaved<S>)> {
    let mut kept = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let keep = recompute.keep(first + i);
        let point = (!keep.saves()).then(|| (h.clone(), pass.rng.clone()));
        pass.monitor_layer(Some(first + i))?;
        let run_layer = run(layer, &h, pass, keep);
        let measured = pass.monitor_layer(None);
        let (out, saved) = run_layer?;
        measured?;
        kept.push(match (point, saved) {
            (Some((x, rng)), _) => Kept::Checkpoint(x, Box::new(rng)),
            (None, Some(s)) => Kept::State(s),
            (None, None) => candle_core::bail!("layer {} run with save kept no state", first + i),
        });
        h = out;
    }
    Ok((h, StackSaved { kept }))
}

/// Backward from the stack output's gradient `dh` down to the lowest trainable layer.
/// `back(layer, saved, dout, need_dx)` is one layer's backward; `state(layer, x, pass)` rebuilds a
/// checkpointed layer's saved state by running the forward given to [`forward`] again on its
/// input, in training mode (its output is not needed: the first forward gave it, so a layer may
/// skip what only makes the output). Returns each layer's gradients with its index relative to
/// `first`, top layer first.
pub fn backward<L, S, G>(
    layers: &[L],
    saved: StackSaved<S>,
    mut dh: Tensor,
    mut state: impl FnMut(&L, &Tensor, &mut Pass) -> Result<S>,
    mut back: impl FnMut(&L, S, &Tensor, bool) -> Result<(Option<Tensor>, G)>,
) -> Result<Vec<(usize, G)>> {
    let mut grads = Vec::new();
    for (i, kept) in saved.kept.into_iter().enumerate().rev() {
        let state = match kept {
            Kept::State(s) => s,
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
