//! IEU's gate: which finetuning images stage 2 flags (Eq. 1's mask and Algorithm 1's
//! line 10), its statistics against the true poison indices, and f_p's confidences as
//! stage 1 stores them (the paper's Figures 2, 3 and 6).

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::train::Logits;
use crate::train::infer::max_softmax;

/// Which finetuning images stage 2 sends to the unlearn set (and masks in Eq. 1).
/// Written `confidence`, `{lowest_loss: r_isol}` or `{oracle: ratio}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "SelectionRepr")]
pub enum Selection {
    /// max σ(f_p(x)) > c_thresh: the paper's gate.
    #[default]
    Confidence,
    /// ABL's selection applied to f_p (Table 1): the r_isol fraction of the finetuning set
    /// with the lowest cross-entropy under f_p.
    LowestLoss(f64),
    /// A hand-crafted unlearn set (Table 2) of ratio × |poisoned| images: poisoned images
    /// only when ratio ≤ 1, every poisoned image plus (ratio − 1)·|poisoned| clean ones
    /// otherwise (seeded choice).
    Oracle(f64),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SelectionRepr {
    Name(String),
    LowestLoss { lowest_loss: f64 },
    Oracle { oracle: f64 },
}

impl TryFrom<SelectionRepr> for Selection {
    type Error = String;
    fn try_from(r: SelectionRepr) -> Result<Self, String> {
        match r {
            SelectionRepr::Name(n) if n == "confidence" => Ok(Selection::Confidence),
            SelectionRepr::Name(n) => Err(format!(
                "unknown selection '{n}' (confidence, {{lowest_loss: r_isol}}, {{oracle: ratio}})"
            )),
            SelectionRepr::LowestLoss { lowest_loss } => Ok(Selection::LowestLoss(lowest_loss)),
            SelectionRepr::Oracle { oracle } => Ok(Selection::Oracle(oracle)),
        }
    }
}

impl Selection {
    pub fn is_confidence(&self) -> bool {
        *self == Selection::Confidence
    }
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Selection::Confidence => Ok(()),
            Selection::LowestLoss(r) if *r > 0.0 && *r < 1.0 => Ok(()),
            Selection::LowestLoss(r) => Err(format!("lowest_loss {r} is not in (0, 1)")),
            Selection::Oracle(r) if *r > 0.0 && r.is_finite() => Ok(()),
            Selection::Oracle(r) => Err(format!("oracle ratio {r} must be positive")),
        }
    }

    /// The flagged finetuning images, given f_p's logits on each and the true poison
    /// indices (used by the oracle only).
    pub fn flags(
        &self,
        fp_logits: &Logits,
        labels: &[u16],
        c_thresh: f64,
        poison_idx: &[usize],
        seed: u64,
    ) -> Vec<bool> {
        let n = fp_logits.len();
        match self {
            Selection::Confidence => fp_logits
                .rows()
                .map(|l| max_softmax(l) as f64 > c_thresh)
                .collect(),
            Selection::LowestLoss(r) => {
                let ce = fp_logits.cross_entropy(labels);
                let mut flags = vec![false; n];
                for i in crate::defences::abl::lowest_fraction(&ce, *r) {
                    flags[i] = true;
                }
                flags
            }
            Selection::Oracle(ratio) => {
                use rand::SeedableRng;
                use rand::seq::SliceRandom;
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x0AC1E);
                let mut poisoned = poison_idx.to_vec();
                poisoned.shuffle(&mut rng);
                let want = (ratio * poisoned.len() as f64).round() as usize;
                let mut flags = vec![false; n];
                for &i in poisoned.iter().take(want) {
                    flags[i] = true;
                }
                if want > poisoned.len() {
                    let mut clean: Vec<usize> = (0..n).filter(|&i| !flags[i]).collect();
                    clean.shuffle(&mut rng);
                    for &i in clean.iter().take(want - poisoned.len()) {
                        flags[i] = true;
                    }
                }
                flags
            }
        }
    }
}

/// Gate statistics over the finetuning set (positive = poisoned).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GateStats {
    pub poisoned: usize,
    pub clean: usize,
    /// Poisoned images the gate flags (max σ > c_thresh).
    pub poisoned_flagged: usize,
    /// Clean images the gate flags.
    pub clean_flagged: usize,
}

