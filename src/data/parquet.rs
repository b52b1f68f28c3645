//! Parquet tables through the `parquet` crate's row API (no Arrow): only the text and label
//! columns are read (a projection), so wide files cost what the task uses.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;

use super::table::{Row, TableSpec};
use super::DataError;

fn open(path: &Path) -> Result<SerializedFileReader<File>, DataError> {
    let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    check_footer(path, &mut file, len)?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| DataError::format(path, format!("not a readable Parquet file ({e})")))?;
    check_chunks(path, &reader, len)?;
    check_page_headers(path, &reader)?;
    Ok(reader)
}

/// Refuses a column chunk whose offset or size is negative or past the file's end: the
/// `parquet` crate asserts on a negative one (`ColumnChunkMetaData::byte_range`, reached when
/// the rows are read), a panic the `parquet` fuzz target found.
fn check_chunks(
    path: &Path,
    reader: &SerializedFileReader<File>,
    len: u64,
) -> Result<(), DataError> {
    for (g, group) in reader.metadata().row_groups().iter().enumerate() {
        for (c, chunk) in group.columns().iter().enumerate() {
            let start = chunk
                .dictionary_page_offset()
                .unwrap_or(chunk.data_page_offset());
            let size = chunk.compressed_size();
            let end = u64::try_from(start)
                .ok()
                .zip(u64::try_from(size).ok())
                .and_then(|(s, n)| s.checked_add(n));
            if end.is_none_or(|end| end > len) {
                let msg = format!(
                    "not a readable Parquet file (row group {g}, column {c}: {size} bytes at \
                     offset {start}, outside the file's {len} bytes)"
                );
                return Err(DataError::format(path, msg));
            }
        }
    }
    Ok(())
}

/// Walks the footer's `FileMetaData` (Thrift compact) before the `parquet` crate parses it: the
/// same bounds as the page-header walk, and every schema element's `num_children` must be an i32
/// between 0 and the number of schema elements. The crate reads a field at its declared type
/// whatever the wire type says, and reserves a vector of `num_children` before it builds the
/// children, so a binary field 5 made it allocate 12.66 GB (an out-of-memory abort the `parquet`
/// fuzz target found). A file too short for a footer, or without the magic, is left to the
/// crate's own error. The crate reads the file by offsets, so where this leaves the handle's
/// position does not matter.
fn check_footer(path: &Path, file: &mut File, len: u64) -> Result<(), DataError> {
    use std::io::{Read, Seek, SeekFrom};
    if len < 12 {
        return Ok(());
    }
    let mut tail = [0u8; 8];
    file.seek(SeekFrom::Start(len - 8))
        .and_then(|_| file.read_exact(&mut tail))
        .map_err(|e| DataError::io(path, e))?;
    let footer_len = u64::from(u32::from_le_bytes(tail[..4].try_into().unwrap()));
    if &tail[4..] != b"PAR1" || footer_len + 8 > len {
        return Ok(());
    }
    let start = len - 8 - footer_len;
    file.seek(SeekFrom::Start(start))
        .map_err(|e| DataError::io(path, e))?;
    let bytes = std::io::BufReader::new(&mut *file).take(footer_len).bytes();
    let mut footer = ThriftBytes::new(bytes, footer_len, "footer");
    let refuse = |what: String| {
        let msg = format!("not a readable Parquet file (the footer at byte {start} {what})");
        DataError::format(path, msg)
    };
    footer.schema_children().map_err(refuse)?;
    Ok(())
}

