//! Adapter bookkeeping written once for every architecture: a layer body ([`Block`]) names its
//! linears by site, a model ([`AdaptedStack`]) is a stack of such layers under a PEFT path, and
//! [`Adapted`] follows from that. A layer's saved linear states are kept by site
//! ([`SiteStates`]), so backward reads what forward saved whatever the order of calls.

use super::lora::{CkaRows, LoraAdapter, LoraConfig, LoraGrads, LoraLinear, LoraLinearSaved, Save};
use super::{Adapted, AdapterId, HeadParam};
use crate::nn::Pass;
use crate::safe::MonitorPoint;
use candle_core::{Result, Tensor};
use rand::Rng;
use std::fmt::Debug;

/// A transformer layer whose linears may carry adapters.
pub trait Block: Clone {
    /// A linear's place in the layer.
    type Site: Copy + Ord + Eq + Debug + 'static;
    /// Every site, in the order of [`Block::linears`] (and of the adapter listing).
    const SITES: &'static [Self::Site];

    /// PEFT's module path of a site within the layer, e.g. `self_attn.q_proj`. A method, since
    /// one layer body can serve architectures that name its linears differently (BERT's
    /// `attention.self.query` is MPNet's `attention.attn.q`).
    fn site_path(&self, site: Self::Site) -> &'static str;

    fn linears(&self) -> &[LoraLinear];

    fn linears_mut(&mut self) -> &mut [LoraLinear];

    fn linear(&self, site: Self::Site) -> &LoraLinear {
        &self.linears()[site_index::<Self>(site)]
    }

    fn linear_mut(&mut self, site: Self::Site) -> &mut LoraLinear {
        &mut self.linears_mut()[site_index::<Self>(site)]
    }

    /// Whether any of its adapters still trains.
    fn trains(&self) -> bool {
        self.linears().iter().any(|l| l.trains())
    }

    /// `site`'s output on `x` from a training pass that keeps nothing: backward recomputing a
    /// part of the layer's state (`model::stack::PartSaved`) with the dropout draws it replays.
    fn replay(&self, site: Self::Site, x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        Ok(self
            .linear(site)
            .forward_rows(x, pass, Save::Nothing, false)?
            .0)
    }
}

/// [`Block`] for a layer struct whose `linears` array is in `$site::ALL` order, with
/// `$site::path` giving each site's PEFT path.
macro_rules! impl_block {
    ($layer:ty, $site:ty) => {
        impl $crate::adapters::Block for $layer {
            type Site = $site;
            const SITES: &'static [$site] = &<$site>::ALL;

            fn site_path(&self, site: $site) -> &'static str {
                site.path()
            }

            fn linears(&self) -> &[$crate::adapters::LoraLinear] {
                &self.linears
            }

            fn linears_mut(&mut self) -> &mut [$crate::adapters::LoraLinear] {
                &mut self.linears
            }
        }
    };
}
pub(crate) use impl_block;

fn site_index<L: Block>(site: L::Site) -> usize {
    L::SITES
        .iter()
        .position(|&s| s == site)
        .expect("a site of this block")
}

/// PEFT's spelling for every linear of the layers (PEFT leaves out the output layer; the
/// layer stacks here hold no other).
pub const ALL_LINEAR: &str = "all-linear";

/// PEFT's `target_modules` rule: a module matches when its path is the target or ends with
/// `.target` (so GPT-2's `c_proj` names both projections, `attn.c_proj` only one); `all-linear`
/// matches every linear of a layer.
pub fn target_matches(path: &str, target: &str) -> bool {
    target == ALL_LINEAR
        || path == target
        || path
            .strip_suffix(target)
            .is_some_and(|head| head.ends_with('.'))
}

/// The last path component of each site of `layer`, deduplicated: the names a target can give.
pub fn linear_names<L: Block>(layer: &L) -> Vec<&'static str> {
    let mut v: Vec<&'static str> = Vec::new();
    for &s in L::SITES {
        let p = layer.site_path(s);
        let name = p.rsplit('.').next().unwrap_or(p);
        if !v.contains(&name) {
            v.push(name);
        }
    }
    v
}

