//! Extractive question answering data: SQuAD v1.1 / v2.0 JSON
//! (`data[].paragraphs[].{context, qas[].{id, question, answers[].{text, answer_start},
//! is_impossible}}`), a split by article, and the windows a model reads, as transformers'
//! `run_qa.py` (`prepare_train_features` / `prepare_validation_features`) makes them.
//!
//! Positions are in characters (Unicode scalar values), as SQuAD's `answer_start` and the
//! tokenizer's offsets (`encode_char_offsets`, what transformers' fast tokenizers return) count.

use super::batch::TextEncoder;
use super::DataError;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::{
    PostProcessor, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

/// One gold answer: its text and its first character in the context.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub text: String,
    pub start: usize,
}

/// One question about one context.
#[derive(Clone, Debug)]
pub struct SquadExample {
    pub id: String,
    pub question: String,
    /// Shared by the paragraph's questions.
    pub context: Arc<str>,
    /// Empty for an unanswerable question (v2).
    pub answers: Vec<Answer>,
    /// The article (index in the file's `data`) the question belongs to: the unit of a split.
    pub article: usize,
}

/// A SQuAD file's questions, in file order.
#[derive(Clone, Debug)]
pub struct Squad {
    pub path: PathBuf,
    pub examples: Vec<SquadExample>,
    /// Articles in the file (`data`'s length).
    pub articles: usize,
    /// SQuAD v2.0: unanswerable questions may exist (`version` "v2.0", or any `is_impossible`
    /// key); scored with v2.0's script, and a prediction may be empty.
    pub v2: bool,
}

/// Reads a SQuAD v1.1 or v2.0 JSON file, checking every record: each error names the file and
/// the record (`data[0].paragraphs[2].qas[1] (id '...')`).
pub fn load_squad(path: &Path) -> Result<Squad, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let root: Value = serde_json::from_slice(&bytes)
        .map_err(|e| DataError::format(path, format!("not valid JSON ({e})")))?;
    parse(path, &root)
}

fn parse(path: &Path, root: &Value) -> Result<Squad, DataError> {
    let bad = |at: &str, msg: String| DataError::format(path, format!("{at}: {msg}"));
    let data = root
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("top level", "no 'data' array (SQuAD JSON)".into()))?;
    let mut v2 = root
        .get("version")
        .and_then(Value::as_str)
        .is_some_and(|v| v.trim_start_matches('v').starts_with('2'));
    let mut examples = Vec::new();
    let mut ids = std::collections::HashMap::new();
    for (a, article) in data.iter().enumerate() {
        let at = format!("data[{a}]");
        let paragraphs = article
            .get("paragraphs")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(&at, "no 'paragraphs' array".into()))?;
        for (p, para) in paragraphs.iter().enumerate() {
            let at = format!("data[{a}].paragraphs[{p}]");
            let context: Arc<str> = string(para, "context").map_err(|m| bad(&at, m))?.into();
            let chars: Vec<char> = context.chars().collect();
            let qas = para
                .get("qas")
                .and_then(Value::as_array)
                .ok_or_else(|| bad(&at, "no 'qas' array".into()))?;
            for (q, qa) in qas.iter().enumerate() {
                let at = format!("data[{a}].paragraphs[{p}].qas[{q}]");
                let id = match qa.get("id") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Number(n)) => n.to_string(),
                    _ => return Err(bad(&at, "no 'id' (a string)".into())),
                };
                let at = format!("{at} (id '{id}')");
                if let Some(first) = ids.insert(id.clone(), at.clone()) {
                    return Err(bad(&at, format!("the id is also {first}'s")));
                }
                let question = string(qa, "question").map_err(|m| bad(&at, m))?;
                let impossible = match qa.get("is_impossible") {
                    None => false,
                    Some(Value::Bool(b)) => {
                        v2 = true;
                        *b
                    }
                    Some(other) => {
                        return Err(bad(&at, format!("'is_impossible' is {other}, not a bool")))
                    }
                };
                let list = qa
                    .get("answers")
                    .and_then(Value::as_array)
                    .ok_or_else(|| bad(&at, "no 'answers' array".into()))?;
                let mut answers = Vec::with_capacity(list.len());
                for (k, ans) in list.iter().enumerate() {
                    let at = format!("{at}.answers[{k}]");
                    let text = string(ans, "text").map_err(|m| bad(&at, m))?;
                    let start = ans
                        .get("answer_start")
                        .and_then(Value::as_u64)
                        .ok_or_else(|| bad(&at, "no 'answer_start' (an integer >= 0)".into()))?
                        as usize;
                    let len = text.chars().count();
                    if start + len > chars.len() {
                        return Err(bad(
                            &at,
                            format!(
                                "answer_start {start} + {len} characters of '{text}' is past the \
                                 context's {} characters",
                                chars.len()
                            ),
                        ));
                    }
                    let found: String = chars[start..start + len].iter().collect();
                    if found != text {
                        return Err(bad(
                            &at,
                            format!(
                                "the context at answer_start {start} reads '{found}', not the \
                                 answer text '{text}'"
                            ),
                        ));
                    }
                    answers.push(Answer { text, start });
                }
                if impossible && !answers.is_empty() {
                    return Err(bad(&at, "is_impossible is true but it has answers".into()));
                }
                if !impossible && answers.is_empty() {
                    return Err(bad(
                        &at,
                        "no answers, and is_impossible is not true (SQuAD v2.0 marks an \
                         unanswerable question so)"
                            .into(),
                    ));
                }
                examples.push(SquadExample {
                    id,
                    question,
                    context: context.clone(),
                    answers,
                    article: a,
                });
            }
        }
    }
    if examples.is_empty() {
        return Err(DataError::format(
            path,
            "no questions ('qas' are all empty)",
        ));
    }
    Ok(Squad {
        path: path.into(),
        examples,
        articles: data.len(),
        v2,
    })
}

