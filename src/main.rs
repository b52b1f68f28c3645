use clap::Parser;

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

fn main() {
    tune_allocator();
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
