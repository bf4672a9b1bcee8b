//! Fine-Pruning (Liu, Dolan-Gavitt and Garg, RAID 2018), on the ViT.
//!
//! A post-training defence with a small clean set, like I-BAU (the first `clean_images`
//! test images; `evaluate` also reports CA without them, `ca_unseen`):
//! 1. **Pruning.** Backdoor behaviour hides in neurons that clean inputs leave dormant.
//!    Starting from the cell's no-defence model, the hidden units of the last block's MLP
//!    (the ViT's counterpart of the paper's last convolutional layer) are ranked by their
//!    mean activation GELU(fc1(LN(x))) over the clean set's tokens and pruned in increasing
//!    order, `prune_step` of them at a time, for as long as the clean accuracy stays within
//!    `max_accuracy_drop` points of the unpruned model's (the paper's stopping rule, 4
//!    points). A pruned unit j has column j of fc1's weight, fc1's bias j and row j of
//!    fc2's weight set to zero: its output is GELU(0)·0 = 0 and both its gradients are 0,
//!    so it stays pruned while finetuning.
//! 2. **Fine-tuning** of the pruned model on the same clean images, `epochs` epochs with
//!    AdamW at a constant learning rate `lr` (the scale's finetuning rate by default).
//!
//! Adding this defence took this file and one line in `defences::REGISTRY`.

use std::path::Path;

use crate::models::fused::gelu;
use anyhow::{Result, bail};
use burn::module::Param;
use burn::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Defence, DefenceParams, FinetuneInputs, FinetuneParams, Settings};
use crate::data::{DatasetMeta, ImageSet};
use crate::models::Vit;
use crate::spec::plan::CellPlan;
use crate::train::{LossKind, Supervised, View, accuracy, predict, rng_for, views};

/// Fine-Pruning in the registry.
pub struct FinePruning;

impl Defence for FinePruning {
    fn name(&self) -> &'static str {
        "fine-pruning"
    }
    fn default_settings(&self) -> Option<Value> {
        FinePruningSettings::defaults()
    }
    fn check(&self, settings: &Value) -> Result<(), String> {
        FinePruningSettings::checked(settings).map(|_| ())
    }
    /// Post-training: prunes and finetunes the cell's no-defence model.
    fn plan(&self, cell: &mut CellPlan, settings: &Value) -> Result<String> {
        let s = FinePruningSettings::of(settings)?;
        let scale = cell.ds.scale;
        let params = FinePruningParams {
            max_accuracy_drop: s.max_accuracy_drop,
            prune_step: s.prune_step,
            clean_images: s.clean_images.unwrap_or(scale.baselines.ibau_clean_images),
            epochs: s.epochs,
            lr: s.lr.unwrap_or(scale.finetune.lr),
        };
        let backdoored = cell.undefended()?;
        cell.finetune(
            DefenceParams::new("fine-pruning", &params)?,
            &[("backdoored", &backdoored)],
        )
    }
    fn run(
        &self,
        p: &FinetuneParams,
        inputs: &FinetuneInputs,
        out: &Path,
        device: &Device,
    ) -> Result<()> {
        run(p, inputs, out, device)
    }
}

/// Fine-Pruning settings of a spec (`defaults.fine-pruning`, a variant's `fine-pruning:`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinePruningSettings {
    /// Pruning stops before the clean accuracy falls more than this many points.
    pub max_accuracy_drop: f64,
    /// Fraction of the MLP's hidden units pruned per round.
    pub prune_step: f64,
    /// Clean test images the defender holds; `null` takes the scale's
    /// `baselines.ibau_clean_images` (the same clean set as I-BAU's).
    pub clean_images: Option<usize>,
    /// Fine-tuning epochs over the clean images.
    pub epochs: usize,
    /// Fine-tuning learning rate; `null` takes the scale's `finetune.lr`.
    pub lr: Option<f64>,
}

impl Default for FinePruningSettings {
    fn default() -> Self {
        Self {
            max_accuracy_drop: 4.0,
            prune_step: 0.05,
            clean_images: None,
            epochs: 10,
            lr: None,
        }
    }
}

impl Settings for FinePruningSettings {
    fn validate(&self) -> Result<(), String> {
        if !(self.max_accuracy_drop >= 0.0 && self.max_accuracy_drop <= 100.0) {
            return Err(format!(
                "max_accuracy_drop: {} is not in [0, 100]",
                self.max_accuracy_drop
            ));
        }
        if !(self.prune_step > 0.0 && self.prune_step <= 1.0) {
            return Err(format!("prune_step: {} is not in (0, 1]", self.prune_step));
        }
        if self.clean_images == Some(0) {
            return Err("clean_images: must be at least 1".into());
        }
        if let Some(lr) = self.lr
            && !(lr > 0.0 && lr.is_finite())
        {
            return Err(format!("lr: {lr} must be a positive number"));
        }
        Ok(())
    }
}

