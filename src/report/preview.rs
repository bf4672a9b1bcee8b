//! The attack preview figure (paper Figures 4/5): for every attack, a clean test image, its
//! poisoned version and the amplified difference, labelled, as one PNG.

use std::path::Path;

use anyhow::{Result, bail};
use font8x8::legacy::BASIC_LEGACY;
use image::{Rgb, RgbImage};

use crate::attacks::{AttackParams, PoisonParams, TriggerFiles, build};
use crate::spec::AttackDefaults;

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
            trigger_digest: None,
        },
        "smooth" => AttackParams::Smooth {
            max: a.smooth.max,
            trigger_digest: None,
        },
        "sig" => AttackParams::Sig(a.sig),
        "batt" => AttackParams::Batt(a.batt),
        "wanet" => AttackParams::Wanet(a.wanet),
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

/// Draws the grid for `attacks` on one clean image and writes it to `out`.
pub fn write_preview(
    clean: &[u8],
    size: usize,
    attacks: &[String],
    target: usize,
    out: &Path,
) -> Result<()> {
    let rows = attacks.len() as u32;
    let width = LABEL_W + 3 * (CELL + 8);
    let height = HEADER_H + rows * (CELL + 8);
    let mut canvas = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let black = Rgb([0, 0, 0]);
    for (i, h) in ["clean", "poisoned", "|diff| (max)"].iter().enumerate() {
        text(&mut canvas, LABEL_W + i as u32 * (CELL + 8), 4, h, black);
    }
    for (r, name) in attacks.iter().enumerate() {
        let p = PoisonParams {
            attack: default_attack(name)?,
            poison_rate: 0.1,
            target,
            seed: 0,
        };
        let trigger = build(&p, size, &TriggerFiles::default())?;
        let mut poisoned = clean.to_vec();
        trigger.apply(&mut poisoned, size);
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
    canvas
        .save(out)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))
}
