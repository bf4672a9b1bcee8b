//! Metrics and the `evaluate` step: clean accuracy (CA) on the clean test split, attack
//! success rate (ASR) on the triggered non-target test images, and for IEU the gate's
//! isolation quality on the finetuning set (FPR/FNR, Table 6's "Poison"/"Clean").

use std::path::Path;

use anyhow::{Context, Result};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::ImageSet;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalParams {
    pub batch_size: usize,
    /// AttnBlock: the test-time defence blocks a patch of every input before classifying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attnblock: Option<crate::defences::attnblock::AttnBlockEval>,
}

/// Percentages.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Metrics {
    pub ca: f64,
    pub asr: f64,
    pub n_clean: usize,
    pub n_poisoned: usize,
    pub fpr: Option<f64>,
    pub fnr: Option<f64>,
    pub poison_flagged: Option<f64>,
    pub clean_flagged: Option<f64>,
    pub unlearn_steps: Option<f64>,
    /// IEU: the mean of Eq. 3's factor lr_ul / lr_tune over the unlearning steps, and the
    /// mean cross-entropy of the unlearned batches (before each step). Eq. 3 regulates
    /// itself when the loss is large enough to push the factor to its floor of 0.2.
    #[serde(default)]
    pub unlearn_factor: Option<f64>,
    #[serde(default)]
    pub unlearn_loss: Option<f64>,
    /// CA on the clean test images the defence did not train on (I-BAU unlearns with the
    /// first test images, as the paper did, so its `ca` includes images it has seen).
    #[serde(default)]
    pub ca_unseen: Option<f64>,
}

impl Metrics {
    pub fn get(&self, name: &str) -> Option<f64> {
        match name {
            "ca" => Some(self.ca),
            "asr" => Some(self.asr),
            "fpr" => self.fpr,
            "fnr" => self.fnr,
            "poison_flagged" => self.poison_flagged,
            "clean_flagged" => self.clean_flagged,
            "unlearn_steps" => self.unlearn_steps,
            "unlearn_factor" => self.unlearn_factor,
            "unlearn_loss" => self.unlearn_loss,
            "ca_unseen" => self.ca_unseen,
            _ => None,
        }
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("metrics.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// Runs the `evaluate` step on a finetuned model; writes `metrics.json`.
pub fn run_evaluate_step(
    p: &EvalParams,
    finetune: &Path,
    poison: &Path,
    dataset: &Path,
    out: &Path,
    device: &Device,
) -> Result<Metrics> {
    let meta = crate::data::load_meta(dataset)?;
    let clean = ImageSet::load(&dataset.join("test.safetensors"))?;
    let triggered = ImageSet::load(&poison.join("test.safetensors"))?;
    // Test images a defence trained on (I-BAU): CA is also reported without them.
    let seen = std::fs::read_to_string(finetune.join("train_stats.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("clean_test_images_used")?.as_u64())
        .or_else(|| {
            // Models written before the statistic existed: the step's recorded parameters.
            let m = std::fs::read_to_string(finetune.join("manifest.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&m).ok()?;
            let d = v.get("params")?.get("defence")?;
            (d.get("name")?.as_str()? == "ibau").then(|| d.get("clean_images")?.as_u64())?
        })
        .map(|n| n as usize);
    let mut ca_unseen = None;
    let (ca, asr) = match &p.attnblock {
        None => {
            let (model, _) = crate::models::load_net(finetune, device)?;
            let acc = |set: &ImageSet| {
                crate::train::accuracy(
                    &crate::train::predict(&model, set, &meta, p.batch_size, device),
                    set,
                )
            };
            if let Some(n) = seen.filter(|&n| n < clean.len()) {
                ca_unseen = Some(acc(&clean.subset(&(n..clean.len()).collect::<Vec<_>>())));
            }
            (acc(&clean), acc(&triggered))
        }
        Some(ab) => {
            let (model, _) = crate::models::load_vit(finetune, &device.clone().autodiff())?;
            // GradRollout keeps every block's attention gradient: smaller batches.
            let batch = p.batch_size.min(64);
            let acc = |set: &ImageSet| {
                crate::train::accuracy(
                    &crate::defences::attnblock::predict_blocked(
                        &model, set, &meta, batch, ab, device,
                    ),
                    set,
                )
            };
            (acc(&clean), acc(&triggered))
        }
    };
    let mut m = Metrics {
        ca,
        asr,
        n_clean: clean.len(),
        n_poisoned: triggered.len(),
        ca_unseen,
        ..Default::default()
    };
    let stats_path = finetune.join("train_stats.json");
    if let Ok(text) = std::fs::read_to_string(&stats_path) {
        // IEU's gate, or ABL's isolated set: positive = flagged as poisoned.
        #[derive(Deserialize)]
        struct Flagged {
            gate: crate::defences::ieu::GateStats,
            unlearn_steps: Option<usize>,
            #[serde(default)]
            unlearn_trace: Vec<crate::defences::ieu::UnlearnRecord>,
        }
        if let Ok(s) = serde_json::from_str::<Flagged>(&text) {
            m.fpr = Some(s.gate.fpr());
            m.fnr = Some(s.gate.fnr());
            m.poison_flagged = Some(s.gate.poison_flagged_pct());
            m.clean_flagged = Some(s.gate.fpr());
            m.unlearn_steps = s.unlearn_steps.map(|n| n as f64);
            let t = &s.unlearn_trace;
            if !t.is_empty() {
                let mean = |f: fn(&crate::defences::ieu::UnlearnRecord) -> f64| {
                    t.iter().map(f).sum::<f64>() / t.len() as f64
                };
                m.unlearn_factor = Some(mean(|r| r.factor));
                m.unlearn_loss = Some(mean(|r| r.loss));
            }
        }
    }
    crate::store::write_json(&out.join("metrics.json"), &m)?;
    Ok(m)
}
