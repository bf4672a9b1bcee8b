//! Defences, their registry, and the `finetune` step.
//!
//! Every defence finetunes the robust model f_r, initialised from the pretrained checkpoint
//! with a fresh head, on the attacker-supplied (poisoned) finetuning set, with the paper's
//! finetuning recipe (Appendix A.2): AdamW, a one-epoch linear warm-up then cosine decay of
//! the learning rate, weight decay following a cosine from `wd_start` to `wd_end`, and the
//! SiT training views.
//!
//! **Adding a defence** is one file and one line: a module here that implements
//! [`Defence`] (its settings with their defaults and checks, the steps it plans for a grid
//! cell, and the `run` of its `finetune` step), and its entry in [`REGISTRY`]. The spec
//! parser (`defaults.<name>`, variants based on it), the planner, the executor and the
//! code identity of its steps (`build.rs` reads this registry) all go through it.

pub mod abl;
pub mod attnblock;
pub mod fine_pruning;
pub mod ibau;
pub mod ieu;
pub mod none;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use burn::prelude::*;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::spec::plan::CellPlan;
use crate::spec::{FinetuneSchedule, Scale, Views};
use crate::train::View;

/// Every defence a spec can name, in the order `--help` and errors list them. A module's
/// defence is named after its file (`fine_pruning.rs` → `fine-pruning`).
pub static REGISTRY: &[&dyn Defence] = &[
    &none::NoDefence,
    &ieu::Ieu,
    &abl::Abl,
    &ibau::Ibau,
    &attnblock::AttnBlock,
    &fine_pruning::FinePruning,
];

/// The registered defence of a name.
pub fn registered(name: &str) -> Option<&'static dyn Defence> {
    REGISTRY.iter().copied().find(|d| d.name() == name)
}

/// The names of every registered defence.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|d| d.name()).collect()
}

/// A defence: what the spec may set, what it plans, and how its `finetune` step runs.
pub trait Defence: Sync {
    /// Its name in specs (`grid.defence`, `defaults.<name>`, a variant's `base`) and in the
    /// `finetune` step's parameters.
    fn name(&self) -> &'static str;

    /// Its settings with every default (`defaults.<name>` and a variant's `<name>:` are
    /// merged over them), or `None` for a defence without settings.
    fn default_settings(&self) -> Option<Value> {
        None
    }

    /// Checks the settings of one grid entry; the message names the field.
    fn check(&self, _settings: &Value) -> Result<(), String> {
        Ok(())
    }

    /// Whether f_r may be another architecture than the ViT (Table 8).
    fn any_architecture(&self) -> bool {
        false
    }

    /// Adds the steps of one grid cell to the plan; returns the key of the model the cell
    /// evaluates (and may set the cell's evaluation parameters).
    fn plan(&self, cell: &mut CellPlan, settings: &Value) -> Result<String>;

    /// Computes this defence's `finetune` step (defences that plan no finetune step of
    /// their own keep the default).
    fn run(
        &self,
        _p: &FinetuneParams,
        _inputs: &FinetuneInputs,
        _out: &Path,
        _device: &Device,
    ) -> Result<()> {
        bail!("defence {} has no finetune step of its own", self.name())
    }
}

/// Settings of a defence (or of an attack, `crate::attacks`), typed in its file.
pub trait Settings: Serialize + DeserializeOwned + Default {
    /// Checks ranges; the message names the field.
    fn validate(&self) -> Result<(), String>;

    /// The default settings, as [`Defence::default_settings`] returns them.
    fn defaults() -> Option<Value> {
        Some(serde_json::to_value(Self::default()).expect("settings serialise"))
    }

    /// Parses and checks merged settings, as [`Defence::check`] does.
    fn checked(v: &Value) -> Result<Self, String> {
        let s: Self = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        s.validate()?;
        Ok(s)
    }

    /// Parses merged settings that were checked when the spec was loaded.
    fn of(v: &Value) -> Result<Self> {
        Self::checked(v).map_err(|e| anyhow!(e))
    }
}

/// A defence's parameters in a `finetune` step: its name and its own fields in one JSON
/// object (`{"name": "ieu", "c_thresh": 0.95, ...}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DefenceParams(serde_json::Map<String, Value>);

