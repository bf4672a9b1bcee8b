//! A procedurally generated 10-class dataset: the zero-data default and the test fixture.
//!
//! Every image shows one large shape (disk, square, triangle, diamond, bar, ring, plus,
//! cross, corner, two dots) at a random position, size and tilt over a random two-colour
//! gradient, cluttered with strokes and small shapes of the other classes, under pixel
//! noise. The class is the large shape's outline only: its fill (solid, stripes or checks
//! at a random angle and period, in two colours) is drawn independently of the class, so no
//! local texture tells the class, and the clutter puts every outline's edges where the class
//! is not. A deep ViT learns the classes (the cpu scale's 30-epoch checkpoint: 94% test
//! accuracy); a one-block f_p tuned with LGA, as the paper tunes it on GTSRB, stays unsure
//! of almost every clean image (at 0.95 it is sure of 0.2% and 0.5% of the clean
//! BadNets-white and Blended finetuning images) — the premise of IEU's gate. With
//! class-specific textures (stripes, checks) as classes, the one-block f_p was sure of 30%
//! of the clean images and IEU unlearned most of the data (README, "What the default
//! shows"). Each image is a pure function of (seed, split, index), so the dataset is
//! identical wherever it is generated.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{ImageSet, RawSplits};

pub const CLASSES: [&str; 10] = [
    "disk", "square", "triangle", "diamond", "bar", "ring", "plus", "cross", "corner", "twodots",
];

/// The samples of the `dataset` step (the root of its code identity, `dataset/synthetic`):
/// `pretrain + tune` training images and `test` test images.
pub fn source(p: &super::DatasetParams) -> super::Source {
    super::Source::Memory(generate(p.seed, p.pretrain + p.tune, p.test, p.image_size))
}

pub fn generate(seed: u64, train: usize, test: usize, size: usize) -> RawSplits {
    let mut tr = ImageSet::new(size);
    for i in 0..train {
        let (img, label) = render(seed, 0, i as u64, size);
        tr.push(&img, label);
    }
    let mut te = ImageSet::new(size);
    for i in 0..test {
        let (img, label) = render(seed, 1, i as u64, size);
        te.push(&img, label);
    }
    RawSplits {
        train: tr,
        test: te,
        classes: CLASSES.iter().map(|s| s.to_string()).collect(),
        mean: [0.5, 0.5, 0.5],
        std: [0.25, 0.25, 0.25],
    }
}

/// Whether (dx, dy), relative to a shape's centre, is inside `class`'s shape of radius `r`.
fn inside(class: u16, dx: f32, dy: f32, r: f32) -> bool {
    let d = (dx * dx + dy * dy).sqrt();
    let m = dx.abs().max(dy.abs());
    match class {
        0 => d < r,
        1 => m < r * 0.85,
        2 => dy > -r && dy < r && dx.abs() < (dy + r) * 0.5,
        3 => dx.abs() + dy.abs() < r * 1.1,
        4 => dx.abs() < r && dy.abs() < r * 0.45,
        5 => d < r && d > r * 0.35,
        6 => (dx.abs() < r * 0.33 && dy.abs() < r) || (dy.abs() < r * 0.33 && dx.abs() < r),
        7 => m < r && (dx.abs() - dy.abs()).abs() < r * 0.42,
        8 => m < r * 0.9 && (dx < -r * 0.25 || dy > r * 0.25),
        _ => {
            let a = ((dx + r * 0.5).powi(2) + dy * dy).sqrt();
            let b = ((dx - r * 0.5).powi(2) + dy * dy).sqrt();
            a < r * 0.45 || b < r * 0.45
        }
    }
}

/// Clutter drawn under the class shape: a thin stroke, or a small copy of another class's
/// shape, so every class's local texture and edges also appear where it is not the class.
struct Distractor {
    colour: [f32; 3],
    /// A stroke from (x0, y0) to (x1, y1) of half-width `w`, or `shape` of radius `w`
    /// centred at (x0, y0).
    x0: f32,
    y0: f32,
    x1: f32,
    y1: f32,
    w: f32,
    shape: Option<u16>,
}

impl Distractor {
    fn covers(&self, u: f32, v: f32) -> bool {
        match self.shape {
            Some(class) => inside(class, u - self.x0, v - self.y0, self.w),
            None => {
                let (ex, ey) = (self.x1 - self.x0, self.y1 - self.y0);
                let len2 = (ex * ex + ey * ey).max(1e-6);
                let t = (((u - self.x0) * ex + (v - self.y0) * ey) / len2).clamp(0.0, 1.0);
                let (px, py) = (self.x0 + t * ex - u, self.y0 + t * ey - v);
                px * px + py * py < self.w * self.w
            }
        }
    }
}

