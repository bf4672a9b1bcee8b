//! Scales: every size that depends on `--scale` (`experiments/scales.yaml`), their checks,
//! and the memory guard of `run`.

use std::collections::BTreeMap;

use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::parse_yaml;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scale {
    /// The scale's name and the file it was read from (for errors; not hashed).
    #[serde(skip)]
    pub name: String,
    #[serde(skip)]
    pub origin: String,
    pub description: String,
    /// Side of the square images every dataset is resized to.
    pub image_size: usize,
    pub data: DataSizes,
    pub model: ModelDims,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    /// Training views for finetuning: `sit` = clean crop + corrupted crop (the paper's
    /// SiT augmentation, effective batch 2×), `crop` = clean crop only, `plain` = the
    /// unaugmented image.
    pub views: Views,
    pub pretrain: PretrainSchedule,
    pub stage1: Stage1Schedule,
    pub finetune: FinetuneSchedule,
    /// Learning rates of the baselines at this scale (the paper's values at `paper`).
    #[serde(default)]
    pub baselines: BaselineRates,
    /// Training of ISSBA's StegaStamp-style encoder/decoder (the `stegastamp` step).
    pub stegastamp: StegaSchedule,
    /// Defence settings this scale's model needs in place of a defence's built-in
    /// defaults (the paper's values), by defence: `defences: { ieu: { c_thresh: 0.99 } }`.
    /// A spec's own `defaults.<defence>`, `per_dataset` and variants still come after, so
    /// a value a spec states is used at every scale.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub defences: BTreeMap<String, serde_yaml_ng::Value>,
}

/// A value per dataset, with a `default` for datasets not listed.
pub type PerDataset = BTreeMap<String, f64>;

/// Scale-dependent learning rates of ABL and I-BAU (paper Appendix A.2, Table 12). The paper
/// tuned them per dataset; specs can override them per defence variant.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineRates {
    /// ABL's unlearning learning rate (Adam).
    pub abl_unlearn_lr: PerDataset,
    /// I-BAU's outer (model) learning rate (Adam).
    pub ibau_outer_lr: PerDataset,
    /// I-BAU's inner learning rate (SGD on the universal perturbation).
    pub ibau_inner_lr: PerDataset,
    /// Clean test images I-BAU unlearns with (5000 in the paper).
    pub ibau_clean_images: usize,
}

impl Default for BaselineRates {
    fn default() -> Self {
        let map = |pairs: &[(&str, f64)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<PerDataset>()
        };
        Self {
            abl_unlearn_lr: map(&[("default", 5e-7), ("gtsrb", 1e-6), ("tinyimagenet", 2e-7)]),
            ibau_outer_lr: map(&[("default", 5e-5)]),
            ibau_inner_lr: map(&[("default", 5.0), ("tinyimagenet", 10.0)]),
            ibau_clean_images: 5000,
        }
    }
}

