//! Any supported causal-LM architecture behind one type, so the trainer and the CLI hold a
//! decoder without knowing which it is.

use super::gpt2::Gpt2LMHeadModel;
use super::llama::LlamaForCausalLM;
use super::memory::{LayerMemory, StepMemory};
use super::{AdapterGrads, CausalLm, LmBatch, MonitoredLayer};
use crate::adapters::block::linear_names;
use crate::adapters::{Adapted, AdapterId, HeadParam, LoraAdapter, LoraConfig};
use crate::nn::attention::KvCache;
use crate::nn::linear::QuantFormat;
use crate::nn::loss::LmLoss;
use crate::nn::Pass;
use crate::safe::MonitorPoint;
use candle_core::{Device, Result, Tensor};
use std::path::Path;

#[derive(Clone, Debug)]
pub enum Decoder {
    Llama(LlamaForCausalLM),
    Gpt2(Gpt2LMHeadModel),
}

/// Runs `$e` on the inner model, whichever it is.
macro_rules! each {
    ($self:expr, $m:ident => $e:expr) => {
        match $self {
            Decoder::Llama($m) => $e,
            Decoder::Gpt2($m) => $e,
        }
    };
}

/// The `model_type` a Hugging Face folder's `config.json` declares (None when the file is
/// missing, unreadable or has none).
pub fn hf_model_type(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("model_type")?.as_str().map(str::to_string)
}

impl Decoder {
    /// The architecture's name, as Hugging Face's `model_type`.
    pub fn model_type(&self) -> &'static str {
        match self {
            Decoder::Llama(_) => "llama",
            Decoder::Gpt2(_) => "gpt2",
        }
    }

    /// Names of the linears a LoRA `target_modules` entry can match, for error messages.
    pub fn linear_names(&self) -> Vec<&'static str> {
        match self {
            Decoder::Llama(m) => linear_names(&m.layers[0]),
            Decoder::Gpt2(m) => linear_names(&m.layers[0]),
        }
    }

    /// The longest sequence the model takes: the rows of its position table (GPT-2's
    /// `n_positions`) or of its rotary tables (LLaMA's `max_position_embeddings`).
    pub fn max_positions(&self) -> usize {
        match self {
            Decoder::Llama(m) => m.config.max_position_embeddings,
            Decoder::Gpt2(m) => m.config.n_positions,
        }
    }

    /// The end-of-sequence tokens its config names (Llama 3 instruct lists several).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        match self {
            Decoder::Llama(m) => m.config.eos_token_id.clone(),
            Decoder::Gpt2(m) => m.config.eos_token_id.into_iter().collect(),
        }
    }

    /// Loads a Hugging Face folder whose `config.json` says `"model_type": "gpt2"` as GPT-2, any
    /// other as a LLaMA-layout decoder.
    pub fn load_hf(
        dir: &Path,
        dtype: candle_core::DType,
        device: &Device,
    ) -> std::result::Result<Self, crate::io::IoError> {
        Self::load_hf_quantized(dir, dtype, device, None)
    }

    /// [`Decoder::load_hf`], with the frozen projection weights quantized into `quantize` as they
    /// load (LLaMA layout only).
    pub fn load_hf_quantized(
        dir: &Path,
        dtype: candle_core::DType,
        device: &Device,
        quantize: Option<QuantFormat>,
    ) -> std::result::Result<Self, crate::io::IoError> {
        Ok(match hf_model_type(dir).as_deref() {
            Some("gpt2") if quantize.is_some() => {
                return Err(crate::io::IoError::Invalid {
                    path: dir.join("config.json"),
                    message: "a quantized base is supported for LLaMA-layout models, not GPT-2"
                        .into(),
                })
            }
            Some("gpt2") => Decoder::Gpt2(Gpt2LMHeadModel::load_hf(dir, dtype, device)?),
            _ => Decoder::Llama(LlamaForCausalLM::load_hf_quantized(
                dir, dtype, device, quantize,
            )?),
        })
    }
}

impl From<LlamaForCausalLM> for Decoder {
    fn from(m: LlamaForCausalLM) -> Self {
        Decoder::Llama(m)
    }
}

impl From<Gpt2LMHeadModel> for Decoder {
    fn from(m: Gpt2LMHeadModel) -> Self {
        Decoder::Gpt2(m)
    }
}

impl Adapted for Decoder {
    fn adapter_layers(&self) -> Vec<usize> {
        each!(self, m => m.adapter_layers())
    }

    fn adapters(&self) -> Vec<(String, &LoraAdapter)> {
        each!(self, m => m.adapters())
    }

