//! Memory accounting: a counting allocator (live and peak bytes of every heap allocation,
//! tensors included; resettable per epoch, the CPU analogue of PyTorch's `max_memory_allocated`)
//! and the process's peak RSS from `/proc/self/status`.
//!
//! On CUDA, candle allocates every tensor with cudarc's stream-ordered `cuMemAllocAsync` from the
//! device's current memory pool, so the pool's counters are the allocator-level numbers:
//! `CU_MEMPOOL_ATTR_USED_MEM_CURRENT` (live bytes) and `CU_MEMPOOL_ATTR_USED_MEM_HIGH` (peak since
//! the last reset), what PyTorch reports as `memory_allocated` / `max_memory_allocated`. The
//! driver's view (`cuMemGetInfo`: everything the process holds, pool reserve, cuBLAS workspace and
//! CUDA context included) is reported beside them. [`MemTracker`] reads whichever applies.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts live and peak heap bytes. The library installs no allocator: a program that wants heap
/// numbers makes it its `#[global_allocator]` (the `safetune` binary does; so do the library's
/// tests). Without it the heap counters stay at 0.
pub struct CountingAllocator;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's allocations less its frees (negative when it frees what others allocated),
    /// and the highest value since its last reset: a measurement that threads running beside it
    /// do not disturb.
    static THREAD_LIVE: Cell<isize> = const { Cell::new(0) };
    static THREAD_PEAK: Cell<isize> = const { Cell::new(0) };
}

fn thread_add(bytes: isize) {
    let _ = THREAD_LIVE.try_with(|live| {
        let v = live.get() + bytes;
        live.set(v);
        let _ = THREAD_PEAK.try_with(|peak| peak.set(peak.get().max(v)));
    });
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
            thread_add(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        thread_add(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size >= layout.size() {
                let live = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                    + (new_size - layout.size());
                PEAK.fetch_max(live, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
            thread_add(new_size as isize - layout.size() as isize);
        }
        p
    }
}

/// Bytes currently allocated on the heap.
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Highest `live_bytes` since the last `reset_peak`.
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

pub fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// What this thread has allocated and not freed (see [`thread_peak_bytes`]).
pub fn thread_live_bytes() -> isize {
    THREAD_LIVE.with(|l| l.get())
}

/// The highest [`thread_live_bytes`] since this thread's last [`reset_thread_peak`]: the heap
/// peak of work done on this thread, undisturbed by other threads.
pub fn thread_peak_bytes() -> isize {
    THREAD_PEAK.with(|p| p.get())
}

pub fn reset_thread_peak() {
    THREAD_PEAK.with(|p| p.set(thread_live_bytes()));
}

/// Peak resident set size of the process (VmHWM), where the OS reports it.
/// Tests that read the process-wide counters (heap bytes, matmul FLOPs) hold this, so tests
/// running in parallel threads do not move the counters under them.
#[cfg(test)]
pub(crate) fn counters_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn peak_rss_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What the driver says about the whole device (`cuMemGetInfo`): bytes in use by every process
/// and context, and the device's capacity.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct DriverMem {
    pub used: usize,
    pub total: usize,
}

/// Sets up a device for training: on CUDA, the memory pool keeps what is freed
/// (`CU_MEMPOOL_ATTR_RELEASE_THRESHOLD` = u64::MAX) instead of handing it back to the driver at
/// every synchronization, so the next step reuses it without new driver allocations. A no-op on
/// the CPU.
pub fn device_init(device: &candle_core::Device) -> anyhow::Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => cuda::set_attr(
            d,
            cuda::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            u64::MAX,
        ),
        _ => Ok(()),
    }
}

/// Live and peak bytes where a device's tensors live: the counting heap allocator for the CPU,
/// the CUDA memory pool for a GPU (each read waits for the device's queued work first, since
/// frees are stream-ordered).
#[derive(Clone, Debug)]
pub struct MemTracker {
    device: candle_core::Device,
}

impl MemTracker {
    pub fn new(device: &candle_core::Device) -> Self {
        Self {
            device: device.clone(),
        }
    }

    pub fn device(&self) -> &candle_core::Device {
        &self.device
    }

