//! LoRA exactly as PEFT's `tuners/lora/layer.py`: `y = base(x) + scaling * B(A(dropout(x)))`, with
//! `A` `[r, in]` (kaiming-uniform, a = sqrt(5)), `B` `[out, r]` zeros, `scaling = alpha / r`
//! (`alpha / sqrt(r)` with rsLoRA). Same names and shapes as PEFT, so export is a rename-free write.
//!
//! Memory: the base weight is frozen, so a `LoraLinear` saves its input for backward only while its
//! adapter trains (for `dA`), plus the tiny `[n, r]` projection (for `dB`). A frozen adapter is a
//! constant: no weight gradient, nothing saved.

use super::LoraMatrix;
use crate::nn::dropout::{self, DropoutSaved};
use crate::nn::flops::{matmul, matmul_scaled};
use crate::nn::linear::Linear;
use crate::nn::{Dropout, Pass};
use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// PEFT's LoRA hyper-parameters (the fields of `adapter_config.json` that matter for training).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names as PEFT matches them: the last path component, e.g. `query`, `value`, `dense`.
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.1,
            target_modules: vec!["query".into(), "value".into()],
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

#[derive(Clone, Debug)]
pub struct LoraAdapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
    pub dropout: Dropout,
    /// False once frozen (by SAFE or a fixed prefix): the adapter is then a constant.
    pub trainable: bool,
    /// `a` and `b` in the activations' dtype while they are current (see [`LowCopy`]).
    pub low: LowCopy,
}

/// An adapter's `A` and `B` cast to the activations' dtype (bf16 beside a bf16 base), made once
/// per change of the master weights instead of twice per forward and backward: the optimizer
/// replaces `a` and `b` with new tensors, so each copy is keyed by its master's tensor id. The
/// fused optimizer writes the next copies itself ([`LowCopy::install`]). A clone starts empty.
#[derive(Debug, Default)]
pub struct LowCopy(std::sync::Mutex<[Option<LowWeight>; 2]>);

#[derive(Debug)]
struct LowWeight {
    of: candle_core::TensorId,
    t: Tensor,
}

impl Clone for LowCopy {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl LowCopy {
    fn lock(&self) -> std::sync::MutexGuard<'_, [Option<LowWeight>; 2]> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The dtype of the copy of `matrix` made last (None when there is none): what the
    /// optimizer's next copy should be.
    pub fn dtype(&self, matrix: LoraMatrix) -> Option<DType> {
        self.lock()[matrix as usize].as_ref().map(|w| w.t.dtype())
    }

    /// Takes `t` as the copy of `matrix` while its master weight is the tensor `of`.
    pub fn install(&self, matrix: LoraMatrix, of: &Tensor, t: Tensor) {
        self.lock()[matrix as usize] = Some(LowWeight { of: of.id(), t });
    }

    /// The copy of `matrix` kept for `master`, if there is one.
    pub fn copy_of(&self, matrix: LoraMatrix, master: &Tensor) -> Option<Tensor> {
        let slot = &self.lock()[matrix as usize];
        slot.as_ref()
            .filter(|w| w.of == master.id())
            .map(|w| w.t.clone())
    }

    /// `master` in `dtype`: the copy kept for it, else a new cast, kept.
    fn get(&self, matrix: LoraMatrix, master: &Tensor, dtype: DType) -> Result<Tensor> {
        if let Some(t) = self.copy_of(matrix, master).filter(|t| t.dtype() == dtype) {
            return Ok(t);
        }
        let t = master.to_dtype(dtype)?;
        self.install(matrix, master, t.clone());
        Ok(t)
    }
}

pub struct LoraGrads {
    pub a: Tensor,
    pub b: Tensor,
}

impl LoraAdapter {
    /// PEFT's init: `A ~ U(-bound, bound)` with `bound = 1/sqrt(in)` (kaiming-uniform with a = sqrt(5)),
    /// `B = 0`, so the adapted layer starts equal to the base layer.
    pub fn init(
        in_features: usize,
        out_features: usize,
        cfg: &LoraConfig,
        rng: &mut impl Rng,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (in_features as f64).sqrt();
        let a: Vec<f32> = (0..cfg.r * in_features)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        Ok(Self {
            a: Tensor::from_vec(a, (cfg.r, in_features), device)?.to_dtype(dtype)?,
            b: Tensor::zeros((out_features, cfg.r), dtype, device)?,
            scaling: cfg.scaling(),
            dropout: Dropout::new(cfg.dropout),
            trainable: true,
            low: LowCopy::default(),
        })
    }

