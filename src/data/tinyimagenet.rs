//! Tiny-ImageNet-200 (Le & Yang 2015) in the official layout, 200 classes of 64×64 JPEGs
//! (some grayscale, converted to RGB):
//!
//! ```text
//! DIR/tiny-imagenet-200/wnids.txt                    one WordNet id per line
//! DIR/tiny-imagenet-200/train/<wnid>/images/*.JPEG   500 per class
//! DIR/tiny-imagenet-200/val/images/*.JPEG            10 000 images
//! DIR/tiny-imagenet-200/val/val_annotations.txt      file \t wnid \t x0 \t y0 \t x1 \t y1
//! ```
//!
//! The validation split is the test split (as in the reference). Class indices follow the
//! sorted wnids, as the reference's `DatasetFolder` over the class folders gives them.
//! `test/` (unlabelled) and `words.txt` are not read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use super::files::{Entry, FileSplits, images_in, require_dir};

pub const NUM_CLASSES: usize = 200;
const EXTS: &[&str] = &["jpeg", "jpg"];

/// Normalisation: the CIFAR-10 constants, as the reference uses for every dataset
/// (reference notes §1.2). Tiny-ImageNet is usually normalised with the ImageNet statistics
/// (mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)); those are not used here.
pub const MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const STD: [f32; 3] = [0.2023, 0.1994, 0.2010];

/// The folder holding `wnids.txt`: `DATA_DIR/tiny-imagenet-200`, `DATA_DIR/tiny_imagenet_200`
/// or `DATA_DIR` itself.
pub fn find(data_dir: Option<&Path>) -> Result<PathBuf> {
    let Some(root) = data_dir else {
        bail!(
            "dataset tinyimagenet needs a data directory: pass --data-dir DIR (or set \
             IEU_DATA_DIR) where DIR/tiny-imagenet-200/ holds wnids.txt, train/ and val/"
        );
    };
    for cand in [
        root.join("tiny-imagenet-200"),
        root.join("tiny_imagenet_200"),
        root.to_path_buf(),
    ] {
        if cand.join("wnids.txt").is_file() {
            require_dir(cand.join("train"), "Tiny-ImageNet training images")?;
            require_dir(cand.join("val/images"), "Tiny-ImageNet validation images")?;
            return Ok(cand);
        }
    }
    bail!(
        "Tiny-ImageNet not found: expected {}/tiny-imagenet-200/ with wnids.txt, \
         train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt",
        root.display()
    )
}

/// The samples of the `dataset` step (the root of its code identity, `dataset/tinyimagenet`).
pub fn source(dir: &Path) -> Result<super::Source> {
    Ok(super::Source::Files(index(dir)?))
}

