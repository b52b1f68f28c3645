//! Evaluation metrics as pure functions over predictions and gold labels.
//!
//! Undefined values (empty input, zero variance, ...) are reported as 0.0, not
//! NaN, so "best checkpoint" comparisons and JSON logs stay well-behaved.
//! All functions panic if the two slices differ in length (a caller bug);
//! class-based ones also panic on a class index `>= num_classes`.

fn check_len(a: usize, b: usize) {
    assert_eq!(a, b, "metric inputs differ in length");
}

/// Fraction of exact matches; 0.0 for empty input.
pub fn accuracy(pred: &[usize], gold: &[usize]) -> f64 {
    check_len(pred.len(), gold.len());
    if gold.is_empty() {
        return 0.0;
    }
    let hits = pred.iter().zip(gold).filter(|(p, g)| p == g).count();
    hits as f64 / gold.len() as f64
}

/// `confusion[g][p]`: how many examples of gold class `g` were predicted `p`.
pub fn confusion(pred: &[usize], gold: &[usize], num_classes: usize) -> Vec<Vec<u64>> {
    check_len(pred.len(), gold.len());
    let mut m = vec![vec![0u64; num_classes]; num_classes];
    for (&p, &g) in pred.iter().zip(gold) {
        m[g][p] += 1;
    }
    m
}

/// Unweighted mean of per-class F1 = 2TP / (2TP + FP + FN).
///
/// Like scikit-learn's default `labels` (the union of gold and predicted
/// labels), classes that occur in neither gold nor pred are left out of the
/// mean: their F1 is 0/0 and counting them would penalise a model for classes
/// the evaluation set simply lacks. A class with support but never predicted
/// (or predicted but absent from gold) counts with F1 = 0. 0.0 for empty input.
pub fn macro_f1(pred: &[usize], gold: &[usize], num_classes: usize) -> f64 {
    let m = confusion(pred, gold, num_classes);
    let f1s: Vec<f64> = (0..num_classes)
        .filter_map(|c| {
            let tp = m[c][c];
            let fn_ = m[c].iter().sum::<u64>() - tp;
            let fp = m.iter().map(|row| row[c]).sum::<u64>() - tp;
            let denom = 2 * tp + fp + fn_;
            (denom > 0).then(|| 2.0 * tp as f64 / denom as f64)
        })
        .collect();
    if f1s.is_empty() {
        0.0
    } else {
        f1s.iter().sum::<f64>() / f1s.len() as f64
    }
}

/// One class's scores, as scikit-learn's `classification_report` gives them: precision
/// TP / (TP + FP), recall TP / (TP + FN), F1 their harmonic mean, support the gold count. A ratio
/// whose denominator is 0 (never predicted; no support) is 0.0, scikit-learn's `zero_division`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ClassScores {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
}

/// [`ClassScores`] of every class, in class order; `names[k]` labels class k (its index where
/// `names` has none).
pub fn per_class(pred: &[usize], gold: &[usize], names: &[String]) -> Vec<ClassScores> {
    let n = names
        .len()
        .max(pred.iter().chain(gold).map(|&c| c + 1).max().unwrap_or(0));
    let m = confusion(pred, gold, n);
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    (0..n)
        .map(|k| {
            let tp = m[k][k];
            let support: u64 = m[k].iter().sum();
            let predicted: u64 = m.iter().map(|row| row[k]).sum();
            let (precision, recall) = (ratio(tp, predicted), ratio(tp, support));
            ClassScores {
                label: names.get(k).cloned().unwrap_or_else(|| k.to_string()),
                precision,
                recall,
                f1: ratio(2 * tp, predicted + support),
                support,
            }
        })
        .collect()
}

