//! Activation offload: a layer's saved state copied to pinned host memory on a side stream
//! while the next layers compute, and copied back ahead of its backward, so that the device holds
//! it only while it is in flight. Recomputing a layer instead costs its forward again: launches
//! in a launch-bound step (MiniLM at 16 x 128 tokens), FLOPs in a compute-bound one (a 7B layer
//! at 8,192 tokens); the copy engines sit idle in both.
//!
//! A saved state names its tensors through [`SavedTensors`]; [`stash`] replaces the ones worth
//! moving (contiguous, at least [`MIN_BYTES`], the same tensor once) by placeholders and starts
//! their copies; [`Stashed::release`] frees the device originals once the copy is done (call it
//! as late as memory allows, so the copy overlaps the layers in between: `model::stack` calls it
//! when the next offloaded layer is stashed); [`Stashed::fetch`] starts the copy back (called
//! ahead of the layer's backward: when the offloaded layer above it is back);
//! [`Stashed::restore`] waits for it and gives the state back, its tensors equal to the originals
//! bit for bit.
//!
//! On CUDA the copies run on one copy stream per device, ordered against the compute stream by
//! events, into pinned buffers reused from step to step. On the CPU the "host copy" is a plain
//! copy made at once: it changes nothing about memory, and exists so that the same bookkeeping
//! runs (and is tested) on every build.

use candle_core::{DType, Device, Result, Tensor};

/// CUDA tensors smaller than this stay on the device: a copy's fixed cost (a driver call each way,
/// a few microseconds) outweighs what it frees (per-row statistics, a layer's log-sum-exp). On
/// the CPU every tensor moves, so that tests on small models see each one go and come back.
pub const MIN_BYTES: usize = 64 * 1024;

fn min_bytes(device: &Device) -> usize {
    if device.is_cpu() {
        0
    } else {
        MIN_BYTES
    }
}

/// A saved state whose tensors can be moved off the device and back.
pub trait SavedTensors {
    /// Calls `f` on each tensor the state holds for backward, always in the same order. Tensors
    /// shared by every layer (the attention mask, rope tables) are not named: moving them frees
    /// nothing.
    fn each_tensor(&mut self, f: &mut dyn FnMut(&mut Tensor));
}

impl SavedTensors for Tensor {
    fn each_tensor(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        f(self)
    }
}

impl<T: SavedTensors> SavedTensors for Option<T> {
    fn each_tensor(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        if let Some(t) = self {
            t.each_tensor(f)
        }
    }
}

impl<A: SavedTensors, B: SavedTensors> SavedTensors for (A, B) {
    fn each_tensor(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        self.0.each_tensor(f);
        self.1.each_tensor(f);
    }
}

impl SavedTensors for () {
    fn each_tensor(&mut self, _: &mut dyn FnMut(&mut Tensor)) {}
}

/// Where each tensor [`stash`] visited went.
enum Slot {
    /// Left in the state, on the device.
    Stayed,
    /// Replaced by a placeholder; copy `i` holds it.
    Moved(usize),
}

/// One moved tensor: its shape and dtype, and where its bytes are while it is off the device.
struct HostCopy {
    dims: Vec<usize>,
    dtype: DType,
    /// Byte offset in the pinned buffer (CUDA).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    offset: usize,
    /// The CPU's copy (see the module doc).
    cpu: Option<Tensor>,
}

/// A saved state while its tensors are (or are on their way) off the device.
pub struct Stashed<S> {
    /// The state, the moved tensors replaced by placeholders.
    state: S,
    slots: Vec<Slot>,
    copies: Vec<HostCopy>,
    /// The copies' buffer and events. Declared (so dropped) before `originals`: a stash dropped
    /// before its release has the compute stream wait for the copy before the originals' frees.
    #[cfg(feature = "cuda")]
    cuda: Option<cuda::InFlight>,
    /// The device originals, kept until their copy is done ([`Stashed::release`]).
    originals: Vec<Tensor>,
    /// The tensors copied back ([`Stashed::fetch`]), in `copies`' order.
    fetched: Option<Vec<Tensor>>,
    device: Device,
}

/// A placeholder for a moved tensor: a scalar on the CPU, so the device memory goes.
fn placeholder(dtype: DType) -> Result<Tensor> {
    Tensor::zeros((), dtype, &Device::Cpu)
}

