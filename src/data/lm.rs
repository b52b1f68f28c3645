//! Language-model data: documents of plain text (Moby Dick chapters, State of the Union addresses,
//! any `.txt` file or folder) cut into fixed-length token blocks, and instruction data (JSONL
//! prompt/response) whose prompt tokens are masked out of the loss.
//!
//! Splits are by document, never inside one, so held-out perplexity measures text the model has
//! not seen: of every `period` consecutive documents the second-to-last goes to validation and the
//! last to test.

use super::{read_lossy, DataError};
use std::path::Path;
use tokenizers::Tokenizer;

/// Target id that the loss ignores (PyTorch's and Hugging Face's convention).
pub const IGNORE: i64 = -100;

#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    pub name: String,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Instruction {
    pub prompt: String,
    pub response: String,
}

/// A training sequence: token ids and, per position, the token it must predict (or [`IGNORE`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LmSequence {
    pub ids: Vec<u32>,
    pub targets: Vec<i64>,
}

impl LmSequence {
    /// Positions that count in the loss.
    pub fn counted(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }
}

#[derive(Clone, Debug, Default)]
pub struct DocSplit {
    pub train: Vec<Document>,
    pub validation: Vec<Document>,
    pub test: Vec<Document>,
}

/// `.txt` files of `dir` in natural order (`chapter_2` before `chapter_10`), as documents.
fn load_txt_dir(dir: &Path) -> Result<Vec<Document>, DataError> {
    let mut names = super::sorted_entries(dir, false)?;
    names.sort_by_key(|n| natural_key(n));
    let docs = names
        .iter()
        .map(|n| {
            Ok(Document {
                name: n.trim_end_matches(".txt").to_string(),
                text: read_lossy(&dir.join(n))?,
            })
        })
        .collect::<Result<Vec<_>, DataError>>()?;
    if docs.is_empty() {
        return Err(DataError::format(dir, "no .txt files"));
    }
    Ok(docs)
}

/// Sort key splitting a name into text and number runs, so numbers compare by value.
fn natural_key(name: &str) -> Vec<(String, u64)> {
    let mut key = Vec::new();
    let mut text = String::new();
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            let mut n = c.to_digit(10).unwrap_or(0) as u64;
            while let Some(d) = chars.peek().and_then(|c| c.to_digit(10)) {
                n = n.saturating_mul(10).saturating_add(d as u64);
                chars.next();
            }
            key.push((std::mem::take(&mut text), n));
        } else {
            text.push(c);
        }
    }
    key.push((text, 0));
    key
}

/// Moby Dick by chapter (the npm package's `data/chapter_N.txt`), in chapter order.
pub fn load_moby_dick(package: &Path) -> Result<Vec<Document>, DataError> {
    load_txt_dir(&package.join("data"))
}

/// State of the Union addresses (the npm package's `data/*.txt`), in date order.
pub fn load_sotu(package: &Path) -> Result<Vec<Document>, DataError> {
    load_txt_dir(&package.join("data"))
}

/// A `.txt` file (one document) or a folder of them.
pub fn load_text(path: &Path) -> Result<Vec<Document>, DataError> {
    if path.is_dir() {
        return load_txt_dir(path);
    }
    let text = read_lossy(path)?;
    if text.trim().is_empty() {
        return Err(DataError::format(path, "file is empty"));
    }
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(vec![Document { name, text }])
}

/// Instruction data, one JSON object per line: `prompt`/`response`, or Alpaca's
/// `instruction`/`input`/`output` (input appended to the instruction when present).
pub fn load_instructions(path: &Path) -> Result<Vec<Instruction>, DataError> {
    let text = read_lossy(path)?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |msg: String| DataError::format(path, format!("line {}: {msg}", i + 1));
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| at(format!("not JSON ({e})")))?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let (prompt, response) = match (field("prompt"), field("response")) {
            (Some(p), Some(r)) => (p, r),
            _ => match (field("instruction"), field("output")) {
                (Some(ins), Some(out)) => match field("input").filter(|s| !s.is_empty()) {
                    Some(inp) => (format!("{ins}\n\n{inp}"), out),
                    None => (ins, out),
                },
                _ => {
                    return Err(at(
                        "needs \"prompt\" and \"response\" (or \"instruction\" and \"output\")"
                            .into(),
                    ))
                }
            },
        };
        items.push(Instruction { prompt, response });
    }
    if items.is_empty() {
        return Err(DataError::format(path, "no instructions in the file"));
    }
    Ok(items)
}

