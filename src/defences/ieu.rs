//! IEU — Interleaved Ensemble Unlearning (paper Section 3.1, Algorithm 1, Appendix A.2).
//!
//! **Stage 1** ([`run_stage1_step`]): the poisoned module f_p — the first `depth` blocks of
//! the pretrained checkpoint with a new head — is tuned on the raw poisoned finetuning set,
//! unaugmented, with a one-epoch linear warm-up to a constant learning rate and no weight
//! decay: min_θp E[ℓ(f_p(x_noAug; θ_p), y)]. Shortcut learning makes it confident on
//! triggered images and unconfident on clean ones.
//!
//! **Stage 2** ([`run`], Algorithm 1 on the training loop of `train::fit`): f_p is frozen and gates every image by its
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

pub mod gate;

use std::collections::VecDeque;
use std::path::Path;

use anyhow::{Result, bail};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use gate::{CONFIDENCES, Confidences, GATE_BATCH, GateStats, Selection};

use super::{Defence, DefenceParams, FinetuneInputs, FinetuneParams, Settings};
use crate::data::{DatasetMeta, ImageSet};
use crate::models::Classifier;
use crate::spec::plan::{CellPlan, DatasetPlan};
use crate::train::infer::max_softmax;
use crate::train::{
    Batch, Hooks, Logits, Optimiser, Plain, Supervised, View, cosine_schedule, cross_entropy, fit,
    iters_per_epoch, labels, rng_for, views,
};

pub use crate::train::LossKind as Stage1Loss;

/// IEU in the registry.
pub struct Ieu;

impl Defence for Ieu {
    fn name(&self) -> &'static str {
        "ieu"
    }
    fn default_settings(&self) -> Option<Value> {
        IeuSettings::defaults()
    }
    fn check(&self, settings: &Value) -> Result<(), String> {
        IeuSettings::checked(settings).map(|_| ())
    }
    fn any_architecture(&self) -> bool {
        true
    }
    /// Stage 1 on the cell's poisoned data (f_p from the ViT checkpoint, shared by every
    /// IEU entry with the same stage-1 settings), then stage 2 on f_r's checkpoint.
    fn plan(&self, cell: &mut CellPlan, settings: &Value) -> Result<String> {
        let s = IeuSettings::of(settings)?;
        let who = format!("defence {}", cell.defence);
        let (attack, poison) = (cell.attack.to_string(), cell.poison_key.to_string());
        let fp_key = plan_stage1(cell.plan, cell.ds, &s, &who, &attack, &poison)?;
        cell.finetune(
            DefenceParams::new("ieu", &s.stage2())?,
            &[("stage1", &fp_key)],
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

/// One unlearning step of stage 2, as stored in `train_stats.json` (`unlearn_trace`): the
/// inputs and output of Eq. 3 and what the batch held.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UnlearnRecord {
    pub epoch: usize,
    /// Training iteration (over the whole run) after whose learning step it ran.
    pub iter: usize,
    /// Eq. 3's k: batches unlearned before it in this epoch.
    pub k: usize,
    /// ℓ_{k−1}, the loss of the previous unlearned batch (or its moving average); absent
    /// at k = 0.
    pub prev_loss: Option<f64>,
    /// The factor on lr_tune (1 at k = 0).
    pub factor: f64,
    pub lr_tune: f64,
    pub lr_ul: f64,
    /// This batch's unlearning loss ℓ_k (before its update).
    pub loss: f64,
    /// Fraction of the batch that is truly poisoned.
    pub poisoned_fraction: f64,
}

/// Statistics of a stage-2 run, written to `train_stats.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stage2Stats {
    pub gate: GateStats,
    pub loss_per_epoch: Vec<f64>,
    pub unlearn_steps: usize,
    pub unlearn_losses: Vec<f64>,
    pub unlearn_scales: Vec<f64>,
    #[serde(default)]
    pub unlearn_trace: Vec<UnlearnRecord>,
}

