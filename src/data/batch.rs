//! Tokenization (Hugging Face `tokenizers`) and batching with dynamic padding.
//!
//! Every example is tokenized once, truncated to `max_length` (longest-first for pairs), unpadded;
//! a batch is padded to its own longest sequence, so short batches cost less.

use super::{DataError, Example, Label};
use std::path::{Path, PathBuf};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// Token ids of one example, ready to batch.
#[derive(Clone, Debug)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub label: Label,
}

pub struct TextEncoder {
    tokenizer: Tokenizer,
    path: PathBuf,
}

impl TextEncoder {
    /// The tokenizer of a BERT model folder: its `tokenizer.json`, or else one built from its
    /// `vocab.txt` (see [`wordpiece_from_vocab`]), as transformers' `BertTokenizerFast` builds it
    /// for checkpoints saved before fast tokenizers existed.
    pub fn from_model_dir(dir: &Path, max_length: usize) -> Result<Self, DataError> {
        let json = dir.join("tokenizer.json");
        let vocab = dir.join("vocab.txt");
        if json.exists() || !vocab.exists() {
            return Self::from_file(&json, max_length);
        }
        Self::new(wordpiece_from_vocab(dir)?, &vocab, max_length)
    }

    /// Loads `tokenizer.json`, truncating to `max_length` tokens and never padding (the batcher pads).
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self, DataError> {
        if !path.exists() {
            let msg = "tokenizer.json not found (nor a vocab.txt beside it)";
            return Err(DataError::format(path, msg));
        }
        let tokenizer = Tokenizer::from_file(path).map_err(|e| DataError::Format {
            path: path.into(),
            msg: format!("not a Hugging Face tokenizer file ({e})"),
        })?;
        Self::new(tokenizer, path, max_length)
    }

    fn new(mut tokenizer: Tokenizer, path: &Path, max_length: usize) -> Result<Self, DataError> {
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| DataError::Format {
                path: path.into(),
                msg: format!("cannot truncate to {max_length} tokens ({e})"),
            })?;
        Ok(Self {
            tokenizer,
            path: path.into(),
        })
    }

    /// Tokenizes all examples (in parallel inside `tokenizers`), keeping their order.
    pub fn encode_all(&self, examples: &[Example]) -> Result<Vec<Encoded>, DataError> {
        let inputs: Vec<tokenizers::EncodeInput> = examples
            .iter()
            .map(|e| match &e.text_b {
                Some(b) => (e.text_a.as_str(), b.as_str()).into(),
                None => e.text_a.as_str().into(),
            })
            .collect();
        let encodings =
            self.tokenizer
                .encode_batch(inputs, true)
                .map_err(|e| DataError::Format {
                    path: self.path.clone(),
                    msg: format!("tokenization failed ({e})"),
                })?;
        Ok(encodings
            .into_iter()
            .zip(examples)
            .map(|(enc, ex)| Encoded {
                ids: enc.get_ids().to_vec(),
                type_ids: enc.get_type_ids().to_vec(),
                label: ex.label.clone(),
            })
            .collect())
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// BERT's WordPiece tokenizer from a model folder's `vocab.txt` (one token per line, the line
/// number its id): BERT's normalizer (lower-casing, and so accent stripping, as
/// `tokenizer_config.json`'s `do_lower_case` says, default true), pre-tokenizer, `##` word pieces
/// and `[CLS] A [SEP] B [SEP]` framing, with BERT's five special tokens kept whole.
pub fn wordpiece_from_vocab(dir: &Path) -> Result<Tokenizer, DataError> {
    use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::bert::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::processors::bert::BertProcessing;
    use tokenizers::{AddedToken, Model};
    let vocab = dir.join("vocab.txt");
    let config = dir.join("tokenizer_config.json");
    let lowercase = match std::fs::read(&config) {
        Ok(bytes) => {
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| DataError::format(&config, format!("not valid JSON ({e})")))?;
            v.get("do_lower_case")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(true)
        }
        Err(_) => true,
    };
    let bad = |msg: String| DataError::format(&vocab, msg);
    let path = vocab
        .to_str()
        .ok_or_else(|| bad("path is not UTF-8".into()))?;
    let model = WordPiece::from_file(path)
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| bad(format!("not a WordPiece vocabulary ({e})")))?;
    let ids = model.get_vocab();
    let id = |t: &str| {
        ids.get(t).copied().ok_or_else(|| {
            bad(format!(
                "has no {t} token (a BERT vocabulary has [CLS], [SEP], [UNK])"
            ))
        })
    };
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    id("[UNK]")?;
    let special: Vec<AddedToken> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .filter(|t| ids.contains_key(**t))
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), sep),
        ("[CLS]".into(), cls),
    )));
    tok.with_decoder(Some(WordPieceDecoder::default()));
    tok.add_special_tokens(&special);
    Ok(tok)
}

