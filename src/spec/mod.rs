//! Experiment specs: YAML → typed spec, scales, grid filtering.
//!
//! A spec (`experiments/table3.yaml`, …) names a grid over dataset × attack × defence,
//! shared defaults and the report layout. A scale (`experiments/scales.yaml`) sets every
//! size: image size, model dimensions, subset sizes, epochs, batch sizes and optimiser
//! settings. Both are parsed strictly: unknown keys, unknown names and out-of-range values
//! are errors naming the file and the field.
//!
//! Besides the built-in datasets (looked up under `--data-dir`), a spec may name datasets
//! of its own in `datasets:` (`mine: { format: imagefolder, path: DIR }`, DIR relative to
//! the spec file) and use those names in `grid.dataset`. `defaults.pretrained: FILE` (or
//! `{ path, heads, checkpoint_key }`) starts every model from an imported checkpoint
//! instead of the `pretrain` step (`src/models/import.rs`).

pub mod names;
pub mod plan;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use names::{ATTACKS, Availability, DATASETS, DEFENCES};

/// The spec run when none is given: the synthetic dataset, so it needs no data on disk.
pub const DEFAULT_SPEC: &str = include_str!("../../experiments/default.yaml");
pub const DEFAULT_SPEC_NAME: &str = "<embedded experiments/default.yaml>";
/// The scales used when no `scales.yaml` sits beside the spec.
pub const DEFAULT_SCALES: &str = include_str!("../../experiments/scales.yaml");

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub name: String,
    pub title: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub defaults: Defaults,
    /// Named defence variants, usable in `grid.defence`.
    #[serde(default)]
    pub variants: BTreeMap<String, Variant>,
    /// Named attack variants (another poisoning rate or target class), usable in
    /// `grid.attack` (Tables 1, 5, 8's "No Attack" with rate 0, 17).
    #[serde(default)]
    pub attack_variants: BTreeMap<String, AttackVariant>,
    /// A user's own datasets, by name, usable in `grid.dataset`:
    /// `mydata: { format: imagefolder, path: DIR }`.
    #[serde(default)]
    pub datasets: BTreeMap<String, DatasetEntry>,
    pub grid: Grid,
    pub report: ReportLayout,
    /// Figures rendered by `report` (the paper's confidence CDFs, Figures 2, 3 and 6).
    #[serde(default)]
    pub figures: Vec<FigureSpec>,
}

/// A figure of f_p's confidence: one panel per grid cell, each the CDFs of max σ(f_p(x))
/// on the clean and the poisoned finetuning images of the cell's stage-1 step.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FigureSpec {
    /// File stem of the figure (`figure6` → figure6.png, figure6.svg).
    pub name: String,
    pub title: String,
    /// Where the dotted line is drawn (the gate's threshold).
    #[serde(default = "default_c_thresh")]
    pub c_thresh: f64,
    pub panels: Vec<PanelSpec>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PanelSpec {
    pub dataset: String,
    pub attack: String,
    /// An IEU defence (or variant): its stage-1 f_p is plotted.
    pub defence: String,
    #[serde(default)]
    pub title: Option<String>,
}

