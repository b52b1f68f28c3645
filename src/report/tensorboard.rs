//! TensorBoard event files (`--report-to tensorboard`): scalars written as TensorFlow's `Event`
//! records in `OUTPUT/runs/events.out.tfevents.<seconds>.safetune`, which `tensorboard --logdir
//! OUTPUT/runs` reads.
//!
//! The format is small enough to write by hand, and the Rust crates for it were not worth their
//! weight (`tensorboard-rs` pulls protobuf 2 and an old `image`): a file is a sequence of TFRecord
//! frames (length as u64 LE, its masked CRC-32C, the bytes, their masked CRC-32C), each holding
//! one protobuf `Event` { wall_time = 1 (double), step = 2 (int64), file_version = 3 (string) or
//! summary = 5 { value = 1 { tag = 1 (string), simple_value = 2 (float) } } }.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// An open event file.
pub struct EventWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl EventWriter {
    /// Creates a new event file in `dir` (made if missing), starting with the version record
    /// TensorBoard expects first. A resumed run writes a file of its own beside the earlier ones.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the TensorBoard folder", dir.display()))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        // Two files started in the same second (a quick resume) must not share a name.
        let mut n = 0;
        let path = loop {
            let suffix = if n == 0 {
                String::new()
            } else {
                format!(".{n}")
            };
            let p = dir.join(format!(
                "events.out.tfevents.{}.safetune{suffix}",
                now.as_secs()
            ));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let file = std::fs::File::create(&path)
            .with_context(|| format!("{}: cannot create", path.display()))?;
        let mut w = Self {
            path,
            file: std::io::BufWriter::new(file),
        };
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.record(&event)?;
        Ok(w)
    }

    /// Writes the scalar `value` of `tag` at optimizer step `step`.
    pub fn scalar(&mut self, tag: &str, step: usize, value: f64) -> Result<()> {
        let mut v = Vec::new();
        put_bytes(&mut v, 1, tag.as_bytes());
        put_fixed32(&mut v, 2, (value as f32).to_bits());
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &v);
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_varint_field(&mut event, 2, step as u64);
        put_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    /// Makes what was written readable (TensorBoard reads a file as it grows).
    pub fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut frame = Vec::with_capacity(data.len() + 16);
        frame.extend_from_slice(&len);
        frame.extend_from_slice(&masked_crc(&len).to_le_bytes());
        frame.extend_from_slice(data);
        frame.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file
            .write_all(&frame)
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus a constant.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Protobuf wire types: 0 varint, 1 fixed 64-bit, 2 length-delimited, 5 fixed 32-bit.
fn put_key(out: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(out, (field << 3) | wire);
}

fn put_varint_field(out: &mut Vec<u8>, field: u64, v: u64) {
    put_key(out, field, 0);
    put_varint(out, v);
}

fn put_double(out: &mut Vec<u8>, field: u64, v: f64) {
    put_key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_fixed32(out: &mut Vec<u8>, field: u64, bits: u32) {
    put_key(out, field, 5);
    out.extend_from_slice(&bits.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Reading event files back: what the tests check the writer against.
pub mod read {
    use anyhow::{bail, ensure, Result};

    /// The records of an event file's bytes, each checked against its two checksums.
    pub fn records(bytes: &[u8]) -> Result<Vec<&[u8]>> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            ensure!(
                bytes.len() >= at + 12,
                "truncated record header at byte {at}"
            );
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into()?) as usize;
            let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into()?);
            ensure!(
                super::masked_crc(len_bytes) == crc,
                "bad length checksum at byte {at}"
            );
            let data_at = at + 12;
            ensure!(
                bytes.len() >= data_at + len + 4,
                "truncated record at byte {at}"
            );
            let data = &bytes[data_at..data_at + len];
            let crc = u32::from_le_bytes(bytes[data_at + len..data_at + len + 4].try_into()?);
            ensure!(
                super::masked_crc(data) == crc,
                "bad data checksum at byte {at}"
            );
            out.push(data);
            at = data_at + len + 4;
        }
        Ok(out)
    }

    /// A protobuf field: its number and value (varint, 64-bit, bytes or 32-bit).
    #[derive(Debug, PartialEq)]
    pub enum Field<'a> {
        Varint(u64),
        Fixed64(u64),
        Bytes(&'a [u8]),
        Fixed32(u32),
    }

