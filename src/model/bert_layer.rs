//! One encoder layer (BERT, RoBERTa, MPNet, DistilBERT, ViT): its six adapted linears, attention,
//! LayerNorms and dropouts, forward and backward, post-LN or pre-LN (data flow in `model::bert`).

use super::bert_config::EncoderFamily;
use super::memory::{Acts, LayerMemory};
use super::stack::{self, Keep, PartSaved};
use crate::adapters::lora::{LoraGrads, LoraLinear, LoraLinearSaved};
use crate::adapters::Block;
use crate::adapters::{self, SiteBackward, SiteForward, SiteStates};
use crate::nn::attention::{Attention, AttentionArgs, AttentionSaved, AttnShape};
use crate::nn::dropout::{self, DropoutSaved};
use crate::nn::gelu::{self, GeluKind, GeluSaved};
use crate::nn::norm::{Norm, NormSaved};
use crate::nn::offload::SavedTensors;
use crate::nn::{self, Dropout, Pass};
use candle_core::{Result, Tensor};

/// The six linears of a BERT layer, by the names PEFT's `target_modules` match and their paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Site {
    Query,
    Key,
    Value,
    AttnOut,
    Intermediate,
    Output,
}

impl Site {
    pub const ALL: [Site; 6] = [
        Site::Query,
        Site::Key,
        Site::Value,
        Site::AttnOut,
        Site::Intermediate,
        Site::Output,
    ];

    /// `(out, in)` of its linear in a layer of width `hidden` and MLP width `ffn`.
    pub fn shape(self, hidden: usize, ffn: usize) -> (usize, usize) {
        match self {
            Site::Intermediate => (ffn, hidden),
            Site::Output => (hidden, ffn),
            _ => (hidden, hidden),
        }
    }

    /// Path inside a BERT layer, as in the checkpoint (and in PEFT's adapter keys); another
    /// family's are [`EncoderFamily::site_paths`].
    pub fn path(self) -> &'static str {
        EncoderFamily::Bert.spec().site_paths[self as usize]
    }
}

#[derive(Clone, Debug)]
pub struct BertLayer {
    /// Linears in `Site::ALL` order.
    pub linears: [LoraLinear; 6],
    pub attention: Attention,
    pub ln_attn: Norm,
    pub ln_out: Norm,
    /// After the attention output projection (none in DistilBERT).
    pub dropout_attn: Dropout,
    /// After the MLP output.
    pub dropout: Dropout,
    /// The family's names of the six linears (PEFT's module paths within the layer).
    pub paths: &'static [&'static str; 6],
    /// Pre-LN (ViT): `ln_attn` and `ln_out` normalize each sublayer's input, see the module
    /// doc.
    pub pre_norm: bool,
}

impl crate::adapters::Block for BertLayer {
    type Site = Site;
    const SITES: &'static [Site] = &Site::ALL;

    fn site_path(&self, site: Site) -> &'static str {
        self.paths[site as usize]
    }

    fn linears(&self) -> &[LoraLinear] {
        &self.linears
    }

    fn linears_mut(&mut self) -> &mut [LoraLinear] {
        &mut self.linears
    }
}

/// What a layer on the gradient path keeps for backward.
pub struct BertLayerSaved {
    lin: SiteStates<Site, LoraLinearSaved>,
    attn: PartSaved<AttentionSaved, AttentionReplay>,
    drop_attn: Option<DropoutSaved>,
    ln_attn: NormSaved,
    gelu: PartSaved<GeluSaved>,
    drop_out: Option<DropoutSaved>,
    ln_out: NormSaved,
}

impl SavedTensors for BertLayerSaved {
    fn each_tensor(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        self.lin.each_tensor(f);
        self.attn.each_tensor(f);
        self.ln_attn.each_tensor(f);
        self.gelu.each_tensor(f);
        self.ln_out.each_tensor(f);
    }
}

/// What a layer recomputing its attention keeps for it: the attention's arguments, and the q, k
/// and v projections' input when no norm's saved state gives it (a post-LN layer's input).
type AttentionReplay = (AttentionArgs, Option<Tensor>);