    /// `(A, B)` in `dtype`: the master weights themselves when they are of it, else their copy
    /// cast down, made again only after they change.
    fn weights_in(&self, dtype: DType) -> Result<(Tensor, Tensor)> {
        if self.a.dtype() == dtype && self.b.dtype() == dtype {
            return Ok((self.a.clone(), self.b.clone()));
        }
        Ok((
            self.low.get(LoraMatrix::A, &self.a, dtype)?,
            self.low.get(LoraMatrix::B, &self.b, dtype)?,
        ))
    }

    /// The rank-r rows `U = scaling * dropout(x) A^T` and `B` of the adapter's output `U B^T`,
    /// computed in `x`'s dtype: beside
    /// a bf16 base, `A` and `B` (f32 master weights, `[r, in]` and `[out, r]`) are cast down for
    /// the product instead of casting the `[n, in]` activations up, so the matmuls run on bf16
    /// tensor cores and no activation-sized cast exists (PEFT with its adapters in bf16 computes
    /// the same way). When `save`, keeps the dropout mask (needed for `dx` even when frozen) and,
    /// if the adapter trains, `x` as it came (the same tensor for every adapter on that input,
    /// e.g. query and value) and `U`; backward re-applies the mask for `dA`.
    fn forward(
        &self,
        x: &Tensor,
        pass: &mut Pass,
        save: Save,
    ) -> Result<(LoraLinearSaved, (Tensor, Tensor))> {
        let (xd, drop) = self.dropout.forward(x, pass, save != Save::Nothing)?;
        let (u, b) = self.rank_r(&xd)?;
        let inputs = match save {
            _ if !self.trainable => None,
            Save::Nothing => None,
            Save::Input => Some((Some(x.clone()), u.clone())),
            Save::Recomputed => Some((None, u.clone())),
        };
        Ok((LoraLinearSaved { inputs, drop }, (u, b)))
    }

    /// The rank-r side of the adapter on its (dropped-out) input `x`: the scaled rows
    /// `U = scaling * x A^T` and `B` in `x`'s dtype; the output is `U B^T`. The scaling sits on
    /// the rank-r side (in the product itself on CUDA), not on an `[n, out]` pass.
    fn rank_r(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (a, b) = self.weights_in(x.dtype())?;
        let u = matmul_scaled(x, &a.t()?, self.scaling, x.dtype())?;
        Ok((u, b))
    }
}

/// A frozen base linear with an optional LoRA adapter beside it.
#[derive(Clone, Debug)]
pub struct LoraLinear {
    pub base: Linear,
    pub lora: Option<LoraAdapter>,
}

/// What a training forward keeps of a linear's input for its adapter's gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Save {
    /// Nothing (inference, or a pass that will not run backward).
    Nothing,
    /// The input itself.
    Input,
    /// Not the input: the layer recomputes it for backward from state it keeps anyway (the
    /// activation between a feed-forward's two linears, from the activation's own saved input).
    Recomputed,
}

/// Saved for backward: the adapter's dropout mask, and while it trains `U = scaling * x A^T` and
/// (unless the layer recomputes it) its input.
pub struct LoraLinearSaved {
    inputs: Option<(Option<Tensor>, Tensor)>,
    drop: Option<DropoutSaved>,
}

