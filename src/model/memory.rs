//! What a training step keeps in memory, computed from shapes: the input of the memory planner
//! (`train/plan.rs`). Each architecture adds up its layer's saved state from the pieces below, one
//! per component, written beside what the component saves (see the `*Saved` structs): a layer
//! whose forward changes what it saves changes its sum here, and the tests measure both.

use crate::adapters::LoraLinear;
use crate::nn::attention::Attention;
use crate::nn::norm::Norm;
use candle_core::{DType, Device, Tensor};

/// One layer of a micro-batch in training mode, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerMemory {
    /// What its forward keeps for backward (its saved-state struct).
    pub state: usize,
    /// The most its forward or backward holds at once beyond that state and its input and output
    /// (attention probabilities, the feed-forward's intermediate, gradients in flight).
    pub transient: usize,
    /// What of `state` a forward that recomputes the feed-forward input (`stack::Parts::ffn`)
    /// does not keep: that input (GELU's, or SwiGLU's gate and up).
    pub ffn_input: usize,
    /// Backward's cost of recomputing it, in percent of the layer's forward: the share of its
    /// matmul cost ([`Acts::matmul`]) that the feed-forward's first linear(s) take.
    pub ffn_cost_pct: usize,
    /// What of `state` a forward that recomputes the attention (`stack::Parts::attention`) does
    /// not keep: the attention's saved state, less what the layer keeps for its recomputation
    /// that it would not keep otherwise.
    pub attention_state: usize,
    /// Backward's cost of recomputing it, in percent of the layer's forward: the share of the q,
    /// k and v projections ([`Acts::matmul`]) and the attention's own products.
    pub attention_cost_pct: usize,
    /// The cost of a checkpointed layer's second forward, in percent of its forward: 100, or
    /// less where it stops once the state is rebuilt (`LlamaLayer::state`).
    pub checkpoint_cost_pct: usize,
}

impl LayerMemory {
    /// What a forward that keeps what `keep` says holds of [`LayerMemory::state`]: all of it
    /// less the parts backward recomputes, or none (a checkpointed layer keeps its input instead).
    pub fn kept(&self, keep: super::stack::Keep) -> usize {
        let (ffn, attention) = self.recomputed(keep);
        match keep {
            super::stack::Keep::Nothing => 0,
            super::stack::Keep::State(_) => self.state - ffn - attention,
        }
    }

    /// The most of its state a layer holds at once in its forward or backward as `keep` says:
    /// what it keeps and one recomputed part at a time (backward rebuilds the feed-forward input
    /// and consumes it before it rebuilds the attention's; forward drops each once used); all of
    /// it where it keeps nothing (a checkpointed layer's backward rebuilds it whole).
    pub fn live(&self, keep: super::stack::Keep) -> usize {
        let (ffn, attention) = self.recomputed(keep);
        match keep {
            super::stack::Keep::Nothing => self.state,
            super::stack::Keep::State(_) => self.kept(keep) + ffn.max(attention),
        }
    }

    /// The bytes of the feed-forward input and of the attention's state that `keep` recomputes.
    fn recomputed(&self, keep: super::stack::Keep) -> (usize, usize) {
        let parts = keep.recomputed();
        (
            if parts.ffn { self.ffn_input } else { 0 },
            if parts.attention {
                self.attention_state
            } else {
                0
            },
        )
    }
}

/// What a training step of a model keeps, by layer, for `rows` rows of `seq` tokens.
pub trait StepMemory: crate::adapters::Adapted {
    /// Layer `layer` in training mode with its adapters' current trainable state.
    fn layer_memory(&self, layer: usize, rows: usize, seq: usize) -> LayerMemory;

    /// Width of the hidden states between layers.
    fn hidden_size(&self) -> usize;

    /// One layer's input `[rows*seq, hidden]`: what a checkpointed layer keeps.
    fn hidden_bytes(&self, rows: usize, seq: usize) -> usize;

    /// The head and loss, forward and backward, above the layers' output.
    fn head_bytes(&self, rows: usize, seq: usize) -> usize;
}

/// Activation shapes of one micro-batch: `tokens = rows * seq` of `dtype`.
#[derive(Clone, Copy, Debug)]
pub struct Acts {
    pub rows: usize,
    pub seq: usize,
    pub dtype: DType,
    /// Attention runs the fused CPU kernels (`nn::cpu_attention`: f32 on the CPU), which
    /// allocate no score-sized tensor.
    pub cpu_fused: bool,
    /// The output elements below which a product costs as much as at this size: one wave of
    /// tiles on a GPU, 0 on the CPU ([`crate::device::matmul_wave`]).
    pub matmul_floor: usize,
    /// A GPU pass too small for its layers' work to outlast their kernel launches
    /// ([`Acts::at_width`]): each product, and each of the attention's three steps, then costs
    /// the same.
    pub launch_bound: bool,
    /// On a GPU (where [`Acts::at_width`] may find the pass launch-bound).
    pub on_gpu: bool,
}

/// A GPU layer's kernel launches take about as long as this much work (150 us at 200 TFLOP/s).
pub const GPU_LAYER_LAUNCH_FLOPS: f64 = 30e9;