impl GateStats {
    pub fn from_flags(flags: &[bool], poison_indices: &[usize]) -> Self {
        let mut is_poison = vec![false; flags.len()];
        for &i in poison_indices {
            is_poison[i] = true;
        }
        let mut s = GateStats::default();
        for (f, p) in flags.iter().zip(&is_poison) {
            match (*p, *f) {
                (true, true) => {
                    s.poisoned += 1;
                    s.poisoned_flagged += 1
                }
                (true, false) => s.poisoned += 1,
                (false, true) => {
                    s.clean += 1;
                    s.clean_flagged += 1
                }
                (false, false) => s.clean += 1,
            }
        }
        s
    }
    /// False-positive rate in %: clean images flagged (Table 6's "Clean").
    pub fn fpr(&self) -> f64 {
        pct(self.clean_flagged, self.clean)
    }
    /// False-negative rate in %: poisoned images not flagged.
    pub fn fnr(&self) -> f64 {
        pct(self.poisoned - self.poisoned_flagged, self.poisoned)
    }
    /// Poisoned images flagged, in % (Table 6's "Poison").
    pub fn poison_flagged_pct(&self) -> f64 {
        pct(self.poisoned_flagged, self.poisoned)
    }
}

fn pct(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        100.0 * a as f64 / b as f64
    }
}

/// File of the stage-1 step with f_p's confidence on every finetuning image.
pub const CONFIDENCES: &str = "confidences.json";

/// f_p's maximum class probability on each finetuning image, and which images are
/// poisoned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Confidences {
    pub max_prob: Vec<f32>,
    pub poisoned: Vec<bool>,
}

impl Confidences {
    pub fn of(logits: &Logits, poisoned: &[usize]) -> Self {
        let mut flags = vec![false; logits.len()];
        for &i in poisoned {
            if i < flags.len() {
                flags[i] = true;
            }
        }
        Self {
            max_prob: logits.rows().map(max_softmax).collect(),
            poisoned: flags,
        }
    }

    /// Reads a stage-1 step's confidences.
    pub fn load(stage1: &Path) -> Result<Self> {
        let path = stage1.join(CONFIDENCES);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e} (a stage-1 step computed before confidences were stored)",
                path.display()
            )
        })?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// Batch size of f_p's pass over the finetuning set (the gate and the confidences).
pub const GATE_BATCH: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selections_flag_what_tables_1_and_2_describe() {
        // 5 images, 2 classes; logits chosen so the confidences and losses are known.
        let logits = Logits {
            values: vec![
                5.0f32, 0.0, // conf 0.993, CE(label 0) = 0.0067
                0.0, 1.0, // conf 0.731, CE(label 1) = 0.313
                3.0, 0.0, // conf 0.953, CE(label 1) = 3.049
                0.0, 0.2, // conf 0.550, CE(label 0) = 0.798
                0.0, 4.0, // conf 0.982, CE(label 1) = 0.018
            ],
            classes: 2,
        };
        let labels = [0u16, 1, 1, 0, 1];
        let poison = [0usize, 2, 4];
        let conf = Selection::Confidence.flags(&logits, &labels, 0.95, &poison, 0);
        assert_eq!(conf, vec![true, false, true, false, true]);
        // Lowest loss: 2 of 5 → images 0 and 4, whatever their confidence.
        let low = Selection::LowestLoss(0.4).flags(&logits, &labels, 0.95, &poison, 0);
        assert_eq!(low, vec![true, false, false, false, true]);
        // Oracle: ratio 2/3 of the 3 poisoned → 2 poisoned, no clean.
        let o = Selection::Oracle(2.0 / 3.0).flags(&logits, &labels, 0.95, &poison, 7);
        assert_eq!(o.iter().filter(|&&f| f).count(), 2);
        assert!(!o[1] && !o[3]);
        // Ratio 4/3: all 3 poisoned plus 1 clean.
        let o = Selection::Oracle(4.0 / 3.0).flags(&logits, &labels, 0.95, &poison, 7);
        assert!(o[0] && o[2] && o[4]);
        assert_eq!(o.iter().filter(|&&f| f).count(), 4);
        assert!(Selection::LowestLoss(1.5).validate().is_err());
        assert!(Selection::Oracle(0.0).validate().is_err());
    }

    #[test]
    fn gate_stats_count_fpr_and_fnr() {
        // 4 poisoned (indices 0..4), 6 clean; gate flags 3 poisoned and 1 clean.
        let flags = [
            true, true, true, false, true, false, false, false, false, false,
        ];
        let s = GateStats::from_flags(&flags, &[0, 1, 2, 3]);
        assert_eq!(
            (s.poisoned, s.clean, s.poisoned_flagged, s.clean_flagged),
            (4, 6, 3, 1)
        );
        assert!((s.fnr() - 25.0).abs() < 1e-12);
        assert!((s.fpr() - 100.0 / 6.0).abs() < 1e-12);
        assert!((s.poison_flagged_pct() - 75.0).abs() < 1e-12);
    }
}
