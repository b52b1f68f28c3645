//! Components with explicit forward and backward.
//!
//! Every component follows one contract: `forward` returns its output and, only when asked to save,
//! a small struct holding exactly what its `backward` needs; `backward` takes that struct and the
//! output gradient and returns the input gradient (plus gradients of trainable parameters, if the
//! component has any). Frozen weights never get a gradient. No candle autograd tape is involved:
//! tensors built here are plain values, so nothing is kept alive that the saved structs do not name.

pub mod attention;
pub mod check;
pub mod cka;
pub mod cpu;
pub mod cpu_attention;
pub mod cpu_matmul;
pub mod dropout;
pub mod embedding;
pub mod flops;
pub mod gelu;
pub mod gpu;
pub mod head;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod offload;
pub mod optim;
pub mod rope;
pub mod swiglu;

#[cfg(test)]
pub(crate) mod gradcheck;

use candle_core::Tensor;
pub use dropout::Dropout;
pub use flops::matmul;

/// Per-pass settings shared by every component: whether dropout is active, the seeded RNG it
/// draws masks from (candle's CPU RNG cannot be seeded, so masks are made on the host), and
/// where a monitored training pass hands its adapters' rows (SAFE's in-step importance).
pub struct Pass<'a> {
    pub training: bool,
    pub rng: &'a mut rand::rngs::StdRng,
    pub monitor: Option<&'a mut dyn RowSink>,
}

/// Takes the rows SAFE's CKA needs from a training forward, as the layers produce them: per
/// adapted linear, its base output `Y`, the adapter's rank-r rows `U` and its `B`
/// (`X = Y + U B^T`). Declared here so that layers hand rows over without knowing who measures.
pub trait RowSink {
    /// The model layer whose linears run next; None outside the trainable stack (the frozen
    /// bottom, the head, a checkpointed layer's second forward): nothing is taken there. Rows
    /// taken in the layer before are measured by now.
    fn enter_layer(&mut self, layer: Option<usize>) -> candle_core::Result<()>;

    /// Whether site `site`'s rows are taken now: a layer is entered and its adapter is measured
    /// (a site whose rows are not taken keeps its fused forward).
    fn takes(&self, site: usize) -> bool;

    /// The micro-batch's attention mask `[batch * seq]` (1: a real token), rows in that order.
    fn tokens(&mut self, attention_mask: &[u32]);

    /// Site `site` (its index in the layer's sites) of the entered layer gave these rows.
    fn take(&mut self, site: usize, y: &Tensor, u: &Tensor, b: &Tensor) -> candle_core::Result<()>;
}

impl<'a> Pass<'a> {
    /// A training pass (dropout on) that draws its masks from `rng`, with no monitor.
    pub fn training(rng: &'a mut rand::rngs::StdRng) -> Self {
        Self {
            training: true,
            rng,
            monitor: None,
        }
    }

    /// A pass with dropout off (its RNG is never drawn from), with no monitor.
    pub fn evaluating(rng: &'a mut rand::rngs::StdRng) -> Self {
        Self {
            training: false,
            rng,
            monitor: None,
        }
    }
}

impl Pass<'_> {
    /// Tells the monitor, when there is one, which rows of this pass are real tokens.
    pub fn monitor_tokens(&mut self, attention_mask: &[u32]) {
        if let Some(m) = self.monitor.as_deref_mut() {
            m.tokens(attention_mask);
        }
    }

    /// Tells the monitor, when there is one, which layer runs next.
    pub fn monitor_layer(&mut self, layer: Option<usize>) -> candle_core::Result<()> {
        match self.monitor.as_deref_mut() {
            Some(m) => m.enter_layer(layer),
            None => Ok(()),
        }
    }

    /// The monitor when it takes site `site`'s rows now.
    pub fn taking_rows(&mut self, site: usize) -> Option<&mut dyn RowSink> {
        match self.monitor.as_deref_mut() {
            Some(m) if m.takes(site) => Some(m),
            _ => None,
        }
    }

    /// Runs `f` with an inference pass: no dropout, so its RNG is never drawn from.
    pub fn inference<T>(f: impl FnOnce(&mut Pass) -> T) -> T {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
        f(&mut Pass::evaluating(&mut rng))
    }
}

/// `a + b` for same-shaped tensors (residuals, gradient sums): one fused kernel on CUDA.
pub fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    match gpu::add(a, b)? {
        Some(y) => Ok(y),
        None => a + b,
    }
}

/// `y + u w^T` (`w_t`: `w` is `[out, r]`) or `y + u w` (`w` `[r, out]`): a rank-r update of a
/// base output or input gradient. `y` must be a tensor nothing else refers to (a product just
/// made): on CUDA one cuBLAS product accumulates into it (beta = 1), so the `[n, out]` update is
/// never a tensor of its own and no add kernel runs; on the CPU (f32) the product is added into
/// `y` in place; elsewhere the product, then [`add`].
pub fn add_low_rank(y: Tensor, u: &Tensor, w: &Tensor, w_t: bool) -> candle_core::Result<Tensor> {
    if gpu::add_product(&y, u, w, w_t)? {
        return Ok(y);
    }
    let w = if w_t { w.t()? } else { w.clone() };
    let update = matmul(u, &w)?;
    if cpu::add_in_place(&y, &update)? {
        return Ok(y);
    }
    add(&y, &update)
}

/// Runs `f` on blocks of rows of `inputs` (same number of rows each) and writes its results into
/// one output. Off the CPU an elementwise formula is a chain of candle ops, each allocating a
/// tensor as large as its input; by rows, those temporaries take one block's worth of memory
/// instead of several activations' worth. One block (no copy) when everything fits.
pub(crate) fn map_row_blocks(
    inputs: &[&Tensor],
    block_elems: usize,
    f: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let rows = inputs[0].dim(0)?;
    let per_row = (inputs[0].elem_count() / rows.max(1)).max(1);
    let block = (block_elems / per_row).max(1);
    if block >= rows {
        let all: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
        return f(&all);
    }
    let mut out: Option<Tensor> = None;
    for start in (0..rows).step_by(block) {
        let n = block.min(rows - start);
        let part = inputs
            .iter()
            .map(|t| t.narrow(0, start, n))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let y = f(&part)?;
        if out.is_none() {
            let mut dims = y.dims().to_vec();
            dims[0] = rows;
            out = Some(Tensor::zeros(dims, y.dtype(), y.device())?);
        }
        out.as_ref().expect("made above").slice_set(&y, 0, start)?;
    }
    Ok(out.expect("at least one block"))
}

/// Elements per block for [`map_row_blocks`] (16 MiB of f32).
pub(crate) const ROW_BLOCK_ELEMS: usize = 1 << 22;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn row_blocks_give_the_unblocked_result() {
        let x = Tensor::randn(0f32, 1., (37, 5), &Device::Cpu).unwrap();
        let y = Tensor::randn(0f32, 1., (37, 5), &Device::Cpu).unwrap();
        let f = |t: &[Tensor]| (&t[0] * &t[1])?.exp()?.to_dtype(DType::F64);
        let whole = f(&[x.clone(), y.clone()]).unwrap();
        for block in [1, 5, 10, 36, 1000] {
            let b = map_row_blocks(&[&x, &y], block, f).unwrap();
            assert_eq!(b.dtype(), DType::F64);
            let d: f64 = (b - &whole)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert_eq!(d, 0.0, "block {block}");
        }
    }
}