    fn varint(b: &[u8], at: &mut usize) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = b.get(*at) else {
                bail!("truncated varint")
            };
            *at += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(v);
            }
        }
        bail!("varint too long")
    }

    /// The fields of one protobuf message, in order.
    pub fn fields(b: &[u8]) -> Result<Vec<(u64, Field<'_>)>> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < b.len() {
            let key = varint(b, &mut at)?;
            let take = |at: &mut usize, n: usize| -> Result<&[u8]> {
                ensure!(b.len() >= *at + n, "truncated field");
                *at += n;
                Ok(&b[*at - n..*at])
            };
            let f = match key & 7 {
                0 => Field::Varint(varint(b, &mut at)?),
                1 => Field::Fixed64(u64::from_le_bytes(take(&mut at, 8)?.try_into()?)),
                2 => {
                    let n = varint(b, &mut at)? as usize;
                    Field::Bytes(take(&mut at, n)?)
                }
                5 => Field::Fixed32(u32::from_le_bytes(take(&mut at, 4)?.try_into()?)),
                w => bail!("wire type {w}"),
            };
            out.push((key >> 3, f));
        }
        Ok(out)
    }

    /// The scalars of an event file, `(tag, step, value)` in order; the version record first is
    /// required.
    pub fn scalars(bytes: &[u8]) -> Result<Vec<(String, u64, f32)>> {
        let records = records(bytes)?;
        let first = records.first().map(|r| fields(r)).transpose()?;
        ensure!(
            first.is_some_and(|f| f.contains(&(3, Field::Bytes(b"brain.Event:2")))),
            "the first record is not the file version"
        );
        let mut out = Vec::new();
        for r in &records[1..] {
            let event = fields(r)?;
            let step = event.iter().find_map(|(n, f)| match (n, f) {
                (2, Field::Varint(s)) => Some(*s),
                _ => None,
            });
            for (n, f) in &event {
                let (5, Field::Bytes(summary)) = (n, f) else {
                    continue;
                };
                for (_, value) in fields(summary)? {
                    let Field::Bytes(value) = value else { continue };
                    let (mut tag, mut v) = (None, None);
                    for (n, f) in fields(value)? {
                        match (n, f) {
                            (1, Field::Bytes(t)) => tag = Some(String::from_utf8(t.to_vec())?),
                            (2, Field::Fixed32(bits)) => v = Some(f32::from_bits(bits)),
                            _ => {}
                        }
                    }
                    if let (Some(tag), Some(v)) = (tag, v) {
                        out.push((tag, step.unwrap_or(0), v));
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32C's check value ("123456789" -> 0xe3069283, RFC 3720) and TFRecord's mask of it.
    #[test]
    fn masked_crc_of_the_check_string() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(
            masked_crc(b"123456789"),
            0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }

    /// What is written reads back: the version record, then each scalar with its tag, step and
    /// value; a flipped byte fails its checksum.
    #[test]
    fn scalars_round_trip_and_checksums_hold() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(&dir.path().join("runs")).unwrap();
        w.scalar("train/loss", 1, 0.75).unwrap();
        w.scalar("train/lr", 300, 1e-4).unwrap();
        w.scalar("eval/accuracy", 70_000, 0.5).unwrap();
        w.flush().unwrap();
        let path = w.path.clone();
        drop(w);
        assert!(path.starts_with(dir.path().join("runs")));
        let mut bytes = std::fs::read(&path).unwrap();
        let got = read::scalars(&bytes).unwrap();
        let want = [
            ("train/loss", 1, 0.75f32),
            ("train/lr", 300, 1e-4f64 as f32),
            ("eval/accuracy", 70_000, 0.5),
        ];
        let got: Vec<(&str, u64, f32)> = got.iter().map(|(t, s, v)| (t.as_str(), *s, *v)).collect();
        assert_eq!(got, want);
        let last = bytes.len() - 6;
        bytes[last] ^= 1;
        let e = read::scalars(&bytes).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        // A second writer in the same second gets a file of its own.
        let w2 = EventWriter::create(&dir.path().join("runs")).unwrap();
        assert_ne!(w2.path, path);
    }
}
