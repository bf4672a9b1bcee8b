use super::*;

/// Algorithm 1's loop on a tiny set with a known unlearn set: the queue starts empty
/// every epoch, a batch is unlearned as soon as the queue holds one (at most one per
/// learning step), and Eq. 3's k restarts at 0 (factor 1) at every epoch start.
#[test]
fn stage2_queues_per_epoch_unlearns_when_full_and_resets_k() {
    use crate::data::DatasetMeta;
    use crate::models::{Vit, VitConfig};
    let device = Device::flex();
    let ad = device.clone().autodiff();
    let raw = crate::data::synthetic::generate(2, 42, 0, 8);
    let meta = DatasetMeta {
        name: "synthetic".into(),
        classes: raw.classes.clone(),
        image_size: 8,
        mean: raw.mean,
        std: raw.std,
        pretrain: 0,
        tune: 42,
        test: 0,
    };
    let n = raw.train.len();
    let nc = meta.num_classes();
    let flagged: Vec<bool> = (0..n).map(|i| i % 3 == 0).collect();
    let poison: Vec<usize> = (0..n).filter(|i| i % 6 == 0).collect();
    let params = IeuParams {
        c_thresh: 0.95,
        selection: Selection::Confidence,
        logit_masking: true,
        unlearn_rate: UnlearnRate::Dynamic,
        gate_noise_std: 0.0,
    };
    let p = FinetuneParams {
        defence: DefenceParams::new("ieu", &params).unwrap(),
        schedule: crate::spec::FinetuneSchedule {
            epochs: 3,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_epochs: 0,
            wd_start: 0.04,
            wd_end: 0.1,
        },
        batch_size: 4,
        views: crate::spec::Views::Plain,
        seed: 5,
    };
    let fp_logits = Logits {
        values: vec![0.0; n * nc],
        classes: nc,
    };
    let cfg = VitConfig {
        image_size: 8,
        patch_size: 4,
        dim: 8,
        depth: 1,
        heads: 2,
        mlp_ratio: 2,
        num_classes: nc,
    };
    let mut alg = Algorithm1::new(
        &params,
        &p,
        &raw.train,
        &meta,
        fp_logits,
        flagged.clone(),
        &poison,
        &ad,
    );
    let sup = p.supervised("test", n);
    fit(
        Vit::new(&cfg, 1, &ad),
        &raw.train,
        &meta,
        &sup,
        &mut alg,
        &ad,
    )
    .unwrap();
    let trace = &alg.stats.unlearn_trace;

    // Replay the queue: per epoch from empty, one unlearn whenever it holds a batch.
    let mut want = Vec::new();
    let mut iter = 0;
    for epoch in 0..3 {
        let mut queued = 0;
        for batch in sup.batches(n, epoch) {
            queued += batch.iter().filter(|&&i| flagged[i]).count();
            if queued >= p.batch_size {
                queued -= p.batch_size;
                want.push((epoch, iter));
            }
            iter += 1;
        }
    }
    let got: Vec<(usize, usize)> = trace.iter().map(|r| (r.epoch, r.iter)).collect();
    assert_eq!(got, want);
    assert!(
        want.len() >= 6,
        "too few unlearning steps to test: {want:?}"
    );
    assert_eq!(alg.stats.unlearn_steps, want.len());
    for (j, r) in trace.iter().enumerate() {
        let first = j == 0 || trace[j - 1].epoch != r.epoch;
        if first {
            // k = 0 at the epoch's first unlearned batch: lr_ul = lr_tune.
            assert_eq!((r.k, r.factor, r.prev_loss), (0, 1.0, None), "{r:?}");
        } else {
            let prev = &trace[j - 1];
            assert_eq!(r.k, prev.k + 1);
            assert_eq!(r.prev_loss, Some(prev.loss));
            let f = dynamic_unlearn_scale(r.k, prev.loss, nc);
            assert!((r.factor - f).abs() < 1e-12, "{r:?}");
        }
        assert!((r.lr_ul - r.factor * r.lr_tune).abs() < 1e-15);
        assert!((0.0..=1.0).contains(&r.poisoned_fraction));
    }
}

