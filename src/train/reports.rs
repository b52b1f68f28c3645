//! SAFE's outcome for people and tools: `safe_state.json` (kept apart from PEFT's config) and the
//! two PNG plots (importance over epochs, freezing pattern).

use crate::report::plots;
use crate::safe::SafeController;
use anyhow::Result;
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
    super::checkpoint::write_atomic(
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
