//! ABL — Anti-Backdoor Learning (Li et al. 2021b), configured as in the paper's Appendix A.2.
//!
//! 1. **Isolation** ([`run_isolate_step`], its own cached step): f_r is finetuned from the
//!    pretrained checkpoint on the poisoned finetuning set with the finetuning recipe, but
//!    with ABL's local gradient ascent loss sign(ℓ − γ)·ℓ (or Flooding |ℓ − γ| + γ), which
//!    keeps the loss of easily learned (triggered) images low. The r_isol fraction of the
//!    finetuning images with the lowest cross-entropy under that model is isolated
//!    (r_isol = 0.01 in the paper).
//! 2. **Unlearning** ([`run_unlearn`], the `finetune` step of ABL): the isolation model
//!    unlearns the isolated set by gradient ascent on ℓ(f_r(x), y) with Adam at a constant
//!    unlearning rate (paper: 5·10⁻⁷ CIFAR10, 1·10⁻⁶ GTSRB, 2·10⁻⁷ TinyImageNet, Table 12)
//!    for `unlearn_epochs` epochs (ABL's default 5).
//!
//! The isolation quality (FPR/FNR of the isolated set against the true poison indices) is
//! recorded with the model, as Table 1 reports it.

use std::path::Path;

use anyhow::{Result, bail};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::FinetuneParams;
use super::ieu::GateStats;
use crate::data::{DatasetMeta, ImageSet};
use crate::train::{
    LossKind, Supervised, View, cross_entropy, cross_entropy_per_sample, iters_per_epoch, labels,
    rng_for, train_supervised, views,
};

/// ABL settings of a spec (`defaults.abl`, or a variant's `abl:`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AblSettings {
    /// Fraction of the finetuning set isolated as poisoned (lowest loss first).
    pub r_isol: f64,
    /// Loss of the isolation finetune: `{lga: gamma}` (ABL's default, γ = 0.5) or
    /// `{flooding: gamma}`.
    pub isolation_loss: LossKind,
    /// Unlearning learning rate; `null` takes the scale's `baselines.abl_unlearn_lr`.
    pub unlearn_lr: Option<f64>,
    /// Epochs of gradient ascent over the isolated set.
    pub unlearn_epochs: usize,
}

impl Default for AblSettings {
    fn default() -> Self {
        Self {
            r_isol: 0.01,
            isolation_loss: LossKind::Lga(0.5),
            unlearn_lr: None,
            unlearn_epochs: 5,
        }
    }
}

impl AblSettings {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.r_isol > 0.0 && self.r_isol < 1.0) {
            return Err(format!("r_isol {} is not in (0, 1)", self.r_isol));
        }
        if self.isolation_loss.is_ce() {
            return Err("isolation_loss must be {lga: gamma} or {flooding: gamma}".into());
        }
        self.isolation_loss
            .validate()
            .map_err(|e| format!("isolation_loss: {e}"))?;
        if let Some(lr) = self.unlearn_lr
            && !(lr > 0.0 && lr.is_finite())
        {
            return Err(format!("unlearn_lr {lr} must be a positive number"));
        }
        if self.unlearn_epochs == 0 {
            return Err("unlearn_epochs must be at least 1".into());
        }
        Ok(())
    }
}

/// Parameters of the isolation step: the finetuning recipe with ABL's loss, and r_isol.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IsolateParams {
    pub finetune: FinetuneParams,
    pub loss: LossKind,
    pub r_isol: f64,
}

/// What the isolation step found, written to `isolation.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Isolation {
    /// Indices of the isolated finetuning images, lowest loss first.
    pub isolated: Vec<usize>,
    /// The isolated set against the true poison indices ("flagged" = isolated).
    pub gate: GateStats,
    pub loss_per_epoch: Vec<f64>,
}

/// The `r` fraction of indices with the lowest loss (at least one), lowest first; ties are
/// broken by index so the result is deterministic.
pub fn lowest_fraction(losses: &[f32], r: f64) -> Vec<usize> {
    let n = ((losses.len() as f64 * r).round() as usize).clamp(1, losses.len().max(1));
    let mut idx: Vec<usize> = (0..losses.len()).collect();
    idx.sort_by(|&a, &b| losses[a].total_cmp(&losses[b]).then(a.cmp(&b)));
    idx.truncate(n.min(losses.len()));
    idx
}

/// Per-image cross-entropy of the (unaugmented) images of `set` under `model`.
pub fn per_image_loss(
    model: &crate::models::Vit,
    set: &ImageSet,
    meta: &DatasetMeta,
    batch: usize,
    device: &Device,
) -> Vec<f32> {
    let model = model.valid();
    let idx: Vec<usize> = (0..set.len()).collect();
    let mut rng = rng_for(0, 0, 0, 0);
    let mut out = Vec::with_capacity(set.len());
    for chunk in idx.chunks(batch) {
        let x = views(set, chunk, &[View::NoAug], meta, &mut rng, device)
            .pop()
            .unwrap();
        let ce = cross_entropy_per_sample(model.forward(x), labels(set, chunk, device));
        out.extend(ce.to_data().convert::<f32>().try_to_vec::<f32>().unwrap());
    }
    out
}