/// The `finetune` step with `defence: ieu`: stage 2 (Algorithm 1) on the stage-1 f_p.
pub fn run(p: &FinetuneParams, inputs: &FinetuneInputs, out: &Path, device: &Device) -> Result<()> {
    let params: IeuParams = p.defence.fields()?;
    let meta = crate::data::load_meta(&inputs.dataset)?;
    let tune = ImageSet::load(&inputs.poison.join("tune.safetensors"))?;
    let poison_idx = crate::attacks::load_poison_indices(&inputs.poison)?;
    let (fp, _) = crate::models::load_vit(inputs.input("stage1")?, device)?;
    let fp_logits = crate::train::logits(&fp, &tune, &meta, GATE_BATCH, device);
    // Algorithm 1 line 10: queued iff max σ(f_p(x)) > c_thresh (or another selection).
    let flagged = params.selection.flags(
        &fp_logits,
        &tune.labels,
        params.c_thresh,
        &poison_idx,
        p.seed,
    );
    let gate = GateStats::from_flags(&flagged, &poison_idx);
    tracing::info!(
        poison_flagged = format!("{:.2}%", gate.poison_flagged_pct()),
        clean_flagged = format!("{:.2}%", gate.fpr()),
        "IEU gate on the finetuning set"
    );
    let (model, cfg) =
        super::initial_robust_net(&inputs.pretrain, meta.num_classes(), p.seed, device)?;
    let ad = device.clone().autodiff();
    let mut alg = Algorithm1::new(
        &params,
        p,
        &tune,
        &meta,
        fp_logits,
        flagged,
        &poison_idx,
        &ad,
    );
    alg.stats.gate = gate;
    let sup = p.supervised("ieu f_r", tune.len());
    let (model, log) = fit(model, &tune, &meta, &sup, &mut alg, &ad)?;
    let mut stats = alg.stats;
    stats.loss_per_epoch = log;
    crate::models::save_net_with_stats(&model.valid(), &cfg, &stats, out)
}

/// Algorithm 1's stage 2 as hooks of the training loop: the learning loss with logit
/// masking (lines 6–8, Eq. 1), the queue (lines 4, 10) and the unlearning steps (lines
/// 11–14, Eq. 3).
pub struct Algorithm1<'a> {
    params: &'a IeuParams,
    seed: u64,
    batch_size: usize,
    tune: &'a ImageSet,
    meta: &'a DatasetMeta,
    fp_logits: Logits,
    flagged: Vec<bool>,
    is_poison: Vec<bool>,
    /// Views of the unlearned images: the learning views and the unaugmented one.
    ul_views: Vec<View>,
    queue: VecDeque<usize>,
    schedule: UnlearnSchedule,
    optim_ul: Optimiser,
    device: Device,
    pub stats: Stage2Stats,
}

impl<'a> Algorithm1<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        params: &'a IeuParams,
        p: &FinetuneParams,
        tune: &'a ImageSet,
        meta: &'a DatasetMeta,
        fp_logits: Logits,
        flagged: Vec<bool>,
        poison_idx: &[usize],
        device: &Device,
    ) -> Self {
        let mut ul_views = p.learn_views().to_vec();
        if !ul_views.contains(&View::NoAug) {
            ul_views.push(View::NoAug);
        }
        let mut is_poison = vec![false; tune.len()];
        for &i in poison_idx {
            is_poison[i] = true;
        }
        Self {
            params,
            seed: p.seed,
            batch_size: p.batch_size,
            tune,
            meta,
            fp_logits,
            flagged,
            is_poison,
            ul_views,
            queue: VecDeque::new(),
            schedule: UnlearnSchedule::new(params.unlearn_rate.clone(), meta.num_classes()),
            optim_ul: Optimiser::adamw(),
            device: device.clone(),
            stats: Stage2Stats::default(),
        }
    }

    /// Line 10: whether image `i` joins the unlearn queue in this epoch.
    fn queued(&self, i: usize, epoch: usize) -> bool {
        let p = self.params;
        if p.gate_noise_std > 0.0 && p.selection.is_confidence() {
            // Table 14: the queueing decision sees f_p's logits plus Gaussian noise; the
            // mask of Eq. 1 does not.
            let mut rng = rng_for(self.seed, epoch, i, 0x4015E);
            let noisy: Vec<f32> = self
                .fp_logits
                .row(i)
                .iter()
                .map(|l| l + p.gate_noise_std as f32 * crate::data::augment::gaussian(&mut rng))
                .collect();
            max_softmax(&noisy) as f64 > p.c_thresh
        } else {
            self.flagged[i]
        }
    }
}

