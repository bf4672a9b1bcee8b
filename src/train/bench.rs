//! Training-step throughput of a scale's ViT, for `ieu-bench bench` and `cargo bench`.

use std::time::Instant;

use anyhow::Result;
use burn::prelude::*;

use crate::data::{DatasetMeta, synthetic};
use crate::models::{Vit, VitConfig};
use crate::spec::Scale;
use crate::train::fit::{Batch, Plain, learning_step};
use crate::train::{LossKind, Optimiser, View, labels, rng_for, views};

pub struct BenchResult {
    /// "train-step" or "inference".
    pub what: &'static str,
    pub backend: &'static str,
    pub image_size: usize,
    pub batch: usize,
    pub rows_per_step: usize,
    pub steps: usize,
    /// Every timed step's seconds, in order.
    pub step_seconds: Vec<f64>,
    pub params: usize,
    /// Threads of the rayon pool it ran in.
    pub threads: usize,
}

impl std::fmt::Display for BenchResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rows = self.rows_per_step as f64;
        write!(
            f,
            "{} throughput: {:.1} images/s at the median step, {:.1} on average ({} steps of {} rows, {}x{} px, {} params, backend {}, {} thread{}; median {:.3}s/step)",
            self.what,
            rows / self.median(),
            rows / self.mean(),
            self.steps,
            self.rows_per_step,
            self.image_size,
            self.image_size,
            self.params,
            self.backend,
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            self.median()
        )
    }
}

impl BenchResult {
    /// The median step's seconds (what PyTorch's reference script reports; robust to a
    /// step slowed by something else running on the machine).
    pub fn median(&self) -> f64 {
        let mut s = self.step_seconds.clone();
        s.sort_by(f64::total_cmp);
        match s.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => s[n / 2],
            n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
        }
    }

    pub fn mean(&self) -> f64 {
        self.step_seconds.iter().sum::<f64>() / self.step_seconds.len() as f64
    }
}

/// `n` generated images, their metadata and the scale's ViT with a 10-class head.
fn setup(scale: &Scale, n: usize) -> (crate::data::RawSplits, DatasetMeta, VitConfig) {
    let raw = synthetic::generate(0, n, 0, scale.image_size);
    let meta = raw.meta("synthetic");
    let cfg = VitConfig {
        image_size: scale.image_size,
        patch_size: scale.model.patch_size,
        dim: scale.model.dim,
        depth: scale.model.depth,
        heads: scale.model.heads,
        mlp_ratio: scale.model.mlp_ratio,
        num_classes: 10,
    };
    (raw, meta, cfg)
}

/// Times the training loop's learning step (forward + backward + AdamW step, in
/// [`crate::train::SHARDS`] shards) of the scale's f_r on its finetuning views (one
/// row per image and view), after two warm-up steps.
pub fn train_throughput(scale: &Scale, steps: usize) -> Result<BenchResult> {
    if steps == 0 {
        anyhow::bail!("--steps 0: give at least one timed step");
    }
    let device = crate::default_device();
    let ad = device.clone().autodiff();
    let (raw, meta, cfg) = setup(scale, scale.batch_size);
    let mut model = Vit::new(&cfg, 0, &ad);
    let params = model.num_params();
    let mut optim = Optimiser::adamw();
    let idx: Vec<usize> = (0..raw.train.len()).collect();
    let wanted: &[View] = match scale.views {
        crate::spec::Views::Sit => &[View::Crop, View::Corrupt],
        crate::spec::Views::Crop => &[View::Crop],
        crate::spec::Views::Plain => &[View::NoAug],
    };
    let mut step_seconds = Vec::with_capacity(steps);
    for s in 0..steps + 2 {
        let t0 = Instant::now();
        let xs = views(
            &raw.train,
            &idx,
            wanted,
            &meta,
            &mut rng_for(0, 0, s, 1),
            &ad,
        );
        let y = labels(&raw.train, &idx, &ad);
        let batch = Batch {
            epoch: 0,
            index: s,
            iter: s,
            images: &idx,
            y: Tensor::cat(vec![y; xs.len()], 0),
            views: xs.len(),
            x: Tensor::cat(xs, 0),
            lr: 1e-4,
            wd: 0.0,
            loss: f64::NAN,
        };
        (model, _) = learning_step(model, &mut optim, &Plain(LossKind::Ce), &batch, &ad)?;
        if s >= 2 {
            step_seconds.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(BenchResult {
        what: "train-step",
        backend: crate::backend_name(),
        image_size: scale.image_size,
        batch: scale.batch_size,
        rows_per_step: scale.batch_size * wanted.len(),
        steps,
        step_seconds,
        params,
        threads: rayon::current_num_threads(),
    })
}

/// Times the forward pass without autodiff on `eval_batch_size` unaugmented images (what
/// the gate and evaluation run), through the inference helper, after two warm-up passes.
pub fn inference_throughput(scale: &Scale, steps: usize) -> Result<BenchResult> {
    if steps == 0 {
        anyhow::bail!("--steps 0: give at least one timed step");
    }
    let device = crate::default_device();
    let (raw, meta, cfg) = setup(scale, scale.eval_batch_size);
    let model = Vit::new(&cfg, 0, &device);
    let params = model.num_params();
    let mut step_seconds = Vec::with_capacity(steps);
    for s in 0..steps + 2 {
        let t0 = Instant::now();
        let l = crate::train::logits(&model, &raw.train, &meta, scale.eval_batch_size, &device);
        assert_eq!(l.len(), raw.train.len());
        if s >= 2 {
            step_seconds.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(BenchResult {
        what: "inference",
        backend: crate::backend_name(),
        image_size: scale.image_size,
        batch: scale.eval_batch_size,
        rows_per_step: scale.eval_batch_size,
        steps,
        step_seconds,
        params,
        threads: rayon::current_num_threads(),
    })
}