/// Walks every column chunk's page headers (Thrift compact structs) before the `parquet` crate
/// reads them: a header must end inside its chunk, no list, set or map may count more elements
/// than bytes are left (each takes at least one), and a page's size must keep the next header
/// inside the chunk. The crate's own skip of an unknown field reads a list's booleans as taking no
/// bytes, so a header claiming billions of them kept it busy for minutes (a hang the `parquet`
/// fuzz target found); this walk costs one read of the headers.
fn check_page_headers(path: &Path, reader: &SerializedFileReader<File>) -> Result<(), DataError> {
    use std::io::{Read, Seek, SeekFrom};
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut file = std::io::BufReader::new(file);
    for (g, group) in reader.metadata().row_groups().iter().enumerate() {
        for (c, chunk) in group.columns().iter().enumerate() {
            let start = chunk
                .dictionary_page_offset()
                .unwrap_or(chunk.data_page_offset()) as u64; // checked by check_chunks
            let end = start + chunk.compressed_size() as u64;
            let mut pos = start;
            while pos < end {
                file.seek(SeekFrom::Start(pos))
                    .map_err(|e| DataError::io(path, e))?;
                let bytes = (&mut file).take(end - pos).bytes();
                let mut header = ThriftBytes::new(bytes, end - pos, "column chunk");
                let page_size = header.page_header().map_err(|what| {
                    let msg = format!(
                        "not a readable Parquet file (row group {g}, column {c}: the page \
                         header at byte {pos} {what})"
                    );
                    DataError::format(path, msg)
                })?;
                pos += header.read + page_size;
                if pos > end {
                    let msg = format!(
                        "not a readable Parquet file (row group {g}, column {c}: a page runs to \
                         byte {pos}, past its column chunk's end at {end})"
                    );
                    return Err(DataError::format(path, msg));
                }
            }
        }
    }
    Ok(())
}

/// A Thrift compact-protocol reader over at most `left` bytes, enough to skip any value, read a
/// `PageHeader`'s `compressed_page_size` and a `FileMetaData`'s schema elements' `num_children`.
struct ThriftBytes<I> {
    bytes: I,
    read: u64,
    left: u64,
    /// What the bytes are ("column chunk", "footer"), for the error when they run out.
    region: &'static str,
}

impl<I: Iterator<Item = std::io::Result<u8>>> ThriftBytes<I> {
    /// A reader over `bytes`, which hold `left` bytes of `region`.
    fn new(bytes: I, left: u64, region: &'static str) -> Self {
        Self {
            bytes,
            read: 0,
            left,
            region,
        }
    }

    fn byte(&mut self) -> Result<u8, String> {
        match self.bytes.next() {
            Some(Ok(b)) => {
                self.read += 1;
                self.left -= 1;
                Ok(b)
            }
            Some(Err(e)) => Err(format!("cannot be read ({e})")),
            None => Err(format!("runs past its {}", self.region)),
        }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("has a varint longer than 64 bits".into())
    }

    fn skip(&mut self, n: u64) -> Result<(), String> {
        if n > self.left {
            return Err(format!("runs past its {}", self.region));
        }
        (0..n).try_for_each(|_| self.byte().map(|_| ()))
    }

    /// A count of elements that each take at least one byte.
    fn count(&mut self, n: u64) -> Result<u64, String> {
        if n > self.left {
            return Err(format!("counts {n} elements in {} bytes", self.left));
        }
        Ok(n)
    }

    /// Skips a value of compact type `t`; `in_list`: a boolean takes a byte of its own.
    fn skip_value(&mut self, t: u8, in_list: bool, depth: u32) -> Result<(), String> {
        if depth > 64 {
            return Err("nests deeper than 64 levels".into());
        }
        match t {
            1 | 2 if !in_list => Ok(()),
            1..=3 => self.skip(1),
            4..=6 => self.varint().map(|_| ()),
            7 => self.skip(8),
            8 => {
                let n = self.varint()?;
                self.skip(n)
            }
            9 | 10 => {
                let head = self.byte()?;
                let n = match head >> 4 {
                    15 => self.varint()?,
                    n => u64::from(n),
                };
                for _ in 0..self.count(n)? {
                    self.skip_value(head & 0x0f, true, depth + 1)?;
                }
                Ok(())
            }
            11 => {
                let n = self.varint()?;
                if n > 0 {
                    let kv = self.byte()?;
                    for _ in 0..self.count(n)? {
                        self.skip_value(kv >> 4, true, depth + 1)?;
                        self.skip_value(kv & 0x0f, true, depth + 1)?;
                    }
                }
                Ok(())
            }
            12 => self.walk_struct(depth + 1, |_, _, _| Ok(false)),
            13 => self.skip(16),
            t => Err(format!("has a value of unknown type {t}")),
        }
    }