    fn adapter_ids(&self) -> Vec<AdapterId> {
        each!(self, m => m.adapter_ids())
    }

    fn adapter_by_id_mut(&mut self, id: AdapterId) -> Option<&mut LoraAdapter> {
        each!(self, m => m.adapter_by_id_mut(id))
    }

    fn module_path(&self, id: AdapterId) -> Option<String> {
        each!(self, m => m.module_path(id))
    }

    fn module_id(&self, path: &str) -> Option<AdapterId> {
        each!(self, m => m.module_id(path))
    }

    fn lowest_trainable_layer(&self) -> Option<usize> {
        each!(self, m => Adapted::lowest_trainable_layer(m))
    }

    fn num_layers(&self) -> usize {
        each!(self, m => Adapted::num_layers(m))
    }

    fn peft_task_type(&self) -> Option<&'static str> {
        each!(self, m => m.peft_task_type())
    }

    fn peft_fan_in_fan_out(&self) -> bool {
        each!(self, m => m.peft_fan_in_fan_out())
    }

    fn head_params(&self) -> Vec<(HeadParam, Tensor)> {
        each!(self, m => m.head_params())
    }

    fn head_param_mut(&mut self, key: HeadParam) -> Option<&mut Tensor> {
        each!(self, m => m.head_param_mut(key))
    }
}

impl StepMemory for Decoder {
    fn layer_memory(&self, layer: usize, rows: usize, seq: usize) -> LayerMemory {
        each!(self, m => StepMemory::layer_memory(m, layer, rows, seq))
    }

    fn hidden_size(&self) -> usize {
        each!(self, m => m.hidden_size())
    }

    fn hidden_bytes(&self, rows: usize, seq: usize) -> usize {
        each!(self, m => m.hidden_bytes(rows, seq))
    }

    fn head_bytes(&self, rows: usize, seq: usize) -> usize {
        each!(self, m => m.head_bytes(rows, seq))
    }
}

impl CausalLm for Decoder {
    fn device(&self) -> Device {
        each!(self, m => CausalLm::device(m))
    }

    fn add_lora(
        &mut self,
        cfg: &LoraConfig,
        layers: Option<&[usize]>,
        rng: &mut rand::rngs::StdRng,
    ) -> Result<usize> {
        each!(self, m => CausalLm::add_lora(m, cfg, layers, rng))
    }

    fn loss_and_grads(
        &self,
        b: &LmBatch,
        pass: &mut Pass,
        loss_scale: f64,
        recompute: &super::stack::Recompute,
        bottom: Option<Tensor>,
    ) -> Result<(LmLoss, AdapterGrads)> {
        each!(self, m => m.loss_and_grads(b, pass, loss_scale, recompute, bottom))
    }

    fn hidden_layout(&self) -> (usize, candle_core::DType) {
        each!(self, m => m.hidden_layout())
    }

    fn hidden_between(&self, b: &LmBatch, h: Tensor, from: usize, to: usize) -> Result<Tensor> {
        each!(self, m => m.hidden_between(b, h, from, to))
    }

    fn loss(&self, b: &LmBatch) -> Result<LmLoss> {
        each!(self, m => m.loss(b))
    }

    fn logits(&self, b: &LmBatch) -> Result<Tensor> {
        each!(self, m => CausalLm::logits(m, b))
    }

    fn next_logits_cached(&self, new_ids: &[u32], cache: &mut Vec<KvCache>) -> Result<Vec<f32>> {
        each!(self, m => m.next_logits_cached(new_ids, cache))
    }

    fn hidden_before(&self, b: &LmBatch, layer: usize) -> Result<Tensor> {
        each!(self, m => m.hidden_before(b, layer))
    }

    fn monitor_layer(
        &self,
        layer: usize,
        b: &LmBatch,
        h: &Tensor,
        point: MonitorPoint,
    ) -> Result<MonitoredLayer> {
        each!(self, m => m.monitor_layer(layer, b, h, point))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Gpt2Config, LlamaConfig};
    use crate::nn::gradcheck::max_abs_diff;
    use candle_core::DType;
    use rand::SeedableRng;
    use std::path::Path;

