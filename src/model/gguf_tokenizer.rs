//! The byte-level BPE tokenizer of a GGUF file (`tokenizer.ggml.*` metadata), rebuilt as a
//! Hugging Face tokenizer with the pre-tokenizer llama.cpp uses for the file's
//! `tokenizer.ggml.pre`.

use super::gguf::{invalid, Meta};
use crate::io::IoError;
use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, Tokenizer};

/// Qwen2's split regex (its tokenizer.json; llama.cpp's `LLAMA_VOCAB_PRE_TYPE_QWEN2`): like
/// GPT-2's, but case-insensitive contractions, letters with one leading non-letter, and every
/// digit on its own.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's split regex (`llama-bpe`): as Qwen2's, with numbers in groups of up to three digits.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Hugging Face pre-tokenizer that does what llama.cpp does for a GGUF's
/// `tokenizer.ggml.pre`; None for one we do not know.
fn pre_tokenizer(pre: &str) -> Option<PreTokenizerWrapper> {
    let split_then_bytes = |regex: &str| -> Option<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(regex.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .ok()?;
        Some(
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into(),
        )
    };
    let byte_level = ByteLevel::new(false, true, true);
    match pre {
        // llama.cpp (llama-vocab.cpp) splits these with "\p{N}" before the GPT-2 regex, i.e.
        // every digit is its own word.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            Some(Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into())
        }
        // The GPT-2 regex alone.
        "gpt2" | "mpt" | "olmo" | "jais" => Some(byte_level.into()),
        "qwen2" => split_then_bytes(QWEN2_SPLIT),
        "llama-bpe" | "llama3" => split_then_bytes(LLAMA3_SPLIT),
        _ => None,
    }
}

/// The byte-level BPE tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata, rebuilt as
/// a Hugging Face tokenizer: vocab and merges as stored, the pre-tokenizer that llama.cpp uses
/// for `tokenizer.ggml.pre`, control tokens (type 3) as special tokens.
pub(crate) fn tokenizer_from_metadata(meta: &Meta) -> Result<Tokenizer, IoError> {
    let path = meta.path;
    let model = meta.str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(invalid(
            path,
            format!("tokenizer model '{model}' is not supported (only 'gpt2', byte-level BPE)"),
        ));
    }
    let pre = meta.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let pre_tokenizer = pre_tokenizer(pre).ok_or_else(|| {
        invalid(
            path,
            format!("tokenizer pre-tokenizer '{pre}' is not supported"),
        )
    })?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types = match meta.md.get("tokenizer.ggml.token_type") {
        Some(_) => meta.ints("tokenizer.ggml.token_type")?,
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(invalid(
            path,
            format!("{} token types for {} tokens", types.len(), tokens.len()),
        ));
    }
    let merges = meta
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| invalid(path, format!("tokenizer merge '{m}' is not 'A B'")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| invalid(path, format!("tokenizer cannot be built ({e})")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    if pre == "qwen2" {
        // Qwen2's tokenizer.json normalizes to NFC before splitting.
        tokenizer.with_normalizer(Some(NFC));
    }
    tokenizer
        .with_pre_tokenizer(Some(pre_tokenizer))
        .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    // 3 = control (<|im_start|>, <|endoftext|>): special, never split. 4 = user-defined: matched
    // whole before BPE, as llama.cpp does, but kept in decoded text.
    let added = |kind: i64, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == kind)
            .map(|(tok, _)| AddedToken::from(tok.to_string(), special))
            .collect()
    };
    tokenizer.add_special_tokens(&added(3, true));
    tokenizer.add_tokens(&added(4, false));
    // llama.cpp prepends BOS when the file asks for it; so does `encode(text, true)` then.
    if let (Some(Value::Bool(true)), Some(bos)) = (
        meta.md.get("tokenizer.ggml.add_bos_token"),
        meta.opt_usize("tokenizer.ggml.bos_token_id")?,
    ) {
        let name = tokens
            .get(bos)
            .ok_or_else(|| invalid(path, format!("bos_token_id {bos} is not in the vocab")))?;
        let template = TemplateProcessing::builder()
            .try_single(format!("{name} $A"))
            .and_then(|b| b.try_pair(format!("{name} $A {name} $B")))
            .map_err(|e| invalid(path, format!("BOS template: {e}")))?
            .special_tokens(vec![(name.to_string(), bos as u32)])
            .build()
            .map_err(|e| invalid(path, format!("BOS template: {e}")))?;
        tokenizer.with_post_processor(Some(template));
    }
    Ok(tokenizer)
}
