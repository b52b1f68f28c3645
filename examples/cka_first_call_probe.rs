//! What the first call of SAFE's fused CKA Gram terms costs in a fresh CUDA process, and on
//! what. Each run is a new process; the argument lists what to call first, in order:
//!
//!   cargo run --release --features cuda --example cka_first_call_probe -- module,tf32,gram
//!
//! `module`: one of safetune's own kernels (SwiGLU), which loads their module as a training
//! step has before SAFE's first measurement; `tf32`: cuBLAS's TF32 product `E E^T` at the Gram
//! form's shape (520 x 4096), twice; `f64`: the same in f64; `gram`: `nn::cka::gram_terms` at a
//! 7B q/v adapter (512 of 2,048 rows), three times; `queued`: a call's time, 50 queued, at 512,
//! 256 and 128 rows beside cuBLAS's TF32 product alone. Before any of them, two bf16 matmuls of a
//! training step's shape load cuBLAS as a step would. Measured (BENCHMARKS.md): the first use of
//! cuBLAS's TF32 product in a process cost 55-82 ms, which SAFE's first measured step paid while
//! the Gram product went through cuBLAS; the first call of the terms now costs 0.2 ms.
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

/// Milliseconds `f` takes, the device synchronized before and after.
fn synced_ms(dev: &Device, f: impl FnOnce()) -> f64 {
    dev.synchronize().unwrap();
    let t = Instant::now();
    f();
    dev.synchronize().unwrap();
    t.elapsed().as_secs_f64() * 1e3
}

/// Milliseconds a call of `f` takes, 50 calls queued after 3 to warm up.
fn queued_ms(dev: &Device, f: &dyn Fn()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let total = synced_ms(dev, || {
        for _ in 0..50 {
            f();
        }
    });
    total / 50.0
}

fn rows(n: u32, dev: &Device) -> Tensor {
    let picked: Vec<u32> = (0..n).map(|i| 4 * i).collect();
    Tensor::from_vec(picked, n as usize, dev).unwrap()
}

fn main() {
    let Ok(dev) = Device::new_cuda(0) else {
        eprintln!("cka_first_call_probe needs a CUDA build (--features cuda) and a GPU");
        std::process::exit(2);
    };
    let order = std::env::args().nth(1).unwrap_or_else(|| "gram".into());
    let randn = |dims: (usize, usize), std: f32| Tensor::randn(0f32, std, dims, &dev).unwrap();
    let y = randn((2048, 4096), 1.0).to_dtype(DType::BF16).unwrap();
    let u = randn((2048, 8), 1.0).to_dtype(DType::BF16).unwrap();
    let b = randn((4096, 8), 0.05);
    let w = randn((4096, 4096), 1.0).to_dtype(DType::BF16).unwrap();
    let e = randn((520, 4096), 1.0);
    for i in 0..2 {
        let ms = synced_ms(&dev, || drop(y.matmul(&w).unwrap()));
        println!("bf16 matmul 2048 x 4096 x 4096, call {i}: {ms:.2} ms");
    }
    let gram = |t: &Tensor| t.matmul(&t.t().unwrap()).unwrap();
    for step in order.split(',') {
        match step {
            "module" => {
                let g = randn((8, 64), 1.0).to_dtype(DType::BF16).unwrap();
                for i in 0..2 {
                    let ms = synced_ms(&dev, || {
                        let out = safetune::nn::gpu::swiglu_fwd(&g, &g).unwrap();
                        assert!(out.is_some(), "the CUDA build's SwiGLU kernel");
                    });
                    println!("SwiGLU kernel 8 x 64, call {i}: {ms:.2} ms");
                }
            }
            "tf32" => {
                candle_core::cuda::set_gemm_reduced_precision_f32(true);
                for i in 0..2 {
                    let ms = synced_ms(&dev, || drop(gram(&e)));
                    println!("TF32 E E^T 520 x 4096, call {i}: {ms:.2} ms");
                }
                candle_core::cuda::set_gemm_reduced_precision_f32(false);
            }
            "f64" => {
                let e64 = e.to_dtype(DType::F64).unwrap();
                for i in 0..2 {
                    let ms = synced_ms(&dev, || drop(gram(&e64)));
                    println!("f64 E E^T 520 x 4096, call {i}: {ms:.2} ms");
                }
            }
            "gram" => {
                let picked = rows(512, &dev);
                for i in 0..3 {
                    let ms = synced_ms(&dev, || {
                        drop(safetune::nn::cka::gram_terms(&y, &u, &b, &picked).unwrap())
                    });
                    println!("gram terms 512 rows, call {i}: {ms:.2} ms");
                }
            }
            "queued" => {
                for n in [512u32, 256, 128] {
                    let picked = rows(n, &dev);
                    let terms =
                        || drop(safetune::nn::cka::gram_terms(&y, &u, &b, &picked).unwrap());
                    let ms = queued_ms(&dev, &terms);
                    let en = randn((n as usize + 8, 4096), 1.0);
                    candle_core::cuda::set_gemm_reduced_precision_f32(true);
                    let product = queued_ms(&dev, &|| drop(gram(&en)));
                    candle_core::cuda::set_gemm_reduced_precision_f32(false);
                    println!("{n} rows: gram terms {ms:.4} ms a call, its TF32 product alone {product:.4}");
                }
            }
            other => eprintln!("unknown step '{other}' (module, tf32, f64, gram, queued)"),
        }
    }
}
