//! ABL — Anti-Backdoor Learning (Li et al. 2021b), configured as in the paper's Appendix A.2.
//!
//! 1. **Isolation** ([`run_isolate_step`], its own cached step): f_r is finetuned from the
//!    pretrained checkpoint on the poisoned finetuning set with the finetuning recipe, but
//!    with ABL's local gradient ascent loss sign(ℓ − γ)·ℓ (or Flooding |ℓ − γ| + γ), which
//!    keeps the loss of easily learned (triggered) images low. The r_isol fraction of the
//!    finetuning images with the lowest cross-entropy under that model is isolated
//!    (r_isol = 0.01 in the paper).
//! 2. **Finetuning, then unlearning** ([`run`], the `finetune` step of ABL), as upstream
//!    ABL's `backdoor_unlearning.py` does: the isolation model is first finetuned with plain
//!    cross-entropy on the *other* finetuning images (all but the isolated ones) with the
//!    finetuning recipe (cosine learning rate, decoupled weight decay, the scale's views)
//!    for `finetune_epochs` epochs (the scale's finetuning epochs by default; upstream 60 on
//!    CIFAR-10 from scratch), then it unlearns the isolated set by gradient ascent on
//!    ℓ(f_r(x), y) with Adam at a constant unlearning rate (paper: 5·10⁻⁷ CIFAR10, 1·10⁻⁶
//!    GTSRB, 2·10⁻⁷ TinyImageNet, Table 12) for `unlearn_epochs` epochs (ABL's default 5).
//!    `finetune_epochs: 0` unlearns straight after isolation.
//!
//! The isolation quality (FPR/FNR of the isolated set against the true poison indices) is
//! recorded with the model, as Table 1 reports it.

use std::path::Path;

use anyhow::{Result, bail};
use burn::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ieu::GateStats;
use super::{Defence, DefenceParams, FinetuneInputs, FinetuneParams, Settings};
use crate::data::ImageSet;
use crate::models::Classifier;
use crate::spec::plan::{CellPlan, inputs};
use crate::train::{Batch, Hooks, LossKind, Optimiser, Supervised, cross_entropy, fit};

/// ABL in the registry.
pub struct Abl;

impl Defence for Abl {
    fn name(&self) -> &'static str {
        "abl"
    }
    fn default_settings(&self) -> Option<Value> {
        AblSettings::defaults()
    }
    fn check(&self, settings: &Value) -> Result<(), String> {
        AblSettings::checked(settings).map(|_| ())
    }
    /// The isolation step (shared by every ABL entry with the same isolation settings),
    /// then the unlearning finetune on its model.
    fn plan(&self, cell: &mut CellPlan, settings: &Value) -> Result<String> {
        let abl = AblSettings::of(settings)?;
        let ip = IsolateParams {
            finetune: cell.finetune_params(DefenceParams::none()),
            loss: abl.isolation_loss.clone(),
            r_isol: abl.r_isol,
        };
        let label = format!("abl isolation {}/{}", cell.ds.dataset, cell.attack);
        let iso = crate::dag::Step::new(
            crate::dag::Kind::Isolate,
            label,
            &ip,
            inputs(&[
                ("poison", cell.poison_key),
                ("pretrain", cell.ds.pretrain_key),
            ]),
        )?;
        let iso_key = cell.plan.add(iso);
        let unlearn_lr = abl
            .unlearn_lr
            .unwrap_or_else(|| cell.per_dataset(&cell.ds.scale.baselines.abl_unlearn_lr));
        let params = AblParams {
            finetune_epochs: abl.finetune_epochs.unwrap_or(cell.ds.scale.finetune.epochs),
            unlearn_lr,
            unlearn_epochs: abl.unlearn_epochs,
        };
        cell.finetune(
            DefenceParams::new("abl", &params)?,
            &[("isolate", &iso_key)],
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

/// ABL settings of a spec (`defaults.abl`, or a variant's `abl:`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AblSettings {
    /// Fraction of the finetuning set isolated as poisoned (lowest loss first).
    pub r_isol: f64,
    /// Loss of the isolation finetune: `{lga: gamma}` (ABL's default, γ = 0.5) or
    /// `{flooding: gamma}`.
    pub isolation_loss: LossKind,
    /// Epochs of finetuning on the non-isolated images before unlearning; `null` takes
    /// the scale's `finetune.epochs`, 0 skips the phase.
    pub finetune_epochs: Option<usize>,
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
            finetune_epochs: None,
            unlearn_lr: None,
            unlearn_epochs: 5,
        }
    }
}