/// Renders image `index` of `split` (0 train, 1 test): CHW bytes and its label.
///
/// The class is the large shape's outline; its position, size, tilt (±20°), contrast and
/// fill vary, one or two thin strokes and two to four small shapes of other classes clutter
/// the background, and pixel noise of up to 8% covers everything.
pub fn render(seed: u64, split: u64, index: u64, size: usize) -> (Vec<u8>, u16) {
    let mixed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (split << 62)
        ^ index.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let mut rng = ChaCha8Rng::seed_from_u64(mixed);
    let class: u16 = rng.random_range(0..10);
    // A darker shape on a lighter background or the reverse, in random hues; the two ranges
    // overlap, so some shapes stand out little from their background.
    let light_bg = rng.random_bool(0.5);
    let (lo, hi) = if light_bg { (0.45, 0.95) } else { (0.05, 0.55) };
    let bg0: [f32; 3] = std::array::from_fn(|_| rng.random_range(lo..hi));
    let bg1: [f32; 3] = std::array::from_fn(|_| rng.random_range(lo..hi));
    let (flo, fhi) = if light_bg { (0.0, 0.5) } else { (0.5, 1.0) };
    let fg: [f32; 3] = std::array::from_fn(|_| rng.random_range(flo..fhi));
    let angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let (ga, gb) = (angle.cos(), angle.sin());
    let cx: f32 = rng.random_range(0.35..0.65);
    let cy: f32 = rng.random_range(0.35..0.65);
    let r: f32 = rng.random_range(0.19..0.3);
    let tilt: f32 = rng.random_range(-0.35..0.35);
    let (ts, tc) = tilt.sin_cos();
    let strokes = rng.random_range(1..=2);
    let shapes = rng.random_range(2..=4);
    let distractors: Vec<Distractor> = (0..strokes + shapes)
        .map(|i| {
            let colour: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.0..1.0));
            let shape = (i >= strokes).then(|| (class + rng.random_range(1..10)) % 10);
            Distractor {
                colour,
                x0: rng.random_range(0.0..1.0),
                y0: rng.random_range(0.0..1.0),
                x1: rng.random_range(0.0..1.0),
                y1: rng.random_range(0.0..1.0),
                w: match shape {
                    None => rng.random_range(0.015..0.06),
                    Some(_) => rng.random_range(0.08..0.14),
                },
                shape,
            }
        })
        .collect();
    let noise: f32 = rng.random_range(0.02..0.08);
    // The shape's fill, independent of the class: solid, stripes or checks (0, 1, 2) of
    // `fg` and `fg2`, at angle `phi`, with a period of 2 to 4 pixels at 32x32.
    let fill: u32 = rng.random_range(0..3);
    let fg2: [f32; 3] = std::array::from_fn(|_| rng.random_range(flo..fhi));
    let phi: f32 = rng.random_range(0.0..std::f32::consts::PI);
    let period: f32 = rng.random_range(2.0..4.0) / 32.0;
    let (fs, fc) = phi.sin_cos();
    let hw = size * size;
    let mut out = vec![0u8; 3 * hw];
    for y in 0..size {
        for x in 0..size {
            let u = (x as f32 + 0.5) / size as f32;
            let v = (y as f32 + 0.5) / size as f32;
            let t = ((u - 0.5) * ga + (v - 0.5) * gb + 0.71) / 1.42;
            let (dx, dy) = (u - cx, v - cy);
            let on = inside(class, dx * tc + dy * ts, dy * tc - dx * ts, r);
            let clutter = distractors.iter().rev().find(|d| d.covers(u, v));
            for c in 0..3 {
                let base = match (on, clutter) {
                    (true, _) if fill == 0 => fg[c],
                    (true, _) => {
                        let a = ((u * fc + v * fs) / period).floor() as i64;
                        let b = ((v * fc - u * fs) / period).floor() as i64;
                        let odd = if fill == 1 { a } else { a + b }.rem_euclid(2) == 1;
                        if odd { fg2[c] } else { fg[c] }
                    }
                    (false, Some(d)) => d.colour[c],
                    (false, None) => bg0[c] * (1.0 - t) + bg1[c] * t,
                };
                let val = base + noise * (rng.random::<f32>() * 2.0 - 1.0);
                out[c * hw + y * size + x] = (val.clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
    }
    (out, class)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_all_classes_present() {
        let a = generate(3, 200, 50, 16);
        let b = generate(3, 200, 50, 16);
        assert_eq!(a.train, b.train);
        assert_ne!(a.train.images, generate(4, 200, 50, 16).train.images);
        for c in 0..10u16 {
            assert!(a.train.labels.contains(&c), "class {c} missing");
        }
    }

    #[test]
    fn classes_differ_in_shape_not_only_noise() {
        // The mean image of two classes must differ clearly in the central region.
        let s = generate(0, 2000, 0, 16);
        let mean = |cls: u16| {
            let idx: Vec<usize> = (0..s.train.len())
                .filter(|&i| s.train.labels[i] == cls)
                .collect();
            let mut m = vec![0f32; 16 * 16];
            for &i in &idx {
                let img = s.train.image(i);
                // Foreground proxy: distance from the image mean.
                let avg: f32 = img.iter().map(|&v| v as f32).sum::<f32>() / img.len() as f32;
                for p in 0..256 {
                    m[p] += ((img[p] as f32) - avg).abs() / idx.len() as f32;
                }
            }
            m
        };
        let (a, b) = (mean(0), mean(5)); // disk vs ring: the ring's centre is background
        let centre = 7 * 16 + 7;
        assert!(
            (a[centre] - b[centre]).abs() > 1.0,
            "{} vs {}",
            a[centre],
            b[centre]
        );
    }
}
