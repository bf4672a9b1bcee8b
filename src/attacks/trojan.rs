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
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Trigger;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Square,
    Watermark,
}

pub fn trigger(kind: Kind, size: usize, seed: u64, file: Option<&Path>) -> Result<Trigger> {
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
