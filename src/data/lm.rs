//! Language-model data: documents of plain text (Moby Dick chapters, State of the Union addresses,
//! any `.txt` file or folder) cut into fixed-length token blocks, and instruction data (JSONL or a
//! JSON array of records: chat `messages` or ShareGPT `conversations`, prompt/completion,
//! prompt/response, instruction/output, plain `text`) whose prompt tokens are masked out of the
//! loss.
//!
//! Splits are by document, never inside one, so held-out perplexity measures text the model has
//! not seen: of every `period` consecutive documents the second-to-last goes to validation and the
//! last to test. Fewer documents than `period` (one `.txt` file) are split by position instead
//! ([`split_by_position`]).

use super::chat::{ChatTemplate, Message};
use super::{read_lossy, DataError};
use std::ops::Range;
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

/// One record of instruction data; its shape is told by its keys.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// `prompt`/`response`, or Alpaca's `instruction`/`input`/`output`: laid out by
    /// [`PromptFormat`].
    Pair(Instruction),
    /// `prompt`/`completion` (TRL's prompt-completion shape): the two texts joined as they are.
    Completion { prompt: String, completion: String },
    /// `messages` (`role`/`content`) or ShareGPT `conversations` (`from`/`value`, with
    /// `human`/`gpt` read as `user`/`assistant`): rendered with the model's chat template.
    Chat(Vec<Message>),
    /// `text`: a plain document; every token counts.
    Text(String),
}

impl Record {
    /// The key that told the record's shape (for errors).
    pub fn shape(&self) -> &'static str {
        match self {
            Record::Pair(_) => "prompt/response",
            Record::Completion { .. } => "prompt/completion",
            Record::Chat(_) => "messages",
            Record::Text(_) => "text",
        }
    }
}

/// Instruction records from JSONL (one object per line) or a JSON array of objects (a file whose
/// first character is `[`); see [`Record`] for the shapes. Errors name the line or record.
pub fn load_records(path: &Path) -> Result<Vec<Record>, DataError> {
    let text = read_lossy(path)?;
    let objects: Vec<(String, serde_json::Value)> = if text.trim_start().starts_with('[') {
        let items: Vec<serde_json::Value> = serde_json::from_str(&text)
            .map_err(|e| DataError::format(path, format!("not a valid JSON array ({e})")))?;
        items
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("record {}", i + 1), v))
            .collect()
    } else {
        let mut v = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = format!("line {}", i + 1);
            let obj = serde_json::from_str(line)
                .map_err(|e| DataError::format(path, format!("{at}: not JSON ({e})")))?;
            v.push((at, obj));
        }
        v
    };
    let items = objects
        .into_iter()
        .map(|(at, v)| record(&v).map_err(|msg| DataError::format(path, format!("{at}: {msg}"))))
        .collect::<Result<Vec<_>, _>>()?;
    if items.is_empty() {
        return Err(DataError::format(path, "no records in the file"));
    }
    Ok(items)
}

/// The record one JSON object holds, by its keys.
fn record(v: &serde_json::Value) -> Result<Record, String> {
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    if let Some(turns) = v.get("messages").or_else(|| v.get("conversations")) {
        return chat_turns(turns).map(Record::Chat);
    }
    if let (Some(prompt), Some(completion)) = (field("prompt"), field("completion")) {
        return Ok(Record::Completion { prompt, completion });
    }
    if let (Some(prompt), Some(response)) = (field("prompt"), field("response")) {
        return Ok(Record::Pair(Instruction { prompt, response }));
    }
    if let (Some(ins), Some(out)) = (field("instruction"), field("output")) {
        let prompt = match field("input").filter(|s| !s.is_empty()) {
            Some(inp) => format!("{ins}\n\n{inp}"),
            None => ins,
        };
        return Ok(Record::Pair(Instruction {
            prompt,
            response: out,
        }));
    }
    if let Some(text) = field("text") {
        return Ok(Record::Text(text));
    }
    let keys: Vec<&str> = v
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    Err(format!(
        "needs \"messages\", \"conversations\", \"prompt\" and \"completion\", \"prompt\" and \
         \"response\", \"instruction\" and \"output\", or \"text\" (found: {})",
        if keys.is_empty() {
            "not an object with string fields".into()
        } else {
            keys.join(", ")
        }
    ))
}

