use super::*;
use crate::attacks::badnets::BadnetsSettings;
use crate::attacks::{AttackParams, TriggerFiles, build, poison};
use rand::{Rng, SeedableRng};

#[test]
fn quantised_perturbation_keeps_the_l2_budget_and_pixel_range() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    for case in 0..50 {
        let n = 3 * 16 * 16;
        let base: Vec<u8> = (0..n)
            .map(|i| {
                if i % 7 == 0 {
                    255
                } else {
                    rng.random_range(0..=255u8)
                }
            })
            .collect();
        let scale = [0.01f32, 0.05, 0.3][case % 3];
        let adv: Vec<f32> = base
            .iter()
            .map(|&b| (b as f32 / 255.0 + rng.random_range(-scale..scale)).clamp(0.0, 1.0))
            .collect();
        let q = quantise(&base, &adv, 16.0);
        let l2 = q
            .iter()
            .zip(&base)
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(l2 <= 16.0 + 1e-9, "case {case}: {l2}");
        assert!(l2 > 0.0, "case {case}: nothing kept");
        // Every change goes the way δ does.
        for i in 0..n {
            let d = adv[i] * 255.0 - base[i] as f32;
            let c = q[i] as f32 - base[i] as f32;
            assert!(c == 0.0 || c.signum() == d.signum());
        }
    }
}

/// A smoke-size f_p tuned on BadNets-white poisoned synthetic data.
fn setup() -> (Attacker, Poisoned) {
    let device = crate::default_device();
    let ad = device.autodiff();
    let size = 16;
    let raw = crate::data::synthetic::generate(0, 320, 100, size);
    let meta = DatasetMeta {
        name: "synthetic".into(),
        classes: raw.classes.clone(),
        image_size: size,
        mean: raw.mean,
        std: raw.std,
        pretrain: 0,
        tune: raw.train.len(),
        test: raw.test.len(),
    };
    let p = PoisonParams {
        attack: AttackParams::new("badnets-white", &BadnetsSettings::default()).unwrap(),
        poison_rate: 0.1,
        target: 1,
        seed: 0,
    };
    let t = build(&p, size, &TriggerFiles::default()).unwrap();
    let base = poison(&p, &raw.train, &raw.test, &t, false);
    let cfg = crate::models::VitConfig {
        image_size: size,
        patch_size: 4,
        dim: 32,
        depth: 1,
        heads: 2,
        mlp_ratio: 2,
        num_classes: meta.num_classes(),
    };
    let fp = Vit::new(&cfg, 0, &ad);
    let n_iter = crate::train::iters_per_epoch(base.tune.len(), 32);
    let sup = crate::train::Supervised {
        label: "test f_p",
        epochs: 2,
        batch_size: 32,
        views: &[crate::train::View::NoAug],
        lr: vec![1e-3; 2 * n_iter],
        wd: vec![0.0; 2 * n_iter],
        seed: 0,
        keep_last: false,
    };
    let (fp, _) = crate::train::train_supervised(
        fp,
        &base.tune,
        &meta,
        &sup,
        crate::train::LossKind::Ce,
        &ad,
    )
    .unwrap();
    let att = Attacker::new(fp, &base.tune, &base.indices, &meta, 1, 0.6);
    (att, base)
}

#[test]
fn pgd_lowers_its_objective_within_budget_and_touches_only_poisoned_images() {
    let (att, base) = setup();
    let c = CatSettings::default();
    let (r, st) = perturb(&att, &c, &base).unwrap();
    eprintln!("{st:?}");
    assert_eq!(st.perturbed, base.indices.len());
    assert!(
        st.objective_after_pgd < st.objective_before,
        "PGD did not lower its objective: {st:?}"
    );
    assert!(st.objective_after_u8 < st.objective_before, "{st:?}");
    assert_eq!(r.indices, base.indices);
    assert_eq!(
        r.tune.labels, base.tune.labels,
        "labels are the base attack's"
    );
    assert_eq!(
        r.test.images, base.test.images,
        "ASR set is the base attack's"
    );
    assert_eq!(r.test.labels, base.test.labels);
    let mut changed = 0;
    for i in 0..base.tune.len() {
        let d2: f64 = r
            .tune
            .image(i)
            .iter()
            .zip(base.tune.image(i))
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
            .sum();
        if base.indices.binary_search(&i).is_ok() {
            assert!(d2.sqrt() <= c.l2_budget + 1e-9, "image {i}: {}", d2.sqrt());
            changed += (d2 > 0.0) as usize;
        } else {
            assert_eq!(d2, 0.0, "unpoisoned image {i} changed");
        }
    }
    assert!(
        changed * 2 > base.indices.len(),
        "most poisoned images perturbed"
    );
    // Deterministic.
    let (again, _) = perturb(&att, &c, &base).unwrap();
    assert_eq!(again.tune.images, r.tune.images);
}