impl crate::nn::offload::SavedTensors for LoraLinearSaved {
    fn each_tensor(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        if let Some((x, u)) = &mut self.inputs {
            crate::nn::offload::SavedTensors::each_tensor(x, f);
            f(u);
        }
    }
}

impl LoraLinearSaved {
    /// Nothing saved: a linear without an adapter, or an inference pass.
    pub const NONE: Self = Self {
        inputs: None,
        drop: None,
    };

    /// Whether backward needs the input given back ([`Save::Recomputed`] on a trainable adapter).
    pub fn needs_input(&self) -> bool {
        matches!(self.inputs, Some((None, _)))
    }
}

/// What SAFE's CKA needs of one adapter on one batch, as `[rows, d]` tensors.
#[derive(Clone, Debug)]
pub enum CkaRows {
    /// `X` and `Y` in full: the block point, where the layer's outputs with and without one
    /// adapter differ in every direction.
    Full { x: Tensor, y: Tensor },
    /// At the linear `X = Y + U B^T`: the base output `Y`, the adapter's rank-r rows
    /// `U = scaling * x A^T` and its `B` (`[d, r]`). The CKA moments then need one `d x d`
    /// product over the rows (`Y^T Y`) instead of three.
    LowRank { y: Tensor, u: Tensor, b: Tensor },
}

impl CkaRows {
    /// The width `d` of `X` and `Y`.
    pub fn width(&self) -> Result<usize> {
        match self {
            Self::Full { y, .. } | Self::LowRank { y, .. } => y.dim(1),
        }
    }

    /// `(X, Y)` in full.
    pub fn x_y(&self) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Full { x, y } => Ok((x.clone(), y.clone())),
            Self::LowRank { y, u, b } => Ok(((y + matmul(u, &b.t()?)?)?, y.clone())),
        }
    }
}

impl LoraLinear {
    pub fn new(base: Linear) -> Self {
        Self { base, lora: None }
    }

    pub fn trains(&self) -> bool {
        self.lora.as_ref().is_some_and(|l| l.trainable)
    }

    /// `x` is `[n, in]`. Saves state only when `save` and the adapter trains.
    pub fn forward(
        &self,
        x: &Tensor,
        pass: &mut Pass,
        save: bool,
    ) -> Result<(Tensor, LoraLinearSaved)> {
        let save = if save { Save::Input } else { Save::Nothing };
        let (y, saved, _) = self.forward_rows(x, pass, save, false)?;
        Ok((y, saved))
    }

    /// [`LoraLinear::forward`], and when `rows` (and with an adapter) its [`CkaRows::LowRank`]
    /// rows on this pass (dropout included on a training pass): what SAFE measures, on a
    /// training step or on its monitoring passes (inference). They are the forward's own
    /// tensors, so nothing is computed for them; without them the adapter's update is added
    /// into the base output in place ([`crate::nn::add_low_rank`]).
    pub fn forward_rows(
        &self,
        x: &Tensor,
        pass: &mut Pass,
        save: Save,
        rows: bool,
    ) -> Result<(Tensor, LoraLinearSaved, Option<CkaRows>)> {
        let base = self.base.forward(x)?;
        let Some(lora) = &self.lora else {
            return Ok((base, LoraLinearSaved::NONE, None));
        };
        let (saved, (u, b)) = lora.forward(x, pass, save)?;
        if !rows {
            return Ok((crate::nn::add_low_rank(base, &u, &b, true)?, saved, None));
        }
        // The same in-place update on a copy, so a measured step computes what an unmeasured
        // one does (one product fused into the copy on CUDA, not a product and an add).
        let y = crate::nn::add_low_rank(base.copy()?, &u, &b, true)?;
        Ok((y, saved, Some(CkaRows::LowRank { y: base, u, b })))
    }

    /// Returns `dx` (when `need_dx`) and the adapter's gradients (when it trains).
    pub fn backward(
        &self,
        saved: LoraLinearSaved,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, Option<LoraGrads>)> {
        self.backward_with_input(saved, dy, need_dx, None)
    }