fn string(v: &Value, key: &str) -> Result<String, String> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("'{key}' is {other}, not a string")),
        None => Err(format!("no '{key}'")),
    }
}

impl Squad {
    /// Splits by article (the questions of one article stay together, so no context is seen in
    /// training and scored later): articles shuffled with `StdRng::seed_from_u64(seed)`, the
    /// first `round(n * test_frac)` to test, the next `round(n * validation_frac)` to
    /// validation, the rest (at least one) to training. Each split keeps file order.
    pub fn split_articles(
        &self,
        validation_frac: f64,
        test_frac: f64,
        seed: u64,
    ) -> Result<[Squad; 3], DataError> {
        let n = self.articles;
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut StdRng::seed_from_u64(seed));
        let n_test = (n as f64 * test_frac).round() as usize;
        let n_val = (n as f64 * validation_frac).round() as usize;
        if n_test + n_val >= n {
            return Err(DataError::format(
                &self.path,
                format!(
                    "{n} articles: too few to split by article into training, validation \
                     ({validation_frac}) and test ({test_frac}); give --validation-file / \
                     --test-file"
                ),
            ));
        }
        let mut part = vec![0u8; n];
        for &a in &order[..n_test] {
            part[a] = 2;
        }
        for &a in &order[n_test..n_test + n_val] {
            part[a] = 1;
        }
        Ok([0u8, 1, 2].map(|k| Squad {
            path: self.path.clone(),
            examples: self
                .examples
                .iter()
                .filter(|e| part[e.article] == k)
                .cloned()
                .collect(),
            articles: part.iter().filter(|&&p| p == k).count(),
            v2: self.v2,
        }))
    }
}

/// One window of one question's context: what the model reads, the answer's token positions
/// in it (training), and the context span of each token (post-processing).
#[derive(Clone, Debug)]
pub struct QaFeature {
    /// Index of the question in its split's examples.
    pub example: usize,
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// The answer's first and last token; both the CLS token's index when the window does not
    /// hold the whole answer or the question has none.
    pub start: u32,
    pub end: u32,
    /// Each token's character span in the context; None for question and special tokens.
    pub offsets: Vec<Option<(usize, usize)>>,
}

