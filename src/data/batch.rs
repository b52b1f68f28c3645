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
    /// Loads `tokenizer.json`, truncating to `max_length` tokens and never padding (the batcher pads).
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self, DataError> {
        if !path.exists() {
            return Err(DataError::Format {
                path: path.into(),
                msg: "tokenizer.json not found".into(),
            });
        }
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| DataError::Format {
            path: path.into(),
            msg: format!("not a Hugging Face tokenizer file ({e})"),
        })?;
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
    let seq = items.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let batch = items.len();
    let mut b = Batch {
        input_ids: vec![pad_id; batch * seq],
        token_type_ids: vec![0; batch * seq],
        attention_mask: vec![0; batch * seq],
        batch,
        seq,
        labels: Vec::with_capacity(batch),
    };
    for (i, e) in items.iter().enumerate() {
        let row = i * seq;
        b.input_ids[row..row + e.ids.len()].copy_from_slice(&e.ids);
        b.token_type_ids[row..row + e.ids.len()].copy_from_slice(&e.type_ids);
        b.attention_mask[row..row + e.ids.len()].fill(1);
        b.labels.push(e.label.clone());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

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
