//! Test oracle for hand-written backward passes: candle's autograd tape and central finite
//! differences, both on `L = sum(f(inputs) * dy)` in f64.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// `||a - b|| / ||b||` in f64, whatever the dtypes (half-precision results against f32 ones).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let (a, b) = (f(a), f(b));
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt()
    };
    norm(&(&a - &b).unwrap()) / norm(&b).max(1e-30)
}

fn weighted_sum(y: &Tensor, dy: &Tensor) -> Result<f64> {
    (y * dy)?.sum_all()?.to_scalar::<f64>()
}

/// Checks `ours[i]` (our gradient of each input) against the tape and finite differences of `f`.
/// `f` must be deterministic (reseed any dropout RNG inside it).
pub fn check(
    inputs: &[Tensor],
    dy: &Tensor,
    ours: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    tol: f64,
) {
    // Autograd tape.
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    let grads = (&y * dy).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let g = grads.get(v).expect("tape gradient");
        let d = max_abs_diff(g, &ours[i]);
        assert!(d < tol, "input {i}: autograd differs by {d}");
    }
    // Central finite differences on a few coordinates of each input.
    let h = 1e-6;
    let mut rng = StdRng::seed_from_u64(7);
    for (i, x) in inputs.iter().enumerate() {
        let flat: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let ours_flat: Vec<f64> = ours[i].flatten_all().unwrap().to_vec1().unwrap();
        for _ in 0..6 {
            let j = rng.random_range(0..flat.len());
            let eval = |delta: f64| {
                let mut v = flat.clone();
                v[j] += delta;
                let mut ins = inputs.to_vec();
                ins[i] = Tensor::from_vec(v, x.shape(), x.device()).unwrap();
                weighted_sum(&f(&ins).unwrap(), dy).unwrap()
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            let err = (fd - ours_flat[j]).abs();
            assert!(
                err < 1e-5 * (1.0 + fd.abs()),
                "input {i} coord {j}: finite difference {fd} vs ours {}",
                ours_flat[j]
            );
        }
    }
}