/// Lists every sample (no image is decoded).
pub fn index(dir: &Path) -> Result<FileSplits> {
    let wnids_path = dir.join("wnids.txt");
    let text = std::fs::read_to_string(&wnids_path)
        .with_context(|| format!("cannot read {}", wnids_path.display()))?;
    let mut wnids: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    wnids.sort();
    if let Some(w) = wnids.windows(2).find(|w| w[0] == w[1]) {
        bail!("{}: {} is listed twice", wnids_path.display(), w[0]);
    }
    if wnids.is_empty() {
        bail!("{} lists no classes", wnids_path.display());
    }
    if wnids.len() > u16::MAX as usize {
        bail!("{}: too many classes", wnids_path.display());
    }
    let class: BTreeMap<&str, u16> = wnids
        .iter()
        .enumerate()
        .map(|(i, w)| (w.as_str(), i as u16))
        .collect();

    let mut train = Vec::new();
    for (i, w) in wnids.iter().enumerate() {
        let images = require_dir(
            dir.join("train").join(w).join("images"),
            &format!("Tiny-ImageNet class {w} (from wnids.txt)"),
        )?;
        for path in images_in(&images, EXTS)? {
            train.push(Entry {
                path,
                label: i as u16,
            });
        }
        if (i + 1) % 50 == 0 {
            tracing::debug!("    listed {} of {} classes", i + 1, wnids.len());
        }
    }

    let ann = dir.join("val/val_annotations.txt");
    let text =
        std::fs::read_to_string(&ann).with_context(|| format!("cannot read {}", ann.display()))?;
    let val_dir = dir.join("val/images");
    let mut test = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", ann.display(), i + 1);
        let mut f = line.split('\t');
        let (Some(file), Some(wnid)) = (f.next(), f.next()) else {
            bail!("{}: expected file<TAB>wnid<TAB>bbox, got '{line}'", at());
        };
        let label = *class.get(wnid.trim()).ok_or_else(|| {
            anyhow!(
                "{}: wnid {} is not in {}",
                at(),
                wnid.trim(),
                wnids_path.display()
            )
        })?;
        let path = val_dir.join(file.trim());
        if !path.is_file() {
            bail!(
                "{}: image {} does not exist in {}",
                at(),
                file.trim(),
                val_dir.display()
            );
        }
        test.push(Entry { path, label });
    }
    if test.is_empty() {
        bail!("{} lists no images", ann.display());
    }
    Ok(FileSplits {
        root: dir.to_path_buf(),
        train,
        test,
        classes: wnids,
        label_files: vec![wnids_path, ann],
        mean: MEAN,
        std: STD,
    })
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::data::files::fixture;

    /// Writes an official-layout Tiny-ImageNet tree with `classes` wnids (listed unsorted in
    /// wnids.txt), `per_class` training JPEGs and `val_per_class` validation JPEGs each.
    /// Every third training image is grayscale; red = 40 · class index + 10 (sorted order).
    pub fn write_tree(root: &Path, classes: usize, per_class: usize, val_per_class: usize) {
        let base = root.join("tiny-imagenet-200");
        std::fs::create_dir_all(&base).unwrap();
        let wnids: Vec<String> = (0..classes).map(|c| format!("n{:08}", 1000 + c)).collect();
        let listed: Vec<&str> = wnids.iter().rev().map(String::as_str).collect();
        std::fs::write(base.join("wnids.txt"), listed.join("\n") + "\n").unwrap();
        let mut ann = String::new();
        for (c, w) in wnids.iter().enumerate() {
            let v = (40 * c + 10) as u8;
            for i in 0..per_class {
                let img = if i % 3 == 2 {
                    image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(
                        64,
                        64,
                        image::Luma([v]),
                    ))
                } else {
                    image::DynamicImage::ImageRgb8(fixture::rgb(64, 64, v))
                };
                fixture::write(&base.join(format!("train/{w}/images/{w}_{i}.JPEG")), &img);
            }
            std::fs::write(base.join(format!("train/{w}/{w}_boxes.txt")), "").unwrap();
            for i in 0..val_per_class {
                let name = format!("val_{}.JPEG", c * val_per_class + i);
                let img = image::DynamicImage::ImageRgb8(fixture::rgb(64, 64, v));
                fixture::write(&base.join("val/images").join(&name), &img);
                ann.push_str(&format!("{name}\t{w}\t0\t0\t63\t63\n"));
            }
        }
        std::fs::write(base.join("val/val_annotations.txt"), ann).unwrap();
    }

    #[test]
    fn reads_the_official_layout() {
        let dir = tempfile::tempdir().unwrap();
        write_tree(dir.path(), 3, 4, 2);
        let root = find(Some(dir.path())).unwrap();
        let idx = index(&root).unwrap();
        assert_eq!(idx.classes, ["n00001000", "n00001001", "n00001002"]);
        assert_eq!((idx.train.len(), idx.test.len()), (12, 6));
        let raw = idx.load(8).unwrap();
        assert_eq!(raw.train.labels, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
        assert_eq!(raw.test.labels, [0, 0, 1, 1, 2, 2]);
        for (i, &l) in raw.train.labels.iter().enumerate() {
            let v = 40 * l as u8 + 10;
            let img = raw.train.image(i);
            assert_eq!(img.len(), 3 * 64);
            assert!(img[..64].iter().all(|&r| r.abs_diff(v) < 12), "image {i}");
            if i % 4 == 2 {
                // Grayscale: all three channels equal.
                assert_eq!(img[..64], img[64..128]);
                assert_eq!(img[..64], img[128..]);
            }
        }
        let a = idx.digest().unwrap();
        let p = root.join("val/images/val_3.JPEG");
        fixture::write(&p, &image::DynamicImage::ImageRgb8(fixture::rgb(64, 64, 1)));
        assert_ne!(a, index(&root).unwrap().digest().unwrap());
    }

    #[test]
    fn errors_name_what_is_wrong_where() {
        let dir = tempfile::tempdir().unwrap();
        let e = find(Some(dir.path())).unwrap_err().to_string();
        assert!(
            e.contains("Tiny-ImageNet not found") && e.contains("wnids.txt"),
            "{e}"
        );
        write_tree(dir.path(), 2, 2, 1);
        let root = dir.path().join("tiny-imagenet-200");
        let ann = root.join("val/val_annotations.txt");
        let good = std::fs::read_to_string(&ann).unwrap();
        std::fs::write(&ann, good.replace("n00001001", "n09999999")).unwrap();
        let e = index(&root).unwrap_err().to_string();
        assert!(
            e.contains("val_annotations.txt line 2") && e.contains("wnid n09999999 is not in"),
            "{e}"
        );
        std::fs::write(&ann, good.replace("val_1.JPEG", "val_7.JPEG")).unwrap();
        let e = index(&root).unwrap_err().to_string();
        assert!(e.contains("val_7.JPEG does not exist"), "{e}");
        std::fs::write(&ann, &good).unwrap();
        // An empty class folder and a missing one.
        let imgs = root.join("train/n00001000/images");
        std::fs::remove_dir_all(&imgs).unwrap();
        let e = index(&root).unwrap_err().to_string();
        assert!(
            e.contains("class n00001000") && e.contains("not a directory"),
            "{e}"
        );
        std::fs::create_dir(&imgs).unwrap();
        let e = index(&root).unwrap_err().to_string();
        assert!(e.contains("has no images"), "{e}");
        // A corrupt JPEG.
        std::fs::write(imgs.join("x.JPEG"), b"\xff\xd8 not a jpeg").unwrap();
        let e = format!("{:#}", index(&root).unwrap().load(8).err().unwrap());
        assert!(e.contains("x.JPEG"), "{e}");
    }
}
