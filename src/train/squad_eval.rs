//! Extractive QA's answers and scores: the best span of each question over its windows
//! (transformers' `postprocess_qa_predictions`) and exact match / F1 as SQuAD's official
//! evaluation scripts (v1.1 `evaluate-v1.1.py`, v2.0 `evaluate-v2.0.py`) compute them.

use crate::data::squad::{QaFeature, SquadExample};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// One window's start and end logits, one per token.
pub type SpanLogits = (Vec<f32>, Vec<f32>);

/// Candidates kept per window and per question (`n_best_size`).
pub const N_BEST: usize = 20;
/// The longest answer, in tokens (`max_answer_length`).
pub const MAX_ANSWER_TOKENS: usize = 30;
/// v2: the empty answer wins when the null score beats the best span's by more than this.
pub const NULL_SCORE_DIFF_THRESHOLD: f32 = 0.0;

/// The answer of each example (in example order) from its windows' start and end logits
/// (`logits[f]` is feature `f`'s `(start, end)` per token), as `postprocess_qa_predictions`:
/// the `N_BEST` highest start and end logits of each window, every pair inside the context
/// with `start <= end` and at most `MAX_ANSWER_TOKENS` tokens scored `start + end`; with
/// `v2`, the null answer (the CLS token's score, the lowest over the windows) is a candidate too
/// and wins when it beats the best span's score by more than [`NULL_SCORE_DIFF_THRESHOLD`].
/// The text is the context between the span's character offsets.
pub fn predict_answers(
    examples: &[SquadExample],
    features: &[QaFeature],
    logits: &[SpanLogits],
    v2: bool,
) -> Vec<String> {
    let mut by_example: Vec<Vec<usize>> = vec![Vec::new(); examples.len()];
    for (f, feat) in features.iter().enumerate() {
        by_example[feat.example].push(f);
    }
    examples
        .iter()
        .zip(by_example)
        .map(|(ex, feats)| {
            let windows = feats.iter().map(|&f| (&features[f], &logits[f]));
            best_answer(ex, windows, v2)
        })
        .collect()
}

/// One candidate answer: character span (None: the null answer) and its logits.
struct Candidate {
    span: Option<(usize, usize)>,
    start_logit: f32,
    end_logit: f32,
}

impl Candidate {
    fn score(&self) -> f32 {
        self.start_logit + self.end_logit
    }
}

/// Indices of the `n` largest values, largest first (ties: the later index first, as numpy's
/// `argsort(x)[-1:-n-1:-1]` with a stable sort).
fn top_indices(x: &[f32], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    idx.into_iter().rev().take(n).collect()
}

fn best_answer<'a>(
    ex: &SquadExample,
    windows: impl Iterator<Item = (&'a QaFeature, &'a SpanLogits)>,
    v2: bool,
) -> String {
    let mut prelim: Vec<Candidate> = Vec::new();
    let mut null: Option<Candidate> = None;
    for (feat, (start, end)) in windows {
        let (Some(&s0), Some(&e0)) = (start.first(), end.first()) else {
            continue;
        };
        if null.as_ref().is_none_or(|n| n.score() > s0 + e0) {
            null = Some(Candidate {
                span: None,
                start_logit: s0,
                end_logit: e0,
            });
        }
        let offsets = &feat.offsets;
        for &s in &top_indices(start, N_BEST) {
            for &e in &top_indices(end, N_BEST) {
                let (Some(Some(so)), Some(Some(eo))) = (offsets.get(s), offsets.get(e)) else {
                    continue;
                };
                if e < s || e - s + 1 > MAX_ANSWER_TOKENS {
                    continue;
                }
                prelim.push(Candidate {
                    span: Some((so.0, eo.1)),
                    start_logit: start[s],
                    end_logit: end[e],
                });
            }
        }
    }
    let null_score = null.as_ref().map(Candidate::score);
    if v2 {
        prelim.extend(null);
    }
    // Stable: equal scores keep their order, as Python's `sorted(..., reverse=True)`.
    prelim.sort_by(|a, b| b.score().total_cmp(&a.score()));
    prelim.truncate(N_BEST);
    let chars: Vec<char> = ex.context.chars().collect();
    let text = |c: &Candidate| -> String {
        match c.span {
            Some((a, b)) if a < b && b <= chars.len() => chars[a..b].iter().collect(),
            _ => String::new(),
        }
    };
    let best_span = prelim.iter().find(|c| !text(c).is_empty());
    if !v2 {
        // transformers answers "empty" when nothing is left; the first candidate otherwise.
        return match prelim.first() {
            Some(c) if prelim.len() > 1 || !text(c).is_empty() => text(c),
            _ => "empty".into(),
        };
    }
    match (best_span, null_score) {
        (Some(c), Some(null)) if null - c.score() <= NULL_SCORE_DIFF_THRESHOLD => text(c),
        (Some(c), None) => text(c),
        _ => String::new(),
    }
}