/// Fixed split by document position: of every `period` consecutive documents, index
/// `period - 2` goes to validation and `period - 1` to test (Moby Dick, period 10: chapters 9, 19,
/// ... validate and 10, 20, ... test). With fewer than `period` documents, the last one tests.
pub fn split_documents(docs: Vec<Document>, period: usize) -> DocSplit {
    let period = period.max(3);
    let n = docs.len();
    let mut s = DocSplit::default();
    for (i, d) in docs.into_iter().enumerate() {
        let short_and_last = n < period && i + 1 == n && n > 1;
        if short_and_last || i % period == period - 1 {
            s.test.push(d);
        } else if i % period == period - 2 {
            s.validation.push(d);
        } else {
            s.train.push(d);
        }
    }
    s
}

fn encode(tok: &Tokenizer, text: &str, what: &str) -> Result<Vec<u32>, DataError> {
    tok.encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| DataError::format(Path::new(what), format!("cannot tokenize ({e})")))
}

/// Tokenizes the documents, joins them with `separator` (the end-of-text token) and cuts the
/// stream into blocks of `seq_len` inputs: block `j` predicts tokens `j*seq_len+1 ..`. The last,
/// shorter block is kept if it has at least 2 tokens.
pub fn chunk_documents(
    tok: &Tokenizer,
    docs: &[Document],
    seq_len: usize,
    separator: Option<u32>,
) -> Result<Vec<LmSequence>, DataError> {
    let seq_len = seq_len.max(1);
    let mut stream = Vec::new();
    for d in docs {
        stream.extend(encode(tok, &d.text, &d.name)?);
        stream.extend(separator);
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start + 1 < stream.len() {
        let end = (start + seq_len + 1).min(stream.len());
        let block = &stream[start..end];
        out.push(LmSequence {
            ids: block[..block.len() - 1].to_vec(),
            targets: block[1..].iter().map(|&t| t as i64).collect(),
        });
        start += seq_len;
    }
    Ok(out)
}

/// How a prompt and its response become one text.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum PromptFormat {
    /// `prompt\n` then `response`.
    Plain,
    /// ChatML, as SmolLM2-Instruct and Qwen are trained: `<|im_start|>user\n...<|im_end|>\n
    /// <|im_start|>assistant\n` then `response<|im_end|>`.
    Chatml,
}

impl PromptFormat {
    pub fn prompt_text(self, prompt: &str) -> String {
        match self {
            PromptFormat::Plain => format!("{prompt}\n"),
            PromptFormat::Chatml => {
                format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
            }
        }
    }

    fn response_text(self, response: &str) -> String {
        match self {
            PromptFormat::Plain => response.to_string(),
            PromptFormat::Chatml => format!("{response}<|im_end|>"),
        }
    }
}

/// Encodes instructions as `prompt ++ response ++ eos`, truncated to `max_len + 1` tokens; only
/// response tokens (and eos) are targets, so the model learns to answer, not to repeat prompts.
pub fn encode_instructions(
    tok: &Tokenizer,
    items: &[Instruction],
    format: PromptFormat,
    max_len: usize,
    eos: Option<u32>,
) -> Result<Vec<LmSequence>, DataError> {
    let mut out = Vec::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        let what = format!("instruction {}", i + 1);
        let p = encode(tok, &format.prompt_text(&it.prompt), &what)?;
        let mut all = p.clone();
        all.extend(encode(tok, &format.response_text(&it.response), &what)?);
        all.extend(eos);
        all.truncate(max_len + 1);
        if all.len() < 2 || p.len() >= all.len() {
            continue; // the prompt alone fills the window: nothing to learn from
        }
        let targets = (1..all.len())
            .map(|j| if j < p.len() { IGNORE } else { all[j] as i64 })
            .collect();
        all.pop();
        out.push(LmSequence { ids: all, targets });
    }
    Ok(out)
}

/// A padded batch (right padding, pad id 0, pad targets ignored).
#[derive(Clone, Debug)]
pub struct LmCollated {
    pub input_ids: Vec<u32>,
    pub attention_mask: Vec<u32>,
    pub targets: Vec<i64>,
    pub batch: usize,
    pub seq: usize,
}

