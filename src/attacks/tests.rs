//! Invariants every attack must keep.

use std::path::PathBuf;

use serde_json::json;

use super::*;
use crate::data::ImageSet;

fn sets(size: usize) -> (ImageSet, ImageSet) {
    let raw = crate::data::synthetic::generate(0, 400, 100, size);
    (raw.train, raw.test)
}

/// Every registered attack with a fixed trigger, with its default parameters (ISSBA's and
/// CAT's poison steps read their input steps; `issba/tests.rs` and `cat/tests.rs` check
/// them).
fn all_attacks() -> Vec<AttackParams> {
    REGISTRY
        .iter()
        .map(|a| default_params(*a).unwrap())
        .filter(|p| build(&params(p.clone(), 0), 16, &TriggerFiles::default()).is_ok())
        .collect()
}

/// An attack's parameters with some settings changed.
fn with(name: &str, overrides: serde_json::Value) -> AttackParams {
    let a = registered(name).unwrap();
    let mut s = a.default_settings();
    s.as_object_mut()
        .unwrap()
        .extend(overrides.as_object().unwrap().clone());
    a.check(&s).unwrap();
    a.params(&s, &mut crate::spec::plan::SpecFiles::none())
        .unwrap()
}

fn attack(p: &AttackParams) -> &'static dyn Attack {
    registered(p.name()).unwrap()
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
    attack(&p.attack)
        .poison(p, tune, test, &TriggerFiles::default())
        .unwrap()
}

#[test]
fn every_registered_attack_is_checked_here_or_by_its_own_tests() {
    let fixed: Vec<String> = all_attacks().iter().map(|a| a.name().to_string()).collect();
    assert_eq!(fixed.len(), 11, "{fixed:?}");
    let others: Vec<&str> = names()
        .into_iter()
        .filter(|n| !fixed.iter().any(|f| f == n))
        .collect();
    assert_eq!(others, ["issba", "cat"], "sample-specific attacks");
    assert_eq!(REGISTRY.len(), 13);
    for a in REGISTRY {
        assert_eq!(registered(a.name()).unwrap().name(), a.name());
        assert!(a.check(&a.default_settings()).is_ok(), "{}", a.name());
        assert_eq!(default_params(*a).unwrap().name(), a.name());
    }
    // `<attack>+<base>` for attacks that take a base, on one that does not.
    assert_eq!(resolve("cat+blended").unwrap().1, Some("blended"));
    assert!(resolve("cat+cat").is_none() && resolve("blended+sig").is_none());
    assert!(resolve("cat+nothing").is_none());
}

#[test]
fn parameters_keep_their_json() {
    let json = |p: AttackParams| serde_json::to_value(p).unwrap();
    assert_eq!(
        json(default_params(&blended::Blended).unwrap()),
        serde_json::json!({"name": "blended", "alpha": 0.4, "trigger_digest": null})
    );
    assert_eq!(
        json(default_params(&badnets::WHITE).unwrap()),
        serde_json::json!({"name": "badnets-white", "size_frac": 0.09375})
    );
    assert_eq!(
        json(default_params(&invisible_l0::L0Inv).unwrap()),
        serde_json::json!({"name": "l0-inv", "pixels": 9, "trigger_digest": null, "mask_digest": null})
    );
    assert_eq!(
        json(default_params(&cat::Cat).unwrap()),
        serde_json::json!({"name": "cat", "base": "badnets-white", "gamma": 0.6, "iterations": 10, "l2_budget": 16.0})
    );
}

#[test]
fn settings_are_checked_naming_the_field() {
    for (name, bad, field) in [
        ("blended", serde_json::json!({"alpha": 0.0}), "alpha"),
        (
            "badnets-pattern",
            serde_json::json!({"size_frac": 0.7}),
            "size_frac",
        ),
        ("l2-inv", serde_json::json!({"l2_norm": -1.0}), "l2_norm"),
        ("wanet", serde_json::json!({"k": 1}), "k"),
        ("issba", serde_json::json!({"eps": 2.0}), "eps"),
        ("cat", serde_json::json!({"base": "cat"}), "base"),
        ("cat", serde_json::json!({"iterations": 0}), "iterations"),
    ] {
        let a = registered(name).unwrap();
        let mut s = a.default_settings();
        s.as_object_mut()
            .unwrap()
            .extend(bad.as_object().unwrap().clone());
        let e = a.check(&s).unwrap_err();
        assert!(e.starts_with(&format!("{field}: ")), "{name}: {e}");
    }
}

