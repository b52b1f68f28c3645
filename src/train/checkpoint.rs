//! Resumable checkpoints and the best adapter.
//!
//! After every epoch the trainer writes `OUTPUT/checkpoint/` (every adapter, the classifier, the
//! optimizer moments and `state.json`) into a temporary folder and swaps it in with renames, so an
//! interrupted run loses at most the epoch in progress. The best-validation adapter is written in
//! PEFT's format at `OUTPUT/` (see `io::peft`).

use super::fit::EpochLog;
use super::optim::{AdamW, Moments};
use crate::adapters::Adapted;
use crate::safe::SafeController;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainerState {
    /// The run's `epochs` (the LR schedule and SAFE's rounds depend on it).
    pub total_epochs: usize,
    pub epochs_done: usize,
    pub global_step: usize,
    pub best_metric: f64,
    pub best_epoch: usize,
    /// Adapter name -> epoch it froze.
    pub frozen_at: BTreeMap<String, usize>,
    pub history: Vec<EpochLog>,
    pub safe: Option<SafeController>,
    /// Optimizer step count of each parameter.
    pub opt_steps: BTreeMap<String, u64>,
    /// PEFT key stems of the frozen adapters.
    pub frozen_adapters: Vec<String>,
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

pub fn save(out: &Path, model: &impl Adapted, opt: &AdamW, state: &TrainerState) -> Result<()> {
    let tmp = out.join("checkpoint.tmp");
    let dir = out.join("checkpoint");
    let old = out.join("checkpoint.old");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut state = state.clone();
    state.frozen_adapters.clear();
    for (stem, ad) in model.adapters() {
        tensors.insert(format!("{stem}.lora_A.weight"), ad.a.clone());
        tensors.insert(format!("{stem}.lora_B.weight"), ad.b.clone());
        if !ad.trainable {
            state.frozen_adapters.push(stem);
        }
    }
    tensors.extend(model.head_params());
    state.opt_steps.clear();
    for (name, m) in &opt.state {
        tensors.insert(format!("opt.m.{name}"), m.m.clone());
        tensors.insert(format!("opt.v.{name}"), m.v.clone());
        state.opt_steps.insert(name.clone(), m.step);
    }
    let tensors_path = tmp.join("tensors.safetensors");
    candle_core::safetensors::save(&tensors, &tensors_path)
        .with_context(|| format!("{}: cannot write checkpoint", tensors_path.display()))?;
    let state_path = tmp.join("state.json");
    std::fs::write(&state_path, serde_json::to_vec(&state)?)
        .with_context(|| format!("{}: cannot write checkpoint", state_path.display()))?;
    remove_any(&old)?;
    if dir.exists() {
        std::fs::rename(&dir, &old).with_context(|| {
            format!(
                "{}: cannot move the previous checkpoint to {}",
                dir.display(),
                old.display()
            )
        })?;
    }
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("{}: cannot put the checkpoint in place", dir.display()))?;
    remove_any(&old)
}

/// Removes a file or folder if present (a stray file is in the way as much as a folder).
fn remove_any(path: &Path) -> Result<()> {
    let r = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(anyhow::Error::new(e).context(format!("{}: cannot remove", path.display())))
        }
        _ => Ok(()),
    }
}

/// Restores model parameters, frozen flags and optimizer state; None when there is no checkpoint.
pub fn load(out: &Path, model: &mut impl Adapted, opt: &mut AdamW) -> Result<Option<TrainerState>> {
    let mut dir = out.join("checkpoint");
    if !dir.exists() {
        dir = out.join("checkpoint.old"); // interrupted between the two renames
        if !dir.exists() {
            return Ok(None);
        }
    }
    let state_path = dir.join("state.json");
    let state: TrainerState = serde_json::from_slice(
        &std::fs::read(&state_path)
            .with_context(|| format!("{}: cannot read", state_path.display()))?,
    )
    .with_context(|| format!("{}: invalid checkpoint state", state_path.display()))?;
    let tpath = dir.join("tensors.safetensors");
    let tensors = candle_core::safetensors::load(&tpath, &Device::Cpu)
        .with_context(|| format!("{}: unreadable checkpoint", tpath.display()))?;
    for (name, t) in &tensors {
        if name.starts_with("opt.") {
            continue;
        }
        let p = model.param_mut(name).with_context(|| {
            format!(
                "{}: tensor '{name}' does not fit this model",
                tpath.display()
            )
        })?;
        anyhow::ensure!(
            p.dims() == t.dims(),
            "{}: tensor '{name}' has shape {:?}, the model {:?}",
            tpath.display(),
            t.dims(),
            p.dims()
        );
        // Onto the model's device and dtype (checkpoints are read on the host).
        *p = t.to_dtype(p.dtype())?.to_device(p.device())?;
    }
    for stem in &state.frozen_adapters {
        if let Some(ad) = model.adapter_by_path_mut(stem) {
            ad.trainable = false;
        }
    }
    opt.state.clear();
    for (name, &step) in &state.opt_steps {
        let like = model
            .param_mut(name)
            .map(|p| (p.dtype(), p.device().clone()));
        let get = |k: String| -> Result<Tensor> {
            let t = tensors
                .get(&k)
                .with_context(|| format!("{}: missing '{k}'", tpath.display()))?;
            Ok(match &like {
                Some((dtype, device)) => t.to_dtype(*dtype)?.to_device(device)?,
                None => t.clone(),
            })
        };
        opt.state.insert(
            name.clone(),
            Moments {
                m: get(format!("opt.m.{name}"))?,
                v: get(format!("opt.v.{name}"))?,
                step,
            },
        );
    }
    Ok(Some(state))
}
