//! Images for classification (`--task image`): the IDX files of MNIST / Fashion-MNIST, image
//! folders (`root/<class>/*.png|jpg`), and a ViT's preprocessing as transformers 5's
//! `ViTImageProcessor` does it (torchvision's antialiased bilinear resize of 8-bit images,
//! rescale, normalize).
//!
//! Images stay as decoded bytes; each batch is preprocessed when it is built, so a data set
//! costs its bytes, not its float pixel values.

use super::DataError;
use std::io::Read;
use std::path::{Path, PathBuf};

/// One decoded image: `height * width * channels` bytes, row-major, channels interleaved
/// (1: grayscale, 3: RGB).
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub pixels: Vec<u8>,
}

/// Images with class labels (indices into `label_names`).
#[derive(Clone, Debug, Default)]
pub struct ImageSet {
    pub images: Vec<Image>,
    pub labels: Vec<usize>,
    pub label_names: Vec<String>,
}

impl ImageSet {
    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// The images and labels at `idx`, in that order (same label names).
    pub fn subset(&self, idx: &[usize]) -> ImageSet {
        ImageSet {
            images: idx.iter().map(|&i| self.images[i].clone()).collect(),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            label_names: self.label_names.clone(),
        }
    }

    /// Count of each class, in label order.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut n = vec![0; self.label_names.len()];
        for &l in &self.labels {
            n[l] += 1;
        }
        n
    }
}

/// The most bytes an IDX file may declare (4 GiB): a corrupt header is refused before anything
/// is read or allocated from it.
const IDX_MAX_BYTES: u64 = 1 << 32;

/// The training and test file names of an IDX data set (MNIST's), each also gzipped (`.gz`).
pub const IDX_FILES: [(&str, &str); 2] = [
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
];

/// Whether `dir` holds IDX files (a training image file, plain or gzipped).
pub fn is_idx_dir(dir: &Path) -> bool {
    find_idx(dir, IDX_FILES[0].0).is_some()
}

