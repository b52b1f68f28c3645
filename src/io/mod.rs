//! Files in and out: checkpoint weights (safetensors, GGUF), asset fetching, PEFT adapter format.

pub mod fetch;
pub mod hub;
pub mod joined;
pub mod labels;
pub mod peft;
pub mod weights;

use candle_core::Tensor;
use std::path::{Path, PathBuf};

/// Errors reading or writing model files; each names the file and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("{path}: not found ({what})")]
    Missing { path: PathBuf, what: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: tensor '{name}' not found (tried {tried})")]
    MissingTensor {
        path: PathBuf,
        name: String,
        tried: String,
    },
    #[error("{path}: tensor '{name}' has shape {actual:?}, expected {expected:?}")]
    WrongShape {
        path: PathBuf,
        name: String,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
    /// A tensor key that names no trained tensor of the model (the caller names the file).
    #[error("tensor key '{key}' names no trained tensor of this model: {message}")]
    UnknownParam { key: String, message: String },
}

/// Checks that tensor `name` of `path` is a float tensor with no NaN or infinite value (see
/// [`weight_problem`]).
pub(crate) fn check_weight(path: &Path, name: &str, t: &Tensor) -> Result<(), IoError> {
    match weight_problem(t) {
        Some(problem) => Err(IoError::Invalid {
            path: path.into(),
            message: format!("tensor '{name}' {problem}"),
        }),
        None => Ok(()),
    }
}

/// What makes `t` unfit as a weight, if anything: a weight or adapter stored as integers is
/// refused rather than cast, and a diverged or corrupt one (NaN, infinity) rather than trained
/// on, merged or written.
pub(crate) fn weight_problem(t: &Tensor) -> Option<String> {
    if !t.dtype().is_float() {
        return Some(format!(
            "has dtype {:?}; a weight must be a float tensor (F32, F16, BF16 or F64)",
            t.dtype()
        ));
    }
    match all_finite(t) {
        Ok(true) => None,
        Ok(false) => Some("has NaN or infinite values".into()),
        Err(e) => Some(format!("cannot be checked for NaN ({e})")),
    }
}

/// Whether every value of a float tensor is finite: `x - x` is 0 for a finite `x` and NaN for
/// NaN and either infinity, so the sum of `t - t` is 0 exactly when all of `t` is finite. Done in
/// slices of at most [`FINITE_CHECK_CHUNK`] values, so checking a large embedding while a model
/// loads never needs a temporary of its size.
pub(crate) fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    all_finite_in_slices(t, FINITE_CHECK_CHUNK)
}

fn all_finite_in_slices(t: &Tensor, chunk: usize) -> candle_core::Result<bool> {
    let flat = t.flatten_all()?;
    let n = flat.elem_count();
    let mut start = 0;
    while start < n {
        let part = flat.narrow(0, start, chunk.min(n - start))?;
        let s = part
            .sub(&part)?
            .sum_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?;
        if s != 0.0 {
            return Ok(false);
        }
        start += chunk;
    }
    Ok(true)
}

/// Values per slice of [`all_finite`]'s check (64 MiB of f32).
const FINITE_CHECK_CHUNK: usize = 1 << 24;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn weights_must_be_finite_floats() {
        let p = Path::new("m/model.safetensors");
        let ok = Tensor::new(&[1.0f32, -2.0, 3e38], &Device::Cpu).unwrap();
        check_weight(p, "w", &ok).unwrap();
        check_weight(p, "w", &ok.to_dtype(DType::BF16).unwrap()).unwrap();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let t = Tensor::new(&[1.0f32, bad, 2.0], &Device::Cpu).unwrap();
            let e = check_weight(p, "enc.w", &t).unwrap_err().to_string();
            assert!(
                e.contains("m/model.safetensors") && e.contains("'enc.w'") && e.contains("NaN"),
                "{e}"
            );
            let e = check_weight(p, "w", &t.to_dtype(DType::F16).unwrap()).unwrap_err();
            assert!(e.to_string().contains("NaN or infinite"), "{e}");
        }
        let ints = Tensor::new(&[1i64, 2, 3], &Device::Cpu).unwrap();
        let e = check_weight(p, "ids", &ints).unwrap_err().to_string();
        assert!(e.contains("'ids'") && e.contains("I64"), "{e}");
        let empty = Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap();
        check_weight(p, "w", &empty).unwrap();
        // A NaN in the last of several slices (a strided view, as a transposed weight is).
        let mut v = vec![0.5f32; 14];
        v[13] = f32::NAN;
        let t = Tensor::from_vec(v, (2, 7), &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        assert!(!all_finite_in_slices(&t, 4).unwrap());
        assert!(all_finite_in_slices(&t.narrow(1, 0, 1).unwrap(), 4).unwrap());
    }
}
