//! One line per optimizer step: `steps.jsonl` in the output folder, and, when stderr is not a
//! terminal (a job's log file, a pipe), a plain progress line every tenth of an epoch instead of
//! the progress bar.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One line of `steps.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepLine {
    pub epoch: usize,
    /// 1-based within the epoch.
    pub step: usize,
    /// 1-based over the run (the optimizer steps done, this one included).
    pub global_step: usize,
    /// Mean loss of the step's passes (micro-batches).
    pub loss: f64,
    /// The learning rate the step was taken with.
    pub lr: f64,
    /// Wall seconds of the step: its passes, clipping and the optimizer update (not SAFE's
    /// importance measurement at a round's end).
    pub step_s: f64,
    /// Peak bytes the step added to what was live before it (see `run::EpochMemory`).
    pub step_mem_bytes: usize,
    /// Tokens the step fed the model.
    pub tokens: usize,
    /// SAFE measured its importance on this step (it ran the measuring plan, `plan.jsonl`).
    #[serde(default)]
    pub measured: bool,
}

/// `steps.jsonl`, open for appending a run's steps.
pub struct StepLog {
    path: PathBuf,
    file: std::fs::File,
}

impl StepLog {
    /// Opens `output/steps.jsonl` for a run resumed at global step `resumed_at`: the steps up to
    /// it are kept (the checkpointed part of an interrupted run), later ones dropped, so a resumed
    /// run logs every step once; a fresh run (None) starts an empty file.
    pub fn open(output: &Path, resumed_at: Option<usize>) -> Result<Self> {
        let path = output.join("steps.jsonl");
        let file = super::reports::reopen_log(&path, "global_step", resumed_at)?;
        Ok(Self { path, file })
    }

    pub fn write(&mut self, line: &StepLine) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(line)?)
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

/// Steps between two plain progress lines: a tenth of the epoch, at least 1.
pub fn progress_every(steps_per_epoch: usize) -> usize {
    (steps_per_epoch / 10).max(1)
}

/// The plain progress line after step `step` (1-based) of `epoch`: the epoch's mean loss so far,
/// the step's learning rate and the epoch's token rate.
pub fn progress_line(
    epoch: usize,
    epochs: usize,
    step: usize,
    steps: usize,
    loss: f64,
    lr: f64,
    tokens_per_s: f64,
) -> String {
    format!("epoch {epoch}/{epochs} step {step}/{steps} loss {loss:.4} lr {lr:.1e} {tokens_per_s:.0} tok/s")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(epoch: usize, step: usize, global_step: usize) -> StepLine {
        StepLine {
            epoch,
            step,
            global_step,
            loss: 0.5,
            lr: 1e-3,
            step_s: 0.1,
            step_mem_bytes: 10,
            tokens: 7,
            measured: false,
        }
    }

    /// Resuming after global step 2 (epoch 1's end) keeps epoch 1's steps and drops the lost
    /// epoch 2's.
    #[test]
    fn step_log_keeps_the_checkpointed_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = StepLog::open(dir.path(), None).unwrap();
        for (e, s, g) in [(1, 1, 1), (1, 2, 2), (2, 1, 3)] {
            log.write(&line(e, s, g)).unwrap();
        }
        drop(log);
        let mut log = StepLog::open(dir.path(), Some(2)).unwrap();
        log.write(&line(2, 1, 3)).unwrap();
        drop(log);
        let read: Vec<StepLine> = std::fs::read_to_string(dir.path().join("steps.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(read, vec![line(1, 1, 1), line(1, 2, 2), line(2, 1, 3)]);
    }

    #[test]
    fn progress_lines_every_tenth_of_an_epoch() {
        assert_eq!(
            (progress_every(3), progress_every(112), progress_every(20)),
            (1, 11, 2)
        );
        assert_eq!(
            progress_line(1, 3, 20, 112, 0.41234, 9.1e-4, 1234.4),
            "epoch 1/3 step 20/112 loss 0.4123 lr 9.1e-4 1234 tok/s"
        );
    }
}