/// Puts a fresh LoRA adapter on every linear `cfg.target_modules` names, in `only` (all layers
/// when None), layer by layer and site by site (the order of the RNG's draws). Adapters train in
/// the base's compute dtype: f32 beside a half-precision base. Returns how many.
pub fn add_lora<L: Block>(
    layers: &mut [L],
    cfg: &LoraConfig,
    only: Option<&[usize]>,
    rng: &mut impl Rng,
) -> Result<usize> {
    let mut n = 0;
    for (i, layer) in layers.iter_mut().enumerate() {
        if only.is_some_and(|ls| !ls.contains(&i)) {
            continue;
        }
        for &s in L::SITES {
            let path = layer.site_path(s);
            if cfg.target_modules.iter().any(|t| target_matches(path, t)) {
                let lin = layer.linear_mut(s);
                let (o, inp) = (lin.base.out_features(), lin.base.in_features());
                let w = &lin.base.weight;
                let dtype = crate::device::compute_dtype(w.dtype());
                lin.lora = Some(LoraAdapter::init(inp, o, cfg, rng, dtype, &w.device())?);
                n += 1;
            }
        }
    }
    Ok(n)
}

/// A model whose adapters sit on a stack of [`Block`]s; [`Adapted`] follows from it.
pub trait AdaptedStack {
    type Layer: Block;
    /// PEFT's path of the layer list: layer `i`'s modules are `{layers_path}.{i}.{site path}`.
    fn layers_path(&self) -> &'static str;
    /// PEFT's `task_type`: `SEQ_CLS`, `CAUSAL_LM` (None: an image classifier's).
    const TASK_TYPE: Option<&'static str>;
    /// PEFT's `fan_in_fan_out` (GPT-2's Conv1D linears).
    const FAN_IN_FAN_OUT: bool = false;

    fn layers(&self) -> &[Self::Layer];

    fn layers_mut(&mut self) -> &mut [Self::Layer];

    /// Trained tensors beside the adapters (a classifier).
    fn head_tensors(&self) -> Vec<(HeadParam, Tensor)> {
        Vec::new()
    }

    fn head_tensor_mut(&mut self, _key: HeadParam) -> Option<&mut Tensor> {
        None
    }

    /// The module path of a trained head tensor's layer (see [`Adapted::head_path`]).
    fn head_tensor_path(&self, _key: HeadParam) -> Option<&'static str> {
        None
    }

    /// The layers' path and their sites' paths (in `SITES` order) in a second naming of the same
    /// modules, where one exists: transformers 5 renames ViT's modules as it loads the checkpoint
    /// (`vit.layers.N.attention.q_proj` for `vit.encoder.layer.N.attention.attention.query`).
    fn renamed_paths(&self) -> Option<(&'static str, &'static [&'static str])> {
        None
    }

    /// The id of the adapter at `site` of layer `layer`.
    fn adapter_id(layer: usize, site: Site<Self>) -> AdapterId {
        AdapterId {
            layer,
            site: site_index::<Self::Layer>(site),
        }
    }

    /// The layer and site an id names; None when its site is not one of the layer's.
    fn id_site(id: AdapterId) -> Option<(usize, Site<Self>)> {
        Some((id.layer, *Self::Layer::SITES.get(id.site)?))
    }

    /// PEFT's module path of a site within any layer (every layer of a model names its linears
    /// alike; a model has at least one layer, as its config is checked to).
    fn site_path(&self, site: Site<Self>) -> &'static str {
        self.layers()
            .first()
            .expect("a model has layers")
            .site_path(site)
    }

    /// PEFT's module path of an adapter, e.g. `model.layers.0.self_attn.q_proj`.
    fn adapter_path(&self, layer: usize, site: Site<Self>) -> String {
        format!("{}.{layer}.{}", self.layers_path(), self.site_path(site))
    }

    /// Adapters in order (layer, then site): the index SAFE uses.
    fn adapter_sites(&self) -> Vec<(usize, Site<Self>)> {
        let mut v = Vec::new();
        for (i, l) in self.layers().iter().enumerate() {
            for &s in Self::Layer::SITES {
                if l.linear(s).lora.is_some() {
                    v.push((i, s));
                }
            }
        }
        v
    }

    fn adapter(&self, layer: usize, site: Site<Self>) -> Option<&LoraAdapter> {
        self.layers().get(layer)?.linear(site).lora.as_ref()
    }

    fn adapter_mut(&mut self, layer: usize, site: Site<Self>) -> Option<&mut LoraAdapter> {
        self.layers_mut()
            .get_mut(layer)?
            .linear_mut(site)
            .lora
            .as_mut()
    }
}

/// The site type of a stack's layers.
pub type Site<M> = <<M as AdaptedStack>::Layer as Block>::Site;

