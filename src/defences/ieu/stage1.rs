//! IEU stage 1: the poisoned module f_p — the first `depth` blocks of the pretrained
//! checkpoint with a new head — tuned on the raw poisoned finetuning set.

use std::path::Path;

use anyhow::{Result, bail};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::{CONFIDENCES, Confidences, GATE_BATCH, IeuSettings, Stage1Loss};
use crate::data::ImageSet;
use crate::spec::plan::DatasetPlan;
use crate::train::{Plain, Supervised, View, cosine_schedule, fit, iters_per_epoch};

/// Stage-1 settings (paper Table 11: 10 epochs, lr 2·10⁻⁴, one warm-up epoch, no LGA).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stage1Params {
    pub depth: usize,
    /// LGA / Flooding (Tables 15, 16); plain cross-entropy by default (left out of the key).
    #[serde(default, skip_serializing_if = "Stage1Loss::is_ce")]
    pub loss: Stage1Loss,
    pub epochs: usize,
    pub lr: f64,
    pub warmup_epochs: usize,
    pub batch_size: usize,
    pub seed: u64,
}

/// Plans stage 1 (f_p) on an attack's poisoned data; `who` names the setting in errors.
/// IEU's cells and CAT's attack (which tunes f_p as the defender would) both use it.
pub fn plan_stage1(
    plan: &mut crate::dag::Plan,
    ds: &DatasetPlan,
    ieu: &IeuSettings,
    who: &str,
    attack: &str,
    poison_key: &str,
) -> Result<String> {
    if ieu.fp_depth > ds.start_depth {
        bail!(
            "{}: {who}: f_p depth {} exceeds the {}-block starting checkpoint",
            ds.spec.origin,
            ieu.fp_depth,
            ds.start_depth
        );
    }
    let mut label = format!("stage1 f_p {}/{attack}", ds.dataset);
    if ieu.fp_depth != 1 {
        label.push_str(&format!(" depth {}", ieu.fp_depth));
    }
    if !ieu.stage1_loss.is_ce() {
        label.push_str(&format!(" {:?}", ieu.stage1_loss).to_lowercase());
    }
    let s = &ds.scale.stage1;
    let sp = Stage1Params {
        depth: ieu.fp_depth,
        loss: ieu.stage1_loss.clone(),
        epochs: s.epochs,
        lr: s.lr,
        warmup_epochs: s.warmup_epochs,
        batch_size: ds.scale.batch_size,
        seed: ds.spec.spec.defaults.seed,
    };
    Ok(plan.add(crate::dag::Step::new(
        crate::dag::Kind::Stage1,
        label,
        &sp,
        crate::spec::plan::inputs(&[("poison", poison_key), ("pretrain", ds.pretrain_key)]),
    )?))
}

/// Stage 1: tunes f_p and writes it as `model.safetensors` + `config.json`, with f_p's
/// confidence on every finetuning image (`confidences.json`).
pub fn run_stage1_step(
    p: &Stage1Params,
    dataset: &Path,
    poison: &Path,
    pretrain: &Path,
    out: &Path,
    device: &Device,
) -> Result<()> {
    let meta = crate::data::load_meta(dataset)?;
    let tune = ImageSet::load(&poison.join("tune.safetensors"))?;
    let ad = device.clone().autodiff();
    let (pre, pre_cfg) = crate::models::load_vit(pretrain, &ad)?;
    if p.depth > pre_cfg.depth {
        bail!(
            "f_p depth {} exceeds the checkpoint's {} blocks",
            p.depth,
            pre_cfg.depth
        );
    }
    let fp = pre.truncated(p.depth, meta.num_classes(), p.seed ^ 0xF0, &ad);
    let cfg = crate::models::VitConfig {
        depth: p.depth,
        num_classes: meta.num_classes(),
        ..pre_cfg
    };
    let iters = iters_per_epoch(tune.len(), p.batch_size);
    // min_θp E[ℓ(f_p(x_noAug; θ_p), y)]: unaugmented, a linear warm-up from 0 then a
    // constant rate (reference: base == final lr), no weight decay.
    let lr = cosine_schedule(p.lr, p.lr, p.epochs, iters, p.warmup_epochs, 0.0);
    let sup = Supervised {
        label: "stage1 f_p",
        epochs: p.epochs,
        batch_size: p.batch_size,
        views: &[View::NoAug],
        wd: vec![0.0; lr.len()],
        lr,
        seed: p.seed,
        keep_last: false,
    };
    let (fp, log) = fit(fp, &tune, &meta, &sup, &mut Plain(p.loss.clone()), &ad)?;
    let fp = fp.valid();
    crate::models::save_vit(&fp, &cfg, out)?;
    let info = serde_json::json!({ "loss_per_epoch": log });
    crate::store::write_json(&out.join("train_log.json"), &info)?;
    // max σ(f_p(x)) of every finetuning image, as stage 2's gate computes it (the same
    // function, batch size and saved weights): the paper's Figures 2, 3 and 6.
    let poisoned = crate::attacks::load_poison_indices(poison)?;
    let logits = crate::train::logits(&fp, &tune, &meta, GATE_BATCH, device);
    crate::store::write_json(&out.join(CONFIDENCES), &Confidences::of(&logits, &poisoned))
}
