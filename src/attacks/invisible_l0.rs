//! l0-inv (Li et al., 2021a; paper Section 4, reference notes §2.5): an invisible trigger of
//! few pixels, x' = clip(x·M + T, 0, 255), where M is 0 on the trigger's pixels and 1
//! elsewhere (the published mask marks 9 pixels in the bottom row).
//!
//! Generated: `pixels` positions drawn from the seed (default 9), each set to a random
//! colour; the l0 norm of x' − x is at most `pixels` pixels. `trigger_file:` (PNG) and
//! `mask_file:` (float32 .npy of shape (3,H,W), 1 = trigger pixel) take the published pair.

use std::path::Path;

use anyhow::{Result, bail};
use burn::prelude::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Attack, AttackParams, PoisonInputs, PoisonParams, Trigger, TriggerFiles};
use crate::defences::Settings;
use crate::spec::plan::SpecFiles;

/// l0-inv in the registry.
pub struct L0Inv;

impl Attack for L0Inv {
    fn name(&self) -> &'static str {
        "l0-inv"
    }
    fn default_settings(&self) -> Value {
        super::defaults::<L0Settings>()
    }
    fn check(&self, settings: &Value) -> Result<(), String> {
        L0Settings::checked(settings).map(drop)
    }
    fn params(&self, settings: &Value, files: &mut SpecFiles) -> Result<AttackParams> {
        let s = L0Settings::of(settings)?;
        let p = L0Params {
            pixels: s.pixels,
            trigger_digest: files.digest("trigger_file", &s.trigger_file)?,
            mask_digest: files.digest("mask_file", &s.mask_file)?,
        };
        AttackParams::new(self.name(), &p)
    }
    fn trigger(&self, p: &PoisonParams, size: usize, files: &TriggerFiles) -> Result<Trigger> {
        trigger(p, size, files)
    }
    fn run(
        &self,
        p: &PoisonParams,
        inputs: &PoisonInputs,
        out: &Path,
        device: &Device,
    ) -> Result<usize> {
        run(p, inputs, out, device)
    }
}

/// l0-inv settings of a spec (`defaults.attacks.l0-inv`); the files are relative to the
/// spec file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct L0Settings {
    pub pixels: usize,
    pub trigger_file: Option<String>,
    pub mask_file: Option<String>,
}

impl Default for L0Settings {
    fn default() -> Self {
        Self {
            pixels: 9,
            trigger_file: None,
            mask_file: None,
        }
    }
}

impl Settings for L0Settings {
    fn validate(&self) -> Result<(), String> {
        if self.pixels < 1 {
            return Err(format!("pixels: {} must be at least 1", self.pixels));
        }
        Ok(())
    }
}

/// Parameters of l0-inv's `poison` step: the files enter as their content digests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct L0Params {
    pub pixels: usize,
    pub trigger_digest: Option<String>,
    pub mask_digest: Option<String>,
}

/// The `poison` step of l0-inv.
pub fn run(p: &PoisonParams, inputs: &PoisonInputs, out: &Path, _: &Device) -> Result<usize> {
    super::run_poison_step(p, inputs, out, false, trigger)
}

/// l0-inv's trigger from the step's parameters and files.
pub fn trigger(p: &PoisonParams, size: usize, files: &TriggerFiles) -> Result<Trigger> {
    let lp: L0Params = p.attack.fields()?;
    let file = files.trigger_if(&lp.trigger_digest)?;
    let mask = files.mask_if(&lp.mask_digest)?;
    generate(size, lp.pixels, p.seed, file, mask)
}

/// The trigger of `pixels` pixels: the published pair of files, or generated from the
/// seed.
pub fn generate(
    size: usize,
    pixels: usize,
    seed: u64,
    file: Option<&Path>,
    mask: Option<&Path>,
) -> Result<Trigger> {
    let hw = size * size;
    match (file, mask) {
        (Some(t), Some(m)) => {
            let pattern: Vec<f32> = super::read_image(t, size)?
                .iter()
                .map(|&v| v as f32)
                .collect();
            let (shape, data) = super::read_npy(m)?;
            if shape.len() != 3 || shape[0] != 3 || shape[1] != shape[2] {
                bail!(
                    "l0-inv mask_file {}: expected shape (3, H, H), got {shape:?}",
                    m.display()
                );
            }
            // Nearest resize of the mask so it stays binary.
            let from = shape[1];
            let mut keep = vec![1f32; 3 * hw];
            for c in 0..3 {
                for y in 0..size {
                    for x in 0..size {
                        let v = data[c * from * from + (y * from / size) * from + x * from / size];
                        keep[c * hw + y * size + x] = 1.0 - v;
                    }
                }
            }
            Ok(Trigger::Additive {
                keep: Some(keep),
                pattern,
            })
        }
        (None, None) => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x1010);
            let mut keep = vec![1f32; 3 * hw];
            let mut pattern = vec![0f32; 3 * hw];
            let mut chosen = std::collections::BTreeSet::new();
            while chosen.len() < pixels.min(hw) {
                chosen.insert(rng.random_range(0..hw));
            }
            for p in chosen {
                for c in 0..3 {
                    keep[c * hw + p] = 0.0;
                    pattern[c * hw + p] = rng.random_range(0.0..=255.0f32).round();
                }
            }
            Ok(Trigger::Additive {
                keep: Some(keep),
                pattern,
            })
        }
        _ => bail!("l0-inv needs both trigger_file and mask_file, or neither"),
    }
}
