//! Datasets stored as one image file per sample (GTSRB, TinyImageNet, ImageFolder).
//!
//! A loader lists its samples as [`FileSplits`] (paths and labels, plus the label files it
//! read); the dataset step decodes only the images its subsets need. Every image is decoded
//! with the `image` crate (PPM, PNG, JPEG), converted to RGB (grayscale and RGBA included),
//! and resized to the scale's square size without keeping the aspect ratio (as
//! `transforms.Resize((s, s))` does): bilinear when shrinking (the reference resizes GTSRB
//! to 32² with PIL's bilinear), Catmull-Rom (bicubic) when enlarging.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::{ImageSet, RawSplits};

/// One sample: an image file and its class index.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub path: PathBuf,
    pub label: u16,
}

/// A dataset's samples on disk, before decoding.
#[derive(Debug, Clone)]
pub struct FileSplits {
    /// The dataset's root; digests hash paths relative to it.
    pub root: PathBuf,
    pub train: Vec<Entry>,
    pub test: Vec<Entry>,
    pub classes: Vec<String>,
    /// Label files read (CSVs, annotation lists), hashed with the images.
    pub label_files: Vec<PathBuf>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl FileSplits {
    /// blake3 over every label file and image file (relative path and content digest), in
    /// order, so the dataset step's key changes whenever a file that is read changes. File
    /// digests come from the store's stat cache when a file is unchanged
    /// ([`crate::store::stat_cache`]).
    pub fn digest(&self) -> Result<String> {
        let mut h = blake3::Hasher::new();
        let files = self
            .label_files
            .iter()
            .chain(self.train.iter().map(|e| &e.path))
            .chain(self.test.iter().map(|e| &e.path));
        for (i, path) in files.enumerate() {
            let rel = path.strip_prefix(&self.root).unwrap_or(path);
            h.update(rel.to_string_lossy().as_bytes());
            h.update(&[0]);
            let d = crate::store::stat_cache::digest(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            h.update(d.as_bytes());
            if (i + 1) % 20_000 == 0 {
                tracing::debug!("    hashed {} files of {}", i + 1, self.root.display());
            }
        }
        Ok(h.finalize().to_hex().to_string())
    }

    /// Decodes every image (for previews and tests; the dataset step decodes subsets).
    pub fn load(&self, size: usize) -> Result<RawSplits> {
        let all = |n: usize| (0..n).collect::<Vec<_>>();
        Ok(RawSplits {
            train: decode_set(&self.train, &all(self.train.len()), size, "train")?,
            test: decode_set(&self.test, &all(self.test.len()), size, "test")?,
            classes: self.classes.clone(),
            mean: self.mean,
            std: self.std,
        })
    }
}

/// Reads one image file as CHW RGB bytes of a `size`×`size` square.
pub fn decode(path: &Path, size: usize) -> Result<Vec<u8>> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?
        .decode()
        .with_context(|| format!("cannot decode image {}", path.display()))?;
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    if w == 0 || h == 0 {
        bail!("image {} is empty ({w}x{h})", path.display());
    }
    let s = size as u32;
    let rgb = if (w, h) == (s, s) {
        rgb
    } else {
        let filter = if w > s || h > s {
            image::imageops::FilterType::Triangle
        } else {
            image::imageops::FilterType::CatmullRom
        };
        image::imageops::resize(&rgb, s, s, filter)
    };
    Ok(super::rgb_to_chw(&rgb))
}

/// Decodes `entries[idx]` in that order; logs progress every 10 000 images.
pub fn decode_set(entries: &[Entry], idx: &[usize], size: usize, what: &str) -> Result<ImageSet> {
    let mut set = ImageSet::new(size);
    set.images.reserve(idx.len() * set.stride());
    for (n, &i) in idx.iter().enumerate() {
        let e = &entries[i];
        set.push(&decode(&e.path, size)?, e.label);
        if (n + 1) % 10_000 == 0 {
            tracing::info!("    decoded {} of {} {what} images", n + 1, idx.len());
        }
    }
    Ok(set)
}

/// The entries of a directory, sorted by file name; `dirs` selects folders or files.
/// Hidden entries (starting with '.') are skipped.
pub fn sorted_children(dir: &Path, dirs: bool) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    let mut out = Vec::new();
    for e in rd {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let path = e.path();
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() == dirs {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Whether a file name has one of the image extensions (case-insensitive).
pub fn has_extension(path: &Path, exts: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// The image files directly in `dir` with one of `exts`, sorted; an error if there are none.
pub fn images_in(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>> {
    let files: Vec<PathBuf> = sorted_children(dir, false)?
        .into_iter()
        .filter(|p| has_extension(p, exts))
        .collect();
    if files.is_empty() {
        bail!(
            "{} has no images (expected files ending in .{})",
            dir.display(),
            exts.join(", .")
        );
    }
    Ok(files)
}

/// A directory that must exist.
pub fn require_dir(path: PathBuf, what: &str) -> Result<PathBuf> {
    if !path.is_dir() {
        bail!("{what}: {} is not a directory", path.display());
    }
    Ok(path)
}

/// Test helpers shared by the loaders' tests: images in real file formats.
#[cfg(test)]
pub mod fixture {
    use std::path::Path;

    /// A `w`×`h` RGB image: red `seed` and green `255 - seed` everywhere, a smooth blue
    /// gradient (so resizing has something to do, and JPEG keeps red and green close).
    pub fn rgb(w: u32, h: u32, seed: u8) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([seed, 255 - seed, ((x + y) * 3 % 256) as u8])
        })
    }

    pub fn write(path: &Path, img: &image::DynamicImage) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        img.save(path).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_ppm_png_jpeg_and_grayscale_to_square_rgb() {
        let dir = tempfile::tempdir().unwrap();
        let img = image::DynamicImage::ImageRgb8(fixture::rgb(10, 6, 200));
        for ext in ["ppm", "png", "jpg"] {
            let p = dir.path().join(format!("a.{ext}"));
            fixture::write(&p, &img);
            let chw = decode(&p, 4).unwrap();
            assert_eq!(chw.len(), 3 * 16, "{ext}");
            // Red is ~200 everywhere, green ~55 (JPEG is lossy).
            assert!(chw[..16].iter().all(|&v| v.abs_diff(200) < 12), "{ext}");
            assert!(chw[16..32].iter().all(|&v| v.abs_diff(55) < 12), "{ext}");
        }
        let gray =
            image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(8, 8, image::Luma([90])));
        let p = dir.path().join("g.jpg");
        fixture::write(&p, &gray);
        let chw = decode(&p, 8).unwrap();
        assert_eq!(chw.len(), 3 * 64);
        assert!(chw.iter().all(|&v| v.abs_diff(90) < 3), "gray → RGB");
    }

    #[test]
    fn corrupt_image_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.ppm");
        std::fs::write(&p, b"P6\n4 4\n255\nxx").unwrap();
        let e = format!("{:#}", decode(&p, 4).unwrap_err());
        assert!(e.contains("bad.ppm"), "{e}");
        let e = format!("{:#}", decode(&dir.path().join("none.png"), 4).unwrap_err());
        assert!(e.contains("none.png"), "{e}");
    }
}
