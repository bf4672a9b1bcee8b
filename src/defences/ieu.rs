//! IEU — Interleaved Ensemble Unlearning (paper Section 3.1, Algorithm 1, Appendix A.2).
//!
//! **Stage 1** ([`run_stage1_step`]): the poisoned module f_p — the first `depth` blocks of
//! the pretrained checkpoint with a new head — is tuned on the raw poisoned finetuning set,
//! unaugmented, with a one-epoch linear warm-up to a constant learning rate and no weight
//! decay: min_θp E[ℓ(f_p(x_noAug; θ_p), y)]. Shortcut learning makes it confident on
//! triggered images and unconfident on clean ones.
//!
//! **Stage 2** ([`run_stage2`], Algorithm 1): f_p is frozen and gates every image by its
//! confidence max σ(f_p(x_noAug)) on the unaugmented view.
//! - Eq. 1, logit masking: m = 1[max σ(ŷ_p) < c_thresh], ŷ = ŷ_p(1 − m) + ŷ_r·m, so f_r
//!   learns nothing from images the gate flags ([`masked_logits`]).
//! - Algorithm 1, lines 10–14: flagged images (max σ(ŷ_p) > c_thresh) are queued in D_ul;
//!   the queue is emptied at each epoch start, and whenever it holds a full batch, that batch
//!   is unlearned by one step of gradient ascent on ℓ(f_r(x^p̂), y^p̂) with a separate
//!   optimiser.
//! - Eq. 3, the dynamic unlearning rate ([`dynamic_unlearn_scale`]):
//!   lr_ul = lr_tune · (1[k>0]·max[6 − exp(−(ln N_c − ℓ_{k−1}/√2)), 0.2] + 1[k=0]),
//!   with ℓ_{k−1} the unlearning loss of the previous unlearned batch and k = 0 at every
//!   epoch start (the paper; the reference code keeps ℓ across epochs).

use std::path::Path;

use anyhow::{Result, bail};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use serde::{Deserialize, Serialize};

use super::{FinetuneInputs, FinetuneParams};
use crate::data::{DatasetMeta, ImageSet};
use crate::progress::Progress;
use crate::spec::Scale;
use crate::train::{
    Decay, Supervised, View, adamw, cosine_schedule, cross_entropy, epoch_batches, iters_per_epoch,
    labels, rng_for, train_supervised, views,
};

