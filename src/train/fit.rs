//! The one training loop. Pretraining, IEU's stage 1 and stage 2, ABL's isolation and every
//! baseline's finetuning run through [`fit`]; what differs between them is passed in: the
//! schedule and views ([`Supervised`]), and [`Hooks`] for the batch loss and what happens
//! after each learning step (IEU queues and unlearns there).

use anyhow::{Result, bail};
use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;

use super::{
    CLIP_GRAD, Decay, LossKind, View, cross_entropy, epoch_batches, labels, rng_for, views,
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
}

/// What a method changes in the loop.
pub trait Hooks<M: Classifier> {
    /// The optimiser of the learning steps (default: AdamW with clipping).
    fn optimiser(&self) -> Optimiser {
        Optimiser::adamw()
    }
    /// Called before the first batch of every epoch.
    fn epoch_start(&mut self, _epoch: usize) {}
    /// The loss the learning step minimises (default: cross-entropy on the views).
    fn loss(&mut self, model: &M, batch: &Batch) -> Result<Tensor<1>> {
        Ok(cross_entropy(
            model.forward(batch.x.clone()),
            batch.y.clone(),
        ))
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
    fn loss(&mut self, model: &M, batch: &Batch) -> Result<Tensor<1>> {
        let ce = cross_entropy(model.forward(batch.x.clone()), batch.y.clone());
        Ok(self.0.apply(ce))
    }
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
            let batch = Batch {
                epoch,
                index,
                iter,
                images,
                y: Tensor::cat(vec![y; nviews], 0),
                x: Tensor::cat(xs, 0),
                views: nviews,
                lr: cfg.lr[iter],
                wd: cfg.wd[iter],
            };
            let loss = hooks.loss(&model, &batch)?;
            let value = loss.clone().into_scalar::<f32>() as f64;
            if !value.is_finite() {
                bail!(
                    "{}: non-finite training loss {value} at epoch {epoch}, batch {index}",
                    cfg.label
                );
            }
            model = optim.descend(model, loss, batch.lr, batch.wd);
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

    /// A step's numbers do not depend on the threads its kernels run on: two training steps
    /// of the cpu scale's ViT on a batch of 64 give bit-identical weights on 1 and 2 threads.
    #[test]
    fn same_weights_whatever_the_thread_count() {
        let cfg = VitConfig {
            image_size: 32,
            patch_size: 4,
            dim: 64,
            depth: 4,
            heads: 2,
            mlp_ratio: 2,
            num_classes: 10,
        };
        let raw = crate::data::synthetic::generate(3, 64, 0, 32);
        let meta = DatasetMeta {
            name: "synthetic".into(),
            classes: raw.classes.clone(),
            image_size: 32,
            mean: raw.mean,
            std: raw.std,
            pretrain: 0,
            tune: 64,
            test: 0,
        };
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
}
