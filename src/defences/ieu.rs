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
pub mod settings;
pub mod stage1;

use std::collections::VecDeque;
use std::path::Path;

use anyhow::{Result, bail};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use gate::{CONFIDENCES, Confidences, GATE_BATCH, GateStats, Selection};
pub use settings::{IeuParams, IeuSettings, Stage1Loss, UnlearnRate};
pub use stage1::{Stage1Params, plan_stage1, run_stage1_step};

use super::{Defence, DefenceParams, FinetuneInputs, FinetuneParams, Settings};
use crate::data::{DatasetMeta, ImageSet};
use crate::models::Classifier;
use crate::spec::plan::CellPlan;
use crate::train::infer::max_softmax;
use crate::train::{
    Batch, Hooks, Logits, Optimiser, View, cross_entropy, fit, labels, rng_for, views,
};

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
    fn loss(&self, model: &M, b: &Batch) -> Result<Tensor<1>> {
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
mod tests;
