//! Backdoor attacks and the `poison` step.
//!
//! Input: the clean dataset step. Output: `tune.safetensors` (the finetuning set with a
//! fraction α of its non-target images triggered and relabelled to the target),
//! `poison_indices.json` (which tune images were poisoned), and `test.safetensors` (every
//! test image whose true label is not the target, triggered and labelled with the target:
//! the ASR set).

pub mod badnets;
pub mod blended;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::ImageSet;

/// An attack with every parameter that affects its output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum AttackParams {
    BadnetsWhite(badnets::BadnetsWhite),
    Blended {
        alpha: f64,
        /// blake3 of the trigger file, or `None` for the generated pattern.
        trigger_digest: Option<String>,
    },
}

impl AttackParams {
    pub fn name(&self) -> &'static str {
        match self {
            Self::BadnetsWhite(_) => "badnets-white",
            Self::Blended { .. } => "blended",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoisonParams {
    pub attack: AttackParams,
    pub poison_rate: f64,
    pub target: usize,
    pub seed: u64,
}

pub const POISON_VERSION: u32 = 1;

/// A ready-to-apply trigger.
pub enum Trigger {
    BadnetsWhite(badnets::BadnetsWhite),
    Blended { pattern: Vec<u8>, alpha: f64 },
}

impl Trigger {
    pub fn build(p: &PoisonParams, size: usize, trigger_file: Option<&Path>) -> Result<Self> {
        Ok(match &p.attack {
            AttackParams::BadnetsWhite(b) => Trigger::BadnetsWhite(b.clone()),
            AttackParams::Blended {
                alpha,
                trigger_digest,
            } => {
                let file = if trigger_digest.is_some() {
                    trigger_file
                } else {
                    None
                };
                if trigger_digest.is_some() && file.is_none() {
                    bail!("blended: the trigger file of this step is not available");
                }
                Trigger::Blended {
                    pattern: blended::pattern(size, p.seed, file)?,
                    alpha: *alpha,
                }
            }
        })
    }

    /// Applies the trigger to one CHW u8 image.
    pub fn apply(&self, img: &mut [u8], size: usize) {
        match self {
            Trigger::BadnetsWhite(b) => b.apply(img, size),
            Trigger::Blended { pattern, alpha } => blended::apply(img, pattern, *alpha),
        }
    }
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
    pub indices: Vec<usize>,
    pub test: ImageSet,
}

pub fn poison(p: &PoisonParams, tune: &ImageSet, test: &ImageSet, trigger: &Trigger) -> Poisoned {
    let size = tune.size;
    let indices = choose_poison_indices(tune, p.poison_rate, p.target, p.seed);
    let mut ptune = tune.clone();
    for &i in &indices {
        trigger.apply(ptune.image_mut(i), size);
        ptune.labels[i] = p.target as u16;
    }
    let mut ptest = ImageSet::new(size);
    let mut buf = vec![0u8; test.stride()];
    for i in 0..test.len() {
        if test.labels[i] as usize == p.target {
            continue;
        }
        buf.copy_from_slice(test.image(i));
        trigger.apply(&mut buf, size);
        ptest.push(&buf, p.target as u16);
    }
    Poisoned {
        tune: ptune,
        indices,
        test: ptest,
    }
}

/// Runs the `poison` step on the outputs of a dataset step.
pub fn run_poison_step(
    p: &PoisonParams,
    dataset_dir: &Path,
    trigger_file: Option<&PathBuf>,
    out: &Path,
) -> Result<usize> {
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
    let trigger = Trigger::build(p, tune.size, trigger_file.map(|p| p.as_path()))?;
    let res = poison(p, &tune, &test, &trigger);
    res.tune.save(&out.join("tune.safetensors"))?;
    res.test.save(&out.join("test.safetensors"))?;
    crate::store::write_synced(
        &out.join("poison_indices.json"),
        serde_json::to_string(&res.indices)?.as_bytes(),
    )?;
    Ok(res.indices.len())
}

pub fn load_poison_indices(dir: &Path) -> Result<Vec<usize>> {
    let text = std::fs::read_to_string(dir.join("poison_indices.json"))?;
    Ok(serde_json::from_str(&text)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> (ImageSet, ImageSet) {
        let raw = crate::data::synthetic::generate(0, 400, 100, 16);
        (raw.train, raw.test)
    }

    fn params(attack: AttackParams) -> PoisonParams {
        PoisonParams {
            attack,
            poison_rate: 0.1,
            target: 1,
            seed: 5,
        }
    }

    #[test]
    fn poison_invariants_hold_for_every_attack() {
        let (tune, test) = set();
        for attack in [
            AttackParams::BadnetsWhite(Default::default()),
            AttackParams::Blended {
                alpha: 0.4,
                trigger_digest: None,
            },
        ] {
            let p = params(attack.clone());
            let trig = Trigger::build(&p, 16, None).unwrap();
            let r = poison(&p, &tune, &test, &trig);
            let non_target = tune.labels.iter().filter(|&&l| l != 1).count();
            assert_eq!(
                r.indices.len(),
                (0.1 * non_target as f64).round() as usize,
                "{attack:?}"
            );
            for i in 0..tune.len() {
                if r.indices.binary_search(&i).is_ok() {
                    assert_ne!(tune.labels[i], 1, "poisoned image must be non-target");
                    assert_eq!(r.tune.labels[i], 1);
                    assert_ne!(r.tune.image(i), tune.image(i), "poisoned image unchanged");
                } else {
                    assert_eq!(r.tune.labels[i], tune.labels[i]);
                    assert_eq!(r.tune.image(i), tune.image(i), "clean image {i} changed");
                }
            }
            let test_non_target = test.labels.iter().filter(|&&l| l != 1).count();
            assert_eq!(r.test.len(), test_non_target);
            assert!(r.test.labels.iter().all(|&l| l == 1));
            // Determinism from the seed.
            let again = poison(&p, &tune, &test, &Trigger::build(&p, 16, None).unwrap());
            assert_eq!(again.tune, r.tune);
            let other = PoisonParams {
                seed: 6,
                ..p.clone()
            };
            assert_ne!(choose_poison_indices(&tune, 0.1, 1, 6), r.indices);
            let _ = other;
        }
    }

    #[test]
    fn blended_trigger_file_is_honoured() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.png");
        image::RgbImage::from_pixel(5, 7, image::Rgb([200, 10, 30]))
            .save(&path)
            .unwrap();
        let p = params(AttackParams::Blended {
            alpha: 1.0,
            trigger_digest: Some("x".into()),
        });
        let trig = Trigger::build(&p, 16, Some(&path)).unwrap();
        let mut img = vec![0u8; 3 * 256];
        trig.apply(&mut img, 16);
        assert!(img[..256].iter().all(|&v| v == 200) && img[256..512].iter().all(|&v| v == 10));
        assert!(Trigger::build(&p, 16, None).is_err());
    }
}
