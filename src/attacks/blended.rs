//! Blended (Chen et al., 2017; paper Section 4, reference notes §2.3): the whole image is
//! blended with a key pattern, x' = ⌊(1 − α)·x + α·pattern⌋ in 8-bit space (BackdoorBox's
//! truncating cast). The reference implementation blends the Hello Kitty picture with
//! α = 0.4. By default ieu-bench generates the key itself: uniform random noise drawn from
//! the attack seed (Chen et al.'s random-noise key); `trigger_file:` takes any image (e.g.
//! hello_kitty.jpeg), resized to the image size.

use std::path::Path;

use anyhow::Result;
use burn::prelude::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Attack, AttackParams, PoisonInputs, PoisonParams, Trigger, TriggerFiles};
use crate::defences::Settings;
use crate::spec::plan::SpecFiles;

/// Blended in the registry.
pub struct Blended;

impl Attack for Blended {
    fn name(&self) -> &'static str {
        "blended"
    }
    fn default_settings(&self) -> Value {
        super::defaults::<BlendedSettings>()
    }
    fn check(&self, settings: &Value) -> Result<(), String> {
        BlendedSettings::checked(settings).map(drop)
    }
    fn params(&self, settings: &Value, files: &mut SpecFiles) -> Result<AttackParams> {
        let s = BlendedSettings::of(settings)?;
        let p = BlendedParams {
            alpha: s.alpha,
            trigger_digest: files.digest("trigger_file", &s.trigger_file)?,
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

/// Blended settings of a spec (`defaults.attacks.blended`); `trigger_file` is relative to
/// the spec file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlendedSettings {
    pub alpha: f64,
    pub trigger_file: Option<String>,
}

impl Default for BlendedSettings {
    fn default() -> Self {
        Self {
            alpha: 0.4,
            trigger_file: None,
        }
    }
}

impl Settings for BlendedSettings {
    fn validate(&self) -> Result<(), String> {
        if !(self.alpha > 0.0 && self.alpha <= 1.0) {
            return Err(format!("alpha: {} is not in (0, 1]", self.alpha));
        }
        Ok(())
    }
}

/// Parameters of Blended's `poison` step: the key file enters as its content digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlendedParams {
    pub alpha: f64,
    pub trigger_digest: Option<String>,
}

/// The `poison` step of Blended.
pub fn run(p: &PoisonParams, inputs: &PoisonInputs, out: &Path, _: &Device) -> Result<usize> {
    super::run_poison_step(p, inputs, out, false, trigger)
}

/// Blended's trigger: the key pattern with weight α everywhere.
pub fn trigger(p: &PoisonParams, size: usize, files: &TriggerFiles) -> Result<Trigger> {
    let bp: BlendedParams = p.attack.fields()?;
    let file = files.trigger_if(&bp.trigger_digest)?;
    Ok(Trigger::Blend {
        weight: vec![bp.alpha as f32; size * size],
        pattern: pattern(size, p.seed, file)?,
    })
}

/// The key pattern, CHW u8 at the image size.
pub fn pattern(size: usize, seed: u64, file: Option<&Path>) -> Result<Vec<u8>> {
    match file {
        Some(path) => super::read_image(path, size),
        None => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xB1E7D);
            Ok((0..3 * size * size).map(|_| rng.random::<u8>()).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attacks::Trigger;

    #[test]
    fn blend_truncates_like_backdoorbox() {
        let t = Trigger::Blend {
            weight: vec![0.4],
            pattern: vec![201, 255, 0],
        };
        let mut img = vec![100u8, 0, 255];
        t.apply(&mut img, 1);
        // 0.6*100 + 0.4*201 = 140.4 -> 140; 0.4*255 = 102; 0.6*255 = 153
        assert_eq!(img, vec![140, 102, 153]);
    }

    #[test]
    fn generated_pattern_is_seeded() {
        assert_eq!(pattern(8, 1, None).unwrap(), pattern(8, 1, None).unwrap());
        assert_ne!(pattern(8, 1, None).unwrap(), pattern(8, 2, None).unwrap());
    }
}
