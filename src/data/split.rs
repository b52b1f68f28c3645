//! Seeded train/validation/test splitting.

use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

use super::{Dataset, Label, Splits, TaskKind};

/// Stratified, seeded split. Classification: per class (in class-index order),
/// shuffle that class's examples with one `StdRng::seed_from_u64(seed)` and
/// take `round(frac * n)` for validation, then for test, the rest for train, so
/// every split keeps the class proportions (matters for small classes and for
/// macro-F1). Regression: the same on one group holding all examples.
///
/// Each split is then shuffled with the same generator, so inputs grouped by
/// class (BBC folders) do not come out class-sorted. Deterministic for a given
/// seed and input order. All splits keep the input's `label_names` and task.
///
/// # Panics
/// If a fraction is outside `0..=1` or their sum exceeds 1.
pub fn stratified_split(ds: &Dataset, validation_frac: f64, test_frac: f64, seed: u64) -> Splits {
    let classes: Option<Vec<usize>> = (ds.task == TaskKind::Classification).then(|| {
        ds.examples
            .iter()
            .map(|e| match e.label {
                Label::Class(c) => c,
                Label::Value(_) => panic!("regression label in a classification dataset"),
            })
            .collect()
    });
    let [train, validation, test] = stratified_indices(
        ds.len(),
        classes.as_deref(),
        validation_frac,
        test_frac,
        seed,
    );
    let subset = |idx: Vec<usize>| Dataset {
        examples: idx.iter().map(|&i| ds.examples[i].clone()).collect(),
        label_names: ds.label_names.clone(),
        task: ds.task,
    };
    Splits {
        train: subset(train),
        validation: subset(validation),
        test: subset(test),
    }
}

/// [`stratified_split`] of `n` examples by index: `classes` gives each example's class (None:
/// one group, as for regression). Returns the train, validation and test indices, each
/// shuffled.
///
/// # Panics
/// If a fraction is outside `0..=1` or their sum exceeds 1.
pub fn stratified_indices(
    n: usize,
    classes: Option<&[usize]>,
    validation_frac: f64,
    test_frac: f64,
    seed: u64,
) -> [Vec<usize>; 3] {
    assert!(
        (0.0..=1.0).contains(&validation_frac)
            && (0.0..=1.0).contains(&test_frac)
            && validation_frac + test_frac <= 1.0,
        "split fractions must be in 0..=1 and sum to at most 1 (validation {validation_frac}, test {test_frac})"
    );
    let groups: Vec<Vec<usize>> = match classes {
        None => vec![(0..n).collect()],
        Some(classes) => {
            let mut groups: Vec<Vec<usize>> = Vec::new();
            for (i, &class) in classes.iter().enumerate() {
                if class >= groups.len() {
                    groups.resize(class + 1, Vec::new());
                }
                groups[class].push(i);
            }
            groups
        }
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut train, mut validation, mut test) = (Vec::new(), Vec::new(), Vec::new());
    for mut group in groups {
        group.shuffle(&mut rng);
        let n = group.len();
        let n_val = ((validation_frac * n as f64).round() as usize).min(n);
        let n_test = ((test_frac * n as f64).round() as usize).min(n - n_val);
        validation.extend_from_slice(&group[..n_val]);
        test.extend_from_slice(&group[n_val..n_val + n_test]);
        train.extend_from_slice(&group[n_val + n_test..]);
    }
    for idx in [&mut train, &mut validation, &mut test] {
        idx.shuffle(&mut rng);
    }
    [train, validation, test]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Example;

    fn dataset(labels: &[usize]) -> Dataset {
        Dataset {
            examples: labels
                .iter()
                .enumerate()
                .map(|(i, &c)| Example {
                    text_a: format!("doc {i}"),
                    text_b: None,
                    label: Label::Class(c),
                })
                .collect(),
            label_names: vec!["a".into(), "b".into(), "c".into()],
            task: TaskKind::Classification,
        }
    }

    fn count(ds: &Dataset, class: usize) -> usize {
        ds.examples
            .iter()
            .filter(|e| e.label == Label::Class(class))
            .count()
    }

    fn texts(ds: &Dataset) -> Vec<String> {
        ds.examples.iter().map(|e| e.text_a.clone()).collect()
    }

    #[test]
    fn stratified_counts_disjoint_and_deterministic() {
        // 50 x a, 30 x b, 20 x c, grouped by class like a folder corpus.
        let labels: Vec<usize> = [(0, 50), (1, 30), (2, 20)]
            .iter()
            .flat_map(|&(c, n)| std::iter::repeat_n(c, n))
            .collect();
        let ds = dataset(&labels);
        let s = stratified_split(&ds, 0.1, 0.2, 42);
        // round(0.1 * n) and round(0.2 * n) per class: a 5/10/35, b 3/6/21, c 2/4/14.
        let per_class = |d: &Dataset| (count(d, 0), count(d, 1), count(d, 2));
        assert_eq!(per_class(&s.validation), (5, 3, 2));
        assert_eq!(per_class(&s.test), (10, 6, 4));
        assert_eq!(per_class(&s.train), (35, 21, 14));
        let mut all = [texts(&s.train), texts(&s.validation), texts(&s.test)].concat();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 100);
        // Same seed, same result; another seed, another order.
        assert_eq!(
            texts(&stratified_split(&ds, 0.1, 0.2, 42).test),
            texts(&s.test)
        );
        assert_ne!(
            texts(&stratified_split(&ds, 0.1, 0.2, 43).test),
            texts(&s.test)
        );
        // Train is not class-sorted any more.
        assert_ne!(
            s.train.examples[..35]
                .iter()
                .filter(|e| e.label == Label::Class(0))
                .count(),
            35
        );
        assert_eq!(s.train.label_names, ds.label_names);
    }

    #[test]
    fn regression_plain_split() {
        let ds = Dataset {
            examples: (0..10)
                .map(|i| Example {
                    text_a: i.to_string(),
                    text_b: None,
                    label: Label::Value(i as f32),
                })
                .collect(),
            label_names: vec![],
            task: TaskKind::Regression,
        };
        let s = stratified_split(&ds, 0.2, 0.3, 1);
        assert_eq!((s.train.len(), s.validation.len(), s.test.len()), (5, 2, 3));
        assert_eq!(s.test.task, TaskKind::Regression);
    }

    #[test]
    fn tiny_classes_never_overflow() {
        // n = 1: round(0.5) = 1 to validation, test gets min(1, 0) = 0.
        let s = stratified_split(&dataset(&[0, 1, 1, 1]), 0.5, 0.5, 3);
        assert_eq!((s.validation.len(), s.test.len(), s.train.len()), (3, 1, 0));
    }

    #[test]
    #[should_panic(expected = "split fractions")]
    fn rejects_bad_fractions() {
        stratified_split(&dataset(&[0]), 0.7, 0.5, 0);
    }
}
