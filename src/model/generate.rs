//! Text generation from a causal LM: greedy or sampled (temperature, top-k), one token at a time.
//! The prompt runs once, filling a key/value cache; each new token then runs one position
//! (`CausalLm::next_logits_cached`). `next_logits` recomputes everything and is the reference.

use super::{CausalLm, LmBatch};
use crate::nn::attention::mask_to_additive;
use candle_core::{DType, Result, Tensor};
use rand::Rng;

#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    /// 0 = greedy (argmax).
    pub temperature: f64,
    /// Sample among the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
}

/// Next-token logits after `ids` (a single sequence), `[vocab]` f32, from a full forward of every
/// position (the training forward's inference mode; no cache).
pub fn next_logits(model: &impl CausalLm, ids: &[u32]) -> Result<Vec<f32>> {
    let dev = model.device();
    let n = ids.len();
    let mask = Tensor::ones((1, n), DType::U32, &dev)?;
    let b = LmBatch {
        input_ids: Tensor::from_slice(ids, (1, n), &dev)?,
        mask_add: mask_to_additive(&mask, DType::F32)?,
        targets: vec![-100; n],
        batch: 1,
        seq: n,
    };
    model.logits(&b)?.get(n - 1)?.to_vec1()
}

/// Picks a token from logits: argmax at temperature 0, else a draw from the tempered softmax
/// over the `top_k` best.
pub fn pick(logits: &[f32], s: Sampling, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        (0..logits.len())
            .max_by(|&i, &j| logits[i].total_cmp(&logits[j]))
            .unwrap_or(0) as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&i, &j| logits[j].total_cmp(&logits[i]));
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
    let max = logits[idx[0]] as f64;
    let w: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / s.temperature).exp())
        .collect();
    let mut u = rng.random::<f64>() * w.iter().sum::<f64>();
    for (k, &wk) in w.iter().enumerate() {
        u -= wk;
        if u <= 0.0 {
            return idx[k] as u32;
        }
    }
    idx[idx.len() - 1] as u32
}

/// Continues `prompt` by up to `max_new` tokens, stopping at `stop` tokens. Returns the new ids.
pub fn generate(
    model: &impl CausalLm,
    prompt: &[u32],
    max_new: usize,
    stop: &[u32],
    s: Sampling,
    rng: &mut impl Rng,
) -> Result<Vec<u32>> {
    let mut cache = Vec::new();
    let mut logits = model.next_logits_cached(prompt, &mut cache)?;
    let mut out = Vec::new();
    for _ in 0..max_new {
        let t = pick(&logits, s, rng);
        if stop.contains(&t) {
            break;
        }
        out.push(t);
        if out.len() < max_new {
            logits = model.next_logits_cached(&[t], &mut cache)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn greedy_is_argmax_and_sampling_respects_top_k() {
        let logits = [0.1f32, 3.0, -1.0, 2.9];
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let greedy = Sampling {
            temperature: 0.0,
            top_k: 0,
        };
        assert_eq!(pick(&logits, greedy, &mut rng), 1);
        let top2 = Sampling {
            temperature: 1.0,
            top_k: 2,
        };
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[pick(&logits, top2, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[2], 0, "only the two best can be drawn");
        // exp(3.0) : exp(2.9) = 1.105 : 1
        let ratio = seen[1] as f64 / seen[3] as f64;
        assert!((ratio - 1.105).abs() < 0.15, "ratio {ratio}");
    }
}