#[test]
fn eq3_hand_computed_values() {
    // k = 0: lr_ul = lr_tune.
    assert_eq!(dynamic_unlearn_scale(0, 123.0, 10), 1.0);
    // ℓ = 0, N_c = 10: 6 − exp(−ln 10) = 6 − 0.1 = 5.9.
    assert!((dynamic_unlearn_scale(1, 0.0, 10) - 5.9).abs() < 1e-12);
    // ℓ = √2·ln 10: exp(0) = 1 → 5.
    let l = std::f64::consts::SQRT_2 * 10f64.ln();
    assert!((dynamic_unlearn_scale(3, l, 10) - 5.0).abs() < 1e-12);
    // ℓ = √2·ln 30: 6 − 3 = 3.
    let l = std::f64::consts::SQRT_2 * 30f64.ln();
    assert!((dynamic_unlearn_scale(3, l, 10) - 3.0).abs() < 1e-12);
    // Large loss: clamped at 0.2.
    assert_eq!(dynamic_unlearn_scale(2, 50.0, 10), 0.2);
    // N_c = 200, ℓ = 0: 6 − 1/200.
    assert!((dynamic_unlearn_scale(1, 0.0, 200) - 5.995).abs() < 1e-12);
}

#[test]
fn unlearn_rate_variants() {
    // Dynamic: 1 at k = 0, then Eq. 3 of the previous loss; k restarts each epoch.
    let mut s = UnlearnSchedule::new(UnlearnRate::Dynamic, 10);
    assert_eq!(s.scale(), 1.0);
    s.record(0.0);
    assert!((s.scale() - 5.9).abs() < 1e-12);
    s.record(std::f64::consts::SQRT_2 * 10f64.ln());
    assert!((s.scale() - 5.0).abs() < 1e-12);
    s.reset();
    assert_eq!(s.scale(), 1.0);
    // Constant: c at every step (Table 9).
    let mut s = UnlearnSchedule::new(UnlearnRate::Constant(2.0), 10);
    assert_eq!(s.scale(), 2.0);
    s.record(3.0);
    assert_eq!(s.scale(), 2.0);
    // Moving average β = 0.5 of losses 0 and 2√2·ln 10 → ℓ̄ = √2·ln 10 → factor 5.
    let mut s = UnlearnSchedule::new(UnlearnRate::MovingAverage(0.5), 10);
    s.record(0.0);
    s.record(2.0 * std::f64::consts::SQRT_2 * 10f64.ln());
    assert!((s.scale() - 5.0).abs() < 1e-12);
}

#[test]
fn eq1_selects_fp_logits_for_confident_rows() {
    let device = Device::flex();
    // Row 0: f_p confident (softmax of [10, 0] ≈ 0.99995 > 0.95) → ŷ = ŷ_p.
    // Row 1: f_p unconfident (softmax of [0.1, 0] ≈ 0.525) → ŷ = ŷ_r.
    let y_p = Tensor::<2>::from_data(
        TensorData::new(vec![10.0f32, 0.0, 0.1, 0.0], [2, 2]),
        &device,
    );
    let y_r = Tensor::<2>::from_data(
        TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2]),
        &device,
    );
    let out: Vec<f32> = masked_logits(y_p, y_r, 0.95)
        .to_data()
        .try_to_vec()
        .unwrap();
    assert_eq!(out, vec![10.0, 0.0, 3.0, 4.0]);
}

#[test]
fn eq1_gives_no_gradient_to_f_r_on_flagged_rows() {
    let device = Device::flex().autodiff();
    let y_p = Tensor::<2>::from_data(
        TensorData::new(vec![10.0f32, 0.0, 0.1, 0.0], [2, 2]),
        &device,
    );
    let y_r = Tensor::<2>::from_data(
        TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2]),
        &device,
    )
    .require_grad();
    let out = masked_logits(y_p, y_r.clone(), 0.95);
    let grads = out.sum().backward();
    let g: Vec<f32> = y_r
        .grad(&grads)
        .unwrap()
        .to_data()
        .convert::<f32>()
        .try_to_vec()
        .unwrap();
    assert_eq!(g, vec![0.0, 0.0, 1.0, 1.0]);
}
