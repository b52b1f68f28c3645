//! Frozen linear layer `y = x W^T + b`, PyTorch layout (`W` is `[out, in]`).
//!
//! The weight is frozen, so backward needs no saved input: `dx = dy W`. That is why a frozen linear
//! costs no activation memory (only an adapter beside it that trains does, see `adapters::lora`).

use super::flops::matmul;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::sync::Arc;

/// GGUF block formats a float base can be quantized into (32 values per block).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantFormat {
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q8_0")]
    Q8_0,
}

impl QuantFormat {
    pub fn ggml(self) -> GgmlDType {
        match self {
            QuantFormat::Q4_0 => GgmlDType::Q4_0,
            QuantFormat::Q4_1 => GgmlDType::Q4_1,
            QuantFormat::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// Quantizes a `[rows, cols]` weight into this format's blocks on the host, row chunks in
    /// parallel (candle's quantizer is one thread: 30 s for a 7B base), and puts the blocks on
    /// `device`. The bytes are those of `QTensor::quantize` on the whole matrix: a block never
    /// spans two rows when `cols` is a multiple of 32, which this requires.
    pub fn quantize(self, w: &Tensor, device: &Device) -> Result<QTensor> {
        let (rows, cols) = w.dims2()?;
        let block = self.ggml().block_size();
        if cols % block != 0 {
            candle_core::bail!("{rows}x{cols}: rows are not whole {block}-value blocks");
        }
        let host = w.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let values = host.flatten_all()?.to_vec1::<f32>()?;
        let chunk_rows = (1 << 18) / cols + 1; // about 1 MiB of f32 per task
        let parts: Vec<Result<Vec<u8>>> = values
            .par_chunks(chunk_rows * cols)
            .map(|c| {
                let t = Tensor::from_slice(c, (c.len() / cols, cols), &Device::Cpu)?;
                Ok(QTensor::quantize(&t, self.ggml())?.data()?.into_owned())
            })
            .collect();
        let mut bytes = Vec::with_capacity(rows * cols / block * self.ggml().type_size());
        for p in parts {
            bytes.extend_from_slice(&p?);
        }
        let storage = QStorage::from_data(Cow::Owned(bytes), device, self.ggml())?;
        QTensor::new(storage, (rows, cols))
    }
}

/// A linear layer's weight: dense, or kept in its quantized GGUF blocks and dequantized for each
/// matmul. A frozen base needs no full-precision copy, so a Q4 base costs about a seventh of its
/// f32 size in memory, for one dequantization per matmul.
#[derive(Clone, Debug)]
pub enum Weight {
    Dense(Tensor),
    /// Dequantized to `dtype` on the tensor's device when used.
    Quantized {
        q: Arc<QTensor>,
        dtype: DType,
    },
}

impl Weight {
    pub fn dims(&self) -> &[usize] {
        match self {
            Weight::Dense(t) => t.dims(),
            Weight::Quantized { q, .. } => q.shape().dims(),
        }
    }

    /// The dtype the matmuls run in.
    pub fn dtype(&self) -> DType {
        match self {
            Weight::Dense(t) => t.dtype(),
            Weight::Quantized { dtype, .. } => *dtype,
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Weight::Dense(t) => t.device().clone(),
            Weight::Quantized { q, .. } => q.device(),
        }
    }

    /// The weight as a float tensor: borrowed when dense, dequantized (a temporary) otherwise.
    pub fn dense(&self) -> Result<Cow<'_, Tensor>> {
        match self {
            Weight::Dense(t) => Ok(Cow::Borrowed(t)),
            Weight::Quantized { q, dtype } => {
                Ok(Cow::Owned(match super::gpu::dequantize(q, *dtype)? {
                    Some(w) => w, // CUDA, Q4_0 / Q4_1 / Q8_0: one pass straight into `dtype`
                    None => q.dequantize(&q.device())?.to_dtype(*dtype)?,
                }))
            }
        }
    }

    /// The dense tensor, for weights that can train (a classifier); `None` when quantized.
    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(t) => Some(t),
            Weight::Quantized { .. } => None,
        }
    }

    /// See [`as_dense`](Self::as_dense).
    pub fn as_dense_mut(&mut self) -> Option<&mut Tensor> {
        match self {
            Weight::Dense(t) => Some(t),
            Weight::Quantized { .. } => None,
        }
    }

    /// Bytes this weight keeps alive.
    pub fn storage_bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Quantized { q, .. } => q.storage_size_in_bytes(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Weight::Dense(weight),
            bias,
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `x` is `[n, in]`; returns `[n, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = matmul(x, &self.weight.dense()?.t()?)?;
        match &self.bias {
            Some(b) => match super::gpu::bias_add(&y, b)? {
                Some(y) => Ok(y),
                None => y.broadcast_add(b),
            },
            None => Ok(y),
        }
    }

    /// Input gradient only: the weight and bias are frozen.
    pub fn backward_input(&self, dy: &Tensor) -> Result<Tensor> {
        matmul(dy, self.weight.dense()?.as_ref())
    }

    /// `acc += dy W` in place where one product does it (CUDA: cuBLAS with beta = 1); false,
    /// and `acc` untouched, elsewhere.
    pub fn backward_input_onto(&self, dy: &Tensor, acc: &Tensor) -> Result<bool> {
        super::gpu::matmul_acc(acc, dy, self.weight.dense()?.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row chunks quantized in parallel give the bytes of one quantization of the whole matrix.
    #[test]
    fn parallel_quantization_is_the_whole_matrix_quantization() {
        let w = crate::nn::gradcheck::randn(&[2100, 256], 5) // 3 chunks of 1025, 1025, 50 rows
            .to_dtype(DType::F32)
            .unwrap();
        for f in [QuantFormat::Q4_0, QuantFormat::Q4_1, QuantFormat::Q8_0] {
            let ours = f.quantize(&w, &Device::Cpu).unwrap();
            let whole = QTensor::quantize(&w, f.ggml()).unwrap();
            assert_eq!(ours.shape().dims(), [2100, 256]);
            assert_eq!(ours.data().unwrap(), whole.data().unwrap(), "{f:?}");
        }
        let e = QuantFormat::Q8_0
            .quantize(&w.narrow(1, 0, 40).unwrap(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("32-value blocks"), "{e}");
    }
    use crate::nn::gradcheck::{check, max_abs_diff, randn};
    use candle_core::quantized::GgmlDType;

    #[test]
    fn input_gradient_matches_autograd() {
        let x = randn(&[6, 5], 21);
        let lin = Linear::new(randn(&[3, 5], 22), Some(randn(&[3], 23)));
        let dy = randn(&[6, 3], 24);
        let dx = lin.backward_input(&dy).unwrap();
        check(&[x], &dy, &[dx], |t| lin.forward(&t[0]), 1e-12);
    }

    /// A quantized weight computes exactly what the dense layer holding its dequantized values
    /// computes, forward and backward, in a fraction of the memory.
    #[test]
    fn quantized_weight_matches_its_dequantized_dense_twin() {
        let w = randn(&[8, 64], 31).to_dtype(DType::F32).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let dense_w = q.dequantize(&Device::Cpu).unwrap();
        let bias = Some(randn(&[8], 32).to_dtype(DType::F32).unwrap());
        let dense = Linear::new(dense_w.clone(), bias.clone());
        let quant = Linear {
            weight: Weight::Quantized {
                q: Arc::new(q),
                dtype: DType::F32,
            },
            bias,
        };
        assert_eq!((quant.in_features(), quant.out_features()), (64, 8));
        let x = randn(&[5, 64], 33).to_dtype(DType::F32).unwrap();
        let dy = randn(&[5, 8], 34).to_dtype(DType::F32).unwrap();
        let y = (dense.forward(&x).unwrap(), quant.forward(&x).unwrap());
        assert_eq!(max_abs_diff(&y.0, &y.1), 0.0);
        let dx = (
            dense.backward_input(&dy).unwrap(),
            quant.backward_input(&dy).unwrap(),
        );
        assert_eq!(max_abs_diff(&dx.0, &dx.1), 0.0);
        // Q4_1: 32 weights in 20 bytes, against 128 in f32.
        assert_eq!(
            quant.weight.storage_bytes() * 128,
            dense.weight.storage_bytes() * 20
        );
        assert!(max_abs_diff(&dense_w, &w) > 0.0, "Q4_1 is lossy");
    }
}
