//! The GGUF loader on the fetched SmolLM2 asset, and against the independent numpy reference.

use super::*;

// ------------------------------------------------------------ the real SmolLM2 asset

/// The fetched SmolLM2 GGUF, or `None` (and a note) when it is not in the cache.
fn smollm2() -> Option<PathBuf> {
    let cache = crate::io::fetch::default_cache_dir();
    match crate::io::fetch::smollm2_gguf(&cache) {
        Ok(p) => Some(p),
        // scripts/test.sh (CI) fetches the asset and sets SAFETUNE_REQUIRE_ASSETS: there a
        // missing file fails the test instead of skipping it.
        Err(e) if std::env::var_os("SAFETUNE_REQUIRE_ASSETS").is_some() => {
            panic!("SmolLM2 GGUF not available ({e})")
        }
        Err(e) => {
            eprintln!("skipping: SmolLM2 GGUF not available ({e}); run `safetune fetch`");
            None
        }
    }
}

/// The loaded model continues "The capital of France is" with " Paris" (greedy).
#[test]
fn smollm2_says_paris() {
    let Some(path) = smollm2() else { return };
    let g = load_llama(&path, DType::F32, &Device::Cpu).unwrap();
    let tok = g.tokenizer.clone();
    let w = crate::io::weights::Weights::from_tensors(g.tensors, DType::F32, &Device::Cpu);
    let m = crate::model::llama::LlamaForCausalLM::from_weights(g.config, &w).unwrap();
    let ids = tok.encode("The capital of France is", false).unwrap();
    let logits = crate::model::generate::next_logits(&m, ids.get_ids()).unwrap();
    let best = (0..logits.len())
        .max_by(|&i, &j| logits[i].total_cmp(&logits[j]))
        .unwrap();
    assert_eq!(tok.decode(&[best as u32], false).unwrap(), " Paris");
    // The same with the projections kept in Q4_1: the same logits, bit for bit.
    let g = load_llama_opts(&path, DType::F32, &Device::Cpu, true).unwrap();
    let w = crate::io::weights::Weights::from_tensors(g.tensors, DType::F32, &Device::Cpu)
        .with_quantized(g.quantized);
    let q = crate::model::llama::LlamaForCausalLM::from_weights(g.config, &w).unwrap();
    assert_eq!(
        crate::model::generate::next_logits(&q, ids.get_ids()).unwrap(),
        logits
    );
}

#[test]
fn smollm2_tokenizer() {
    let Some(path) = smollm2() else { return };
    let (tok, template) = load_tokenizer(&path).unwrap();
    assert!(template.unwrap().contains("<|im_start|>"));
    assert_eq!(tok.get_vocab_size(true), 49152);
    let text = "The capital of France is";
    let enc = tok.encode(text, false).unwrap();
    eprintln!("{text:?} -> {:?} {:?}", enc.get_ids(), enc.get_tokens());
    assert_eq!(
        enc.get_tokens(),
        ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    );
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
    for (s, id) in [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)] {
        assert_eq!(tok.encode(s, false).unwrap().get_ids(), [id]);
    }
    let chat = "<|im_start|>user\nHi!<|im_end|>\n";
    let ids = tok.encode(chat, false).unwrap().get_ids().to_vec();
    assert_eq!((ids[0], ids[ids.len() - 2]), (1, 2));
    assert_eq!(tok.decode(&ids, false).unwrap(), chat);
    assert_eq!(tok.encode("12345", false).unwrap().len(), 5);
    for s in [
        "Größe und Maße",
        "東京は日本の首都です",
        "emoji 🙂🚀 done",
        "naïve café",
    ] {
        let ids = tok.encode(s, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), s);
    }
}

#[test]
fn smollm2_loads_and_truncated_copy_is_invalid() {
    let Some(path) = smollm2() else { return };
    let m = load_llama(&path, DType::F32, &Device::Cpu).unwrap();
    let c = &m.config;
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (576, 1536, 30)
    );
    assert_eq!(
        (c.num_attention_heads, c.kv_heads(), c.vocab_size),
        (9, 3, 49152)
    );
    assert_eq!((c.rms_norm_eps, c.rope_theta), (1e-5, 100000.0));
    assert_eq!((c.bos_token_id, c.eos_token_id.clone()), (Some(1), vec![2]));
    assert!(c.tie_word_embeddings);
    assert_eq!(m.tensors.len(), 2 + 9 * 30);

    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for n in [100_000, bytes.len() / 2, bytes.len() - 1] {
        let cut = tmp.path().join("SmolLM2-truncated.gguf");
        std::fs::write(&cut, &bytes[..n]).unwrap();
        let err = load_llama(&cut, DType::F32, &Device::Cpu).unwrap_err();
        assert!(matches!(err, IoError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("SmolLM2-truncated.gguf"), "{err}");
    }
}

