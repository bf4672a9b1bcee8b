//! SIG (Barni et al., 2019; paper Section 4 and Appendix A.1, reference notes §2.9): a
//! clean-label attack. Every training image of the target class (100%, as the paper) is
//! blended with a horizontal sinusoid, labels unchanged; at test time every non-target
//! image gets the signal. The pattern is 127.5·(1 + sin(2π·j·f/W)) in every channel,
//! blended with weight `alpha` (0.2, the reference mechanics), i.e. a signal of amplitude
//! ≈ 25 gray levels (Barni et al.'s Δ = 20) with f = 6 cycles per image width.

use serde::{Deserialize, Serialize};

use super::Trigger;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Sig {
    pub alpha: f64,
    pub freq: f64,
}

impl Default for Sig {
    fn default() -> Self {
        Self {
            alpha: 0.2,
            freq: 6.0,
        }
    }
}

impl Sig {
    pub fn trigger(&self, size: usize) -> Trigger {
        let hw = size * size;
        let mut pattern = vec![0u8; 3 * hw];
        for y in 0..size {
            for x in 0..size {
                let v = 127.5
                    * (1.0 + (std::f64::consts::TAU * x as f64 * self.freq / size as f64).sin());
                for c in 0..3 {
                    pattern[c * hw + y * size + x] = v.round() as u8;
                }
            }
        }
        Trigger::Blend {
            weight: vec![self.alpha as f32; hw],
            pattern,
        }
    }
}