impl<M: AdaptedStack> Adapted for M {
    fn adapters(&self) -> Vec<(String, &LoraAdapter)> {
        self.adapter_sites()
            .into_iter()
            .map(|(l, s)| (self.adapter_path(l, s), self.adapter(l, s).expect("listed")))
            .collect()
    }

    fn adapter_ids(&self) -> Vec<AdapterId> {
        self.adapter_sites()
            .into_iter()
            .map(|(l, s)| M::adapter_id(l, s))
            .collect()
    }

    fn adapter_by_id_mut(&mut self, id: AdapterId) -> Option<&mut LoraAdapter> {
        let (layer, site) = M::id_site(id)?;
        self.adapter_mut(layer, site)
    }

    fn module_path(&self, id: AdapterId) -> Option<String> {
        let (layer, site) = M::id_site(id)?;
        Some(self.adapter_path(layer, site))
    }

    /// In the model's own naming, or in its [`AdaptedStack::renamed_paths`].
    fn module_id(&self, path: &str) -> Option<AdapterId> {
        let own = self.layers_path();
        let renamed = self.renamed_paths();
        let names = |i: usize, s: Site<M>| match renamed {
            Some((_, sites)) if i == 1 => sites.get(site_index::<M::Layer>(s)).copied(),
            _ => Some(self.site_path(s)),
        };
        let layers = [Some(own), renamed.map(|(l, _)| l)];
        for (i, layers) in layers.into_iter().enumerate() {
            let Some(rest) = layers.and_then(|l| path.strip_prefix(l)?.strip_prefix('.')) else {
                continue;
            };
            let Some((layer, site)) = rest.split_once('.') else {
                continue;
            };
            let found = M::Layer::SITES
                .iter()
                .copied()
                .find(|&s| names(i, s) == Some(site));
            if let (Some(s), Ok(layer)) = (found, layer.parse()) {
                return Some(M::adapter_id(layer, s));
            }
        }
        None
    }

    fn renamed_module_path(&self, id: AdapterId) -> Option<String> {
        let (layers, sites) = self.renamed_paths()?;
        Some(format!("{layers}.{}.{}", id.layer, sites.get(id.site)?))
    }

    fn num_layers(&self) -> usize {
        self.layers().len()
    }

    fn lowest_trainable_layer(&self) -> Option<usize> {
        self.layers().iter().position(|l| l.trains())
    }

    fn peft_task_type(&self) -> Option<&'static str> {
        M::TASK_TYPE
    }

    fn peft_fan_in_fan_out(&self) -> bool {
        M::FAN_IN_FAN_OUT
    }

    fn head_params(&self) -> Vec<(HeadParam, Tensor)> {
        self.head_tensors()
    }

    fn head_param_mut(&mut self, key: HeadParam) -> Option<&mut Tensor> {
        self.head_tensor_mut(key)
    }

    fn head_path(&self, key: HeadParam) -> Option<&'static str> {
        self.head_tensor_path(key)
    }
}

/// Per-site state of one layer pass, each site at most once.
pub struct SiteStates<S, T> {
    items: Vec<(S, T)>,
}

impl<S, T: crate::nn::offload::SavedTensors> crate::nn::offload::SavedTensors for SiteStates<S, T> {
    fn each_tensor(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        for (_, t) in &mut self.items {
            t.each_tensor(f);
        }
    }
}

impl<S: Copy + Eq + Debug, T> SiteStates<S, T> {
    pub fn new() -> Self {
        Self { items: Vec::new() }
    }

    /// Keeps `state` for `site`; a second state for the same site is an error.
    pub fn put(&mut self, site: S, state: T) -> Result<()> {
        if self.items.iter().any(|(s, _)| *s == site) {
            candle_core::bail!("{site:?} saved twice in one layer pass");
        }
        self.items.push((site, state));
        Ok(())
    }

    /// The state kept for `site`, removed; an error when there is none.
    pub fn take(&mut self, site: S) -> Result<T> {
        match self.items.iter().position(|(s, _)| *s == site) {
            Some(i) => Ok(self.items.swap_remove(i).1),
            None => candle_core::bail!("no saved state for {site:?} (not run, or read twice)"),
        }
    }
}

impl<S: Copy + Eq + Debug, T> Default for SiteStates<S, T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Monitoring rows of a layer: each adapter's `(site, rows for CKA)`.
pub type Monitored<S> = Vec<(S, CkaRows)>;

