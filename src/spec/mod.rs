//! Experiment specs: YAML → typed spec (here), scales (`scale.rs`), loading and `--only`
//! (`load.rs`), validation (`validate.rs`).
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
//!
//! Defence and attack settings are not typed here: `defaults.<defence>` and a variant's
//! `<defence>:`, `defaults.attacks.<attack>` and an attack variant's `attacks.<attack>:` are
//! kept as YAML and checked by the defence or attack itself (`src/defences`,
//! `src/attacks`, their `Settings`).

pub mod load;
pub mod names;
pub mod plan;
pub mod scale;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};

pub use load::{LoadedSpec, parse_yaml};
pub use names::{Availability, DATASETS};
pub use scale::*;

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
    /// Defence settings for one dataset, over `defaults.<defence>` (a variant's own
    /// settings still come last): `per_dataset: { gtsrb: { ieu: { c_thresh: 0.9 } } }`,
    /// the paper's per-dataset choices (Table 11).
    #[serde(default)]
    pub per_dataset: BTreeMap<String, BTreeMap<String, serde_yaml_ng::Value>>,
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
    /// `confidence` (default): the CDFs of f_p's confidence from the stage-1 step;
    /// `unlearn_rate`: Eq. 3 over stage 2 from the IEU finetune step's `unlearn_trace`
    /// (the factor, the unlearning loss ℓ_k and the poisoned share of each unlearned
    /// batch; also written as `<name>.csv`).
    #[serde(default)]
    pub kind: FigureKind,
    /// Where the dotted line is drawn (the gate's threshold).
    #[serde(default = "default_c_thresh")]
    pub c_thresh: f64,
    pub panels: Vec<PanelSpec>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FigureKind {
    #[default]
    Confidence,
    UnlearnRate,
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

/// The fields of `defaults:` other than the defences' sections.
pub const DEFAULT_FIELDS: &[&str] = &[
    "seed",
    "poison_rate",
    "target",
    "model",
    "pretrained",
    "attacks",
];

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
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
    /// Each attack's settings by its name (`blended: { alpha: 0.3 }`), merged over the
    /// attack's defaults and checked by the attack.
    pub attacks: BTreeMap<String, serde_yaml_ng::Value>,
    /// Each defence's settings by its name (`ieu:`, `abl:`, …), checked by the defence;
    /// any other key is an error ([`DEFAULT_FIELDS`] lists the rest).
    #[serde(flatten)]
    pub defences: BTreeMap<String, serde_yaml_ng::Value>,
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
            attacks: BTreeMap::new(),
            defences: BTreeMap::new(),
        }
    }
}

/// A named defence variant: a registered defence with some settings changed, usable as a
/// grid `defence` entry (e.g. Table 4's IEU without logit masking).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Variant {
    /// The defence it is based on (`ieu`, `abl`, `ibau`, …).
    pub base: String,
    /// f_r's architecture for this entry (`defaults.model` otherwise); for defences that
    /// can train other architectures (none, ieu; Table 8). f_p stays the first block(s) of
    /// the ViT checkpoint.
    #[serde(default)]
    pub model: Option<String>,
    /// The base defence's settings that differ from `defaults.<base>`, under its name
    /// (`ieu: { logit_masking: false }`).
    #[serde(flatten)]
    pub settings: BTreeMap<String, serde_yaml_ng::Value>,
}