fn default_c_thresh() -> f64 {
    0.95
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Defaults {
    pub seed: u64,
    /// Fraction α of the non-target training images that are poisoned.
    pub poison_rate: f64,
    /// Attacker's target class.
    pub target: usize,
    pub model: String,
    /// Start from this checkpoint file instead of pretraining (an `import` step replaces
    /// the `pretrain` step): `pretrained: FILE` or `pretrained: { path: FILE, heads: H,
    /// checkpoint_key: K }`; FILE is relative to the spec file. See `src/models/import.rs`.
    pub pretrained: Option<Pretrained>,
    pub attacks: AttackDefaults,
    pub ieu: IeuDefaults,
    pub abl: crate::defences::abl::AblSettings,
    pub ibau: crate::defences::ibau::IbauSettings,
    pub attnblock: crate::defences::attnblock::AttnBlockSettings,
}

/// A pretrained checkpoint to start from.
#[derive(Debug, Clone, Serialize)]
pub struct Pretrained {
    /// A timm-layout `.safetensors` file or a PyTorch `.pth` (relative to the spec file).
    pub path: String,
    /// Attention heads (shapes do not tell); default: the scale's when the widths agree,
    /// else width/64.
    pub heads: Option<usize>,
    /// `.pth` only: the nested state dict to read (default: the top level, else the first of
    /// teacher, student, model, state_dict, model_state_dict).
    pub checkpoint_key: Option<String>,
}

impl<'de> Deserialize<'de> for Pretrained {
    /// A bare path or a mapping with `path`, `heads`, `checkpoint_key`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            path: String,
            #[serde(default)]
            heads: Option<usize>,
            #[serde(default)]
            checkpoint_key: Option<String>,
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Pretrained;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a checkpoint path or { path, heads, checkpoint_key }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Pretrained, E> {
                Ok(Pretrained {
                    path: v.to_string(),
                    heads: None,
                    checkpoint_key: None,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<Pretrained, A::Error> {
                let f = Full::deserialize(serde::de::value::MapAccessDeserializer::new(m))?;
                Ok(Pretrained {
                    path: f.path,
                    heads: f.heads,
                    checkpoint_key: f.checkpoint_key,
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            seed: 0,
            poison_rate: 0.1,
            target: 1,
            model: "vit".into(),
            pretrained: None,
            attacks: AttackDefaults::default(),
            ieu: IeuDefaults::default(),
            abl: Default::default(),
            ibau: Default::default(),
            attnblock: Default::default(),
        }
    }
}

/// Per-attack settings; every field has the paper's default. `trigger_file` / `mask_file`
/// paths are relative to the spec file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttackDefaults {
    #[serde(rename = "badnets-white")]
    pub badnets_white: crate::attacks::badnets::BadnetsWhite,
    #[serde(rename = "badnets-pattern")]
    pub badnets_pattern: crate::attacks::badnets::BadnetsPattern,
    pub blended: BlendedSpec,
    #[serde(rename = "trojan-sq")]
    pub trojan_sq: FileSpec,
    #[serde(rename = "trojan-wm")]
    pub trojan_wm: FileSpec,
    #[serde(rename = "l0-inv")]
    pub l0_inv: L0Spec,
    #[serde(rename = "l2-inv")]
    pub l2_inv: L2Spec,
    pub smooth: SmoothSpec,
    pub sig: crate::attacks::sig::Sig,
    pub batt: crate::attacks::batt::Batt,
    pub wanet: crate::attacks::wanet::Wanet,
    pub issba: crate::attacks::issba::Issba,
    pub cat: crate::attacks::cat::Cat,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlendedSpec {
    pub alpha: f64,
    pub trigger_file: Option<String>,
}

impl Default for BlendedSpec {
    fn default() -> Self {
        Self {
            alpha: 0.4,
            trigger_file: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileSpec {
    pub trigger_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct L0Spec {
    pub pixels: usize,
    pub trigger_file: Option<String>,
    pub mask_file: Option<String>,
}

impl Default for L0Spec {
    fn default() -> Self {
        Self {
            pixels: 9,
            trigger_file: None,
            mask_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct L2Spec {
    pub l2_norm: f64,
    /// How the trigger is generated without a file: `field` (default) or `iid`.
    pub recipe: crate::attacks::invisible_l2::Recipe,
    pub trigger_file: Option<String>,
}

impl Default for L2Spec {
    fn default() -> Self {
        Self {
            l2_norm: 3.2,
            recipe: Default::default(),
            trigger_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmoothSpec {
    pub max: f64,
    pub trigger_file: Option<String>,
}

impl Default for SmoothSpec {
    fn default() -> Self {
        Self {
            max: 0.2,
            trigger_file: None,
        }
    }
}

/// IEU settings (paper Table 11 defaults for CIFAR10/TinyImageNet) and its ablation knobs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IeuDefaults {
    /// Confidence threshold of the gate (Eq. 1; Table 6).
    pub c_thresh: f64,
    /// Which images go to the unlearn set: `confidence` (the gate, Eq. 1),
    /// `{lowest_loss: r_isol}` (Table 1) or `{oracle: ratio}` (hand-crafted, Table 2).
    pub selection: crate::defences::ieu::Selection,
    /// Number of checkpoint blocks in the poisoned module f_p (Table 7).
    pub fp_depth: usize,
    /// Eq. 1 logit masking; `false` is Table 4's ablation (ŷ = ŷ_r).
    pub logit_masking: bool,
    /// Unlearning rate: Eq. 3 (`dynamic`), `{constant: c}` (Table 9) or
    /// `{moving_average: beta}` (the paper's proposed fix for weakness [b]).
    pub unlearn_rate: crate::defences::ieu::UnlearnRate,
    /// Standard deviation of Gaussian noise added to f_p's logits for the queueing
    /// decision only (Table 14); 0 = off.
    pub gate_noise_std: f64,
    /// Stage-1 loss of f_p: `ce`, `{lga: gamma}` or `{flooding: gamma}` (Tables 15, 16).
    pub stage1_loss: crate::defences::ieu::Stage1Loss,
}

impl Default for IeuDefaults {
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

/// A named defence variant: a built-in defence with some settings changed, usable as a
/// grid `defence` entry (e.g. Table 4's IEU without logit masking).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// The built-in defence it is based on (`ieu`, `abl`, `ibau` or `attnblock`).
    pub base: String,
    /// IEU settings that differ from `defaults.ieu` (any of its fields).
    #[serde(default)]
    pub ieu: serde_yaml_ng::Value,
    /// ABL settings that differ from `defaults.abl`.
    #[serde(default)]
    pub abl: serde_yaml_ng::Value,
    /// I-BAU settings that differ from `defaults.ibau`.
    #[serde(default)]
    pub ibau: serde_yaml_ng::Value,
    /// AttnBlock settings that differ from `defaults.attnblock`.
    #[serde(default)]
    pub attnblock: serde_yaml_ng::Value,
    /// f_r's architecture for this entry (`defaults.model` otherwise); `none` and `ieu`
    /// variants only (Table 8). f_p stays the first block(s) of the ViT checkpoint.
    #[serde(default)]
    pub model: Option<String>,
}

impl Variant {
    /// The overrides given for a defence (`Null` when none).
    fn overrides(&self, defence: &str) -> &serde_yaml_ng::Value {
        match defence {
            "ieu" => &self.ieu,
            "abl" => &self.abl,
            "ibau" => &self.ibau,
            _ => &self.attnblock,
        }
    }
}

/// `base` with the keys of `overrides` replaced (merged in JSON form, where externally
/// tagged enums are plain maps).
fn merged<T: Serialize + DeserializeOwned>(
    base: &T,
    overrides: &serde_yaml_ng::Value,
) -> Result<T> {
    let mut base = serde_json::to_value(base)?;
    match (&mut base, serde_json::to_value(overrides)?) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => b.extend(o),
        (_, serde_json::Value::Null) => {}
        _ => bail!("expected a mapping of settings"),
    }
    Ok(serde_json::from_value(base)?)
}

/// `defaults` with each section of `overrides` (`{ <attack>: { field: value } }`) merged
/// into the section of the same name.
fn merged_attacks(
    defaults: &AttackDefaults,
    overrides: &serde_yaml_ng::Value,
) -> Result<AttackDefaults> {
    let mut base = serde_json::to_value(defaults)?;
    match (&mut base, serde_json::to_value(overrides)?) {
        (_, serde_json::Value::Null) => {}
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (section, fields) in o {
                let Some(serde_json::Value::Object(target)) = b.get_mut(&section) else {
                    bail!("unknown attack section '{section}'");
                };
                let serde_json::Value::Object(fields) = fields else {
                    bail!("`{section}`: expected a mapping of settings");
                };
                target.extend(fields);
            }
        }
        _ => bail!("expected a mapping of attack sections"),
    }
    Ok(serde_json::from_value(base)?)
}

/// A named attack variant: a built-in attack with its own poisoning rate and/or target.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AttackVariant {
    /// The built-in attack it is based on.
    pub base: String,
    /// α for this entry (`defaults.poison_rate` otherwise); 0 = no poisoned images.
    #[serde(default)]
    pub poison_rate: Option<f64>,
    /// Target class for this entry (`defaults.target` otherwise).
    #[serde(default)]
    pub target: Option<usize>,
    /// Attack settings that differ from `defaults.attacks`, in the same shape
    /// (`{ l2-inv: { recipe: iid } }`); each named section's fields replace the defaults'.
    #[serde(default)]
    pub attacks: serde_yaml_ng::Value,
}

/// A dataset of the user's own (see `src/data/imagefolder.rs`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetEntry {
    /// On-disk layout: `imagefolder` (`DIR/train/<class>/*`, `DIR/test/<class>/*`).
    pub format: DatasetFormat,
    /// The dataset's root folder: absolute, or relative to the spec file.
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    Imagefolder,
}

impl DatasetFormat {
    pub fn name(self) -> &'static str {
        match self {
            DatasetFormat::Imagefolder => "imagefolder",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    pub dataset: Vec<String>,
    pub attack: Vec<String>,
    pub defence: Vec<String>,
}

impl Spec {
    /// The IEU settings of a defence entry: `defaults.ieu`, with a variant's overrides.
    pub fn ieu_settings(&self, defence: &str) -> Result<IeuDefaults> {
        self.settings(defence, "ieu", &self.defaults.ieu)
    }

    /// The ABL settings of a defence entry (`defaults.abl` with a variant's overrides).
    pub fn abl_settings(&self, defence: &str) -> Result<crate::defences::abl::AblSettings> {
        self.settings(defence, "abl", &self.defaults.abl)
    }

    /// The I-BAU settings of a defence entry.
    pub fn ibau_settings(&self, defence: &str) -> Result<crate::defences::ibau::IbauSettings> {
        self.settings(defence, "ibau", &self.defaults.ibau)
    }

    /// The AttnBlock settings of a defence entry.
    pub fn attnblock_settings(
        &self,
        defence: &str,
    ) -> Result<crate::defences::attnblock::AttnBlockSettings> {
        self.settings(defence, "attnblock", &self.defaults.attnblock)
    }

    fn settings<T: Clone + Serialize + DeserializeOwned>(
        &self,
        defence: &str,
        base: &str,
        defaults: &T,
    ) -> Result<T> {
        match self.variants.get(defence) {
            Some(v) if v.base == base => merged(defaults, v.overrides(base)),
            _ => Ok(defaults.clone()),
        }
    }

    /// The attack settings of a grid attack entry: `defaults.attacks` with the variant's
    /// `attacks:` merged in (validated when the spec is loaded).
    pub fn attacks_of(&self, attack: &str) -> Result<AttackDefaults> {
        match self.attack_variants.get(attack) {
            Some(v) => merged_attacks(&self.defaults.attacks, &v.attacks),
            None => Ok(self.defaults.attacks.clone()),
        }
    }

    /// The built-in attack behind a grid entry.
    pub fn attack_base<'a>(&'a self, attack: &'a str) -> &'a str {
        self.attack_variants
            .get(attack)
            .map(|v| v.base.as_str())
            .unwrap_or(attack)
    }

    /// f_r's architecture for a grid defence entry: the variant's `model`, else
    /// `defaults.model` (both validated when the spec is loaded).
    pub fn model_of(&self, defence: &str) -> crate::models::Arch {
        let name = self
            .variants
            .get(defence)
            .and_then(|v| v.model.as_deref())
            .unwrap_or(&self.defaults.model);
        crate::models::Arch::parse(name).unwrap_or_default()
    }

    /// The built-in defence behind a grid entry.
    pub fn defence_base<'a>(&'a self, defence: &'a str) -> &'a str {
        self.variants
            .get(defence)
            .map(|v| v.base.as_str())
            .unwrap_or(defence)
    }
}

impl Grid {
    pub fn axis(&self, name: &str) -> Option<&Vec<String>> {
        match name {
            "dataset" => Some(&self.dataset),
            "attack" => Some(&self.attack),
            "defence" => Some(&self.defence),
            _ => None,
        }
    }
    pub(crate) fn axis_mut(&mut self, name: &str) -> Option<&mut Vec<String>> {
        match name {
            "dataset" => Some(&mut self.dataset),
            "attack" => Some(&mut self.attack),
            "defence" => Some(&mut self.defence),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Min,
    Max,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReportLayout {
    /// Grid axes that form the table rows, outermost first.
    pub rows: Vec<String>,
    /// Grid axis that forms the column groups.
    pub columns: String,
    /// Metrics shown under each column group.
    pub metrics: Vec<String>,
    /// Add an average row per outermost row group.
    #[serde(default)]
    pub average: bool,
    /// Metric -> which value is best (bolded in the row).
    #[serde(default)]
    pub best: BTreeMap<String, Better>,
    /// Optional reference numbers printed beside the measured ones, e.g. the paper's.
    #[serde(default)]
    pub reference: Option<Reference>,
}

/// Reference values: `cells["cifar10/badnets-white/none"] = {asr: 97.51, ca: 98.36}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    pub source: String,
    pub cells: BTreeMap<String, BTreeMap<String, f64>>,
}

/// Metric names a report may show.
pub const METRICS: &[&str] = &[
    "asr",
    "ca",
    "fpr",
    "fnr",
    "poison_flagged",
    "clean_flagged",
    "unlearn_steps",
    "ca_unseen",
];

// ---------------------------------------------------------------------------------------
// Scales

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

// ---------------------------------------------------------------------------------------
// Loading

/// Deserialises YAML strictly; errors name the file and the field path.
pub fn parse_yaml<T: DeserializeOwned>(text: &str, file: &str) -> Result<T> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        if path == "." || path.is_empty() || msg.contains(&path) {
            anyhow!("{file}: {msg}")
        } else {
            anyhow!("{file}: field `{path}`: {msg}")
        }
    })
}

/// A loaded, validated spec together with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedSpec {
    pub spec: Spec,
    /// File name used in messages.
    pub origin: String,
    /// Directory relative paths in the spec are resolved against.
    pub dir: PathBuf,
}

impl LoadedSpec {
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let (text, origin, dir) = match path {
            None => (
                DEFAULT_SPEC.to_string(),
                DEFAULT_SPEC_NAME.to_string(),
                PathBuf::from("."),
            ),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| anyhow!("cannot read spec {}: {e}", p.display()))?;
                let dir = p
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| ".".into());
                (text, p.display().to_string(), dir)
            }
        };
        Self::from_str(&text, &origin, dir)
    }

    pub fn from_str(text: &str, origin: &str, dir: PathBuf) -> Result<Self> {
        let spec: Spec = parse_yaml(text, origin)?;
        validate_spec(&spec, origin)?;
        Ok(Self {
            spec,
            origin: origin.to_string(),
            dir,
        })
    }

    /// The scales file beside the spec if there is one, else the embedded copy.
    /// The names of the scales this spec can run at (its `scales.yaml` or the embedded one).
    pub fn scale_names(&self) -> Result<Vec<String>> {
        let (text, origin) = self.scales_text()?;
        let all: BTreeMap<String, serde_yaml_ng::Value> = parse_yaml(&text, &origin)?;
        Ok(all.into_keys().collect())
    }

    fn scales_text(&self) -> Result<(String, String)> {
        let beside = self.dir.join("scales.yaml");
        Ok(if beside.is_file() {
            let text = std::fs::read_to_string(&beside)
                .map_err(|e| anyhow!("cannot read {}: {e}", beside.display()))?;
            (text, beside.display().to_string())
        } else {
            (
                DEFAULT_SCALES.to_string(),
                "<embedded experiments/scales.yaml>".to_string(),
            )
        })
    }

    pub fn scale(&self, name: &str) -> Result<Scale> {
        let (text, origin) = self.scales_text()?;
        load_scale(&text, &origin, name)
    }

    /// Restricts grid axes: each filter is `AXIS=V1,V2`.
    pub fn apply_only(&mut self, filters: &[String]) -> Result<()> {
        for f in filters {
            let (axis, values) = f.split_once('=').ok_or_else(|| {
                anyhow!("--only {f}: expected AXIS=V1,V2 (axes: dataset, attack, defence)")
            })?;
            let axis = axis.trim();
            let list = self.spec.grid.axis_mut(axis).ok_or_else(|| {
                anyhow!("--only {f}: unknown axis '{axis}' (axes: dataset, attack, defence)")
            })?;
            let wanted: Vec<String> = values
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            if wanted.is_empty() {
                bail!("--only {f}: no values given");
            }
            for w in &wanted {
                if !list.contains(w) {
                    bail!(
                        "--only {f}: '{w}' is not in grid.{axis} of {} (it has: {})",
                        self.origin,
                        list.join(", ")
                    );
                }
            }
            list.retain(|v| wanted.contains(v));
        }
        Ok(())
    }
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

fn validate_spec(spec: &Spec, file: &str) -> Result<()> {
    for (fi, f) in spec.figures.iter().enumerate() {
        if !(f.c_thresh > 0.0 && f.c_thresh < 1.0) {
            bail!(
                "{file}: field `figures[{fi}].c_thresh`: {} is not in (0, 1)",
                f.c_thresh
            );
        }
        if f.panels.is_empty() {
            bail!("{file}: field `figures[{fi}].panels`: give at least one panel");
        }
        for (pi, p) in f.panels.iter().enumerate() {
            for (axis, v) in [
                ("dataset", &p.dataset),
                ("attack", &p.attack),
                ("defence", &p.defence),
            ] {
                if !spec.grid.axis(axis).is_some_and(|a| a.contains(v)) {
                    bail!(
                        "{file}: field `figures[{fi}].panels[{pi}].{axis}`: '{v}' is not in grid.{axis}"
                    );
                }
            }
        }
    }
    let d = &spec.defaults;
    if !(0.0..1.0).contains(&d.poison_rate) {
        bail!(
            "{file}: field `defaults.poison_rate`: {} is not in [0, 1)",
            d.poison_rate
        );
    }
    if !(d.ieu.c_thresh > 0.0 && d.ieu.c_thresh < 1.0) {
        bail!(
            "{file}: field `defaults.ieu.c_thresh`: {} is not in (0, 1)",
            d.ieu.c_thresh
        );
    }
    if d.ieu.fp_depth == 0 {
        bail!("{file}: field `defaults.ieu.fp_depth`: must be at least 1");
    }
    if let Some(p) = &d.pretrained {
        if p.path.trim().is_empty() {
            bail!("{file}: field `defaults.pretrained.path`: empty path");
        }
        if p.heads == Some(0) {
            bail!("{file}: field `defaults.pretrained.heads`: must be at least 1");
        }
    }
    crate::models::Arch::parse(&d.model)
        .map_err(|e| anyhow!("{file}: field `defaults.model`: {e}"))?;
    check_attacks(file, "defaults.attacks", &d.attacks)?;
    for (axis, known) in [
        ("dataset", DATASETS),
        ("attack", ATTACKS),
        ("defence", DEFENCES),
    ] {
        let list = spec.grid.axis(axis).unwrap();
        if list.is_empty() {
            bail!("{file}: field `grid.{axis}`: empty list");
        }
        for (i, v) in list.iter().enumerate() {
            if (axis == "defence" && spec.variants.contains_key(v))
                || (axis == "attack" && spec.attack_variants.contains_key(v))
                || (axis == "dataset" && spec.datasets.contains_key(v))
            {
                continue;
            }
            if names::axis_availability(axis, v).is_none() {
                let also = if axis == "attack" {
                    ", cat+<attack>"
                } else {
                    ""
                };
                bail!(
                    "{file}: field `grid.{axis}[{i}]`: unknown {axis} '{v}' (known: {}{also})",
                    known.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                );
            }
            if list[..i].contains(v) {
                bail!("{file}: field `grid.{axis}[{i}]`: '{v}' is listed twice");
            }
        }
    }
    for (name, v) in &spec.attack_variants {
        let at = format!("attack_variants.{name}");
        if ATTACKS.iter().any(|(n, _)| n == name) {
            bail!("{file}: field `{at}`: a variant cannot reuse the built-in attack name '{name}'");
        }
        if names::axis_availability("attack", &v.base).is_none() {
            bail!(
                "{file}: field `{at}.base`: unknown attack '{}' (known: {}, cat+<attack>)",
                v.base,
                ATTACKS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if let Some(r) = v.poison_rate
            && !(0.0..1.0).contains(&r)
        {
            bail!("{file}: field `{at}.poison_rate`: {r} is not in [0, 1)");
        }
        let merged = merged_attacks(&d.attacks, &v.attacks)
            .map_err(|e| anyhow!("{file}: field `{at}.attacks`: {e}"))?;
        check_attacks(file, &format!("{at}.attacks"), &merged)?;
    }
    let cat_base = &d.attacks.cat.base;
    if cat_base == "cat"
        || names::cat_base(cat_base).is_some()
        || names::availability(ATTACKS, cat_base).is_none()
    {
        bail!(
            "{file}: field `defaults.attacks.cat.base`: '{cat_base}' is not an attack CAT can perturb"
        );
    }
    for (name, entry) in &spec.datasets {
        if DATASETS.iter().any(|(n, _)| n == name) {
            bail!(
                "{file}: field `datasets.{name}`: '{name}' is a built-in dataset; choose another name"
            );
        }
        if entry.path.trim().is_empty() {
            bail!("{file}: field `datasets.{name}.path`: empty path");
        }
    }
    for (name, v) in &spec.variants {
        if DEFENCES.iter().any(|(n, _)| n == name) {
            bail!(
                "{file}: field `variants.{name}`: a variant cannot reuse the built-in defence name '{name}'"
            );
        }
        if let Some(m) = &v.model {
            crate::models::Arch::parse(m)
                .map_err(|e| anyhow!("{file}: field `variants.{name}.model`: {e}"))?;
            if !["none", "ieu"].contains(&v.base.as_str()) {
                bail!(
                    "{file}: field `variants.{name}.model`: only none and ieu variants can change f_r's architecture ({} runs on the ViT)",
                    v.base
                );
            }
        }
        if v.base == "none" && v.model.is_some() {
            for other in ["ieu", "abl", "ibau", "attnblock"] {
                if !v.overrides(other).is_null() {
                    bail!(
                        "{file}: field `variants.{name}.{other}`: a variant based on none cannot set {other} settings"
                    );
                }
            }
            continue;
        }
        const TUNABLE: [&str; 4] = ["ieu", "abl", "ibau", "attnblock"];
        if !TUNABLE.contains(&v.base.as_str()) {
            bail!(
                "{file}: field `variants.{name}.base`: '{}' has no settings to vary (known: {}; or none with `model:`)",
                v.base,
                TUNABLE.join(", ")
            );
        }
        for other in TUNABLE {
            if other != v.base && !v.overrides(other).is_null() {
                bail!(
                    "{file}: field `variants.{name}.{other}`: a variant based on {} cannot set {other} settings",
                    v.base
                );
            }
        }
        let at = format!("variants.{name}.{}", v.base);
        let wrap = |e: anyhow::Error| anyhow!("{file}: field `{at}`: {e}");
        match v.base.as_str() {
            "ieu" => validate_ieu(&spec.ieu_settings(name).map_err(wrap)?, file, &at)?,
            "abl" => spec
                .abl_settings(name)
                .map_err(wrap)?
                .validate()
                .map_err(|e| anyhow!("{file}: field `{at}`: {e}"))?,
            "ibau" => spec
                .ibau_settings(name)
                .map_err(wrap)?
                .validate()
                .map_err(|e| anyhow!("{file}: field `{at}`: {e}"))?,
            _ => spec
                .attnblock_settings(name)
                .map_err(wrap)?
                .validate()
                .map_err(|e| anyhow!("{file}: field `{at}`: {e}"))?,
        }
    }
    if d.model != "vit" {
        for v in &spec.grid.defence {
            let base = spec.defence_base(v);
            if ["abl", "ibau", "attnblock"].contains(&base) {
                bail!(
                    "{file}: field `defaults.model`: defence {v} ({base}) runs on the ViT only, not on {} (give the architecture to none/ieu variants with `model:` instead)",
                    d.model
                );
            }
        }
    }
    validate_ieu(&d.ieu, file, "defaults.ieu")?;
    d.abl
        .validate()
        .map_err(|e| anyhow!("{file}: field `defaults.abl`: {e}"))?;
    d.ibau
        .validate()
        .map_err(|e| anyhow!("{file}: field `defaults.ibau`: {e}"))?;
    d.attnblock
        .validate()
        .map_err(|e| anyhow!("{file}: field `defaults.attnblock`: {e}"))?;
    let r = &spec.report;
    for (i, row) in r.rows.iter().enumerate() {
        if spec.grid.axis(row).is_none() {
            bail!(
                "{file}: field `report.rows[{i}]`: '{row}' is not a grid axis (dataset, attack, defence)"
            );
        }
    }
    if spec.grid.axis(&r.columns).is_none() || r.rows.contains(&r.columns) {
        bail!(
            "{file}: field `report.columns`: '{}' must be a grid axis not used in rows",
            r.columns
        );
    }
    if r.rows.len() + 1 != 3 {
        bail!(
            "{file}: field `report.rows`: rows and columns together must use all three grid axes"
        );
    }
    for (i, m) in r.metrics.iter().enumerate() {
        if !METRICS.contains(&m.as_str()) {
            bail!(
                "{file}: field `report.metrics[{i}]`: unknown metric '{m}' (known: {})",
                METRICS.join(", ")
            );
        }
    }
    for m in r.best.keys() {
        if !METRICS.contains(&m.as_str()) {
            bail!("{file}: field `report.best.{m}`: unknown metric '{m}'");
        }
    }
    Ok(())
}

fn validate_ieu(ieu: &IeuDefaults, file: &str, at: &str) -> Result<()> {
    if !(ieu.c_thresh > 0.0 && ieu.c_thresh < 1.0) {
        bail!(
            "{file}: field `{at}.c_thresh`: {} is not in (0, 1)",
            ieu.c_thresh
        );
    }
    if ieu.fp_depth == 0 {
        bail!("{file}: field `{at}.fp_depth`: must be at least 1");
    }
    if !(ieu.gate_noise_std >= 0.0 && ieu.gate_noise_std.is_finite()) {
        bail!(
            "{file}: field `{at}.gate_noise_std`: {} must be a non-negative number",
            ieu.gate_noise_std
        );
    }
    ieu.selection
        .validate()
        .map_err(|e| anyhow!("{file}: field `{at}.selection`: {e}"))?;
    ieu.unlearn_rate
        .validate()
        .map_err(|e| anyhow!("{file}: field `{at}.unlearn_rate`: {e}"))?;
    ieu.stage1_loss
        .validate()
        .map_err(|e| anyhow!("{file}: field `{at}.stage1_loss`: {e}"))?;
    Ok(())
}

fn validate_scale(s: &Scale, file: &str, name: &str) -> Result<()> {
    let f = |field: &str, msg: String| anyhow!("{file}: field `{name}.{field}`: {msg}");
    if s.image_size < 8 {
        return Err(f(
            "image_size",
            format!("{} is too small (at least 8)", s.image_size),
        ));
    }
    if s.model.patch_size == 0 || s.image_size % s.model.patch_size != 0 {
        return Err(f(
            "model.patch_size",
            format!(
                "{} does not divide image_size {}",
                s.model.patch_size, s.image_size
            ),
        ));
    }
    if s.model.heads == 0 || s.model.dim % s.model.heads != 0 {
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
    if let Some(avail) = available_memory() {
        if est.total() > avail {
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

/// Range checks of every attack setting; `at` is the field path of `a` in the spec.
fn check_attacks(file: &str, at: &str, a: &AttackDefaults) -> Result<()> {
    let b = &a.blended;
    if !(b.alpha > 0.0 && b.alpha <= 1.0) {
        bail!(
            "{file}: field `{at}.blended.alpha`: {} is not in (0, 1]",
            b.alpha
        );
    }
    if !(a.badnets_white.size_frac > 0.0 && a.badnets_white.size_frac <= 0.5) {
        bail!(
            "{file}: field `{at}.badnets-white.size_frac`: {} is not in (0, 0.5]",
            a.badnets_white.size_frac
        );
    }
    let in01 = |v: f64| v > 0.0 && v <= 1.0;
    for (field, v, ok) in [
        (
            "badnets-pattern.size_frac",
            a.badnets_pattern.size_frac,
            a.badnets_pattern.size_frac > 0.0 && a.badnets_pattern.size_frac <= 0.5,
        ),
        (
            "l2-inv.l2_norm",
            a.l2_inv.l2_norm,
            a.l2_inv.l2_norm > 0.0 && a.l2_inv.l2_norm.is_finite(),
        ),
        ("smooth.max", a.smooth.max, in01(a.smooth.max)),
        ("sig.alpha", a.sig.alpha, in01(a.sig.alpha)),
        (
            "sig.freq",
            a.sig.freq,
            a.sig.freq > 0.0 && a.sig.freq.is_finite(),
        ),
        (
            "batt.degrees",
            a.batt.degrees,
            a.batt.degrees.is_finite() && a.batt.degrees != 0.0,
        ),
        (
            "wanet.s",
            a.wanet.s,
            a.wanet.s >= 0.0 && a.wanet.s.is_finite(),
        ),
        (
            "wanet.cross_ratio",
            a.wanet.cross_ratio,
            a.wanet.cross_ratio >= 0.0 && a.wanet.cross_ratio.is_finite(),
        ),
        ("wanet.k", a.wanet.k as f64, a.wanet.k >= 2),
        (
            "l0-inv.pixels",
            a.l0_inv.pixels as f64,
            a.l0_inv.pixels >= 1,
        ),
        (
            "issba.secret_len",
            a.issba.secret_len as f64,
            a.issba.secret_len >= 1,
        ),
        ("issba.eps", a.issba.eps, in01(a.issba.eps)),
        (
            "issba.l2_weight",
            a.issba.l2_weight,
            a.issba.l2_weight >= 0.0 && a.issba.l2_weight.is_finite(),
        ),
        ("cat.gamma", a.cat.gamma, (0.0..=1.0).contains(&a.cat.gamma)),
        (
            "cat.iterations",
            a.cat.iterations as f64,
            a.cat.iterations >= 1,
        ),
        (
            "cat.l2_budget",
            a.cat.l2_budget,
            a.cat.l2_budget > 0.0 && a.cat.l2_budget.is_finite(),
        ),
    ] {
        if !ok {
            bail!("{file}: field `{at}.{field}`: {v} is out of range");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name: t
title: T
grid: { dataset: [synthetic], attack: [badnets-white], defence: [none, ieu] }
report: { rows: [dataset, attack], columns: defence, metrics: [asr, ca] }
"#;

    #[test]
    fn parses_minimal_spec_with_defaults() {
        let s = LoadedSpec::from_str(GOOD, "t.yaml", ".".into()).unwrap();
        assert_eq!(s.spec.defaults.target, 1);
        assert_eq!(s.spec.defaults.ieu.c_thresh, 0.95);
    }

    #[test]
    fn unknown_key_names_file_and_field() {
        let bad = GOOD.replace("name: t", "name: t\ndefaults: { poison_rat: 0.2 }");
        let e = LoadedSpec::from_str(&bad, "t.yaml", ".".into())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.yaml") && e.contains("defaults") && e.contains("poison_rat"),
            "{e}"
        );
    }

    #[test]
    fn unknown_attack_names_index() {
        let bad = GOOD.replace("[badnets-white]", "[badnets-white, badnetz]");
        let e = LoadedSpec::from_str(&bad, "t.yaml", ".".into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("grid.attack[1]") && e.contains("badnetz"), "{e}");
    }

    #[test]
    fn bad_value_is_rejected() {
        let bad = GOOD.replace("name: t", "name: t\ndefaults: { poison_rate: 1.5 }");
        let e = LoadedSpec::from_str(&bad, "t.yaml", ".".into())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("defaults.poison_rate") && e.contains("1.5"),
            "{e}"
        );
    }

    #[test]
    fn only_filters_and_rejects_unknown_values() {
        let mut s = LoadedSpec::from_str(GOOD, "t.yaml", ".".into()).unwrap();
        s.apply_only(&["defence=ieu".into()]).unwrap();
        assert_eq!(s.spec.grid.defence, vec!["ieu"]);
        let e = s
            .apply_only(&["attack=blended".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("'blended' is not in grid.attack"), "{e}");
        let e = s
            .apply_only(&["colour=red".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown axis 'colour'"), "{e}");
    }

    #[test]
    fn variants_override_ieu_settings_and_are_checked() {
        let spec = GOOD.replace(
            "name: t",
            "name: t\ndefaults: { ieu: { unlearn_rate: { constant: 2.0 } } }\nvariants:\n  ieu-nm: { base: ieu, ieu: { logit_masking: false, c_thresh: 0.9 } }",
        );
        let spec = spec.replace("defence: [none, ieu]", "defence: [none, ieu, ieu-nm]");
        let s = LoadedSpec::from_str(&spec, "t.yaml", ".".into()).unwrap();
        let v = s.spec.ieu_settings("ieu-nm").unwrap();
        assert!(!v.logit_masking && v.c_thresh == 0.9);
        assert_eq!(
            v.unlearn_rate,
            crate::defences::ieu::UnlearnRate::Constant(2.0),
            "inherits defaults"
        );
        assert_eq!(s.spec.defence_base("ieu-nm"), "ieu");
        let bad = spec.replace("c_thresh: 0.9", "c_tresh: 0.9");
        let e = LoadedSpec::from_str(&bad, "t.yaml", ".".into())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("variants.ieu-nm") && e.contains("c_tresh"),
            "{e}"
        );
        let bad = spec.replace("c_thresh: 0.9", "c_thresh: 1.5");
        let e = LoadedSpec::from_str(&bad, "t.yaml", ".".into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("variants.ieu-nm.ieu.c_thresh"), "{e}");
    }

    #[test]
    fn dataset_entries_are_grid_datasets_and_are_checked() {
        let spec = GOOD.replace(
            "name: t",
            "name: t\ndatasets:\n  signs: { format: imagefolder, path: data/signs }",
        );
        let spec = spec.replace("dataset: [synthetic]", "dataset: [synthetic, signs]");
        let s = LoadedSpec::from_str(&spec, "t.yaml", ".".into()).unwrap();
        assert_eq!(s.spec.datasets["signs"].path, "data/signs");
        let e = LoadedSpec::from_str(&spec.replace("imagefolder", "lmdb"), "t.yaml", ".".into())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.yaml") && e.contains("datasets.signs.format"),
            "{e}"
        );
        let e = LoadedSpec::from_str(&spec.replace("path:", "root:"), "t.yaml", ".".into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("datasets.signs") && e.contains("root"), "{e}");
        let e = LoadedSpec::from_str(
            &spec
                .replace("  signs:", "  cifar10:")
                .replace("signs]", "cifar10]"),
            "t.yaml",
            ".".into(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("datasets.cifar10") && e.contains("built-in"),
            "{e}"
        );
        let e = LoadedSpec::from_str(
            &spec.replace("[synthetic, signs]", "[synthetic, sings]"),
            "t.yaml",
            ".".into(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("grid.dataset[1]") && e.contains("sings"), "{e}");
    }

    #[test]
    fn pretrained_is_a_path_or_a_mapping() {
        let with = |v: &str| {
            GOOD.replace(
                "name: t",
                &format!("name: t\ndefaults: {{ pretrained: {v} }}"),
            )
        };
        let s = LoadedSpec::from_str(&with("vit.safetensors"), "t.yaml", ".".into()).unwrap();
        let p = s.spec.defaults.pretrained.unwrap();
        assert_eq!((p.path.as_str(), p.heads), ("vit.safetensors", None));
        let s = LoadedSpec::from_str(
            &with("{ path: sit.pth, heads: 6, checkpoint_key: teacher }"),
            "t.yaml",
            ".".into(),
        )
        .unwrap();
        let p = s.spec.defaults.pretrained.unwrap();
        assert_eq!(
            (p.heads, p.checkpoint_key.as_deref()),
            (Some(6), Some("teacher"))
        );
        let e = LoadedSpec::from_str(&with("{ path: a.pth, head: 6 }"), "t.yaml", ".".into())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.yaml") && e.contains("defaults.pretrained") && e.contains("head"),
            "{e}"
        );
        let e = LoadedSpec::from_str(&with("{ path: a.pth, heads: 0 }"), "t.yaml", ".".into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("defaults.pretrained.heads"), "{e}");
    }

    #[test]
    fn every_shipped_spec_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if !name.ends_with(".yaml") || name == "scales.yaml" {
                continue;
            }
            let spec = LoadedSpec::load(Some(&path)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            for scale in ["smoke", "cpu", "paper"] {
                spec.scale(scale).unwrap();
            }
            n += 1;
        }
        assert!(n >= 15, "only {n} specs found");
    }

    #[test]
    fn embedded_scales_parse() {
        for name in ["smoke", "cpu", "paper"] {
            load_scale(DEFAULT_SCALES, "scales.yaml", name).unwrap();
        }
        let e = load_scale(DEFAULT_SCALES, "scales.yaml", "huge")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown scale 'huge'"), "{e}");
    }
}
