//! The attack preview figure (paper Figures 4/5): for every attack, a clean test image, its
//! poisoned version and the amplified difference, labelled, as one PNG. Each row is its
//! attack's [`Attack::preview`](crate::attacks::Attack::preview).
//!
//! ISSBA and CAT have no fixed trigger: their rows need a trained encoder and a tuned f_p.
//! The preview trains throwaway ones in-process, in seconds, on a pool of 320 images of
//! the previewed dataset at the scale's image size (not the experiment's store steps, which
//! at the cpu scale would mean the 20-minute pretraining for f_p): the StegaStamp pair with
//! the scale's `stegastamp` settings on that pool, and for CAT a fresh one-block ViT of the
//! scale's width tuned for 3 epochs on the pool poisoned by CAT's default base attack
//! (badnets-white), then PGD with the paper's settings on the previewed image.

use std::any::Any;
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Result, anyhow, bail};
use font8x8::legacy::BASIC_LEGACY;
use image::{Rgb, RgbImage};

use crate::attacks::{AttackParams, PoisonParams};
use crate::data::{DatasetMeta, ImageSet};
use crate::spec::Scale;

const CELL: u32 = 96;
const LABEL_W: u32 = 8 * 16 + 8;
const HEADER_H: u32 = 16;

fn text(img: &mut RgbImage, x: u32, y: u32, s: &str, colour: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let glyph = BASIC_LEGACY[(ch as usize).min(127)];
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits >> col & 1 == 1 {
                    let (px, py) = (x + i as u32 * 8 + col, y + row as u32);
                    if px < img.width() && py < img.height() {
                        img.put_pixel(px, py, colour);
                    }
                }
            }
        }
    }
}

fn blit(canvas: &mut RgbImage, x0: u32, y0: u32, chw: &[u8], size: usize) {
    let hw = size * size;
    for y in 0..CELL {
        for x in 0..CELL {
            let (sy, sx) = (
                (y as usize * size) / CELL as usize,
                (x as usize * size) / CELL as usize,
            );
            let p = sy * size + sx;
            canvas.put_pixel(x0 + x, y0 + y, Rgb([chw[p], chw[hw + p], chw[2 * hw + p]]));
        }
    }
}

/// What an attack's preview row draws on: clean images of the previewed dataset at the
/// scale's size (a training pool for what ISSBA and CAT need), and the target class.
pub struct Preview<'a> {
    pub pool: &'a ImageSet,
    pub meta: &'a DatasetMeta,
    pub scale: &'a Scale,
    pub target: usize,
}

impl Preview<'_> {
    /// A preview's poison parameters for an attack.
    pub fn params(&self, attack: AttackParams) -> PoisonParams {
        PoisonParams {
            attack,
            poison_rate: 0.1,
            target: self.target,
            seed: 0,
        }
    }
}

/// What attacks' previews train once and reuse for every image (ISSBA's encoder, CAT's
/// f_p), by name.
#[derive(Default)]
pub struct PreviewCache(BTreeMap<&'static str, Box<dyn Any>>);

impl PreviewCache {
    /// The value under `key`, made by `make` on first use.
    pub fn cached<T: Any>(
        &mut self,
        key: &'static str,
        make: impl FnOnce() -> Result<T>,
    ) -> Result<&T> {
        if !self.0.contains_key(key) {
            self.0.insert(key, Box::new(make()?));
        }
        self.0[key]
            .downcast_ref()
            .ok_or_else(|| anyhow!("preview cache: `{key}` holds another type"))
    }
}

/// Makes the poisoned version of the previewed image for each attack (its
/// [`Attack::preview`](crate::attacks::Attack::preview)).
pub struct Poisoner<'a> {
    pub cx: Preview<'a>,
    cache: PreviewCache,
}

impl<'a> Poisoner<'a> {
    pub fn new(pool: &'a ImageSet, meta: &'a DatasetMeta, scale: &'a Scale, target: usize) -> Self {
        Self {
            cx: Preview {
                pool,
                meta,
                scale,
                target,
            },
            cache: PreviewCache::default(),
        }
    }

    /// The poisoned version of `clean` under `name`.
    pub fn poisoned(&mut self, name: &str, clean: &[u8]) -> Result<Vec<u8>> {
        let a = crate::attacks::registered(name)
            .ok_or_else(|| anyhow!("not implemented yet: attack {name}"))?;
        a.preview(&self.cx, &mut self.cache, clean)
    }
}

