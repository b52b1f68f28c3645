//! AdamW on plain tensors, state keyed by parameter (any ordered key: `adapters::ParamId` in
//! training), and the learning-rate schedules with warm-up (transformers' `linear`, `cosine` and
//! `constant_with_warmup`).

use candle_core::{DType, Result, Tensor};
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay; 0 by default, as in the SAFE paper.
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// The hyper-parameters of a step at learning rate `lr`.
    fn at(&self, lr: f64) -> crate::nn::gpu::AdamWStep {
        crate::nn::gpu::AdamWStep {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    /// The bias corrections of a parameter's `step`-th update (1-based).
    fn bias_corrections(&self, step: u64) -> (f64, f64) {
        (
            1.0 - self.beta1.powi(step as i32),
            1.0 - self.beta2.powi(step as i32),
        )
    }
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// First and second moments of one parameter, and its own step count (as PyTorch keeps it).
pub struct Moments {
    pub m: Tensor,
    pub v: Tensor,
    pub step: u64,
}

impl Moments {
    /// A parameter's state before its first update.
    fn zeros_like(param: &Tensor) -> Result<Self> {
        Ok(Self {
            m: param.zeros_like()?,
            v: param.zeros_like()?,
            step: 0,
        })
    }
}

/// One parameter of [`AdamW::update_many`].
pub struct ParamUpdate<K> {
    pub key: K,
    pub param: Tensor,
    pub grad: Tensor,
    /// The dtype of a copy to write beside the new value, if the model keeps one.
    pub low: Option<DType>,
}

/// A parameter's new value and, where one was asked for and made, its copy in the lower dtype.
pub struct Updated {
    pub param: Tensor,
    pub low: Option<Tensor>,
}

pub struct AdamW<K> {
    pub config: AdamWConfig,
    pub state: BTreeMap<K, Moments>,
}

impl<K: Ord + Clone> AdamW<K> {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            state: BTreeMap::new(),
        }
    }

    /// Returns the updated parameter. State is created on first use. On CUDA the batched
    /// update's kernel with this one parameter.
    pub fn update(&mut self, key: K, param: &Tensor, grad: &Tensor, lr: f64) -> Result<Tensor> {
        self.update_impl(key, param, grad, lr, true)
    }

    /// The candle composition: the fallback, and the reference for the fused kernel.
    pub fn update_reference(
        &mut self,
        key: K,
        param: &Tensor,
        grad: &Tensor,
        lr: f64,
    ) -> Result<Tensor> {
        self.update_impl(key, param, grad, lr, false)
    }

    fn update_impl(
        &mut self,
        key: K,
        param: &Tensor,
        grad: &Tensor,
        lr: f64,
        fused: bool,
    ) -> Result<Tensor> {
        let c = &self.config;
        let st = match self.state.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Moments::zeros_like(param)?),
        };
        st.step += 1;
        let (bc1, bc2) = c.bias_corrections(st.step);
        if fused {
            let it = crate::nn::gpu::AdamWItem {
                p: param,
                g: grad,
                m: &st.m,
                v: &st.v,
                bc1,
                bc2,
                low: None,
            };
            if let Some(mut out) = crate::nn::gpu::adamw_many(&[it], &c.at(lr), 1.0)? {
                let o = out.pop().expect("one parameter's update");
                (st.m, st.v) = (o.m, o.v);
                return Ok(o.p);
            }
        }
        st.m = ((&st.m * c.beta1)? + (grad * (1.0 - c.beta1))?)?;
        st.v = ((&st.v * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
        let denom = ((&st.v / bc2)?.sqrt()? + c.eps)?;
        let update = ((&st.m / bc1)? / denom)?;
        let decayed = (param * (1.0 - lr * c.weight_decay))?;
        decayed - (update * lr)?
    }

    /// Updates every parameter of `items`, each gradient multiplied by `grad_scale` first (the
    /// clipping factor), and returns the new values in order. An item's `low` asks for a copy of
    /// its new value in that dtype (an adapter's bf16 copy beside a bf16 base). On CUDA one kernel
    /// updates every f32 parameter and writes the copies; elsewhere each parameter goes through
    /// [`AdamW::update`] and its copy is a cast of the new value (the same bits).
    pub fn update_many(
        &mut self,
        items: Vec<ParamUpdate<K>>,
        lr: f64,
        grad_scale: f64,
    ) -> Result<Vec<Updated>> {
        for it in &items {
            if !self.state.contains_key(&it.key) {
                self.state
                    .insert(it.key.clone(), Moments::zeros_like(&it.param)?);
            }
        }
        let c = &self.config;
        let fused_items = items
            .iter()
            .map(|it| {
                let st = &self.state[&it.key];
                let (bc1, bc2) = c.bias_corrections(st.step + 1);
                crate::nn::gpu::AdamWItem {
                    p: &it.param,
                    g: &it.grad,
                    m: &st.m,
                    v: &st.v,
                    bc1,
                    bc2,
                    low: it.low,
                }
            })
            .collect::<Vec<_>>();
        if let Some(out) = crate::nn::gpu::adamw_many(&fused_items, &c.at(lr), grad_scale)? {
            drop(fused_items);
            let mut updated = Vec::with_capacity(out.len());
            for (it, o) in items.iter().zip(out) {
                let st = self.state.get_mut(&it.key).expect("made above");
                (st.m, st.v) = (o.m, o.v);
                st.step += 1;
                updated.push(Updated {
                    param: o.p,
                    low: o.low,
                });
            }
            return Ok(updated);
        }
        drop(fused_items);
        items
            .into_iter()
            .map(|it| {
                let g = if grad_scale == 1.0 {
                    it.grad
                } else {
                    (it.grad * grad_scale)?
                };
                let param = self.update(it.key, &it.param, &g, lr)?;
                let low = it.low.map(|d| param.to_dtype(d)).transpose()?;
                Ok(Updated { param, low })
            })
            .collect()
    }

    /// Frees a frozen parameter's moments: it will never be updated again.
    pub fn drop_state(&mut self, key: &K) {
        self.state.remove(key);
    }
}