/// Starts moving `state`'s tensors off `device` (see the module doc). Tensors on another device,
/// strided views, integer tensors and (on CUDA) tensors under [`MIN_BYTES`] stay in the state.
/// A tensor named twice (the same first element, shape and dtype) moves once.
pub fn stash<S: SavedTensors>(mut state: S, device: &Device) -> Result<Stashed<S>> {
    let mut slots = Vec::new();
    let mut copies: Vec<HostCopy> = Vec::new();
    let mut originals: Vec<Tensor> = Vec::new();
    // The first element's address of each copy, beside `copies`.
    let mut addresses: Vec<usize> = Vec::new();
    // The pinned buffer's size: each copy at a 256-byte boundary.
    let mut bytes = 0;
    let mut error = None;
    state.each_tensor(&mut |t| {
        let Some(address) = movable(t, device, min_bytes(device)) else {
            return slots.push(Slot::Stayed);
        };
        let same = |(a, c): (&usize, &HostCopy)| {
            *a == address && c.dims == t.dims() && c.dtype == t.dtype()
        };
        let i = match addresses.iter().zip(&copies).position(same) {
            Some(i) => i,
            None => {
                let n = t.elem_count() * t.dtype().size_in_bytes();
                copies.push(HostCopy {
                    dims: t.dims().to_vec(),
                    dtype: t.dtype(),
                    offset: bytes,
                    cpu: None,
                });
                bytes += n.next_multiple_of(256);
                addresses.push(address);
                originals.push(t.clone());
                copies.len() - 1
            }
        };
        match placeholder(t.dtype()) {
            Ok(p) => *t = p,
            Err(e) => error = Some(e),
        }
        slots.push(Slot::Moved(i));
    });
    if let Some(e) = error {
        return Err(e);
    }
    let mut stashed = Stashed {
        state,
        slots,
        copies,
        #[cfg(feature = "cuda")]
        cuda: None,
        originals,
        fetched: None,
        device: device.clone(),
    };
    stashed.copy_out(bytes)?;
    Ok(stashed)
}

/// The address of `t`'s first element when it is worth moving off `device`: contiguous, on that
/// device, at least `min_bytes`, of a dtype the copies handle.
fn movable(t: &Tensor, device: &Device, min_bytes: usize) -> Option<usize> {
    let bytes = t.elem_count() * t.dtype().size_in_bytes();
    if !t.device().same_device(device) || !t.is_contiguous() || bytes < min_bytes {
        return None;
    }
    if !matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F64) {
        return None;
    }
    address(t)
}

/// The address of `t`'s first element (the identity of a tensor named twice).
fn address(t: &Tensor) -> Option<usize> {
    use candle_core::{CpuStorage, Storage};
    let (storage, layout) = t.storage_and_layout();
    let size = t.dtype().size_in_bytes();
    let base = match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => v.as_ptr() as usize,
        Storage::Cpu(CpuStorage::BF16(v)) => v.as_ptr() as usize,
        Storage::Cpu(CpuStorage::F64(v)) => v.as_ptr() as usize,
        #[cfg(feature = "cuda")]
        Storage::Cuda(_) => return super::gpu::address(t).ok().map(|a| a as usize),
        _ => return None,
    };
    Some(base + size * layout.start_offset())
}

impl<S: SavedTensors> Stashed<S> {
    /// Bytes moved off the device.
    pub fn bytes(&self) -> usize {
        self.copies
            .iter()
            .map(|c| c.dims.iter().product::<usize>() * c.dtype.size_in_bytes())
            .sum()
    }

