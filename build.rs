//! With the `cuda` feature, compiles safetune's own CUDA kernels (src/nn/kernels.cu) with nvcc
//! (`NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on the PATH) for `CUDA_COMPUTE_CAP` (default
//! 90) into a fat binary that `src/nn/gpu.rs` embeds: machine code for that GPU, so the driver
//! compiles nothing at run time, and its PTX (which later GPUs can compile where the target has
//! no `a` suffix). From PTX alone the driver compiled the whole module at its first load: 4.9 s in
//! a fresh machine's first process (H100), 12 ms from its disk cache after that; 2 ms from the
//! machine code. At 90 the target is `sm_90a` (Hopper's warpgroup MMAs) and `cfg(safetune_sm90a)`
//! tells gpu.rs the Hopper kernels are in. Nothing to do without the feature.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/nn/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo::rustc-check-cfg=cfg(safetune_sm90a)");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("safetune_kernels.fatbin");
    let cap: String = std::env::var("CUDA_COMPUTE_CAP")
        .unwrap_or_else(|_| "90".into())
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| {
        std::env::var("CUDA_HOME")
            .map(|h| format!("{h}/bin/nvcc"))
            .unwrap_or_else(|_| "nvcc".into())
    });
    let arch = if cap == "90" {
        println!("cargo:rustc-cfg=safetune_sm90a");
        "90a".to_string()
    } else {
        cap
    };
    let status = Command::new(&nvcc)
        .args(["--fatbin", "-O3", "-std=c++17"])
        .arg(format!(
            "-gencode=arch=compute_{arch},code=[sm_{arch},compute_{arch}]"
        ))
        .arg("-o")
        .arg(&out)
        .arg("src/nn/kernels.cu")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {nvcc} to compile src/nn/kernels.cu: {e}"));
    assert!(status.success(), "{nvcc} failed on src/nn/kernels.cu");
}