pub fn collate(items: &[&LmSequence]) -> LmCollated {
    let seq = items.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let mut c = LmCollated {
        input_ids: Vec::with_capacity(items.len() * seq),
        attention_mask: Vec::with_capacity(items.len() * seq),
        targets: Vec::with_capacity(items.len() * seq),
        batch: items.len(),
        seq,
    };
    for s in items {
        let pad = seq - s.ids.len();
        c.input_ids.extend(&s.ids);
        c.input_ids.extend(std::iter::repeat_n(0, pad));
        c.attention_mask.extend(std::iter::repeat_n(1, s.ids.len()));
        c.attention_mask.extend(std::iter::repeat_n(0, pad));
        c.targets.extend(&s.targets);
        c.targets.extend(std::iter::repeat_n(IGNORE, pad));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;

    /// A word-level tokenizer over a fixed vocabulary, so ids are known exactly.
    fn words() -> Tokenizer {
        let vocab = ["<unk>", "a", "b", "c", "d", "e", "<eos>", "Q:", "A:"]
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), i as u32))
            .collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("<unk>".into())
            .build()
            .unwrap();
        let mut t = Tokenizer::new(model);
        t.with_pre_tokenizer(Some(WhitespaceSplit));
        t
    }

    fn doc(name: &str, text: &str) -> Document {
        Document {
            name: name.into(),
            text: text.into(),
        }
    }

    #[test]
    fn blocks_predict_the_next_token_across_documents() {
        let docs = [doc("1", "a b c"), doc("2", "d e")];
        let seqs = chunk_documents(&words(), &docs, 3, Some(6)).unwrap();
        // stream: a b c <eos> d e <eos> = 1 2 3 6 4 5 6
        assert_eq!(seqs[0].ids, vec![1, 2, 3]);
        assert_eq!(seqs[0].targets, vec![2, 3, 6]);
        assert_eq!(seqs[1].ids, vec![6, 4, 5]);
        assert_eq!(seqs[1].targets, vec![4, 5, 6]);
        assert_eq!(seqs.len(), 2);
    }

    #[test]
    fn instruction_prompt_is_not_a_target() {
        let items = [Instruction {
            prompt: "Q: a".into(),
            response: "A: b c".into(),
        }];
        let seqs = encode_instructions(&words(), &items, PromptFormat::Plain, 16, Some(6)).unwrap();
        // prompt "Q: a" = 7 1 ; response "A: b c" = 8 2 3 ; eos 6
        assert_eq!(seqs[0].ids, vec![7, 1, 8, 2, 3]);
        assert_eq!(seqs[0].targets, vec![IGNORE, 8, 2, 3, 6]);
        assert_eq!(seqs[0].counted(), 4);
        // A window the prompt fills leaves nothing to learn: dropped.
        let none = encode_instructions(&words(), &items, PromptFormat::Plain, 1, Some(6)).unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn split_is_by_document_and_fixed() {
        let docs: Vec<Document> = (1..=25).map(|i| doc(&i.to_string(), "a")).collect();
        let s = split_documents(docs, 10);
        let names = |v: &[Document]| v.iter().map(|d| d.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&s.validation), vec!["9", "19"]);
        assert_eq!(names(&s.test), vec!["10", "20"]);
        assert_eq!(s.train.len(), 21);
    }

    #[test]
    fn collate_pads_right_and_ignores_padding() {
        let a = LmSequence {
            ids: vec![1, 2, 3],
            targets: vec![2, 3, 4],
        };
        let b = LmSequence {
            ids: vec![5],
            targets: vec![6],
        };
        let c = collate(&[&a, &b]);
        assert_eq!((c.batch, c.seq), (2, 3));
        assert_eq!(c.input_ids, vec![1, 2, 3, 5, 0, 0]);
        assert_eq!(c.attention_mask, vec![1, 1, 1, 1, 0, 0]);
        assert_eq!(c.targets, vec![2, 3, 4, 6, IGNORE, IGNORE]);
    }

    #[test]
    fn loaders_name_the_file_on_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\": \"x\", \"response\": \"y\"}\n{\"text\": 1}\n",
        )
        .unwrap();
        let e = load_instructions(&p).unwrap_err().to_string();
        assert!(e.contains("i.jsonl") && e.contains("line 2"), "{e}");
        std::fs::write(
            &p,
            "{\"instruction\": \"x\", \"input\": \"z\", \"output\": \"y\"}\n",
        )
        .unwrap();
        assert_eq!(load_instructions(&p).unwrap()[0].prompt, "x\n\nz");
        let empty = dir.path().join("e.txt");
        std::fs::write(&empty, "  \n").unwrap();
        assert!(load_text(&empty).unwrap_err().to_string().contains("e.txt"));
        // Natural order: chapter_2 before chapter_10.
        let d = dir.path().join("book");
        std::fs::create_dir(&d).unwrap();
        for n in ["chapter_10", "chapter_2", "chapter_1"] {
            std::fs::write(d.join(format!("{n}.txt")), "a").unwrap();
        }
        let names: Vec<String> = load_text(&d).unwrap().into_iter().map(|d| d.name).collect();
        assert_eq!(names, vec!["chapter_1", "chapter_2", "chapter_10"]);
    }
}
