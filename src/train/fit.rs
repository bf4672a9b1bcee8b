//! The one training loop. Pretraining, IEU's stage 1 and stage 2, ABL's isolation and every
//! baseline's finetuning run through [`fit`]; what differs between them is passed in: the
//! schedule and views ([`Supervised`]), and [`Hooks`] for the batch loss and what happens
//! after each learning step (IEU queues and unlearns there).

use anyhow::{Result, bail};
use burn::module::Module;
use burn::optim::{AdamConfig, GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use rayon::prelude::*;

use super::{
    CLIP_GRAD, Decay, LossKind, SHARDS, View, cross_entropy, epoch_batches, labels, rng_for, views,
};
use crate::data::{DatasetMeta, ImageSet};
use crate::models::Classifier;
use crate::progress::Progress;

/// An optimiser with decoupled weight decay: [`Optimiser::descend`] and
/// [`Optimiser::ascend`] take one step on a loss.
pub struct Optimiser {
    inner: burn::optim::ModuleOptimizer,
}

impl Optimiser {
    /// AdamW as the reference finetunes (ε 10⁻⁸, per-step gradient-norm clipping at 3, the
    /// weight decay applied separately by [`Decay`]).
    pub fn adamw() -> Self {
        Self {
            inner: burn::optim::AdamWConfig::new()
                .with_epsilon(1e-8)
                .with_weight_decay(0.0)
                .with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(
                    CLIP_GRAD,
                )))
                .init(),
        }
    }

    /// Plain Adam (ε 10⁻⁸, no clipping): ABL's unlearning and I-BAU's outer optimiser.
    pub fn adam() -> Self {
        Self {
            inner: AdamConfig::new().with_epsilon(1e-8).init(),
        }
    }

    /// One step down the gradient of `loss` at learning rate `lr`, then θ ← θ·(1 − lr·wd).
    pub fn descend<M: Module>(&mut self, model: M, loss: Tensor<1>, lr: f64, wd: f64) -> M {
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        self.apply(model, grads, lr, wd)
    }

    /// One step of gradient ascent on `loss` (descent on −loss).
    pub fn ascend<M: Module>(&mut self, model: M, loss: Tensor<1>, lr: f64, wd: f64) -> M {
        self.descend(model, loss.neg(), lr, wd)
    }

    /// One step with given gradients (I-BAU's hypergradient).
    pub fn apply<M: Module>(&mut self, model: M, grads: GradientsParams, lr: f64, wd: f64) -> M {
        let model = self.inner.step(lr, model, grads);
        if wd > 0.0 {
            model.map(&mut Decay {
                factor: 1.0 - lr * wd,
            })
        } else {
            model
        }
    }
}

/// A training run: which views to learn from, and the per-iteration learning rate and
/// weight decay.
pub struct Supervised<'a> {
    pub label: &'a str,
    pub epochs: usize,
    pub batch_size: usize,
    pub views: &'a [View],
    pub lr: Vec<f64>,
    pub wd: Vec<f64>,
    pub seed: u64,
    /// Keep the last partial batch of each epoch (the reference DataLoader drops it).
    pub keep_last: bool,
}

impl Supervised<'_> {
    /// The shuffled batches of one epoch over `n` images.
    pub fn batches(&self, n: usize, epoch: usize) -> Vec<Vec<usize>> {
        if self.keep_last {
            let mut idx: Vec<usize> = (0..n).collect();
            rand::seq::SliceRandom::shuffle(
                &mut idx[..],
                &mut rng_for(self.seed, epoch, 0, 0x5EED),
            );
            idx.chunks(self.batch_size.max(1))
                .map(|c| c.to_vec())
                .collect()
        } else {
            epoch_batches(n, self.batch_size, self.seed, epoch)
        }
    }
}

