//! Output files: created with the path in every error, replaced atomically.

use anyhow::Context;
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
