//! Cache of the frozen bottom's output, per training example.
//!
//! Once every adapter below layer `k` is frozen, the embeddings and layers `0..k` run in inference
//! mode: for a given example their output is a constant. The first time an example passes after
//! the freeze, its `[tokens, hidden]` rows are written to a file in the run's output folder; every
//! later pass reads them back instead of recomputing `k` layers. The cache lives on disk, not in
//! the heap, so it costs no training memory. When more layers freeze later (`k` grows) the rows
//! stay valid and the layers between their depth and `k` run from them; the file is removed at the
//! end of the run.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub struct FrozenCache {
    path: PathBuf,
    file: File,
    /// The frozen depth `k` the stored rows belong to.
    depth: usize,
    /// Example index -> (byte offset, number of f32 values).
    entries: HashMap<usize, (u64, usize)>,
    end: u64,
    pub hits: usize,
    pub misses: usize,
}

impl FrozenCache {
    pub fn create(dir: &Path) -> Result<Self> {
        let path = dir.join("frozen_bottom.cache");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .with_context(|| {
                format!("{}: cannot create the frozen-bottom cache", path.display())
            })?;
        Ok(Self {
            path,
            file,
            depth: 0,
            entries: HashMap::new(),
            end: 0,
            hits: 0,
            misses: 0,
        })
    }

    /// The depth whose rows the cache serves when layers `0..k` are frozen: the depth it was
    /// filled at, as long as that is not above `k` (freezing only moves up, so rows of a lower
    /// depth stay valid: the layers between run from them); otherwise it starts over at `k`.
    pub fn depth_for(&mut self, k: usize) -> Result<usize> {
        if self.entries.is_empty() || self.depth > k {
            self.set_depth(k)?;
        }
        Ok(self.depth)
    }

    /// Makes the cache serve depth `k`, dropping rows of any other depth.
    pub fn set_depth(&mut self, k: usize) -> Result<()> {
        if k != self.depth {
            self.depth = k;
            self.entries.clear();
            self.end = 0;
            self.file
                .set_len(0)
                .with_context(|| format!("{}: cannot truncate", self.path.display()))?;
        }
        Ok(())
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    /// The stored rows of `example`, if any.
    pub fn get(&mut self, example: usize) -> Result<Option<Vec<f32>>> {
        let Some(&(offset, n)) = self.entries.get(&example) else {
            self.misses += 1;
            return Ok(None);
        };
        let mut bytes = vec![0u8; n * 4];
        self.file.seek(SeekFrom::Start(offset))?;
        self.file
            .read_exact(&mut bytes)
            .with_context(|| format!("{}: cannot read", self.path.display()))?;
        self.hits += 1;
        Ok(Some(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ))
    }

    pub fn put(&mut self, example: usize, values: &[f32]) -> Result<()> {
        if self.entries.contains_key(&example) {
            return Ok(());
        }
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.file.seek(SeekFrom::Start(self.end))?;
        self.file
            .write_all(&bytes)
            .with_context(|| format!("{}: cannot write", self.path.display()))?;
        self.entries.insert(example, (self.end, values.len()));
        self.end += bytes.len() as u64;
        Ok(())
    }
}

/// A batch as the cache sees it: which training examples its rows are, how many real (unpadded)
/// tokens each has, and its padded length.
pub struct BatchRows<'a> {
    pub examples: &'a [usize],
    pub lens: Vec<usize>,
    pub seq: usize,
}

impl FrozenCache {
    /// The output `[batch*seq, hidden]` (in `dtype` on `device`) of the frozen layers `0..k` for
    /// `rows`: from the stored rows of depth `d <= k` when every example has them, then
    /// `advance(h, d)` runs layers `d..k`; otherwise `compute(d)` (inference) and each example's
    /// real rows are stored.
    #[allow(clippy::too_many_arguments)]
    pub fn bottom(
        &mut self,
        rows: &BatchRows,
        k: usize,
        hidden: usize,
        dtype: DType,
        device: &Device,
        compute: impl FnOnce(usize) -> candle_core::Result<Tensor>,
        advance: impl FnOnce(Tensor, usize) -> candle_core::Result<Tensor>,
    ) -> Result<Tensor> {
        let d = self.depth_for(k)?;
        let (batch, seq) = (rows.examples.len(), rows.seq);
        let mut values = Vec::with_capacity(batch * seq * hidden);
        let mut complete = true;
        for (j, &e) in rows.examples.iter().enumerate() {
            match self.get(e)? {
                Some(v) if v.len() == rows.lens[j] * hidden => {
                    values.extend(v);
                    values.resize((j + 1) * seq * hidden, 0.0);
                }
                _ => {
                    complete = false;
                    break;
                }
            }
        }
        let h = if complete {
            Tensor::from_vec(values, (batch * seq, hidden), device)?.to_dtype(dtype)?
        } else {
            let h = compute(d)?;
            let host: Vec<f32> = h.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            for (j, &e) in rows.examples.iter().enumerate() {
                let start = j * seq * hidden;
                self.put(e, &host[start..start + rows.lens[j] * hidden])?;
            }
            h
        };
        // Layers frozen since the rows were stored run from them.
        Ok(advance(h, d)?)
    }
}

impl Drop for FrozenCache {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_reads_and_forgets_on_depth_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = FrozenCache::create(dir.path()).unwrap();
        c.set_depth(2).unwrap();
        assert_eq!(c.get(7).unwrap(), None);
        c.put(7, &[1.0, -2.5, 3.25]).unwrap();
        c.put(3, &[0.5]).unwrap();
        assert_eq!(c.get(7).unwrap(), Some(vec![1.0, -2.5, 3.25]));
        assert_eq!(c.get(3).unwrap(), Some(vec![0.5]));
        assert_eq!((c.hits, c.misses), (2, 1));
        assert_eq!(
            c.depth_for(4).unwrap(),
            2,
            "rows of a lower depth keep serving"
        );
        c.set_depth(3).unwrap();
        assert_eq!(c.get(7).unwrap(), None, "rows of another depth are gone");
        let path = dir.path().join("frozen_bottom.cache");
        assert!(path.exists());
        drop(c);
        assert!(!path.exists(), "the cache file is removed with the cache");
    }
}