    /// [`LoraLinear::backward`] given the input its forward did not keep ([`Save::Recomputed`];
    /// an error if it is needed and not given).
    pub fn backward_with_input(
        &self,
        saved: LoraLinearSaved,
        dy: &Tensor,
        need_dx: bool,
        input: Option<Tensor>,
    ) -> Result<(Option<Tensor>, Option<LoraGrads>)> {
        let dx = if need_dx {
            Some(self.base.backward_input(dy)?)
        } else {
            None
        };
        self.adapter_backward(saved, dy, dx, input)
    }

    /// `acc + dx` and the adapter's gradients: a linear whose input gradient joins others' (q, k
    /// and v on one input). On CUDA the base's product and the adapter's update add into `acc`
    /// in place, which must be a tensor no one else reads; elsewhere `dx` is made, then added.
    pub fn backward_adding(
        &self,
        saved: LoraLinearSaved,
        dy: &Tensor,
        acc: Tensor,
    ) -> Result<(Tensor, Option<LoraGrads>)> {
        if self.base.backward_input_onto(dy, &acc)? {
            let (dx, grads) = self.adapter_backward(saved, dy, Some(acc), None)?;
            return Ok((dx.expect("dx given"), grads));
        }
        let (dx, grads) = self.backward(saved, dy, true)?;
        Ok((crate::nn::add(&acc, &dx.expect("dx requested"))?, grads))
    }

    /// The adapter's share of backward, given the base's input gradient `dx` (when wanted).
    fn adapter_backward(
        &self,
        saved: LoraLinearSaved,
        dy: &Tensor,
        mut dx: Option<Tensor>,
        input: Option<Tensor>,
    ) -> Result<(Option<Tensor>, Option<LoraGrads>)> {
        let Some(lora) = &self.lora else {
            return Ok((dx, None));
        };
        if dx.is_none() && saved.inputs.is_none() {
            return Ok((None, None)); // frozen adapter at the bottom of the backward: nothing to do
        }
        // The adapter path runs in the activations' dtype (see `LoraAdapter::forward`); the
        // gradients come back in the master weights' dtype, straight out of their products.
        let (a, b) = lora.weights_in(dy.dtype())?;
        let dxa = matmul_scaled(dy, &b, lora.scaling, dy.dtype())?; // d(x A^T), [n, r]
        if let Some(d) = dx.take() {
            // Without dropout the update goes straight into the base's fresh `dx`.
            dx = Some(match &saved.drop {
                None => crate::nn::add_low_rank(d, &dxa, &a, false)?,
                Some(drop) => {
                    let update = drop.backward(&matmul(&dxa, &a)?)?; // the product freed here
                    crate::nn::add(&d, &update)?
                }
            });
        }
        let grads = match saved.inputs {
            Some((x, u)) => {
                let Some(x) = x.or(input) else {
                    candle_core::bail!("a recomputed LoRA input was not given to backward");
                };
                let xd = dropout::backward_opt(&saved.drop, x)?;
                Some(LoraGrads {
                    a: matmul_scaled(&dxa.t()?, &xd, 1.0, lora.a.dtype())?,
                    b: matmul_scaled(&dy.t()?, &u, 1.0, lora.b.dtype())?,
                })
            }
            None => None,
        };
        Ok((dx, grads))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, max_abs_diff, randn};
    use rand::SeedableRng;

    fn layer(a: &Tensor, b: &Tensor, trainable: bool, p: f64) -> LoraLinear {
        LoraLinear {
            base: Linear::new(randn(&[4, 6], 71), Some(randn(&[4], 72))),
            lora: Some(LoraAdapter {
                a: a.clone(),
                b: b.clone(),
                scaling: 2.0,
                dropout: Dropout::new(p),
                trainable,
                low: LowCopy::default(),
            }),
        }
    }

