//! Resumable checkpoints and the best adapter.
//!
//! After every epoch the trainer writes `OUTPUT/checkpoint/` (every adapter, the classifier, the
//! optimizer moments and `state.json`) into a temporary folder and swaps it in with renames, so an
//! interrupted run loses at most the epoch in progress. With `save_steps`, it also writes
//! `OUTPUT/checkpoint-STEP/` every that many optimizer steps (the last `save_total_limit` kept):
//! such a checkpoint records how far its epoch got ([`PartialEpoch`]), and a resume continues
//! from the newest checkpoint of either kind. The best-validation adapter is written in PEFT's
//! format at `OUTPUT/` (see `io::peft`).

use super::fit::EpochLog;
use crate::adapters::{Adapted, ParamId};
use crate::io::peft::{param_id, param_key};
use crate::nn::optim::{AdamW, Moments};
use crate::safe::SafeController;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

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
    /// Optimizer step count of each parameter, by its key (`io::peft::param_key`).
    pub opt_steps: BTreeMap<String, u64>,
    /// PEFT key stems of the frozen adapters.
    pub frozen_adapters: Vec<String>,
    /// The global step of the best validation so far.
    #[serde(default)]
    pub best_step: usize,
    /// Validations since the best one (what `early_stopping_patience` counts).
    #[serde(default)]
    pub evals_since_best: usize,
    /// The run ended because `early_stopping_patience` validations in a row did not improve.
    #[serde(default)]
    pub stopped_early: bool,
    /// The validations between epoch ends (`eval_steps`), as `metrics.jsonl` logs them.
    #[serde(default)]
    pub step_evals: Vec<super::best::StepEval>,
    /// In a checkpoint written inside an epoch (`save_steps`): how far the epoch after
    /// `epochs_done` got; None at an epoch's end.
    #[serde(default)]
    pub partial_epoch: Option<PartialEpoch>,
}

/// An epoch in progress: the steps it has done and the sums its `metrics.jsonl` line is made of,
/// so a run resumed inside the epoch logs the same line as one that was never interrupted.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PartialEpoch {
    pub steps: usize,
    pub loss_sum: f64,
    pub loss_n: usize,
    pub tokens: usize,
    pub lr: f64,
    pub wall_s: f64,
    pub train_flops: u64,
    pub monitor_flops: u64,
    pub peak_mem_bytes: usize,
    pub step_mem_bytes: usize,
    pub trainable_params: usize,
    /// The last round's scores; NaN (written as null) for adapters not measured.
    #[serde(default, deserialize_with = "crate::safe::nan_serde::opt_vec")]
    pub importance: Option<Vec<f64>>,
    pub threshold: Option<f64>,
    /// SAFE's in-step measurement of the round in progress (none outside a measured window).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub measured: Vec<super::importance::MeasuredBatch>,
}

/// A step checkpoint's folder name.
const STEP_PREFIX: &str = "checkpoint-";

/// Writes `OUTPUT/checkpoint/`. Tensors are named by their keys (`io::peft::param_key`), the
/// optimizer's moments `opt.m.<key>` / `opt.v.<key>`.
pub fn save(
    out: &Path,
    model: &impl Adapted,
    opt: &AdamW<ParamId>,
    state: &TrainerState,
) -> Result<()> {
    let tmp = out.join("checkpoint.tmp");
    let dir = out.join("checkpoint");
    let old = out.join("checkpoint.old");
    write_folder(&tmp, &dir, model, opt, state)?;
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

/// Writes `OUTPUT/checkpoint-STEP/` (STEP: `state.global_step`) and removes the oldest step
/// checkpoints beyond the newest `keep` (0: keeps them all).
pub fn save_step(
    out: &Path,
    model: &impl Adapted,
    opt: &AdamW<ParamId>,
    state: &TrainerState,
    keep: usize,
) -> Result<()> {
    let dir = out.join(format!("{STEP_PREFIX}{}", state.global_step));
    let tmp = out.join(format!("{STEP_PREFIX}{}.tmp", state.global_step));
    write_folder(&tmp, &dir, model, opt, state)?;
    remove_any(&dir)?;
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("{}: cannot put the checkpoint in place", dir.display()))?;
    let steps = step_checkpoints(out)?;
    if keep > 0 && steps.len() > keep {
        for (_, old) in &steps[..steps.len() - keep] {
            remove_any(old)?;
        }
    }
    Ok(())
}