/// Matthews correlation coefficient, multiclass form (Gorodkin 2004, as in
/// scikit-learn): with `c` correct, `s` total, `t_k` gold and `p_k` predicted
/// counts of class k,
/// `(c*s - Σ p_k t_k) / sqrt((s² - Σ p_k²)(s² - Σ t_k²))`.
/// Reduces to the usual binary MCC for 2 classes. 0.0 when the denominator is
/// 0 (e.g. a constant prediction), which is GLUE's convention for CoLA.
pub fn matthews_corrcoef(pred: &[usize], gold: &[usize], num_classes: usize) -> f64 {
    let m = confusion(pred, gold, num_classes);
    let s = pred.len() as f64;
    let c: f64 = (0..num_classes).map(|k| m[k][k] as f64).sum();
    let t: Vec<f64> = m.iter().map(|row| row.iter().sum::<u64>() as f64).collect();
    let p: Vec<f64> = (0..num_classes)
        .map(|k| m.iter().map(|row| row[k]).sum::<u64>() as f64)
        .collect();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let denom = ((s * s - dot(&p, &p)) * (s * s - dot(&t, &t))).sqrt();
    if denom == 0.0 {
        0.0
    } else {
        (c * s - dot(&p, &t)) / denom
    }
}

/// Pearson correlation; 0.0 when fewer than 2 points or either side is constant.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    check_len(x.len(), y.len());
    if x.len() < 2 {
        return 0.0;
    }
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    let denom = (sxx * syy).sqrt();
    if denom == 0.0 {
        0.0
    } else {
        sxy / denom
    }
}

/// Spearman rank correlation: Pearson of the ranks, ties getting the average
/// of the ranks they span (as scipy), so it stays exact for tied STS-B scores.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    check_len(x.len(), y.len());
    pearson(&ranks(x), &ranks(y))
}

