//! SIG (Barni et al., 2019; paper Section 4 and Appendix A.1, reference notes §2.9): a
//! clean-label attack. Every training image of the target class (100%, as the paper) is
//! blended with a horizontal sinusoid, labels unchanged; at test time every non-target
//! image gets the signal. The pattern is 127.5·(1 + sin(2π·j·f/W)) in every channel,
//! blended with weight `alpha` (0.2, the reference mechanics), i.e. a signal of amplitude
//! ≈ 25 gray levels (Barni et al.'s Δ = 20) with f = 6 cycles per image width.

use std::path::Path;

use anyhow::Result;
use burn::prelude::Device;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Attack, AttackParams, PoisonInputs, PoisonParams, Trigger, TriggerFiles};
use crate::defences::Settings;
use crate::spec::plan::SpecFiles;

/// Sig in the registry.
pub struct Sig;

impl Attack for Sig {
    fn name(&self) -> &'static str {
        "sig"
    }
    fn default_settings(&self) -> Value {
        super::defaults::<SigSettings>()
    }
    fn check(&self, settings: &Value) -> Result<(), String> {
        SigSettings::checked(settings).map(drop)
    }
    /// Every target-class image, labels kept.
    fn clean_label(&self) -> bool {
        true
    }
    fn params(&self, settings: &Value, _: &mut SpecFiles) -> Result<AttackParams> {
        AttackParams::new(self.name(), &SigSettings::of(settings)?)
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

/// SIG settings of a spec (`defaults.attacks.sig`), which are also its step parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SigSettings {
    pub alpha: f64,
    pub freq: f64,
}

impl Default for SigSettings {
    fn default() -> Self {
        Self {
            alpha: 0.2,
            freq: 6.0,
        }
    }
}

impl Settings for SigSettings {
    fn validate(&self) -> Result<(), String> {
        if !(self.alpha > 0.0 && self.alpha <= 1.0) {
            return Err(format!("alpha: {} is not in (0, 1]", self.alpha));
        }
        if !(self.freq > 0.0 && self.freq.is_finite()) {
            return Err(format!("freq: {} must be a positive number", self.freq));
        }
        Ok(())
    }
}

/// The `poison` step of SIG: clean-label, every target-class image.
pub fn run(p: &PoisonParams, inputs: &PoisonInputs, out: &Path, _: &Device) -> Result<usize> {
    super::run_poison_step(p, inputs, out, true, trigger)
}

/// SIG's trigger: the horizontal sinusoid blended with weight α.
pub fn trigger(p: &PoisonParams, size: usize, _: &TriggerFiles) -> Result<Trigger> {
    Ok(signal(&p.attack.fields()?, size))
}

/// The sinusoid 127.5·(1 + sin(2π·j·f/W)) in every channel, blended with weight α.
pub fn signal(s: &SigSettings, size: usize) -> Trigger {
    let hw = size * size;
    let mut pattern = vec![0u8; 3 * hw];
    for y in 0..size {
        for x in 0..size {
            let v = 127.5 * (1.0 + (std::f64::consts::TAU * x as f64 * s.freq / size as f64).sin());
            for c in 0..3 {
                pattern[c * hw + y * size + x] = v.round() as u8;
            }
        }
    }
    Trigger::Blend {
        weight: vec![s.alpha as f32; hw],
        pattern,
    }
}