/// Tokenizes question-context pairs into overlapping windows (transformers' `run_qa.py`:
/// question first, truncation `only_second` to `max_length` tokens, consecutive windows
/// sharing `doc_stride` tokens of context).
pub struct QaEncoder {
    tokenizer: Tokenizer,
    /// The same tokenizer without truncation: counts a question's and a context's tokens.
    counter: Tokenizer,
    path: PathBuf,
    max_length: usize,
    doc_stride: usize,
    /// The special tokens around a question-context pair (BERT: `[CLS]` and two `[SEP]`).
    pair_specials: usize,
}

impl QaEncoder {
    /// The tokenizer of a model folder (see [`TextEncoder::from_model_dir`]).
    pub fn from_model_dir(
        dir: &Path,
        max_length: usize,
        doc_stride: usize,
    ) -> Result<Self, DataError> {
        let text = TextEncoder::from_model_dir(dir, max_length)?;
        let mut tokenizer = text.tokenizer().clone();
        let mut counter = tokenizer.clone();
        counter
            .with_truncation(None)
            .expect("no truncation is valid");
        let path = dir.join("tokenizer.json");
        let pair_specials = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(true));
        // tokenizers subtracts the pair's special tokens from max_length (an overflow when they
        // do not fit) and asserts that every cut leaves more than the stride.
        if max_length <= pair_specials + doc_stride {
            let msg = format!(
                "windows of {max_length} tokens hold {pair_specials} special tokens around a \
                 question and its context: too short for a stride of {doc_stride} tokens"
            );
            return Err(DataError::format(&path, msg));
        }
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::OnlySecond,
                stride: doc_stride,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| {
                DataError::format(
                    &path,
                    format!("cannot cut windows of {max_length} tokens, stride {doc_stride} ({e})"),
                )
            })?;
        Ok(Self {
            tokenizer,
            counter,
            path,
            max_length,
            doc_stride,
            pair_specials,
        })
    }

    /// Refuses, by its id, a question that must be cut into windows but leaves no more than
    /// `doc_stride` tokens of a window for the context: tokenizers' `Encoding::truncate` asserts
    /// that the stride is below the cut's length, a panic (a long question with a stride that
    /// fits the window found it: the `squad` fuzz target).
    fn check_room(&self, examples: &[SquadExample]) -> Result<(), DataError> {
        let budget = self.max_length - self.pair_specials; // above doc_stride: from_model_dir
        let questions: Vec<tokenizers::EncodeInput> = examples
            .iter()
            .map(|ex| ex.question.trim_start().into())
            .collect();
        let fail = |e| DataError::format(&self.path, format!("cannot tokenize questions ({e})"));
        let counted = self.counter.encode_batch(questions, false).map_err(fail)?;
        for (ex, q) in examples.iter().zip(&counted) {
            let q = q.get_ids().len();
            if q + self.doc_stride < budget {
                continue;
            }
            let c = self
                .counter
                .encode(ex.context.as_ref(), false)
                .map_err(fail)?
                .get_ids()
                .len();
            if q + c > budget {
                let msg = format!(
                    "question '{}' has {q} tokens: windows of --max-length {} \
                     (data.max_length) less the question and the special tokens leave {} for \
                     its context, not more than --doc-stride {} (data.doc_stride), so the \
                     windows cannot move on; raise --max-length or lower --doc-stride",
                    ex.id,
                    self.max_length,
                    budget.saturating_sub(q),
                    self.doc_stride
                );
                return Err(DataError::format(&self.path, msg));
            }
        }
        Ok(())
    }

    /// Every window of every example, in example order; each window's answer positions as
    /// `prepare_train_features` finds them (the answer is the first gold answer). Tokenized in
    /// parallel inside `tokenizers`.
    pub fn features(&self, examples: &[SquadExample]) -> Result<Vec<QaFeature>, DataError> {
        self.check_room(examples)?;
        // transformers strips the question's leading white space (some questions have a lot,
        // and it would eat into the window).
        let pair = |ex: &SquadExample| -> tokenizers::EncodeInput {
            (ex.question.trim_start().to_string(), ex.context.to_string()).into()
        };
        self.check_room(examples)?;
        let inputs: Vec<tokenizers::EncodeInput> = examples.iter().map(pair).collect();
        let encodings = match self.tokenizer.encode_batch_char_offsets(inputs, true) {
            Ok(e) => e,
            Err(batch_error) => {
                // Name the question that cannot be cut into windows.
                for ex in examples {
                    if let Err(e) = self.tokenizer.encode_char_offsets(pair(ex), true) {
                        let msg =
                            format!("question '{}': cannot tokenize into windows ({e})", ex.id);
                        return Err(DataError::format(&self.path, msg));
                    }
                }
                let msg = format!("cannot tokenize into windows ({batch_error})");
                return Err(DataError::format(&self.path, msg));
            }
        };
        let mut out = Vec::new();
        for (i, (ex, enc)) in examples.iter().zip(&encodings).enumerate() {
            out.push(window_feature(i, ex, enc));
            for w in enc.get_overflowing() {
                out.push(window_feature(i, ex, w));
            }
        }
        Ok(out)
    }
}