/// One training batch as the hooks see it.
pub struct Batch<'b> {
    pub epoch: usize,
    /// Index of the batch in its epoch.
    pub index: usize,
    /// Iteration over the whole run (index into the schedules).
    pub iter: usize,
    /// Indices of the batch's images in the training set.
    pub images: &'b [usize],
    /// Every requested view of every image, view-major: [V·B, 3, H, W].
    pub x: Tensor<4>,
    /// The labels, repeated once per view: [V·B].
    pub y: Tensor<1, Int>,
    /// Number of views V.
    pub views: usize,
    pub lr: f64,
    pub wd: f64,
    /// The learning step's loss on this batch (set before [`Hooks::after_step`]).
    pub loss: f64,
}

impl Batch<'_> {
    /// Images `range` of the batch, with all their views (rows keep the view-major order).
    fn shard(&self, range: std::ops::Range<usize>) -> Batch<'_> {
        let n = self.images.len();
        let rows = |t: usize| (0..self.views).map(move |v| v * n + t);
        let pick = |x: Tensor<4>| {
            let parts: Vec<Tensor<4>> = rows(range.start)
                .map(|r| x.clone().narrow(0, r, range.len()))
                .collect();
            Tensor::cat(parts, 0)
        };
        let y: Vec<Tensor<1, Int>> = rows(range.start)
            .map(|r| self.y.clone().narrow(0, r, range.len()))
            .collect();
        Batch {
            images: &self.images[range.clone()],
            x: pick(self.x.clone()),
            y: Tensor::cat(y, 0),
            ..*self
        }
    }
}

/// What a method changes in the loop.
pub trait Hooks<M: Classifier>: Sync {
    /// The optimiser of the learning steps (default: AdamW with clipping).
    fn optimiser(&self) -> Optimiser {
        Optimiser::adamw()
    }
    /// Called before the first batch of every epoch.
    fn epoch_start(&mut self, _epoch: usize) {}
    /// The loss the learning step minimises (default: cross-entropy on the views).
    fn loss(&self, model: &M, batch: &Batch) -> Result<Tensor<1>> {
        Ok(cross_entropy(
            model.forward(batch.x.clone()),
            batch.y.clone(),
        ))
    }
    /// Whether the loss is a mean of per-image terms, so that the loss of a batch is the
    /// size-weighted mean of its shards' losses and the loop may split it ([`SHARDS`]).
    fn mean_over_images(&self) -> bool {
        true
    }
    /// Called after each learning step; may take further steps on the model.
    fn after_step(&mut self, model: M, _batch: &Batch) -> Result<M> {
        Ok(model)
    }
    /// Shown after the loss on the progress bar.
    fn status(&self) -> String {
        String::new()
    }
}

/// A plain run: cross-entropy, or ABL's LGA / Flooding variants of it.
pub struct Plain(pub LossKind);

impl<M: Classifier> Hooks<M> for Plain {
    fn loss(&self, model: &M, batch: &Batch) -> Result<Tensor<1>> {
        let ce = cross_entropy(model.forward(batch.x.clone()), batch.y.clone());
        Ok(self.0.apply(ce))
    }
    /// LGA and Flooding transform the batch mean, so they are not means over images.
    fn mean_over_images(&self) -> bool {
        self.0.is_ce()
    }
}

/// One learning step on `batch`: the hooks' loss, its gradient ([`gradients`]) and one
/// optimiser step. Returns the model and the loss.
pub fn learning_step<M: Classifier, H: Hooks<M>>(
    model: M,
    optim: &mut Optimiser,
    hooks: &H,
    batch: &Batch,
    device: &Device,
) -> Result<(M, f64)> {
    let (grads, value) = gradients(&model, hooks, batch, device)?;
    Ok((optim.apply(model, grads, batch.lr, batch.wd), value))
}

