//! Image sets, their on-disk form, and the dataset step.
//!
//! Images are kept as `u8` in CHW order (one image = 3·H·W bytes), square, at the scale's
//! image size. Sets are stored as safetensors files with an `images` tensor `[N,3,H,W]` (U8)
//! and a `labels` tensor `[N]` (U16).

pub mod augment;
pub mod cifar10;
pub mod synthetic;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

/// A set of square RGB images with labels.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    pub size: usize,
    pub images: Vec<u8>,
    pub labels: Vec<u16>,
}

impl ImageSet {
    pub fn new(size: usize) -> Self {
        Self {
            size,
            images: Vec::new(),
            labels: Vec::new(),
        }
    }
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Bytes per image.
    pub fn stride(&self) -> usize {
        3 * self.size * self.size
    }
    pub fn image(&self, i: usize) -> &[u8] {
        let s = self.stride();
        &self.images[i * s..(i + 1) * s]
    }
    pub fn image_mut(&mut self, i: usize) -> &mut [u8] {
        let s = self.stride();
        &mut self.images[i * s..(i + 1) * s]
    }
    pub fn push(&mut self, image: &[u8], label: u16) {
        assert_eq!(image.len(), self.stride(), "image of the wrong size");
        self.images.extend_from_slice(image);
        self.labels.push(label);
    }
    /// The images at `idx`, in that order.
    pub fn subset(&self, idx: &[usize]) -> Self {
        let mut out = Self::new(self.size);
        out.images.reserve(idx.len() * self.stride());
        for &i in idx {
            out.push(self.image(i), self.labels[i]);
        }
        out
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let n = self.len();
        let labels: Vec<u8> = self.labels.iter().flat_map(|l| l.to_le_bytes()).collect();
        let images = TensorView::new(Dtype::U8, vec![n, 3, self.size, self.size], &self.images)?;
        let labels = TensorView::new(Dtype::U16, vec![n], &labels)?;
        let bytes = safetensors::serialize([("images", images), ("labels", labels)], None)?;
        crate::store::write_synced(path, &bytes)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{} is not a safetensors image set", path.display()))?;
        let images = st.tensor("images")?;
        let labels = st.tensor("labels")?;
        let shape = images.shape();
        if shape.len() != 4 || shape[1] != 3 || shape[2] != shape[3] || images.dtype() != Dtype::U8
        {
            bail!(
                "{}: images must be U8 [N,3,H,H], got {:?} {:?}",
                path.display(),
                images.dtype(),
                shape
            );
        }
        let labels: Vec<u16> = labels
            .data()
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        if labels.len() != shape[0] {
            bail!(
                "{}: {} labels for {} images",
                path.display(),
                labels.len(),
                shape[0]
            );
        }
        Ok(Self {
            size: shape[2],
            images: images.data().to_vec(),
            labels,
        })
    }
}

/// Per-dataset facts needed downstream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DatasetMeta {
    pub name: String,
    pub classes: Vec<String>,
    pub image_size: usize,
    /// Normalisation applied to model inputs (per channel, on [0,1] pixels).
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub pretrain: usize,
    pub tune: usize,
    pub test: usize,
}

impl DatasetMeta {
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }
}

/// Parameters of the `dataset` step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetParams {
    pub name: String,
    pub image_size: usize,
    pub pretrain: usize,
    pub tune: usize,
    pub test: usize,
    /// Seed of the split permutation (and of generation for `synthetic`).
    pub seed: u64,
    /// blake3 of the files read (datasets on disk); `None` for generated data.
    pub source_digest: Option<String>,
}

pub const DATASET_VERSION: u32 = 1;

/// Finds a dataset on disk for planning: its directory and a content digest.
pub fn locate(name: &str, data_dir: Option<&Path>) -> Result<Option<(PathBuf, String)>> {
    match name {
        "synthetic" => Ok(None),
        "cifar10" => {
            let dir = cifar10::find(data_dir)?;
            let digest = cifar10::digest(&dir)?;
            Ok(Some((dir, digest)))
        }
        other => Err(anyhow!("not implemented yet: dataset {other}")),
    }
}

