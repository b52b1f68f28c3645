//! Tests of `data::images`.

use super::*;
use std::io::Write;

/// An IDX file: magic, dims, data; gzipped when `gz`.
fn idx_bytes(ndims: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, ndims];
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v.extend(data);
    v
}

fn write(path: &Path, bytes: &[u8]) {
    if path.extension().is_some_and(|e| e == "gz") {
        let f = std::fs::File::create(path).unwrap();
        let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap();
    } else {
        std::fs::write(path, bytes).unwrap();
    }
}

/// Three 2x3 images with pixel `i*10 + j` and labels 2, 0, 2.
fn made_idx(dir: &Path, gz: bool) -> (PathBuf, PathBuf) {
    let ext = if gz { ".gz" } else { "" };
    let images = dir.join(format!("train-images-idx3-ubyte{ext}"));
    let labels = dir.join(format!("train-labels-idx1-ubyte{ext}"));
    let data: Vec<u8> = (0..3u8)
        .flat_map(|i| (0..6u8).map(move |j| i * 10 + j))
        .collect();
    write(&images, &idx_bytes(3, &[3, 2, 3], &data));
    write(&labels, &idx_bytes(1, &[3], &[2, 0, 2]));
    (images, labels)
}

#[test]
fn idx_files_read_plain_and_gzipped() {
    for gz in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        made_idx(dir.path(), gz);
        let (train, test) = load_idx_dir(dir.path()).unwrap();
        assert!(test.is_none());
        assert_eq!(train.len(), 3);
        assert_eq!(train.labels, vec![2, 0, 2]);
        assert_eq!(train.label_names, vec!["0", "1", "2"]);
        assert_eq!(train.class_counts(), vec![1, 0, 2]);
        let im = &train.images[1];
        assert_eq!((im.height, im.width, im.channels), (2, 3, 1));
        assert_eq!(im.pixels, vec![10, 11, 12, 13, 14, 15]);
    }
}

/// Each broken file is an error naming it and the problem, never a panic.
#[test]
fn bad_idx_files_are_errors_naming_the_file() {
    let data = vec![7u8; 3 * 2 * 3];
    // (what, image file, label file, the file the error names, what it says)
    type Case<'a> = (&'a str, Vec<u8>, Vec<u8>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            "truncated data",
            idx_bytes(3, &[3, 2, 3], &data[..10]),
            idx_bytes(1, &[3], &[0, 1, 2]),
            "train-images",
            "",
        ),
        (
            "bad magic",
            {
                let mut b = idx_bytes(3, &[3, 2, 3], &data);
                b[2] = 9;
                b
            },
            idx_bytes(1, &[3], &[0, 1, 2]),
            "train-images",
            "not an IDX file",
        ),
        (
            "labels given as images",
            idx_bytes(3, &[3, 2, 3], &data),
            idx_bytes(3, &[3, 2, 3], &data),
            "train-labels",
            "not an IDX file",
        ),
        (
            "count mismatch",
            idx_bytes(3, &[3, 2, 3], &data),
            idx_bytes(1, &[4], &[0, 1, 2, 3]),
            "train-labels",
            "4 labels for 3 images",
        ),
        (
            "header too short",
            vec![0, 0, 8, 3, 0, 0],
            idx_bytes(1, &[3], &[0, 1, 2]),
            "train-images",
            "truncated header",
        ),
        (
            "huge dims",
            idx_bytes(3, &[u32::MAX, u32::MAX, 2], &data),
            idx_bytes(1, &[3], &[0, 1, 2]),
            "train-images",
            "declare more than",
        ),
        (
            "zero dim",
            idx_bytes(3, &[3, 0, 3], &[]),
            idx_bytes(1, &[3], &[0, 1, 2]),
            "train-images",
            "dimension 1 is 0",
        ),
        (
            "trailing bytes",
            idx_bytes(3, &[3, 2, 3], &[data.clone(), vec![1]].concat()),
            idx_bytes(1, &[3], &[0, 1, 2]),
            "train-images",
            "",
        ),
    ];
    for gz in [false, true] {
        for (what, images, labels, file, msg) in &cases {
            let dir = tempfile::tempdir().unwrap();
            let ext = if gz { ".gz" } else { "" };
            write(
                &dir.path().join(format!("train-images-idx3-ubyte{ext}")),
                images,
            );
            write(
                &dir.path().join(format!("train-labels-idx1-ubyte{ext}")),
                labels,
            );
            let e = load_idx_dir(dir.path()).unwrap_err().to_string();
            assert!(e.contains(file) && e.contains(msg), "{what} (gz {gz}): {e}");
            if *what == "truncated data" || *what == "trailing bytes" {
                let want = if gz {
                    "declares 18 data bytes"
                } else {
                    "makes it"
                };
                assert!(e.contains(want), "{what} (gz {gz}): {e}");
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let e = load_idx_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("no IDX training files"), "{e}");
}

fn save_png(path: &Path, w: u32, h: u32, channels: usize, f: impl Fn(u32, u32, usize) -> u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    if channels == 1 {
        image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y, 0)]))
            .save(path)
            .unwrap();
    } else {
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([f(x, y, 0), f(x, y, 1), f(x, y, 2)])
        })
        .save(path)
        .unwrap();
    }
}

