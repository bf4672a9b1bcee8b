//! IEU's settings in a spec (`defaults.ieu`, a variant's `ieu:`) and the parameters of its
//! stage-2 finetune step.

use serde::{Deserialize, Serialize};

use super::Selection;
use crate::defences::Settings;

pub use crate::train::LossKind as Stage1Loss;

/// IEU settings of a spec (`defaults.ieu`, a variant's `ieu:`): the paper's Table 11
/// defaults for CIFAR10/TinyImageNet, and its ablation knobs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IeuSettings {
    /// Confidence threshold of the gate (Eq. 1; Table 6).
    pub c_thresh: f64,
    /// Which images go to the unlearn set: `confidence` (the gate, Eq. 1),
    /// `{lowest_loss: r_isol}` (Table 1) or `{oracle: ratio}` (hand-crafted, Table 2).
    pub selection: Selection,
    /// Number of checkpoint blocks in the poisoned module f_p (Table 7).
    pub fp_depth: usize,
    /// Eq. 1 logit masking; `false` is Table 4's ablation (ŷ = ŷ_r).
    pub logit_masking: bool,
    /// Unlearning rate: Eq. 3 (`dynamic`), `{constant: c}` (Table 9) or
    /// `{moving_average: beta}` (the paper's proposed fix for weakness [b]).
    pub unlearn_rate: UnlearnRate,
    /// Standard deviation of Gaussian noise added to f_p's logits for the queueing
    /// decision only (Table 14); 0 = off.
    pub gate_noise_std: f64,
    /// Stage-1 loss of f_p: `ce`, `{lga: gamma}` or `{flooding: gamma}` (Tables 15, 16).
    pub stage1_loss: Stage1Loss,
}

impl Default for IeuSettings {
    fn default() -> Self {
        Self {
            c_thresh: 0.95,
            selection: Default::default(),
            fp_depth: 1,
            logit_masking: true,
            unlearn_rate: Default::default(),
            gate_noise_std: 0.0,
            stage1_loss: Default::default(),
        }
    }
}

impl Settings for IeuSettings {
    fn validate(&self) -> Result<(), String> {
        if !(self.c_thresh > 0.0 && self.c_thresh < 1.0) {
            return Err(format!("c_thresh: {} is not in (0, 1)", self.c_thresh));
        }
        if self.fp_depth == 0 {
            return Err("fp_depth: must be at least 1".into());
        }
        if !(self.gate_noise_std >= 0.0 && self.gate_noise_std.is_finite()) {
            return Err(format!(
                "gate_noise_std: {} must be a non-negative number",
                self.gate_noise_std
            ));
        }
        self.selection
            .validate()
            .map_err(|e| format!("selection: {e}"))?;
        self.unlearn_rate
            .validate()
            .map_err(|e| format!("unlearn_rate: {e}"))?;
        self.stage1_loss
            .validate()
            .map_err(|e| format!("stage1_loss: {e}"))
    }
}

impl IeuSettings {
    /// The parameters of the stage-2 finetune step.
    pub fn stage2(&self) -> IeuParams {
        IeuParams {
            c_thresh: self.c_thresh,
            selection: self.selection.clone(),
            logit_masking: self.logit_masking,
            unlearn_rate: self.unlearn_rate.clone(),
            gate_noise_std: self.gate_noise_std,
        }
    }
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// Parameters of IEU's stage 2 (the `finetune` step with `defence: ieu`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IeuParams {
    pub c_thresh: f64,
    /// The paper's confidence gate by default (left out of the key).
    #[serde(default, skip_serializing_if = "Selection::is_confidence")]
    pub selection: Selection,
    pub logit_masking: bool,
    /// Defaults are left out of the parameters, so default IEU keeps its keys.
    #[serde(default, skip_serializing_if = "UnlearnRate::is_dynamic")]
    pub unlearn_rate: UnlearnRate,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gate_noise_std: f64,
}

/// How the unlearning rate lr_ul is derived from lr_tune.
/// Written `dynamic`, `{constant: c}` or `{moving_average: beta}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "RateRepr")]
pub enum UnlearnRate {
    /// Eq. 3 with the previous unlearned batch's loss.
    #[default]
    Dynamic,
    /// lr_ul = c · lr_tune (Table 9).
    Constant(f64),
    /// Eq. 3 with an exponential moving average ℓ̄_k = β·ℓ̄_{k−1} + (1 − β)·ℓ_k of the
    /// unlearning losses (the paper's proposed fix for weakness [b]).
    MovingAverage(f64),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RateRepr {
    Name(String),
    Constant { constant: f64 },
    MovingAverage { moving_average: f64 },
}

impl TryFrom<RateRepr> for UnlearnRate {
    type Error = String;
    fn try_from(r: RateRepr) -> Result<Self, String> {
        match r {
            RateRepr::Name(n) if n == "dynamic" => Ok(UnlearnRate::Dynamic),
            RateRepr::Name(n) => Err(format!(
                "unknown unlearning rate '{n}' (dynamic, {{constant: c}}, {{moving_average: beta}})"
            )),
            RateRepr::Constant { constant } => Ok(UnlearnRate::Constant(constant)),
            RateRepr::MovingAverage { moving_average } => {
                Ok(UnlearnRate::MovingAverage(moving_average))
            }
        }
    }
}

impl UnlearnRate {
    pub fn is_dynamic(&self) -> bool {
        *self == UnlearnRate::Dynamic
    }
    pub fn validate(&self) -> Result<(), String> {
        match self {
            UnlearnRate::Dynamic => Ok(()),
            UnlearnRate::Constant(c) if *c > 0.0 && c.is_finite() => Ok(()),
            UnlearnRate::Constant(c) => Err(format!("constant {c} must be positive")),
            UnlearnRate::MovingAverage(b) if (0.0..1.0).contains(b) => Ok(()),
            UnlearnRate::MovingAverage(b) => Err(format!("moving_average {b} is not in [0, 1)")),
        }
    }
}