/// Loaded splits, before subsetting.
pub struct RawSplits {
    pub train: ImageSet,
    pub test: ImageSet,
    pub classes: Vec<String>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Runs the `dataset` step: reads or generates the data, splits it into disjoint pretrain
/// and tune subsets (a seeded permutation of the training split), and writes
/// `pretrain.safetensors`, `tune.safetensors`, `test.safetensors` and `meta.json`.
pub fn run_dataset_step(
    p: &DatasetParams,
    data_dir: Option<&Path>,
    out: &Path,
) -> Result<DatasetMeta> {
    let raw = match p.name.as_str() {
        "synthetic" => synthetic::generate(p.seed, p.pretrain + p.tune, p.test, p.image_size),
        "cifar10" => {
            let dir = cifar10::find(data_dir)?;
            let digest = cifar10::digest(&dir)?;
            if Some(&digest) != p.source_digest.as_ref() {
                bail!(
                    "CIFAR-10 files in {} changed since planning; run again",
                    dir.display()
                );
            }
            let mut raw = cifar10::load(&dir)?;
            raw.train = resize_set(&raw.train, p.image_size);
            raw.test = resize_set(&raw.test, p.image_size);
            raw
        }
        other => bail!("not implemented yet: dataset {other}"),
    };
    let want_train = p.pretrain + p.tune;
    if want_train > raw.train.len() {
        bail!(
            "dataset {}: the scale asks for {} pretrain + {} tune images but the training split has {}",
            p.name,
            p.pretrain,
            p.tune,
            raw.train.len()
        );
    }
    let test_n = if p.test == 0 { raw.test.len() } else { p.test };
    if test_n > raw.test.len() {
        bail!(
            "dataset {}: the scale asks for {} test images but there are {}",
            p.name,
            test_n,
            raw.test.len()
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(p.seed ^ 0xDA7A);
    let mut perm: Vec<usize> = (0..raw.train.len()).collect();
    perm.shuffle(&mut rng);
    let pretrain = raw.train.subset(&perm[..p.pretrain]);
    let tune = raw.train.subset(&perm[p.pretrain..want_train]);
    let mut tperm: Vec<usize> = (0..raw.test.len()).collect();
    tperm.shuffle(&mut rng);
    let test = raw.test.subset(&tperm[..test_n]);
    pretrain.save(&out.join("pretrain.safetensors"))?;
    tune.save(&out.join("tune.safetensors"))?;
    test.save(&out.join("test.safetensors"))?;
    let meta = DatasetMeta {
        name: p.name.clone(),
        classes: raw.classes,
        image_size: p.image_size,
        mean: raw.mean,
        std: raw.std,
        pretrain: pretrain.len(),
        tune: tune.len(),
        test: test.len(),
    };
    crate::store::write_synced(
        &out.join("meta.json"),
        serde_json::to_string_pretty(&meta)?.as_bytes(),
    )?;
    Ok(meta)
}

pub fn load_meta(dir: &Path) -> Result<DatasetMeta> {
    let path = dir.join("meta.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// Resizes every image of a set to `size` (no-op when it already has that size).
pub fn resize_set(set: &ImageSet, size: usize) -> ImageSet {
    if set.size == size {
        return set.clone();
    }
    let mut out = ImageSet::new(size);
    for i in 0..set.len() {
        out.push(&resize_chw(set.image(i), set.size, size), set.labels[i]);
    }
    out
}

/// Resizes one CHW u8 image with a triangle (bilinear) filter.
pub fn resize_chw(img: &[u8], from: usize, to: usize) -> Vec<u8> {
    let rgb = chw_to_rgb(img, from);
    let filter = if to < from {
        image::imageops::FilterType::Triangle
    } else {
        image::imageops::FilterType::CatmullRom
    };
    let resized = image::imageops::resize(&rgb, to as u32, to as u32, filter);
    rgb_to_chw(&resized)
}

pub fn chw_to_rgb(img: &[u8], size: usize) -> image::RgbImage {
    let hw = size * size;
    image::RgbImage::from_fn(size as u32, size as u32, |x, y| {
        let p = y as usize * size + x as usize;
        image::Rgb([img[p], img[hw + p], img[2 * hw + p]])
    })
}

pub fn rgb_to_chw(img: &image::RgbImage) -> Vec<u8> {
    let (w, h) = img.dimensions();
    assert_eq!(w, h, "images are square");
    let hw = (w * h) as usize;
    let mut out = vec![0u8; 3 * hw];
    for (x, y, px) in img.enumerate_pixels() {
        let p = y as usize * w as usize + x as usize;
        for c in 0..3 {
            out[c * hw + p] = px[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_set_round_trips_through_safetensors() {
        let mut s = ImageSet::new(4);
        s.push(&[7u8; 48], 3);
        s.push(&[9u8; 48], 300);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.safetensors");
        s.save(&p).unwrap();
        assert_eq!(ImageSet::load(&p).unwrap(), s);
    }

    #[test]
    fn resize_keeps_constant_images_constant() {
        let img = vec![128u8; 3 * 32 * 32];
        let r = resize_chw(&img, 32, 16);
        assert_eq!(r.len(), 3 * 16 * 16);
        assert!(r.iter().all(|&v| v == 128));
    }
}
