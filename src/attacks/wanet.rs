//! WaNet (Nguyen & Tran, 2021; paper Table 10, reference notes §2.11): an imperceptible
//! warping trigger. A k×k field of random offsets (k = 4), normalised by its mean absolute
//! value, is upsampled bicubically (align_corners) to the image size; the warped grid is
//! clamp(identity + s·noise/H, −1, 1) with s = 0.5, grid_rescale 1, and images are
//! resampled bilinearly at it (align_corners), then rounded to 8 bits. Noise mode (the
//! standard setting of the WaNet paper): a further `cross_ratio` (2) × #poisoned images are
//! warped with the grid plus per-image uniform noise in ±1/H and keep their labels.

use std::path::Path;

use anyhow::Result;
use burn::prelude::Device;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Attack, AttackParams, PoisonInputs, PoisonParams, Poisoned, Trigger, TriggerFiles};
use crate::data::ImageSet;
use crate::defences::Settings;
use crate::spec::plan::SpecFiles;

/// WaNet in the registry.
pub struct Wanet;

impl Attack for Wanet {
    fn name(&self) -> &'static str {
        "wanet"
    }
    fn default_settings(&self) -> Value {
        super::defaults::<WanetSettings>()
    }
    fn check(&self, settings: &Value) -> Result<(), String> {
        WanetSettings::checked(settings).map(drop)
    }
    fn params(&self, settings: &Value, _: &mut SpecFiles) -> Result<AttackParams> {
        AttackParams::new(self.name(), &WanetSettings::of(settings)?)
    }
    fn trigger(&self, p: &PoisonParams, size: usize, files: &TriggerFiles) -> Result<Trigger> {
        trigger(p, size, files)
    }
    /// The warp, and noise mode.
    fn poison(
        &self,
        p: &PoisonParams,
        tune: &ImageSet,
        test: &ImageSet,
        _: &TriggerFiles,
    ) -> Result<Poisoned> {
        poisoned(p, tune, test)
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

/// WaNet settings of a spec (`defaults.attacks.wanet`), which are also its step
/// parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WanetSettings {
    pub k: usize,
    pub s: f64,
    pub grid_rescale: f64,
    pub cross_ratio: f64,
}

impl Default for WanetSettings {
    fn default() -> Self {
        Self {
            k: 4,
            s: 0.5,
            grid_rescale: 1.0,
            cross_ratio: 2.0,
        }
    }
}

impl Settings for WanetSettings {
    fn validate(&self) -> Result<(), String> {
        if !(self.s >= 0.0 && self.s.is_finite()) {
            return Err(format!("s: {} must be a non-negative number", self.s));
        }
        if !(self.cross_ratio >= 0.0 && self.cross_ratio.is_finite()) {
            return Err(format!(
                "cross_ratio: {} must be a non-negative number",
                self.cross_ratio
            ));
        }
        if self.k < 2 {
            return Err(format!("k: {} must be at least 2", self.k));
        }
        Ok(())
    }
}

/// The `poison` step of WaNet.
pub fn run(p: &PoisonParams, inputs: &PoisonInputs, out: &Path, _: &Device) -> Result<usize> {
    super::run_poisoning(p, inputs, out, |tune, test| poisoned(p, tune, test))
}

/// WaNet's trigger: the warp with the seed's grid.
pub fn trigger(p: &PoisonParams, size: usize, _: &TriggerFiles) -> Result<Trigger> {
    let w: WanetSettings = p.attack.fields()?;
    Ok(Trigger::Warp {
        grid: w.grid(size, p.seed),
    })
}

/// The warped poisoned sets, with noise mode: cross_ratio × #poisoned further tune images,
/// warped with a noisy grid, keep their labels.
pub fn poisoned(p: &PoisonParams, tune: &ImageSet, test: &ImageSet) -> Result<Poisoned> {
    let w: WanetSettings = p.attack.fields()?;
    let size = tune.size;
    let grid = w.grid(size, p.seed);
    let warp = Trigger::Warp { grid: grid.clone() };
    let mut res = super::poison(p, tune, test, &warp, false);
    let mut rest: Vec<usize> = (0..tune.len())
        .filter(|i| res.indices.binary_search(i).is_err())
        .collect();
    rest.shuffle(&mut ChaCha8Rng::seed_from_u64(p.seed ^ 0x401CE));
    let n = ((w.cross_ratio * res.indices.len() as f64).round() as usize).min(rest.len());
    let mut noise_indices = rest[..n].to_vec();
    noise_indices.sort_unstable();
    for &i in &noise_indices {
        let noisy = Trigger::Warp {
            grid: WanetSettings::noisy(&grid, size, p.seed, i),
        };
        noisy.apply(res.tune.image_mut(i), size);
    }
    res.noise_indices = noise_indices;
    Ok(res)
}