    fn zigzag(&mut self) -> Result<i64, String> {
        let z = self.varint()?;
        Ok((z >> 1) as i64 ^ -((z & 1) as i64))
    }

    /// Walks a struct's fields, handing each (field id, compact type) to `field`, which reads
    /// the value or returns `false` to have it skipped.
    fn walk_struct(
        &mut self,
        depth: u32,
        mut field: impl FnMut(&mut Self, i64, u8) -> Result<bool, String>,
    ) -> Result<(), String> {
        let mut id = 0i64;
        loop {
            let head = self.byte()?;
            let t = head & 0x0f;
            if t == 0 {
                return Ok(());
            }
            id = match head >> 4 {
                0 => self.zigzag()?,
                delta => id.wrapping_add(i64::from(delta)),
            };
            if !field(self, id, t)? {
                self.skip_value(t, false, depth)?;
            }
        }
    }

    /// Skips a struct; returns its i32 field `want`, if any. The `parquet` crate reads a known
    /// field as its declared type whatever the wire type says, so `want` of another type is
    /// refused rather than skipped (the crate would read a binary's length as the number).
    fn skip_struct(&mut self, depth: u32, want: i64) -> Result<Option<i64>, String> {
        let mut found = None;
        self.walk_struct(depth, |t, id, ty| {
            if id != want {
                return Ok(false);
            }
            if ty != 5 {
                return Err(format!("has field {want} of type {ty}, not i32"));
            }
            found = Some(t.zigzag()?);
            Ok(true)
        })?;
        Ok(found)
    }

    /// A `PageHeader`'s `compressed_page_size` (field 3): the bytes of page data after it.
    fn page_header(&mut self) -> Result<u64, String> {
        match self.skip_struct(0, 3)? {
            Some(n) if n >= 0 => Ok(n as u64),
            Some(n) => Err(format!("gives a negative page size ({n})")),
            None => Err("has no compressed_page_size".into()),
        }
    }

    /// A `FileMetaData`'s schema (field 2, a list of `SchemaElement`s): each element's
    /// `num_children` (field 5), if set, which must lie in 0..(the number of elements). The rest
    /// of the footer is skipped.
    fn schema_children(&mut self) -> Result<Vec<Option<i64>>, String> {
        let mut children = Vec::new();
        self.walk_struct(0, |t, id, ty| {
            if id != 2 || ty != 9 {
                return Ok(false);
            }
            let head = t.byte()?;
            let n = match head >> 4 {
                15 => t.varint()?,
                n => u64::from(n),
            };
            if head & 0x0f != 12 {
                return Err("has a schema that is not a list of structs".into());
            }
            for i in 0..t.count(n)? {
                let c = t
                    .skip_struct(1, 5)
                    .map_err(|e| format!("in schema element {i} {e}"))?;
                if let Some(c) = c.filter(|c| !(0..n as i64).contains(c)) {
                    return Err(format!(
                        "gives schema element {i} {c} children, outside 0..{n}"
                    ));
                }
                children.push(c);
            }
            Ok(true)
        })?;
        Ok(children)
    }
}

/// The top-level column names of a Parquet file, in schema order.
pub(super) fn column_names(path: &Path) -> Result<Vec<String>, DataError> {
    let reader = open(path)?;
    let root = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema();
    Ok(root
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect())
}