/// A padded batch on the host: row-major `[batch, seq]` ids, token types and 0/1 mask.
#[derive(Clone, Debug)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub token_type_ids: Vec<u32>,
    pub attention_mask: Vec<u32>,
    pub batch: usize,
    pub seq: usize,
    pub labels: Vec<Label>,
}

/// Pads `items` to the longest of them with `pad_id`.
pub fn collate(items: &[&Encoded], pad_id: u32) -> Batch {
    let rows: Vec<(&[u32], &[u32])> = items
        .iter()
        .map(|e| (&e.ids[..], &e.type_ids[..]))
        .collect();
    let mut b = pad_rows(&rows, pad_id);
    b.labels = items.iter().map(|e| e.label.clone()).collect();
    b
}

/// Pads rows of `(ids, token type ids)` to the longest with `pad_id`; no labels.
pub fn pad_rows(rows: &[(&[u32], &[u32])], pad_id: u32) -> Batch {
    let seq = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
    let batch = rows.len();
    let mut b = Batch {
        input_ids: vec![pad_id; batch * seq],
        token_type_ids: vec![0; batch * seq],
        attention_mask: vec![0; batch * seq],
        batch,
        seq,
        labels: Vec::new(),
    };
    for (i, (ids, types)) in rows.iter().enumerate() {
        let row = i * seq;
        b.input_ids[row..row + ids.len()].copy_from_slice(ids);
        b.token_type_ids[row..row + ids.len()].copy_from_slice(types);
        b.attention_mask[row..row + ids.len()].fill(1);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder with only `vocab.txt` (MiniLM's vocabulary, written from the repository's
    /// tokenizer.json in id order) encodes every text as the full tokenizer.json does: case,
    /// accents, punctuation, unknown characters, sub-words and pairs.
    #[test]
    fn vocab_txt_tokenizes_as_tokenizer_json() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let reference = TextEncoder::from_file(&repo.join("interop/tokenizer.json"), 64).unwrap();
        let vocab = reference.tokenizer().get_vocab(true);
        let mut by_id: Vec<(&String, &u32)> = vocab.iter().collect();
        by_id.sort_by_key(|(_, &id)| id);
        assert!(by_id.iter().enumerate().all(|(i, (_, &id))| i as u32 == id));
        let dir = tempfile::tempdir().unwrap();
        let lines: Vec<&str> = by_id.iter().map(|(t, _)| t.as_str()).collect();
        std::fs::write(dir.path().join("vocab.txt"), lines.join("\n") + "\n").unwrap();
        let built = TextEncoder::from_model_dir(dir.path(), 64).unwrap();
        let ex = |a: &str, b: Option<&str>| Example {
            text_a: a.into(),
            text_b: b.map(Into::into),
            label: Label::Class(0),
        };
        let examples = [
            ex("The Café's CEO said: \"unbelievably\" good!", None),
            ex(
                "naïve résumé, 42 tokenizers [SEP] 東京",
                Some("Second sentence here."),
            ),
            ex("\u{1F600} weird\tspacing   and ünïcödé", None),
        ];
        let want = reference.encode_all(&examples).unwrap();
        let got = built.encode_all(&examples).unwrap();
        for (w, g) in want.iter().zip(&got) {
            assert_eq!(w.ids, g.ids);
            assert_eq!(w.type_ids, g.type_ids);
        }
        // do_lower_case false keeps the case: "The" is not "the".
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"do_lower_case": false}"#,
        )
        .unwrap();
        let cased = TextEncoder::from_model_dir(dir.path(), 64).unwrap();
        let g = cased.encode_all(&examples[..1]).unwrap();
        assert_ne!(g[0].ids, want[0].ids);
        // tokenizer.json, when present, wins; with neither file the error names both.
        std::fs::remove_file(dir.path().join("vocab.txt")).unwrap();
        let e = TextEncoder::from_model_dir(dir.path(), 64)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("tokenizer.json not found (nor a vocab.txt"),
            "{e}"
        );
    }

    #[test]
    fn collate_pads_to_longest_and_masks_padding() {
        let a = Encoded {
            ids: vec![101, 7, 102],
            type_ids: vec![0, 0, 0],
            label: Label::Class(1),
        };
        let b = Encoded {
            ids: vec![101, 102],
            type_ids: vec![0, 0],
            label: Label::Class(0),
        };
        let batch = collate(&[&a, &b], 0);
        assert_eq!((batch.batch, batch.seq), (2, 3));
        assert_eq!(batch.input_ids, vec![101, 7, 102, 101, 102, 0]);
        assert_eq!(batch.attention_mask, vec![1, 1, 1, 1, 1, 0]);
        assert_eq!(batch.labels, vec![Label::Class(1), Label::Class(0)]);
    }
}