/// Parameters of the `finetune` step with `defence: fine-pruning`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinePruningParams {
    pub max_accuracy_drop: f64,
    pub prune_step: f64,
    pub clean_images: usize,
    pub epochs: usize,
    pub lr: f64,
}

/// What pruning did, written to `train_stats.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FinePruningStats {
    pub hidden_units: usize,
    pub pruned_units: usize,
    pub clean_accuracy_before: f64,
    pub clean_accuracy_pruned: f64,
    pub loss_per_epoch: Vec<f64>,
    /// The first this many clean test images were used (evaluation reports CA without
    /// them).
    pub clean_test_images_used: usize,
}

/// The `finetune` step with `defence: fine-pruning`.
pub fn run(p: &FinetuneParams, inputs: &FinetuneInputs, out: &Path, device: &Device) -> Result<()> {
    let fp: FinePruningParams = p.defence.fields()?;
    let meta = crate::data::load_meta(&inputs.dataset)?;
    let test = ImageSet::load(&inputs.dataset.join("test.safetensors"))?;
    if test.is_empty() {
        bail!("fine-pruning needs clean test images, but the test split is empty");
    }
    let n_clean = fp.clean_images.min(test.len());
    let clean = test.subset(&(0..n_clean).collect::<Vec<_>>());
    let (model, cfg) = crate::models::load_vit(inputs.input("backdoored")?, device)?;
    let batch = 256;
    let acc = |m: &Vit| accuracy(&predict(m, &clean, &meta, batch, device), &clean);

    // 1. Rank the last block's hidden units by mean activation on the clean set.
    let activation = mean_activation(&model, &clean, &meta, batch, device);
    let hidden = activation.len();
    let mut order: Vec<usize> = (0..hidden).collect();
    order.sort_by(|&a, &b| activation[a].total_cmp(&activation[b]).then(a.cmp(&b)));
    let before = acc(&model);
    let step = ((fp.prune_step * hidden as f64).round() as usize).max(1);
    let (mut pruned, mut kept_acc) = (0usize, before);
    while pruned + step <= hidden {
        let a = acc(&prune(&model, &order[..pruned + step], device));
        if before - a > fp.max_accuracy_drop {
            break;
        }
        pruned += step;
        kept_acc = a;
    }
    tracing::info!(
        pruned,
        hidden,
        clean_accuracy = format!("{before:.2}% -> {kept_acc:.2}%"),
        "fine-pruning: pruned the last block's MLP"
    );

    // 2. Fine-tune the pruned model on the clean images.
    let ad = device.clone().autodiff();
    let current = prune(
        &crate::models::load_vit(inputs.input("backdoored")?, &ad)?.0,
        &order[..pruned],
        &ad,
    );
    let iters = crate::train::iters_per_epoch(clean.len(), p.batch_size);
    let sup = Supervised {
        label: "fine-pruning",
        epochs: fp.epochs,
        batch_size: p.batch_size,
        views: p.learn_views(),
        lr: vec![fp.lr; fp.epochs * iters],
        wd: vec![0.0; fp.epochs * iters],
        seed: p.seed,
        keep_last: false,
    };
    let (model, log) = if fp.epochs > 0 {
        crate::train::train_supervised(current, &clean, &meta, &sup, LossKind::Ce, &ad)?
    } else {
        (current, Vec::new())
    };
    let stats = FinePruningStats {
        hidden_units: hidden,
        pruned_units: pruned,
        clean_accuracy_before: before,
        clean_accuracy_pruned: kept_acc,
        loss_per_epoch: log,
        clean_test_images_used: n_clean,
    };
    crate::models::save_with_stats(&model.valid(), &cfg, &stats, out)
}

/// Mean activation GELU(fc1(LN(h))) of each hidden unit of the last block's MLP, over
/// every token of every image.
pub fn mean_activation(
    model: &Vit,
    set: &ImageSet,
    meta: &DatasetMeta,
    batch: usize,
    device: &Device,
) -> Vec<f64> {
    let (last, earlier) = model.blocks.split_last().expect("a ViT has blocks");
    let mut sum: Vec<f64> = Vec::new();
    let mut tokens = 0usize;
    let idx: Vec<usize> = (0..set.len()).collect();
    let mut rng = rng_for(0, 0, 0, 0);
    for chunk in idx.chunks(batch) {
        let x = views(set, chunk, &[View::NoAug], meta, &mut rng, device)
            .pop()
            .expect("one view");
        let b = x.dims()[0];
        let patches = model
            .patch_embed
            .forward(crate::models::vit::patchify(x, model.patch_size()));
        let d = patches.dims()[2];
        let cls = model.cls_token.val().expand([b, 1, d]);
        let mut h = Tensor::cat(vec![cls, patches], 1) + model.pos_embed.val();
        for blk in earlier {
            h = blk.forward(h);
        }
        let h = h.clone() + last.attn.forward(last.norm1.forward(h));
        let a = gelu(last.mlp.fc1.forward(last.norm2.forward(h))); // [B, N+1, hidden]
        let [_, n, hidden] = a.dims();
        let s: Vec<f32> = a
            .sum_dim(1)
            .sum_dim(0)
            .reshape([hidden])
            .to_data()
            .convert::<f32>()
            .try_to_vec()
            .expect("f32 activations");
        if sum.is_empty() {
            sum = vec![0.0; hidden];
        }
        for (acc, v) in sum.iter_mut().zip(s) {
            *acc += v as f64;
        }
        tokens += b * n;
    }
    sum.iter().map(|s| s / tokens.max(1) as f64).collect()
}

