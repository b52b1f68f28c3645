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
    /// These layers keep only their input.
    Layers(BTreeSet<usize>),
}

impl Recompute {
    pub fn covers(&self, layer: usize) -> bool {
        match self {
            Recompute::None => false,
            Recompute::All => true,
            Recompute::Layers(l) => l.contains(&layer),
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
/// or, when `recompute` covers it, keeping its input. `run(layer, x, pass, save)` is one layer's
/// forward. A monitored pass is told each layer's index, so its adapters' rows are taken once
/// per step (a checkpointed layer's second forward, in backward, has no monitor).
pub fn forward<L, S>(
    layers: &[L],
    first: usize,
    mut h: Tensor,
    pass: &mut Pass,
    recompute: &Recompute,
    mut run: impl FnMut(&L, &Tensor, &mut Pass, bool) -> Result<(Tensor, Option<S>)>,
) -> Result<(Tensor, StackSaved<S>)> {
    let mut kept = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let checkpoint = recompute.covers(first + i);
        let point = checkpoint.then(|| (h.clone(), pass.rng.clone()));
        pass.monitor_layer(Some(first + i));
        let run_layer = run(layer, &h, pass, !checkpoint);
        pass.monitor_layer(None);
        let (out, saved) = run_layer?;
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
                let mut pass = Pass {
                    training: true,
                    rng: &mut rng,
                    monitor: None,
                };
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