impl Settings for AblSettings {
    fn validate(&self) -> Result<(), String> {
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

/// Parameters of ABL's `finetune` step (the unlearning phase).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AblParams {
    pub finetune_epochs: usize,
    pub unlearn_lr: f64,
    pub unlearn_epochs: usize,
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
        super::initial_robust_vit(pretrain, meta.num_classes(), f.seed, device, "abl")?;
    let sup = f.supervised("abl isolation", tune.len());
    let ad = device.clone().autodiff();
    let (model, log) =
        crate::train::train_supervised(model, &tune, &meta, &sup, p.loss.clone(), &ad)?;
    let losses =
        crate::train::logits(&model, &tune, &meta, 256, device).cross_entropy(&tune.labels);
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

/// Gradient ascent on every batch: ABL's unlearning, with Adam at a constant rate.
struct Ascent {
    losses: Vec<f64>,
}

impl<M: Classifier> Hooks<M> for Ascent {
    fn optimiser(&self) -> Optimiser {
        Optimiser::adam()
    }
    fn loss(&self, model: &M, b: &Batch) -> Result<Tensor<1>> {
        Ok(cross_entropy(model.forward(b.x.clone()), b.y.clone()).neg())
    }
    fn after_step(&mut self, model: M, b: &Batch) -> Result<M> {
        self.losses.push(-b.loss);
        Ok(model)
    }
}

/// The `finetune` step with `defence: abl`: on the isolation step's model, finetuning on
/// the non-isolated images, then gradient ascent on the isolated set with Adam at a
/// constant learning rate, every isolated image every epoch (the last batch kept even
/// when partial). Writes the model and `train_stats.json` (with the isolation's `gate`
/// statistics, so reports show its FPR/FNR).
pub fn run(p: &FinetuneParams, inputs: &FinetuneInputs, out: &Path, device: &Device) -> Result<()> {
    let params: AblParams = p.defence.fields()?;
    let isolate = inputs.input("isolate")?;
    let meta = crate::data::load_meta(&inputs.dataset)?;
    let tune = ImageSet::load(&inputs.poison.join("tune.safetensors"))?;
    let iso: Isolation =
        serde_json::from_str(&std::fs::read_to_string(isolate.join("isolation.json"))?)?;
    let ad = device.clone().autodiff();
    let (model, cfg) = crate::models::load_vit(isolate, &ad)?;

    // Finetuning on the other images: the finetuning recipe over `finetune_epochs`.
    let mut is_isolated = vec![false; tune.len()];
    for &i in &iso.isolated {
        is_isolated[i] = true;
    }
    let others: Vec<usize> = (0..tune.len()).filter(|&i| !is_isolated[i]).collect();
    let others = tune.subset(&others);
    let (model, finetune_log) = if params.finetune_epochs > 0 {
        let schedule = crate::spec::FinetuneSchedule {
            epochs: params.finetune_epochs,
            warmup_epochs: p.schedule.warmup_epochs.min(params.finetune_epochs),
            ..p.schedule.clone()
        };
        let recipe = FinetuneParams {
            schedule,
            ..p.clone()
        };
        let sup = recipe.supervised("abl finetuning", others.len());
        crate::train::train_supervised(model, &others, &meta, &sup, LossKind::Ce, &ad)?
    } else {
        (model, Vec::new())
    };

    let isolated = tune.subset(&iso.isolated);
    let iters = isolated.len().div_ceil(p.batch_size).max(1);
    let steps = params.unlearn_epochs * iters;
    let sup = Supervised {
        label: "abl unlearning",
        epochs: params.unlearn_epochs,
        batch_size: p.batch_size,
        views: p.learn_views(),
        lr: vec![params.unlearn_lr; steps],
        wd: vec![0.0; steps],
        seed: p.seed,
        keep_last: true,
    };
    let mut ascent = Ascent { losses: Vec::new() };
    let (model, _) = fit(model, &isolated, &meta, &sup, &mut ascent, &ad)?;
    if ascent.losses.iter().any(|l| !l.is_finite()) {
        bail!("abl unlearning: non-finite loss");
    }
    let stats = serde_json::json!({
        "gate": iso.gate,
        "isolated": iso.isolated.len(),
        "finetune_loss_per_epoch": finetune_log,
        "unlearn_lr": params.unlearn_lr,
        "unlearn_losses": ascent.losses,
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
