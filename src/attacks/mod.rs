//! Backdoor attacks and the `poison` step.
//!
//! Input: the clean dataset step. Output: `tune.safetensors` (the finetuning set with a
//! fraction α of its non-target images triggered and relabelled to the target, or, for the
//! clean-label SIG, every target-class image triggered with its label kept),
//! `poison_indices.json` (which tune images carry the trigger), and `test.safetensors`
//! (every test image whose true label is not the target, triggered and labelled with the
//! target: the ASR set).
//!
//! Every attack generates its trigger from the seed at any image size; where a published
//! trigger file exists a spec can name it (`trigger_file:`), and its content digest enters
//! the step key. One file per attack documents its recipe.

pub mod badnets;
pub mod batt;
pub mod blended;
pub mod cat;
pub mod invisible_l0;
pub mod invisible_l2;
pub mod issba;
pub mod sig;
pub mod smooth;
pub mod trojan;
pub mod wanet;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::ImageSet;

/// An attack with every parameter that affects its output. File-based triggers enter as
/// their content digests; the files themselves are found through the step's locators.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum AttackParams {
    BadnetsWhite(badnets::BadnetsWhite),
    BadnetsPattern(badnets::BadnetsPattern),
    Blended {
        alpha: f64,
        trigger_digest: Option<String>,
    },
    TrojanSq {
        trigger_digest: Option<String>,
    },
    TrojanWm {
        trigger_digest: Option<String>,
    },
    L0Inv {
        pixels: usize,
        trigger_digest: Option<String>,
        mask_digest: Option<String>,
    },
    L2Inv {
        l2_norm: f64,
        recipe: invisible_l2::Recipe,
        trigger_digest: Option<String>,
    },
    Smooth {
        max: f64,
        trigger_digest: Option<String>,
    },
    Sig(sig::Sig),
    Batt(batt::Batt),
    Wanet(wanet::Wanet),
    /// Sample-specific: the trigger comes from the `stegastamp` step (an input).
    Issba(issba::Issba),
    /// Adaptive: PGD on another attack's poisoned images against a tuned f_p (inputs).
    Cat(cat::Cat),
}

