//! The attack preview figure (paper Figures 4/5): for every attack, a clean test image, its
//! poisoned version and the amplified difference, labelled, as one PNG.
//!
//! ISSBA and CAT have no fixed trigger: their rows need a trained encoder and a tuned f_p.
//! The preview trains throwaway ones in-process, in seconds, on a pool of 320 images of
//! the previewed dataset at the scale's image size (not the experiment's store steps, which
//! at the cpu scale would mean the 20-minute pretraining for f_p): the StegaStamp pair with
//! the scale's `stegastamp` settings on that pool, and for CAT a fresh one-block ViT of the
//! scale's width tuned for 3 epochs on the pool poisoned by CAT's default base attack
//! (badnets-white), then PGD with the paper's settings on the previewed image.

use std::path::Path;

use anyhow::{Result, bail};
use font8x8::legacy::BASIC_LEGACY;
use image::{Rgb, RgbImage};

use crate::attacks::{AttackParams, PoisonParams, TriggerFiles, build};
use crate::data::{DatasetMeta, ImageSet};
use crate::spec::{AttackDefaults, Scale};

/// Default parameters of an attack by name (generated triggers).
pub fn default_attack(name: &str) -> Result<AttackParams> {
    let a = AttackDefaults::default();
    Ok(match name {
        "badnets-white" => AttackParams::BadnetsWhite(a.badnets_white),
        "badnets-pattern" => AttackParams::BadnetsPattern(a.badnets_pattern),
        "blended" => AttackParams::Blended {
            alpha: a.blended.alpha,
            trigger_digest: None,
        },
        "trojan-sq" => AttackParams::TrojanSq {
            trigger_digest: None,
        },
        "trojan-wm" => AttackParams::TrojanWm {
            trigger_digest: None,
        },
        "l0-inv" => AttackParams::L0Inv {
            pixels: a.l0_inv.pixels,
            trigger_digest: None,
            mask_digest: None,
        },
        "l2-inv" => AttackParams::L2Inv {
            l2_norm: a.l2_inv.l2_norm,
            recipe: a.l2_inv.recipe,
            trigger_digest: None,
        },
        "smooth" => AttackParams::Smooth {
            max: a.smooth.max,
            trigger_digest: None,
        },
        "sig" => AttackParams::Sig(a.sig),
        "batt" => AttackParams::Batt(a.batt),
        "wanet" => AttackParams::Wanet(a.wanet),
        "issba" => AttackParams::Issba(a.issba),
        "cat" => AttackParams::Cat(a.cat),
        other => bail!("not implemented yet: attack {other}"),
    })
}

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

/// Makes the poisoned version of the previewed image for each attack; trains the
/// throwaway encoder and f_p that ISSBA and CAT need on first use.
pub struct Poisoner<'a> {
    /// Clean images of the previewed dataset at the scale's size (training pool).
    pub pool: &'a ImageSet,
    pub meta: &'a DatasetMeta,
    pub scale: &'a Scale,
    pub target: usize,
    stega: Option<(
        crate::attacks::issba::StegaStamp,
        crate::attacks::issba::StegaParams,
    )>,
    cat: Option<crate::attacks::cat::Attacker>,
}

impl<'a> Poisoner<'a> {
    pub fn new(pool: &'a ImageSet, meta: &'a DatasetMeta, scale: &'a Scale, target: usize) -> Self {
        Self {
            pool,
            meta,
            scale,
            target,
            stega: None,
            cat: None,
        }
    }

    fn params(&self, attack: AttackParams) -> PoisonParams {
        PoisonParams {
            attack,
            poison_rate: 0.1,
            target: self.target,
            seed: 0,
        }
    }