/// 1-based ranks with ties averaged.
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i + 1;
        while j < order.len() && v[order[j]] == v[order[i]] {
            j += 1;
        }
        // Positions i..j (0-based) share ranks i+1..=j, whose mean is (i + 1 + j) / 2.
        let avg = (i + 1 + j) as f64 / 2.0;
        for &k in &order[i..j] {
            r[k] = avg;
        }
        i = j;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} != {b}");
    }

    #[test]
    fn accuracy_sklearn_example() {
        // sklearn docs: accuracy_score([0, 1, 2, 3], [0, 2, 1, 3]) = 0.5.
        close(accuracy(&[0, 2, 1, 3], &[0, 1, 2, 3]), 0.5);
        close(accuracy(&[], &[]), 0.0);
    }

    #[test]
    fn macro_f1_by_hand() {
        // sklearn docs: y_true [0,1,2,0,1,2], y_pred [0,2,1,0,0,1].
        // class 0: TP 2, FP 1, FN 0 -> 4/5 = 0.8; class 1: TP 0 -> 0; class 2: TP 0 -> 0.
        // macro = 0.8 / 3 = 0.2666...
        let (gold, pred) = ([0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1]);
        close(macro_f1(&pred, &gold, 3), 0.8 / 3.0);
        // Classes 3 and 4 occur nowhere: excluded, same value.
        close(macro_f1(&pred, &gold, 5), 0.8 / 3.0);
        // Class 1 has support but is never predicted: F1 0 counts.
        // class 0: TP 2 FP 1 FN 0 -> 0.8; class 1: TP 0 FN 1 -> 0; mean 0.4.
        close(macro_f1(&[0, 0, 0], &[0, 0, 1], 2), 0.4);
        close(macro_f1(&[1, 0], &[1, 0], 2), 1.0);
        close(macro_f1(&[], &[], 2), 0.0);
    }

    /// sklearn's `classification_report` example: y_true [0,1,2,2,2], y_pred [0,0,2,2,1] gives
    /// class 0: precision 1/2, recall 1, F1 2/3, support 1; class 1: 0, 0, 0, 1; class 2:
    /// precision 1, recall 2/3, F1 0.8, support 3.
    #[test]
    fn per_class_scores_and_confusion_by_hand() {
        let (gold, pred) = ([0, 1, 2, 2, 2], [0, 0, 2, 2, 1]);
        let names: Vec<String> = ["ant", "bee", "cat"].map(String::from).to_vec();
        let r = per_class(&pred, &gold, &names);
        let got: Vec<(&str, f64, f64, f64, u64)> = r
            .iter()
            .map(|c| (c.label.as_str(), c.precision, c.recall, c.f1, c.support))
            .collect();
        assert_eq!(got[1], ("bee", 0.0, 0.0, 0.0, 1));
        let want = [
            ("ant", 0.5, 1.0, 2.0 / 3.0, 1),
            ("cat", 1.0, 2.0 / 3.0, 0.8, 3),
        ];
        for (g, w) in [got[0], got[2]].iter().zip(want) {
            assert_eq!((g.0, g.4), (w.0, w.4));
            for (a, b) in [(g.1, w.1), (g.2, w.2), (g.3, w.3)] {
                close(a, b);
            }
        }
        // The per-class F1s average to macro F1 when every class occurs.
        close(
            r.iter().map(|c| c.f1).sum::<f64>() / 3.0,
            macro_f1(&pred, &gold, 3),
        );
        // Rows are gold classes, columns predictions.
        assert_eq!(
            confusion(&pred, &gold, 3),
            [[1, 0, 0], [1, 0, 0], [0, 1, 2]]
        );
        // A class without a name, and a class named but absent.
        let r = per_class(&[0, 3], &[0, 3], &names);
        assert_eq!(r.len(), 4);
        assert_eq!((r[3].label.as_str(), r[3].support, r[3].f1), ("3", 1, 1.0));
        assert_eq!((r[1].support, r[1].precision), (0, 0.0));
    }

    #[test]
    fn mcc_binary_matches_2x2_formula() {
        // sklearn docs: y_true [+1,+1,+1,-1], y_pred [+1,-1,+1,+1] -> -1/3.
        // With -1 -> 0: TP 2, FN 1, FP 1, TN 0;
        // (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (0 - 1) / sqrt(3*3*1*1) = -1/3.
        close(
            matthews_corrcoef(&[1, 0, 1, 1], &[1, 1, 1, 0], 2),
            -1.0 / 3.0,
        );
        close(matthews_corrcoef(&[0, 1, 1, 0], &[0, 1, 1, 0], 2), 1.0);
        close(matthews_corrcoef(&[1, 0, 0, 1], &[0, 1, 1, 0], 2), -1.0);
        // Constant prediction: denominator 0 -> 0.
        close(matthews_corrcoef(&[1, 1, 1], &[0, 1, 0], 2), 0.0);
        close(matthews_corrcoef(&[], &[], 2), 0.0);
    }

    #[test]
    fn mcc_multiclass_by_hand() {
        // gold [0,0,1,1,2,2], pred [0,0,1,2,2,2]: c = 5, s = 6, t = [2,2,2], p = [2,1,3].
        // Σpt = 4 + 2 + 6 = 12, Σp² = 14, Σt² = 12.
        // (5*6 - 12) / sqrt((36 - 14)(36 - 12)) = 18 / sqrt(528) = 0.78335...
        let v = matthews_corrcoef(&[0, 0, 1, 2, 2, 2], &[0, 0, 1, 1, 2, 2], 3);
        close(v, 18.0 / 528f64.sqrt());
        // Unused 4th class changes nothing.
        close(
            matthews_corrcoef(&[0, 0, 1, 2, 2, 2], &[0, 0, 1, 1, 2, 2], 4),
            v,
        );
    }

    #[test]
    fn pearson_by_hand() {
        close(pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]), 1.0);
        close(pearson(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), -1.0);
        // Means 2.5; dx = [-1.5,-.5,.5,1.5], dy = [-1.5,.5,-.5,1.5];
        // Σdxdy = 2.25 - .25 - .25 + 2.25 = 4, Σdx² = Σdy² = 5 -> 4/5.
        close(pearson(&[1.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 4.0]), 0.8);
        close(pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), 0.0);
        close(pearson(&[1.0], &[2.0]), 0.0);
    }

    #[test]
    fn spearman_with_ties() {
        // Monotone but non-linear -> 1.
        close(spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 4.0, 9.0, 16.0]), 1.0);
        // x ranks [1, 2.5, 2.5, 4], y ranks [1, 2, 3, 4]; means 2.5;
        // dx = [-1.5,0,0,1.5], dy = [-1.5,-.5,.5,1.5]; Σdxdy = 4.5, Σdx² = 4.5, Σdy² = 5
        // -> 4.5 / sqrt(22.5) = 3 / sqrt(10) = 0.9487 (scipy.stats.spearmanr agrees).
        close(
            spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 4.0]),
            3.0 / 10f64.sqrt(),
        );
        assert_eq!(ranks(&[3.0, 1.0, 3.0, 3.0]), [3.0, 1.0, 3.0, 3.0]);
        assert_eq!(ranks(&[0.5, 0.5, 0.1]), [2.5, 2.5, 1.0]);
    }
}