impl AttackParams {
    pub fn name(&self) -> &'static str {
        match self {
            Self::BadnetsWhite(_) => "badnets-white",
            Self::BadnetsPattern(_) => "badnets-pattern",
            Self::Blended { .. } => "blended",
            Self::TrojanSq { .. } => "trojan-sq",
            Self::TrojanWm { .. } => "trojan-wm",
            Self::L0Inv { .. } => "l0-inv",
            Self::L2Inv { .. } => "l2-inv",
            Self::Smooth { .. } => "smooth",
            Self::Sig(_) => "sig",
            Self::Batt(_) => "batt",
            Self::Wanet(_) => "wanet",
            Self::Issba(_) => "issba",
            Self::Cat(_) => "cat",
        }
    }

    /// Clean-label attacks poison target-class images and keep every label.
    pub fn clean_label(&self) -> bool {
        matches!(self, Self::Sig(_))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoisonParams {
    pub attack: AttackParams,
    pub poison_rate: f64,
    pub target: usize,
    pub seed: u64,
}

/// A ready-to-apply trigger at one image size (CHW u8 images).
#[derive(Debug, Clone)]
pub enum Trigger {
    /// x' = ⌊(1 − w)·x + w·p⌋ per pixel (BackdoorBox's AddTrigger, truncating cast);
    /// `weight` is H·W, `pattern` CHW u8.
    Blend { weight: Vec<f32>, pattern: Vec<u8> },
    /// x' = clip(x·keep + t, 0, 255) (TrojanNN-style additive triggers); `keep` CHW (1 keeps
    /// the pixel, 0 replaces it), `pattern` CHW in pixel units.
    Additive {
        keep: Option<Vec<f32>>,
        pattern: Vec<f32>,
    },
    /// Rotation by `degrees` counter-clockwise, nearest neighbour, black corners (BATT).
    Rotate { degrees: f64 },
    /// Bilinear resampling at a warped grid (WaNet): `grid` holds H·W (x, y) in [−1, 1].
    Warp { grid: Vec<[f32; 2]> },
}

impl Trigger {
    pub fn apply(&self, img: &mut [u8], size: usize) {
        let hw = size * size;
        match self {
            Trigger::Blend { weight, pattern } => {
                for c in 0..3 {
                    for p in 0..hw {
                        let i = c * hw + p;
                        let w = weight[p];
                        img[i] = ((1.0 - w) * img[i] as f32 + w * pattern[i] as f32) as u8;
                    }
                }
            }
            Trigger::Additive { keep, pattern } => {
                for i in 0..img.len() {
                    let k = keep.as_ref().map_or(1.0, |k| k[i]);
                    img[i] = (img[i] as f32 * k + pattern[i]).clamp(0.0, 255.0) as u8;
                }
            }
            Trigger::Rotate { degrees } => batt::rotate(img, size, *degrees),
            Trigger::Warp { grid } => wanet::warp(img, size, grid),
        }
    }
}

/// Trigger files of a poison step, found through its locators.
#[derive(Debug, Clone, Default)]
pub struct TriggerFiles {
    pub trigger: Option<PathBuf>,
    pub mask: Option<PathBuf>,
}

fn file_if(digest: &Option<String>, path: &Option<PathBuf>, what: &str) -> Result<Option<PathBuf>> {
    match (digest, path) {
        (None, _) => Ok(None),
        (Some(_), Some(p)) => Ok(Some(p.clone())),
        (Some(_), None) => bail!("the {what} file of this step is not available"),
    }
}

/// Builds the trigger of an attack for an image size.
pub fn build(p: &PoisonParams, size: usize, files: &TriggerFiles) -> Result<Trigger> {
    let seed = p.seed;
    let t = match &p.attack {
        AttackParams::BadnetsWhite(b) => b.trigger(size),
        AttackParams::BadnetsPattern(b) => b.trigger(size),
        AttackParams::Blended {
            alpha,
            trigger_digest,
        } => {
            let file = file_if(trigger_digest, &files.trigger, "trigger")?;
            Trigger::Blend {
                weight: vec![*alpha as f32; size * size],
                pattern: blended::pattern(size, seed, file.as_deref())?,
            }
        }
        AttackParams::TrojanSq { trigger_digest } => {
            let file = file_if(trigger_digest, &files.trigger, "trigger")?;
            trojan::trigger(trojan::Kind::Square, size, seed, file.as_deref())?
        }
        AttackParams::TrojanWm { trigger_digest } => {
            let file = file_if(trigger_digest, &files.trigger, "trigger")?;
            trojan::trigger(trojan::Kind::Watermark, size, seed, file.as_deref())?
        }
        AttackParams::L0Inv {
            pixels,
            trigger_digest,
            mask_digest,
        } => {
            let file = file_if(trigger_digest, &files.trigger, "trigger")?;
            let mask = file_if(mask_digest, &files.mask, "mask")?;
            invisible_l0::trigger(size, *pixels, seed, file.as_deref(), mask.as_deref())?
        }
        AttackParams::L2Inv {
            l2_norm,
            recipe,
            trigger_digest,
        } => {
            let file = file_if(trigger_digest, &files.trigger, "trigger")?;
            invisible_l2::trigger(size, *l2_norm, *recipe, seed, file.as_deref())?
        }
        AttackParams::Smooth {
            max,
            trigger_digest,
        } => {
            let file = file_if(trigger_digest, &files.trigger, "trigger")?;
            smooth::trigger(size, *max, seed, file.as_deref())?
        }
        AttackParams::Sig(s) => s.trigger(size),
        AttackParams::Batt(b) => Trigger::Rotate { degrees: b.degrees },
        AttackParams::Wanet(w) => Trigger::Warp {
            grid: w.grid(size, seed),
        },
        AttackParams::Issba(_) | AttackParams::Cat(_) => {
            bail!(
                "{}: sample-specific, no fixed trigger (its poison step reads its input steps)",
                p.attack.name()
            )
        }
    };
    Ok(t)
}

/// Chooses round(α · #non-target) non-target images of `set`, seeded; sorted indices.
pub fn choose_poison_indices(set: &ImageSet, rate: f64, target: usize, seed: u64) -> Vec<usize> {
    let mut candidates: Vec<usize> = (0..set.len())
        .filter(|&i| set.labels[i] as usize != target)
        .collect();
    let n = (rate * candidates.len() as f64).round() as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9015_0000);
    candidates.shuffle(&mut rng);
    let mut chosen = candidates[..n].to_vec();
    chosen.sort_unstable();
    chosen
}

pub struct Poisoned {
    pub tune: ImageSet,
    /// Tune images that carry the trigger.
    pub indices: Vec<usize>,
    /// WaNet noise mode: images warped with a noisy grid, labels kept.
    pub noise_indices: Vec<usize>,
    pub test: ImageSet,
}

