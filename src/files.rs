//! Output files: created with the path in every error, replaced atomically; a run's output
//! folder held by one run at a time.

use anyhow::Context;
use std::fs::{File, TryLockError};
use std::path::Path;

/// Creates (or truncates) an output file, naming it in the error.
pub fn create_file(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("{}: cannot create", path.display()))
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader never sees half a
/// file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// The lock file in a run's output folder. It stays there after the run: removing a lock file
/// while another process may be opening it would let two runs hold "the" lock.
pub const LOCK_FILE: &str = ".safetune.lock";

/// One run's exclusive hold of its output folder (an advisory lock on [`LOCK_FILE`]), released
/// when dropped or when the process ends, however it ends.
pub struct OutputLock {
    _file: File,
}

/// Takes `dir`'s lock, creating the lock file if missing; fails at once, naming the folder, if
/// another run holds it.
pub fn lock_output(dir: &Path) -> anyhow::Result<OutputLock> {
    let path = dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("{}: cannot create the lock file", path.display()))?;
    try_lock(&file, dir)?;
    Ok(OutputLock { _file: file })
}

/// Fails, naming the folder, if another run holds `dir`'s lock; creates nothing.
pub fn ensure_unlocked(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(LOCK_FILE);
    match File::open(&path) {
        Ok(file) => try_lock(&file, dir), // released as `file` closes
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("{}: cannot open", path.display()))),
    }
}

fn try_lock(file: &File, dir: &Path) -> anyhow::Result<()> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) => anyhow::bail!(
            "{}: the output folder is in use by another safetune run (it holds {LOCK_FILE}); \
             wait for that run to end or choose another --output",
            dir.display()
        ),
        Err(TryLockError::Error(e)) => Err(anyhow::Error::new(e)
            .context(format!("{}: cannot lock", dir.join(LOCK_FILE).display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While one holder has the lock, a second lock and the check fail naming the folder; once it
    /// is dropped both succeed, and the check never creates the lock file.
    #[test]
    fn one_run_per_output_folder() {
        let dir = tempfile::tempdir().unwrap();
        ensure_unlocked(dir.path()).unwrap();
        assert!(!dir.path().join(LOCK_FILE).exists());
        let held = lock_output(dir.path()).unwrap();
        for e in [
            lock_output(dir.path()).err().unwrap(),
            ensure_unlocked(dir.path()).unwrap_err(),
        ] {
            let e = e.to_string();
            assert!(
                e.contains(&dir.path().display().to_string()) && e.contains("in use"),
                "{e}"
            );
        }
        drop(held);
        ensure_unlocked(dir.path()).unwrap();
        let _again = lock_output(dir.path()).unwrap();
    }
}