impl BertLayerSaved {
    /// A forward's parts as one saved state: every part is Some when the forward saved.
    fn gather(
        lin: SiteStates<Site, LoraLinearSaved>,
        attn: Option<PartSaved<AttentionSaved, AttentionReplay>>,
        drop_attn: Option<DropoutSaved>,
        ln_attn: Option<NormSaved>,
        gelu: Option<PartSaved<GeluSaved>>,
        drop_out: Option<DropoutSaved>,
        ln_out: Option<NormSaved>,
    ) -> Option<Self> {
        Some(Self {
            lin,
            attn: attn?,
            drop_attn,
            ln_attn: ln_attn?,
            gelu: gelu?,
            drop_out,
            ln_out: ln_out?,
        })
    }
}

/// Gradients of a layer's trainable adapters.
pub type SiteGrads = Vec<(Site, LoraGrads)>;

/// Per-adapter monitoring output: `(adapted output X, base output Y)` of each adapted linear.
pub type Monitored = adapters::Monitored<Site>;

impl BertLayer {
    /// `h` is `[batch*seq, hidden]`. When `monitor` is given, each adapted linear's `(X, Y)` is pushed.
    pub fn forward(
        &self,
        h: &Tensor,
        mask_add: &Tensor,
        shape: AttnShape,
        pass: &mut Pass,
        keep: Keep,
        monitor: Option<&mut Monitored>,
    ) -> Result<(Tensor, Option<BertLayerSaved>)> {
        if self.pre_norm {
            return self.forward_pre_norm(h, mask_add, shape, pass, keep, monitor);
        }
        let save = keep.saves();
        let mut lin = SiteForward::new(self, save, monitor);
        // Each intermediate is dropped as soon as it is used: what stays is what the saved
        // structs hold (the peak of a step is the saved layers plus one layer's temporaries).
        let attn_start = stack::attention_start(keep, pass).map(|rng| {
            (
                rng,
                (AttentionArgs::new(mask_add, shape, None), Some(h.clone())),
            )
        });
        let (ctx, attn) = {
            let q = lin.run(Site::Query, h, pass)?;
            let k = lin.run(Site::Key, h, pass)?;
            let v = lin.run(Site::Value, h, pass)?;
            let save = keep.keeps_attention();
            self.attention
                .forward((&q, &k, &v), mask_add, shape, None, pass, save)?
        };
        let attn = PartSaved::with(attn_start, attn);
        let a = lin.run(Site::AttnOut, &ctx, pass)?;
        drop(ctx);
        let (a, drop_attn) = self.dropout_attn.forward(&a, pass, save)?;
        let (a, ln_attn) = self.ln_attn.forward(&nn::add(&a, h)?, save)?;
        let ffn = stack::ffn_start(keep, pass);
        let (g, gelu) = gelu::forward(&lin.run(Site::Intermediate, &a, pass)?, save)?;
        let gelu = PartSaved::new(ffn, gelu);
        let o = lin.run_recomputed(Site::Output, &g, pass)?;
        drop(g);
        let (o, drop_out) = self.dropout.forward(&o, pass, save)?;
        let (out, ln_out) = self.ln_out.forward(&nn::add(&o, &a)?, save)?;
        // Every part is Some when `save` is set.
        let saved =
            BertLayerSaved::gather(lin.states, attn, drop_attn, ln_attn, gelu, drop_out, ln_out);
        Ok((out, saved))
    }

    /// [`Self::forward`] of a pre-LN layer: the same parts, each LayerNorm on a sublayer's input.
    fn forward_pre_norm(
        &self,
        h: &Tensor,
        mask_add: &Tensor,
        shape: AttnShape,
        pass: &mut Pass,
        keep: Keep,
        monitor: Option<&mut Monitored>,
    ) -> Result<(Tensor, Option<BertLayerSaved>)> {
        let save = keep.saves();
        let mut lin = SiteForward::new(self, save, monitor);
        let (x, ln_attn) = self.ln_attn.forward(h, save)?;
        let attn_start = stack::attention_start(keep, pass)
            .map(|rng| (rng, (AttentionArgs::new(mask_add, shape, None), None)));
        let (ctx, attn) = {
            let q = lin.run(Site::Query, &x, pass)?;
            let k = lin.run(Site::Key, &x, pass)?;
            let v = lin.run(Site::Value, &x, pass)?;
            drop(x);
            let save = keep.keeps_attention();
            self.attention
                .forward((&q, &k, &v), mask_add, shape, None, pass, save)?
        };
        let attn = PartSaved::with(attn_start, attn);
        let a = lin.run(Site::AttnOut, &ctx, pass)?;
        drop(ctx);
        let (a, drop_attn) = self.dropout_attn.forward(&a, pass, save)?;
        let a = nn::add(&a, h)?;
        let (x, ln_out) = self.ln_out.forward(&a, save)?;
        let ffn = stack::ffn_start(keep, pass);
        let (g, gelu) = gelu::forward(&lin.run(Site::Intermediate, &x, pass)?, save)?;
        let gelu = PartSaved::new(ffn, gelu);
        drop(x);
        let o = lin.run_recomputed(Site::Output, &g, pass)?;
        drop(g);
        let (o, drop_out) = self.dropout.forward(&o, pass, save)?;
        let out = nn::add(&o, &a)?;
        let saved =
            BertLayerSaved::gather(lin.states, attn, drop_attn, ln_attn, gelu, drop_out, ln_out);
        Ok((out, saved))
    }

