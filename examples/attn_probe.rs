//! Times one attention layer's forward and backward on the CPU (f32, training, no dropout).
//!
//! `cargo run --release --example attn_probe [batch seq heads head_dim causal(0|1)]`; the
//! default is MiniLM's training shape, 16 x 128 tokens, 12 heads of 32, bidirectional.
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use safetune::nn::attention::{Attention, AttnShape};
use safetune::nn::{Dropout, Pass};
use std::time::Instant;

fn main() {
    // As the `safetune` binary does: freed buffers stay in the heap, candle's workers spin less.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "2000");
    }
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("arguments are numbers"))
        .collect();
    let (b, t, h, d, causal) = match args.as_slice() {
        [b, t, h, d, c] => (*b, *t, *h, *d, *c == 1),
        _ => (16, 128, 12, 32, false),
    };
    let dev = Device::Cpu;
    let x = |s: f64| (Tensor::randn(0f32, 1., (b * t, h * d), &dev).unwrap() * s).unwrap();
    let (q, k, v, dy) = (x(1.0), x(1.0), x(1.0), x(0.1));
    let mask = Tensor::zeros((b, 1, 1, t), candle_core::DType::F32, &dev).unwrap();
    let attn = Attention {
        num_heads: h,
        num_kv_heads: h,
        causal,
        dropout: Dropout::new(0.0),
    };
    let shape = AttnShape { batch: b, seq: t };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let (mut fwd, mut bwd) = (vec![], vec![]);
    for _ in 0..12 {
        let mut pass = Pass::training(&mut rng);
        let start = Instant::now();
        let (_, saved) = attn
            .forward((&q, &k, &v), &mask, shape, None, &mut pass, true)
            .unwrap();
        fwd.push(start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        saved.unwrap().backward(&attn, &dy).unwrap();
        bwd.push(start.elapsed().as_secs_f64() * 1e3);
    }
    fwd.sort_by(f64::total_cmp);
    bwd.sort_by(f64::total_cmp);
    println!(
        "forward {:.2} ms, backward {:.2} ms (median of 12)",
        fwd[6], bwd[6]
    );
}
