//! Invariants every attack must keep.

use std::path::PathBuf;

use super::*;
use crate::data::ImageSet;

fn sets(size: usize) -> (ImageSet, ImageSet) {
    let raw = crate::data::synthetic::generate(0, 400, 100, size);
    (raw.train, raw.test)
}

fn all_attacks() -> Vec<AttackParams> {
    vec![
        AttackParams::BadnetsWhite(Default::default()),
        AttackParams::BadnetsPattern(Default::default()),
        AttackParams::Blended {
            alpha: 0.4,
            trigger_digest: None,
        },
        AttackParams::TrojanSq {
            trigger_digest: None,
        },
        AttackParams::TrojanWm {
            trigger_digest: None,
        },
        AttackParams::L0Inv {
            pixels: 9,
            trigger_digest: None,
            mask_digest: None,
        },
        AttackParams::L2Inv {
            l2_norm: 3.0,
            recipe: invisible_l2::Recipe::Field,
            trigger_digest: None,
        },
        AttackParams::Smooth {
            max: 0.2,
            trigger_digest: None,
        },
        AttackParams::Sig(Default::default()),
        AttackParams::Batt(Default::default()),
        AttackParams::Wanet(Default::default()),
    ]
}

fn params(attack: AttackParams, seed: u64) -> PoisonParams {
    PoisonParams {
        attack,
        poison_rate: 0.1,
        target: 1,
        seed,
    }
}

fn run(p: &PoisonParams, tune: &ImageSet, test: &ImageSet) -> Poisoned {
    let t = build(p, tune.size, &TriggerFiles::default()).unwrap();
    poison(p, tune, test, &t)
}

#[test]
fn counts_labels_and_untouched_images_at_every_size() {
    for size in [16, 32, 64] {
        let (tune, test) = sets(size);
        for attack in all_attacks() {
            let name = attack.name();
            let p = params(attack.clone(), 5);
            let r = run(&p, &tune, &test);
            let clean_label = attack.clean_label();
            if clean_label {
                let target_count = tune.labels.iter().filter(|&&l| l == 1).count();
                assert_eq!(
                    r.indices.len(),
                    target_count,
                    "{name}: SIG poisons 100% of the target class"
                );
                assert_eq!(
                    r.tune.labels, tune.labels,
                    "{name}: clean-label attack changed labels"
                );
            } else {
                let non_target = tune.labels.iter().filter(|&&l| l != 1).count();
                assert_eq!(
                    r.indices.len(),
                    (0.1 * non_target as f64).round() as usize,
                    "{name}"
                );
            }
            for i in 0..tune.len() {
                let poisoned = r.indices.binary_search(&i).is_ok();
                let noised = r.noise_indices.binary_search(&i).is_ok();
                if poisoned {
                    assert_eq!(r.tune.labels[i], 1, "{name}: poisoned label");
                    if !clean_label {
                        assert_ne!(
                            tune.labels[i], 1,
                            "{name}: poisoned image must be non-target"
                        );
                    }
                    assert_ne!(
                        r.tune.image(i),
                        tune.image(i),
                        "{name} @{size}: image {i} not triggered"
                    );
                } else {
                    assert_eq!(
                        r.tune.labels[i], tune.labels[i],
                        "{name}: label of clean image {i}"
                    );
                    if !noised {
                        assert_eq!(
                            r.tune.image(i),
                            tune.image(i),
                            "{name}: clean image {i} changed"
                        );
                    }
                }
            }
            assert!(r.noise_indices.is_empty() || name == "wanet");
            if name == "wanet" {
                assert_eq!(
                    r.noise_indices.len(),
                    2 * r.indices.len(),
                    "WaNet noise mode: cross ratio 2"
                );
            }
            let non_target_test = test.labels.iter().filter(|&&l| l != 1).count();
            assert_eq!(
                r.test.len(),
                non_target_test,
                "{name}: ASR set is the non-target test images"
            );
            assert!(r.test.labels.iter().all(|&l| l == 1));
        }
    }
}

#[test]
fn deterministic_from_the_seed() {
    let (tune, test) = sets(32);
    for attack in all_attacks() {
        let a = run(&params(attack.clone(), 7), &tune, &test);
        let b = run(&params(attack.clone(), 7), &tune, &test);
        assert_eq!(a.tune, b.tune, "{}", attack.name());
        assert_eq!(a.test, b.test, "{}", attack.name());
        if !attack.clean_label() {
            let c = run(&params(attack.clone(), 8), &tune, &test);
            assert_ne!(
                a.indices,
                c.indices,
                "{}: the seed picks the poisoned images",
                attack.name()
            );
        }
    }
}

#[test]
fn additive_triggers_clip_instead_of_wrapping() {
    let (tune, test) = sets(32);
    for attack in all_attacks().into_iter().filter(|a| {
        matches!(
            a,
            AttackParams::TrojanSq { .. }
                | AttackParams::TrojanWm { .. }
                | AttackParams::L2Inv { .. }
                | AttackParams::Smooth { .. }
        )
    }) {
        let r = run(&params(attack.clone(), 1), &tune, &test);
        for &i in &r.indices {
            for (a, b) in r.tune.image(i).iter().zip(tune.image(i)) {
                assert!(
                    a >= b,
                    "{}: a non-negative additive trigger lowered a pixel (wrap-around?)",
                    attack.name()
                );
            }
        }
    }
}