/// SQuAD's `normalize_answer`: lower-case, drop ASCII punctuation (Python's
/// `string.punctuation`), replace the articles a / an / the (whole words) by a space, and
/// collapse white space.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punc: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    let no_articles = remove_articles(&no_punc);
    no_articles.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `re.sub(r'\b(a|an|the)\b', ' ', text)`: a word character is `\w` (alphanumeric or `_`).
fn remove_articles(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let boundary_before = i == 0 || !word(chars[i - 1]);
        let mut matched = 0;
        if boundary_before {
            // Alternatives in the regex's order: "a" is tried before "an", so "an" only matches
            // where "a" is not followed by a boundary.
            for art in ["a", "an", "the"] {
                let n = art.chars().count();
                let fits = chars.len() >= i + n && chars[i..i + n].iter().copied().eq(art.chars());
                if fits && (i + n == chars.len() || !word(chars[i + n])) {
                    matched = n;
                    break;
                }
            }
        }
        if matched > 0 {
            out.push(' ');
            i += matched;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

fn tokens(s: &str) -> Vec<String> {
    normalize_answer(s)
        .split_whitespace()
        .map(String::from)
        .collect()
}

fn overlap(gold: &[String], pred: &[String]) -> usize {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in gold {
        *counts.entry(t).or_default() += 1;
    }
    let mut same = 0;
    for t in pred {
        if let Some(c) = counts.get_mut(t.as_str()).filter(|c| **c > 0) {
            *c -= 1;
            same += 1;
        }
    }
    same
}

fn f1_of(same: usize, gold: usize, pred: usize) -> f64 {
    if same == 0 {
        return 0.0;
    }
    let p = same as f64 / pred as f64;
    let r = same as f64 / gold as f64;
    2.0 * p * r / (p + r)
}

/// v2.0's `compute_f1`: token-bag F1; when either side has no tokens, 1 if both have none.
pub fn f1_v2(gold: &str, pred: &str) -> f64 {
    let (g, p) = (tokens(gold), tokens(pred));
    if g.is_empty() || p.is_empty() {
        return f64::from(u8::from(g == p));
    }
    f1_of(overlap(&g, &p), g.len(), p.len())
}

/// v1.1's `f1_score`: token-bag F1, 0 without a common token (also when both are empty).
pub fn f1_v1(gold: &str, pred: &str) -> f64 {
    let (g, p) = (tokens(gold), tokens(pred));
    f1_of(overlap(&g, &p), g.len(), p.len())
}

pub fn exact(gold: &str, pred: &str) -> f64 {
    f64::from(u8::from(normalize_answer(gold) == normalize_answer(pred)))
}

/// The scores the official script prints, in percent: `exact` and `f1` over all questions
/// (v1.1's `exact_match` is `exact` here), and for v2.0 the same over the answerable
/// (`HasAns_*`) and unanswerable (`NoAns_*`) questions.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct QaScores {
    pub exact: f64,
    pub f1: f64,
    pub total: usize,
    #[serde(rename = "HasAns_exact", skip_serializing_if = "Option::is_none")]
    pub has_ans_exact: Option<f64>,
    #[serde(rename = "HasAns_f1", skip_serializing_if = "Option::is_none")]
    pub has_ans_f1: Option<f64>,
    #[serde(rename = "HasAns_total", skip_serializing_if = "Option::is_none")]
    pub has_ans_total: Option<usize>,
    #[serde(rename = "NoAns_exact", skip_serializing_if = "Option::is_none")]
    pub no_ans_exact: Option<f64>,
    #[serde(rename = "NoAns_f1", skip_serializing_if = "Option::is_none")]
    pub no_ans_f1: Option<f64>,
    #[serde(rename = "NoAns_total", skip_serializing_if = "Option::is_none")]
    pub no_ans_total: Option<usize>,
}

/// Scores `predictions` (question id -> answer text; a missing one counts 0) as the official
/// script of the data's version does. v2.0: gold answers that normalize to nothing are dropped,
/// an unanswerable question's only gold answer is the empty string; v1.1: the max over the gold
/// answers as given.
pub fn score(
    examples: &[SquadExample],
    predictions: &BTreeMap<String, String>,
    v2: bool,
) -> QaScores {
    let mut per: Vec<(bool, f64, f64)> = Vec::with_capacity(examples.len());
    for ex in examples {
        let has_ans = !ex.answers.is_empty();
        let Some(pred) = predictions.get(&ex.id) else {
            per.push((has_ans, 0.0, 0.0));
            continue;
        };
        let (e, f) = if v2 {
            let mut gold: Vec<&str> = ex
                .answers
                .iter()
                .map(|a| a.text.as_str())
                .filter(|t| !normalize_answer(t).is_empty())
                .collect();
            if gold.is_empty() {
                gold.push("");
            }
            let max =
                |m: fn(&str, &str) -> f64| gold.iter().map(|g| m(g, pred)).fold(0.0, f64::max);
            (max(exact), max(f1_v2))
        } else {
            let max = |m: fn(&str, &str) -> f64| {
                ex.answers
                    .iter()
                    .map(|g| m(&g.text, pred))
                    .fold(0.0, f64::max)
            };
            (max(exact), max(f1_v1))
        };
        per.push((has_ans, e, f));
    }
    let mean = |sel: &dyn Fn(bool) -> bool| -> Option<(f64, f64, usize)> {
        let xs: Vec<&(bool, f64, f64)> = per.iter().filter(|p| sel(p.0)).collect();
        (!xs.is_empty()).then(|| {
            let n = xs.len() as f64;
            let e: f64 = xs.iter().map(|p| p.1).sum();
            let f: f64 = xs.iter().map(|p| p.2).sum();
            (100.0 * e / n, 100.0 * f / n, xs.len())
        })
    };
    let all = mean(&|_| true).unwrap_or((0.0, 0.0, 0));
    let (has, no) = if v2 {
        (mean(&|h| h), mean(&|h| !h))
    } else {
        (None, None)
    };
    QaScores {
        exact: all.0,
        f1: all.1,
        total: all.2,
        has_ans_exact: has.map(|x| x.0),
        has_ans_f1: has.map(|x| x.1),
        has_ans_total: has.map(|x| x.2),
        no_ans_exact: no.map(|x| x.0),
        no_ans_f1: no.map(|x| x.1),
        no_ans_total: no.map(|x| x.2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::squad::{load_squad, Answer};
    use std::path::Path;
    use std::sync::Arc;

    #[test]
    fn normalization_as_the_official_script() {
        assert_eq!(normalize_answer("The  Eiffel Tower!"), "eiffel tower");
        assert_eq!(
            normalize_answer("a cat, an apple & the dog"),
            "cat apple dog"
        );
        // Articles only as whole words; punctuation goes first, so "the-end" is "theend".
        assert_eq!(
            normalize_answer("theatre another banana"),
            "theatre another banana"
        );
        assert_eq!(normalize_answer("the-end"), "theend");
        assert_eq!(normalize_answer("A.B. the_x"), "ab thex");
        assert_eq!(normalize_answer("an"), "");
        assert_eq!(normalize_answer("  São\tPaulo\n"), "são paulo");
        // Non-ASCII punctuation stays (string.punctuation is ASCII).
        assert_eq!(normalize_answer("“quoted”"), "“quoted”");
    }

    #[test]
    fn f1_and_exact_by_hand() {
        assert_eq!(exact("the Eiffel Tower", "Eiffel tower."), 1.0);
        // gold {gustave, eiffel}, pred {engineer, gustave, eiffel}: p 2/3, r 1, F1 0.8.
        assert!((f1_v2("Gustave Eiffel", "the engineer Gustave Eiffel") - 0.8).abs() < 1e-12);
        // A repeated token counts as often as both sides have it: gold [x, x, y], pred [x]:
        // p 1, r 1/3.
        assert!((f1_v2("x x y", "x") - 0.5).abs() < 1e-12);
        // Empty sides: v2 scores agreement, v1.1 always 0.
        assert_eq!(f1_v2("", ""), 1.0);
        assert_eq!(f1_v2("the", ""), 1.0, "'the' normalizes to nothing");
        assert_eq!(f1_v2("Paris", ""), 0.0);
        assert_eq!(f1_v1("", ""), 0.0);
    }

    fn ex(id: &str, golds: &[&str]) -> SquadExample {
        SquadExample {
            id: id.into(),
            question: "?".into(),
            context: "".into(),
            answers: golds
                .iter()
                .map(|t| Answer {
                    text: (*t).into(),
                    start: 0,
                })
                .collect(),
            article: 0,
        }
    }

    #[test]
    fn scores_by_hand() {
        let examples = [
            ex("a", &["Paris", "Paris, France"]),
            ex("b", &["chemical energy"]),
            ex("c", &[]),
            ex("d", &[]),
        ];
        let preds: BTreeMap<String, String> = [
            ("a", "paris france"), // exact with the second gold
            ("b", "light energy"), // F1 1/2
            ("c", ""),             // correct abstention
            ("d", "something"),    // wrong: should abstain
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
        let s = score(&examples, &preds, true);
        assert_eq!(s.total, 4);
        assert!((s.exact - 50.0).abs() < 1e-9, "{s:?}");
        assert!((s.f1 - 62.5).abs() < 1e-9, "{s:?}");
        assert_eq!(s.has_ans_total, Some(2));
        assert!((s.has_ans_f1.unwrap() - 75.0).abs() < 1e-9);
        assert!((s.no_ans_exact.unwrap() - 50.0).abs() < 1e-9);
        // v1.1 has no breakdown.
        let s1 = score(&examples[..2], &preds, false);
        assert!((s1.exact - 50.0).abs() < 1e-9 && (s1.f1 - 75.0).abs() < 1e-9);
        assert_eq!(s1.has_ans_total, None);
    }

    fn feature(example: usize, offsets: Vec<Option<(usize, usize)>>) -> QaFeature {
        let n = offsets.len();
        QaFeature {
            example,
            ids: vec![0; n],
            type_ids: vec![0; n],
            start: 0,
            end: 0,
            offsets,
        }
    }

    /// Post-processing: spans only in the context, end not before start, the best sum over both
    /// windows; v2's null answer wins only when its score is higher.
    #[test]
    fn best_span_over_windows() {
        let context: Arc<str> = "aa bb cc dd".into();
        let mut e = ex("q", &["cc"]);
        e.context = context;
        // Window 0: [CLS] q [SEP] aa bb cc [SEP]; window 1: [CLS] q [SEP] bb cc dd [SEP].
        let w0 = feature(
            0,
            vec![
                None,
                None,
                None,
                Some((0, 2)),
                Some((3, 5)),
                Some((6, 8)),
                None,
            ],
        );
        let w1 = feature(
            0,
            vec![
                None,
                None,
                None,
                Some((3, 5)),
                Some((6, 8)),
                Some((9, 11)),
                None,
            ],
        );
        // The question token (1) has the highest start logit but is not context; window 1's
        // "cc dd" (start 4, end 5) beats window 0's best, "bb" (4, 4).
        let l0 = (
            vec![0.0, 9.0, 0.0, 0.0, 3.0, 0.0, 0.0],
            vec![0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0],
        );
        let l1 = (
            vec![1.0, 9.0, 0.0, 0.0, 4.0, 0.0, 0.0],
            vec![1.0, 0.0, 0.0, 3.0, 0.0, 2.5, 0.0],
        );
        let feats = [w0.clone(), w1.clone()];
        let got = predict_answers(&[e.clone()], &feats, &[l0.clone(), l1.clone()], true);
        assert_eq!(got, vec!["cc dd".to_string()]);
        // Pairs that would score higher are refused: the question token's start (9), and in
        // window 1 start 4 with end 3 (4 + 3 = 7), an end before its start.
        // A null score above the best span (6.5): the empty answer. The null score is the
        // lowest CLS score over the windows (0 + 0 in window 0), so raise both.
        let (mut n0, mut n1) = (l0.clone(), l1.clone());
        n0.0[0] = 4.0;
        n0.1[0] = 3.0;
        n1.0[0] = 3.5;
        n1.1[0] = 3.5;
        let got = predict_answers(&[e.clone()], &feats, &[n0.clone(), n1.clone()], true);
        assert_eq!(got, vec![String::new()]);
        // Without v2 the span stands.
        let got = predict_answers(&[e], &feats, &[n0, n1], false);
        assert_eq!(got, vec!["cc dd".to_string()]);
    }

    /// The fixture's gold answers as predictions score 100 (the first gold of each answerable
    /// question, the empty string for the others); its answers are where they say.
    #[test]
    fn fixture_gold_scores_100() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/squad/tiny-v2.json");
        let s = load_squad(&p).unwrap();
        let preds: BTreeMap<String, String> = s
            .examples
            .iter()
            .map(|e| {
                let t = e
                    .answers
                    .first()
                    .map(|a| a.text.clone())
                    .unwrap_or_default();
                (e.id.clone(), t)
            })
            .collect();
        let sc = score(&s.examples, &preds, true);
        assert_eq!((sc.exact, sc.f1), (100.0, 100.0));
        assert_eq!(sc.no_ans_total, Some(4));
    }

    /// A fixture of tricky cases (articles, punctuation, several gold answers, partial overlaps,
    /// a repeated token, gold answers that normalize to nothing, unanswerables answered and not):
    /// the scores worked out by hand, and, when `SAFETUNE_SQUAD_EVAL` names the official
    /// `evaluate-v2.0.py` (not shipped here), exactly what it prints.
    #[test]
    fn tricky_fixture_scores_as_the_official_script() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/squad");
        let (data, preds_file) = (
            dir.join("tricky-v2.json"),
            dir.join("tricky-predictions.json"),
        );
        let s = load_squad(&data).unwrap();
        let preds: BTreeMap<String, String> =
            serde_json::from_slice(&std::fs::read(&preds_file).unwrap()).unwrap();
        let got = score(&s.examples, &preds, s.v2);
        // Exact: articles, punct, multi, abstain-ok, article-only. F1 adds partial (8/9) and
        // repeat (1/2). HasAns: the 8 with answers (article-only among them).
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(got.exact, 50.0), "{got:?}");
        assert!(
            close(got.f1, 100.0 * (5.0 + 8.0 / 9.0 + 0.5) / 10.0),
            "{got:?}"
        );
        assert_eq!((got.has_ans_total, got.no_ans_total), (Some(8), Some(2)));
        assert!(close(got.has_ans_exact.unwrap(), 50.0));
        assert!(close(
            got.has_ans_f1.unwrap(),
            100.0 * (4.0 + 8.0 / 9.0 + 0.5) / 8.0
        ));
        assert!(close(got.no_ans_exact.unwrap(), 50.0) && close(got.no_ans_f1.unwrap(), 50.0));

        // The answerable ones under v1.1's rules: the same exact match, but "article-only" (an
        // empty prediction against gold answers that normalize to nothing) scores F1 0.
        let answerable: Vec<SquadExample> = s
            .examples
            .iter()
            .filter(|e| !e.answers.is_empty())
            .cloned()
            .collect();
        let v1 = score(&answerable, &preds, false);
        assert_eq!((v1.total, v1.has_ans_total), (8, None));
        assert!(close(v1.exact, 50.0), "{v1:?}");
        assert!(
            close(v1.f1, 100.0 * (3.0 + 8.0 / 9.0 + 0.5) / 8.0),
            "{v1:?}"
        );

        let Some(script) = std::env::var_os("SAFETUNE_SQUAD_EVAL") else {
            println!("official script not run: SAFETUNE_SQUAD_EVAL unset");
            return;
        };
        let out = std::process::Command::new("python3")
            .arg(&script)
            .arg(&data)
            .arg(&preds_file)
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let official: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ours = serde_json::to_value(&got).unwrap();
        let (o, w) = (official.as_object().unwrap(), ours.as_object().unwrap());
        assert_eq!(o.len(), w.len(), "keys: official {official}, ours {ours}");
        for (k, v) in o {
            let (a, b) = (v.as_f64().unwrap(), w[k].as_f64().unwrap());
            assert!((a - b).abs() < 1e-9, "{k}: official {a}, ours {b}");
        }
    }
}