impl DefenceParams {
    /// Vanilla finetuning's parameters (none).
    pub fn none() -> Self {
        Self::named("none", serde_json::Map::new())
    }

    /// A defence's parameters: its name and the fields of `params`.
    pub fn new<P: Serialize>(name: &str, params: &P) -> Result<Self> {
        match serde_json::to_value(params)? {
            Value::Object(m) => Ok(Self::named(name, m)),
            other => bail!("parameters of defence {name} are not a mapping: {other}"),
        }
    }

    fn named(name: &str, mut fields: serde_json::Map<String, Value>) -> Self {
        fields.insert("name".into(), Value::String(name.to_string()));
        Self(fields)
    }

    pub fn name(&self) -> &str {
        self.0.get("name").and_then(Value::as_str).unwrap_or("?")
    }

    /// The defence's own fields, typed.
    pub fn fields<P: DeserializeOwned>(&self) -> Result<P> {
        let mut fields = self.0.clone();
        fields.remove("name");
        serde_json::from_value(Value::Object(fields))
            .map_err(|e| anyhow!("parameters of defence {}: {e}", self.name()))
    }
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

    /// The finetuning run on a set of `n` images: schedules and views.
    pub fn supervised<'a>(&self, label: &'a str, n: usize) -> crate::train::Supervised<'a> {
        let (lr, wd) = self.schedules(crate::train::iters_per_epoch(n, self.batch_size));
        crate::train::Supervised {
            label,
            epochs: self.schedule.epochs,
            batch_size: self.batch_size,
            views: self.learn_views(),
            lr,
            wd,
            seed: self.seed,
            keep_last: false,
        }
    }
}

/// Inputs of a finetune step, as directories of published steps: the dataset, the poisoned
/// finetuning set, f_r's starting checkpoint, and the defence's own inputs by role.
pub struct FinetuneInputs {
    pub dataset: PathBuf,
    pub poison: PathBuf,
    pub pretrain: PathBuf,
    pub others: BTreeMap<String, PathBuf>,
}

impl FinetuneInputs {
    /// An input the defence planned (`stage1`, `isolate`, `backdoored`, …).
    pub fn input(&self, role: &str) -> Result<&Path> {
        self.others.get(role).map(PathBuf::as_path).ok_or_else(|| {
            anyhow!(
                "this finetune step has no `{role}` input (it has: {})",
                self.others.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }
}

/// Loads the pretrained checkpoint on the autodiff device with a fresh head: the starting
/// point of f_r for every defence (any architecture; the checkpoint's `config.json` says
/// which).
pub fn initial_robust_net(
    pretrain: &Path,
    num_classes: usize,
    seed: u64,
    device: &Device,
) -> Result<(crate::models::Net, crate::models::NetConfig)> {
    let ad = device.clone().autodiff();
    let (net, mut cfg) = crate::models::load_net(pretrain, &ad)?;
    cfg.vit.num_classes = num_classes;
    Ok((net.with_new_head(num_classes, seed ^ 0x4EAD, &ad), cfg))
}

/// [`initial_robust_net`] for the defences that run on the ViT only.
pub fn initial_robust_vit(
    pretrain: &Path,
    num_classes: usize,
    seed: u64,
    device: &Device,
    what: &str,
) -> Result<(crate::models::Vit, crate::models::VitConfig)> {
    let (net, cfg) = initial_robust_net(pretrain, num_classes, seed, device)?;
    Ok((net.into_vit(what)?, cfg.vit))
}

/// Runs the `finetune` step: writes the defended f_r (`model.safetensors`, `config.json`)
/// and `train_stats.json` (losses, and for IEU the gate and unlearning statistics).
///
/// Pure dispatch through the registry: the defence's `run` (and nothing of the other
/// defences) is the step's code identity (build.rs). Keep arithmetic out.
pub fn run_finetune_step(
    p: &FinetuneParams,
    inputs: &FinetuneInputs,
    out: &Path,
    device: &Device,
) -> Result<()> {
    let name = p.defence.name();
    let d = registered(name).ok_or_else(|| {
        anyhow!(
            "unknown defence '{name}' in a finetune step (known: {})",
            names().join(", ")
        )
    })?;
    d.run(p, inputs, out, device)
}