/// `base` with the keys of `overrides` replaced (merged in JSON form, where externally
/// tagged enums are plain maps).
pub(crate) fn merge(base: &mut serde_json::Value, overrides: &serde_yaml_ng::Value) -> Result<()> {
    match (base, serde_json::to_value(overrides)?) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => b.extend(o),
        (_, serde_json::Value::Null) => {}
        _ => bail!("expected a mapping of settings"),
    }
    Ok(())
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
    pub attacks: BTreeMap<String, serde_yaml_ng::Value>,
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
    /// The settings of a grid defence entry, as JSON: the defence's defaults, with
    /// `defaults.<defence>` and then the variant's overrides merged in (`Null` for a
    /// defence without settings). Checked by the defence when the spec is loaded.
    pub fn defence_settings(&self, entry: &str) -> Result<serde_json::Value> {
        self.defence_settings_for(entry, None)
    }

    /// [`Spec::defence_settings`] on one dataset: `per_dataset.<dataset>.<defence>` is
    /// merged after `defaults.<defence>` and before the variant's overrides.
    pub fn defence_settings_for(
        &self,
        entry: &str,
        dataset: Option<&str>,
    ) -> Result<serde_json::Value> {
        self.defence_settings_at(entry, dataset, None)
    }

    /// [`Spec::defence_settings_for`] at a scale: the scale's `defences.<defence>` replace
    /// the defence's built-in defaults first, so everything the spec states comes after.
    pub fn defence_settings_at(
        &self,
        entry: &str,
        dataset: Option<&str>,
        scale: Option<&Scale>,
    ) -> Result<serde_json::Value> {
        let base = self.defence_base(entry);
        let d =
            crate::defences::registered(base).ok_or_else(|| anyhow!("unknown defence '{base}'"))?;
        let Some(mut v) = d.default_settings() else {
            return Ok(serde_json::Value::Null);
        };
        if let Some((scale, o)) = scale.and_then(|s| Some((s, s.defences.get(base)?))) {
            merge(&mut v, o).map_err(|e| {
                anyhow!(
                    "{}: field `{}.defences.{base}`: {e}",
                    scale.origin,
                    scale.name
                )
            })?;
        }
        if let Some(o) = self.defaults.defences.get(base) {
            merge(&mut v, o).map_err(|e| anyhow!("field `defaults.{base}`: {e}"))?;
        }
        if let Some((ds, o)) = dataset.and_then(|ds| {
            self.per_dataset
                .get(ds)
                .and_then(|m| m.get(base))
                .map(|o| (ds, o))
        }) {
            merge(&mut v, o).map_err(|e| anyhow!("field `per_dataset.{ds}.{base}`: {e}"))?;
        }
        if let Some(o) = self
            .variants
            .get(entry)
            .and_then(|var| var.settings.get(base))
        {
            merge(&mut v, o).map_err(|e| anyhow!("field `variants.{entry}.{base}`: {e}"))?;
        }
        Ok(v)
    }

    /// The spec's IEU settings (`defaults.ieu`): what CAT's f_p is tuned with.
    pub fn ieu_defaults(&self) -> Result<crate::defences::ieu::IeuSettings> {
        self.ieu_defaults_at(None, None)
    }

    /// The spec's IEU settings on a dataset (with `per_dataset.<dataset>.ieu`) at a scale
    /// (with the scale's `defences.ieu` first).
    pub fn ieu_defaults_at(
        &self,
        dataset: Option<&str>,
        scale: Option<&Scale>,
    ) -> Result<crate::defences::ieu::IeuSettings> {
        use crate::defences::Settings;
        crate::defences::ieu::IeuSettings::of(&self.defence_settings_at("ieu", dataset, scale)?)
    }

    /// The settings of attack `name` for a grid attack entry, as JSON: the attack's
    /// defaults, with `defaults.attacks.<name>` and then the entry's variant's
    /// `attacks.<name>` merged in. Checked by the attack when the spec is loaded.
    pub fn attack_settings(&self, entry: &str, name: &str) -> Result<serde_json::Value> {
        self.merged_attack_settings(name, self.attack_variants.get(entry).map(|v| (entry, v)))
    }

    /// [`Spec::attack_settings`] of `defaults.attacks` alone, or with a variant's.
    pub(crate) fn merged_attack_settings(
        &self,
        name: &str,
        variant: Option<(&str, &AttackVariant)>,
    ) -> Result<serde_json::Value> {
        let a =
            crate::attacks::registered(name).ok_or_else(|| anyhow!("unknown attack '{name}'"))?;
        let mut v = a.default_settings();
        if let Some(o) = self.defaults.attacks.get(name) {
            merge(&mut v, o).map_err(|e| anyhow!("field `defaults.attacks.{name}`: {e}"))?;
        }
        if let Some((entry, o)) = variant.and_then(|(e, var)| Some((e, var.attacks.get(name)?))) {
            merge(&mut v, o)
                .map_err(|e| anyhow!("field `attack_variants.{entry}.attacks.{name}`: {e}"))?;
        }
        Ok(v)
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
    "unlearn_factor",
    "unlearn_loss",
    "ca_unseen",
    "pretrain_accuracy",
    "pretrain_confidence",
];
