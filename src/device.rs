//! Where training runs and in which precision: the `--device cpu|cuda|cuda:N` and `--dtype
//! f32|bf16` flags, parsed here and nowhere else.
//!
//! A CUDA device is opened once per process and ordinal (candle refuses to mix tensors of two
//! `Device` values opened separately), with its memory pool set up for training
//! (`train::memory::device_init`).

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A device as named on the command line and in config files: `cpu`, `cuda` (= `cuda:0`) or
/// `cuda:N`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("unknown device '{s}' (expected cpu, cuda or cuda:N)");
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(bad),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl DeviceSpec {
    pub fn is_cuda(&self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }

    /// The candle device. CUDA devices are opened once per ordinal and shared afterwards; on a
    /// build without the `cuda` feature, asking for one is an error that says how to get one.
    pub fn open(&self) -> anyhow::Result<Device> {
        match *self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => open_cuda(n),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> anyhow::Result<Device> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static OPEN: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();
    let mut open = OPEN
        .get_or_init(Default::default)
        .lock()
        .expect("device table");
    if let Some(d) = open.get(&ordinal) {
        return Ok(d.clone());
    }
    let d = Device::new_cuda(ordinal)
        .map_err(|e| anyhow::anyhow!("cannot open CUDA device {ordinal}: {e}"))?;
    if let Device::Cuda(c) = &d {
        // One stream, used from one thread: cudarc's per-allocation events (which order uses
        // across streams) only cost driver calls on every kernel launch. Tensors made before this
        // call keep tracking; none exist yet on this device.
        unsafe { c.disable_event_tracking() };
    }
    crate::memory::device_init(&d)?;
    open.insert(ordinal, d.clone());
    Ok(d)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> anyhow::Result<Device> {
    anyhow::bail!(
        "this safetune was built without CUDA support: build it with scripts/build-cuda.sh \
         (cargo build --release --features cuda), or run with --device cpu"
    )
}

/// While it lives, candle keeps its small host-to-device uploads (the dims and strides that every
/// strided CUDA op sends before its kernel, at most 4 KiB) in a cache keyed by their bytes, so a
/// layout seen before costs no allocation and no copy from pageable memory, which can make the
/// host wait for the GPU. Hold it around a model's forward and backward only: every small upload
/// made meanwhile stays cached for the life of the process, so data uploads (labels, token ids)
/// belong outside it, and a tensor made from host data inside it must never be written in place.
/// A no-op on the CPU.
pub struct UploadCache(#[allow(dead_code)] Option<Box<dyn std::any::Any>>);

pub fn upload_cache(device: &Device) -> UploadCache {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = device {
        return UploadCache(Some(Box::new(c.enable_cuda_graph_htod_cache())));
    }
    let _ = device;
    UploadCache(None)
}

/// Waits until the device has finished all queued work (a no-op on the CPU): before reading a
/// clock or a memory counter.
pub fn synchronize(device: &Device) -> candle_core::Result<()> {
    device.synchronize()
}

/// Output elements of one wave of 128 x 256 matmul tiles over `device`'s multiprocessors: a GPU
/// product with a smaller output takes about as long as one of this size. 0 on the CPU, which is
/// compute-bound from a few rows on. Measured on an H100, 132 multiprocessors
/// (`examples/recompute_probe`, one LLaMA-7B layer, 4 x 128 tokens): recomputing gate and up
/// (11008 wide) took 34% of the layer's forward, q, k, v and the attention (4096 wide) 33%, where
/// their shares of its FLOPs are 45% and 26%.
pub fn matmul_wave(device: &Device) -> usize {
    const TILE: usize = 128 * 256;
    match device {
        Device::Cpu => 0,
        _ => multiprocessors(device) * TILE,
    }
}

/// Rough rates of an H100 / H200 for what the memory plan times rather than counts: whether
/// copies of saved state to pinned host memory (`nn::offload`) hide behind the compute.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuRates {
    /// FLOP/s a layer's products reach in bf16 / f16: about 500 TFLOP/s, from the LLaMA-7B
    /// shape's steps at 4,096 tokens (259 ms an H100 step, about 2.1 forwards of counted FLOPs).
    pub half_flops_per_s: f64,
    /// The same in f32 (cuBLAS's single precision, no TF32).
    pub f32_flops_per_s: f64,
    /// Bytes a second each way to pinned host memory while the compute runs. The probe
    /// (`bench/offload_probe.py`) measured 53 GB/s; offloading every third LLaMA-7B layer at 4,096
    /// tokens (about 2.5 forwards of copy for 3 of compute at that rate) still cost 3% of the
    /// step, every fourth nothing: 40 GB/s puts such layers four apart.
    pub host_bytes_per_s: f64,
    /// Host time an offloaded layer's copies take to issue, out and back: 0.8 ms a step for 8
    /// layers at 2,048 tokens with the copies hidden.
    pub offload_issue_s: f64,
    /// A layer's forward takes at least this long, however few its tokens (its kernel launches).
    pub layer_launch_s: f64,
}

/// [`GpuRates`] of `device`; None on the CPU.
pub fn gpu_rates(device: &Device) -> Option<GpuRates> {
    (!device.is_cpu()).then_some(GpuRates {
        half_flops_per_s: 500e12,
        f32_flops_per_s: 50e12,
        host_bytes_per_s: 40e9,
        offload_issue_s: 100e-6,
        layer_launch_s: 150e-6,
    })
}

/// The device's multiprocessor count; an H100's or H200's 132 where the driver cannot say.
fn multiprocessors(device: &Device) -> usize {
    const HOPPER: usize = 132;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
        let stream = c.cuda_stream();
        match stream
            .context()
            .attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        {
            Ok(n) if n > 0 => return n as usize,
            _ => {}
        }
    }
    let _ = device;
    HOPPER
}

/// Precision of the frozen base weights and activations. LoRA adapters, their gradients and
/// optimizer state, the classification head and the losses stay in f32 whatever this is (as PEFT
/// does by default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DTypeSpec {
    #[default]
    F32,
    Bf16,
}

