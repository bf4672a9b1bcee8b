//! Image sets, their on-disk form, and the dataset step.
//!
//! Images are kept as `u8` in CHW order (one image = 3·H·W bytes), square, at the scale's
//! image size. Sets are stored as safetensors files with an `images` tensor `[N,3,H,W]` (U8)
//! and a `labels` tensor `[N]` (U16).

pub mod augment;
pub mod cifar10;
pub mod files;
pub mod gtsrb;
pub mod imagefolder;
pub mod synthetic;
pub mod tinyimagenet;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
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
    /// On-disk format of a dataset named by a spec's `datasets:` entry (`imagefolder`);
    /// `None` for the built-in names. Left out of the key when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    pub image_size: usize,
    pub pretrain: usize,
    pub tune: usize,
    pub test: usize,
    /// Seed of the split permutation (and of generation for `synthetic`).
    pub seed: u64,
    /// No pretraining set: D_tune is the whole training split (`tune` images of generated
    /// data, every training image of a dataset on disk), as when the starting checkpoint is
    /// imported (the paper finetunes on all 50 000 CIFAR-10 images). Left out of the key
    /// when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub whole_train_as_tune: bool,
    /// blake3 of the files read (datasets on disk); `None` for generated data.
    pub source_digest: Option<String>,
}

/// How a dataset is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Synthetic,
    Cifar10,
    Gtsrb,
    TinyImageNet,
    ImageFolder,
}

impl Format {
    /// The format of a built-in dataset name, or of a spec entry's `format`.
    pub fn of(name: &str, format: Option<&str>) -> Result<Self> {
        Ok(match format.unwrap_or(name) {
            "synthetic" => Format::Synthetic,
            "cifar10" => Format::Cifar10,
            "gtsrb" => Format::Gtsrb,
            "tinyimagenet" => Format::TinyImageNet,
            "imagefolder" => Format::ImageFolder,
            other => bail!("not implemented yet: dataset {other}"),
        })
    }

    /// The module under `src/data` that reads this format; the dataset step's code
    /// identity is `dataset/<module>`.
    pub fn module(self) -> &'static str {
        match self {
            Format::Synthetic => "synthetic",
            Format::Cifar10 => "cifar10",
            Format::Gtsrb => "gtsrb",
            Format::TinyImageNet => "tinyimagenet",
            Format::ImageFolder => "imagefolder",
        }
    }
}

/// The directory a dataset is read from: `root` for a spec's `datasets:` entry, else
/// looked up under `data_dir`; `None` for generated data.
pub fn find(fmt: Format, data_dir: Option<&Path>, root: Option<&Path>) -> Result<Option<PathBuf>> {
    Ok(Some(match fmt {
        Format::Synthetic => return Ok(None),
        Format::Cifar10 => cifar10::find(data_dir)?,
        Format::Gtsrb => gtsrb::find(data_dir)?,
        Format::TinyImageNet => tinyimagenet::find(data_dir)?,
        Format::ImageFolder => match (root, data_dir) {
            (Some(r), _) => imagefolder::find(r, "dataset root")?,
            (None, Some(d)) => imagefolder::find(d, "dataset imagefolder (--data-dir)")?,
            (None, None) => bail!(
                "dataset imagefolder needs a data directory: pass --data-dir ROOT (or set \
                 IEU_DATA_DIR) where ROOT/train/<class>/ and ROOT/test/<class>/ hold images"
            ),
        },
    }))
}

/// The samples of a file-per-image dataset in `dir`.
fn index(fmt: Format, dir: &Path) -> Result<Option<files::FileSplits>> {
    Ok(Some(match fmt {
        Format::Gtsrb => gtsrb::index(dir)?,
        Format::TinyImageNet => tinyimagenet::index(dir)?,
        Format::ImageFolder => imagefolder::index(dir)?,
        Format::Synthetic | Format::Cifar10 => return Ok(None),
    }))
}

/// Content digest of the files a dataset reads in `dir`.
pub fn digest(fmt: Format, dir: &Path) -> Result<String> {
    Ok(digest_and_classes(fmt, dir)?.0)
}

/// Content digest of the files a dataset reads in `dir`, and its number of classes.
fn digest_and_classes(fmt: Format, dir: &Path) -> Result<(String, usize)> {
    match index(fmt, dir)? {
        Some(files) => Ok((files.digest()?, files.classes.len())),
        None => Ok((cifar10::digest(dir)?, cifar10::CLASSES.len())),
    }
}