/// Draws the grid for `attacks` on one clean image and writes it to `out`.
pub fn preview_png(
    clean: &[u8],
    size: usize,
    attacks: &[String],
    poisoner: &mut Poisoner,
) -> Result<Vec<u8>> {
    let rows = attacks.len() as u32;
    let width = LABEL_W + 3 * (CELL + 8);
    let height = HEADER_H + rows * (CELL + 8);
    let mut canvas = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let black = Rgb([0, 0, 0]);
    for (i, h) in ["clean", "poisoned", "|diff| (max)"].iter().enumerate() {
        text(&mut canvas, LABEL_W + i as u32 * (CELL + 8), 4, h, black);
    }
    for (r, name) in attacks.iter().enumerate() {
        let poisoned = poisoner.poisoned(name, clean)?;
        let diff: Vec<i32> = poisoned
            .iter()
            .zip(clean)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .collect();
        let max = diff.iter().cloned().max().unwrap_or(0).max(1);
        let amplified: Vec<u8> = diff.iter().map(|d| (d * 255 / max) as u8).collect();
        let y = HEADER_H + r as u32 * (CELL + 8);
        text(&mut canvas, 4, y + CELL / 2 - 8, name, black);
        text(
            &mut canvas,
            4,
            y + CELL / 2 + 4,
            &format!("max {max}"),
            Rgb([90, 90, 90]),
        );
        for (c, img) in [clean, &poisoned[..], &amplified[..]].iter().enumerate() {
            blit(&mut canvas, LABEL_W + c as u32 * (CELL + 8), y, img, size);
        }
    }
    let mut png = std::io::Cursor::new(Vec::new());
    canvas
        .write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| anyhow::anyhow!("cannot encode the preview: {e}"))?;
    Ok(png.into_inner())
}

/// A rendered trigger grid.
pub struct Rendered {
    pub png: Vec<u8>,
    pub attacks: usize,
    /// Index of the test image drawn on.
    pub image: usize,
}

/// The trigger grid of `attacks` (all implemented ones when empty) on a test image of
/// `dataset` (the paper's Figure 4; CAT rows show base image, CAT image and the amplified
/// perturbation, as Figure 5): the PNG bytes.
pub fn render(
    dataset: &str,
    data_dir: Option<&Path>,
    scale: &crate::spec::Scale,
    attacks: &[String],
    index: usize,
) -> Result<Rendered> {
    let size = scale.image_size;
    // The test images to draw on, and a pool of 320 training images for the
    // throwaway ISSBA encoder and CAT f_p (see src/report/preview.rs).
    let (raw, pool_n) = match dataset {
        "synthetic" => (crate::data::synthetic::generate(0, 320, 200, size), 320),
        "cifar10" => {
            let dir = crate::data::cifar10::find(data_dir)?;
            (crate::data::cifar10::load(&dir)?, 320)
        }
        other => {
            // Other datasets: their test images, which also serve as the pool.
            let test = crate::data::load_test(other, data_dir, size)?;
            let n = test
                .labels
                .iter()
                .map(|&l| l as usize + 1)
                .max()
                .unwrap_or(1);
            let raw = crate::data::RawSplits {
                train: test.clone(),
                test,
                classes: (0..n).map(|c| c.to_string()).collect(),
                mean: crate::data::gtsrb::MEAN,
                std: crate::data::gtsrb::STD,
            };
            (raw, 320)
        }
    };
    let test = crate::data::resize_set(&raw.test, size);
    let pool = crate::data::resize_set(
        &raw.train
            .subset(&(0..pool_n.min(raw.train.len())).collect::<Vec<_>>()),
        size,
    );
    let meta = crate::data::DatasetMeta {
        name: dataset.to_string(),
        classes: raw.classes.clone(),
        image_size: size,
        mean: raw.mean,
        std: raw.std,
        pretrain: 0,
        tune: pool.len(),
        test: test.len(),
    };
    let target = 1;
    let pick = (0..test.len())
        .filter(|&i| test.labels[i] as usize != target)
        .nth(index);
    let Some(i) = pick else {
        bail!("--index {index}: not enough test images")
    };
    let attacks = if attacks.is_empty() {
        crate::attacks::names()
            .into_iter()
            .map(String::from)
            .collect()
    } else {
        attacks.to_vec()
    };
    let mut poisoner = Poisoner::new(&pool, &meta, scale, target);
    let png = preview_png(test.image(i), size, &attacks, &mut poisoner)?;
    Ok(Rendered {
        png,
        attacks: attacks.len(),
        image: i,
    })
}
