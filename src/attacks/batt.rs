//! BATT (Xu et al., 2023b; paper Section 4 and Appendix A.1, reference notes §2.8): a
//! transformation trigger. Poisoned images are rotated by `degrees` (16°) counter-clockwise
//! about the centre, nearest neighbour, no expansion, black corners (PIL's
//! `img.rotate(16)`), and relabelled. As in the paper, the rotation is applied *before*
//! data augmentation: the poisoned set stores rotated images, and training views are drawn
//! from them.

use std::path::Path;

use anyhow::Result;
use burn::prelude::Device;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Attack, AttackParams, PoisonInputs, PoisonParams, Trigger, TriggerFiles};
use crate::defences::Settings;
use crate::spec::plan::SpecFiles;

/// Batt in the registry.
pub struct Batt;

impl Attack for Batt {
    fn name(&self) -> &'static str {
        "batt"
    }
    fn default_settings(&self) -> Value {
        super::defaults::<BattSettings>()
    }
    fn check(&self, settings: &Value) -> Result<(), String> {
        BattSettings::checked(settings).map(drop)
    }
    fn params(&self, settings: &Value, _: &mut SpecFiles) -> Result<AttackParams> {
        AttackParams::new(self.name(), &BattSettings::of(settings)?)
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

/// BATT settings of a spec (`defaults.attacks.batt`), which are also its step parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BattSettings {
    pub degrees: f64,
}

impl Default for BattSettings {
    fn default() -> Self {
        Self { degrees: 16.0 }
    }
}

impl Settings for BattSettings {
    fn validate(&self) -> Result<(), String> {
        if !(self.degrees.is_finite() && self.degrees != 0.0) {
            return Err(format!(
                "degrees: {} must be a non-zero number",
                self.degrees
            ));
        }
        Ok(())
    }
}

/// The `poison` step of BATT.
pub fn run(p: &PoisonParams, inputs: &PoisonInputs, out: &Path, _: &Device) -> Result<usize> {
    super::run_poison_step(p, inputs, out, false, trigger)
}

/// BATT's trigger: the rotation.
pub fn trigger(p: &PoisonParams, _: usize, _: &TriggerFiles) -> Result<Trigger> {
    let s: BattSettings = p.attack.fields()?;
    Ok(Trigger::Rotate { degrees: s.degrees })
}

/// Rotates a CHW u8 image in place.
pub fn rotate(img: &mut [u8], size: usize, degrees: f64) {
    let hw = size * size;
    let src = img.to_vec();
    let (s, c) = degrees.to_radians().sin_cos();
    let centre = size as f64 / 2.0;
    for y in 0..size {
        for x in 0..size {
            let (dx, dy) = (x as f64 + 0.5 - centre, y as f64 + 0.5 - centre);
            // Inverse of a counter-clockwise rotation in image coordinates (y down).
            let sx = (dx * c - dy * s + centre).floor();
            let sy = (dx * s + dy * c + centre).floor();
            let inside = sx >= 0.0 && sy >= 0.0 && (sx as usize) < size && (sy as usize) < size;
            for ch in 0..3 {
                img[ch * hw + y * size + x] = if inside {
                    src[ch * hw + sy as usize * size + sx as usize]
                } else {
                    0
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarter_turn_is_counter_clockwise() {
        // A bright pixel at the right edge, middle row, moves to the top edge.
        let size = 8;
        let mut img = vec![0u8; 3 * 64];
        img[4 * 8 + 7] = 200;
        rotate(&mut img, size, 90.0);
        assert_eq!(img[4 * 8 + 7], 0);
        let top: Vec<usize> = (0..8).filter(|&x| img[x] == 200).collect();
        assert_eq!(top, vec![4]);
    }
}