    /// [`Self::backward`] of a pre-LN layer.
    fn backward_pre_norm(
        &self,
        saved: BertLayerSaved,
        dout: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, SiteGrads)> {
        let mut lin = SiteBackward::new(self, saved.lin);
        // out = o + a: dout reaches a directly and through the MLP branch.
        let d_x2 = {
            let gelu = self.gelu_state(saved.gelu, &saved.ln_out, &self.ln_out)?;
            let d_o = dropout::backward_opt(&saved.drop_out, dout.clone())?;
            let d_g = lin.back_dx_recomputed(Site::Output, &d_o, || gelu.output())?;
            drop(d_o);
            let d_i = gelu.backward(&d_g)?;
            drop(d_g);
            lin.back_dx(Site::Intermediate, &d_i)?
        };
        let d_a = saved.ln_out.backward_adding(&self.ln_out, &d_x2, dout)?;
        drop((d_x2, saved.ln_out));
        // a = attn_out + h.
        let d_ctx = {
            let d_ao = dropout::backward_opt(&saved.drop_attn, d_a.clone())?;
            lin.back_dx(Site::AttnOut, &d_ao)?
        };
        let attn = self.attention_state(saved.attn, Some(&saved.ln_attn))?;
        let (dq, dk, dv) = attn.backward(&self.attention, &d_ctx)?;
        drop((d_ctx, attn));
        let dx = qkv_backward(&mut lin, [dq, dk, dv], need_dx, None)?;
        let dh = match (need_dx, dx) {
            (false, _) => None,
            (true, Some(dx)) => Some(saved.ln_attn.backward_adding(&self.ln_attn, &dx, &d_a)?),
            (true, None) => Some(d_a),
        };
        Ok((dh, lin.grads()))
    }

    /// The attention's saved state: kept, or the q, k and v projections and the attention run
    /// again on the input the layer kept for them, or on the output of the pre-LN layer's norm
    /// before them (whose saved state is `normed`).
    fn attention_state(
        &self,
        attn: PartSaved<AttentionSaved, AttentionReplay>,
        normed: Option<&NormSaved>,
    ) -> Result<AttentionSaved> {
        attn.get(|pass, (args, input)| {
            let x = match (input, normed) {
                (Some(x), _) => x,
                (None, Some(n)) => n.output(&self.ln_attn)?,
                (None, None) => candle_core::bail!("a BERT layer kept no attention input"),
            };
            let q = self.replay(Site::Query, &x, pass)?;
            let k = self.replay(Site::Key, &x, pass)?;
            let v = self.replay(Site::Value, &x, pass)?;
            drop(x);
            args.recompute(&self.attention, (&q, &k, &v), pass)
        })
    }

    /// GELU's saved input: kept, or the intermediate linear run again on the output of `norm`
    /// (whose saved state is `normed`), the norm before it.
    fn gelu_state(
        &self,
        gelu: PartSaved<GeluSaved>,
        normed: &NormSaved,
        norm: &Norm,
    ) -> Result<GeluSaved> {
        gelu.get(|pass, ()| {
            let x = normed.output(norm)?;
            Ok(GeluSaved::of(
                self.replay(Site::Intermediate, &x, pass)?,
                GeluKind::Erf,
            ))
        })
    }

