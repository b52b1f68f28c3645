//! SwiGLU, the gated MLP activation of LLaMA-family decoders: `y = silu(gate) * up`.
//! Backward needs both inputs (each factor's gradient is the other factor).

use candle_core::{Result, Tensor};

pub struct SwiGluSaved {
    gate: Tensor,
    up: Tensor,
}

impl super::offload::SavedTensors for SwiGluSaved {
    fn each_tensor(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        f(&mut self.gate);
        f(&mut self.up);
    }
}

/// `gate` and `up` are the two projections of the same input, same shape.
pub fn forward(gate: &Tensor, up: &Tensor, save: bool) -> Result<(Tensor, Option<SwiGluSaved>)> {
    let y = match super::cpu::swiglu_fwd(gate, up)? {
        Some(y) => y,
        None => match super::gpu::swiglu_fwd(gate, up)? {
            Some(y) => y,
            None => forward_reference(gate, up)?,
        },
    };
    let saved = save.then(|| SwiGluSaved {
        gate: gate.clone(),
        up: up.clone(),
    });
    Ok((y, saved))
}

/// The candle composition (other devices; reference for the fused kernel).
pub fn forward_reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

impl SwiGluSaved {
    /// What [`forward`] keeps, without computing its output (a layer's state rebuilt in
    /// backward, where the output is not needed).
    pub fn of(gate: Tensor, up: Tensor) -> Self {
        Self { gate, up }
    }

    /// The forward's output, recomputed from the saved inputs (for the linear that reads it,
    /// which keeps no copy).
    pub fn output(&self) -> Result<Tensor> {
        Ok(forward(&self.gate, &self.up, false)?.0)
    }

    /// Returns `(dgate, dup)`: `dgate = dy * up * s * (1 + g * (1 - s))` with `s = sigmoid(g)`,
    /// `dup = dy * silu(g)`. The fused kernels write the gradients over the saved `gate` and
    /// `up`, which backward consumes, so no feed-forward-wide tensor is allocated.
    pub fn backward(self, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        // The CPU's two passes leave the gate's gradient in `up` and the up's in `gate`.
        if super::cpu::swiglu_bwd_in_place(&self.gate, &self.up, dy)? {
            return Ok((self.up, self.gate));
        }
        if super::gpu::swiglu_bwd_in_place(&self.gate, &self.up, dy)? {
            return Ok((self.gate, self.up));
        }
        self.backward_reference(dy)
    }

    /// The candle composition (other devices; reference for the fused kernel). Computed in f32
    /// for half-precision activations, by blocks of rows to bound its temporaries.
    pub fn backward_reference(&self, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let out = dy.dtype();
        let cdt = crate::device::compute_dtype(out);
        let sigmoid = |g: &Tensor| (g.neg()?.exp()? + 1.0)?.recip();
        let blocks = super::ROW_BLOCK_ELEMS;
        let dgate = super::map_row_blocks(&[&self.gate, &self.up, dy], blocks, |t| {
            let (g, u, dy) = (
                t[0].to_dtype(cdt)?,
                t[1].to_dtype(cdt)?,
                t[2].to_dtype(cdt)?,
            );
            let s = sigmoid(&g)?;
            let dsilu = (&s * (g * s.affine(-1.0, 1.0)?)?.affine(1.0, 1.0)?)?;
            (dy * u)?.mul(&dsilu)?.to_dtype(out)
        })?;
        let dup = super::map_row_blocks(&[&self.gate, dy], blocks, |t| {
            let (g, dy) = (t[0].to_dtype(cdt)?, t[1].to_dtype(cdt)?);
            dy.mul(&(&g * sigmoid(&g)?)?)?.to_dtype(out)
        })?;
        Ok((dgate, dup))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, max_abs_diff, randn};
    use candle_core::DType;

    #[test]
    fn backward_matches_autograd_and_finite_differences() {
        let gate = randn(&[4, 9], 1).affine(4.0, 0.0).unwrap();
        let up = randn(&[4, 9], 2).affine(2.0, 0.0).unwrap();
        let dy = randn(&[4, 9], 3);
        let (_, saved) = forward(&gate, &up, true).unwrap();
        let (dg, du) = saved.unwrap().backward(&dy).unwrap();
        // Oracle from exp directly: g / (1 + exp(-g)) * u.
        check(
            &[gate, up],
            &dy,
            &[dg, du],
            |t| (&t[0] / (t[0].neg()?.exp()? + 1.0)?)? * &t[1],
            1e-10,
        );
    }

    #[test]
    fn fused_cpu_kernels_match_the_composition() {
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let gate = f32(randn(&[64, 50], 4).affine(6.0, 0.0).unwrap());
        let up = f32(randn(&[64, 50], 5).affine(2.0, 0.0).unwrap());
        let dy = f32(randn(&[64, 50], 6));
        let (y, saved) = forward(&gate, &up, true).unwrap();
        assert!(max_abs_diff(&y, &forward_reference(&gate, &up).unwrap()) < 1e-5);
        let saved = saved.unwrap();
        let (ra, rb) = saved.backward_reference(&dy).unwrap();
        let (a, b) = saved.backward(&dy).unwrap();
        assert!(max_abs_diff(&a, &ra) < 1e-5 && max_abs_diff(&b, &rb) < 1e-5);
    }
}
