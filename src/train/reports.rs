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

/// Opens `safe.jsonl` in `output` for a run that has finished `epochs_done` epochs: the lines of
/// those epochs (the checkpointed part of an interrupted run) are kept, later ones dropped, so a
/// resumed run logs every round once. A fresh run (`epochs_done` 0) starts an empty file.
pub fn open_safe_log(output: &Path, epochs_done: usize) -> Result<std::fs::File> {
    reopen_epoch_log(&output.join("safe.jsonl"), epochs_done)
}

/// Opens a JSONL log whose lines carry an `epoch` for a run that has finished `epochs_done`
/// epochs: the lines of those epochs are kept, later ones (and lines without an epoch) dropped.
pub fn reopen_epoch_log(path: &Path, epochs_done: usize) -> Result<std::fs::File> {
    use std::io::Write;
    let kept: Vec<String> = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["epoch"].as_u64())
                .is_some_and(|e| (e as usize) <= epochs_done)
        })
        .map(str::to_string)
        .collect();
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

    /// Resuming after epoch 2 keeps the rounds of epochs 1-2 and drops those of the lost epoch 3;
    /// a fresh run starts empty.
    #[test]
    fn safe_log_keeps_the_checkpointed_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("safe.jsonl");
        let line = |round: u32, epoch: u32| format!(r#"{{"round":{round},"epoch":{epoch}}}"#);
        let lines: Vec<String> = [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)]
            .iter()
            .map(|&(r, e)| line(r, e))
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let mut f = open_safe_log(dir.path(), 2).unwrap();
        writeln!(f, "{}", line(5, 3)).unwrap();
        drop(f);
        let text = std::fs::read_to_string(&path).unwrap();
        let expected: Vec<String> = [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)]
            .iter()
            .map(|&(r, e)| line(r, e))
            .collect();
        assert_eq!(text.lines().collect::<Vec<_>>(), expected);
        drop(open_safe_log(dir.path(), 0).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }
}