/// A dataset found for planning: where it is, its content digest and its class count
/// (`dir`/`digest` are `None` for generated data).
pub struct Located {
    pub found: Option<(PathBuf, String)>,
    pub classes: usize,
}

/// [`locate`], also telling the number of classes (to check attack targets when planning).
pub fn locate_with_classes(
    name: &str,
    format: Option<&str>,
    data_dir: Option<&Path>,
    root: Option<&Path>,
) -> Result<Located> {
    let fmt = Format::of(name, format)?;
    match find(fmt, data_dir, root)? {
        None => Ok(Located {
            found: None,
            classes: synthetic::CLASSES.len(),
        }),
        Some(dir) => {
            let (d, classes) = digest_and_classes(fmt, &dir)?;
            Ok(Located {
                found: Some((dir, d)),
                classes,
            })
        }
    }
}

/// Finds a dataset on disk for planning: its directory and a content digest.
pub fn locate(
    name: &str,
    format: Option<&str>,
    data_dir: Option<&Path>,
    root: Option<&Path>,
) -> Result<Option<(PathBuf, String)>> {
    Ok(locate_with_classes(name, format, data_dir, root)?.found)
}

/// The test split of a built-in dataset at `size` (for previews).
pub fn load_test(name: &str, data_dir: Option<&Path>, size: usize) -> Result<ImageSet> {
    let fmt = Format::of(name, None)?;
    let Some(dir) = find(fmt, data_dir, None)? else {
        return Ok(synthetic::generate(0, 0, 200, size).test);
    };
    match index(fmt, &dir)? {
        Some(f) => files::decode_set(
            &f.test,
            &(0..f.test.len()).collect::<Vec<_>>(),
            size,
            "test",
        ),
        None => Ok(resize_set(&cifar10::load(&dir)?.test, size)),
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

impl RawSplits {
    /// Metadata for training on these splits directly (the whole train split as D_tune), as
    /// benchmarks and tests do without a `dataset` step.
    pub fn meta(&self, name: &str) -> DatasetMeta {
        DatasetMeta {
            name: name.into(),
            classes: self.classes.clone(),
            image_size: self.train.size,
            mean: self.mean,
            std: self.std,
            pretrain: 0,
            tune: self.train.len(),
            test: self.test.len(),
        }
    }
}

/// A dataset's samples: decoded in memory, or image files decoded on demand.
pub enum Source {
    Memory(RawSplits),
    Files(files::FileSplits),
}

impl Source {
    fn lens(&self) -> (usize, usize) {
        match self {
            Source::Memory(r) => (r.train.len(), r.test.len()),
            Source::Files(f) => (f.train.len(), f.test.len()),
        }
    }
    fn subset(&self, test: bool, idx: &[usize], size: usize, what: &str) -> Result<ImageSet> {
        Ok(match self {
            Source::Memory(r) => {
                resize_set(&(if test { &r.test } else { &r.train }).subset(idx), size)
            }
            Source::Files(f) => {
                files::decode_set(if test { &f.test } else { &f.train }, idx, size, what)?
            }
        })
    }
    fn classes_and_stats(&self) -> (Vec<String>, [f32; 3], [f32; 3]) {
        match self {
            Source::Memory(r) => (r.classes.clone(), r.mean, r.std),
            Source::Files(f) => (f.classes.clone(), f.mean, f.std),
        }
    }
}

/// The pretrain split's size when the training split is too small for the scale: the tune
/// set keeps its size and pretraining gets what remains (GTSRB has 39 209 training images,
/// fewer than the `cpu` scale's 40 000 + 10 000), provided that is at least half of what
/// was asked; otherwise an error.
pub fn pretrain_size(name: &str, pretrain: usize, tune: usize, available: usize) -> Result<usize> {
    if pretrain + tune <= available {
        return Ok(pretrain);
    }
    let left = available.saturating_sub(tune);
    if left == 0 || left * 2 < pretrain {
        bail!(
            "dataset {name}: the scale asks for {pretrain} pretrain + {tune} tune images but the \
             training split has {available}"
        );
    }
    tracing::warn!(
        "dataset {name}: {available} training images are fewer than {pretrain} pretrain + \
         {tune} tune; pretraining on the {left} that remain"
    );
    Ok(left)
}

/// Runs the `dataset` step: reads or generates the data (the format module's `source`),
/// splits it into disjoint pretrain and tune subsets (a seeded permutation of the training
/// split), and writes `pretrain.safetensors`, `tune.safetensors`, `test.safetensors` and
/// `meta.json`. Datasets of image files decode only the images the subsets use. `root` is a
/// spec entry's folder.
///
/// This function only routes: each format's step is keyed by its own code identity,
/// `dataset/<module>`, rooted at that module's `source` and at [`split_and_save`], so an
/// edit to the synthetic generator moves no CIFAR-10 key (`build/code_identity.rs`).
pub fn run_dataset_step(
    p: &DatasetParams,
    data_dir: Option<&Path>,
    root: Option<&Path>,
    out: &Path,
) -> Result<DatasetMeta> {
    let fmt = Format::of(&p.name, p.format.as_deref())?;
    let src = match find(fmt, data_dir, root)? {
        None => synthetic::source(p),
        Some(dir) => {
            let src = match fmt {
                Format::Synthetic => synthetic::source(p),
                Format::Cifar10 => cifar10::source(&dir)?,
                Format::Gtsrb => gtsrb::source(&dir)?,
                Format::TinyImageNet => tinyimagenet::source(&dir)?,
                Format::ImageFolder => imagefolder::source(&dir)?,
            };
            // A file-per-image format's digest is its index's, which `source` just built.
            let found = match &src {
                Source::Files(files) => files.digest()?,
                Source::Memory(_) => digest(fmt, &dir)?,
            };
            if Some(&found) != p.source_digest.as_ref() {
                bail!(
                    "dataset {}: the files in {} changed since planning; run again",
                    p.name,
                    dir.display()
                );
            }
            src
        }
    };
    split_and_save(p, &src, out)
}

/// The common part of every `dataset` step: the seeded split of a format's samples into
/// pretrain, tune and test subsets, written to `out`.
pub fn split_and_save(p: &DatasetParams, src: &Source, out: &Path) -> Result<DatasetMeta> {
    let (n_train, n_test) = src.lens();
    let (n_pre, want_train) = if p.whole_train_as_tune {
        (0, n_train)
    } else {
        let n_pre = pretrain_size(&p.name, p.pretrain, p.tune, n_train)?;
        (n_pre, n_pre + p.tune)
    };
    let test_n = if p.test == 0 { n_test } else { p.test };
    if test_n > n_test {
        bail!(
            "dataset {}: the scale asks for {} test images but there are {}",
            p.name,
            test_n,
            n_test
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(p.seed ^ 0xDA7A);
    let mut perm: Vec<usize> = (0..n_train).collect();
    perm.shuffle(&mut rng);
    let mut tperm: Vec<usize> = (0..n_test).collect();
    tperm.shuffle(&mut rng);
    let size = p.image_size;
    let pretrain = src.subset(false, &perm[..n_pre], size, "pretrain")?;
    let tune = src.subset(false, &perm[n_pre..want_train], size, "tune")?;
    let test = src.subset(true, &tperm[..test_n], size, "test")?;
    pretrain.save(&out.join("pretrain.safetensors"))?;
    tune.save(&out.join("tune.safetensors"))?;
    test.save(&out.join("test.safetensors"))?;
    let (classes, mean, std) = src.classes_and_stats();
    let meta = DatasetMeta {
        name: p.name.clone(),
        classes,
        image_size: p.image_size,
        mean,
        std,
        pretrain: pretrain.len(),
        tune: tune.len(),
        test: test.len(),
    };
    crate::store::write_json(&out.join("meta.json"), &meta)?;
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
    fn small_training_splits_shrink_pretraining_only() {
        assert_eq!(pretrain_size("x", 40_000, 10_000, 50_000).unwrap(), 40_000);
        // GTSRB at the cpu scale: the tune set keeps its size.
        assert_eq!(
            pretrain_size("gtsrb", 40_000, 10_000, 39_209).unwrap(),
            29_209
        );
        let e = pretrain_size("x", 320, 320, 400).unwrap_err().to_string();
        assert!(
            e.contains("asks for 320 pretrain + 320 tune") && e.contains("has 400"),
            "{e}"
        );
        assert!(pretrain_size("x", 10, 500, 400).is_err());
    }

    #[test]
    fn resize_keeps_constant_images_constant() {
        let img = vec![128u8; 3 * 32 * 32];
        let r = resize_chw(&img, 32, 16);
        assert_eq!(r.len(), 3 * 16 * 16);
        assert!(r.iter().all(|&v| v == 128));
    }
}