    fn gpt2() -> Decoder {
        let cfg: Gpt2Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 20, "n_positions": 8, "n_embd": 8, "n_layer": 2, "n_head": 2
        }))
        .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        Gpt2LMHeadModel::random(cfg, DType::F32, &Device::Cpu, &mut rng)
            .unwrap()
            .into()
    }

    fn llama() -> Decoder {
        let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 20, "hidden_size": 8, "intermediate_size": 12,
            "num_hidden_layers": 2, "num_attention_heads": 2
        }))
        .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        LlamaForCausalLM::random(cfg, DType::F32, &Device::Cpu, &mut rng)
            .unwrap()
            .into()
    }

    /// The enum passes every call through: module names, PEFT flags, adapters by path.
    #[test]
    fn delegates_to_the_architecture() {
        let lora = |t: &str| LoraConfig {
            r: 2,
            target_modules: vec![t.into()],
            ..Default::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let mut g = gpt2();
        assert_eq!(g.linear_names(), ["c_attn", "c_proj", "c_fc"]);
        assert_eq!(
            CausalLm::add_lora(&mut g, &lora("c_proj"), None, &mut rng).unwrap(),
            4
        );
        assert!(g.peft_fan_in_fan_out());
        assert_eq!(g.adapter_layers(), [0, 0, 1, 1]);
        let paths: Vec<String> = g.adapters().into_iter().map(|(p, _)| p).collect();
        assert_eq!(paths[1], "transformer.h.0.mlp.c_proj");
        assert!(g
            .adapter_by_path_mut("transformer.h.1.attn.c_proj")
            .is_some());
        assert!(g
            .adapter_by_path_mut("transformer.h.1.attn.c_attn")
            .is_none());

        let mut l = llama();
        assert_eq!(l.model_type(), "llama");
        assert!(l.linear_names().contains(&"q_proj"));
        assert_eq!(
            CausalLm::add_lora(&mut l, &lora("q_proj"), None, &mut rng).unwrap(),
            2
        );
        assert!(!l.peft_fan_in_fan_out());
        assert_eq!(l.num_layers(), 2);
    }

    /// SAFE's monitoring, one layer at a time: a layer's monitored output is the next layer's
    /// input as the plain forward computes it. At the block, `X` is the block's output, `Y` the
    /// same block without the adapter; an adapter whose `B` is still zero changes nothing
    /// (`X == Y`), one with a nonzero `B` does. At the linear, one row set per adapter too.
    #[test]
    fn block_monitoring_removes_one_adapter() {
        let lora = |t: &str| LoraConfig {
            r: 2,
            target_modules: vec![t.into()],
            ..Default::default()
        };
        let batch = LmBatch {
            input_ids: Tensor::new(&[[1u32, 5, 7, 2]], &Device::Cpu).unwrap(),
            mask_add: Tensor::zeros((1, 1, 1, 4), DType::F32, &Device::Cpu).unwrap(),
            targets: vec![5, 7, 2, -100],
            batch: 1,
            seq: 4,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for (mut m, target, hidden) in [(llama(), "v_proj", 8), (gpt2(), "c_fc", 8)] {
            CausalLm::add_lora(&mut m, &lora(target), None, &mut rng).unwrap();
            let paths: Vec<String> = m.adapters().into_iter().map(|(p, _)| p).collect();
            let a = m.adapter_by_path_mut(&paths[1]).unwrap();
            a.b = Tensor::ones(a.b.shape(), DType::F32, &Device::Cpu).unwrap();
            for (layer, expected_path) in paths.iter().enumerate() {
                let h = m.hidden_before(&batch, layer).unwrap();
                let (out, rows) = m
                    .monitor_layer(layer, &batch, &h, MonitorPoint::Block)
                    .unwrap();
                let next = m.hidden_before(&batch, layer + 1).unwrap();
                assert_eq!(max_abs_diff(&out, &next), 0.0, "{target} layer {layer}");
                assert_eq!(rows.len(), 1, "{target}");
                let (path, r) = &rows[0];
                assert_eq!(path, expected_path);
                let (x, y) = r.x_y().unwrap();
                let (x, y) = (&x, &y);
                assert_eq!(x.dims(), [4, hidden]);
                let d = max_abs_diff(x, y);
                if layer == 0 {
                    assert_eq!(d, 0.0, "{path}: a zero B changes nothing");
                } else {
                    assert!(d > 1e-3, "{path}: {d}");
                }
                let (_, linear) = m
                    .monitor_layer(layer, &batch, &h, MonitorPoint::Linear)
                    .unwrap();
                assert_eq!(linear.len(), 1);
                assert_eq!(&linear[0].0, expected_path);
            }
        }
    }

    /// Generation's cache: the prompt in one call, then one token per call, gives the logits of
    /// a full forward of the whole prefix at every step, adapters included (LLaMA with grouped
    /// kv heads and rope, GPT-2 with learned positions); past GPT-2's positions it errors.
    #[test]
    fn cached_logits_match_a_full_forward_at_every_step() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 20, "hidden_size": 8, "intermediate_size": 12,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1
        }))
        .unwrap();
        let gqa: Decoder = LlamaForCausalLM::random(cfg, DType::F32, &Device::Cpu, &mut rng)
            .unwrap()
            .into();
        for (mut m, target) in [(gqa, "v_proj"), (gpt2(), "c_attn")] {
            let lora = LoraConfig {
                r: 2,
                target_modules: vec![target.into()],
                ..Default::default()
            };
            CausalLm::add_lora(&mut m, &lora, None, &mut rng).unwrap();
            let paths: Vec<String> = m.adapters().into_iter().map(|(p, _)| p).collect();
            for p in &paths {
                let a = m.adapter_by_path_mut(p).unwrap();
                a.b = crate::nn::gradcheck::randn(a.b.dims(), 5)
                    .to_dtype(DType::F32)
                    .unwrap();
            }
            let ids = [3u32, 1, 4, 1, 5, 9, 2, 6];
            let mut cache = Vec::new();
            for n in 3..=ids.len() {
                let new = if n == 3 { &ids[..3] } else { &ids[n - 1..n] };
                let got = m.next_logits_cached(new, &mut cache).unwrap();
                let want = crate::model::generate::next_logits(&m, &ids[..n]).unwrap();
                let diff = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(diff < 1e-5, "{target}, {n} tokens: {diff}");
            }
            let past_the_end = m.next_logits_cached(&[7], &mut cache);
            assert_eq!(
                past_the_end.is_err(),
                target == "c_attn",
                "n_positions is 8"
            );
        }
    }

    /// A folder's `config.json` decides the architecture.
    #[test]
    fn hf_folders_load_by_model_type() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(hf_model_type(dir.path()), None);
        std::fs::write(dir.path().join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
        assert_eq!(hf_model_type(dir.path()).as_deref(), Some("gpt2"));
        // Detected as GPT-2, so the GPT-2 config rules report the missing fields.
        let e = Decoder::load_hf(dir.path(), DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a GPT-2 config"), "{e}");
    }

    /// A `tests/fixtures/hf` folder's reference input as a batch (its mask in `dtype`), and the
    /// float64 logits transformers computed for it.
    fn fixture_reference(dir: &Path, dtype: DType) -> (LmBatch, Tensor) {
        let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
            .unwrap();
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let (batch, seq) = ids.dims2().unwrap();
        let b = LmBatch {
            input_ids: ids,
            mask_add: Tensor::zeros((batch, 1, 1, seq), dtype, &Device::Cpu).unwrap(),
            targets: vec![-100; batch * seq],
            batch,
            seq,
        };
        (b, r["logits"].clone())
    }

    /// Checkpoints written by transformers 5.17 itself (`scripts/hf_fixtures.py`), with the
    /// float64 logits transformers computed from the same weights: sharded with an index
    /// (LLaMA, Qwen2, GPT-2), Llama 3.1's rope scaling with an explicit `head_dim` and a list of
    /// EOS ids, linear rope scaling with tied embeddings, Qwen2's q/k/v biases. Our float64 logits
    /// must match to rounding (the rope tables are f32 in both).
    #[test]
    fn transformers_checkpoints_give_transformers_logits() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
        for (name, arch) in [
            ("llama3-sharded", "llama"),
            ("llama2-linear", "llama"),
            ("qwen2-sharded", "llama"),
            ("gpt2-sharded", "gpt2"),
        ] {
            let dir = root.join(name);
            let m = Decoder::load_hf(&dir, DType::F64, &Device::Cpu)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(m.model_type(), arch, "{name}");
            let (b, want) = fixture_reference(&dir, DType::F64);
            let got = m.logits(&b).unwrap().reshape(want.shape()).unwrap();
            let err = max_abs_diff(&got.to_dtype(DType::F64).unwrap(), &want);
            let scale: f64 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(
                scale > 1.0,
                "{name}: logits of scale {scale} test too little"
            );
            assert!(
                err < 1e-5 * scale,
                "{name}: max |diff| {err}, logits up to {scale}"
            );
        }
        let l3 = Decoder::load_hf(&root.join("llama3-sharded"), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(l3.eos_token_ids(), vec![2, 3]);
    }

    /// Loading refuses what it cannot compute faithfully, naming the file and the setting.
    #[test]
    fn unsupported_llama_settings_are_named() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama2-linear");
        let base: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("config.json")).unwrap())
                .unwrap();
        let cases: [(&str, serde_json::Value, &str); 4] = [
            (
                "rope_parameters",
                serde_json::json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
                "rope scaling 'yarn' is not supported",
            ),
            (
                "model_type",
                serde_json::json!("gemma"),
                "model_type 'gemma'",
            ),
            (
                "sliding_window",
                serde_json::json!(16),
                "sliding-window attention",
            ),
            (
                "num_key_value_heads",
                serde_json::json!(3),
                "multiple of num_key_value_heads",
            ),
        ];
        for (key, value, expected) in cases {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = base.clone();
            cfg[key] = value;
            let path = dir.path().join("config.json");
            std::fs::write(&path, cfg.to_string()).unwrap();
            let e = LlamaConfig::from_file(&path).unwrap_err().to_string();
            assert!(
                e.contains(expected) && e.contains("config.json"),
                "{key}: {e}"
            );
        }
    }

    /// transformers 4's form of the same settings (`rope_theta` at the top, `rope_scaling` tagged
    /// `type` or `rope_type`) reads into the same config as transformers 5's `rope_parameters`.
    #[test]
    fn transformers_4_and_5_rope_configs_agree() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
        for (name, tag) in [("llama3-sharded", "rope_type"), ("llama2-linear", "type")] {
            let v5 = LlamaConfig::from_file(&root.join(name).join("config.json")).unwrap();
            assert!(v5.rope_scaling.is_some(), "{name}");
            let mut v: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(root.join(name).join("config.json")).unwrap(),
            )
            .unwrap();
            let mut params = v
                .as_object_mut()
                .unwrap()
                .remove("rope_parameters")
                .unwrap();
            let p = params.as_object_mut().unwrap();
            v["rope_theta"] = p.remove("rope_theta").unwrap();
            let kind = p.remove("rope_type").unwrap();
            p.insert(tag.into(), kind);
            v["rope_scaling"] = params;
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
            let v4 = LlamaConfig::from_file(&dir.path().join("config.json")).unwrap();
            assert_eq!(v4, v5, "{name}");
        }
    }

    /// A shard the index names but the folder lacks is reported by its path.
    #[test]
    fn missing_shard_is_named() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/qwen2-sharded");
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "config.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
        ] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        let e = Decoder::load_hf(dir.path(), DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model-00002-of-00002.safetensors") && e.contains("not found"),
            "{e}"
        );
    }

    /// A safetensors base quantized as it loads computes exactly what the dense model computes
    /// with the same quantized-then-dequantized projection weights, stays near transformers'
    /// logits (nearer in 8 bits than in 4), and refuses a width that is no whole number of
    /// blocks.
    #[test]
    fn safetensors_base_quantizes_on_load() {
        use crate::nn::linear::Weight;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
        let dir = root.join("llama2-linear");
        let (b, want) = fixture_reference(&dir, DType::F32);
        let want = want.to_dtype(DType::F32).unwrap();
        let load = |q| LlamaForCausalLM::load_hf_quantized(&dir, DType::F32, &Device::Cpu, q);
        let mut errs = Vec::new();
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_1] {
            let q = load(Some(format)).unwrap();
            let mut dense = load(None).unwrap();
            let mut n = 0;
            for (lq, ld) in q.layers.iter().zip(dense.layers.iter_mut()) {
                for (a, d) in lq.linears.iter().zip(ld.linears.iter_mut()) {
                    let Weight::Quantized { q, .. } = &a.base.weight else {
                        panic!("{format:?}: a projection stayed dense");
                    };
                    assert_eq!(q.dtype(), format.ggml());
                    d.base.weight = Weight::Dense(a.base.weight.dense().unwrap().into_owned());
                    n += 1;
                }
            }
            assert_eq!(n, 7 * 2);
            let lq = CausalLm::logits(&q, &b).unwrap();
            let ld = CausalLm::logits(&dense, &b).unwrap();
            assert_eq!(max_abs_diff(&lq, &ld), 0.0, "{format:?}");
            let err = max_abs_diff(&lq.reshape(want.shape()).unwrap(), &want);
            errs.push(err);
        }
        // Near transformers' float logits (|logits| up to 3.9), 8-bit much nearer than 4-bit.
        let (q8, q4) = (errs[0], errs[1]);
        assert!(
            q8 < 0.4 && q8 < q4 / 4.0,
            "max |diff|: Q8_0 {q8}, Q4_1 {q4}"
        );
        // hidden 48: rows of 48 values are not whole 32-value blocks.
        let e = LlamaForCausalLM::load_hf_quantized(
            &root.join("llama3-sharded"),
            DType::F32,
            &Device::Cpu,
            Some(QuantFormat::Q8_0),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("self_attn.q_proj.weight") && e.contains("32-value blocks"),
            "{e}"
        );
        let e = Decoder::load_hf_quantized(
            &root.join("gpt2-sharded"),
            DType::F32,
            &Device::Cpu,
            Some(QuantFormat::Q8_0),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not GPT-2"), "{e}");
    }
}