/// The turns of `messages` (`role`/`content`) or ShareGPT `conversations` (`from`/`value`).
fn chat_turns(turns: &serde_json::Value) -> Result<Vec<Message>, String> {
    let list = turns
        .as_array()
        .filter(|l| !l.is_empty())
        .ok_or("\"messages\" / \"conversations\" must be a non-empty list of turns")?;
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let get = |a: &str, b: &str| {
            t.get(a)
                .or_else(|| t.get(b))
                .and_then(|x| x.as_str())
                .map(str::to_string)
        };
        let (Some(role), Some(content)) = (get("role", "from"), get("content", "value")) else {
            return Err(format!(
                "turn {} needs string \"role\" and \"content\" (ShareGPT: \"from\" and \"value\")",
                i + 1
            ));
        };
        let role = match role.as_str() {
            "human" => "user".into(),
            "gpt" => "assistant".into(),
            _ => role,
        };
        out.push(Message { role, content });
    }
    if !out.iter().any(|m| m.role == "assistant") {
        return Err("the conversation has no assistant turn: nothing to learn from".into());
    }
    Ok(out)
}

/// Splits one document's text by position into train, validation and test, in that order:
/// validation and test take `1/period` of the text each, at the end (so 8:1:1 for period 10).
/// Each cut moves to the nearest paragraph break (a blank line) within 5% of the text, else the
/// nearest line break, else the nearest space, so no held-out part starts inside a word when the
/// text allows it. `None` when the text is too short for three non-empty parts.
pub fn split_by_position(doc: &Document, period: usize) -> Option<DocSplit> {
    let text = doc.text.as_str();
    let n = text.len();
    let part = n / period.max(3);
    let window = n / 20;
    let cut = |target: usize| {
        let near = |pat: &str| {
            let lo = target.saturating_sub(window);
            let hi = (target + window).min(n);
            let (lo, hi) = (floor_char(text, lo), floor_char(text, hi));
            text[lo..hi]
                .match_indices(pat)
                .map(|(i, m)| lo + i + m.len())
                .min_by_key(|&i| i.abs_diff(target))
        };
        near("\n\n")
            .or_else(|| near("\n"))
            .or_else(|| near(" "))
            .unwrap_or_else(|| floor_char(text, target))
    };
    let (a, b) = (cut(n - 2 * part), cut(n - part));
    let piece = |r: Range<usize>, what: &str| Document {
        name: format!("{} ({what})", doc.name),
        text: text[r].to_string(),
    };
    let parts = [(0..a, "train"), (a..b, "validation"), (b..n, "test")];
    if parts.iter().any(|(r, _)| text[r.clone()].trim().is_empty()) {
        return None;
    }
    let [t, v, s] = parts.map(|(r, w)| piece(r, w));
    Some(DocSplit {
        train: vec![t],
        validation: vec![v],
        test: vec![s],
    })
}

/// The largest char boundary at or below `i`.
fn floor_char(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
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

    pub fn response_text(self, response: &str) -> String {
        match self {
            PromptFormat::Plain => response.to_string(),
            PromptFormat::Chatml => format!("{response}<|im_end|>"),
        }
    }
}

/// How instruction records become token sequences.
pub struct RecordEncoding<'a> {
    pub format: PromptFormat,
    /// The model's chat template, for `messages` / `conversations` records.
    pub chat: Option<&'a ChatTemplate>,
    /// Inputs per sequence: a record is cut to `max_len + 1` tokens.
    pub max_len: usize,
    /// Appended after a pair, a completion or a text (a chat template writes its own ends).
    pub eos: Option<u32>,
}

