//! BadNets (Gu et al., 2019; paper Section 4, Appendix A.1, reference notes §2.1–2.2).
//!
//! - **BadNets-white**: a white square in the lower-right corner replaces the pixels under
//!   it (BackdoorBox weight 1): 3×3 at 32×32 (rows/cols 29–31), 6×6 at 64×64; in general its
//!   side is `round(size_frac · image_size)` with `size_frac = 3/32`.
//! - **BadNets-pattern**: the 3×3 grid pattern
//!   `[[0,0,255],[0,255,0],[255,0,255]]` (same value in every channel) in the lower-right
//!   corner, weight 1; at other sizes the grid is scaled by nearest neighbour to a square of
//!   side `round(size_frac · image_size)`.

use std::path::Path;

use anyhow::Result;
use burn::prelude::Device;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Attack, AttackParams, PoisonInputs, PoisonParams, Trigger, TriggerFiles};
use crate::defences::Settings;
use crate::spec::plan::SpecFiles;

/// A BadNets attack in the registry: [`WHITE`] or [`PATTERN`].
pub struct Badnets {
    name: &'static str,
}

/// BadNets-white: the white square.
pub const WHITE: Badnets = Badnets {
    name: "badnets-white",
};

/// BadNets-pattern: the 3×3 grid pattern.
pub const PATTERN: Badnets = Badnets {
    name: "badnets-pattern",
};

impl Attack for Badnets {
    fn name(&self) -> &'static str {
        self.name
    }
    fn default_settings(&self) -> Value {
        super::defaults::<BadnetsSettings>()
    }
    fn check(&self, settings: &Value) -> Result<(), String> {
        BadnetsSettings::checked(settings).map(drop)
    }
    fn params(&self, settings: &Value, _: &mut SpecFiles) -> Result<AttackParams> {
        AttackParams::new(self.name, &BadnetsSettings::of(settings)?)
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

/// Settings of either BadNets attack (`defaults.attacks.badnets-white`,
/// `defaults.attacks.badnets-pattern`), which are also its step parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BadnetsSettings {
    /// Side of the square as a fraction of the image side.
    pub size_frac: f64,
}

impl Default for BadnetsSettings {
    fn default() -> Self {
        Self {
            size_frac: 3.0 / 32.0,
        }
    }
}

impl Settings for BadnetsSettings {
    fn validate(&self) -> Result<(), String> {
        if !(self.size_frac > 0.0 && self.size_frac <= 0.5) {
            return Err(format!("size_frac: {} is not in (0, 0.5]", self.size_frac));
        }
        Ok(())
    }
}

/// The `poison` step of either BadNets attack.
pub fn run(p: &PoisonParams, inputs: &PoisonInputs, out: &Path, _: &Device) -> Result<usize> {
    super::run_poison_step(p, inputs, out, false, trigger)
}

/// The trigger of the step's BadNets attack (white square or grid pattern).
pub fn trigger(p: &PoisonParams, size: usize, _: &TriggerFiles) -> Result<Trigger> {
    let s: BadnetsSettings = p.attack.fields()?;
    Ok(match p.attack.name() {
        "badnets-pattern" => pattern(&s, size),
        _ => white(&s, size),
    })
}

fn side(size_frac: f64, image_size: usize) -> usize {
    ((size_frac * image_size as f64).round() as usize).clamp(1, image_size)
}

/// A weight-1 patch in the lower-right corner with cell values from `value(r, c)`.
fn corner(size: usize, side: usize, value: impl Fn(usize, usize) -> u8) -> Trigger {
    let hw = size * size;
    let mut weight = vec![0f32; hw];
    let mut pattern = vec![0u8; 3 * hw];
    for r in 0..side {
        for c in 0..side {
            let p = (size - side + r) * size + (size - side + c);
            weight[p] = 1.0;
            for ch in 0..3 {
                pattern[ch * hw + p] = value(r, c);
            }
        }
    }
    Trigger::Blend { weight, pattern }
}

/// The white square's side at an image size.
pub fn white_side(s: &BadnetsSettings, image_size: usize) -> usize {
    side(s.size_frac, image_size)
}

/// BadNets-white: a white square in the lower-right corner.
pub fn white(s: &BadnetsSettings, size: usize) -> Trigger {
    corner(size, white_side(s, size), |_, _| 255)
}

pub const GRID: [[u8; 3]; 3] = [[0, 0, 255], [0, 255, 0], [255, 0, 255]];

/// BadNets-pattern: the 3×3 grid pattern, scaled, in the lower-right corner.
pub fn pattern(s: &BadnetsSettings, size: usize) -> Trigger {
    let side = side(s.size_frac, size);
    corner(size, side, |r, c| GRID[r * 3 / side][c * 3 / side])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn square_sizes_match_reference() {
        let b = BadnetsSettings::default();
        assert_eq!(white_side(&b, 32), 3);
        assert_eq!(white_side(&b, 64), 6);
        assert_eq!(white_side(&b, 224), 21);
    }

    #[test]
    fn only_the_corner_changes() {
        let mut img = vec![10u8; 3 * 32 * 32];
        white(&BadnetsSettings::default(), 32).apply(&mut img, 32);
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let v = img[c * 1024 + y * 32 + x];
                    let corner = y >= 29 && x >= 29;
                    assert_eq!(v, if corner { 255 } else { 10 }, "c{c} y{y} x{x}");
                }
            }
        }
    }

    #[test]
    fn pattern_matches_reference_grid_at_32() {
        let mut img = vec![77u8; 3 * 32 * 32];
        pattern(&BadnetsSettings::default(), 32).apply(&mut img, 32);
        for (r, row) in GRID.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                for ch in 0..3 {
                    assert_eq!(img[ch * 1024 + (29 + r) * 32 + 29 + c], *v);
                }
            }
        }
        assert_eq!(img[28 * 32 + 28], 77);
    }
}
