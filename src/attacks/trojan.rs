//! Trojan-SQ and Trojan-WM (TrojanNN, Liu et al., 2018b; paper Section 4, reference notes
//! §2.4): an additive trigger, x' = clip(x + T, 0, 255).
//!
//! - **Trojan-SQ**: a square patch near the lower-right corner (the published trigger is
//!   9×9 at rows/cols 21–29 of 32×32). Generated: a square of side round(9/32·size) at
//!   offset round(21/32·size), each pixel a random colour with channel values in
//!   {0} ∪ [128, 255].
//! - **Trojan-WM**: a faint watermark of strokes spread over the image (the published one
//!   covers about 31% of the pixels with values around 30). Generated: smoothed random noise
//!   thresholded to about a third of the pixels, values uniform in [32, 96].
//!
//! `trigger_file:` takes the published PNGs (black = no trigger), resized bilinearly.

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

/// A TrojanNN attack in the registry: [`SQUARE`] or [`WATERMARK`].
pub struct Trojan {
    name: &'static str,
}

/// Trojan-SQ: the square patch.
pub const SQUARE: Trojan = Trojan { name: "trojan-sq" };

/// Trojan-WM: the watermark.
pub const WATERMARK: Trojan = Trojan { name: "trojan-wm" };

impl Attack for Trojan {
    fn name(&self) -> &'static str {
        self.name
    }
    fn default_settings(&self) -> Value {
        super::defaults::<TrojanSettings>()
    }
    fn check(&self, settings: &Value) -> Result<(), String> {
        TrojanSettings::checked(settings).map(drop)
    }
    fn params(&self, settings: &Value, files: &mut SpecFiles) -> Result<AttackParams> {
        let s = TrojanSettings::of(settings)?;
        let p = TrojanParams {
            trigger_digest: files.digest("trigger_file", &s.trigger_file)?,
        };
        AttackParams::new(self.name, &p)
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

/// Settings of either Trojan attack (`defaults.attacks.trojan-sq`, `…trojan-wm`);
/// `trigger_file` is relative to the spec file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrojanSettings {
    pub trigger_file: Option<String>,
}

impl Settings for TrojanSettings {
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Parameters of a Trojan `poison` step: the trigger file enters as its content digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrojanParams {
    pub trigger_digest: Option<String>,
}

/// The `poison` step of either Trojan attack.
pub fn run(p: &PoisonParams, inputs: &PoisonInputs, out: &Path, _: &Device) -> Result<usize> {
    super::run_poison_step(p, inputs, out, false, trigger)
}

/// The trigger of the step's Trojan attack.
pub fn trigger(p: &PoisonParams, size: usize, files: &TriggerFiles) -> Result<Trigger> {
    let tp: TrojanParams = p.attack.fields()?;
    let kind = match p.attack.name() {
        "trojan-wm" => Kind::Watermark,
        _ => Kind::Square,
    };
    generate(kind, size, p.seed, files.trigger_if(&tp.trigger_digest)?)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Square,
    Watermark,
}

/// The additive trigger of a kind: the file's, or generated from the seed.
pub fn generate(kind: Kind, size: usize, seed: u64, file: Option<&Path>) -> Result<Trigger> {
    let hw = size * size;
    if let Some(path) = file {
        let img = super::read_image(path, size)?;
        return Ok(Trigger::Additive {
            keep: None,
            pattern: img.iter().map(|&v| v as f32).collect(),
        });
    }
    let mut pattern = vec![0f32; 3 * hw];
    match kind {
        Kind::Square => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7507);
            let side = ((9.0 * size as f64 / 32.0).round() as usize).max(1);
            let off = ((21.0 * size as f64 / 32.0).round() as usize).min(size - side);
            for y in off..off + side {
                for x in off..off + side {
                    for c in 0..3 {
                        if rng.random_bool(0.6) {
                            pattern[c * hw + y * size + x] =
                                rng.random_range(128.0..=255.0f32).round();
                        }
                    }
                }
            }
        }
        Kind::Watermark => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7577);
            let noise: Vec<f32> = (0..hw).map(|_| rng.random::<f32>()).collect();
            // 3×3 box blur gives stroke-like blobs instead of salt-and-pepper.
            let mut smooth = vec![0f32; hw];
            for y in 0..size {
                for x in 0..size {
                    let mut s = 0.0;
                    let mut n = 0.0;
                    for dy in -1i32..=1 {
                        for dx in -1i32..=1 {
                            let (yy, xx) = (y as i32 + dy, x as i32 + dx);
                            if yy >= 0 && xx >= 0 && (yy as usize) < size && (xx as usize) < size {
                                s += noise[yy as usize * size + xx as usize];
                                n += 1.0;
                            }
                        }
                    }
                    smooth[y * size + x] = s / n;
                }
            }
            let mut sorted = smooth.clone();
            sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let threshold = sorted[(hw as f32 * 0.69) as usize];
            for p in 0..hw {
                if smooth[p] > threshold {
                    let v = rng.random_range(32.0..=96.0f32).round();
                    for c in 0..3 {
                        pattern[c * hw + p] = v;
                    }
                }
            }
        }
    }
    Ok(Trigger::Additive {
        keep: None,
        pattern,
    })
}