/// A layer forward's linears: runs each by site, keeping its saved state by site and, when
/// monitoring, its `(X, Y)`.
pub struct SiteForward<'a, L: Block> {
    layer: &'a L,
    save: bool,
    monitor: Option<&'a mut Monitored<L::Site>>,
    pub states: SiteStates<L::Site, LoraLinearSaved>,
}

impl<'a, L: Block> SiteForward<'a, L> {
    pub fn new(layer: &'a L, save: bool, monitor: Option<&'a mut Monitored<L::Site>>) -> Self {
        Self {
            layer,
            save,
            monitor,
            states: SiteStates::new(),
        }
    }

    pub fn run(&mut self, site: L::Site, x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        self.run_saving(site, x, pass, Save::Input)
    }

    /// Skips `site` when it has no adapter (true): its frozen linear keeps nothing, so a forward
    /// that needs only the layer's state (see `model::stack::backward`) need not run it.
    pub fn skip_unadapted(&mut self, site: L::Site) -> Result<bool> {
        if self.layer.linear(site).lora.is_some() {
            return Ok(false);
        }
        self.states.put(site, LoraLinearSaved::NONE)?;
        Ok(true)
    }

    /// [`SiteForward::run`] keeping no input for the adapter: the layer's backward recomputes it
    /// ([`SiteBackward::back_dx_recomputed`]).
    pub fn run_recomputed(&mut self, site: L::Site, x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        self.run_saving(site, x, pass, Save::Recomputed)
    }

    fn run_saving(
        &mut self,
        site: L::Site,
        x: &Tensor,
        pass: &mut Pass,
        save: Save,
    ) -> Result<Tensor> {
        // Monitoring runs on `monitor_layer`'s inference pass and saves nothing.
        let save = if self.save && self.monitor.is_none() {
            save
        } else {
            Save::Nothing
        };
        let index = site_index::<L>(site);
        let want_rows = self.monitor.is_some() || pass.taking_rows(index).is_some();
        let (y, saved, rows) = self
            .layer
            .linear(site)
            .forward_rows(x, pass, save, want_rows)?;
        self.states.put(site, saved)?;
        match (self.monitor.as_deref_mut(), rows) {
            (Some(m), Some(rows)) => m.push((site, rows)),
            // A training pass may hand its rows to SAFE's in-step importance.
            (None, Some(CkaRows::LowRank { y: base, u, b })) => {
                if let Some(sink) = pass.taking_rows(index) {
                    sink.take(index, &base, &u, &b)?;
                }
            }
            _ => {}
        }
        Ok(y)
    }
}

/// A layer backward's linears: each by site from the states its forward kept, collecting the
/// adapters' gradients.
pub struct SiteBackward<'a, L: Block> {
    layer: &'a L,
    states: SiteStates<L::Site, LoraLinearSaved>,
    grads: Vec<(L::Site, LoraGrads)>,
}

impl<'a, L: Block> SiteBackward<'a, L> {
    pub fn new(layer: &'a L, states: SiteStates<L::Site, LoraLinearSaved>) -> Self {
        Self {
            layer,
            states,
            grads: Vec::new(),
        }
    }

    /// `dx` of the site's linear when `need_dx`; its adapter's gradients are kept.
    pub fn back(&mut self, site: L::Site, dy: &Tensor, need_dx: bool) -> Result<Option<Tensor>> {
        let st = self.states.take(site)?;
        let (dx, g) = self.layer.linear(site).backward(st, dy, need_dx)?;
        if let Some(g) = g {
            self.grads.push((site, g));
        }
        Ok(dx)
    }

    /// `back` with the site's `dx` added onto `acc` (the input gradient so far of linears that
    /// share this one's input), in place on CUDA ([`LoraLinear::backward_adding`]); with no
    /// `acc`, the site's own `dx`; without `need_dx`, nothing (as `back`).
    pub fn back_onto(
        &mut self,
        site: L::Site,
        dy: &Tensor,
        acc: Option<Tensor>,
        need_dx: bool,
    ) -> Result<Option<Tensor>> {
        let Some(acc) = acc.filter(|_| need_dx) else {
            return self.back(site, dy, need_dx);
        };
        let st = self.states.take(site)?;
        let (dx, g) = self.layer.linear(site).backward_adding(st, dy, acc)?;
        if let Some(g) = g {
            self.grads.push((site, g));
        }
        Ok(Some(dx))
    }

    /// `back` where `dx` is always needed.
    pub fn back_dx(&mut self, site: L::Site, dy: &Tensor) -> Result<Tensor> {
        Ok(self.back(site, dy, true)?.expect("dx requested"))
    }