fn find_idx(dir: &Path, name: &str) -> Option<PathBuf> {
    [name.to_string(), format!("{name}.gz")]
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

/// An IDX folder's training set and, when its `t10k-*` files are there, its test set.
pub fn load_idx_dir(dir: &Path) -> Result<(ImageSet, Option<ImageSet>), DataError> {
    let mut sets = Vec::new();
    for (i, (images, labels)) in IDX_FILES.into_iter().enumerate() {
        let (Some(im), Some(lb)) = (find_idx(dir, images), find_idx(dir, labels)) else {
            if i == 0 {
                return Err(DataError::format(
                    dir,
                    format!("no IDX training files ({images}[.gz] and {labels}[.gz])"),
                ));
            }
            sets.push(None);
            continue;
        };
        sets.push(Some(read_idx(&im, &lb)?));
    }
    let test = sets.pop().flatten();
    let train = sets.pop().flatten().expect("the training set is required");
    Ok((train, test))
}

/// An IDX image file (`[n, rows, cols]` bytes) and its label file (`[n]` bytes). Classes are
/// named by their number, `0` to the largest label.
pub fn read_idx(images: &Path, labels: &Path) -> Result<ImageSet, DataError> {
    let (dims, pixels) = read_idx_file(images, 3)?;
    let (ldims, lbytes) = read_idx_file(labels, 1)?;
    if ldims[0] != dims[0] {
        return Err(DataError::format(
            labels,
            format!(
                "{} labels for {} images in {}",
                ldims[0],
                dims[0],
                images.display()
            ),
        ));
    }
    let (n, h, w) = (dims[0], dims[1], dims[2]);
    let max = lbytes.iter().copied().max().unwrap_or(0) as usize;
    let images = pixels
        .chunks_exact(h * w)
        .map(|p| Image {
            width: w,
            height: h,
            channels: 1,
            pixels: p.to_vec(),
        })
        .collect::<Vec<_>>();
    debug_assert_eq!(images.len(), n);
    Ok(ImageSet {
        images,
        labels: lbytes.iter().map(|&l| l as usize).collect(),
        label_names: (0..=max).map(|c| c.to_string()).collect(),
    })
}

/// Reads an IDX file of unsigned bytes with `ndims` dimensions (gzipped when its name ends in
/// `.gz`): magic `00 00 08 ndims`, each dimension a big-endian u32, then the data. The
/// header is checked, and the declared size bounded, before the data is read.
fn read_idx_file(path: &Path, ndims: usize) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let gz = path.extension().is_some_and(|e| e == "gz");
    let mut r: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    let bad = |msg: String| DataError::format(path, msg);
    let mut head = [0u8; 4];
    r.read_exact(&mut head)
        .map_err(|e| bad(format!("not an IDX file ({e})")))?;
    if head[..3] != [0, 0, 8] || head[3] as usize != ndims {
        return Err(bad(format!(
            "not an IDX file of {ndims}-dimensional unsigned bytes (magic {:02x} {:02x} {:02x} {:02x}, \
             expected 00 00 08 {ndims:02x})",
            head[0], head[1], head[2], head[3]
        )));
    }
    let mut dims = Vec::with_capacity(ndims);
    for d in 0..ndims {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)
            .map_err(|e| bad(format!("truncated header ({e})")))?;
        let v = u32::from_be_bytes(b) as usize;
        if v == 0 {
            return Err(bad(format!("dimension {d} is 0")));
        }
        dims.push(v);
    }
    let size = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|&s| s <= IDX_MAX_BYTES)
        .ok_or_else(|| {
            bad(format!(
                "dimensions {dims:?} declare more than {IDX_MAX_BYTES} bytes"
            ))
        })?;
    if !gz {
        let len = std::fs::metadata(path)
            .map_err(|e| DataError::io(path, e))?
            .len();
        let want = 4 + 4 * ndims as u64 + size;
        if len != want {
            return Err(bad(format!(
                "{len} bytes, but its header ({dims:?}) makes it {want} bytes"
            )));
        }
    }
    // Read at most one byte past the declared size: the buffer grows with what is there.
    let mut data = Vec::new();
    r.take(size + 1)
        .read_to_end(&mut data)
        .map_err(|e| bad(format!("unreadable data ({e})")))?;
    if data.len() as u64 != size {
        let what = if (data.len() as u64) < size {
            "truncated"
        } else {
            "longer than its header says"
        };
        return Err(bad(format!(
            "{what}: its header ({dims:?}) declares {size} data bytes, it has {}{}",
            data.len().min(size as usize),
            if (data.len() as u64) > size {
                " and more"
            } else {
                ""
            }
        )));
    }
    Ok((dims, data))
}

/// The image files a folder of class folders holds: `root/<class>/*.{png,jpg,jpeg}` (any case),
/// classes in sorted name order, files sorted by name within each.
pub fn load_image_folder(root: &Path) -> Result<ImageSet, DataError> {
    let list = |dir: &Path| -> Result<Vec<PathBuf>, DataError> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| DataError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        v.sort();
        Ok(v)
    };
    let classes: Vec<PathBuf> = list(root)?.into_iter().filter(|p| p.is_dir()).collect();
    if classes.is_empty() {
        return Err(DataError::format(
            root,
            "no class folders (expected root/<class name>/<image>.png|jpg)",
        ));
    }
    let mut set = ImageSet::default();
    for (c, dir) in classes.iter().enumerate() {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        set.label_names.push(name);
        for file in list(dir)? {
            let ext = file
                .extension()
                .map(|e| e.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            if !matches!(ext.as_str(), "png" | "jpg" | "jpeg") || !file.is_file() {
                continue;
            }
            set.images.push(decode_image(&file)?);
            set.labels.push(c);
        }
    }
    if set.images.is_empty() {
        return Err(DataError::format(
            root,
            "no .png or .jpg images in its class folders",
        ));
    }
    Ok(set)
}