    fn copy_out(&mut self, bytes: usize) -> Result<()> {
        match &self.device {
            Device::Cpu => {
                for (c, t) in self.copies.iter_mut().zip(&self.originals) {
                    c.cpu = Some(t.copy()?);
                }
                self.originals.clear();
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(_) if self.copies.is_empty() => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => {
                let offsets: Vec<usize> = self.copies.iter().map(|c| c.offset).collect();
                self.cuda = Some(cuda::InFlight::copy_out(
                    dev,
                    &self.originals,
                    &offsets,
                    bytes,
                )?);
                Ok(())
            }
            d => {
                let _ = bytes;
                candle_core::bail!("no activation offload on {d:?}")
            }
        }
    }

    /// Frees the device originals once their copy to the host is done (the compute stream waits
    /// for the copy, the host does not).
    pub fn release(&mut self) -> Result<()> {
        if self.originals.is_empty() {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        if let Some(f) = &self.cuda {
            f.compute_waits_for_copy()?;
        }
        self.originals.clear();
        Ok(())
    }

    /// Starts copying the tensors back to the device (a no-op when started already).
    pub fn fetch(&mut self) -> Result<()> {
        if self.fetched.is_some() {
            return Ok(());
        }
        self.release()?;
        let fetched = match &self.device {
            #[cfg(feature = "cuda")]
            Device::Cuda(_) if self.copies.is_empty() => Vec::new(),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {
                let shapes: Vec<(&[usize], DType, usize)> = self
                    .copies
                    .iter()
                    .map(|c| (c.dims.as_slice(), c.dtype, c.offset))
                    .collect();
                let f = self.cuda.as_mut().expect("a CUDA stash has its copies");
                f.copy_in(&shapes)?
            }
            _ => self
                .copies
                .iter_mut()
                .map(|c| c.cpu.take().expect("a CPU stash keeps its copies"))
                .collect(),
        };
        self.fetched = Some(fetched);
        Ok(())
    }

    /// The state with its tensors back on the device, once their copy is done.
    pub fn restore(mut self) -> Result<S> {
        self.fetch()?;
        #[cfg(feature = "cuda")]
        if let Some(f) = self.cuda.take() {
            f.compute_waits_for_fetch()?;
        }
        let fetched = self.fetched.take().expect("fetched above");
        let mut slots = self.slots.iter();
        self.state.each_tensor(&mut |t| {
            if let Some(Slot::Moved(i)) = slots.next() {
                *t = fetched[*i].clone();
            }
        });
        Ok(self.state)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The copy stream, its events and the pinned buffers.

    use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent, CudaStream, PinnedHostSlice};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{DType, Result, Tensor};
    use std::sync::{Arc, Mutex, OnceLock};

    /// One device's copy stream and its free pinned buffers.
    struct Engine {
        device: candle_core::cuda_backend::DeviceId,
        copies: Arc<CudaStream>,
        free: Vec<PinnedHostSlice<u8>>,
    }

    fn engines() -> &'static Mutex<Vec<Engine>> {
        static ENGINES: OnceLock<Mutex<Vec<Engine>>> = OnceLock::new();
        ENGINES.get_or_init(Default::default)
    }

    /// Runs `f` on `dev`'s engine, made on first use.
    fn with_engine<T>(dev: &CudaDevice, f: impl FnOnce(&mut Engine) -> Result<T>) -> Result<T> {
        let mut all = engines().lock().expect("offload engines");
        let i = match all.iter().position(|e| e.device == dev.id()) {
            Some(i) => i,
            None => {
                let copies = dev.cuda_stream().context().new_stream().w()?;
                all.push(Engine {
                    device: dev.id(),
                    copies,
                    free: Vec::new(),
                });
                all.len() - 1
            }
        };
        f(&mut all[i])
    }

    /// A stash's copies: its pinned buffer and the events that order them.
    pub struct InFlight {
        device: CudaDevice,
        compute: Arc<CudaStream>,
        buffer: Option<PinnedHostSlice<u8>>,
        host: usize,
        copied: CudaEvent,
        fetched: Option<CudaEvent>,
    }

    impl InFlight {
        /// Copies `originals` into a pinned buffer of `bytes` at `offsets`, on the copy stream
        /// after the compute stream's work so far.
        pub fn copy_out(
            dev: &CudaDevice,
            originals: &[Tensor],
            offsets: &[usize],
            bytes: usize,
        ) -> Result<Self> {
            let compute = dev.cuda_stream();
            with_engine(dev, |e| {
                let mut buffer = match e.free.iter().position(|b| b.len() >= bytes) {
                    Some(i) => e.free.swap_remove(i),
                    // SAFETY: every byte read back was written by a copy below first.
                    None => unsafe {
                        compute
                            .context()
                            .alloc_pinned_with_flags::<u8>(bytes, 0)
                            .w()?
                    },
                };
                let host = buffer.as_mut_ptr().w()? as usize;
                e.copies.wait(&compute.record_event(None).w()?).w()?;
                for (t, &off) in originals.iter().zip(offsets) {
                    let src = crate::nn::gpu::address(t)?;
                    let n = t.elem_count() * t.dtype().size_in_bytes();
                    // SAFETY: `src` holds `n` bytes (a contiguous tensor kept alive until the
                    // compute stream waits for `copied`, `release`); the buffer holds `bytes`.
                    unsafe {
                        sys::cuMemcpyDtoHAsync_v2(
                            (host + off) as *mut _,
                            src,
                            n,
                            e.copies.cu_stream(),
                        )
                        .result()
                        .w()?
                    };
                }
                let copied = e.copies.record_event(None).w()?;
                Ok(InFlight {
                    device: dev.clone(),
                    compute: compute.clone(),
                    buffer: Some(buffer),
                    host,
                    copied,
                    fetched: None,
                })
            })
        }

        /// The compute stream waits for the copy out: work queued after this (the originals'
        /// frees among it) runs once the copy is done.
        pub fn compute_waits_for_copy(&self) -> Result<()> {
            self.compute.wait(&self.copied).w()
        }

        /// Allocates each tensor on the compute stream and copies it back on the copy stream.
        pub fn copy_in(&mut self, shapes: &[(&[usize], DType, usize)]) -> Result<Vec<Tensor>> {
            let dev = self.device.clone();
            let mut out = Vec::with_capacity(shapes.len());
            for &(dims, dtype, _) in shapes {
                out.push(crate::nn::gpu::uninit(&dev, dtype, &dims.into())?);
            }
            with_engine(&dev, |e| {
                e.copies.wait(&self.compute.record_event(None).w()?).w()?;
                for (t, &(_, _, off)) in out.iter().zip(shapes) {
                    let dst = crate::nn::gpu::address(t)?;
                    let n = t.elem_count() * t.dtype().size_in_bytes();
                    // SAFETY: `dst` was just allocated with `n` bytes; the copy stream runs after
                    // the allocation (the wait above) and after the copy out (same stream).
                    unsafe {
                        sys::cuMemcpyHtoDAsync_v2(
                            dst,
                            (self.host + off) as *const _,
                            n,
                            e.copies.cu_stream(),
                        )
                        .result()
                        .w()?
                    };
                }
                self.fetched = Some(e.copies.record_event(None).w()?);
                Ok(())
            })?;
            Ok(out)
        }

        /// The compute stream waits for the copy back; the pinned buffer returns to the pool (a
        /// later copy into it runs on the same copy stream, after this one).
        pub fn compute_waits_for_fetch(mut self) -> Result<()> {
            if let Some(ev) = &self.fetched {
                self.compute.wait(ev).w()?;
            }
            self.give_back_buffer()
        }

        fn give_back_buffer(&mut self) -> Result<()> {
            match self.buffer.take() {
                Some(b) => with_engine(&self.device, |e| {
                    e.free.push(b);
                    Ok(())
                }),
                None => Ok(()),
            }
        }
    }

    /// A stash dropped unrestored (an error, or a backward that stopped early): the compute
    /// stream's later work, the originals' frees among it, waits for the copies, and the buffer
    /// goes back to the pool rather than being freed under a copy in flight.
    impl Drop for InFlight {
        fn drop(&mut self) {
            if self.buffer.is_some() {
                let _ = self
                    .compute
                    .wait(self.fetched.as_ref().unwrap_or(&self.copied));
                let _ = self.give_back_buffer();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state of four tensors: a wide one named twice, a small one and a transposed view.
    struct Toy {
        a: Tensor,
        again: Tensor,
        small: Tensor,
        strided: Tensor,
    }

    impl SavedTensors for Toy {
        fn each_tensor(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
            f(&mut self.a);
            f(&mut self.again);
            f(&mut self.small);
            f(&mut self.strided);
        }
    }

    #[test]
    fn a_stash_gives_back_every_tensor_and_moves_each_once() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 32768., &dev)?.reshape((128, 256))?;
        let wide = Tensor::arange(0f32, 32768., &dev)?.reshape((256, 128))?;
        let toy = Toy {
            a: a.clone(),
            again: a.clone(),
            small: Tensor::ones(16, DType::F32, &dev)?,
            strided: wide.t()?,
        };
        let mut s = stash(toy, &dev)?;
        // `a` moves once (`again` is the same tensor), `small` moves (no floor on the CPU), the
        // transposed view stays.
        assert_eq!(s.bytes(), (128 * 256 + 16) * 4);
        assert_eq!(s.state.a.dims(), &[] as &[usize]);
        assert_eq!(s.state.again.dims(), &[] as &[usize]);
        assert_eq!(s.state.small.dims(), &[] as &[usize]);
        assert_eq!(s.state.strided.dims(), &[128, 256]);
        s.release()?;
        s.fetch()?;
        let back = s.restore()?;
        let same = |x: &Tensor, y: &Tensor| -> Result<bool> {
            Ok(x.dims() == y.dims()
                && x.flatten_all()?.to_vec1::<f32>()? == y.flatten_all()?.to_vec1::<f32>()?)
        };
        assert!(same(&back.a, &a)?);
        assert!(same(&back.again, &a)?);
        assert!(same(&back.small, &Tensor::ones(16, DType::F32, &dev)?)?);
        assert!(same(&back.strided, &wide.t()?)?);
        Ok(())
    }

    /// On CUDA a tensor under the floor stays: its copy would cost more than it frees.
    #[test]
    fn the_floor_keeps_small_tensors_and_views() -> Result<()> {
        let dev = Device::Cpu;
        let wide = Tensor::zeros((128, 128), DType::F32, &dev)?;
        assert!(movable(&wide, &dev, MIN_BYTES).is_some());
        assert!(movable(&wide.narrow(0, 0, 127)?, &dev, MIN_BYTES).is_none());
        assert!(movable(&wide.t()?, &dev, 0).is_none());
        assert!(movable(&wide.to_dtype(DType::U32)?, &dev, 0).is_none());
        Ok(())
    }
}