    fn fwd(l: &LoraLinear, x: &Tensor, save: bool) -> (Tensor, LoraLinearSaved) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut pass = Pass::training(&mut rng);
        l.forward(x, &mut pass, save).unwrap()
    }

    #[test]
    fn trainable_adapter_gradients_match() {
        for p in [0.0, 0.3] {
            let (x, a, b) = (randn(&[7, 6], 73), randn(&[3, 6], 74), randn(&[4, 3], 75));
            let dy = randn(&[7, 4], 76);
            let l = layer(&a, &b, true, p);
            let saved = fwd(&l, &x, true).1;
            let (dx, g) = l.backward(saved, &dy, true).unwrap();
            let g = g.expect("trainable adapter has gradients");
            check(
                &[x, a, b],
                &dy,
                &[dx.unwrap(), g.a, g.b],
                |t| Ok(fwd(&layer(&t[1], &t[2], true, p), &t[0], false).0),
                1e-10,
            );
        }
    }

    #[test]
    fn frozen_adapter_saves_no_input_and_has_no_gradient() {
        let (x, a, b) = (randn(&[7, 6], 77), randn(&[3, 6], 78), randn(&[4, 3], 79));
        let dy = randn(&[7, 4], 80);
        let l = layer(&a, &b, false, 0.3);
        let saved = fwd(&l, &x, true).1;
        assert!(
            saved.inputs.is_none(),
            "a frozen adapter must not keep its input"
        );
        let (dx, g) = l.backward(saved, &dy, true).unwrap();
        assert!(g.is_none());
        check(
            &[x],
            &dy,
            &[dx.unwrap()],
            |t| Ok(fwd(&l, &t[0], false).0),
            1e-10,
        );
    }

    #[test]
    fn recomputed_input_gives_the_kept_inputs_gradients() {
        let (x, a, b) = (randn(&[7, 6], 81), randn(&[3, 6], 82), randn(&[4, 3], 83));
        let dy = randn(&[7, 4], 84);
        for p in [0.0, 0.3] {
            let l = layer(&a, &b, true, p);
            let run = |save: Save| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(11);
                let mut pass = Pass::training(&mut rng);
                l.forward_rows(&x, &mut pass, save, false).unwrap().1
            };
            let (kept, recomputed) = (run(Save::Input), run(Save::Recomputed));
            assert!(!kept.needs_input() && recomputed.needs_input());
            let (dx1, g1) = l.backward(kept, &dy, true).unwrap();
            let (dx2, g2) = l
                .backward_with_input(recomputed, &dy, true, Some(x.clone()))
                .unwrap();
            let (g1, g2) = (g1.unwrap(), g2.unwrap());
            for (u, v) in [(dx1.unwrap(), dx2.unwrap()), (g1.a, g2.a), (g1.b, g2.b)] {
                assert_eq!(max_abs_diff(&u, &v), 0.0);
            }
            let err = l.backward(run(Save::Recomputed), &dy, true);
            assert!(err.is_err(), "a missing recomputed input must be an error");
        }
    }

    #[test]
    fn backward_adding_is_the_accumulator_plus_the_input_gradient() {
        let (x, a, b) = (randn(&[7, 6], 86), randn(&[3, 6], 87), randn(&[4, 3], 88));
        let (dy, acc) = (randn(&[7, 4], 89), randn(&[7, 6], 90));
        for (trainable, p) in [(true, 0.0), (true, 0.3), (false, 0.3)] {
            let l = layer(&a, &b, trainable, p);
            let (dx, g) = l.backward(fwd(&l, &x, true).1, &dy, true).unwrap();
            let (sum, g2) = l
                .backward_adding(fwd(&l, &x, true).1, &dy, acc.clone())
                .unwrap();
            let want = (&acc + dx.unwrap()).unwrap();
            assert_eq!(max_abs_diff(&sum, &want), 0.0);
            assert_eq!((g.is_some(), g2.is_some()), (trainable, trainable));
            if let (Some(g), Some(g2)) = (g, g2) {
                assert_eq!(max_abs_diff(&g.a, &g2.a), 0.0);
                assert_eq!(max_abs_diff(&g.b, &g2.b), 0.0);
            }
        }
    }

    #[test]
    fn low_copies_follow_the_master_weights() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let cfg = LoraConfig::default();
        let mut ad = LoraAdapter::init(6, 4, &cfg, &mut rng, DType::F32, &Device::Cpu).unwrap();
        ad.b = randn(&[4, 8], 85).to_dtype(DType::F32).unwrap();
        let cast = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let (a1, b1) = ad.weights_in(DType::BF16).unwrap();
        assert_eq!(max_abs_diff(&b1, &cast(&ad.b)), 0.0);
        assert_eq!(max_abs_diff(&a1, &cast(&ad.a)), 0.0);
        let (_, again) = ad.weights_in(DType::BF16).unwrap();
        assert_eq!(again.id(), b1.id(), "unchanged weights reuse their copy");
        ad.b = (&ad.b * 2.0).unwrap(); // the optimizer's way: a new tensor
        let (_, b2) = ad.weights_in(DType::BF16).unwrap();
        assert_ne!(b2.id(), b1.id());
        assert_eq!(max_abs_diff(&b2, &cast(&ad.b)), 0.0);
        let (_, f32_b) = ad.weights_in(DType::F32).unwrap();
        assert_eq!(
            f32_b.id(),
            ad.b.id(),
            "the master weights themselves in their own dtype"
        );
        let (_, cloned) = ad.clone().weights_in(DType::BF16).unwrap();
        assert_ne!(cloned.id(), b2.id(), "a clone makes its own copy");
    }

    #[test]
    fn an_installed_copy_serves_its_master_only() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let cfg = LoraConfig::default();
        let mut ad = LoraAdapter::init(6, 4, &cfg, &mut rng, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            ad.low.dtype(LoraMatrix::A),
            None,
            "no copy before one is needed"
        );
        ad.weights_in(DType::BF16).unwrap();
        assert_eq!(ad.low.dtype(LoraMatrix::A), Some(DType::BF16));
        // What the fused optimizer does: a new master and its copy, installed together.
        let new_a = (&ad.a * 3.0).unwrap();
        let copy = new_a.to_dtype(DType::BF16).unwrap();
        ad.low.install(LoraMatrix::A, &new_a, copy.clone());
        ad.a = new_a;
        let (a, _) = ad.weights_in(DType::BF16).unwrap();
        assert_eq!(
            a.id(),
            copy.id(),
            "the installed copy is used, not a new cast"
        );
        // A copy installed for another tensor is not used for this one.
        ad.low.install(
            LoraMatrix::B,
            &copy,
            (&ad.b + 1.0).unwrap().to_dtype(DType::BF16).unwrap(),
        );
        let (_, b) = ad.weights_in(DType::BF16).unwrap();
        assert_eq!(max_abs_diff(&b, &ad.b.to_dtype(DType::BF16).unwrap()), 0.0);
    }

    #[test]
    fn init_matches_peft() {
        let cfg = LoraConfig {
            r: 4,
            alpha: 16.0,
            ..Default::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let ad = LoraAdapter::init(64, 32, &cfg, &mut rng, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(ad.a.dims(), &[4, 64]);
        assert_eq!(ad.b.dims(), &[32, 4]);
        assert_eq!(ad.scaling, 4.0);
        let b: Vec<f32> = ad.b.flatten_all().unwrap().to_vec1().unwrap();
        assert!(b.iter().all(|&v| v == 0.0));
        let a: Vec<f32> = ad.a.flatten_all().unwrap().to_vec1().unwrap();
        let bound = 1.0 / 8.0;
        assert!(a.iter().all(|v| v.abs() <= bound));
        assert!(a.iter().any(|v| v.abs() > 0.9 * bound));
    }
}
