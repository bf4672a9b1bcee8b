//! Training views (paper Appendix A.2, after SiT): the unaugmented view, a clean crop
//! (random resized crop, flip, colour jitter, grayscale) and a corrupted crop (the same
//! clean crop with GMML random-patch corruption, drop_perc 0.3, zeros-or-noise blocks).
//! Unlike the reference code, the corruption is seeded, so runs are reproducible.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Normalises a CHW u8 image into `out` (CHW f32).
pub fn normalise(img: &[u8], mean: &[f32; 3], std: &[f32; 3], out: &mut [f32]) {
    let hw = img.len() / 3;
    for c in 0..3 {
        for p in 0..hw {
            out[c * hw + p] = (img[c * hw + p] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
}

fn bilinear(img: &[f32], size: usize, c: usize, y: f32, x: f32) -> f32 {
    let y = y.clamp(0.0, (size - 1) as f32);
    let x = x.clamp(0.0, (size - 1) as f32);
    let (y0, x0) = (y.floor() as usize, x.floor() as usize);
    let (y1, x1) = ((y0 + 1).min(size - 1), (x0 + 1).min(size - 1));
    let (fy, fx) = (y - y0 as f32, x - x0 as f32);
    let at = |yy: usize, xx: usize| img[c * size * size + yy * size + xx];
    (at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx) * (1.0 - fy)
        + (at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx) * fy
}

/// The clean crop: RandomResizedCrop(scale 0.75–1, ratio 3/4–4/3), horizontal flip (p 0.5),
/// colour jitter (p 0.8: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1), grayscale
/// (p 0.2), then normalisation. Input CHW u8, output CHW f32.
pub fn clean_crop(
    img: &[u8],
    size: usize,
    mean: &[f32; 3],
    std: &[f32; 3],
    rng: &mut ChaCha8Rng,
    out: &mut [f32],
) {
    let hw = size * size;
    let src: Vec<f32> = img.iter().map(|&v| v as f32 / 255.0).collect();
    // Random resized crop.
    let area = (hw as f32) * rng.random_range(0.75..1.0f32);
    let log_r: f32 = rng.random_range((0.75f32).ln()..(4.0f32 / 3.0).ln());
    let ratio = log_r.exp();
    let cw = (area * ratio).sqrt().min(size as f32);
    let ch = (area / ratio).sqrt().min(size as f32);
    let x0 = rng.random_range(0.0..=(size as f32 - cw));
    let y0 = rng.random_range(0.0..=(size as f32 - ch));
    let flip = rng.random_bool(0.5);
    let mut px = vec![0f32; 3 * hw];
    for y in 0..size {
        for x in 0..size {
            let xs = if flip { size - 1 - x } else { x };
            let sy = y0 + (y as f32 + 0.5) * ch / size as f32 - 0.5;
            let sx = x0 + (xs as f32 + 0.5) * cw / size as f32 - 0.5;
            for c in 0..3 {
                px[c * hw + y * size + x] = bilinear(&src, size, c, sy, sx);
            }
        }
    }
    if rng.random_bool(0.8) {
        colour_jitter(&mut px, hw, rng);
    }
    if rng.random_bool(0.2) {
        for p in 0..hw {
            let g = 0.299 * px[p] + 0.587 * px[hw + p] + 0.114 * px[2 * hw + p];
            px[p] = g;
            px[hw + p] = g;
            px[2 * hw + p] = g;
        }
    }
    for c in 0..3 {
        for p in 0..hw {
            out[c * hw + p] = (px[c * hw + p] - mean[c]) / std[c];
        }
    }
}

fn colour_jitter(px: &mut [f32], hw: usize, rng: &mut ChaCha8Rng) {
    let b: f32 = rng.random_range(0.6..1.4);
    let k: f32 = rng.random_range(0.6..1.4);
    let s: f32 = rng.random_range(0.8..1.2);
    let h: f32 = rng.random_range(-0.1..0.1) * std::f32::consts::TAU;
    for v in px.iter_mut() {
        *v = (*v * b).clamp(0.0, 1.0);
    }
    let gray_mean: f32 = (0..hw)
        .map(|p| 0.299 * px[p] + 0.587 * px[hw + p] + 0.114 * px[2 * hw + p])
        .sum::<f32>()
        / hw as f32;
    for v in px.iter_mut() {
        *v = ((*v - gray_mean) * k + gray_mean).clamp(0.0, 1.0);
    }
    let (cos, sin) = (h.cos(), h.sin());
    for p in 0..hw {
        let (r, g, bl) = (px[p], px[hw + p], px[2 * hw + p]);
        let gray = 0.299 * r + 0.587 * g + 0.114 * bl;
        // Saturation, then a hue rotation in YIQ space.
        let (r, g, bl) = (
            gray + (r - gray) * s,
            gray + (g - gray) * s,
            gray + (bl - gray) * s,
        );
        let yy = 0.299 * r + 0.587 * g + 0.114 * bl;
        let i = 0.596 * r - 0.274 * g - 0.322 * bl;
        let q = 0.211 * r - 0.523 * g + 0.312 * bl;
        let (i, q) = (i * cos - q * sin, i * sin + q * cos);
        px[p] = (yy + 0.956 * i + 0.621 * q).clamp(0.0, 1.0);
        px[hw + p] = (yy - 0.272 * i - 0.647 * q).clamp(0.0, 1.0);
        px[2 * hw + p] = (yy - 1.106 * i + 1.703 * q).clamp(0.0, 1.0);
    }
}

/// GMML random-patch corruption of a normalised CHW image, in place: blocks of up to 30% of
/// the side are set to zero (the dataset mean) or N(0,1) noise until at least a fraction
/// U(0.05, drop_perc) of the pixels is covered.
pub fn corrupt(x: &mut [f32], size: usize, drop_perc: f32, rng: &mut ChaCha8Rng) {
    let hw = size * size;
    let target = (rng.random_range(0.05f32.min(drop_perc)..=drop_perc) * hw as f32) as usize;
    let max_block = ((0.3 * size as f32) as usize).max(1);
    let mut mask = vec![false; hw];
    let mut covered = 0usize;
    while covered < target {
        let r = rng.random_range(0..size);
        let c = rng.random_range(0..size);
        let h = rng.random_range(1..=max_block).min(size - r);
        let w = rng.random_range(1..=max_block).min(size - c);
        let noise = rng.random_bool(0.5);
        for y in r..r + h {
            for xx in c..c + w {
                let p = y * size + xx;
                if !mask[p] {
                    mask[p] = true;
                    covered += 1;
                }
                for ch in 0..3 {
                    x[ch * hw + p] = if noise { gaussian(rng) } else { 0.0 };
                }
            }
        }
    }
}

/// Mirrors a CHW image left-right in place.
pub fn hflip(x: &mut [f32], size: usize) {
    for row in x.chunks_mut(size) {
        row.reverse();
    }
}

/// A standard normal sample (Box–Muller).
pub fn gaussian(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn views_are_seeded_and_shaped() {
        let img: Vec<u8> = (0..3 * 16 * 16).map(|i| (i % 251) as u8).collect();
        let m = [0.5; 3];
        let s = [0.25; 3];
        let mut a = vec![0f32; img.len()];
        let mut b = vec![0f32; img.len()];
        clean_crop(&img, 16, &m, &s, &mut ChaCha8Rng::seed_from_u64(1), &mut a);
        clean_crop(&img, 16, &m, &s, &mut ChaCha8Rng::seed_from_u64(1), &mut b);
        assert_eq!(a, b);
        assert!(
            a.iter()
                .all(|v| v.is_finite() && *v >= -2.0 - 1e-4 && *v <= 2.0 + 1e-4)
        );
    }

    #[test]
    fn corruption_covers_between_5_and_about_30_percent_plus_one_block() {
        let size = 32;
        for seed in 0..20 {
            let mut x = vec![7.0f32; 3 * size * size];
            corrupt(&mut x, size, 0.3, &mut ChaCha8Rng::seed_from_u64(seed));
            let changed =
                (0..size * size).filter(|&p| x[p] != 7.0).count() as f32 / (size * size) as f32;
            assert!(changed >= 0.05, "seed {seed}: {changed}");
            // The last block may overshoot the target by at most one 9x9 block.
            assert!(
                changed <= 0.3 + 81.0 / 1024.0 + 1e-6,
                "seed {seed}: {changed}"
            );
        }
    }
}