    /// `back_dx` of a site run by [`SiteForward::run_recomputed`]: `input` gives its input back,
    /// called only when its adapter trains.
    pub fn back_dx_recomputed(
        &mut self,
        site: L::Site,
        dy: &Tensor,
        input: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let st = self.states.take(site)?;
        let x = if st.needs_input() {
            Some(input()?)
        } else {
            None
        };
        let (dx, g) = self
            .layer
            .linear(site)
            .backward_with_input(st, dy, true, x)?;
        if let Some(g) = g {
            self.grads.push((site, g));
        }
        Ok(dx.expect("dx requested"))
    }

    /// The gradients by site, in site order.
    pub fn grads(mut self) -> Vec<(L::Site, LoraGrads)> {
        self.grads.sort_by_key(|(s, _)| *s);
        self.grads
    }
}

/// SAFE's monitoring of one layer (inference): its output and each adapter's `(site, X, Y)` at
/// `point`. `run(layer, pass, monitor)` is the layer's forward on the input it closes over,
/// pushing each adapted linear's `(site, X, Y)` into `monitor` when given. At the linear, `X` and
/// `Y` are the adapted and the base linear's output; at the block, the layer's output with and
/// without that one adapter.
pub fn monitor_layer<L: Block>(
    layer: &L,
    point: MonitorPoint,
    mut run: impl FnMut(&L, &mut Pass, Option<&mut Monitored<L::Site>>) -> Result<Tensor>,
) -> Result<(Tensor, Monitored<L::Site>)> {
    Pass::inference(|pass| match point {
        MonitorPoint::Linear => {
            let mut rows = Vec::new();
            let out = run(layer, pass, Some(&mut rows))?;
            Ok((out, rows))
        }
        MonitorPoint::Block => {
            let out = run(layer, pass, None)?;
            let rows = outputs_without_each_adapter(layer, |l| run(l, pass, None))?
                .into_iter()
                .map(|(s, y)| (s, CkaRows::Full { x: out.clone(), y }))
                .collect();
            Ok((out, rows))
        }
    })
}

/// SAFE's block-level `Y`s: the layer's output (by `run`, on the input it closes over) with each
/// of its adapters taken out in turn, as `(site, output)`. One copy of the layer serves every
/// adapter: each is removed, the copy run, and the adapter put back.
fn outputs_without_each_adapter<L: Block>(
    layer: &L,
    mut run: impl FnMut(&L) -> Result<Tensor>,
) -> Result<Vec<(L::Site, Tensor)>> {
    let mut copy = layer.clone();
    let mut out = Vec::new();
    for &s in L::SITES {
        let Some(adapter) = copy.linear_mut(s).lora.take() else {
            continue;
        };
        out.push((s, run(&copy)?));
        copy.linear_mut(s).lora = Some(adapter);
    }
    Ok(out)
}

/// Gradient tests: every adapter's A and B as candle `Var`s (put back into the model), so the
/// tape can be the oracle.
#[cfg(test)]
pub(crate) fn tape_adapters<M: AdaptedStack>(
    m: &mut M,
) -> Vec<(usize, Site<M>, candle_core::Var, candle_core::Var)> {
    let mut vars = Vec::new();
    for (l, s) in m.adapter_sites() {
        let ad = m.adapter_mut(l, s).expect("listed");
        let a = candle_core::Var::from_tensor(&ad.a).unwrap();
        let b = candle_core::Var::from_tensor(&ad.b).unwrap();
        ad.a = a.as_tensor().clone();
        ad.b = b.as_tensor().clone();
        vars.push((l, s, a, b));
    }
    vars
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PEFT's suffix rule: whole path components only.
    #[test]
    fn targets_match_whole_path_suffixes() {
        assert!(target_matches("attn.c_proj", "c_proj"));
        assert!(target_matches("attn.c_proj", "attn.c_proj"));
        assert!(!target_matches("attn.c_proj", "proj"));
        assert!(!target_matches("attn.c_proj", "mlp.c_proj"));
    }

    /// A second state for one site, or a missing one, is an error naming the site.
    #[test]
    fn site_states_refuse_repeats_and_absences() {
        let mut s = SiteStates::new();
        s.put('q', 1).unwrap();
        assert!(s.put('q', 2).unwrap_err().to_string().contains("'q'"));
        assert_eq!(s.take('q').unwrap(), 1);
        assert!(s.take('q').unwrap_err().to_string().contains("'q'"));
    }
}