/// Decodes a PNG or JPEG: grayscale stays one channel, anything else becomes RGB (alpha
/// dropped, as PIL's `convert("RGB")`).
pub fn decode_image(path: &Path) -> Result<Image, DataError> {
    let img = image::open(path)
        .map_err(|e| DataError::format(path, format!("not a readable PNG or JPEG image ({e})")))?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    let gray = matches!(
        img.color(),
        image::ColorType::L8
            | image::ColorType::L16
            | image::ColorType::La8
            | image::ColorType::La16
    );
    let (channels, pixels) = if gray {
        (1, img.to_luma8().into_raw())
    } else {
        (3, img.to_rgb8().into_raw())
    };
    Ok(Image {
        width,
        height,
        channels,
        pixels,
    })
}

/// A ViT's preprocessing (`preprocessor_config.json`, transformers' `ViTImageProcessor`):
/// channels converted to the model's, resized with the bilinear filter ([`resize_bilinear`]),
/// rescaled, normalized; out come `[channels, height, width]` f32 values.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocessor {
    /// The model's channels (1 or 3): grayscale is repeated to RGB, RGB reduced to PIL's `L`.
    pub channels: usize,
    /// The output size; images are resized to it when `do_resize`, else must have it.
    pub height: usize,
    pub width: usize,
    pub do_resize: bool,
    /// `rescale_factor` when `do_rescale`.
    pub rescale: Option<f64>,
    /// Per-channel `(mean, std)` when `do_normalize`.
    pub normalize: Option<(Vec<f32>, Vec<f32>)>,
}

/// The keys of a `preprocessor_config.json` this reads, with `ViTImageProcessor`'s defaults.
#[derive(serde::Deserialize)]
struct ProcessorKeys {
    #[serde(default = "yes")]
    do_resize: bool,
    #[serde(default)]
    size: Option<Size>,
    #[serde(default = "bilinear")]
    resample: u32,
    #[serde(default = "yes")]
    do_rescale: bool,
    #[serde(default = "one_over_255")]
    rescale_factor: f64,
    #[serde(default = "yes")]
    do_normalize: bool,
    #[serde(default)]
    image_mean: Option<PerChannel>,
    #[serde(default)]
    image_std: Option<PerChannel>,
}

#[derive(serde::Deserialize)]
struct Size {
    height: usize,
    width: usize,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum PerChannel {
    One(f32),
    Each(Vec<f32>),
}

fn yes() -> bool {
    true
}
fn bilinear() -> u32 {
    2
}
fn one_over_255() -> f64 {
    1.0 / 255.0
}

/// The file a model folder's preprocessing is read from.
pub const PREPROCESSOR_FILE: &str = "preprocessor_config.json";

/// The largest side a preprocessor config may resize to.
const SIDE_MAX: usize = 1 << 13;

impl Preprocessor {
    /// Without a preprocessor config: resize to the model's `image_size`, rescale by 1/255,
    /// normalize with mean 0.5 and std 0.5 (`ViTImageProcessor`'s defaults).
    pub fn default_for(channels: usize, image_size: usize) -> Self {
        Self {
            channels,
            height: image_size,
            width: image_size,
            do_resize: true,
            rescale: Some(1.0 / 255.0),
            normalize: Some((vec![0.5; channels], vec![0.5; channels])),
        }
    }

