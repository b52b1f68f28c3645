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
    max_length: usize,
}

/// Characters of a long single text tokenized at first, per token of `max_length`: ordinary text
/// spends 4-6 characters a token, so the prefix almost always holds enough of them.
const PREFIX_CHARS_PER_TOKEN: usize = 16;

/// The text up to the last space within `max_length * PREFIX_CHARS_PER_TOKEN` bytes, when the
/// text is longer: every word in it is whole, so its tokens are the whole text's first tokens
/// (the normalizers and pre-tokenizers of BERT's WordPiece, byte-level BPE and SentencePiece work
/// word by word, and all of them split at an ASCII space; SentencePiece does not split at other
/// blanks). None for a shorter text, or one with no space there.
fn word_prefix(text: &str, max_length: usize) -> Option<&str> {
    let mut cut = max_length.saturating_mul(PREFIX_CHARS_PER_TOKEN);
    if text.len() <= cut {
        return None;
    }
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let end = text[..cut].rfind(' ')?;
    Some(&text[..end])
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
            max_length,
        })
    }

    /// Tokenizes all examples (in parallel inside `tokenizers`), keeping their order.
    ///
    /// A long single text is tokenized from its first words ([`word_prefix`]): e-mails and
    /// articles run to many thousand tokens, of which only `max_length` are kept, and tokenizing
    /// them whole took most of a short run's start. When the prefix gives fewer than `max_length`
    /// tokens it may have cut some that the whole text keeps, so that text is tokenized whole.
    pub fn encode_all(&self, examples: &[Example]) -> Result<Vec<Encoded>, DataError> {
        /// The pair, or the single text's `prefix` when given, or the whole single text.
        fn input<'a>(e: &'a Example, prefix: Option<&'a str>) -> tokenizers::EncodeInput<'a> {
            match &e.text_b {
                Some(b) => (e.text_a.as_str(), b.as_str()).into(),
                None => prefix.unwrap_or(&e.text_a).into(),
            }
        }
        let max = self.max_length;
        let prefixes: Vec<Option<&str>> = examples
            .iter()
            .map(|e| e.text_b.is_none().then(|| word_prefix(&e.text_a, max))?)
            .collect();
        let firsts = examples.iter().zip(&prefixes).map(|(e, &p)| input(e, p));
        let mut encodings = self.encode(firsts.collect())?;
        let short: Vec<usize> = (0..examples.len())
            .filter(|&i| prefixes[i].is_some() && encodings[i].len() < max)
            .collect();
        if !short.is_empty() {
            let whole = self.encode(short.iter().map(|&i| input(&examples[i], None)).collect())?;
            for (i, enc) in short.into_iter().zip(whole) {
                encodings[i] = enc;
            }
        }
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

    fn encode(
        &self,
        inputs: Vec<tokenizers::EncodeInput>,
    ) -> Result<Vec<tokenizers::Encoding>, DataError> {
        self.tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| DataError::Format {
                path: self.path.clone(),
                msg: format!("tokenization failed ({e})"),
            })
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

    /// Long texts tokenized from their first words give the whole texts' tokens, for BERT's
    /// WordPiece (MiniLM's tokenizer.json), byte-level BPE (RoBERTa) and DistilBERT's tokenizer
    /// (transformers' fixtures): words, punctuation, accents, CJK, runs of blanks and
    /// newlines, a word longer than WordPiece keeps; a text whose prefix is mostly spaces (so it
    /// gives too few tokens and is tokenized whole), one without blanks, one with blanks but no
    /// space, and a pair.
    #[test]
    fn long_texts_tokenize_as_their_whole_text() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let sentence = "Héllo, wörld! The 3rd quarter's results (Q3) beat forecasts by 12.5%; \
                        東京 markets rose.\n\n  Unbelievably-long-hyphenated-words and tabs\there. ";
        let long = sentence.repeat(80);
        let examples_for = |max_length: usize| {
            // Just past the prefix's length (byte-level BPE's merges grow with a word's square).
            let past = max_length * PREFIX_CHARS_PER_TOKEN + 50;
            let blanks = format!("{}{}", " ".repeat(past), "tail words only ".repeat(40));
            let no_blanks = "x".repeat(past);
            let huge_word = format!("{} {}", "a".repeat(300), sentence.repeat(60));
            // Blanks other than spaces only: not a cut (SentencePiece keeps them inside words).
            let lines = "line\u{a0}of\ttext\n".repeat(past / 10);
            let texts = [
                long.clone(),
                blanks,
                no_blanks,
                huge_word,
                sentence.to_string(),
                lines,
            ];
            let mut examples: Vec<Example> = texts
                .into_iter()
                .map(|text_a| Example {
                    text_a,
                    text_b: None,
                    label: Label::Class(0),
                })
                .collect();
            // A pair is tokenized whole (tokenizers' longest-first truncation of two long texts
            // takes seconds, so this one is short).
            examples.push(Example {
                text_a: sentence.repeat(5),
                text_b: Some(sentence.repeat(3)),
                label: Label::Class(1),
            });
            examples
        };
        let fixtures = repo.join("tests/fixtures/hf");
        for (path, max_length) in [
            (repo.join("interop/tokenizer.json"), 64),
            (fixtures.join("roberta-padded/tokenizer.json"), 32),
            (fixtures.join("distilbert-padded/tokenizer.json"), 128),
        ] {
            let enc = TextEncoder::from_file(&path, max_length).unwrap();
            let examples = examples_for(max_length);
            let prefix = |i: usize| word_prefix(&examples[i].text_a, max_length);
            assert!(prefix(0).is_some() && prefix(1).is_some_and(|p| p.trim().is_empty()));
            assert!(prefix(2).is_none() && prefix(4).is_none() && prefix(5).is_none());
            for (e, got) in examples.iter().zip(enc.encode_all(&examples).unwrap()) {
                let input: tokenizers::EncodeInput = match &e.text_b {
                    Some(b) => (e.text_a.as_str(), b.as_str()).into(),
                    None => e.text_a.as_str().into(),
                };
                let whole = enc.tokenizer().encode(input, true).unwrap();
                assert_eq!(got.ids, whole.get_ids(), "{path:?}: {:.40}", e.text_a);
                assert_eq!(got.type_ids, whole.get_type_ids());
            }
        }
    }
}