/// How the learning rate moves after its linear warm-up (`--lr-scheduler`, transformers'
/// `lr_scheduler_type`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum LrScheduler {
    /// Linear decay to 0 at the run's last step.
    #[default]
    Linear,
    /// Half a cosine down to 0 at the run's last step.
    Cosine,
    /// The peak, flat.
    Constant,
}

impl LrScheduler {
    /// The learning rate of step `step` (0-based): linear warm-up from `peak / warmup` to `peak`
    /// over `warmup` steps, then this schedule's shape, reaching 0 at `total` (linear, cosine).
    pub fn lr(self, step: usize, warmup: usize, total: usize, peak: f64) -> f64 {
        if step < warmup {
            return peak * (step + 1) as f64 / warmup as f64;
        }
        if total <= warmup || self == LrScheduler::Constant {
            return peak;
        }
        // The share of the decay done, 0 at the end of warm-up, 1 at `total`.
        let done = (step - warmup).min(total - warmup) as f64 / (total - warmup) as f64;
        match self {
            LrScheduler::Linear => peak * (1.0 - done),
            LrScheduler::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * done).cos()),
            LrScheduler::Constant => peak,
        }
    }
}

/// The gradients' global L2 norm and the factor that brings it down to `max_norm` (1 when it is
/// not above, or `max_norm` is 0): [`AdamW::update_many`] multiplies each gradient by it. The
/// gradients' sums of squares are added in the slice's order, so the order decides the last
/// bits. They stay on their device until all are gathered in one copy: on a GPU one
/// synchronization a step, and one kernel for all the sums (in f64; elsewhere each gradient's
/// sum is its own dtype's).
pub fn clip_factor<K>(grads: &[(K, Tensor)], max_norm: f64) -> Result<(f64, f64)> {
    let ts: Vec<&Tensor> = grads.iter().map(|(_, g)| g).collect();
    let sums = match crate::nn::gpu::sum_squares_many(&ts)? {
        Some(sums) => sums.to_vec1::<f64>()?,
        None if ts.is_empty() => Vec::new(),
        None => {
            let each = ts
                .iter()
                .map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F64))
                .collect::<Result<Vec<_>>>()?;
            Tensor::stack(&each, 0)?.to_vec1::<f64>()?
        }
    };
    let sq = sums.into_iter().fold(0f64, |acc, x| acc + x);
    let norm = sq.sqrt();
    let factor = if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    };
    Ok((norm, factor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_the_closed_form_first_steps() {
        // With a constant gradient g, m_hat = g and v_hat = g^2 at every step, so each step moves
        // by lr * g / (|g| + eps) = lr * sign(g) (up to eps).
        let mut opt = AdamW::new(AdamWConfig::default());
        let mut p = Tensor::new(&[1.0f64, -2.0, 0.5], &Device::Cpu).unwrap();
        let g = Tensor::new(&[0.3f64, -4.0, 1e-3], &Device::Cpu).unwrap();
        for _ in 0..3 {
            p = opt.update("p", &p, &g, 0.1).unwrap();
        }
        let v: Vec<f64> = p.to_vec1().unwrap();
        let expect = [1.0 - 0.3, -2.0 + 0.3, 0.5 - 0.3 * 1e-3 / (1e-3 + 1e-8)];
        for (a, b) in v.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        opt.drop_state(&"p");
        assert!(opt.state.is_empty());
    }

    #[test]
    fn weight_decay_is_decoupled() {
        let mut opt = AdamW::new(AdamWConfig {
            weight_decay: 0.5,
            ..Default::default()
        });
        let p = Tensor::new(&[2.0f64], &Device::Cpu).unwrap();
        let g = Tensor::new(&[0.0f64], &Device::Cpu).unwrap();
        let p = opt.update("p", &p, &g, 0.1).unwrap();
        // Zero gradient: only the decay acts, p * (1 - lr * wd).
        assert!((p.to_vec1::<f64>().unwrap()[0] - 2.0 * 0.95).abs() < 1e-12);
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let linear = |s| LrScheduler::Linear.lr(s, 4, 10, 1.0);
        assert_eq!(linear(0), 0.25);
        assert_eq!(linear(3), 1.0);
        assert_eq!(linear(4), 1.0);
        assert_eq!(linear(7), 0.5);
        assert_eq!(linear(10), 0.0);
    }

    /// Every schedule warms up the same way; cosine is halfway down at the middle of the decay
    /// (cos(pi/2) = 0), above the linear value before it and below after it, and 0 at the end;
    /// constant stays at the peak.
    #[test]
    fn cosine_and_constant_schedules() {
        use LrScheduler::*;
        for s in [Linear, Cosine, Constant] {
            assert_eq!(s.lr(1, 4, 12, 2.0), 1.0, "{s:?}");
        }
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        // Decay over steps 4..12: the middle is step 8.
        close(Cosine.lr(4, 4, 12, 2.0), 2.0);
        close(Cosine.lr(8, 4, 12, 2.0), 1.0);
        // A quarter in: 0.5 * (1 + cos(pi/4)) = 0.8536 of the peak, linear 0.75.
        close(
            Cosine.lr(6, 4, 12, 2.0),
            1.0 + std::f64::consts::FRAC_1_SQRT_2,
        );
        assert!(Cosine.lr(6, 4, 12, 2.0) > Linear.lr(6, 4, 12, 2.0));
        assert!(Cosine.lr(10, 4, 12, 2.0) < Linear.lr(10, 4, 12, 2.0));
        close(Cosine.lr(12, 4, 12, 2.0), 0.0);
        for step in [4, 8, 11, 12] {
            assert_eq!(Constant.lr(step, 4, 12, 2.0), 2.0);
        }
    }

    #[test]
    fn update_many_is_each_update_of_the_scaled_gradient() {
        // Off CUDA `update_many` goes parameter by parameter: the same bits as `update` on the
        // gradient times the factor, each parameter with its own step count, copies as casts.
        let (mut many, mut one) = (
            AdamW::new(AdamWConfig::default()),
            AdamW::new(AdamWConfig::default()),
        );
        let dev = Device::Cpu;
        let mut ps = [
            Tensor::new(&[1.0f32, -2.0, 0.5], &dev).unwrap(),
            Tensor::new(&[[0.25f32, 3.0]], &dev).unwrap(),
        ];
        let mut refs = ps.clone();
        for step in 0..3 {
            let gs = [
                Tensor::new(&[0.3f32, -4.0, 1e-3], &dev).unwrap(),
                Tensor::new(&[[2.0f32 + step as f32, -0.5]], &dev).unwrap(),
            ];
            // The second parameter joins at the second step: its own bias corrections.
            let live = if step == 0 { 1 } else { 2 };
            let items = (0..live)
                .map(|i| ParamUpdate {
                    key: i,
                    param: ps[i].clone(),
                    grad: gs[i].clone(),
                    low: Some(DType::BF16),
                })
                .collect();
            let new = many.update_many(items, 0.1, 0.5).unwrap();
            for (i, u) in new.into_iter().enumerate() {
                let g = (&gs[i] * 0.5).unwrap();
                refs[i] = one.update(i, &refs[i], &g, 0.1).unwrap();
                let (a, b) = (
                    u.param.flatten_all().unwrap(),
                    refs[i].flatten_all().unwrap(),
                );
                assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
                let low = u.low.expect("asked for").flatten_all().unwrap();
                let cast = a.to_dtype(DType::BF16).unwrap();
                // bf16 to f32 is exact: equal f32 values are equal bf16 bits.
                let f32s = |t: Tensor| t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(f32s(low), f32s(cast));
                ps[i] = u.param;
            }
        }
        assert_eq!(many.state[&0].step, 3);
        assert_eq!(many.state[&1].step, 2);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let g = vec![
            ("a", Tensor::new(&[3.0f64], &Device::Cpu).unwrap()),
            ("b", Tensor::new(&[4.0f64], &Device::Cpu).unwrap()),
        ];
        let (n, f) = clip_factor(&g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-12);
        assert!((3.0 * f - 0.6).abs() < 1e-6);
        assert_eq!(clip_factor(&g, 6.0).unwrap().1, 1.0, "under the limit");
        assert_eq!(clip_factor(&g, 0.0).unwrap().1, 1.0, "no limit");
    }
}