/// Encodes records as token sequences whose targets are the answer's tokens only: the response
/// or completion (and eos), the assistant turns of a chat (their end-of-turn tokens included, so
/// the model learns to stop), every token of a `text`. A record whose window holds no target is
/// dropped. `path` (the data file) and `model` (whose chat template it is) are named in errors.
pub fn encode_records(
    tok: &Tokenizer,
    items: &[Record],
    how: &RecordEncoding,
    path: &Path,
    model: &Path,
) -> Result<Vec<LmSequence>, DataError> {
    let mut out = Vec::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        let at = |msg: String| DataError::format(path, format!("record {}: {msg}", i + 1));
        // The text and the byte ranges whose tokens are targets.
        let (text, spans, eos): (String, Vec<Range<usize>>, _) = match it {
            Record::Pair(p) => {
                let prompt = how.format.prompt_text(&p.prompt);
                let all = prompt.clone() + &how.format.response_text(&p.response);
                (
                    all.clone(),
                    std::iter::once(prompt.len()..all.len()).collect(),
                    how.eos,
                )
            }
            Record::Completion { prompt, completion } => {
                let all = format!("{prompt}{completion}");
                (
                    all.clone(),
                    std::iter::once(prompt.len()..all.len()).collect(),
                    how.eos,
                )
            }
            Record::Text(t) => (t.clone(), std::iter::once(0..t.len()).collect(), how.eos),
            Record::Chat(messages) => {
                let Some(template) = how.chat else {
                    return Err(DataError::format(
                        path,
                        format!(
                            "record {} is a chat ({}), rendered with the model's chat template, \
                             and {} has none (no chat_template.jinja, no chat_template in \
                             tokenizer_config.json, no tokenizer.chat_template in GGUF metadata)",
                            i + 1,
                            it.shape(),
                            model.display()
                        ),
                    ));
                };
                let (text, spans) = template.render_with_spans(messages).map_err(|e| {
                    at(format!(
                        "chat template of {}: {e}",
                        template.origin.display()
                    ))
                })?;
                (text, spans, None)
            }
        };
        let enc = tok
            .encode(text.as_str(), false)
            .map_err(|e| at(format!("cannot tokenize ({e})")))?;
        let counted = |tokens: usize| -> Vec<bool> {
            enc.get_offsets()[..tokens]
                .iter()
                .map(|(start, _)| spans.iter().any(|r| r.contains(start)))
                .collect()
        };
        let mut ids = enc.get_ids().to_vec();
        let mut target = counted(ids.len());
        if let Some(e) = eos {
            ids.push(e);
            target.push(true);
        }
        ids.truncate(how.max_len + 1);
        if ids.len() < 2 || !target[1..ids.len()].iter().any(|&t| t) {
            continue; // the prompt alone fills the window: nothing to learn from
        }
        let targets = (1..ids.len())
            .map(|j| if target[j] { ids[j] as i64 } else { IGNORE })
            .collect();
        ids.pop();
        out.push(LmSequence { ids, targets });
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

    fn encode(
        tok: &Tokenizer,
        items: &[Record],
        chat: Option<&ChatTemplate>,
        max_len: usize,
    ) -> Result<Vec<LmSequence>, DataError> {
        let how = RecordEncoding {
            format: PromptFormat::Plain,
            chat,
            max_len,
            eos: Some(6),
        };
        encode_records(tok, items, &how, Path::new("d.jsonl"), Path::new("m"))
    }

    #[test]
    fn instruction_prompt_is_not_a_target() {
        let items = [Record::Pair(Instruction {
            prompt: "Q: a".into(),
            response: "A: b c".into(),
        })];
        let seqs = encode(&words(), &items, None, 16).unwrap();
        // prompt "Q: a" = 7 1 ; response "A: b c" = 8 2 3 ; eos 6
        assert_eq!(seqs[0].ids, vec![7, 1, 8, 2, 3]);
        assert_eq!(seqs[0].targets, vec![IGNORE, 8, 2, 3, 6]);
        assert_eq!(seqs[0].counted(), 4);
        // A window the prompt fills leaves nothing to learn: dropped.
        let none = encode(&words(), &items, None, 1).unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn completion_and_text_records() {
        let items = [
            Record::Completion {
                prompt: "Q: a ".into(),
                completion: "b c".into(),
            },
            Record::Text("a b".into()),
        ];
        let seqs = encode(&words(), &items, None, 16).unwrap();
        // "Q: a b c" + eos: the completion b c and eos are the targets.
        assert_eq!(seqs[0].ids, vec![7, 1, 2, 3]);
        assert_eq!(seqs[0].targets, vec![IGNORE, 2, 3, 6]);
        // A text: every next token.
        assert_eq!(seqs[1].ids, vec![1, 2]);
        assert_eq!(seqs[1].targets, vec![2, 6]);
    }

    /// Only the assistant turns (and their end-of-turn tokens) are targets; the user turns and
    /// the assistant headers the template writes are not.
    #[test]
    fn chat_targets_are_the_assistant_turns() {
        let vocab = ["<unk>", "U", "A", "<eot>", "a", "b", "c", "d", "e"]
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), i as u32))
            .collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("<unk>".into())
            .build()
            .unwrap();
        let mut tok = Tokenizer::new(model);
        tok.with_pre_tokenizer(Some(WhitespaceSplit));
        let src = "{% for m in messages %}{{ 'U' if m.role == 'user' else 'A' }} {{ m.content }} \
                   <eot> {% endfor %}{% if add_generation_prompt %}A {% endif %}";
        let t = ChatTemplate::new(src.into(), "".into(), "".into(), Path::new("t")).unwrap();
        let m = |role: &str, content: &str| Message {
            role: role.into(),
            content: content.into(),
        };
        let conv = Record::Chat(vec![
            m("user", "a b"),
            m("assistant", "c"),
            m("user", "d"),
            m("assistant", "e"),
        ]);
        let seqs = encode(&tok, std::slice::from_ref(&conv), Some(&t), 64).unwrap();
        // U a b <eot> A c <eot> U d <eot> A e <eot>; no eos appended after a chat.
        assert_eq!(seqs[0].ids, vec![1, 4, 5, 3, 2, 6, 3, 1, 7, 3, 2, 8]);
        let i = IGNORE;
        assert_eq!(seqs[0].targets, vec![i, i, i, i, 6, 3, i, i, i, i, 8, 3]);
        // Without a template: an error naming the data file and the model.
        let e = encode(&tok, &[conv], None, 64).unwrap_err().to_string();
        assert!(
            e.starts_with("d.jsonl: record 1 is a chat (messages)") && e.contains("m has none"),
            "{e}"
        );
    }

    #[test]
    fn record_shapes_from_keys_in_jsonl_and_json_arrays() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        let body = serde_json::json!([
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            {"prompt": "p", "completion": "c"},
            {"prompt": "p", "response": "r"},
            {"instruction": "i", "output": "o"},
            {"text": "t"}
        ]);
        std::fs::write(&p, body.to_string()).unwrap();
        let r = load_records(&p).unwrap();
        let m = |role: &str, content: &str| Message {
            role: role.into(),
            content: content.into(),
        };
        assert_eq!(
            r[0],
            Record::Chat(vec![m("user", "hi"), m("assistant", "yo")])
        );
        assert_eq!(
            r[1],
            Record::Chat(vec![m("user", "q"), m("assistant", "a")])
        );
        assert_eq!(
            r[2],
            Record::Completion {
                prompt: "p".into(),
                completion: "c".into()
            }
        );
        let shapes: Vec<&str> = r.iter().map(Record::shape).collect();
        assert_eq!(shapes[3..], ["prompt/response", "prompt/response", "text"]);
        // Errors name the record or line and what is missing.
        std::fs::write(
            &p,
            r#"[{"text": "a"}, {"messages": [{"role": "user", "content": "x"}]}]"#,
        )
        .unwrap();
        let e = load_records(&p).unwrap_err().to_string();
        assert!(
            e.contains("r.json: record 2: the conversation has no assistant turn"),
            "{e}"
        );
        let j = dir.path().join("r.jsonl");
        std::fs::write(&j, "{\"text\": \"a\"}\n{\"question\": \"x\"}\n").unwrap();
        let e = load_records(&j).unwrap_err().to_string();
        assert!(
            e.contains("r.jsonl: line 2: needs \"messages\"") && e.contains("found: question"),
            "{e}"
        );
    }

    /// One text split by position: 8:1:1 of its length, each cut at the nearest blank line.
    #[test]
    fn one_text_splits_by_position_at_paragraphs() {
        let paragraphs: Vec<String> = (0..40)
            .map(|i| format!("Paragraph {i:02} words here."))
            .collect();
        let text = paragraphs.join("\n\n");
        let d = doc("book", &text);
        let s = split_by_position(&d, 10).unwrap();
        let (t, v, x) = (&s.train[0].text, &s.validation[0].text, &s.test[0].text);
        assert_eq!(format!("{t}{v}{x}"), text);
        // Each held-out part starts at a paragraph and is about a tenth of the text.
        assert!(
            v.starts_with("Paragraph ") && x.starts_with("Paragraph "),
            "{v:?} {x:?}"
        );
        for part in [v, x] {
            let frac = part.len() as f64 / text.len() as f64;
            assert!((0.05..0.15).contains(&frac), "{frac}");
        }
        assert!(x.ends_with("Paragraph 39 words here."));
        assert_eq!(s.validation[0].name, "book (validation)");
        // No blank line near the cut: the nearest line break, then the nearest space.
        let lines = (0..100)
            .map(|i| format!("line {i}"))
            .collect::<Vec<_>>()
            .join("\n");
        let s = split_by_position(&doc("l", &lines), 10).unwrap();
        assert!(s.test[0].text.starts_with("line 9"), "{:?}", s.test[0].text);
        let words = "word ".repeat(200);
        let s = split_by_position(&doc("w", &words), 10).unwrap();
        assert!(s.validation[0].text.starts_with("word"));
        // Too short for three parts.
        assert!(split_by_position(&doc("s", "ab"), 10).is_none());
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
        let e = load_records(&p).unwrap_err().to_string();
        assert!(e.contains("i.jsonl") && e.contains("line 2"), "{e}");
        std::fs::write(
            &p,
            "{\"instruction\": \"x\", \"input\": \"z\", \"output\": \"y\"}\n",
        )
        .unwrap();
        let Record::Pair(first) = &load_records(&p).unwrap()[0] else {
            panic!("not a pair")
        };
        assert_eq!(first.prompt, "x\n\nz");
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