/// The step checkpoints in `out`, oldest first, with their steps.
pub fn step_checkpoints(out: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(out) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("{}: cannot read", out.display())))
        }
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix(STEP_PREFIX).and_then(|n| n.parse().ok()) {
            found.push((step, e.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Removes every checkpoint in `out` (a fresh run's start), step checkpoints and their
/// leftovers included (`checkpoint.tmp` is replaced by the next write).
pub fn remove_all(out: &Path) -> Result<()> {
    for name in ["checkpoint", "checkpoint.old"] {
        remove_any(&out.join(name))?;
    }
    if let Ok(entries) = std::fs::read_dir(out) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(STEP_PREFIX) {
                remove_any(&e.path())?;
            }
        }
    }
    Ok(())
}

/// Writes a checkpoint into `tmp` (replacing anything there); `dir` is where it will be put,
/// named in errors.
fn write_folder(
    tmp: &Path,
    dir: &Path,
    model: &impl Adapted,
    opt: &AdamW<ParamId>,
    state: &TrainerState,
) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut state = state.clone();
    state.frozen_adapters.clear();
    for (id, (stem, ad)) in model.adapter_ids().into_iter().zip(model.adapters()) {
        let [a, b] = ParamId::lora(id).map(|p| param_key(model, p));
        tensors.insert(a, ad.a.clone());
        tensors.insert(b, ad.b.clone());
        if !ad.trainable {
            state.frozen_adapters.push(stem);
        }
    }
    for (h, t) in model.head_params() {
        tensors.insert(param_key(model, ParamId::Head(h)), t);
    }
    state.opt_steps.clear();
    for (&id, m) in &opt.state {
        let name = param_key(model, id);
        tensors.insert(format!("opt.m.{name}"), m.m.clone());
        tensors.insert(format!("opt.v.{name}"), m.v.clone());
        state.opt_steps.insert(name, m.step);
    }
    // A diverged run must not replace the last good checkpoint with NaNs.
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        if let Some(problem) = crate::io::weight_problem(&tensors[name]) {
            anyhow::bail!("{}: not written: tensor '{name}' {problem}", dir.display());
        }
    }
    let _ = std::fs::remove_dir_all(tmp);
    std::fs::create_dir_all(tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let tensors_path = tmp.join("tensors.safetensors");
    candle_core::safetensors::save(&tensors, &tensors_path)
        .with_context(|| format!("{}: cannot write checkpoint", tensors_path.display()))?;
    let state_path = tmp.join("state.json");
    std::fs::write(&state_path, serde_json::to_vec(&state)?)
        .with_context(|| format!("{}: cannot write checkpoint", state_path.display()))?;
    Ok(())
}

/// Removes a file or folder if present (a stray file is in the way as much as a folder).
pub(crate) fn remove_any(path: &Path) -> Result<()> {
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

/// Whether `out` holds a checkpoint for [`load`] (also one interrupted between its renames). By
/// its folders alone: a checkpoint that cannot be read still exists, so a resume of it is refused
/// (by [`load`]) instead of starting over.
pub fn exists(out: &Path) -> bool {
    out.join("checkpoint").exists()
        || out.join("checkpoint.old").exists()
        || step_checkpoints(out).is_ok_and(|s| !s.is_empty())
}

fn read_state(dir: &Path) -> Result<TrainerState> {
    let state_path = dir.join("state.json");
    serde_json::from_slice(
        &std::fs::read(&state_path)
            .with_context(|| format!("{}: cannot read", state_path.display()))?,
    )
    .with_context(|| format!("{}: invalid checkpoint state", state_path.display()))
}

/// The checkpoint a resume continues from: the one of the most optimizer steps among
/// `checkpoint/` (or `checkpoint.old/`, when a write was interrupted between its renames) and the
/// step checkpoints; `checkpoint/` on a tie (it holds the epoch's validation too).
pub fn newest(out: &Path) -> Result<Option<PathBuf>> {
    let mut best: Option<(usize, PathBuf)> = None;
    let epoch_dir = [out.join("checkpoint"), out.join("checkpoint.old")]
        .into_iter()
        .find(|d| d.exists());
    if let Some(d) = epoch_dir {
        best = Some((read_state(&d)?.global_step, d));
    }
    for (step, d) in step_checkpoints(out)? {
        if best.as_ref().is_none_or(|(b, _)| step > *b) {
            best = Some((step, d));
        }
    }
    Ok(best.map(|(_, d)| d))
}

/// Restores model parameters, frozen flags and optimizer state from the newest checkpoint
/// ([`newest`]); None when there is none.
pub fn load(
    out: &Path,
    model: &mut impl Adapted,
    opt: &mut AdamW<ParamId>,
) -> Result<Option<TrainerState>> {
    let Some(dir) = newest(out)? else {
        return Ok(None);
    };
    load_from(&dir, model, opt).map(Some)
}

/// Restores model parameters, frozen flags and optimizer state from the checkpoint folder `dir`.
pub fn load_from(
    dir: &Path,
    model: &mut impl Adapted,
    opt: &mut AdamW<ParamId>,
) -> Result<TrainerState> {
    let state_path = dir.join("state.json");
    let state = read_state(dir)?;
    let tpath = dir.join("tensors.safetensors");
    let tensors = candle_core::safetensors::load(&tpath, &Device::Cpu)
        .with_context(|| format!("{}: unreadable checkpoint", tpath.display()))?;
    for (name, t) in &tensors {
        if name.starts_with("opt.") {
            continue;
        }
        let misfit = || {
            format!(
                "{}: tensor '{name}' does not fit this model",
                tpath.display()
            )
        };
        let id = param_id(model, name).with_context(misfit)?;
        let p = model.param_mut(id).with_context(misfit)?;
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
    for (id, (stem, _)) in model.adapter_ids().into_iter().zip(model.adapters()) {
        for p in ParamId::lora(id) {
            let key = param_key(model, p);
            anyhow::ensure!(
                tensors.contains_key(&key),
                "{}: no tensor '{key}' for this model's adapter '{stem}' (was the checkpoint \
                 written with other target modules or layers?)",
                tpath.display()
            );
        }
    }
    for stem in &state.frozen_adapters {
        let ad = model.adapter_by_path_mut(stem).with_context(|| {
            format!(
                "{}: frozen adapter '{stem}' is not in this model",
                state_path.display()
            )
        })?;
        ad.trainable = false;
    }
    opt.state.clear();
    for (name, &step) in &state.opt_steps {
        let missing = || {
            format!(
                "{}: optimizer state of '{name}', which this model does not have",
                state_path.display()
            )
        };
        let id = param_id(model, name).with_context(missing)?;
        let p = model.param_mut(id).with_context(missing)?;
        let (dims, dtype, device) = (p.dims().to_vec(), p.dtype(), p.device().clone());
        let get = |k: String| -> Result<Tensor> {
            let t = tensors
                .get(&k)
                .with_context(|| format!("{}: missing '{k}'", tpath.display()))?;
            anyhow::ensure!(
                t.dims() == dims,
                "{}: tensor '{k}' has shape {:?}, its parameter '{name}' {dims:?}",
                tpath.display(),
                t.dims()
            );
            Ok(t.to_dtype(dtype)?.to_device(&device)?)
        };
        opt.state.insert(
            id,
            Moments {
                m: get(format!("opt.m.{name}"))?,
                v: get(format!("opt.v.{name}"))?,
                step,
            },
        );
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::LoraConfig;
    use crate::model::{BertConfig, BertForSequenceClassification};
    use crate::nn::optim::AdamWConfig;
    use candle_core::DType;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// A step checkpoint inside an epoch after a SAFE round keeps the round's scores, NaN for
    /// the adapters it did not measure (serde_json writes them as null): it loads back.
    #[test]
    fn a_partial_epoch_with_unmeasured_scores_loads_back() {
        let p = PartialEpoch {
            steps: 3,
            importance: Some(vec![0.25, f64::NAN, 1e-9]),
            ..PartialEpoch::default()
        };
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains("[0.25,null,1e-9]"), "{json}");
        let back: PartialEpoch = serde_json::from_str(&json).unwrap();
        let scores = back.importance.unwrap();
        assert_eq!((scores[0], scores[2]), (0.25, 1e-9));
        assert!(scores[1].is_nan());
        // Older checkpoints without the field still load.
        let old: PartialEpoch = serde_json::from_str(
            r#"{"steps":1,"loss_sum":0,"loss_n":0,"tokens":0,"lr":0,"wall_s":0,"train_flops":0,
            "monitor_flops":0,"peak_mem_bytes":0,"step_mem_bytes":0,"trainable_params":0,
            "threshold":null}"#,
        )
        .unwrap();
        assert!(old.importance.is_none());
    }

    /// A tiny BERT with LoRA on query/value and one AdamW step on every trained tensor.
    fn model_and_optimizer() -> (BertForSequenceClassification, AdamW<ParamId>) {
        let mut rng = StdRng::seed_from_u64(5);
        let mut m = BertForSequenceClassification::random(
            BertConfig::tiny(0.0),
            2,
            DType::F32,
            &Device::Cpu,
            &mut rng,
        )
        .unwrap();
        let lora = LoraConfig {
            target_modules: vec!["query".into(), "value".into()],
            ..Default::default()
        };
        m.add_lora(&lora, None, &mut rng).unwrap();
        let mut opt = AdamW::new(AdamWConfig::default());
        for (id, p) in m.trainable_params() {
            let g = p.ones_like().unwrap();
            *m.param_mut(id).unwrap() = opt.update(id, &p, &g, 1e-3).unwrap();
        }
        (m, opt)
    }

    fn fresh() -> (BertForSequenceClassification, AdamW<ParamId>) {
        let (m, _) = model_and_optimizer();
        (m, AdamW::new(AdamWConfig::default()))
    }

    /// Writes a checkpoint into a new folder; returns it and its tensors file.
    fn saved() -> (tempfile::TempDir, std::path::PathBuf) {
        let (m, opt) = model_and_optimizer();
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &m, &opt, &TrainerState::default()).unwrap();
        let tpath = dir.path().join("checkpoint/tensors.safetensors");
        (dir, tpath)
    }

    /// Rewrites the checkpoint's tensors through `edit`.
    fn edit_tensors(tpath: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
        let mut t = candle_core::safetensors::load(tpath, &Device::Cpu).unwrap();
        edit(&mut t);
        candle_core::safetensors::save(&t, tpath).unwrap();
    }

    fn load_err(dir: &Path) -> String {
        let (mut m, mut opt) = fresh();
        let e = load(dir, &mut m, &mut opt).expect_err("the checkpoint must be refused");
        format!("{e:#}")
    }

    const Q0: &str = "bert.encoder.layer.0.attention.self.query";

    #[test]
    fn a_saved_checkpoint_loads_with_its_optimizer_state() {
        let (dir, _) = saved();
        let (mut m, mut opt) = fresh();
        load(dir.path(), &mut m, &mut opt).unwrap().unwrap();
        let key = ParamId::lora(m.module_id(Q0).unwrap())[0];
        let (want_m, want_p) = {
            let (m0, o0) = model_and_optimizer();
            let p = m0.trainable_params().into_iter().find(|(k, _)| *k == key);
            (o0.state[&key].m.to_vec2::<f32>().unwrap(), p.unwrap().1)
        };
        assert_eq!(opt.state[&key].m.to_vec2::<f32>().unwrap(), want_m);
        assert_eq!(opt.state[&key].step, 1);
        let p = m.param_mut(key).unwrap();
        assert_eq!(
            p.to_vec2::<f32>().unwrap(),
            want_p.to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn optimizer_moments_of_another_shape_are_refused() {
        let (dir, tpath) = saved();
        let key = format!("opt.v.{Q0}.lora_B.weight");
        edit_tensors(&tpath, |t| {
            let bad = Tensor::zeros((3, 1), DType::F32, &Device::Cpu).unwrap();
            assert!(t.insert(key.clone(), bad).is_some());
        });
        let e = load_err(dir.path());
        assert!(e.contains(&tpath.display().to_string()), "{e}");
        assert!(e.contains(&format!("'{key}' has shape [3, 1]")), "{e}");
    }

    #[test]
    fn an_adapter_of_a_layer_the_model_lacks_is_refused() {
        let (dir, tpath) = saved();
        let key = "bert.encoder.layer.99.attention.self.query.lora_A.weight";
        edit_tensors(&tpath, |t| {
            let a = t[&format!("{Q0}.lora_A.weight")].clone();
            t.insert(key.into(), a);
        });
        let e = load_err(dir.path());
        assert!(e.contains(&tpath.display().to_string()), "{e}");
        assert!(
            e.contains(key) && e.contains("does not fit this model"),
            "{e}"
        );
    }

    #[test]
    fn a_frozen_adapter_or_optimizer_state_the_model_lacks_is_refused() {
        let (dir, _) = saved();
        let state_path = dir.path().join("checkpoint/state.json");
        let state: TrainerState =
            serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
        let write = |s: &TrainerState| std::fs::write(&state_path, serde_json::to_vec(s).unwrap());
        let mut s = state.clone();
        s.frozen_adapters = vec!["bert.encoder.layer.7.attention.self.value".into()];
        write(&s).unwrap();
        let e = load_err(dir.path());
        assert!(e.contains(&state_path.display().to_string()), "{e}");
        assert!(
            e.contains("'bert.encoder.layer.7.attention.self.value'"),
            "{e}"
        );
        let mut s = state;
        s.opt_steps
            .insert("bert.encoder.layer.12.output.dense.lora_A.weight".into(), 3);
        write(&s).unwrap();
        let e = load_err(dir.path());
        assert!(
            e.contains("optimizer state of 'bert.encoder.layer.12.output.dense.lora_A.weight'"),
            "{e}"
        );
    }

    #[test]
    fn a_model_adapter_missing_from_the_checkpoint_is_refused() {
        let (dir, tpath) = saved();
        let key = format!("{Q0}.lora_B.weight");
        edit_tensors(&tpath, |t| {
            t.remove(&key);
            t.remove(&format!("opt.m.{key}"));
            t.remove(&format!("opt.v.{key}"));
        });
        let e = load_err(dir.path());
        assert!(e.contains(&format!("no tensor '{key}'")), "{e}");
    }
}