/// Tokens below which a layer of width `hidden` on a GPU takes about as long as its kernel
/// launches, whatever the tokens: a token costs a layer's forward about 24 hidden^2 FLOP (8,500
/// tokens at MiniLM's 384, 75 at LLaMA-7B's 4096).
pub fn launch_bound_tokens(hidden: usize) -> f64 {
    let h = hidden.max(1) as f64;
    GPU_LAYER_LAUNCH_FLOPS / (24.0 * h * h)
}

impl Acts {
    /// Activations of `dtype` on `device`.
    pub fn new(rows: usize, seq: usize, dtype: DType, device: &Device) -> Self {
        Self {
            rows,
            seq,
            dtype,
            cpu_fused: device.is_cpu() && dtype == DType::F32,
            matmul_floor: crate::device::matmul_wave(device),
            launch_bound: false,
            on_gpu: !device.is_cpu(),
        }
    }

    /// These activations in a layer of width `hidden`: launch-bound on a GPU below
    /// [`launch_bound_tokens`]. There a product's FLOPs say little of its time: at MiniLM's width
    /// and 16 x 128 tokens the FLOPs priced the attention's recomputation at a third of the
    /// layer's forward, cheaper per byte than checkpointing the layer, but on an H100
    /// recomputing five layers' attention made a BBC News run 8% slower than checkpointing
    /// three whole layers; counted by products, the attention is two thirds of the forward.
    pub fn at_width(self, hidden: usize) -> Self {
        Self {
            launch_bound: self.on_gpu && (self.tokens() as f64) < launch_bound_tokens(hidden),
            ..self
        }
    }

    /// The cost a token of a product of `[tokens, k]` rows with a `[k, n]` weight, in FLOPs:
    /// `2 k n`, or where its output is under [`Acts::matmul_floor`], that floor's share; see
    /// [`Acts::launched`].
    pub fn matmul(&self, n: usize, k: usize) -> usize {
        self.launched(2 * k * n.max(self.matmul_floor.div_ceil(self.tokens().max(1))))
    }

    /// A step of `flops` a token: the same for every step where the pass is launch-bound.
    fn launched(&self, flops: usize) -> usize {
        if self.launch_bound {
            1
        } else {
            flops
        }
    }

    /// Activations in the dtype and on the device of `weight` (a model's tensor).
    pub fn like(rows: usize, seq: usize, weight: &Tensor) -> Self {
        Self::new(rows, seq, weight.dtype(), weight.device())
    }

    pub fn tokens(&self) -> usize {
        self.rows * self.seq
    }

    /// Bytes of an activation element.
    fn act(&self) -> usize {
        self.dtype.size_in_bytes()
    }

    /// Bytes of a statistics element (f32 beside half precision).
    fn compute(&self) -> usize {
        crate::device::compute_dtype(self.dtype).size_in_bytes()
    }

    /// An activation `[tokens, width]`.
    pub fn of(&self, width: usize) -> usize {
        self.tokens() * width * self.act()
    }

    /// A norm's saved rows (`xhat` or its output, activation dtype) and per-row `1/std` (f32 or
    /// wider).
    pub fn norm(&self, width: usize) -> usize {
        self.of(width) + self.tokens() * self.compute().max(4)
    }

    /// Attention's saved q, k, v (after rope) and per-row log-sum-exp (dropout keeps no mask: it
    /// is redrawn from its seeds); and the output, which the fused flash kernels (CUDA builds,
    /// bf16, head_dim 64 or 128, no dropout) keep for backward's `rowsum(dO * O)`: counted
    /// wherever they may run (a CUDA build training in bf16 on the CPU over-counts it; the
    /// probabilities in [`Acts::transient`] are over-counted on the flash path, which allocates
    /// none).
    pub fn attention(&self, a: &Attention, head_dim: usize) -> usize {
        let (h, kv) = (a.num_heads, a.num_kv_heads);
        let flash_out = if self.flash(a, head_dim) {
            self.of(h * head_dim)
        } else {
            0
        };
        self.of(h * head_dim)
            + 2 * self.of(kv * head_dim)
            + self.tokens() * h * self.compute()
            + flash_out
    }

    /// Whether the fused flash kernels may run this attention: a CUDA build, half precision,
    /// head_dim 64 or 128, no dropout, not turned off (`SAFETUNE_FLASH=0`).
    fn flash(&self, a: &Attention, head_dim: usize) -> bool {
        crate::nn::gpu::AVAILABLE
            && self.act() == 2
            && matches!(head_dim, 64 | 128)
            && a.dropout.p <= 0.0
            && crate::nn::attention::flash_enabled()
    }

    /// Attention's `[rows, heads, seq, seq]` probabilities in the compute dtype.
    pub fn probs(&self, a: &Attention) -> usize {
        self.rows * a.num_heads * self.seq * self.seq * self.compute()
    }