/// PyTorch's cubic convolution kernel (A = −0.75).
fn cubic(x: f64) -> f64 {
    let a = -0.75;
    let x = x.abs();
    if x <= 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

/// Bicubic upsampling (align_corners = true) of a k×k plane to size×size.
fn upsample(plane: &[f64], k: usize, size: usize) -> Vec<f64> {
    let mut out = vec![0.0; size * size];
    let scale = if size > 1 {
        (k - 1) as f64 / (size - 1) as f64
    } else {
        0.0
    };
    let at = |y: i64, x: i64| {
        plane[y.clamp(0, k as i64 - 1) as usize * k + x.clamp(0, k as i64 - 1) as usize]
    };
    for y in 0..size {
        let sy = y as f64 * scale;
        let (y0, ty) = (sy.floor() as i64, sy - sy.floor());
        for x in 0..size {
            let sx = x as f64 * scale;
            let (x0, tx) = (sx.floor() as i64, sx - sx.floor());
            let mut v = 0.0;
            for m in -1..=2 {
                for n in -1..=2 {
                    v += at(y0 + m, x0 + n) * cubic(m as f64 - ty) * cubic(n as f64 - tx);
                }
            }
            out[y * size + x] = v;
        }
    }
    out
}

impl WanetSettings {
    /// The warping grid (x, y per pixel, in [−1, 1]); noise mode adds per-image noise to it
    /// with [`WanetSettings::noisy`].
    pub fn grid(&self, size: usize, seed: u64) -> Vec<[f32; 2]> {
        let k = self.k.max(2);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x3A7E7);
        let ins: Vec<f64> = (0..2 * k * k)
            .map(|_| rng.random::<f64>() * 2.0 - 1.0)
            .collect();
        let mean_abs = ins.iter().map(|v| v.abs()).sum::<f64>() / ins.len() as f64;
        let planes: Vec<Vec<f64>> = (0..2)
            .map(|c| {
                upsample(
                    &ins[c * k * k..(c + 1) * k * k]
                        .iter()
                        .map(|v| v / mean_abs)
                        .collect::<Vec<_>>(),
                    k,
                    size,
                )
            })
            .collect();
        let lin = |i: usize| {
            if size > 1 {
                -1.0 + 2.0 * i as f64 / (size - 1) as f64
            } else {
                0.0
            }
        };
        let mut grid = vec![[0f32; 2]; size * size];
        for y in 0..size {
            for x in 0..size {
                let p = y * size + x;
                let gx = (lin(x) + self.s * planes[0][p] / size as f64) * self.grid_rescale;
                let gy = (lin(y) + self.s * planes[1][p] / size as f64) * self.grid_rescale;
                grid[p] = [gx.clamp(-1.0, 1.0) as f32, gy.clamp(-1.0, 1.0) as f32];
            }
        }
        grid
    }

    /// The noise-mode grid of one image: the warp plus uniform noise in ±1/H.
    pub fn noisy(grid: &[[f32; 2]], size: usize, seed: u64, index: usize) -> Vec<[f32; 2]> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x401CE ^ ((index as u64) << 20));
        grid.iter()
            .map(|g| {
                let nx = (rng.random::<f32>() * 2.0 - 1.0) / size as f32;
                let ny = (rng.random::<f32>() * 2.0 - 1.0) / size as f32;
                [(g[0] + nx).clamp(-1.0, 1.0), (g[1] + ny).clamp(-1.0, 1.0)]
            })
            .collect()
    }
}

/// Bilinear resampling (align_corners) of a CHW u8 image at `grid`, in place.
pub fn warp(img: &mut [u8], size: usize, grid: &[[f32; 2]]) {
    let hw = size * size;
    let src: Vec<f32> = img.iter().map(|&v| v as f32).collect();
    let m = (size - 1) as f32;
    for (p, g) in grid.iter().enumerate() {
        let sx = (g[0] + 1.0) / 2.0 * m;
        let sy = (g[1] + 1.0) / 2.0 * m;
        let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(size - 1), (y0 + 1).min(size - 1));
        let (fx, fy) = (sx - x0 as f32, sy - y0 as f32);
        for c in 0..3 {
            let at = |y: usize, x: usize| src[c * hw + y * size + x];
            let v = (at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx) * (1.0 - fy)
                + (at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx) * fy;
            img[c * hw + p] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_grid_keeps_the_image() {
        let w = WanetSettings {
            s: 0.0,
            ..Default::default()
        };
        let grid = w.grid(16, 1);
        let mut img: Vec<u8> = (0..3 * 256).map(|i| (i * 7 % 256) as u8).collect();
        let orig = img.clone();
        warp(&mut img, 16, &grid);
        assert_eq!(img, orig);
    }

    #[test]
    fn bicubic_upsampling_hits_the_corners() {
        let plane = [1.0, 2.0, 3.0, 4.0];
        let up = upsample(&plane, 2, 5);
        assert!((up[0] - 1.0).abs() < 1e-12 && (up[4] - 2.0).abs() < 1e-12);
        assert!((up[20] - 3.0).abs() < 1e-12 && (up[24] - 4.0).abs() < 1e-12);
    }
}