    /// `heap` (CPU) or `cuda-pool`.
    pub fn kind(&self) -> &'static str {
        if self.device.is_cpu() {
            "heap"
        } else {
            "cuda-pool"
        }
    }

    /// Bytes allocated now.
    pub fn live(&self) -> usize {
        match &self.device {
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(d) => cuda::counter(
                d,
                cuda::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
            ),
            _ => live_bytes(),
        }
    }

    /// Highest `live` since the last `reset_peak`.
    pub fn peak(&self) -> usize {
        match &self.device {
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(d) => {
                let high = cuda::counter(
                    d,
                    cuda::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                );
                high.max(self.live())
            }
            _ => peak_bytes(),
        }
    }

    pub fn reset_peak(&self) {
        match &self.device {
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(d) => {
                // The high watermark can only be set to zero; it then restarts from the next use.
                let _ = self.device.synchronize();
                if let Err(e) = cuda::set_attr(
                    d,
                    cuda::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    0,
                ) {
                    tracing::warn!("cannot reset the CUDA pool's peak: {e:#}");
                }
            }
            _ => reset_peak(),
        }
    }

    /// The driver's view of the whole device; None on the CPU.
    pub fn driver(&self) -> Option<DriverMem> {
        match &self.device {
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(d) => cuda::driver(d),
            _ => None,
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::DriverMem;
    use candle_core::cuda_backend::cudarc::driver::result;
    pub use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::CudaDevice;

    /// The pool `cuMemAllocAsync` draws from on this device (the default pool unless changed).
    fn pool(d: &CudaDevice) -> anyhow::Result<sys::CUmemoryPool> {
        let stream = d.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread()?;
        // SAFETY: the device handle comes from a live context.
        Ok(unsafe { result::device::get_mem_pool(ctx.cu_device()) }?)
    }

    pub fn get_attr(d: &CudaDevice, attr: sys::CUmemPool_attribute) -> anyhow::Result<u64> {
        let pool = pool(d)?;
        let mut v: u64 = 0;
        // SAFETY: every attribute read here is a cuuint64_t.
        unsafe { result::mem_pool::get_attribute(pool, attr, &mut v as *mut u64 as *mut _) }?;
        Ok(v)
    }

    pub fn set_attr(d: &CudaDevice, attr: sys::CUmemPool_attribute, v: u64) -> anyhow::Result<()> {
        let pool = pool(d)?;
        let mut v = v;
        // SAFETY: every attribute written here is a cuuint64_t.
        unsafe { result::mem_pool::set_attribute(pool, attr, &mut v as *mut u64 as *mut _) }?;
        Ok(())
    }

    /// A pool counter after the queued work (and its frees) has run; 0 if unreadable.
    pub fn counter(d: &CudaDevice, attr: sys::CUmemPool_attribute) -> usize {
        let read = || -> anyhow::Result<u64> {
            d.cuda_stream().synchronize()?;
            get_attr(d, attr)
        };
        match read() {
            Ok(v) => v as usize,
            Err(e) => {
                tracing::warn!("cannot read the CUDA pool's {attr:?}: {e:#}");
                0
            }
        }
    }

    pub fn driver(d: &CudaDevice) -> Option<DriverMem> {
        d.cuda_stream().context().bind_to_thread().ok()?;
        let (free, total) = result::mem_get_info().ok()?;
        Some(DriverMem {
            used: total - free,
            total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_tracker_reads_the_heap_counters() {
        let _lock = counters_lock();
        let t = MemTracker::new(&candle_core::Device::Cpu);
        assert_eq!(t.kind(), "heap");
        assert!(t.driver().is_none());
        t.reset_peak();
        let v = vec![1u8; 32 << 20];
        assert!(t.peak() >= 32 << 20);
        assert!(t.live() >= 32 << 20);
        drop(v);
        assert!(device_init(&candle_core::Device::Cpu).is_ok());
    }

    #[test]
    fn peak_follows_a_large_allocation_and_resets() {
        let _lock = counters_lock();
        reset_peak();
        let before = peak_bytes();
        let v = vec![1u8; 64 << 20];
        // Other threads may free memory meanwhile, so only what this thread holds is certain.
        assert!(peak_bytes() >= live_bytes() && live_bytes() >= 64 << 20);
        drop(v);
        // Other test threads allocate (and reset) concurrently; a quiet moment comes within a
        // few tries, while a reset that does not forget the 64 MiB never passes.
        let forgot = (0..20).any(|_| {
            reset_peak();
            let ok = peak_bytes() < before + (64 << 20);
            std::thread::sleep(std::time::Duration::from_millis(5));
            ok
        });
        assert!(
            forgot,
            "reset_peak must drop the freed 64 MiB from the peak"
        );
    }
}