    /// Linears that read one input: each trainable adapter's `x A^T`, and the input itself once
    /// if any of them trains (the same tensor is kept for all).
    pub fn lora_group(&self, linears: &[&LoraLinear]) -> usize {
        let mut bytes = 0;
        let mut input = 0;
        for l in linears {
            let Some(a) = &l.lora else { continue };
            let (r, inp) = (a.a.dims()[0], l.base.in_features());
            if a.trainable {
                bytes += self.of(r);
                input = self.of(inp);
            }
        }
        bytes + input
    }

    /// [`Acts::lora_group`] of linears whose input backward recomputes (`Save::Recomputed`).
    pub fn lora_group_recomputed(&self, linears: &[&LoraLinear]) -> usize {
        self.lora_group(linears) - self.recomputed_input(linears)
    }

    /// The input those linears' backward recomputes, when an adapter among them trains: a
    /// temporary of the layer in backward (so [`Acts::transient`] of its layer adds it).
    pub fn recomputed_input(&self, linears: &[&LoraLinear]) -> usize {
        match linears.iter().find(|l| l.trains()) {
            Some(l) => self.of(l.base.in_features()),
            None => 0,
        }
    }

    /// The temporaries of backward through the linear reading the feed-forward's activation,
    /// beside [`Acts::transient`]: its input, recomputed when its adapter trains
    /// ([`Acts::recomputed_input`]), and with LoRA dropout the adapter's update to the input
    /// gradient, a tensor of its own (the mask stands between it and an in-place add).
    pub fn ffn_out_backward(&self, out: &LoraLinear) -> usize {
        let update = match &out.lora {
            Some(a) if a.dropout.p > 0.0 => self.of(out.base.in_features()),
            _ => 0,
        };
        self.recomputed_input(&[out]) + update
    }

    /// A norm and the linears reading its output ([`Acts::lora_group`]): the output counts once
    /// where the norm keeps it for its own backward ([`Norm::keeps_output`]), as the adapters
    /// keep the same tensor.
    pub fn norm_then(&self, norm: &Norm, linears: &[&LoraLinear]) -> usize {
        let width = norm.weight.elem_count();
        let shared = norm.keeps_output(self.dtype) && linears.iter().any(|l| l.trains());
        self.norm(width) + self.lora_group(linears) - if shared { self.of(width) } else { 0 }
    }

    /// Attention and the linear reading its output: the flash kernels keep the output that
    /// linear's adapter keeps too, so it counts once.
    pub fn attention_then(&self, a: &Attention, head_dim: usize, out: &LoraLinear) -> usize {
        self.attention_alone(a, head_dim, out) + self.lora_group(&[out])
    }

    /// What a layer recomputing its attention does not keep of [`Acts::attention_then`]: the
    /// attention's state, less the output that `out`'s adapter keeps anyway.
    pub fn attention_alone(&self, a: &Attention, head_dim: usize, out: &LoraLinear) -> usize {
        let shared = self.flash(a, head_dim) && out.trains();
        self.attention(a, head_dim)
            - if shared {
                self.of(a.num_heads * head_dim)
            } else {
                0
            }
    }

    /// The share in percent (rounded up) of a layer's forward that its q, k and v projections
    /// (`qkv` matmul FLOPs a token, [`Acts::matmul`]) and the attention's products take, beside `rest` for its
    /// other projections: [`LayerMemory::attention_cost_pct`].
    pub fn attention_share_pct(&self, qkv: usize, rest: usize, width: usize) -> usize {
        let attention = self.attention_products(width);
        (100 * (qkv + attention)).div_ceil(qkv + rest + attention)
    }

    /// The attention's products a token over `seq` keys of width `width`, in FLOPs: `q k^T`, the
    /// softmax and `p v`, each counting as one product where the pass is launch-bound
    /// ([`Acts::launched`]).
    fn attention_products(&self, width: usize) -> usize {
        2 * self.launched(2 * self.seq * width) + self.launched(0)
    }

    /// The share in percent (rounded up) of a layer's forward that `part` matmul FLOPs a token
    /// take ([`Acts::matmul`]), beside `rest` for its other projections and attention's products
    /// over `seq` keys of width `width`: the costs of [`LayerMemory`].
    pub fn share_pct(&self, part: usize, rest: usize, width: usize) -> usize {
        let attention = self.attention_products(width);
        (100 * part).div_ceil(part + rest + attention)
    }

    /// A layer's temporaries beside its state: the attention probabilities (fused softmax
    /// kernels keep one score-sized tensor at a time; the flash kernels none, but backward's f32
    /// dQ accumulator and per-row `rowsum(dO * O)`; the fused CPU kernels their threads' blocks),
    /// and one feed-forward-wide and two hidden-wide activations in flight (backward's gradients
    /// through the feed-forward: the activation's backward writes its input gradient over its
    /// saved input, and an adapter's update is added into the base product in place).
    pub fn transient(&self, a: &Attention, head_dim: usize, hidden: usize, ffn: usize) -> usize {
        let scores = if self.flash(a, head_dim) {
            self.tokens() * a.num_heads * (head_dim + 1) * 4
        } else if self.cpu_fused {
            crate::nn::cpu_attention::scratch_bytes(self.seq, head_dim)
        } else {
            self.probs(a)
        };
        scores + self.of(ffn) + 2 * self.of(hidden)
    }
}