/// The rows of `path`: texts from string columns, labels from string, integer, float or boolean
/// columns. A missing column, a null or a value of another type is an error naming the column
/// (and the 1-based row).
pub(super) fn rows(path: &Path, spec: &TableSpec) -> Result<Vec<Row>, DataError> {
    // A last resort: the `parquet` crate still asserts (panics) on some malformed files instead
    // of returning an error; the case the fuzz target found is checked in `open`, and any other
    // is caught here so that the file is refused by name rather than ending the command.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_rows(path, spec))).unwrap_or_else(
        |_| {
            let msg = "not a readable Parquet file (the parquet reader panicked on it)";
            Err(DataError::format(path, msg))
        },
    )
}

fn read_rows(path: &Path, spec: &TableSpec) -> Result<Vec<Row>, DataError> {
    let reader = open(path)?;
    let root = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema();
    let fields = root.get_fields();
    let column = |name: &str, what: &str| {
        fields
            .iter()
            .find(|f| f.name() == name)
            .cloned()
            .ok_or_else(|| {
                let names: Vec<_> = fields.iter().map(|f| f.name()).collect();
                let msg = format!(
                    "{what} column '{name}' missing (columns: {})",
                    names.join(", ")
                );
                DataError::format(path, msg)
            })
    };
    let mut wanted = vec![column(&spec.text_column, "text")?];
    if let Some(pair) = &spec.text_pair_column {
        wanted.push(column(pair, "text pair")?);
    }
    wanted.push(column(&spec.label_column, "label")?);
    // A column named twice (text and label the same) is projected once.
    wanted.dedup_by(|a, b| a.name() == b.name());
    let projection = Type::group_type_builder(root.name())
        .with_fields(wanted.into_iter().collect::<Vec<Arc<Type>>>())
        .build()
        .map_err(|e| DataError::format(path, format!("cannot select the columns ({e})")))?;
    let iter = reader
        .get_row_iter(Some(projection))
        .map_err(|e| DataError::format(path, format!("cannot read rows ({e})")))?;
    let mut rows = Vec::new();
    for (i, row) in iter.enumerate() {
        let at = format!("row {}", i + 1);
        let row = row.map_err(|e| DataError::format(path, format!("{at}: {e}")))?;
        let get = |name: &str, what: &str, label: bool| -> Result<String, DataError> {
            let err = |msg: String| DataError::format(path, format!("{at}: {msg}"));
            let field = row
                .get_column_iter()
                .find(|(n, _)| n.as_str() == name)
                .map(|(_, f)| f);
            match field {
                Some(Field::Str(s)) => Ok(s.clone()),
                Some(Field::Null) | None => Err(err(format!("{what} column '{name}' is null"))),
                Some(f) if label => scalar(f).ok_or_else(|| {
                    err(format!(
                        "label column '{name}' must hold strings, integers, floats or booleans"
                    ))
                }),
                Some(_) => Err(err(format!("{what} column '{name}' must hold strings"))),
            }
        };
        rows.push(Row {
            text_a: get(&spec.text_column, "text", false)?,
            text_b: spec
                .text_pair_column
                .as_deref()
                .map(|c| get(c, "text pair", false))
                .transpose()?,
            label: get(&spec.label_column, "label", true)?,
            at,
        });
    }
    Ok(rows)
}