/// The gradient of the hooks' loss on `batch`, and the loss. When the model and the loss
/// allow it the batch is split into [`SHARDS`] shards whose passes run in parallel on fresh
/// leaves of the same parameters (so their autodiff graphs are separate); the gradients are
/// summed in shard order, weighted by shard size, which equals the whole batch's gradient up
/// to float rounding.
pub fn gradients<M: Classifier, H: Hooks<M>>(
    model: &M,
    hooks: &H,
    batch: &Batch,
    device: &Device,
) -> Result<(GradientsParams, f64)> {
    let n = batch.images.len();
    if n < SHARDS || !model.per_image() || !hooks.mean_over_images() {
        let loss = hooks.loss(model, batch)?;
        let value = loss.clone().into_scalar::<f32>() as f64;
        return Ok((GradientsParams::from_grads(loss.backward(), model), value));
    }
    let bounds: Vec<std::ops::Range<usize>> = (0..SHARDS)
        .map(|s| s * n / SHARDS..(s + 1) * n / SHARDS)
        .collect();
    let parts: Vec<Result<(GradientsParams, f64)>> = bounds
        .into_par_iter()
        .map(|range| {
            let weight = range.len() as f64 / n as f64;
            let local = model.clone().fork(device);
            let shard = batch.shard(range);
            let loss = hooks.loss(&local, &shard)?;
            let value = loss.clone().into_scalar::<f32>() as f64;
            let grads = GradientsParams::from_grads(loss.mul_scalar(weight).backward(), &local);
            Ok((grads, value * weight))
        })
        .collect();
    let mut sum = GradientsAccumulator::<M>::new();
    let mut value = 0.0;
    for part in parts {
        let (grads, v) = part?;
        sum.accumulate(model, grads);
        value += v;
    }
    Ok((sum.grads(), value))
}

/// Mean training loss per epoch.
pub type LossLog = Vec<f64>;

/// The training loop: shuffled batches each epoch (seeded), the views of each batch, one
/// AdamW step with decoupled weight decay on the hooks' loss, then the hooks' after-step.
pub fn fit<M: Classifier, H: Hooks<M>>(
    mut model: M,
    set: &ImageSet,
    meta: &DatasetMeta,
    cfg: &Supervised,
    hooks: &mut H,
    device: &Device,
) -> Result<(M, LossLog)> {
    let mut optim = hooks.optimiser();
    let iters = cfg.batches(set.len(), 0).len();
    let progress = Progress::new(cfg.label, (cfg.epochs * iters) as u64);
    let mut log = Vec::new();
    let mut iter = 0usize;
    for epoch in 0..cfg.epochs {
        hooks.epoch_start(epoch);
        let mut sum = 0.0;
        let mut count = 0usize;
        for (index, images) in cfg.batches(set.len(), epoch).iter().enumerate() {
            let mut rng = rng_for(cfg.seed, epoch, index, 0xA06);
            let xs = views(set, images, cfg.views, meta, &mut rng, device);
            let y = labels(set, images, device);
            let nviews = xs.len();
            let mut batch = Batch {
                epoch,
                index,
                iter,
                images,
                y: Tensor::cat(vec![y; nviews], 0),
                x: Tensor::cat(xs, 0),
                views: nviews,
                lr: cfg.lr[iter],
                wd: cfg.wd[iter],
                loss: f64::NAN,
            };
            let value;
            (model, value) = learning_step(model, &mut optim, &*hooks, &batch, device)?;
            if !value.is_finite() {
                bail!(
                    "{}: non-finite training loss {value} at epoch {epoch}, batch {index}",
                    cfg.label
                );
            }
            batch.loss = value;
            model = hooks.after_step(model, &batch)?;
            sum += value;
            count += 1;
            iter += 1;
            progress.inc(format!(
                "epoch {}/{} loss {:.3}{}",
                epoch + 1,
                cfg.epochs,
                sum / count as f64,
                hooks.status()
            ));
        }
        log.push(sum / count.max(1) as f64);
        tracing::debug!(step = cfg.label, epoch, loss = log[epoch], "epoch done");
    }
    progress.finish();
    Ok((model, log))
}

