//! Times loading and tokenizing a text-classification data set (as `train` does before its first
//! step), with the counting allocator of the `safetune` binary or with the system allocator alone
//! (`SAFETUNE_PROBE_SYSTEM_ALLOC=1`), to see what counting every allocation costs when the
//! tokenizer's threads allocate at once.
//!
//! `cargo run --release --example tokenize_probe -- MODEL_DIR DATA_DIR KIND` (KIND: spam, folder)
use safetune::data::batch::TextEncoder;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

static SYSTEM_ONLY: AtomicBool = AtomicBool::new(false);

/// The counting allocator, or the system's when `SYSTEM_ONLY` is set (before any thread starts).
struct Switch;

unsafe impl GlobalAlloc for Switch {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if SYSTEM_ONLY.load(Ordering::Relaxed) {
            System.alloc(l)
        } else {
            safetune::memory::CountingAllocator.alloc(l)
        }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if SYSTEM_ONLY.load(Ordering::Relaxed) {
            System.dealloc(p, l)
        } else {
            safetune::memory::CountingAllocator.dealloc(p, l)
        }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if SYSTEM_ONLY.load(Ordering::Relaxed) {
            System.realloc(p, l, n)
        } else {
            safetune::memory::CountingAllocator.realloc(p, l, n)
        }
    }
}

#[global_allocator]
static ALLOCATOR: Switch = Switch;

fn main() {
    SYSTEM_ONLY.store(
        std::env::var_os("SAFETUNE_PROBE_SYSTEM_ALLOC").is_some(),
        Ordering::Relaxed,
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, data, kind] = args.as_slice() else {
        eprintln!("usage: tokenize_probe MODEL_DIR DATA_DIR spam|folder");
        std::process::exit(2);
    };
    let t0 = Instant::now();
    let ds = match kind.as_str() {
        "spam" => safetune::data::spam::load_spamassassin(data.as_ref()),
        _ => safetune::data::load_text_folder(data.as_ref()),
    }
    .expect("data set");
    let t_load = t0.elapsed().as_secs_f64();
    let enc = TextEncoder::from_model_dir(model.as_ref(), 128).expect("tokenizer");
    let t1 = Instant::now();
    let encoded = enc.encode_all(&ds.examples).expect("tokenized");
    let t_tok = t1.elapsed().as_secs_f64();
    println!(
        "{} examples, {} tokens: load {t_load:.2} s, tokenize {t_tok:.2} s ({} threads, {})",
        encoded.len(),
        encoded.iter().map(|e| e.ids.len()).sum::<usize>(),
        rayon::current_num_threads(),
        if SYSTEM_ONLY.load(Ordering::Relaxed) {
            "system allocator"
        } else {
            "counting allocator"
        }
    );
}