#[test]
fn invisible_attacks_stay_within_their_bounds() {
    for size in [32, 64] {
        let (tune, test) = sets(size);
        let hw = size * size;
        // l0-inv: at most `pixels` pixels change.
        let r = run(
            &params(
                AttackParams::L0Inv {
                    pixels: 9,
                    trigger_digest: None,
                    mask_digest: None,
                },
                2,
            ),
            &tune,
            &test,
        );
        for &i in &r.indices {
            let (a, b) = (r.tune.image(i), tune.image(i));
            let changed = (0..hw)
                .filter(|&p| (0..3).any(|c| a[c * hw + p] != b[c * hw + p]))
                .count();
            assert!(changed <= 9, "l0-inv changed {changed} pixels");
        }
        // l2-inv: ‖x' − x‖₂ within the budget.
        let r = run(
            &params(
                AttackParams::L2Inv {
                    l2_norm: 3.0,
                    recipe: invisible_l2::Recipe::Field,
                    trigger_digest: None,
                },
                2,
            ),
            &tune,
            &test,
        );
        let budget = invisible_l2::budget(3.0, size);
        for &i in &r.indices {
            let d: f64 = r
                .tune
                .image(i)
                .iter()
                .zip(tune.image(i))
                .map(|(a, b)| ((*a as f64 - *b as f64) / 255.0).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(d <= budget + 1e-9, "l2-inv: {d} > {budget}");
            assert!(d > 0.0);
        }
        // Smooth: every change within max·255.
        let r = run(
            &params(
                AttackParams::Smooth {
                    max: 0.2,
                    trigger_digest: None,
                },
                2,
            ),
            &tune,
            &test,
        );
        for &i in &r.indices {
            let m = r
                .tune
                .image(i)
                .iter()
                .zip(tune.image(i))
                .map(|(a, b)| (*a as i32 - *b as i32).abs())
                .max()
                .unwrap();
            assert!(m as f64 <= 0.2 * 255.0, "smooth changed a pixel by {m}");
        }
    }
}

#[test]
fn trigger_files_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("t.png");
    image::RgbImage::from_pixel(7, 5, image::Rgb([40, 50, 60]))
        .save(&png)
        .unwrap();
    let files = TriggerFiles {
        trigger: Some(png.clone()),
        mask: None,
    };
    let mut img = vec![10u8; 3 * 256];
    let d = Some("digest".to_string());
    // Additive file trigger: x + T.
    let t = build(
        &params(
            AttackParams::TrojanSq {
                trigger_digest: d.clone(),
            },
            0,
        ),
        16,
        &files,
    )
    .unwrap();
    t.apply(&mut img, 16);
    assert!(img[..256].iter().all(|&v| v == 50) && img[512..].iter().all(|&v| v == 70));
    // Blend with α = 1 reproduces the file.
    let t = build(
        &params(
            AttackParams::Blended {
                alpha: 1.0,
                trigger_digest: d.clone(),
            },
            0,
        ),
        16,
        &files,
    )
    .unwrap();
    t.apply(&mut img, 16);
    assert!(img[256..512].iter().all(|&v| v == 50));
    // A digest without its file is an error, not a silently generated trigger.
    assert!(
        build(
            &params(
                AttackParams::L2Inv {
                    l2_norm: 3.0,
                    recipe: invisible_l2::Recipe::Field,
                    trigger_digest: d
                },
                0
            ),
            16,
            &TriggerFiles::default()
        )
        .is_err()
    );
}

fn shared_trigger(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/triggers")
        .join(name);
    p.is_file().then_some(p)
}

#[test]
fn published_trigger_files_load() {
    let (Some(png), Some(mask), Some(smooth)) = (
        shared_trigger("l0_inv.png"),
        shared_trigger("l0_inv_mask.npy"),
        shared_trigger("smooth_cifar10.npy"),
    ) else {
        eprintln!("skipped: ../shared/data/triggers not present");
        return;
    };
    let files = TriggerFiles {
        trigger: Some(png),
        mask: Some(mask),
    };
    let d = Some("x".to_string());
    let t = build(
        &params(
            AttackParams::L0Inv {
                pixels: 9,
                trigger_digest: d.clone(),
                mask_digest: d.clone(),
            },
            0,
        ),
        32,
        &files,
    )
    .unwrap();
    let Trigger::Additive {
        keep: Some(keep), ..
    } = &t
    else {
        panic!("l0-inv is additive with a mask")
    };
    assert_eq!(
        keep.iter().filter(|&&k| k == 0.0).count(),
        27,
        "the published mask marks 27 channel-pixels"
    );
    let files = TriggerFiles {
        trigger: Some(smooth),
        mask: None,
    };
    let t = build(
        &params(
            AttackParams::Smooth {
                max: 0.2,
                trigger_digest: d,
            },
            0,
        ),
        32,
        &files,
    )
    .unwrap();
    let Trigger::Additive { pattern, .. } = &t else {
        panic!("smooth is additive")
    };
    let max = pattern.iter().cloned().fold(0f32, f32::max);
    assert!(
        max > 40.0 && max <= 51.0,
        "published smooth trigger peaks at 0.2·255, got {max}"
    );
}