/// Classes are the sorted folder names, files sorted within each; grayscale stays one channel,
/// RGB three; other files are skipped.
#[test]
fn image_folders_read_classes_in_sorted_order() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    save_png(&r.join("zebra/b.png"), 3, 2, 3, |x, y, c| {
        (x * 10 + y * 100) as u8 + c as u8
    });
    save_png(&r.join("zebra/a.PNG"), 2, 2, 1, |x, y, _| (x + 2 * y) as u8);
    save_png(&r.join("ant/c.png"), 1, 1, 1, |_, _, _| 9);
    std::fs::write(r.join("ant/notes.txt"), "not an image").unwrap();
    let set = load_image_folder(r).unwrap();
    assert_eq!(set.label_names, vec!["ant", "zebra"]);
    assert_eq!(set.labels, vec![0, 1, 1]);
    assert_eq!(set.images[0].pixels, vec![9]);
    assert_eq!(set.images[1].pixels, vec![0, 1, 2, 3]);
    let rgb = &set.images[2];
    assert_eq!((rgb.width, rgb.height, rgb.channels), (3, 2, 3));
    // Pixel (x=1, y=1): 10 + 100, channels +0 +1 +2.
    assert_eq!(&rgb.pixels[(3 + 1) * 3..(3 + 1) * 3 + 3], &[110, 111, 112]);
}

#[test]
fn bad_image_folders_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_image_folder(dir.path()).unwrap_err().to_string();
    assert!(e.contains("no class folders"), "{e}");
    std::fs::create_dir_all(dir.path().join("cat")).unwrap();
    let e = load_image_folder(dir.path()).unwrap_err().to_string();
    assert!(e.contains("no .png or .jpg images"), "{e}");
    let bad = dir.path().join("cat/broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\n not really").unwrap();
    let e = load_image_folder(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("broken.png") && e.contains("not a readable"),
        "{e}"
    );
}

/// The bilinear resize, worked by hand: [0, 100] to 4 pixels is [0, 25, 75, 100] (the edge
/// pixels see one input, the inner ones weights 3/4 and 1/4); shrinking widens the filter by the
/// scale (below).
#[test]
fn bilinear_resize_by_hand() {
    assert_eq!(resize_bilinear(&[0, 100], 2, 1, 4, 1), vec![0, 25, 75, 100]);
    assert_eq!(resize_bilinear(&[0, 100], 1, 2, 1, 4), vec![0, 25, 75, 100]);
    // Shrinking [0, 40, 80, 120] to 2: output 0 centers at 1.0 with support 2, inputs 0..2
    // weighted (0.75, 0.75, 0.25) / 1.75 = 0*0.43 + 40*0.43 + 80*0.14 = 28.57 -> 29; output 1
    // centers at 3.0: inputs 1..4 weighted (0.25, 0.75, 0.75) / 1.75 -> 91.43 -> 91.
    assert_eq!(resize_bilinear(&[0, 40, 80, 120], 4, 1, 2, 1), vec![29, 91]);
    // Same size: unchanged.
    assert_eq!(resize_bilinear(&[1, 2, 3, 4], 2, 2, 2, 2), vec![1, 2, 3, 4]);
}

/// The fixture's two PNGs (24x20 upscaled and 42x56 downscaled to 28x28) give
/// `ViTImageProcessor`'s pixel values (written by transformers with its
/// `preprocessor_config.json`: per-channel mean and std).
#[test]
fn preprocessing_gives_transformers_pixel_values() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/vit");
    let p = Preprocessor::from_model_dir(&dir, 3, 28).unwrap();
    assert_eq!(
        p.normalize,
        Some((vec![0.5, 0.4, 0.3], vec![0.2, 0.25, 0.3]))
    );
    let r = candle_core::safetensors::load(
        dir.join("reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let want: Vec<Vec<f32>> = r["pixel_values"]
        .reshape((2, 3 * 28 * 28))
        .unwrap()
        .to_vec2()
        .unwrap();
    for (i, want) in want.iter().enumerate() {
        let img = decode_image(&dir.join(format!("image{i}.png"))).unwrap();
        assert_ne!((img.width, img.height), (28, 28));
        let got = p.pixel_values(&img, &|| format!("image{i}")).unwrap();
        let d = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-6, "image{i}: off by {d}");
    }
}