impl<M: Classifier> Hooks<M> for Algorithm1<'_> {
    /// Line 4: a fresh unlearn queue each epoch; Eq. 3's k restarts at 0.
    fn epoch_start(&mut self, _epoch: usize) {
        self.queue.clear();
        self.schedule.reset();
    }

    /// Lines 6–8: ℓ(ŷ, y) with ŷ the masked logits of Eq. 1.
    fn loss(&mut self, model: &M, b: &Batch) -> Result<Tensor<1>> {
        let y_r = model.forward(b.x.clone());
        if !self.params.logit_masking {
            return Ok(cross_entropy(y_r, b.y.clone()));
        }
        let nc = self.fp_logits.classes;
        let rows: Vec<f32> = b
            .images
            .iter()
            .flat_map(|&i| self.fp_logits.row(i).iter().cloned())
            .collect();
        let y_p = Tensor::<2>::from_data(TensorData::new(rows, [b.images.len(), nc]), &self.device);
        let y_p = Tensor::cat(vec![y_p; b.views], 0);
        let logits = if self.params.selection.is_confidence() {
            masked_logits(y_p, y_r, self.params.c_thresh)
        } else {
            let m: Vec<f32> = (0..b.views)
                .flat_map(|_| {
                    b.images
                        .iter()
                        .map(|&i| if self.flagged[i] { 0.0 } else { 1.0 })
                })
                .collect();
            let n = m.len();
            let m = Tensor::<2>::from_data(TensorData::new(m, [n, 1]), &self.device);
            masked_logits_with(y_p, y_r, m)
        };
        Ok(cross_entropy(logits, b.y.clone()))
    }

    /// Lines 10–14: queue this batch's flagged images; when the queue holds a full batch,
    /// unlearn it by one step of gradient ascent at lr_ul (Eq. 3).
    fn after_step(&mut self, mut model: M, b: &Batch) -> Result<M> {
        for &i in b.images {
            if self.queued(i, b.epoch) {
                self.queue.push_back(i);
            }
        }
        if self.queue.len() < self.batch_size {
            return Ok(model);
        }
        let ul: Vec<usize> = self.queue.drain(..self.batch_size).collect();
        let mut rng = rng_for(self.seed, b.epoch, b.index, 0x0111);
        let xs = views(
            self.tune,
            &ul,
            &self.ul_views,
            self.meta,
            &mut rng,
            &self.device,
        );
        let y = labels(self.tune, &ul, &self.device);
        let ys = Tensor::cat(vec![y; xs.len()], 0);
        let ul_loss = cross_entropy(model.forward(Tensor::cat(xs, 0)), ys);
        let value = ul_loss.clone().into_scalar::<f32>() as f64;
        if !value.is_finite() {
            bail!(
                "ieu stage 2: non-finite unlearning loss {value} at epoch {}, batch {} \
                 (unlearned batch {} of the epoch); the paper's weakness [b]",
                b.epoch,
                b.index,
                self.schedule.k
            );
        }
        let factor = self.schedule.scale();
        let lr_ul = b.lr * factor;
        model = self.optim_ul.ascend(model, ul_loss, lr_ul, b.wd);
        let poisoned = ul.iter().filter(|&&i| self.is_poison[i]).count();
        self.stats.unlearn_trace.push(UnlearnRecord {
            epoch: b.epoch,
            iter: b.iter,
            k: self.schedule.k,
            prev_loss: (self.schedule.k > 0).then_some(self.schedule.memory),
            factor,
            lr_tune: b.lr,
            lr_ul,
            loss: value,
            poisoned_fraction: poisoned as f64 / ul.len() as f64,
        });
        self.schedule.record(value);
        self.stats.unlearn_steps += 1;
        self.stats.unlearn_losses.push(value);
        self.stats.unlearn_scales.push(factor);
        Ok(model)
    }

    fn status(&self) -> String {
        format!(" unlearned {}", self.stats.unlearn_steps)
    }
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
}