    /// What [`BertLayer::forward`] keeps (its [`BertLayerSaved`]) and its temporaries, from
    /// shapes.
    pub fn memory(&self, acts: Acts) -> LayerMemory {
        let lin = |s: Site| Block::linear(self, s);
        let (h, f) = (
            lin(Site::Query).base.in_features(),
            lin(Site::Intermediate).base.out_features(),
        );
        let qkv = [lin(Site::Query), lin(Site::Key), lin(Site::Value)];
        // A post-LN layer recomputing its attention keeps its input, unless an adapter of the
        // q, k and v projections keeps it already.
        let replay_input = match self.pre_norm || qkv.iter().any(|l| l.trains()) {
            true => 0,
            false => acts.of(h),
        };
        let linears = acts.lora_group(&qkv)
            + acts.lora_group(&[lin(Site::Intermediate)])
            + acts.lora_group_recomputed(&[lin(Site::Output)]);
        let head_dim = h / self.attention.num_heads;
        let attention_state = acts.attention_alone(&self.attention, head_dim, lin(Site::AttnOut));
        // Matmul FLOPs a token of each linear.
        let mm = |l: &LoraLinear| acts.matmul(l.base.out_features(), l.base.in_features());
        let qkv_cost = qkv.iter().map(|l| mm(l)).sum();
        let (attn_out, inter) = (mm(lin(Site::AttnOut)), mm(lin(Site::Intermediate)));
        let output = mm(lin(Site::Output));
        let state = linears
            + acts.attention_then(&self.attention, head_dim, lin(Site::AttnOut))
            + 2 * acts.norm(h)
            + acts.of(f);
        LayerMemory {
            state,
            transient: acts.transient(&self.attention, head_dim, h, f)
                + acts.ffn_out_backward(lin(Site::Output)),
            ffn_input: acts.of(f),
            ffn_cost_pct: acts.share_pct(inter, qkv_cost + attn_out + output, h),
            attention_state: attention_state.saturating_sub(replay_input),
            attention_cost_pct: acts.attention_share_pct(qkv_cost, attn_out + inter + output, h),
            checkpoint_cost_pct: 100,
        }
    }

    /// Backward through the layer; `dx` is computed only when a layer below still trains.
    pub fn backward(
        &self,
        saved: BertLayerSaved,
        dout: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, SiteGrads)> {
        if self.pre_norm {
            return self.backward_pre_norm(saved, dout, need_dx);
        }
        let mut lin = SiteBackward::new(self, saved.lin);
        // As in forward, each gradient is dropped once used (and each saved part once read).
        let d_res2 = saved.ln_out.backward(&self.ln_out, dout)?; // d(o + a)
        drop(saved.ln_out);
        let d_i = {
            let gelu = self.gelu_state(saved.gelu, &saved.ln_attn, &self.ln_attn)?;
            let d_o = dropout::backward_opt(&saved.drop_out, d_res2.clone())?;
            let d_g = lin.back_dx_recomputed(Site::Output, &d_o, || gelu.output())?;
            drop(d_o);
            gelu.backward(&d_g)?
        };
        let d_a = nn::add(&lin.back_dx(Site::Intermediate, &d_i)?, &d_res2)?;
        drop(d_i);
        let d_res1 = saved.ln_attn.backward(&self.ln_attn, &d_a)?; // d(attn_out + h)
        drop((d_a, saved.ln_attn));
        let d_ctx = {
            let d_ao = dropout::backward_opt(&saved.drop_attn, d_res1.clone())?;
            lin.back_dx(Site::AttnOut, &d_ao)?
        };
        let attn = self.attention_state(saved.attn, None)?;
        let (dq, dk, dv) = attn.backward(&self.attention, &d_ctx)?;
        drop((d_ctx, attn));
        let dh = qkv_backward(&mut lin, [dq, dk, dv], need_dx, need_dx.then_some(d_res1))?;
        Ok((dh, lin.grads()))
    }
}

/// Backward through the query, key and value linears from their output gradients: their
/// adapters' gradients go to `lin`; with `need_dx`, their input gradients are summed onto `acc`
/// (the residual's gradient, or None).
fn qkv_backward(
    lin: &mut SiteBackward<BertLayer>,
    [dq, dk, dv]: [Tensor; 3],
    need_dx: bool,
    mut acc: Option<Tensor>,
) -> Result<Option<Tensor>> {
    for (s, d) in [(Site::Query, dq), (Site::Key, dk), (Site::Value, dv)] {
        acc = lin.back_onto(s, &d, acc, need_dx)?;
    }
    Ok(acc)
}