    /// The model folder's `preprocessor_config.json`, or [`Self::default_for`] when it has none.
    /// The output size must be the model's `image_size`.
    pub fn from_model_dir(
        dir: &Path,
        channels: usize,
        image_size: usize,
    ) -> Result<Self, DataError> {
        let path = dir.join(PREPROCESSOR_FILE);
        if !path.is_file() {
            return Ok(Self::default_for(channels, image_size));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
        let k: ProcessorKeys = serde_json::from_str(&text).map_err(|e| {
            DataError::format(&path, format!("not an image processor config ({e})"))
        })?;
        let bad = |msg: String| Err(DataError::format(&path, msg));
        if k.resample != 2 {
            return bad(format!(
                "resample = {} is not supported (only 2, bilinear, ViT's)",
                k.resample
            ));
        }
        let (height, width) = match &k.size {
            Some(s) => (s.height, s.width),
            None => (image_size, image_size),
        };
        if height == 0 || width == 0 || height > SIDE_MAX || width > SIDE_MAX {
            return bad(format!(
                "size {height}x{width} is out of range (1 to {SIDE_MAX})"
            ));
        }
        if (height, width) != (image_size, image_size) {
            return bad(format!(
                "size {height}x{width} is not the model's image_size ({image_size})"
            ));
        }
        let rescale = if k.do_rescale {
            if !(k.rescale_factor.is_finite() && k.rescale_factor > 0.0) {
                return bad(format!("rescale_factor = {} must be > 0", k.rescale_factor));
            }
            Some(k.rescale_factor)
        } else {
            None
        };
        let per_channel = |v: Option<PerChannel>, key: &str, default: f32| match v {
            None => Ok(vec![default; channels]),
            Some(PerChannel::One(x)) => Ok(vec![x; channels]),
            Some(PerChannel::Each(v)) if v.len() == channels => Ok(v),
            Some(PerChannel::Each(v)) if v.len() == 1 => Ok(vec![v[0]; channels]),
            Some(PerChannel::Each(v)) => Err(DataError::format(
                &path,
                format!(
                    "{key} has {} values for a model of {channels} channels",
                    v.len()
                ),
            )),
        };
        let normalize = if k.do_normalize {
            let mean = per_channel(k.image_mean, "image_mean", 0.5)?;
            let std = per_channel(k.image_std, "image_std", 0.5)?;
            if mean.iter().any(|m| !m.is_finite())
                || std.iter().any(|s| !(s.is_finite() && *s > 0.0))
            {
                return bad("image_mean must be finite and image_std finite and > 0".into());
            }
            Some((mean, std))
        } else {
            None
        };
        Ok(Self {
            channels,
            height,
            width,
            do_resize: k.do_resize,
            rescale,
            normalize,
        })
    }

    /// `[channels, height, width]` pixel values of `img`; `what` names it in errors.
    pub fn pixel_values(&self, img: &Image, what: &dyn Fn() -> String) -> Result<Vec<f32>, String> {
        let planes = to_planes(img, self.channels);
        let planes: Vec<Vec<u8>> = if (img.height, img.width) == (self.height, self.width) {
            planes
        } else if self.do_resize {
            planes
                .iter()
                .map(|p| resize_bilinear(p, img.width, img.height, self.width, self.height))
                .collect()
        } else {
            return Err(format!(
                "{}: {}x{} pixels, the model takes {}x{} (and do_resize is off)",
                what(),
                img.height,
                img.width,
                self.height,
                self.width
            ));
        };
        let mut out = Vec::with_capacity(self.channels * self.height * self.width);
        for (c, plane) in planes.iter().enumerate() {
            for &v in plane {
                // As numpy does it: rescaled in f64, stored as f32, normalized in f32.
                let mut x = match self.rescale {
                    Some(f) => (v as f64 * f) as f32,
                    None => v as f32,
                };
                if let Some((mean, std)) = &self.normalize {
                    x = (x - mean[c]) / std[c];
                }
                out.push(x);
            }
        }
        Ok(out)
    }
}

/// The image's channels as separate planes, converted to `channels`: grayscale repeated to RGB,
/// RGB to PIL's `L` (`(19595 R + 38470 G + 7471 B + 0x8000) >> 16`).
fn to_planes(img: &Image, channels: usize) -> Vec<Vec<u8>> {
    let n = img.width * img.height;
    let plane = |c: usize| -> Vec<u8> {
        (0..n)
            .map(|i| img.pixels[i * img.channels + c.min(img.channels - 1)])
            .collect()
    };
    match (img.channels, channels) {
        (3, 1) => vec![(0..n)
            .map(|i| {
                let p = &img.pixels[i * 3..i * 3 + 3];
                ((19595 * p[0] as u32 + 38470 * p[1] as u32 + 7471 * p[2] as u32 + 0x8000) >> 16)
                    as u8
            })
            .collect()],
        _ => (0..channels).map(plane).collect(),
    }
}

/// The most fixed-point bits of a resampling weight (PIL's precision for 8-bit images).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The antialiased bilinear resize of one 8-bit plane that transformers 5's image processors
/// run (torchvision's `resize(..., BILINEAR, antialias=True)` on `uint8`, torch's port of
/// Pillow's `ImagingResample`): per axis, each output pixel averages the inputs within the
/// filter's support (widened by the scale when shrinking); the weights are fixed point with
/// the most bits (at most 22) that keep the largest weight within an `i16`, where Pillow always
/// uses 22; the horizontal pass first, rounded to 8 bits, then the vertical. Checked against
/// the processor's output on an upscaled and a downscaled image (the fixture `vit`); with
/// Pillow's 22 bits, 4% of the upscaled image's values came out one level off.
pub fn resize_bilinear(src: &[u8], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    let mut plane = src.to_vec();
    let mut cur_w = w;
    if out_w != w {
        let (bounds, kk, ksize, bits) = pil_coeffs(w, out_w);
        let mut next = vec![0u8; out_w * h];
        for y in 0..h {
            let row = &plane[y * cur_w..(y + 1) * cur_w];
            for (x, &(min, count)) in bounds.iter().enumerate() {
                let k = &kk[x * ksize..x * ksize + count];
                let ss = k
                    .iter()
                    .enumerate()
                    .fold(1i64 << (bits - 1), |ss, (i, &k)| {
                        ss + row[min + i] as i64 * k
                    });
                next[y * out_w + x] = clip8(ss, bits);
            }
        }
        plane = next;
        cur_w = out_w;
    }
    if out_h != h {
        let (bounds, kk, ksize, bits) = pil_coeffs(h, out_h);
        let mut next = vec![0u8; cur_w * out_h];
        for (y, &(min, count)) in bounds.iter().enumerate() {
            let k = &kk[y * ksize..y * ksize + count];
            for x in 0..cur_w {
                let ss = k
                    .iter()
                    .enumerate()
                    .fold(1i64 << (bits - 1), |ss, (i, &k)| {
                        ss + plane[(min + i) * cur_w + x] as i64 * k
                    });
                next[y * cur_w + x] = clip8(ss, bits);
            }
        }
        plane = next;
    }
    plane
}

fn clip8(ss: i64, bits: u32) -> u8 {
    (ss >> bits).clamp(0, 255) as u8
}

/// Pillow's `precompute_coeffs` (bilinear, support 1) and torch's int16 weights: each output
/// pixel's first input and count, its fixed-point weights (`ksize` per pixel), and their bits.
fn pil_coeffs(in_size: usize, out_size: usize) -> (Vec<(usize, usize)>, Vec<i64>, usize, u32) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // bilinear's support is 1
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i64; out_size * ksize];
    let mut weights = vec![0f64; out_size * ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let w: Vec<f64> = (0..xmax)
            .map(|x| {
                let t = ((x + xmin) as f64 - center + 0.5) * ss;
                (1.0 - t.abs()).max(0.0)
            })
            .collect();
        let ww: f64 = w.iter().sum();
        for (x, &wx) in w.iter().enumerate() {
            weights[xx * ksize + x] = if ww != 0.0 { wx / ww } else { wx };
        }
        bounds.push((xmin, xmax));
    }
    let w_max = weights.iter().fold(0f64, |m, &w| m.max(w));
    let mut bits = 0;
    while bits < PRECISION_BITS && (0.5 + w_max * (1u64 << (bits + 1)) as f64) < (1 << 15) as f64 {
        bits += 1;
    }
    for (k, &w) in kk.iter_mut().zip(&weights) {
        let scaled = w * (1i64 << bits) as f64;
        *k = if w < 0.0 {
            (-0.5 + scaled) as i64
        } else {
            (0.5 + scaled) as i64
        };
    }
    (bounds, kk, ksize, bits)
}

#[cfg(test)]
#[path = "images_tests.rs"]
mod tests;
