//! The training forward and backward of a stack of transformer layers, shared by the decoders.
//!
//! Layers below the lowest trainable adapter run in inference mode and keep nothing; backward
//! stops at the lowest trainable layer. The layers from there up either keep what their backward
//! needs, or, with gradient checkpointing, only their input and the dropout RNG's state: backward
//! then runs each layer's forward again, from the top down, just before its backward. That trades
//! one more forward of the trainable layers for activation memory of one layer instead of all.

use crate::adapters::LoraGrads;
use crate::nn::Pass;
use candle_core::{Result, Tensor};
use rand::rngs::StdRng;

/// What a training forward of the stack keeps for backward.
pub struct StackSaved<S> {
    /// The lowest layer that trains (and the first one kept).
    pub first: usize,
    kept: Kept<S>,
}

enum Kept<S> {
    /// Each trainable layer's saved state, bottom up.
    States(Vec<S>),
    /// Each trainable layer's input and the RNG state its forward started from, bottom up.
    Checkpoints(Vec<(Tensor, StdRng)>),
}

impl<S> StackSaved<S> {
    /// Layers whose full saved state is kept (0 with checkpointing).
    pub fn states_kept(&self) -> usize {
        match &self.kept {
            Kept::States(s) => s.len(),
            Kept::Checkpoints(_) => 0,
        }
    }

    /// Layers kept as checkpoints (input and RNG state).
    pub fn checkpoints_kept(&self) -> usize {
        match &self.kept {
            Kept::States(_) => 0,
            Kept::Checkpoints(c) => c.len(),
        }
    }
}

/// Runs `layers` on `h`: inference mode below `first`, saving from `first` up (or keeping
/// checkpoints, with `checkpoint`). `run(layer, x, pass, save)` is one layer's forward.
pub fn forward<L, S>(
    layers: &[L],
    first: usize,
    mut h: Tensor,
    pass: &mut Pass,
    checkpoint: bool,
    mut run: impl FnMut(&L, &Tensor, &mut Pass, bool) -> Result<(Tensor, Option<S>)>,
) -> Result<(Tensor, StackSaved<S>)> {
    let (mut states, mut checkpoints) = (Vec::new(), Vec::new());
    for (i, layer) in layers.iter().enumerate() {
        let trains = i >= first;
        if trains && checkpoint {
            checkpoints.push((h.clone(), pass.rng.clone()));
        }
        let (out, saved) = run(layer, &h, pass, trains && !checkpoint)?;
        states.extend(saved);
        h = out;
    }
    let kept = if checkpoint {
        Kept::Checkpoints(checkpoints)
    } else {
        Kept::States(states)
    };
    Ok((h, StackSaved { first, kept }))
}

/// Backward from the stack output's gradient `dh` down to the lowest trainable layer.
/// `back(layer, saved, dout, need_dx)` is one layer's backward; `run` must be the forward given to
/// [`forward`] (checkpointed layers are run again with it, in training mode). Returns each
/// layer's gradients with its index, top layer first.
pub fn backward<L, S, G>(
    layers: &[L],
    saved: StackSaved<S>,
    mut dh: Tensor,
    mut run: impl FnMut(&L, &Tensor, &mut Pass, bool) -> Result<(Tensor, Option<S>)>,
    mut back: impl FnMut(&L, S, &Tensor, bool) -> Result<(Option<Tensor>, G)>,
) -> Result<Vec<(usize, G)>> {
    let first = saved.first;
    let mut grads = Vec::new();
    // One layer's backward; false once no layer below needs a gradient.
    let mut step = |i: usize, state: S| -> Result<bool> {
        let (dx, g) = back(&layers[i], state, &dh, i > first)?;
        grads.push((i, g));
        Ok(match dx {
            Some(d) => {
                dh = d;
                true
            }
            None => false,
        })
    };
    match saved.kept {
        Kept::States(states) => {
            for (offset, state) in states.into_iter().enumerate().rev() {
                if !step(first + offset, state)? {
                    break;
                }
            }
        }
        Kept::Checkpoints(points) => {
            for (offset, (x, mut rng)) in points.into_iter().enumerate().rev() {
                let i = first + offset;
                let mut pass = Pass {
                    training: true,
                    rng: &mut rng,
                };
                let (_, state) = run(&layers[i], &x, &mut pass, true)?;
                drop(x);
                let state = state.expect("a layer run with save keeps its state");
                if !step(i, state)? {
                    break;
                }
            }
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
