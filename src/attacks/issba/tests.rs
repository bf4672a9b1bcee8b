use super::stegastamp::{bits_tensor, images01};
use super::*;
use crate::attacks::{AttackParams, PoisonParams};

fn smoke_params() -> StegaParams {
    let scale =
        crate::spec::load_scale(crate::spec::DEFAULT_SCALES, "scales.yaml", "smoke").unwrap();
    StegaParams::new(&IssbaSettings::default(), &scale, 0)
}

#[test]
fn stegastamp_step_trains_at_smoke_size_and_poisons_sample_specifically() {
    let device = crate::default_device();
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (dir.path().join("data"), dir.path().join("stega"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    let p = smoke_params();
    let dp = crate::data::DatasetParams {
        name: "synthetic".into(),
        format: None,
        image_size: p.image_size,
        pretrain: 320,
        tune: 200,
        test: 100,
        seed: 0,
        source_digest: None,
        whole_train_as_tune: false,
    };
    crate::data::run_dataset_step(&dp, None, None, &data).unwrap();
    let t0 = std::time::Instant::now();
    let st = run_stegastamp_step(&p, &data, &out, &device).unwrap();
    eprintln!(
        "stegastamp smoke: {:.1}s {st:?}",
        t0.elapsed().as_secs_f64()
    );
    let written: StegaStats =
        serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap()).unwrap();
    assert_eq!(written.heldout_images, st.heldout_images);
    assert!(
        st.bit_acc_train > 0.75,
        "secret not learnt: bit accuracy {}",
        st.bit_acc_train
    );
    assert!(st.bit_acc_heldout > 0.7, "{st:?}");
    assert!(
        st.linf_max <= p.eps + 0.5 / 255.0 + 1e-9,
        "residual exceeds the bound: {} > {}",
        st.linf_max,
        p.eps
    );
    // ‖r‖∞ ≤ ε (plus 8-bit rounding) bounds the RMS, so PSNR ≥ 20·log10(1/ε').
    let floor = -20.0 * (p.eps + 0.5 / 255.0).log10();
    assert!(
        st.psnr_mean.is_finite() && st.psnr_mean >= floor,
        "PSNR below {floor}: {st:?}"
    );

    // The poison step on the trained encoder.
    let (model, sp) = load(&out, &device).unwrap();
    assert_eq!(sp, p);
    let pp = PoisonParams {
        attack: AttackParams::new("issba", &IssbaSettings::default()).unwrap(),
        poison_rate: 0.1,
        target: 1,
        seed: 3,
    };
    let (tune, test) = crate::attacks::load_clean(&pp, &data).unwrap();
    let r = poison(&model, &sp, &pp, &tune, &test, &device).unwrap();
    let non_target = tune.labels.iter().filter(|&&l| l != 1).count();
    assert_eq!(r.indices.len(), (0.1 * non_target as f64).round() as usize);
    assert_eq!(
        r.indices,
        crate::attacks::choose_poison_indices(&tune, 0.1, 1, 3)
    );
    let mut residuals: Vec<Vec<i16>> = Vec::new();
    for i in 0..tune.len() {
        if r.indices.binary_search(&i).is_ok() {
            assert_eq!(r.tune.labels[i], 1);
            assert_ne!(tune.labels[i], 1, "only non-target images are poisoned");
            let d: Vec<i16> = r
                .tune
                .image(i)
                .iter()
                .zip(tune.image(i))
                .map(|(&a, &b)| a as i16 - b as i16)
                .collect();
            let linf = d.iter().map(|v| v.abs()).max().unwrap() as f64;
            assert!(linf <= (p.eps * 255.0).ceil(), "residual {linf}");
            assert!(linf > 0.0, "image {i} unchanged");
            residuals.push(d);
        } else {
            assert_eq!(r.tune.labels[i], tune.labels[i]);
            assert_eq!(r.tune.image(i), tune.image(i), "clean image {i} changed");
        }
    }
    assert!(
        residuals.windows(2).all(|w| w[0] != w[1]),
        "residuals must be sample-specific"
    );
    let asr_n = test.labels.iter().filter(|&&l| l != 1).count();
    assert_eq!(r.test.len(), asr_n);
    assert!(r.test.labels.iter().all(|&l| l == 1));
    // The decoder recovers the secret from the poisoned test images.
    let enc: Vec<Vec<u8>> = (0..r.test.len())
        .map(|i| r.test.image(i).to_vec())
        .collect();
    let acc = bit_accuracy(&model, &enc, sp.image_size, &secret(20, 0), &device);
    assert!(acc > 0.7, "{acc}");
    // Deterministic.
    let again = poison(&model, &sp, &pp, &tune, &test, &device).unwrap();
    assert_eq!(again.tune.images, r.tune.images);
    assert_eq!(again.test.images, r.test.images);
}

#[test]
fn encoder_residual_is_bounded_before_training() {
    let device = crate::default_device();
    let p = StegaParams {
        eps: 0.02,
        ..smoke_params()
    };
    let m = StegaStamp::new(&p, &device);
    let set = crate::data::synthetic::generate(1, 8, 0, p.image_size).train;
    let idx: Vec<usize> = (0..set.len()).collect();
    let s = bits_tensor(&vec![1u8; 8 * p.secret_len], 8, p.secret_len, &device);
    let r: Vec<f32> = m
        .enc
        .forward(images01(&set, &idx, &device), s, p.eps)
        .to_data()
        .try_to_vec()
        .unwrap();
    assert!(r.iter().all(|v| v.abs() <= 0.02 + 1e-6));
    assert_eq!(secret(20, 0), REFERENCE_SECRET.to_vec());
    assert_eq!(secret(7, 1), secret(7, 1));
}
