//! l0-inv (Li et al., 2021a; paper Section 4, reference notes §2.5): an invisible trigger of
//! few pixels, x' = clip(x·M + T, 0, 255), where M is 0 on the trigger's pixels and 1
//! elsewhere (the published mask marks 9 pixels in the bottom row).
//!
//! Generated: `pixels` positions drawn from the seed (default 9), each set to a random
//! colour; the l0 norm of x' − x is at most `pixels` pixels. `trigger_file:` (PNG) and
//! `mask_file:` (float32 .npy of shape (3,H,W), 1 = trigger pixel) take the published pair.

use std::path::Path;

use anyhow::{Result, bail};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Trigger;

pub fn trigger(
    size: usize,
    pixels: usize,
    seed: u64,
    file: Option<&Path>,
    mask: Option<&Path>,
) -> Result<Trigger> {
    let hw = size * size;
    match (file, mask) {
        (Some(t), Some(m)) => {
            let pattern: Vec<f32> = super::read_image(t, size)?
                .iter()
                .map(|&v| v as f32)
                .collect();
            let (shape, data) = super::read_npy(m)?;
            if shape.len() != 3 || shape[0] != 3 || shape[1] != shape[2] {
                bail!(
                    "l0-inv mask_file {}: expected shape (3, H, H), got {shape:?}",
                    m.display()
                );
            }
            // Nearest resize of the mask so it stays binary.
            let from = shape[1];
            let mut keep = vec![1f32; 3 * hw];
            for c in 0..3 {
                for y in 0..size {
                    for x in 0..size {
                        let v = data[c * from * from + (y * from / size) * from + x * from / size];
                        keep[c * hw + y * size + x] = 1.0 - v;
                    }
                }
            }
            Ok(Trigger::Additive {
                keep: Some(keep),
                pattern,
            })
        }
        (None, None) => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x1010);
            let mut keep = vec![1f32; 3 * hw];
            let mut pattern = vec![0f32; 3 * hw];
            let mut chosen = std::collections::BTreeSet::new();
            while chosen.len() < pixels.min(hw) {
                chosen.insert(rng.random_range(0..hw));
            }
            for p in chosen {
                for c in 0..3 {
                    keep[c * hw + p] = 0.0;
                    pattern[c * hw + p] = rng.random_range(0.0..=255.0f32).round();
                }
            }
            Ok(Trigger::Additive {
                keep: Some(keep),
                pattern,
            })
        }
        _ => bail!("l0-inv needs both trigger_file and mask_file, or neither"),
    }
}
