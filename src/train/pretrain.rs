//! The `pretrain` step: the clean starting checkpoint, trained from scratch on the
//! pretrain split (no pretrained ViT exists offline; `defaults.pretrained` imports one).

use std::path::Path;

use anyhow::{Result, bail};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::{
    LossKind, Supervised, View, accuracy, cosine_schedule, iters_per_epoch, predict,
    train_supervised,
};
use crate::data::ImageSet;
use crate::models::{Arch, Net, NetConfig, VitConfig};
use crate::spec::{ModelDims, Scale};

/// The clean starting checkpoint: a ViT trained from scratch on the pretrain split, which
/// is disjoint from the finetuning set (no pretrained ViT exists offline).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainParams {
    pub model: ModelDims,
    /// The architecture (Table 8); the ViT by default, left out of the key.
    #[serde(default, skip_serializing_if = "Arch::is_vit")]
    pub arch: Arch,
    pub view: View,
    pub image_size: usize,
    pub epochs: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: usize,
    pub weight_decay: f64,
    pub batch_size: usize,
    pub seed: u64,
}

impl PretrainParams {
    /// The scale's pretraining of the ViT on `dataset` (its own epochs if the scale gives
    /// it some: `pretrain.epochs_per_dataset`).
    pub fn from_scale(s: &Scale, dataset: &str, seed: u64) -> Self {
        Self {
            model: s.model.clone(),
            arch: Arch::Vit,
            view: s.pretrain.view,
            image_size: s.image_size,
            epochs: s.pretrain.epochs_on(dataset),
            lr: s.pretrain.lr,
            min_lr: s.pretrain.min_lr,
            warmup_epochs: s.pretrain.warmup_epochs,
            weight_decay: s.pretrain.weight_decay,
            batch_size: s.batch_size,
            seed,
        }
    }

    pub fn vit_config(&self, num_classes: usize) -> VitConfig {
        VitConfig {
            image_size: self.image_size,
            patch_size: self.model.patch_size,
            dim: self.model.dim,
            depth: self.model.depth,
            heads: self.model.heads,
            mlp_ratio: self.model.mlp_ratio,
            num_classes,
        }
    }
}

/// Writes `model.safetensors`, `config.json` and `train_log.json` (loss per epoch, and on
/// the clean test split the accuracy and the calibration: the mean max-softmax probability).
pub fn run_pretrain_step(
    p: &PretrainParams,
    dataset_dir: &Path,
    out: &Path,
    device: &Device,
) -> Result<f64> {
    let meta = crate::data::load_meta(dataset_dir)?;
    let set = ImageSet::load(&dataset_dir.join("pretrain.safetensors"))?;
    if set.is_empty() {
        bail!("the pretrain split is empty: set data.pretrain in the scale");
    }
    let cfg = NetConfig::new(p.arch, p.vit_config(meta.num_classes()));
    let ad = device.clone().autodiff();
    let model = Net::new(&cfg, p.seed, &ad);
    let iters = iters_per_epoch(set.len(), p.batch_size);
    let lr = cosine_schedule(p.lr, p.min_lr, p.epochs, iters, p.warmup_epochs, 0.0);
    let wd = vec![p.weight_decay; lr.len()];
    let sup = Supervised {
        label: "pretrain",
        epochs: p.epochs,
        batch_size: p.batch_size,
        views: &[p.view],
        lr,
        wd,
        seed: p.seed,
        keep_last: false,
    };
    let (model, log) = train_supervised(model, &set, &meta, &sup, LossKind::Ce, &ad)?;
    let test = ImageSet::load(&dataset_dir.join("test.safetensors"))?;
    let preds = predict(&model, &test, &meta, 256, device);
    let acc = accuracy(&preds, &test);
    let confidence =
        100.0 * preds.iter().map(|&(_, p)| p as f64).sum::<f64>() / preds.len().max(1) as f64;
    tracing::info!("    clean test accuracy {acc:.2}%, mean max-probability {confidence:.2}%");
    crate::models::save_net(&model.valid(), &cfg, out)?;
    let info = serde_json::json!({
        "loss_per_epoch": log,
        "clean_test_accuracy": acc,
        "mean_max_probability": confidence,
    });
    crate::store::write_json(&out.join("train_log.json"), &info)?;
    Ok(acc)
}