/// A label value as the text formats would spell it (`3`, `0.5`, `true`).
fn scalar(f: &Field) -> Option<String> {
    Some(match f {
        Field::Bool(v) => v.to_string(),
        Field::Byte(v) => v.to_string(),
        Field::Short(v) => v.to_string(),
        Field::Int(v) => v.to_string(),
        Field::Long(v) => v.to_string(),
        Field::UByte(v) => v.to_string(),
        Field::UShort(v) => v.to_string(),
        Field::UInt(v) => v.to_string(),
        Field::ULong(v) => v.to_string(),
        Field::Float(v) => v.to_string(),
        Field::Double(v) => v.to_string(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{TableFormat, TaskKind};

    /// The error `rows` gives for `tests/fixtures/parquet/{name}` (a panic fails the test).
    fn refusal(name: &str, text: &str, pair: &str, label: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/parquet")
            .join(name);
        let spec = TableSpec {
            format: Some(TableFormat::Parquet),
            text_column: text.into(),
            text_pair_column: Some(pair.into()),
            label_column: label.into(),
            task: TaskKind::Classification,
            label_names: None,
        };
        let e = rows(&path, &spec).err().unwrap().to_string();
        assert!(e.contains(name), "{e}");
        e
    }

    /// A file the `parquet` fuzz target made from the NLI seed: a column chunk at a negative
    /// offset, on which the crate's row reader panicked (`column start and length should not be
    /// negative`). Refused by name, before any row is read.
    #[test]
    fn a_negative_column_chunk_offset_is_refused() {
        let e = refusal(
            "negative-chunk-offset.parquet",
            "premise",
            "hypothesis",
            "label",
        );
        assert!(e.contains("outside the file"), "{e}");
    }

    /// A file the `parquet` fuzz target made from the STS-B seed: a dictionary page whose value
    /// length runs past the page, on which the crate's plain decoder panicked (`assertion
    /// failed: size <= src.len()`, `util/bit_util.rs`). Refused by name through the last resort
    /// in `rows`.
    #[test]
    fn a_dictionary_value_past_its_page_is_refused() {
        let e = refusal(
            "dictionary-value-past-page.parquet",
            "sentence1",
            "sentence2",
            "score",
        );
        assert!(e.contains("panicked"), "{e}");
    }

    /// The page-header walk reads a `PageHeader`'s `compressed_page_size`, skipping the other
    /// fields, and refuses what could make a reader work more than the bytes allow.
    #[test]
    fn the_page_header_walk_reads_sizes_and_bounds_the_work() {
        let walk = |bytes: &[u8]| {
            let mut t = ThriftBytes::new(
                bytes.iter().map(|&b| Ok(b)),
                bytes.len() as u64,
                "column chunk",
            );
            t.page_header().map(|n| (n, t.read))
        };
        // type 0, uncompressed 149, compressed 149 (i32 zigzag varints), a binary field 10 of 2
        // bytes, a bool field (no byte), stop.
        let header = [
            0x15, 0x00, 0x15, 0xaa, 0x02, 0x15, 0xaa, 0x02, 0x78, 0x02, 0, 0, 0x11, 0,
        ];
        assert_eq!(walk(&header), Ok((149, 14)));
        // A list claiming 4,000 booleans in 3 bytes.
        let e = walk(&[0x19, 0xf1, 0xa0, 0x1f, 1, 1, 0]).unwrap_err();
        assert!(e.contains("4000 elements in 3 bytes"), "{e}");
        // Lists nested 70 deep.
        let mut deep = vec![0x19];
        deep.extend([0x19; 70]);
        assert!(walk(&deep).unwrap_err().contains("deeper than 64"));
        // A field id at i64's end followed by a delta: an error, not an overflow.
        let mut big = vec![0x05];
        big.extend([
            0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x00, 0xf5,
        ]);
        assert!(walk(&big).is_err());
        // No compressed_page_size, a negative one, a header that runs out.
        assert!(walk(&[0x15, 0x00, 0])
            .unwrap_err()
            .contains("no compressed_page_size"));
        assert!(walk(&[0x35, 0x01, 0]).unwrap_err().contains("negative"));
        assert!(walk(&[0x15, 0x00, 0x15]).unwrap_err().contains("runs past"));
    }

    /// The page-header walk passes well-formed files: the `parquet` fuzz target's seeds (a
    /// mode byte, then a file the `parquet` crate wrote: dictionary and plain pages, optional
    /// columns, snappy and gzip).
    #[test]
    fn the_page_header_walk_passes_the_crates_own_files() {
        let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/parquet");
        let dir = tempfile::tempdir().unwrap();
        let mut n = 0;
        for entry in std::fs::read_dir(&seeds).unwrap() {
            let seed = std::fs::read(entry.unwrap().path()).unwrap();
            let path = dir.path().join(format!("{n}.parquet"));
            std::fs::write(&path, &seed[1..]).unwrap();
            let reader = open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let chunks: usize = reader
                .metadata()
                .row_groups()
                .iter()
                .map(|g| g.num_columns())
                .sum();
            assert!(chunks > 0, "{}", path.display());
            n += 1;
        }
        assert_eq!(n, 5);
    }

    /// The footer walk reads each schema element's `num_children` and skips the rest.
    #[test]
    fn the_footer_walk_reads_the_schema_elements_children() {
        // FileMetaData { version 1, schema [ {name "schema", num_children 1},
        // {type 1, repetition 0, name "a"} ], num_rows 0 }
        let footer = [
            0x15, 0x02, 0x19, 0x2c, 0x48, 0x06, b's', b'c', b'h', b'e', b'm', b'a', 0x15, 0x02,
            0x00, 0x15, 0x02, 0x25, 0x00, 0x18, 0x01, b'a', 0x00, 0x16, 0x00, 0x00,
        ];
        let mut t = ThriftBytes::new(footer.iter().map(|&b| Ok(b)), footer.len() as u64, "footer");
        assert_eq!(t.schema_children(), Ok(vec![Some(1), None]));
        assert_eq!(t.read, footer.len() as u64);
        // A schema list claiming more elements than bytes are left.
        let mut t = ThriftBytes::new(
            [0x29, 0xfc, 0x80, 0x08, 0x00].iter().map(|&b| Ok(b)),
            5,
            "footer",
        );
        assert!(t.schema_children().unwrap_err().contains("1024 elements"));
        // One element claiming 2^30 children (an i32 field 5, as a writer types it).
        let footer = [
            0x29, 0x1c, 0x48, 0x01, b'r', 0x15, 0x80, 0x80, 0x80, 0x80, 0x08, 0x00, 0x00,
        ];
        let mut t = ThriftBytes::new(footer.iter().map(|&b| Ok(b)), footer.len() as u64, "footer");
        let e = t.schema_children().unwrap_err();
        assert!(
            e.contains("schema element 0 1073741824 children, outside 0..1"),
            "{e}"
        );
    }

    /// A file the `parquet` fuzz target made (from the NLI seed) whose footer's schema element 1
    /// has a binary field 5: the crate reads field 5 as `num_children` whatever its type and
    /// reserved 12.66 GB for the children before building any (`memory allocation of
    /// 12656698912 bytes failed`, an abort, under the fuzzer's limit or `ulimit -v 6000000`).
    /// Refused by the footer walk in `open`, naming the element.
    #[test]
    fn a_schema_element_whose_children_field_is_not_an_i32_is_refused() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/parquet/schema-children-oom.parquet");
        let e = column_names(&path).err().unwrap().to_string();
        assert!(
            e.contains("schema-children-oom.parquet")
                && e.contains("the footer at byte 266 in schema element 1 has field 5 of type 8"),
            "{e}"
        );
    }

    /// A file the `parquet` fuzz target made (from the sentiment seed) on which the crate's row
    /// reader did not return: its thrift skip of a page header (`skip_till_depth`) reads a list's
    /// booleans as taking no bytes, and the header claims a huge list (over 90 s at 45 MB).
    /// Refused by the page-header walk in `open`, before the crate reads it.
    #[test]
    fn a_page_header_whose_skip_does_not_end_is_refused() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/parquet/page-header-skip-hangs.parquet");
        let spec = TableSpec {
            format: Some(TableFormat::Parquet),
            text_column: "text".into(),
            text_pair_column: None,
            label_column: "sentiment".into(),
            task: TaskKind::Classification,
            label_names: None,
        };
        let e = rows(&path, &spec).err().unwrap().to_string();
        assert!(
            e.contains("the page header at byte 4") && e.contains("column chunk"),
            "{e}"
        );
    }
}
