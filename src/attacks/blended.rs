//! Blended (Chen et al., 2017; paper Section 4): the whole image is blended with a key
//! pattern, x' = ⌊(1 − α)·x + α·pattern⌋ in 8-bit space (BackdoorBox's truncating cast).
//! The reference implementation blends the Hello Kitty picture with α = 0.4. By default
//! ieu-bench generates the pattern itself: uniform random noise drawn from the attack seed
//! (Chen et al.'s random-noise key); `trigger_file:` takes any image (e.g. hello_kitty.jpeg),
//! resized to the image size, and its content digest enters the step key.

use std::path::Path;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Blended as written in a spec.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BlendedSpec {
    pub alpha: f64,
    /// Image file used as the key pattern (relative to the spec file); generated if absent.
    pub trigger_file: Option<String>,
}

impl Default for BlendedSpec {
    fn default() -> Self {
        Self {
            alpha: 0.4,
            trigger_file: None,
        }
    }
}

/// The key pattern, CHW u8 at the image size.
pub fn pattern(size: usize, seed: u64, file: Option<&Path>) -> Result<Vec<u8>> {
    match file {
        Some(path) => {
            let img = image::open(path)
                .with_context(|| {
                    format!("blended trigger_file {}: cannot read image", path.display())
                })?
                .to_rgb8();
            let img = image::imageops::resize(
                &img,
                size as u32,
                size as u32,
                image::imageops::FilterType::Triangle,
            );
            Ok(crate::data::rgb_to_chw(&img))
        }
        None => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xB1E7D);
            Ok((0..3 * size * size).map(|_| rng.random::<u8>()).collect())
        }
    }
}

pub fn apply(img: &mut [u8], pattern: &[u8], alpha: f64) {
    let a = alpha as f32;
    for (v, &p) in img.iter_mut().zip(pattern) {
        *v = ((1.0 - a) * *v as f32 + a * p as f32) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blend_truncates_like_backdoorbox() {
        let mut img = vec![100u8, 0, 255];
        apply(&mut img, &[201, 255, 0], 0.4);
        // 0.6*100 + 0.4*201 = 140.4 -> 140; 0.4*255 = 102; 0.6*255 = 153
        assert_eq!(img, vec![140, 102, 153]);
    }

    #[test]
    fn generated_pattern_is_seeded() {
        assert_eq!(pattern(8, 1, None).unwrap(), pattern(8, 1, None).unwrap());
        assert_ne!(pattern(8, 1, None).unwrap(), pattern(8, 2, None).unwrap());
    }
}