impl DTypeSpec {
    pub fn dtype(self) -> DType {
        match self {
            DTypeSpec::F32 => DType::F32,
            DTypeSpec::Bf16 => DType::BF16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DTypeSpec::F32 => "f32",
            DTypeSpec::Bf16 => "bf16",
        }
    }
}

/// `--device` and `--dtype`, shared by every command that runs a model. Unset flags leave the
/// config file's value (training) or the default (cpu, f32).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct DeviceArgs {
    /// cpu | cuda | cuda:N. CUDA needs a build with the `cuda` feature (scripts/build-cuda.sh).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// f32 | bf16: precision of the frozen base weights and activations; LoRA adapters, their
    /// gradients and optimizer state, the classification head and losses stay f32.
    #[arg(long)]
    pub dtype: Option<DTypeSpec>,
}

impl DeviceArgs {
    pub fn device_spec(&self) -> DeviceSpec {
        self.device.unwrap_or_default()
    }

    pub fn dtype_spec(&self) -> DTypeSpec {
        self.dtype.unwrap_or_default()
    }

    /// Opens the device (default cpu).
    pub fn open(&self) -> anyhow::Result<Device> {
        self.device_spec().open()
    }
}

/// The dtype that trained tensors, statistics and losses use beside activations of `dtype`: f32
/// for half-precision activations, the activations' own dtype otherwise (f64 in tests).
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("CUDA:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        for s in ["cpu", "cuda:0", "cuda:1"] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap().to_string(), s);
        }
        for bad in ["tpu", "cuda:", "cuda:x", "cuda1"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
        }
    }

    #[test]
    fn cpu_opens_and_cuda_says_how_to_get_it() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        if !cfg!(feature = "cuda") {
            let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
            assert!(e.contains("scripts/build-cuda.sh"), "{e}");
        }
    }

    #[test]
    fn half_precision_computes_in_f32() {
        assert_eq!(compute_dtype(DType::BF16), DType::F32);
        assert_eq!(compute_dtype(DType::F32), DType::F32);
        assert_eq!(compute_dtype(DType::F64), DType::F64);
        assert_eq!(DTypeSpec::Bf16.dtype(), DType::BF16);
    }
}