/// For the opt-in tests: a missing asset is a failure, not a silent pass.
fn smollm2_required() -> PathBuf {
    smollm2().expect("these tests need the SmolLM2 asset (SAFETUNE_CACHE)")
}

fn reference(args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/llama_reference.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 with numpy");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every tensor of the Rust loader against the numpy reference's own parser, dequantizer and
/// un-permutation: checksums for all 272 tensors, element by element for the first and last
/// layers and the embedding.
#[test]
#[ignore = "needs the SmolLM2 asset and python3 + numpy (about a minute)"]
fn smollm2_dequant_matches_numpy_reference() {
    let path = smollm2_required();
    let m = load_llama(&path, DType::F32, &Device::Cpu).unwrap();
    let p = path.to_str().unwrap();
    let mut checked = 0;
    for line in reference(&[p, "--dump-dequant", "all"]).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let name = v["name"].as_str().unwrap();
        let x: Vec<f64> = m.tensors[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let sumsq: f64 = x.iter().map(|a| a * a).sum();
        let sum: f64 = x.iter().sum();
        let wsum: f64 = x
            .iter()
            .enumerate()
            .map(|(i, a)| a * ((i % 97) as f64 + 1.0))
            .sum();
        let scale = (sumsq * x.len() as f64).sqrt();
        for (key, mine) in [("sum", sum), ("sumsq", sumsq), ("wsum", wsum)] {
            let theirs = v[key].as_f64().unwrap();
            let tol = 1e-9 * scale.max(1.0) * if key == "wsum" { 97.0 } else { 1.0 };
            assert!(
                (mine - theirs).abs() <= tol,
                "{name} {key}: {mine} vs {theirs}"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, m.tensors.len());

    let tmp = tempfile::tempdir().unwrap();
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".into(),
    ];
    names.extend(
        m.tensors
            .keys()
            .filter(|n| n.starts_with("model.layers.0.") || n.starts_with("model.layers.29."))
            .cloned(),
    );
    let dir = tmp.path().to_str().unwrap();
    reference(&[
        p,
        "--dump-dequant",
        &names.join(","),
        "--npy-dir",
        dir,
        "--count",
        "0",
    ]);
    for name in &names {
        let theirs = Tensor::read_npy(tmp.path().join(format!("{name}.npy"))).unwrap();
        let d = max_diff(&m.tensors[name], &theirs);
        eprintln!("{name}: max |rust - numpy| = {d}");
        assert_eq!(d, 0.0, "{name}");
    }
}

/// The reference's dequantizers for the types this file lacks, against candle's: a GGUF of
/// one random tensor per ggml type, written by candle.
#[test]
#[ignore = "needs python3 + numpy"]
fn reference_dequantizes_every_type_like_candle() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("types.gguf");
    let mut rng = StdRng::seed_from_u64(5);
    let v: Vec<f32> = (0..4 * 512).map(|_| rng.random_range(-2.0..2.0)).collect();
    let src = Tensor::from_vec(v, (4, 512), &Device::Cpu).unwrap();
    let types = [
        ("f32", GgmlDType::F32),
        ("f16", GgmlDType::F16),
        ("bf16", GgmlDType::BF16),
        ("q4_0", GgmlDType::Q4_0),
        ("q4_1", GgmlDType::Q4_1),
        ("q5_0", GgmlDType::Q5_0),
        ("q5_1", GgmlDType::Q5_1),
        ("q8_0", GgmlDType::Q8_0),
        ("q4_k", GgmlDType::Q4K),
        ("q5_k", GgmlDType::Q5K),
        ("q6_k", GgmlDType::Q6K),
    ];
    let qs: Vec<(&str, QTensor)> = types
        .iter()
        .map(|(n, t)| (*n, QTensor::quantize(&src, *t).unwrap()))
        .collect();
    let refs: Vec<(&str, &QTensor)> = qs.iter().map(|(n, q)| (*n, q)).collect();
    gguf_file::write(&mut File::create(&path).unwrap(), &[], &refs).unwrap();
    let names: Vec<&str> = types.iter().map(|t| t.0).collect();
    let dir = tmp.path().to_str().unwrap();
    let p = path.to_str().unwrap();
    reference(&[p, "--dump-dequant", &names.join(","), "--npy-dir", dir]);
    for (name, q) in &qs {
        let ours = q.dequantize(&Device::Cpu).unwrap();
        let theirs = Tensor::read_npy(tmp.path().join(format!("{name}.npy"))).unwrap();
        let d = max_diff(&ours, &theirs);
        eprintln!(
            "{name}: max |candle - numpy| = {d}, quantization error {}",
            max_diff(&ours, &src)
        );
        assert_eq!(d, 0.0, "{name}");
    }
}

/// The ids of the prompt, and the reference's next token for them.
#[test]
#[ignore = "needs the SmolLM2 asset and python3 + numpy (about 20 s)"]
fn smollm2_reference_completes_the_capital_of_france() {
    let path = smollm2_required();
    let (tok, _) = load_tokenizer(&path).unwrap();
    let ids = tok
        .encode("The capital of France is", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let ids = ids
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let out = reference(&[path.to_str().unwrap(), "--ids", &ids, "--top", "5"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    eprintln!("ids {ids}: {}", v["top"]);
    let best = v["top"][0]["id"].as_u64().unwrap() as u32;
    assert_eq!(tok.id_to_token(best).as_deref(), Some("ĠParis"));
}

// ------------------------------------------------------------ the real Qwen2.5-Coder-0.5B asset

/// The fetched Qwen2.5-Coder-0.5B GGUF (`safetune fetch qwen2.5-coder-0.5b`), or `None` (and a
/// note) when it is not in the cache; required under `SAFETUNE_REQUIRE_ASSETS`.
fn qwen2() -> Option<PathBuf> {
    let cache = crate::io::fetch::default_cache_dir();
    fetched(
        crate::io::joined::qwen2_05b_gguf(&cache),
        "qwen2.5-coder-0.5b",
    )
}

/// The fetched Qwen2.5-Coder-1.5B GGUF, as [`qwen2`].
fn qwen2_15b() -> Option<PathBuf> {
    let cache = crate::io::fetch::default_cache_dir();
    fetched(
        crate::io::joined::qwen2_15b_gguf(&cache),
        "qwen2.5-coder-1.5b",
    )
}

fn fetched(path: PathBuf, name: &str) -> Option<PathBuf> {
    if path.is_file() {
        return Some(path);
    }
    let why = format!("{} is missing; run `safetune fetch {name}`", path.display());
    assert!(
        std::env::var_os("SAFETUNE_REQUIRE_ASSETS").is_none(),
        "{why}"
    );
    eprintln!("skipping: {why}");
    None
}

/// What scripts/qwen2_reference.py computed without safetune: token ids from transformers'
/// Qwen2Tokenizer, logits from a float64 numpy forward on gguf-dequantized weights.
#[derive(serde::Deserialize)]
struct QwenReference {
    texts: Vec<String>,
    ids: Vec<Vec<u32>>,
    prompt: String,
    prompt_ids: Vec<u32>,
    last_logits: ProbedLogits,
}

#[derive(serde::Deserialize)]
struct ProbedLogits {
    ids: Vec<usize>,
    values: Vec<f64>,
}

fn qwen_reference() -> QwenReference {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2/reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The tokenizer rebuilt from the GGUF metadata (pre-tokenizer `qwen2`: NFC, Qwen2's split
/// regex, byte-level BPE) gives transformers' ids for digits, code, whitespace, accents, CJK and
/// emoji, and the chat prompt's control tokens.
#[test]
fn qwen2_tokenizer_matches_transformers() {
    let Some(path) = qwen2() else { return };
    let reference = qwen_reference();
    let (tok, template) = load_tokenizer(&path).unwrap();
    assert!(template.unwrap().contains("<|im_start|>"));
    assert_eq!(tok.get_vocab_size(true), 151_936);
    for (text, want) in reference.texts.iter().zip(&reference.ids) {
        let ids = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(&ids, want, "{text:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), *text);
    }
    let ids = tok.encode(reference.prompt.as_str(), false).unwrap();
    assert_eq!(ids.get_ids(), reference.prompt_ids);
}

/// Qwen2 from GGUF (q/k/v biases, rows in HF order, Q5_0 / Q8_0 / Q6_K / Q4_K blocks dequantized
/// on load) gives the reference's logits after the chat prompt, and answers it: greedy decoding
/// says Paris. Kept quantized, the same logits bit for bit.
#[test]
fn qwen2_logits_match_reference_and_it_knows_paris() {
    let Some(path) = qwen2() else { return };
    let reference = qwen_reference();
    let (m, tok, tied) = qwen2_dequantized(&path, (24, 896, 2));
    assert!(!tied);
    let logits = crate::model::generate::next_logits(&m, &reference.prompt_ids).unwrap();
    let probe = &reference.last_logits;
    let scale = probe.values.iter().fold(0f64, |a, v| a.max(v.abs()));
    for (&id, &want) in probe.ids.iter().zip(&probe.values) {
        let got = logits[id] as f64;
        assert!(
            (got - want).abs() <= 2e-4 * scale,
            "logit of {id}: {got} vs reference {want}"
        );
    }
    let answer = greedy_answer(&m, &tok, &reference.prompt_ids, 16);
    assert!(answer.contains("Paris"), "{answer:?}");
    let g = load_llama_opts(&path, DType::F32, &Device::Cpu, true).unwrap();
    assert!(!g.quantized.is_empty());
    let w = crate::io::weights::Weights::from_tensors(g.tensors, DType::F32, &Device::Cpu)
        .with_quantized(g.quantized);
    let q = crate::model::llama::LlamaForCausalLM::from_weights(g.config, &w).unwrap();
    assert_eq!(
        crate::model::generate::next_logits(&q, &reference.prompt_ids).unwrap(),
        logits
    );
}

/// The 1.5B model (28 layers, hidden 1536, tied embeddings) from its own GGUF: the same tokenizer
/// as the 0.5B (transformers' ids for the chat prompt), and greedy decoding answers "Paris".
#[test]
fn qwen2_15b_knows_paris() {
    let Some(path) = qwen2_15b() else { return };
    let reference = qwen_reference();
    let (m, tok, _) = qwen2_dequantized(&path, (28, 1536, 2));
    let ids = tok.encode(reference.prompt.as_str(), false).unwrap();
    assert_eq!(ids.get_ids(), reference.prompt_ids);
    let answer = greedy_answer(&m, &tok, &reference.prompt_ids, 16);
    assert!(answer.contains("Paris"), "{answer:?}");
}

/// A Qwen2 GGUF dequantized to f32 on the CPU, its (layers, hidden, kv heads) checked: the model,
/// the tokenizer from its metadata, and whether it ties its embeddings.
fn qwen2_dequantized(
    path: &Path,
    want: (usize, usize, usize),
) -> (crate::model::llama::LlamaForCausalLM, Tokenizer, bool) {
    let g = load_llama(path, DType::F32, &Device::Cpu).unwrap();
    let c = &g.config;
    assert_eq!((c.num_hidden_layers, c.hidden_size, c.kv_heads()), want);
    let tied = c.tie_word_embeddings;
    let tok = g.tokenizer.clone();
    let w = crate::io::weights::Weights::from_tensors(g.tensors, DType::F32, &Device::Cpu);
    let m = crate::model::llama::LlamaForCausalLM::from_weights(g.config, &w).unwrap();
    (m, tok, tied)
}

/// Greedy decoding of at most `max_new` tokens after the chat prompt `prompt_ids`, stopped at
/// `<|im_end|>`, decoded without special tokens.
fn greedy_answer(
    model: &crate::model::llama::LlamaForCausalLM,
    tok: &Tokenizer,
    prompt_ids: &[u32],
    max_new: usize,
) -> String {
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    let greedy = crate::model::generate::Sampling {
        temperature: 0.0,
        top_k: 0,
    };
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let answer =
        crate::model::generate::generate(model, prompt_ids, max_new, &[im_end], greedy, &mut rng)
            .unwrap();
    tok.decode(&answer, true).unwrap()
}

/// SmolLM2's own chat template (from the GGUF's metadata) and byte-level tokenizer: the tokens a
/// chat record trains on are exactly the assistant answers with their `<|im_end|>\n`; the
/// system prompt the template adds, the user turns and the `<|im_start|>assistant\n` headers are
/// not targets.
#[test]
fn smollm2_chat_template_targets_only_the_assistant() {
    use crate::data::chat::{ChatTemplate, Message};
    use crate::data::lm::{encode_records, PromptFormat, Record, RecordEncoding, IGNORE};
    let Some(path) = smollm2() else { return };
    let (tok, template) = load_tokenizer(&path).unwrap();
    let t = ChatTemplate::new(template.unwrap(), String::new(), String::new(), &path).unwrap();
    let m = |role: &str, content: &str| Message {
        role: role.into(),
        content: content.into(),
    };
    let conv = vec![
        m("user", "What is the capital of France?"),
        m("assistant", "Paris."),
        m("user", "And of Italy?"),
        m("assistant", "Rome, since 1871."),
    ];
    let how = RecordEncoding {
        format: PromptFormat::Chatml,
        chat: Some(&t),
        max_len: 512,
        eos: None,
    };
    let seqs = encode_records(&tok, &[Record::Chat(conv)], &how, Path::new("d"), &path).unwrap();
    let s = &seqs[0];
    let counted: Vec<u32> = s
        .targets
        .iter()
        .filter(|&&t| t != IGNORE)
        .map(|&t| t as u32)
        .collect();
    let answers = tok.decode(&counted, false).unwrap();
    assert_eq!(answers, "Paris.<|im_end|>\nRome, since 1871.<|im_end|>\n");
    // The whole sequence is the template's text, system prompt included.
    let all = tok.decode(&s.ids, false).unwrap();
    assert!(
        all.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "{all}"
    );
}
