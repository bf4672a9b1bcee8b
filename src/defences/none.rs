//! No defence: vanilla finetuning of f_r on the poisoned finetuning set.

use std::path::Path;

use anyhow::Result;
use burn::prelude::*;

use super::{FinetuneInputs, FinetuneParams};
use crate::data::ImageSet;
use crate::train::{Supervised, iters_per_epoch, train_supervised};

/// Loads the pretrained checkpoint on the autodiff device with a fresh head: the starting
/// point of f_r for every defence.
pub fn initial_robust_model(
    pretrain: &Path,
    num_classes: usize,
    seed: u64,
    device: &Device,
) -> Result<(crate::models::Vit, crate::models::VitConfig)> {
    let ad = device.clone().autodiff();
    let (vit, mut cfg) = crate::models::load_vit(pretrain, &ad)?;
    cfg.num_classes = num_classes;
    Ok((vit.with_new_head(num_classes, seed ^ 0x4EAD, &ad), cfg))
}

/// [`initial_robust_model`] for any architecture (the checkpoint's `config.json` says
/// which): the starting point of f_r for no defence and IEU.
pub fn initial_robust_net(
    pretrain: &Path,
    num_classes: usize,
    seed: u64,
    device: &Device,
) -> Result<(crate::models::Net, crate::models::NetConfig)> {
    let ad = device.clone().autodiff();
    let (net, mut cfg) = crate::models::load_net(pretrain, &ad)?;
    cfg.vit.num_classes = num_classes;
    Ok((net.with_new_head(num_classes, seed ^ 0x4EAD, &ad), cfg))
}

pub fn run(p: &FinetuneParams, inputs: &FinetuneInputs, out: &Path, device: &Device) -> Result<()> {
    let meta = crate::data::load_meta(inputs.dataset)?;
    let tune = ImageSet::load(&inputs.poison.join("tune.safetensors"))?;
    let (model, cfg) = initial_robust_net(inputs.pretrain, meta.num_classes(), p.seed, device)?;
    let iters = iters_per_epoch(tune.len(), p.batch_size);
    let (lr, wd) = p.schedules(iters);
    let sup = Supervised {
        label: "finetune",
        epochs: p.schedule.epochs,
        batch_size: p.batch_size,
        views: p.learn_views(),
        lr,
        wd,
        seed: p.seed,
        loss: crate::train::LossKind::Ce,
    };
    let ad = device.clone().autodiff();
    let (model, log) = train_supervised(model, &tune, &meta, &sup, &ad)?;
    let stats = serde_json::json!({ "loss_per_epoch": log });
    crate::models::save_net_with_stats(&model.valid(), &cfg, &stats, out)
}