/// The isolation step: writes the LGA-finetuned model and `isolation.json`.
pub fn run_isolate_step(
    p: &IsolateParams,
    dataset: &Path,
    poison: &Path,
    pretrain: &Path,
    out: &Path,
    device: &Device,
) -> Result<GateStats> {
    let meta = crate::data::load_meta(dataset)?;
    let tune = ImageSet::load(&poison.join("tune.safetensors"))?;
    let poison_idx = crate::attacks::load_poison_indices(poison)?;
    let f = &p.finetune;
    let (model, cfg) =
        super::none::initial_robust_model(pretrain, meta.num_classes(), f.seed, device)?;
    let (lr, wd) = f.schedules(iters_per_epoch(tune.len(), f.batch_size));
    let sup = Supervised {
        label: "abl isolation",
        epochs: f.schedule.epochs,
        batch_size: f.batch_size,
        views: f.learn_views(),
        lr,
        wd,
        seed: f.seed,
        loss: p.loss.clone(),
    };
    let ad = device.clone().autodiff();
    let (model, log) = train_supervised(model, &tune, &meta, &sup, &ad)?;
    let losses = per_image_loss(&model, &tune, &meta, 256, device);
    let isolated = lowest_fraction(&losses, p.r_isol);
    let mut flags = vec![false; tune.len()];
    for &i in &isolated {
        flags[i] = true;
    }
    let gate = GateStats::from_flags(&flags, &poison_idx);
    tracing::info!(
        isolated = isolated.len(),
        poisoned_among_them = gate.poisoned_flagged,
        "ABL isolation"
    );
    crate::models::save_vit(&model.valid(), &cfg, out)?;
    let iso = Isolation {
        isolated,
        gate: gate.clone(),
        loss_per_epoch: log,
    };
    crate::store::write_json(&out.join("isolation.json"), &iso)?;
    Ok(gate)
}

/// The `finetune` step with `defence: abl` (unlearning on the isolation step's model).
pub fn run(
    p: &super::FinetuneParams,
    inputs: &super::FinetuneInputs,
    out: &Path,
    device: &Device,
) -> Result<()> {
    let super::DefenceParams::Abl {
        unlearn_lr,
        unlearn_epochs,
    } = &p.defence
    else {
        bail!("abl::run called for defence {:?}", p.defence)
    };
    let Some(isolate) = inputs.isolate else {
        bail!("abl unlearning needs the isolation step")
    };
    run_unlearn(
        p,
        *unlearn_lr,
        *unlearn_epochs,
        inputs.dataset,
        inputs.poison,
        isolate,
        out,
        device,
    )
}

/// ABL's unlearning phase on the isolation step's model: gradient ascent on the isolated
/// set with Adam at a constant learning rate. Writes the model and `train_stats.json`
/// (with the isolation's `gate` statistics, so reports show its FPR/FNR).
pub fn run_unlearn(
    p: &FinetuneParams,
    unlearn_lr: f64,
    unlearn_epochs: usize,
    dataset: &Path,
    poison: &Path,
    isolate: &Path,
    out: &Path,
    device: &Device,
) -> Result<()> {
    let meta = crate::data::load_meta(dataset)?;
    let tune = ImageSet::load(&poison.join("tune.safetensors"))?;
    let iso: Isolation =
        serde_json::from_str(&std::fs::read_to_string(isolate.join("isolation.json"))?)?;
    let ad = device.clone().autodiff();
    let (mut model, cfg) = crate::models::load_vit(isolate, &ad)?;
    let mut optim = AdamConfig::new().with_epsilon(1e-8).init();
    let mut losses = Vec::new();
    for epoch in 0..unlearn_epochs {
        // Every isolated image every epoch: the last batch is kept even when partial.
        let mut order = iso.isolated.clone();
        rand::seq::SliceRandom::shuffle(&mut order[..], &mut rng_for(p.seed, epoch, 0, 0xAB1));
        for (bi, batch) in order.chunks(p.batch_size).enumerate() {
            let mut rng = rng_for(p.seed, epoch, bi, 0xAB2);
            let xs = views(&tune, batch, p.learn_views(), &meta, &mut rng, &ad);
            let y = labels(&tune, batch, &ad);
            let ys = Tensor::cat(vec![y; xs.len()], 0);
            let ce = cross_entropy(model.forward(Tensor::cat(xs, 0)), ys);
            let value = ce.clone().into_scalar::<f32>() as f64;
            if !value.is_finite() {
                bail!("abl unlearning: non-finite loss {value} at epoch {epoch}, batch {bi}");
            }
            let grads = GradientsParams::from_grads(ce.neg().backward(), &model);
            model = optim.step(unlearn_lr, model, grads);
            losses.push(value);
        }
    }
    let stats = serde_json::json!({
        "gate": iso.gate,
        "isolated": iso.isolated.len(),
        "unlearn_lr": unlearn_lr,
        "unlearn_losses": losses,
    });
    crate::models::save_with_stats(&model.valid(), &cfg, &stats, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolates_the_lowest_losses_deterministically() {
        let losses = [0.5f32, 0.1, 0.9, 0.1, 2.0, 0.05, 1.0, 0.7, 0.3, 0.2];
        // r = 0.3 of 10 images: the three lowest, ties broken by index.
        assert_eq!(lowest_fraction(&losses, 0.3), vec![5, 1, 3]);
        // Always at least one image.
        assert_eq!(lowest_fraction(&losses, 0.01), vec![5]);
    }

    #[test]
    fn settings_are_checked() {
        assert!(AblSettings::default().validate().is_ok());
        let bad = AblSettings {
            isolation_loss: LossKind::Ce,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("isolation_loss"));
        let bad = AblSettings {
            r_isol: 1.5,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("r_isol"));
    }
}