/// Without a preprocessor config: resize to the model's size, 1/255, mean 0.5, std 0.5;
/// grayscale repeated to RGB; a config that does not fit the model is refused, naming the file.
#[test]
fn default_preprocessing_and_bad_configs() {
    let dir = tempfile::tempdir().unwrap();
    let p = Preprocessor::from_model_dir(dir.path(), 3, 2).unwrap();
    let img = Image {
        width: 2,
        height: 2,
        channels: 1,
        pixels: vec![0, 51, 255, 102],
    };
    let v = p.pixel_values(&img, &|| "x".into()).unwrap();
    let one: Vec<f32> = [0.0f32, 0.2, 1.0, 0.4]
        .iter()
        .map(|x| (x - 0.5) / 0.5)
        .collect();
    assert_eq!(v.len(), 12);
    for c in 0..3 {
        for (a, b) in v[c * 4..c * 4 + 4].iter().zip(&one) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
    }
    let path = dir.path().join(PREPROCESSOR_FILE);
    for (text, want) in [
        (r#"{"resample": 3}"#, "resample = 3"),
        (
            r#"{"size": {"height": 4, "width": 4}}"#,
            "not the model's image_size",
        ),
        (r#"{"image_mean": [0.1, 0.2]}"#, "image_mean has 2 values"),
        (r#"{"image_std": [0.0, 1, 1]}"#, "image_std"),
        (r#"{"rescale_factor": -1}"#, "rescale_factor"),
        ("not json", "not an image processor config"),
    ] {
        std::fs::write(&path, text).unwrap();
        let e = Preprocessor::from_model_dir(dir.path(), 3, 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(PREPROCESSOR_FILE) && e.contains(want),
            "{text}: {e}"
        );
    }
    std::fs::write(
        &path,
        r#"{"do_resize": false, "size": {"height": 2, "width": 2}}"#,
    )
    .unwrap();
    let p = Preprocessor::from_model_dir(dir.path(), 3, 2).unwrap();
    let big = Image {
        width: 3,
        height: 3,
        channels: 3,
        pixels: vec![0; 27],
    };
    let e = p.pixel_values(&big, &|| "big.png".into()).unwrap_err();
    assert!(e.contains("big.png") && e.contains("do_resize"), "{e}");
}

/// Fashion-MNIST as fetched (`safetune fetch fashion-mnist`): 60000 training and 10000 test
/// images of 28x28, 10 classes of 6000 and 1000 images each (the data set's documented
/// balance). Skipped when the asset is not in the cache; required under
/// `SAFETUNE_REQUIRE_ASSETS`.
#[test]
fn fashion_mnist_has_its_documented_shape() {
    let dir = crate::io::fetch::fashion_mnist_dir(&crate::io::fetch::default_cache_dir());
    if !is_idx_dir(&dir) {
        let why = format!(
            "{} is missing; run `safetune fetch fashion-mnist`",
            dir.display()
        );
        assert!(
            std::env::var_os("SAFETUNE_REQUIRE_ASSETS").is_none(),
            "{why}"
        );
        eprintln!("skipping: {why}");
        return;
    }
    let (train, test) = load_idx_dir(&dir).unwrap();
    let test = test.expect("the t10k files");
    for (set, n, per_class) in [(&train, 60000, 6000), (&test, 10000, 1000)] {
        assert_eq!(set.len(), n);
        assert_eq!(set.label_names.len(), 10);
        assert_eq!(set.class_counts(), vec![per_class; 10]);
        assert!(set
            .images
            .iter()
            .all(|im| (im.width, im.height, im.channels) == (28, 28, 1)));
    }
}

/// A 1-channel model gets RGB reduced as PIL's `convert("L")` does: pure red, green and blue
/// are 76, 150 and 29 (0.299, 0.587 and 0.114 of 255, rounded as PIL rounds).
#[test]
fn rgb_to_one_channel_is_pils_luminance() {
    let p = Preprocessor {
        channels: 1,
        height: 1,
        width: 3,
        do_resize: false,
        rescale: None,
        normalize: None,
    };
    let img = Image {
        width: 3,
        height: 1,
        channels: 3,
        pixels: vec![255, 0, 0, 0, 255, 0, 0, 0, 255],
    };
    assert_eq!(
        p.pixel_values(&img, &|| "x".into()).unwrap(),
        vec![76.0, 150.0, 29.0]
    );
}
