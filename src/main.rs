use clap::Parser;

/// Heap numbers in `metrics.jsonl` and `summary.json` come from counting every allocation.
#[global_allocator]
static ALLOCATOR: safetune::memory::CountingAllocator = safetune::memory::CountingAllocator;

/// Keep freed tensor buffers in the heap instead of returning each one to the OS: glibc otherwise
/// unmaps every large buffer on free and the next step page-faults it back in, zeroed (measured: 7%
/// of a MiniLM training step on 2 cores).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called once before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// candle asks for its thread count on every CPU matmul, and unless `RAYON_NUM_THREADS` is set
/// that reads `/proc/cpuinfo` each time (measured on 2 cores: 6% of a MiniLM training step, 17% of
/// generation). Settle it once, at the count candle would pick (physical cores) but no more than
/// the CPUs this process may run on: candle's count ignores `taskset` and container CPU limits,
/// and its spinning workers then share cores (measured pinned to 1 of 2 cores: 1010 ms a MiniLM
/// step against 792 ms with one thread). rayon's own pool, which our CPU kernels share, then has
/// that size too.
fn settle_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let allowed = std::thread::available_parallelism().map_or(usize::MAX, |n| n.get());
        let n = candle_core::utils::get_num_threads().min(allowed).max(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// candle's elementwise CPU ops run on its own worker pool, whose idle workers spin 25,000
/// `pause`s before they sleep, while its matmuls run on rayon's pool: between the two, spinning
/// workers hold the cores the next matmul needs. Measured on 2 cores (AMD EPYC): a SmolLM2
/// `train-lm` step 2.42-2.55 s at candle's default, 2.06-2.14 s at 2,000 or 0; a MiniLM `train`
/// step 0.86-1.00 s against 0.82-0.85 s. `CANDLE_BARRIER_POOL_SPIN_LIMIT` set by hand wins.
fn settle_spin_limit() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "2000");
    }
}

fn main() {
    tune_allocator();
    settle_thread_count();
    settle_spin_limit();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = safetune::cli::Cli::parse();
    if let Err(e) = safetune::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
