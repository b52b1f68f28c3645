//! Measures candle CPU matmul throughput on the shapes a MiniLM training step uses.
use candle_core::{Device, Tensor};
use std::time::Instant;

fn time(name: &str, a: &Tensor, b: &Tensor, flops: f64) {
    let _ = a.matmul(b).unwrap();
    let n = 10;
    let t = Instant::now();
    for _ in 0..n {
        let _ = a.matmul(b).unwrap();
    }
    let s = t.elapsed().as_secs_f64() / n as f64;
    println!(
        "{name:<40} {:8.2} ms {:8.1} GFLOP/s",
        s * 1e3,
        flops / s / 1e9
    );
}

fn main() {
    let d = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (2048, 384), &d).unwrap();
    let w = Tensor::randn(0f32, 1., (384, 384), &d).unwrap();
    let w4 = Tensor::randn(0f32, 1., (1536, 384), &d).unwrap();
    let f = 2.0 * 2048.0 * 384.0 * 384.0;
    time("x @ w.t() [2048x384x384]", &x, &w.t().unwrap(), f);
    time("x @ w (contiguous)", &x, &w, f);
    time("x @ w4.t() [2048x384x1536]", &x, &w4.t().unwrap(), 4.0 * f);
    let q = Tensor::randn(0f32, 1., (16, 12, 128, 32), &d).unwrap();
    let kt = Tensor::randn(0f32, 1., (16, 12, 32, 128), &d).unwrap();
    time(
        "attn q@k^T [192 x 128x32x128]",
        &q,
        &kt,
        2.0 * 192.0 * 128.0 * 128.0 * 32.0,
    );
    let k = Tensor::randn(0f32, 1., (16, 12, 128, 32), &d).unwrap();
    time(
        "attn q@k.t() (strided)",
        &q,
        &k.t().unwrap(),
        2.0 * 192.0 * 128.0 * 128.0 * 32.0,
    );
    let dy = Tensor::randn(0f32, 1., (2048, 384), &d).unwrap();
    time("dy.t() @ x [384x2048x384]", &dy.t().unwrap(), &x, f);
}