/// One window's feature: its context offsets and its answer's token positions.
fn window_feature(example: usize, ex: &SquadExample, w: &tokenizers::Encoding) -> QaFeature {
    let seq = w.get_sequence_ids();
    let offsets: Vec<Option<(usize, usize)>> = w
        .get_offsets()
        .iter()
        .zip(&seq)
        .map(|(&o, s)| (*s == Some(1)).then_some(o))
        .collect();
    let cls = seq.iter().position(Option::is_none).unwrap_or(0) as u32;
    let (start, end) = match ex.answers.first() {
        None => (cls, cls),
        Some(a) => answer_tokens(&offsets, a).unwrap_or((cls, cls)),
    };
    QaFeature {
        example,
        ids: w.get_ids().to_vec(),
        type_ids: w.get_type_ids().to_vec(),
        start,
        end,
        offsets,
    }
}

/// The first and last token of `a` in a window whose context tokens have `offsets`, or None when
/// the window does not hold all of it. As `prepare_train_features`: the start is the last token
/// starting at or before the answer's first character, the end the first token (from the
/// right) ending at or after its end; only context tokens are considered (transformers' start
/// search can run past the context into the final separator and padding when the answer starts
/// in the window's last context token).
fn answer_tokens(offsets: &[Option<(usize, usize)>], a: &Answer) -> Option<(u32, u32)> {
    let (start_char, end_char) = (a.start, a.start + a.text.chars().count());
    let first = offsets.iter().position(Option::is_some)?;
    let last = offsets.iter().rposition(Option::is_some)?;
    let at = |i: usize| offsets[i].unwrap_or((0, 0));
    if !(at(first).0 <= start_char && at(last).1 >= end_char) {
        return None;
    }
    let mut s = first;
    while s <= last && at(s).0 <= start_char {
        s += 1;
    }
    let mut e = last;
    while e >= first && at(e).1 >= end_char {
        if e == 0 {
            break;
        }
        e -= 1;
    }
    Some(((s - 1) as u32, (e + 1) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/squad/tiny-v2.json")
    }

    #[test]
    fn loads_the_fixture_and_splits_by_article() {
        let s = load_squad(&fixture()).unwrap();
        assert!(s.v2);
        assert_eq!(s.articles, 5);
        let impossible = s.examples.iter().filter(|e| e.answers.is_empty()).count();
        assert!(impossible >= 2, "{impossible}");
        let [train, val, test] = s.split_articles(0.15, 0.15, 42).unwrap();
        assert_eq!((train.articles, val.articles, test.articles), (3, 1, 1));
        assert_eq!(
            train.examples.len() + val.examples.len() + test.examples.len(),
            s.examples.len()
        );
        let arts = |x: &Squad| {
            let mut a: Vec<usize> = x.examples.iter().map(|e| e.article).collect();
            a.dedup();
            a
        };
        for a in arts(&val).iter().chain(&arts(&test)) {
            assert!(!arts(&train).contains(a), "article {a} in two splits");
        }
        let [_, _, other] = s.split_articles(0.15, 0.15, 7).unwrap();
        let [_, _, again] = s.split_articles(0.15, 0.15, 42).unwrap();
        assert_eq!(arts(&again), arts(&test), "seeded");
        let _ = other;
    }

    fn load_str(json: &str) -> Result<Squad, DataError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.json");
        std::fs::write(&p, json).unwrap();
        load_squad(&p)
    }

    fn err(json: &str) -> String {
        load_str(json).unwrap_err().to_string()
    }

    #[test]
    fn bad_records_are_named() {
        let one = |qa: &str| {
            format!(
                r#"{{"data": [{{"paragraphs": [{{"context": "Paris is in France.", "qas": [{qa}]}}]}}]}}"#
            )
        };
        let e = err(&one(
            r#"{"id": "q1", "question": "Where?", "answers": [{"text": "France", "answer_start": 30}]}"#,
        ));
        assert!(
            e.contains("bad.json")
                && e.contains("data[0].paragraphs[0].qas[0] (id 'q1').answers[0]"),
            "{e}"
        );
        assert!(e.contains("past the context's 19 characters"), "{e}");
        let e = err(&one(
            r#"{"id": "q2", "question": "Where?", "answers": [{"text": "France", "answer_start": 3}]}"#,
        ));
        assert!(
            e.contains("(id 'q2')") && e.contains("reads 'is is '"),
            "{e}"
        );
        let e = err(&one(r#"{"id": "q3", "answers": []}"#));
        assert!(
            e.contains("(id 'q3')") && e.contains("no 'question'"),
            "{e}"
        );
        let e = err(&one(r#"{"id": "q4", "question": "Where?"}"#));
        assert!(e.contains("no 'answers'"), "{e}");
        let e = err(&one(r#"{"id": "q5", "question": "Where?", "answers": []}"#));
        assert!(e.contains("is_impossible is not true"), "{e}");
        let e = err(r#"{"version": "v2.0"}"#);
        assert!(e.contains("no 'data' array"), "{e}");
        let e = err(&one(
            r#"{"id": "q6", "question": "Where?", "answers": [{"text": "France", "answer_start": 12}]},
               {"id": "q6", "question": "Which?", "answers": [{"text": "Paris", "answer_start": 0}]}"#,
        ));
        assert!(
            e.contains("qas[1] (id 'q6')") && e.contains("qas[0]"),
            "{e}"
        );
        // Characters, not bytes: "é" is two bytes.
        let ok = load_str(
            r#"{"data": [{"paragraphs": [{"context": "Café au lait à Paris.", "qas": [
                {"id": "c", "question": "Where?", "answers": [{"text": "Paris", "answer_start": 15}]}]}]}]}"#,
        )
        .unwrap();
        assert!(!ok.v2);
        assert_eq!(ok.examples[0].answers[0].start, 15);
    }

    /// A model folder with only a hand-built WordPiece `vocab.txt`: the letters a to j and "who",
    /// "is" (whitespace words, one token each).
    fn letters_vocab() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let words = "a b c d e f g h i j who is";
        let vocab: Vec<&str> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            .into_iter()
            .chain(words.split(' '))
            .collect();
        std::fs::write(dir.path().join("vocab.txt"), vocab.join("\n") + "\n").unwrap();
        dir
    }

    /// Windows and labels of a hand-built WordPiece tokenizer (whitespace words, one token each),
    /// against positions worked out by hand.
    #[test]
    fn windows_and_answer_positions() {
        let dir = letters_vocab();
        // Question "who is" (2 tokens) + [CLS] + 2 [SEP]: 5 of 9 tokens, so 4 context tokens a
        // window, consecutive windows sharing 2 (the stride).
        let enc = QaEncoder::from_model_dir(dir.path(), 9, 2).unwrap();
        let context: Arc<str> = "a b c d e f g h i j".into();
        let ex = |answer: Option<(&str, usize)>| SquadExample {
            id: "x".into(),
            question: "  who is".into(),
            context: context.clone(),
            answers: answer
                .map(|(t, s)| Answer {
                    text: t.into(),
                    start: s,
                })
                .into_iter()
                .collect(),
            article: 0,
        };
        // "d e": characters 6..9, tokens d and e.
        let f = enc.features(&[ex(Some(("d e", 6)))]).unwrap();
        // Windows of context words: a-d, c-f, e-h, g-j.
        assert_eq!(f.len(), 4);
        let first_word = |x: &QaFeature| x.offsets.iter().flatten().next().unwrap().0;
        let starts: Vec<usize> = f.iter().map(first_word).collect();
        assert_eq!(starts, vec![0, 4, 8, 12]);
        for x in &f {
            assert_eq!(x.ids.len(), 9);
            assert_eq!(x.ids[0], 2, "[CLS] first");
            assert_eq!(&x.ids[1..4], &[15, 16, 3], "who is [SEP]");
            assert_eq!(x.type_ids[..4], [0, 0, 0, 0]);
            assert_eq!(x.type_ids[4..], [1; 5]);
            assert_eq!(x.offsets[..4], [None; 4]);
            assert_eq!(x.offsets[8], None, "final [SEP]");
        }
        // Window a-d holds d but not e; c-f holds both: tokens 4 + (d - c) = 5 and 6.
        let pos: Vec<(u32, u32)> = f.iter().map(|x| (x.start, x.end)).collect();
        assert_eq!(pos, vec![(0, 0), (5, 6), (0, 0), (0, 0)]);
        // The last word, j (character 18): only in window g-j, as its last context token.
        let f = enc.features(&[ex(Some(("j", 18)))]).unwrap();
        let pos: Vec<(u32, u32)> = f.iter().map(|x| (x.start, x.end)).collect();
        assert_eq!(pos, vec![(0, 0), (0, 0), (0, 0), (7, 7)]);
        // Unanswerable: CLS everywhere, offsets kept for post-processing.
        let f = enc.features(&[ex(None)]).unwrap();
        assert!(f.iter().all(|x| (x.start, x.end) == (0, 0)));
        assert_eq!(
            f[1].offsets[4..8],
            [Some((4, 5)), Some((6, 7)), Some((8, 9)), Some((10, 11))]
        );
        // A question that leaves no room for the context: an error naming it.
        let mut long = ex(None);
        long.id = "long".into();
        long.question = "who is who is who is who is".into();
        let e = enc.features(&[ex(None), long]).unwrap_err().to_string();
        assert!(
            e.contains("question 'long'") && e.contains("windows"),
            "{e}"
        );
    }

    /// A question leaving the context no more than `doc_stride` tokens of a window that must be
    /// cut made tokenizers panic (`stride` must be strictly less than `max_len`, an assertion in
    /// `Encoding::truncate`); found by the `squad` fuzz target on the SQuAD fixture with windows
    /// of 30 tokens and a stride of 8. Now an error naming the question; windows too short for
    /// the pair's special tokens and the stride are refused up front.
    #[test]
    fn a_question_leaving_no_more_than_the_stride_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let words = "a b c d e f g h i j who is";
        let vocab: Vec<&str> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            .into_iter()
            .chain(words.split(' '))
            .collect();
        std::fs::write(dir.path().join("vocab.txt"), vocab.join("\n") + "\n").unwrap();
        let ex = |id: &str, question: &str| SquadExample {
            id: id.into(),
            question: question.into(),
            context: "a b c d e f g h i j".into(),
            answers: vec![],
            article: 0,
        };
        // 9 tokens, 3 of them special: "who is who is" leaves 2 for the context, the stride.
        let enc = QaEncoder::from_model_dir(dir.path(), 9, 2).unwrap();
        let e = enc
            .features(&[ex("ok", "who is"), ex("long", "who is who is")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("question 'long'") && e.contains("--doc-stride 2"),
            "{e}"
        );
        // One more token of room is enough; so is a context that needs no cut.
        assert!(enc.features(&[ex("q", "who is who")]).is_ok());
        let mut short = ex("short", "who is who is");
        short.context = "a b".into();
        assert!(enc.features(&[short]).is_ok());
        // [CLS] and two [SEP] plus a stride of 1 do not fit 4 tokens, nor the pair 2.
        for (max_length, stride) in [(4, 1), (2, 0), (3, 0)] {
            let e = QaEncoder::from_model_dir(dir.path(), max_length, stride)
                .err()
                .unwrap()
                .to_string();
            assert!(
                e.contains("tokenizer.json") && e.contains("too short"),
                "{e}"
            );
        }
        assert!(QaEncoder::from_model_dir(dir.path(), 4, 0).is_ok());
    }
}