impl BaselineRates {
    pub fn for_dataset(map: &PerDataset, dataset: &str) -> f64 {
        map.get(dataset)
            .or_else(|| map.get("default"))
            .copied()
            .unwrap_or(f64::NAN)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Views {
    Sit,
    Crop,
    /// The unaugmented image only (the cheapest; for small-compute scales).
    Plain,
}

/// Subset sizes (0 = everything available).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataSizes {
    /// Clean images for the pretraining step, disjoint from the finetuning set.
    pub pretrain: usize,
    /// Images of the (attacker-supplied) finetuning set D_tune.
    pub tune: usize,
    /// Test images for CA; the ASR set is built from its non-target images.
    pub test: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDims {
    pub patch_size: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_ratio: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainSchedule {
    /// Training view: `flip` (horizontal flip only), `crop` (the SiT clean crop) or `noaug`.
    pub view: crate::train::View,
    pub epochs: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: usize,
    pub weight_decay: f64,
    /// Epochs for the datasets that need another number than `epochs`:
    /// `epochs_per_dataset: { cifar10: 30 }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub epochs_per_dataset: BTreeMap<String, usize>,
}

impl PretrainSchedule {
    /// The pretraining epochs on `dataset`.
    pub fn epochs_on(&self, dataset: &str) -> usize {
        self.epochs_per_dataset
            .get(dataset)
            .copied()
            .unwrap_or(self.epochs)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Stage1Schedule {
    pub epochs: usize,
    pub lr: f64,
    pub warmup_epochs: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StegaSchedule {
    /// Clean pretrain-split images it trains on (0 = all).
    pub train_images: usize,
    pub epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
    /// Convolution width of encoder and decoder.
    pub width: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSchedule {
    pub epochs: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: usize,
    pub wd_start: f64,
    pub wd_end: f64,
}

pub fn load_scale(text: &str, origin: &str, name: &str) -> Result<Scale> {
    let all: BTreeMap<String, Scale> = parse_yaml(text, origin)?;
    let scale = all.get(name).cloned().ok_or_else(|| {
        anyhow!(
            "unknown scale '{name}' (scales in {origin}: {})",
            all.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    let mut scale = scale;
    scale.name = name.to_string();
    scale.origin = origin.to_string();
    validate_scale(&scale, origin, name)?;
    Ok(scale)
}

pub(crate) fn validate_scale(s: &Scale, file: &str, name: &str) -> Result<()> {
    let f = |field: &str, msg: String| anyhow!("{file}: field `{name}.{field}`: {msg}");
    for (defence, overrides) in &s.defences {
        let field = format!("defences.{defence}");
        let d = crate::defences::registered(defence).ok_or_else(|| {
            f(
                &field,
                format!(
                    "unknown defence '{defence}' (known: {})",
                    crate::defences::names().join(", ")
                ),
            )
        })?;
        let Some(mut v) = d.default_settings() else {
            return Err(f(&field, format!("defence '{defence}' has no settings")));
        };
        super::merge(&mut v, overrides).map_err(|e| f(&field, e.to_string()))?;
        d.check(&v).map_err(|e| f(&field, e.to_string()))?;
    }
    if s.image_size < 8 {
        return Err(f(
            "image_size",
            format!("{} is too small (at least 8)", s.image_size),
        ));
    }
    if s.model.patch_size == 0 || !s.image_size.is_multiple_of(s.model.patch_size) {
        return Err(f(
            "model.patch_size",
            format!(
                "{} does not divide image_size {}",
                s.model.patch_size, s.image_size
            ),
        ));
    }
    if s.model.heads == 0 || !s.model.dim.is_multiple_of(s.model.heads) {
        return Err(f(
            "model.heads",
            format!("{} does not divide dim {}", s.model.heads, s.model.dim),
        ));
    }
    if s.model.dim == 0 {
        return Err(f("model.dim", "must be at least 1".into()));
    }
    if s.model.depth == 0 {
        return Err(f("model.depth", "must be at least 1".into()));
    }
    if s.model.mlp_ratio == 0 {
        return Err(f("model.mlp_ratio", "must be at least 1".into()));
    }
    for (ds, &epochs) in &s.pretrain.epochs_per_dataset {
        if epochs < s.pretrain.warmup_epochs.max(1) {
            return Err(f(
                &format!("pretrain.epochs_per_dataset.{ds}"),
                format!(
                    "{epochs} epochs: must be at least 1 and at least pretrain.warmup_epochs ({})",
                    s.pretrain.warmup_epochs
                ),
            ));
        }
    }
    for (field, epochs, warmup) in [
        ("pretrain", s.pretrain.epochs, s.pretrain.warmup_epochs),
        ("stage1", s.stage1.epochs, s.stage1.warmup_epochs),
        ("finetune", s.finetune.epochs, s.finetune.warmup_epochs),
    ] {
        if epochs == 0 {
            return Err(f(&format!("{field}.epochs"), "must be at least 1".into()));
        }
        if warmup > epochs {
            return Err(f(
                &format!("{field}.warmup_epochs"),
                format!("{warmup} is more than {field}.epochs ({epochs})"),
            ));
        }
    }
    for (field, min, max) in [
        ("pretrain.min_lr", s.pretrain.min_lr, s.pretrain.lr),
        ("finetune.min_lr", s.finetune.min_lr, s.finetune.lr),
    ] {
        if !(min >= 0.0 && min <= max) {
            return Err(f(field, format!("{min} must be in [0, lr = {max}]")));
        }
    }
    for (field, v) in [
        ("pretrain.weight_decay", s.pretrain.weight_decay),
        ("finetune.wd_start", s.finetune.wd_start),
        ("finetune.wd_end", s.finetune.wd_end),
    ] {
        if !(v >= 0.0 && v.is_finite()) {
            return Err(f(field, format!("{v} must be a number ≥ 0")));
        }
    }
    if s.batch_size == 0 || s.eval_batch_size == 0 {
        return Err(f("batch_size", "must be positive".into()));
    }
    for (field, v) in [
        ("pretrain.lr", s.pretrain.lr),
        ("stage1.lr", s.stage1.lr),
        ("finetune.lr", s.finetune.lr),
        ("stegastamp.lr", s.stegastamp.lr),
    ] {
        if !(v > 0.0 && v.is_finite()) {
            return Err(f(field, format!("{v} must be a positive number")));
        }
    }
    for (field, map) in [
        ("baselines.abl_unlearn_lr", &s.baselines.abl_unlearn_lr),
        ("baselines.ibau_outer_lr", &s.baselines.ibau_outer_lr),
        ("baselines.ibau_inner_lr", &s.baselines.ibau_inner_lr),
    ] {
        if !map.contains_key("default") {
            return Err(f(field, "needs a `default` entry".into()));
        }
        if let Some((k, v)) = map.iter().find(|(_, v)| !(**v > 0.0 && v.is_finite())) {
            return Err(f(field, format!("{k}: {v} must be a positive number")));
        }
    }
    if s.stegastamp.epochs == 0 {
        return Err(f("stegastamp.epochs", "must be at least 1".into()));
    }
    if s.stegastamp.batch_size == 0 {
        return Err(f("stegastamp.batch_size", "must be positive".into()));
    }
    if s.stegastamp.width == 0 {
        return Err(f("stegastamp.width", "must be positive".into()));
    }
    if s.data.tune == 0 && s.data.pretrain == 0 {
        return Err(f("data", "set explicit pretrain and tune sizes".into()));
    }
    Ok(())
}

/// Refuses a scale whose largest step would not fit in this machine's available memory
/// (checked by `run` before it computes anything; planning, reports and dry runs at any
/// scale stay possible anywhere).
pub fn check_memory(s: &Scale) -> Result<()> {
    let est = memory_estimate(s);
    if let Some(avail) = available_memory()
        && est.total() > avail
    {
        bail!(
            "{}: field `{}.image_size`: {} with this model and batch needs about {} of memory ({} for the images, {} for training a batch on the CPU), more than the {} available",
            s.origin,
            s.name,
            s.image_size,
            gib(est.total()),
            gib(est.data),
            gib(est.training),
            gib(avail)
        );
    }
    Ok(())
}

/// Approximate peak memory of a scale's largest step.
#[derive(Debug, Clone, Copy)]
pub struct MemoryEstimate {
    /// The images held as bytes (pretrain + tune + test; a size of 0, "all", counts as
    /// 50 000 for a training split and 12 630 (GTSRB's) for the test split).
    pub data: u64,
    /// Activations kept for the backward pass of one training batch (CPU backends).
    pub training: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.data + self.training
    }
}

/// Images as u8 plus a ViT's saved activations: per block and token, about
/// (10 + 4·mlp_ratio)·dim floats (norms, q/k/v, projections, the MLP) and 3·heads·tokens
/// for the attention maps, for every image of a batch (twice with the SiT views).
pub fn memory_estimate(s: &Scale) -> MemoryEstimate {
    let size = s.image_size as u64;
    let n = |v: usize, all: u64| if v == 0 { all } else { v as u64 };
    let images = n(s.data.pretrain, 50_000) + n(s.data.tune, 50_000) + n(s.data.test, 12_630);
    let data = images * 3 * size * size;
    let tokens = (size / s.model.patch_size.max(1) as u64).pow(2) + 1;
    let m = &s.model;
    let per_image = m.depth as u64
        * tokens
        * ((10 + 4 * m.mlp_ratio as u64) * m.dim as u64 + 3 * m.heads as u64 * tokens)
        * 4;
    let views = if s.views == Views::Sit { 2 } else { 1 };
    let cpu = crate::backend_name().ends_with("cpu");
    let training = if cpu {
        per_image * s.batch_size as u64 * views
    } else {
        0
    };
    MemoryEstimate { data, training }
}

fn available_memory() -> Option<u64> {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    let a = sys.available_memory();
    (a > 0).then_some(a)
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}