pub use crate::train::LossKind as Stage1Loss;

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
        fp_logits: &[Vec<f32>],
        labels: &[u16],
        c_thresh: f64,
        poison_idx: &[usize],
        seed: u64,
    ) -> Vec<bool> {
        let n = fp_logits.len();
        match self {
            Selection::Confidence => fp_logits
                .iter()
                .map(|l| max_softmax(l) as f64 > c_thresh)
                .collect(),
            Selection::LowestLoss(r) => {
                let ce: Vec<f32> = fp_logits
                    .iter()
                    .zip(labels)
                    .map(|(l, &y)| {
                        let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                        let z: f32 = l.iter().map(|&v| (v - m).exp()).sum();
                        m + z.ln() - l[y as usize]
                    })
                    .collect();
                let mut flags = vec![false; n];
                for i in super::abl::lowest_fraction(&ce, *r) {
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

/// Tracks the unlearning losses of one epoch and gives the factor on lr_tune.
#[derive(Debug, Clone)]
pub struct UnlearnSchedule {
    rule: UnlearnRate,
    num_classes: usize,
    /// Number of batches unlearned this epoch (Eq. 3's k).
    k: usize,
    /// ℓ_{k−1}, or its moving average.
    memory: f64,
}

impl UnlearnSchedule {
    pub fn new(rule: UnlearnRate, num_classes: usize) -> Self {
        Self {
            rule,
            num_classes,
            k: 0,
            memory: 0.0,
        }
    }
    /// Epoch start: k = 0.
    pub fn reset(&mut self) {
        self.k = 0;
        self.memory = 0.0;
    }
    /// The factor s with lr_ul = s · lr_tune for the next unlearned batch.
    pub fn scale(&self) -> f64 {
        match self.rule {
            UnlearnRate::Constant(c) => c,
            _ => dynamic_unlearn_scale(self.k, self.memory, self.num_classes),
        }
    }
    /// Records the loss of the batch just unlearned (measured before its update).
    pub fn record(&mut self, loss: f64) {
        self.memory = match self.rule {
            UnlearnRate::MovingAverage(beta) if self.k > 0 => {
                beta * self.memory + (1.0 - beta) * loss
            }
            _ => loss,
        };
        self.k += 1;
    }
}

/// Stage-2 settings of one IEU run.
#[derive(Debug, Clone)]
pub struct Stage2Settings {
    pub c_thresh: f64,
    pub selection: Selection,
    pub logit_masking: bool,
    pub unlearn_rate: UnlearnRate,
    pub gate_noise_std: f64,
}

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

impl Stage1Params {
    pub fn from_scale(s: &Scale, depth: usize, loss: Stage1Loss, seed: u64) -> Self {
        Self {
            depth,
            loss,
            epochs: s.stage1.epochs,
            lr: s.stage1.lr,
            warmup_epochs: s.stage1.warmup_epochs,
            batch_size: s.batch_size,
            seed,
        }
    }
}

/// Stage 1: tunes f_p and writes it as `model.safetensors` + `config.json`.
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
    // Linear warm-up from 0, then constant (reference: base == final lr), weight decay 0.
    let lr = cosine_schedule(p.lr, p.lr, p.epochs, iters, p.warmup_epochs, 0.0);
    let wd = vec![0.0; lr.len()];
    let sup = Supervised {
        label: "stage1 f_p",
        epochs: p.epochs,
        batch_size: p.batch_size,
        views: &[View::NoAug],
        lr,
        wd,
        seed: p.seed,
        loss: p.loss.clone(),
    };
    let (fp, log) = train_supervised(fp, &tune, &meta, &sup, &ad)?;
    let fp = fp.valid();
    crate::models::save_vit(&fp, &cfg, out)?;
    let info = serde_json::json!({ "loss_per_epoch": log });
    crate::store::write_json(&out.join("train_log.json"), &info)?;
    // max σ(f_p(x)) of every finetuning image, as stage 2's gate computes it (the same
    // function, batch size and saved weights): the paper's Figures 2, 3 and 6.
    let poisoned = crate::attacks::load_poison_indices(poison)?;
    let confidences = Confidences::of(&fp, &tune, &meta, &poisoned, device);
    crate::store::write_json(&out.join(CONFIDENCES), &confidences)
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
    fn of(
        fp: &crate::models::Vit,
        tune: &ImageSet,
        meta: &DatasetMeta,
        poisoned: &[usize],
        device: &Device,
    ) -> Self {
        let logits = gate_logits(fp, tune, meta, GATE_BATCH, device);
        let mut flags = vec![false; tune.len()];
        for &i in poisoned {
            if i < flags.len() {
                flags[i] = true;
            }
        }
        Self {
            max_prob: logits.iter().map(|l| max_softmax(l)).collect(),
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
const GATE_BATCH: usize = 256;

/// Eq. 3's factor on lr_tune: 1 for the first unlearned batch of an epoch (k = 0), else
/// max(6 − exp(−(ln N_c − ℓ_{k−1}/√2)), 0.2).
pub fn dynamic_unlearn_scale(k: usize, prev_loss: f64, num_classes: usize) -> f64 {
    if k == 0 {
        return 1.0;
    }
    let inner = -((num_classes as f64).ln() - prev_loss / std::f64::consts::SQRT_2);
    (6.0 - inner.exp()).max(0.2)
}

/// Eq. 1: ŷ = ŷ_p·(1 − m) + ŷ_r·m with m = 1[max σ(ŷ_p) < c_thresh] per row. ŷ_p carries
/// no gradient (f_p is frozen).
pub fn masked_logits(y_p: Tensor<2>, y_r: Tensor<2>, c_thresh: f64) -> Tensor<2> {
    let conf = softmax(y_p.clone(), 1).max_dim(1); // [B, 1]
    let m = conf.lower_elem(c_thresh).float(); // [B, 1]
    masked_logits_with(y_p, y_r, m)
}

/// Eq. 1 with a given mask m [B, 1] (1 = learn from f_r, 0 = take f_p's logits), for
/// selections other than the confidence gate (Tables 1, 2).
pub fn masked_logits_with(y_p: Tensor<2>, y_r: Tensor<2>, m: Tensor<2>) -> Tensor<2> {
    let keep_p = m.clone().neg().add_scalar(1.0);
    y_p.detach() * keep_p + y_r * m
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

/// f_p's logits on the unaugmented view of every finetuning image. f_p is frozen and its
/// input unaugmented, so these are exactly the logits Algorithm 1 would compute per batch.
fn gate_logits(
    fp: &crate::models::Vit,
    set: &ImageSet,
    meta: &DatasetMeta,
    batch: usize,
    device: &Device,
) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(set.len());
    let idx: Vec<usize> = (0..set.len()).collect();
    let mut rng = rng_for(0, 0, 0, 0);
    for chunk in idx.chunks(batch) {
        let x = views(set, chunk, &[View::NoAug], meta, &mut rng, device)
            .pop()
            .unwrap();
        let logits = fp.forward(x);
        let c = logits.dims()[1];
        let v: Vec<f32> = logits.to_data().convert::<f32>().try_to_vec().unwrap();
        out.extend(v.chunks(c).map(|r| r.to_vec()));
    }
    out
}

fn max_softmax(logits: &[f32]) -> f32 {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let z: f32 = logits.iter().map(|&l| (l - m).exp()).sum();
    1.0 / z
}

/// Statistics of a stage-2 run, written to `train_stats.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stage2Stats {
    pub gate: GateStats,
    pub loss_per_epoch: Vec<f64>,
    pub unlearn_steps: usize,
    pub unlearn_losses: Vec<f64>,
    pub unlearn_scales: Vec<f64>,
}

/// The `finetune` step with `defence: ieu` (stage 2 on the stage-1 f_p).
pub fn run(p: &FinetuneParams, inputs: &FinetuneInputs, out: &Path, device: &Device) -> Result<()> {
    let super::DefenceParams::Ieu {
        c_thresh,
        selection,
        logit_masking,
        unlearn_rate,
        gate_noise_std,
    } = &p.defence
    else {
        bail!("ieu::run called for defence {:?}", p.defence)
    };
    let Some(stage1) = inputs.stage1 else {
        bail!("ieu finetuning needs the stage-1 poisoned module")
    };
    let settings = Stage2Settings {
        c_thresh: *c_thresh,
        selection: selection.clone(),
        logit_masking: *logit_masking,
        unlearn_rate: unlearn_rate.clone(),
        gate_noise_std: *gate_noise_std,
    };
    run_stage2(p, &settings, inputs, stage1, out, device)
}

/// Stage 2 (Algorithm 1).
pub fn run_stage2(
    p: &FinetuneParams,
    settings: &Stage2Settings,
    inputs: &FinetuneInputs,
    stage1: &Path,
    out: &Path,
    device: &Device,
) -> Result<()> {
    let meta = crate::data::load_meta(inputs.dataset)?;
    let tune = ImageSet::load(&inputs.poison.join("tune.safetensors"))?;
    let poison_idx = crate::attacks::load_poison_indices(inputs.poison)?;
    let (fp, _) = crate::models::load_vit(stage1, device)?;
    let fp_logits = gate_logits(&fp, &tune, &meta, GATE_BATCH, device);
    let Stage2Settings {
        c_thresh,
        ref selection,
        logit_masking,
        ref unlearn_rate,
        gate_noise_std,
    } = *settings;
    // Algorithm 1 line 10: queued iff max σ(f_p(x)) > c_thresh (or another selection).
    let flagged = selection.flags(&fp_logits, &tune.labels, c_thresh, &poison_idx, p.seed);
    let gate = GateStats::from_flags(&flagged, &poison_idx);
    tracing::info!(
        poison_flagged = format!("{:.2}%", gate.poison_flagged_pct()),
        clean_flagged = format!("{:.2}%", gate.fpr()),
        "IEU gate on the finetuning set"
    );

    let ad = device.clone().autodiff();
    let (mut model, cfg) =
        super::none::initial_robust_net(inputs.pretrain, meta.num_classes(), p.seed, device)?;
    let mut optim_tune = adamw();
    let mut optim_ul = adamw();
    let iters = iters_per_epoch(tune.len(), p.batch_size);
    let (lr, wd) = p.schedules(iters);
    let learn_views = p.learn_views();
    let mut ul_views: Vec<View> = learn_views.to_vec();
    if !ul_views.contains(&View::NoAug) {
        ul_views.push(View::NoAug);
    }
    let nc = meta.num_classes();
    let epochs = p.schedule.epochs;
    let progress = Progress::new("ieu f_r", (epochs * iters) as u64);
    let mut stats = Stage2Stats {
        gate,
        ..Default::default()
    };
    let mut schedule = UnlearnSchedule::new(unlearn_rate.clone(), nc);
    let mut it = 0usize;
    for epoch in 0..epochs {
        // Line 4: a fresh unlearn queue each epoch; Eq. 3's k restarts at 0.
        let mut queue: std::collections::VecDeque<usize> = Default::default();
        schedule.reset();
        let mut sum = 0.0;
        let mut count = 0usize;
        for (bi, batch) in epoch_batches(tune.len(), p.batch_size, p.seed, epoch)
            .iter()
            .enumerate()
        {
            // Lines 6–8: masked logits (Eq. 1), cross-entropy, one learning step.
            let mut rng = rng_for(p.seed, epoch, bi, 0xA06);
            let xs = views(&tune, batch, learn_views, &meta, &mut rng, &ad);
            let nviews = xs.len();
            let y = labels(&tune, batch, &ad);
            let ys = Tensor::cat(vec![y; nviews], 0);
            let y_r = model.forward(Tensor::cat(xs, 0));
            let logits = if logit_masking {
                let rows: Vec<f32> = batch
                    .iter()
                    .flat_map(|&i| fp_logits[i].iter().cloned())
                    .collect();
                let y_p = Tensor::<2>::from_data(TensorData::new(rows, [batch.len(), nc]), &ad);
                let y_p = Tensor::cat(vec![y_p; nviews], 0);
                if selection.is_confidence() {
                    masked_logits(y_p, y_r, c_thresh)
                } else {
                    let m: Vec<f32> = (0..nviews)
                        .flat_map(|_| batch.iter().map(|&i| if flagged[i] { 0.0 } else { 1.0 }))
                        .collect();
                    let n = m.len();
                    let m = Tensor::<2>::from_data(TensorData::new(m, [n, 1]), &ad);
                    masked_logits_with(y_p, y_r, m)
                }
            } else {
                y_r
            };
            let loss = cross_entropy(logits, ys);
            let value: f64 = loss.clone().into_scalar::<f32>() as f64;
            if !value.is_finite() {
                bail!("ieu stage 2: non-finite learning loss {value} at epoch {epoch}, batch {bi}");
            }
            let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &model);
            model = optim_tune.step(lr[it], model, grads);
            if wd[it] > 0.0 {
                model = model.map(&mut Decay {
                    factor: 1.0 - lr[it] * wd[it],
                });
            }
            sum += value;
            count += 1;

            // Line 10: queue the flagged images of this batch.
            if gate_noise_std > 0.0 && selection.is_confidence() {
                // Table 14: the queueing decision sees f_p's logits plus Gaussian noise;
                // the mask of Eq. 1 does not.
                queue.extend(batch.iter().copied().filter(|&i| {
                    let mut rng = rng_for(p.seed, epoch, i, 0x4015E);
                    let noisy: Vec<f32> = fp_logits[i]
                        .iter()
                        .map(|l| {
                            l + gate_noise_std as f32 * crate::data::augment::gaussian(&mut rng)
                        })
                        .collect();
                    max_softmax(&noisy) as f64 > c_thresh
                }));
            } else {
                queue.extend(batch.iter().copied().filter(|&i| flagged[i]));
            }
            // Lines 11–14: unlearn one full batch by gradient ascent.
            if queue.len() >= p.batch_size {
                let ul: Vec<usize> = queue.drain(..p.batch_size).collect();
                let mut rng = rng_for(p.seed, epoch, bi, 0x0111);
                let xs = views(&tune, &ul, &ul_views, &meta, &mut rng, &ad);
                let y = labels(&tune, &ul, &ad);
                let ys = Tensor::cat(vec![y; xs.len()], 0);
                let ul_loss = cross_entropy(model.forward(Tensor::cat(xs, 0)), ys);
                let ul_value = ul_loss.clone().into_scalar::<f32>() as f64;
                if !ul_value.is_finite() {
                    bail!(
                        "ieu stage 2: non-finite unlearning loss {ul_value} at epoch {epoch}, batch {bi} \
                         (unlearned batch {} of the epoch); the paper's weakness [b]",
                        schedule.k
                    );
                }
                let scale = schedule.scale();
                let lr_ul = lr[it] * scale;
                let grads =
                    burn::optim::GradientsParams::from_grads(ul_loss.neg().backward(), &model);
                model = optim_ul.step(lr_ul, model, grads);
                if wd[it] > 0.0 {
                    model = model.map(&mut Decay {
                        factor: 1.0 - lr_ul * wd[it],
                    });
                }
                schedule.record(ul_value);
                stats.unlearn_steps += 1;
                stats.unlearn_losses.push(ul_value);
                stats.unlearn_scales.push(scale);
            }
            it += 1;
            progress.inc(format!(
                "epoch {}/{} loss {:.3} unlearned {}",
                epoch + 1,
                epochs,
                sum / count as f64,
                stats.unlearn_steps
            ));
        }
        stats.loss_per_epoch.push(sum / count.max(1) as f64);
    }
    progress.finish();
    crate::models::save_net_with_stats(&model.valid(), &cfg, &stats, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eq3_hand_computed_values() {
        // k = 0: lr_ul = lr_tune.
        assert_eq!(dynamic_unlearn_scale(0, 123.0, 10), 1.0);
        // ℓ = 0, N_c = 10: 6 − exp(−ln 10) = 6 − 0.1 = 5.9.
        assert!((dynamic_unlearn_scale(1, 0.0, 10) - 5.9).abs() < 1e-12);
        // ℓ = √2·ln 10: exp(0) = 1 → 5.
        let l = std::f64::consts::SQRT_2 * 10f64.ln();
        assert!((dynamic_unlearn_scale(3, l, 10) - 5.0).abs() < 1e-12);
        // ℓ = √2·ln 30: 6 − 3 = 3.
        let l = std::f64::consts::SQRT_2 * 30f64.ln();
        assert!((dynamic_unlearn_scale(3, l, 10) - 3.0).abs() < 1e-12);
        // Large loss: clamped at 0.2.
        assert_eq!(dynamic_unlearn_scale(2, 50.0, 10), 0.2);
        // N_c = 200, ℓ = 0: 6 − 1/200.
        assert!((dynamic_unlearn_scale(1, 0.0, 200) - 5.995).abs() < 1e-12);
    }

    #[test]
    fn unlearn_rate_variants() {
        // Dynamic: 1 at k = 0, then Eq. 3 of the previous loss; k restarts each epoch.
        let mut s = UnlearnSchedule::new(UnlearnRate::Dynamic, 10);
        assert_eq!(s.scale(), 1.0);
        s.record(0.0);
        assert!((s.scale() - 5.9).abs() < 1e-12);
        s.record(std::f64::consts::SQRT_2 * 10f64.ln());
        assert!((s.scale() - 5.0).abs() < 1e-12);
        s.reset();
        assert_eq!(s.scale(), 1.0);
        // Constant: c at every step (Table 9).
        let mut s = UnlearnSchedule::new(UnlearnRate::Constant(2.0), 10);
        assert_eq!(s.scale(), 2.0);
        s.record(3.0);
        assert_eq!(s.scale(), 2.0);
        // Moving average β = 0.5 of losses 0 and 2√2·ln 10 → ℓ̄ = √2·ln 10 → factor 5.
        let mut s = UnlearnSchedule::new(UnlearnRate::MovingAverage(0.5), 10);
        s.record(0.0);
        s.record(2.0 * std::f64::consts::SQRT_2 * 10f64.ln());
        assert!((s.scale() - 5.0).abs() < 1e-12);
    }

    #[test]
    fn eq1_selects_fp_logits_for_confident_rows() {
        let device = Device::flex();
        // Row 0: f_p confident (softmax of [10, 0] ≈ 0.99995 > 0.95) → ŷ = ŷ_p.
        // Row 1: f_p unconfident (softmax of [0.1, 0] ≈ 0.525) → ŷ = ŷ_r.
        let y_p = Tensor::<2>::from_data(
            TensorData::new(vec![10.0f32, 0.0, 0.1, 0.0], [2, 2]),
            &device,
        );
        let y_r = Tensor::<2>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2]),
            &device,
        );
        let out: Vec<f32> = masked_logits(y_p, y_r, 0.95)
            .to_data()
            .try_to_vec()
            .unwrap();
        assert_eq!(out, vec![10.0, 0.0, 3.0, 4.0]);
    }

    #[test]
    fn eq1_gives_no_gradient_to_f_r_on_flagged_rows() {
        let device = Device::flex().autodiff();
        let y_p = Tensor::<2>::from_data(
            TensorData::new(vec![10.0f32, 0.0, 0.1, 0.0], [2, 2]),
            &device,
        );
        let y_r = Tensor::<2>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2]),
            &device,
        )
        .require_grad();
        let out = masked_logits(y_p, y_r.clone(), 0.95);
        let grads = out.sum().backward();
        let g: Vec<f32> = y_r
            .grad(&grads)
            .unwrap()
            .to_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap();
        assert_eq!(g, vec![0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn selections_flag_what_tables_1_and_2_describe() {
        // 5 images, 2 classes; logits chosen so the confidences and losses are known.
        let logits = vec![
            vec![5.0f32, 0.0], // conf 0.993, CE(label 0) = 0.0067
            vec![0.0, 1.0],    // conf 0.731, CE(label 1) = 0.313
            vec![3.0, 0.0],    // conf 0.953, CE(label 1) = 3.049
            vec![0.0, 0.2],    // conf 0.550, CE(label 0) = 0.798
            vec![0.0, 4.0],    // conf 0.982, CE(label 1) = 0.018
        ];
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

    #[test]
    fn max_softmax_is_stable() {
        assert!((max_softmax(&[1000.0, 0.0]) - 1.0).abs() < 1e-6);
        assert!((max_softmax(&[0.0, 0.0]) - 0.5).abs() < 1e-6);
    }
}
