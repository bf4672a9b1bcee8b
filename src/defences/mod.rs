//! Defences and the `finetune` step.
//!
//! Every defence finetunes the robust model f_r, initialised from the pretrained checkpoint
//! with a fresh head, on the attacker-supplied (poisoned) finetuning set, with the paper's
//! finetuning recipe (Appendix A.2): AdamW, a one-epoch linear warm-up then cosine decay of
//! the learning rate, weight decay following a cosine from `wd_start` to `wd_end`, and the
//! SiT training views.

pub mod abl;
pub mod attnblock;
pub mod ibau;
pub mod ieu;
pub mod none;

use std::path::Path;

use anyhow::Result;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::spec::{FinetuneSchedule, Scale, Views};
use crate::train::View;

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum DefenceParams {
    /// Vanilla finetuning.
    None,
    /// Interleaved Ensemble Unlearning, stage 2 (Algorithm 1).
    Ieu {
        c_thresh: f64,
        /// The paper's confidence gate by default (left out of the key).
        #[serde(default, skip_serializing_if = "ieu::Selection::is_confidence")]
        selection: ieu::Selection,
        logit_masking: bool,
        /// Defaults are left out of the parameters, so default IEU keeps its keys.
        #[serde(default, skip_serializing_if = "ieu::UnlearnRate::is_dynamic")]
        unlearn_rate: ieu::UnlearnRate,
        #[serde(default, skip_serializing_if = "is_zero")]
        gate_noise_std: f64,
    },
    /// ABL's unlearning phase on the isolation step's model (`abl.rs`).
    Abl {
        unlearn_lr: f64,
        unlearn_epochs: usize,
    },
    /// I-BAU on the no-defence model (`ibau.rs`).
    Ibau(ibau::IbauParams),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneParams {
    pub defence: DefenceParams,
    pub schedule: FinetuneSchedule,
    pub batch_size: usize,
    pub views: Views,
    pub seed: u64,
}

impl FinetuneParams {
    pub fn from_scale(s: &Scale, defence: DefenceParams, seed: u64) -> Self {
        Self {
            defence,
            schedule: s.finetune.clone(),
            batch_size: s.batch_size,
            views: s.views,
            seed,
        }
    }

    /// The views f_r learns from.
    pub fn learn_views(&self) -> &'static [View] {
        match self.views {
            Views::Sit => &[View::Crop, View::Corrupt],
            Views::Crop => &[View::Crop],
            Views::Plain => &[View::NoAug],
        }
    }

    /// Per-iteration learning rate and weight decay for `iters` iterations per epoch.
    pub fn schedules(&self, iters: usize) -> (Vec<f64>, Vec<f64>) {
        let s = &self.schedule;
        let lr =
            crate::train::cosine_schedule(s.lr, s.min_lr, s.epochs, iters, s.warmup_epochs, 0.0);
        let wd = crate::train::cosine_schedule(s.wd_start, s.wd_end, s.epochs, iters, 0, 0.0);
        (lr, wd)
    }
}

/// Inputs of a finetune step, as directories of published steps.
pub struct FinetuneInputs<'a> {
    pub dataset: &'a Path,
    pub poison: &'a Path,
    pub pretrain: &'a Path,
    pub stage1: Option<&'a Path>,
    /// ABL's isolation step.
    pub isolate: Option<&'a Path>,
    /// The no-defence model post-training defences start from (I-BAU).
    pub backdoored: Option<&'a Path>,
}

/// Runs the `finetune` step: writes the defended f_r (`model.safetensors`, `config.json`)
/// and `train_stats.json` (losses, and for IEU the gate and unlearning statistics).
///
/// Pure dispatch: each arm hands the step to its defence's `run`, whose code (and nothing
/// of the other defences) is the step's code identity (build.rs). Keep arithmetic out.
pub fn run_finetune_step(
    p: &FinetuneParams,
    inputs: &FinetuneInputs,
    out: &Path,
    device: &Device,
) -> Result<()> {
    match &p.defence {
        DefenceParams::None => none::run(p, inputs, out, device),
        DefenceParams::Ieu { .. } => ieu::run(p, inputs, out, device),
        DefenceParams::Abl { .. } => abl::run(p, inputs, out, device),
        DefenceParams::Ibau(_) => ibau::run_step(p, inputs, out, device),
    }
}