pub fn poison(p: &PoisonParams, tune: &ImageSet, test: &ImageSet, trigger: &Trigger) -> Poisoned {
    let size = tune.size;
    let target = p.target as u16;
    let indices = if p.attack.clean_label() {
        // SIG (Appendix A.1): every training image of the target class, labels unchanged.
        (0..tune.len())
            .filter(|&i| tune.labels[i] == target)
            .collect()
    } else {
        choose_poison_indices(tune, p.poison_rate, p.target, p.seed)
    };
    let mut ptune = tune.clone();
    for &i in &indices {
        trigger.apply(ptune.image_mut(i), size);
        ptune.labels[i] = target;
    }
    let mut noise_indices = Vec::new();
    if let (Trigger::Warp { grid }, AttackParams::Wanet(w)) = (trigger, &p.attack) {
        // Noise mode: cross_ratio × #poisoned further images, warped with noise, labels kept.
        let mut rest: Vec<usize> = (0..tune.len())
            .filter(|i| indices.binary_search(i).is_err())
            .collect();
        rest.shuffle(&mut ChaCha8Rng::seed_from_u64(p.seed ^ 0x401CE));
        let n = ((w.cross_ratio * indices.len() as f64).round() as usize).min(rest.len());
        noise_indices = rest[..n].to_vec();
        noise_indices.sort_unstable();
        for &i in &noise_indices {
            let noisy = Trigger::Warp {
                grid: wanet::Wanet::noisy(grid, size, p.seed, i),
            };
            noisy.apply(ptune.image_mut(i), size);
        }
    }
    let mut ptest = ImageSet::new(size);
    let mut buf = vec![0u8; test.stride()];
    for i in 0..test.len() {
        if test.labels[i] == target {
            continue;
        }
        buf.copy_from_slice(test.image(i));
        trigger.apply(&mut buf, size);
        ptest.push(&buf, target);
    }
    Poisoned {
        tune: ptune,
        indices,
        noise_indices,
        test: ptest,
    }
}

/// The clean tune and test sets of a dataset step, after checking the target class.
pub fn load_clean(p: &PoisonParams, dataset_dir: &Path) -> Result<(ImageSet, ImageSet)> {
    let meta = crate::data::load_meta(dataset_dir)?;
    if p.target >= meta.num_classes() {
        bail!(
            "target class {} does not exist: dataset {} has {} classes",
            p.target,
            meta.name,
            meta.num_classes()
        );
    }
    let tune = ImageSet::load(&dataset_dir.join("tune.safetensors"))?;
    let test = ImageSet::load(&dataset_dir.join("test.safetensors"))?;
    Ok((tune, test))
}

/// Writes the outputs of a poison step.
pub fn write_poisoned(res: &Poisoned, out: &Path) -> Result<()> {
    res.tune.save(&out.join("tune.safetensors"))?;
    res.test.save(&out.join("test.safetensors"))?;
    crate::store::write_synced(
        &out.join("poison_indices.json"),
        serde_json::to_string(&res.indices)?.as_bytes(),
    )?;
    if !res.noise_indices.is_empty() {
        crate::store::write_synced(
            &out.join("noise_indices.json"),
            serde_json::to_string(&res.noise_indices)?.as_bytes(),
        )?;
    }
    Ok(())
}

/// Runs the `poison` step of a fixed-trigger attack on the outputs of a dataset step.
pub fn run_poison_step(
    p: &PoisonParams,
    dataset_dir: &Path,
    files: &TriggerFiles,
    out: &Path,
) -> Result<usize> {
    let (tune, test) = load_clean(p, dataset_dir)?;
    let trigger = build(p, tune.size, files)?;
    let res = poison(p, &tune, &test, &trigger);
    write_poisoned(&res, out)?;
    Ok(res.indices.len())
}

pub fn load_poison_indices(dir: &Path) -> Result<Vec<usize>> {
    let text = std::fs::read_to_string(dir.join("poison_indices.json"))?;
    Ok(serde_json::from_str(&text)?)
}

/// Reads an image file as CHW u8 at `size` (bilinear resize, like cv2.INTER_LINEAR).
pub fn read_image(path: &Path, size: usize) -> Result<Vec<u8>> {
    let img = image::open(path)
        .with_context(|| format!("trigger file {}: cannot read image", path.display()))?
        .to_rgb8();
    let img = image::imageops::resize(
        &img,
        size as u32,
        size as u32,
        image::imageops::FilterType::Triangle,
    );
    Ok(crate::data::rgb_to_chw(&img))
}

/// Reads a float32 `.npy` array: its shape and values.
pub fn read_npy(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .with_context(|| format!("{} is not a .npy file", path.display()))?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let data: Vec<f32> = npy
        .into_vec()
        .with_context(|| format!("{}: expected a float32 array", path.display()))?;
    Ok((shape, data))
}

/// Resizes a CHW f32 plane stack to `size` (bilinear).
pub fn resize_f32(chw: &[f32], from: usize, to: usize) -> Vec<f32> {
    if from == to {
        return chw.to_vec();
    }
    let channels = chw.len() / (from * from);
    let mut out = vec![0f32; channels * to * to];
    let scale = from as f32 / to as f32;
    for c in 0..channels {
        for y in 0..to {
            for x in 0..to {
                let sy = ((y as f32 + 0.5) * scale - 0.5).clamp(0.0, (from - 1) as f32);
                let sx = ((x as f32 + 0.5) * scale - 0.5).clamp(0.0, (from - 1) as f32);
                let (y0, x0) = (sy.floor() as usize, sx.floor() as usize);
                let (y1, x1) = ((y0 + 1).min(from - 1), (x0 + 1).min(from - 1));
                let (fy, fx) = (sy - y0 as f32, sx - x0 as f32);
                let at = |yy: usize, xx: usize| chw[c * from * from + yy * from + xx];
                out[c * to * to + y * to + x] = (at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx)
                    * (1.0 - fy)
                    + (at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx) * fy;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