#[test]
fn each_poison_step_computes_what_its_attack_poisons_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let dp = crate::data::DatasetParams {
        name: "synthetic".into(),
        format: None,
        image_size: 16,
        pretrain: 0,
        tune: 300,
        test: 60,
        seed: 0,
        source_digest: None,
        whole_train_as_tune: false,
    };
    crate::data::run_dataset_step(&dp, None, None, &data).unwrap();
    let inputs = PoisonInputs {
        dataset: data.clone(),
        others: Default::default(),
        files: TriggerFiles::default(),
    };
    let device = crate::default_device();
    for a in all_attacks() {
        let p = params(a, 4);
        let out = dir.path().join(p.attack.name());
        std::fs::create_dir_all(&out).unwrap();
        let n = attack(&p.attack).run(&p, &inputs, &out, &device).unwrap();
        let (tune, test) = load_clean(&p, &data).unwrap();
        let want = run(&p, &tune, &test);
        let name = p.attack.name();
        assert_eq!(n, want.indices.len(), "{name}");
        assert_eq!(load_poison_indices(&out).unwrap(), want.indices, "{name}");
        assert_eq!(
            ImageSet::load(&out.join("tune.safetensors")).unwrap(),
            want.tune,
            "{name}"
        );
        assert_eq!(
            ImageSet::load(&out.join("test.safetensors")).unwrap(),
            want.test,
            "{name}"
        );
        assert_eq!(
            out.join("noise_indices.json").is_file(),
            !want.noise_indices.is_empty(),
            "{name}"
        );
    }
}

#[test]
fn counts_labels_and_untouched_images_at_every_size() {
    for size in [16, 32, 64] {
        let (tune, test) = sets(size);
        for attack in all_attacks() {
            let name = attack.name().to_string();
            let p = params(attack.clone(), 5);
            let r = run(&p, &tune, &test);
            let clean_label = self::attack(&attack).clean_label();
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
        if !self::attack(&attack).clean_label() {
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
    for attack in all_attacks()
        .into_iter()
        .filter(|a| ["trojan-sq", "trojan-wm", "l2-inv", "smooth"].contains(&a.name()))
    {
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
            &params(with("l0-inv", json!({"pixels": 9})), 2),
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
                with("l2-inv", json!({"l2_norm": 3.0, "recipe": "field"})),
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
            &params(with("smooth", json!({"max": 0.2})), 2),
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
    let trojan = trojan::TrojanParams {
        trigger_digest: d.clone(),
    };
    let t = build(
        &params(AttackParams::new("trojan-sq", &trojan).unwrap(), 0),
        16,
        &files,
    )
    .unwrap();
    t.apply(&mut img, 16);
    assert!(img[..256].iter().all(|&v| v == 50) && img[512..].iter().all(|&v| v == 70));
    // Blend with α = 1 reproduces the file.
    let blend = blended::BlendedParams {
        alpha: 1.0,
        trigger_digest: d.clone(),
    };
    let t = build(
        &params(AttackParams::new("blended", &blend).unwrap(), 0),
        16,
        &files,
    )
    .unwrap();
    t.apply(&mut img, 16);
    assert!(img[256..512].iter().all(|&v| v == 50));
    // A digest without its file is an error, not a silently generated trigger.
    let l2 = invisible_l2::L2Params {
        l2_norm: 3.0,
        recipe: invisible_l2::Recipe::Field,
        trigger_digest: d,
    };
    let p = params(AttackParams::new("l2-inv", &l2).unwrap(), 0);
    assert!(build(&p, 16, &TriggerFiles::default()).is_err());
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
    let l0 = invisible_l0::L0Params {
        pixels: 9,
        trigger_digest: d.clone(),
        mask_digest: d.clone(),
    };
    let t = build(
        &params(AttackParams::new("l0-inv", &l0).unwrap(), 0),
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
    let smooth = smooth::SmoothParams {
        max: 0.2,
        trigger_digest: d,
    };
    let t = build(
        &params(AttackParams::new("smooth", &smooth).unwrap(), 0),
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