    /// The poisoned version of `clean` under `name`.
    pub fn poisoned(&mut self, name: &str, clean: &[u8]) -> Result<Vec<u8>> {
        let size = self.pool.size;
        let device = crate::default_device();
        let mut one = ImageSet::new(size);
        one.push(clean, 0);
        match default_attack(name)? {
            AttackParams::Issba(a) => {
                if self.stega.is_none() {
                    let sp = crate::attacks::issba::StegaParams::new(&a, self.scale, 0);
                    let (m, _) = crate::attacks::issba::train(&sp, self.pool, &device)?;
                    self.stega = Some((m, sp));
                }
                let (m, sp) = self.stega.as_ref().unwrap();
                let bits = crate::attacks::issba::secret(sp.secret_len, sp.seed);
                Ok(crate::attacks::issba::encode(m, sp, &one, &[0], &bits, &device).remove(0))
            }
            AttackParams::Cat(c) => {
                let base = self.params(default_attack(&c.base)?);
                let trigger = build(&base, size, &TriggerFiles::default())?;
                if self.cat.is_none() {
                    self.cat = Some(self.tune_fp(&base, &trigger, &c)?);
                }
                let mut x = clean.to_vec();
                trigger.apply(&mut x, size);
                let mut b = ImageSet::new(size);
                b.push(&x, self.target as u16);
                let base_set = crate::attacks::Poisoned {
                    tune: b,
                    indices: vec![0],
                    noise_indices: Vec::new(),
                    test: ImageSet::new(size),
                };
                let (r, _) =
                    crate::attacks::cat::perturb(self.cat.as_ref().unwrap(), &c, &base_set)?;
                Ok(r.tune.image(0).to_vec())
            }
            attack => {
                let trigger = build(&self.params(attack), size, &TriggerFiles::default())?;
                let mut x = clean.to_vec();
                trigger.apply(&mut x, size);
                Ok(x)
            }
        }
    }

    fn tune_fp(
        &self,
        base: &PoisonParams,
        trigger: &crate::attacks::Trigger,
        c: &crate::attacks::cat::Cat,
    ) -> Result<crate::attacks::cat::Attacker> {
        let ad = crate::default_device().autodiff();
        let poisoned =
            crate::attacks::poison(base, self.pool, &ImageSet::new(self.pool.size), trigger);
        let m = &self.scale.model;
        let cfg = crate::models::VitConfig {
            image_size: self.pool.size,
            patch_size: m.patch_size,
            dim: m.dim,
            depth: 1,
            heads: m.heads,
            mlp_ratio: m.mlp_ratio,
            num_classes: self.meta.num_classes(),
        };
        let epochs = 3;
        let iters = crate::train::iters_per_epoch(poisoned.tune.len(), 32) * epochs;
        let sup = crate::train::Supervised {
            label: "preview f_p",
            epochs,
            batch_size: 32,
            views: &[crate::train::View::NoAug],
            lr: vec![1e-3; iters],
            wd: vec![0.0; iters],
            seed: 0,
            keep_last: false,
        };
        let fp = crate::models::Vit::new(&cfg, 0, &ad);
        let (fp, _) = crate::train::train_supervised(
            fp,
            &poisoned.tune,
            self.meta,
            &sup,
            crate::train::LossKind::Ce,
            &ad,
        )?;
        Ok(crate::attacks::cat::Attacker::new(
            fp,
            &poisoned.tune,
            &poisoned.indices,
            self.meta,
            self.target,
            c.gamma,
        ))
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
        let all: Vec<String> = crate::spec::ATTACKS
            .iter()
            .filter(|(_, a)| *a == crate::spec::Availability::Implemented)
            .map(|(n, _)| n.to_string())
            .collect();
        let missing: Vec<&str> = crate::spec::ATTACKS
            .iter()
            .filter(|(_, a)| *a != crate::spec::Availability::Implemented)
            .map(|(n, _)| *n)
            .collect();
        if !missing.is_empty() {
            eprintln!(
                "note: not implemented yet, not drawn: {}",
                missing.join(", ")
            );
        }
        all
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