/// The model with the given hidden units of the last block's MLP removed.
pub fn prune(model: &Vit, units: &[usize], device: &Device) -> Vit {
    let mut model = model.clone();
    let last = model.blocks.last_mut().expect("a ViT has blocks");
    let hidden = last.mlp.fc1.weight.val().dims()[1];
    let mut keep = vec![1f32; hidden];
    for &u in units {
        keep[u] = 0.0;
    }
    let row = Tensor::<2>::from_data(TensorData::new(keep.clone(), [1, hidden]), device);
    let col = Tensor::<2>::from_data(TensorData::new(keep.clone(), [hidden, 1]), device);
    let vec = Tensor::<1>::from_data(TensorData::new(keep, [hidden]), device);
    last.mlp.fc1.weight = masked(last.mlp.fc1.weight.clone(), row);
    if let Some(b) = last.mlp.fc1.bias.clone() {
        last.mlp.fc1.bias = Some(masked(b, vec));
    }
    last.mlp.fc2.weight = masked(last.mlp.fc2.weight.clone(), col);
    model
}

/// θ ⊙ mask, kept a trainable leaf (as the optimisers update parameters).
fn masked<const D: usize>(param: Param<Tensor<D>>, mask: Tensor<D>) -> Param<Tensor<D>> {
    param.map(|t| {
        if !t.is_autodiff() {
            return t.mul(mask);
        }
        let grad = t.is_require_grad();
        let out = Tensor::from_inner(t.inner().mul(mask.inner()));
        if grad { out.require_grad() } else { out }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::VitConfig;

    fn small() -> (Vit, VitConfig) {
        let cfg = VitConfig {
            image_size: 8,
            patch_size: 4,
            dim: 8,
            depth: 2,
            heads: 2,
            mlp_ratio: 2,
            num_classes: 3,
        };
        (Vit::new(&cfg, 1, &Device::flex()), cfg)
    }

    #[test]
    fn pruned_units_output_nothing_and_stay_pruned() {
        let device = Device::flex();
        let (vit, _) = small();
        let pruned = prune(&vit, &[0, 3], &device);
        let last = pruned.blocks.last().unwrap();
        let w1: Vec<f32> = last.mlp.fc1.weight.val().to_data().try_to_vec().unwrap();
        let w2: Vec<f32> = last.mlp.fc2.weight.val().to_data().try_to_vec().unwrap();
        // fc1: [dim = 8, hidden = 16]; fc2: [16, 8].
        for r in 0..8 {
            assert_eq!(w1[r * 16], 0.0);
            assert_eq!(w1[r * 16 + 3], 0.0);
            assert_ne!(w1[r * 16 + 1], 0.0);
        }
        assert!(w2[..8].iter().all(|&v| v == 0.0));
        assert!(w2[8..16].iter().any(|&v| v != 0.0));
        // The other blocks are untouched.
        let a: Vec<f32> = vit.blocks[0]
            .mlp
            .fc1
            .weight
            .val()
            .to_data()
            .try_to_vec()
            .unwrap();
        let b: Vec<f32> = pruned.blocks[0]
            .mlp
            .fc1
            .weight
            .val()
            .to_data()
            .try_to_vec()
            .unwrap();
        assert_eq!(a, b);

        // A training step leaves pruned weights at zero (their gradients are zero).
        let ad = device.autodiff();
        let model = prune(&Vit::new(&small().1, 1, &ad), &[0, 3], &ad);
        let x = Tensor::<4>::ones([2, 3, 8, 8], &ad);
        let y = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 2], [2]), &ad);
        let loss = crate::train::cross_entropy(model.forward(x), y);
        let model = crate::train::Optimiser::adamw().descend(model, loss, 1e-2, 0.05);
        let w1: Vec<f32> = model.blocks[1]
            .mlp
            .fc1
            .weight
            .val()
            .to_data()
            .try_to_vec()
            .unwrap();
        assert!((0..8).all(|r| w1[r * 16] == 0.0 && w1[r * 16 + 3] == 0.0));
    }

    #[test]
    fn settings_are_checked() {
        assert!(FinePruningSettings::default().validate().is_ok());
        let bad = FinePruningSettings {
            prune_step: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().starts_with("prune_step"));
    }
}
