//! Smooth (Zeng et al., 2021a; paper Section 4, reference notes §2.7): a smooth,
//! low-frequency universal additive trigger, x' = clip(x + T, 0, 255), with T in
//! [0, `max`·255] (the published CIFAR-10 trigger has max 0.2).
//!
//! Generated: a sum of random low-frequency 2-D cosines per channel (spatial frequencies of
//! at most 3 cycles per image), rescaled to [0, max·255]. `trigger_file:` takes the
//! published `.npy` (float32, shape (1,H,W,3), values in [0,1]), resized bilinearly.

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

/// Smooth in the registry.
pub struct Smooth;

impl Attack for Smooth {
    fn name(&self) -> &'static str {
        "smooth"
    }
    fn default_settings(&self) -> Value {
        super::defaults::<SmoothSettings>()
    }
    fn check(&self, settings: &Value) -> Result<(), String> {
        SmoothSettings::checked(settings).map(drop)
    }
    fn params(&self, settings: &Value, files: &mut SpecFiles) -> Result<AttackParams> {
        let s = SmoothSettings::of(settings)?;
        let p = SmoothParams {
            max: s.max,
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

/// Smooth settings of a spec (`defaults.attacks.smooth`); `trigger_file` is relative to
/// the spec file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmoothSettings {
    pub max: f64,
    pub trigger_file: Option<String>,
}

impl Default for SmoothSettings {
    fn default() -> Self {
        Self {
            max: 0.2,
            trigger_file: None,
        }
    }
}

impl Settings for SmoothSettings {
    fn validate(&self) -> Result<(), String> {
        if !(self.max > 0.0 && self.max <= 1.0) {
            return Err(format!("max: {} is not in (0, 1]", self.max));
        }
        Ok(())
    }
}

/// Parameters of Smooth's `poison` step: the trigger file enters as its content digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmoothParams {
    pub max: f64,
    pub trigger_digest: Option<String>,
}

/// The `poison` step of Smooth.
pub fn run(p: &PoisonParams, inputs: &PoisonInputs, out: &Path, _: &Device) -> Result<usize> {
    super::run_poison_step(p, inputs, out, false, trigger)
}

/// Smooth's trigger from the step's parameters and file.
pub fn trigger(p: &PoisonParams, size: usize, files: &TriggerFiles) -> Result<Trigger> {
    let sp: SmoothParams = p.attack.fields()?;
    generate(size, sp.max, p.seed, files.trigger_if(&sp.trigger_digest)?)
}

/// The trigger with values in [0, max·255]: the file's, or generated from the seed.
pub fn generate(size: usize, max: f64, seed: u64, file: Option<&Path>) -> Result<Trigger> {
    let hw = size * size;
    let chw: Vec<f32> = match file {
        Some(path) => {
            let (shape, data) = super::read_npy(path)?;
            if shape.len() != 4 || shape[0] != 1 || shape[3] != 3 || shape[1] != shape[2] {
                bail!(
                    "smooth trigger_file {}: expected shape (1, H, H, 3), got {shape:?}",
                    path.display()
                );
            }
            let from = shape[1];
            let mut chw = vec![0f32; 3 * from * from];
            for p in 0..from * from {
                for c in 0..3 {
                    chw[c * from * from + p] = data[p * 3 + c] * 255.0;
                }
            }
            super::resize_f32(&chw, from, size)
                .into_iter()
                .map(|v| v.clamp(0.0, 255.0))
                .collect()
        }
        None => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5300);
            let mut chw = vec![0f32; 3 * hw];
            for c in 0..3 {
                for _ in 0..6 {
                    let fx = rng.random_range(0.0..3.0f32);
                    let fy = rng.random_range(0.0..3.0f32);
                    let phase = rng.random_range(0.0..std::f32::consts::TAU);
                    let amp = rng.random_range(0.5..1.0f32);
                    for y in 0..size {
                        for x in 0..size {
                            let (u, v) = (x as f32 / size as f32, y as f32 / size as f32);
                            chw[c * hw + y * size + x] +=
                                amp * (std::f32::consts::TAU * (fx * u + fy * v) + phase).cos();
                        }
                    }
                }
            }
            let lo = chw.iter().cloned().fold(f32::INFINITY, f32::min);
            let hi = chw.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let top = (max * 255.0) as f32;
            chw.iter()
                .map(|v| ((v - lo) / (hi - lo) * top).floor())
                .collect()
        }
    };
    Ok(Trigger::Additive {
        keep: None,
        pattern: chw,
    })
}
