//! SAFE's outcome for people and tools: `safe_state.json` (kept apart from PEFT's config) and the
//! two PNG plots (importance over epochs, freezing pattern).

use crate::report::plots;
use crate::safe::SafeController;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

#[derive(Serialize)]
struct AdapterOutcome<'a> {
    adapter: &'a str,
    frozen_at_epoch: Option<usize>,
    last_importance: f64,
    candidate: bool,
}

#[derive(Serialize)]
struct SafeState<'a> {
    warmup_end_epoch: Option<usize>,
    final_freeze_epoch: Option<usize>,
    tau_final: Option<f64>,
    thresholds: &'a [f64],
    adapters: Vec<AdapterOutcome<'a>>,
}

pub fn write_safe_reports(
    out: &Path,
    names: &[String],
    c: &SafeController,
    epochs: usize,
) -> Result<()> {
    let last: Vec<f64> = c
        .history()
        .last()
        .cloned()
        .unwrap_or_else(|| vec![f64::NAN; names.len()]);
    let state = SafeState {
        warmup_end_epoch: c.warmup_end(),
        final_freeze_epoch: c.final_epoch(),
        tau_final: c.tau_final_value(),
        thresholds: c.thresholds(),
        adapters: names
            .iter()
            .enumerate()
            .map(|(i, n)| AdapterOutcome {
                adapter: n,
                frozen_at_epoch: c.frozen_at()[i],
                last_importance: last[i],
                candidate: c.candidates().get(i).copied().unwrap_or(false),
            })
            .collect(),
    };
    crate::files::write_atomic(
        &out.join("safe_state.json"),
        serde_json::to_string_pretty(&state)?.as_bytes(),
    )?;
    plots::plot_importance(
        &out.join("importance.png"),
        names,
        c.history(),
        c.thresholds(),
    )?;
    plots::plot_freezing(
        &out.join("freezing.png"),
        names,
        c.frozen_at(),
        epochs,
        &last,
    )?;
    Ok(())
}

/// Opens `safe.jsonl` in `output` for a run resumed at global step `resumed_at` (None: a fresh
/// run, which starts an empty file): the rounds up to that step (the checkpointed part of an
/// interrupted run) are kept, later ones dropped, so a resumed run logs every round once.
pub fn open_safe_log(output: &Path, resumed_at: Option<usize>) -> Result<std::fs::File> {
    reopen_log(&output.join("safe.jsonl"), "step", resumed_at)
}

/// Opens a JSONL log whose lines carry the global optimizer step in `field`, for a run resumed at
/// global step `resumed_at`: the lines up to that step are kept, later ones (and lines without the
/// field) dropped. A fresh run (`resumed_at` None) starts an empty file.
pub fn reopen_log(path: &Path, field: &str, resumed_at: Option<usize>) -> Result<std::fs::File> {
    use std::io::Write;
    let kept: Vec<String> = match resumed_at {
        None => Vec::new(),
        Some(at) => std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v[field].as_u64())
                    .is_some_and(|s| (s as usize) <= at)
            })
            .map(str::to_string)
            .collect(),
    };
    let mut f = crate::files::create_file(path)?;
    for l in kept {
        writeln!(f, "{l}").with_context(|| format!("{}: cannot write", path.display()))?;
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Resuming at global step 20 keeps the rounds logged up to step 20 and drops those of the
    /// lost steps after it; a fresh run starts empty.
    #[test]
    fn safe_log_keeps_the_checkpointed_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("safe.jsonl");
        let line = |round: u32, step: u32| format!(r#"{{"round":{round},"step":{step}}}"#);
        let lines: Vec<String> = [(1, 5), (2, 10), (3, 15), (4, 20), (5, 25)]
            .iter()
            .map(|&(r, s)| line(r, s))
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let mut f = open_safe_log(dir.path(), Some(20)).unwrap();
        writeln!(f, "{}", line(5, 25)).unwrap();
        drop(f);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().collect::<Vec<_>>(), lines);
        let mut f = open_safe_log(dir.path(), Some(12)).unwrap();
        writeln!(f, "{}", line(3, 15)).unwrap();
        drop(f);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().collect::<Vec<_>>(), lines[..3]);
        drop(open_safe_log(dir.path(), None).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }
}