/// [`fit`] with a plain loss.
pub fn train_supervised<M: Classifier>(
    model: M,
    set: &ImageSet,
    meta: &DatasetMeta,
    cfg: &Supervised,
    loss: LossKind,
    device: &Device,
) -> Result<(M, LossLog)> {
    fit(model, set, meta, cfg, &mut Plain(loss), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{Vit, VitConfig};

    /// A ViT with patch 4, 2 heads, MLP ratio 2 and 10 classes.
    fn vit(image_size: usize, dim: usize, depth: usize) -> VitConfig {
        VitConfig {
            image_size,
            patch_size: 4,
            dim,
            depth,
            heads: 2,
            mlp_ratio: 2,
            num_classes: 10,
        }
    }

    /// A step's numbers do not depend on the threads its kernels run on: two training steps
    /// of the cpu scale's ViT on a batch of 64 give bit-identical weights on 1 and 2 threads.
    #[test]
    fn same_weights_whatever_the_thread_count() {
        let cfg = vit(32, 64, 4);
        let raw = crate::data::synthetic::generate(3, 64, 0, 32);
        let meta = raw.meta("synthetic");
        let train = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let ad = Device::flex().autodiff();
                let sup = Supervised {
                    label: "threads",
                    epochs: 2,
                    batch_size: 64,
                    views: &[View::Flip],
                    lr: vec![1e-3; 2],
                    wd: vec![0.05; 2],
                    seed: 1,
                    keep_last: false,
                };
                let (m, _) = train_supervised(
                    Vit::new(&cfg, 2, &ad),
                    &raw.train,
                    &meta,
                    &sup,
                    LossKind::Ce,
                    &ad,
                )
                .unwrap();
                let logits = crate::train::logits(&m, &raw.train, &meta, 64, &Device::flex());
                (crate::models::named_params(&m.valid()), logits.values)
            })
        };
        let (w1, l1) = train(1);
        let (w2, l2) = train(2);
        assert_eq!(w1, w2, "weights differ between 1 and 2 threads");
        assert_eq!(l1, l2, "logits differ between 1 and 2 threads");
    }

    /// Cross-entropy that the loop must not split.
    struct Whole;
    impl<M: Classifier> Hooks<M> for Whole {
        fn mean_over_images(&self) -> bool {
            false
        }
    }

    /// The sharded gradient is the whole batch's gradient (up to rounding), including with
    /// two views per image and a batch that does not divide evenly; so is the loss.
    #[test]
    fn sharded_gradients_equal_the_whole_batch_gradient() {
        let cfg = vit(16, 32, 2);
        let raw = crate::data::synthetic::generate(5, 40, 0, 16);
        let meta = raw.meta("synthetic");
        let ad = Device::flex().autodiff();
        let model = Vit::new(&cfg, 3, &ad);
        let images: Vec<usize> = (0..37).collect();
        let xs = crate::train::views(
            &raw.train,
            &images,
            &[View::NoAug, View::Flip],
            &meta,
            &mut rng_for(0, 0, 0, 0),
            &ad,
        );
        let y = labels(&raw.train, &images, &ad);
        let batch = Batch {
            epoch: 0,
            index: 0,
            iter: 0,
            images: &images,
            y: Tensor::cat(vec![y; 2], 0),
            x: Tensor::cat(xs, 0),
            views: 2,
            lr: 1.0,
            wd: 0.0,
            loss: f64::NAN,
        };
        let sgd = || Optimiser {
            inner: burn::optim::SgdConfig::new().init(),
        };
        let (sharded, l1) =
            learning_step(model.clone(), &mut sgd(), &Plain(LossKind::Ce), &batch, &ad).unwrap();
        let (whole, l2) = learning_step(model.clone(), &mut sgd(), &Whole, &batch, &ad).unwrap();
        let before = crate::models::named_params(&model.valid());
        let (a, b) = (
            crate::models::named_params(&sharded.valid()),
            crate::models::named_params(&whole.valid()),
        );
        assert!((l1 - l2).abs() < 1e-5, "loss {l1} vs {l2}");
        let mut moved = 0.0f32;
        for ((name, (_, w0)), ((_, (_, wa)), (_, (_, wb)))) in
            before.iter().zip(a.iter().zip(b.iter()))
        {
            for ((x0, xa), xb) in w0.iter().zip(wa).zip(wb) {
                moved = moved.max((x0 - xb).abs());
                assert!(
                    (xa - xb).abs() <= 1e-5 + 1e-4 * (x0 - xb).abs(),
                    "{name}: {xa} vs {xb}"
                );
            }
        }
        assert!(moved > 1e-3, "the step moved no weight ({moved})");
    }
}
