//! l2-inv (Li et al., 2021a; paper Section 4, reference notes §2.6): an invisible additive
//! trigger with a small l2 norm, x' = clip(x + T, 0, 255).
//!
//! Generated: |N(0,1)| noise from the seed, scaled so that ‖T‖₂ = `l2_norm` in [0,1] pixel
//! units at 32×32 (default 3.0, close to the published trigger's norm), and by
//! √(pixels/1024) at other sizes so the per-pixel strength stays the same; clipping can only
//! shrink the change, so ‖x' − x‖₂ ≤ that budget. `trigger_file:` takes the published PNG.

use std::path::Path;

use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::Trigger;

/// The l2 budget (in [0,1] pixel units) at an image size.
pub fn budget(l2_norm: f64, size: usize) -> f64 {
    l2_norm * ((size * size) as f64 / 1024.0).sqrt()
}

pub fn trigger(size: usize, l2_norm: f64, seed: u64, file: Option<&Path>) -> Result<Trigger> {
    if let Some(path) = file {
        let img = super::read_image(path, size)?;
        return Ok(Trigger::Additive {
            keep: None,
            pattern: img.iter().map(|&v| v as f32).collect(),
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x1212);
    let raw: Vec<f32> = (0..3 * size * size)
        .map(|_| crate::data::augment::gaussian(&mut rng).abs())
        .collect();
    let norm = raw.iter().map(|v| v * v).sum::<f32>().sqrt();
    let scale = (budget(l2_norm, size) as f32 * 255.0) / norm;
    // Round down so that the stored 8-bit change never exceeds the budget.
    let pattern = raw.iter().map(|v| (v * scale).floor()).collect();
    Ok(Trigger::Additive {
        keep: None,
        pattern,
    })
}
