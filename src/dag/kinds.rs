//! The step kinds: for each, the functions whose code is its identity (the key's code
//! digest; `build.rs` reads the `roots` of this table) and how the executor runs it.
//!
//! A kind's `run` only routes: it reads the step's parameters, resolves its inputs in the
//! store and calls the kind's entry function, which does the computing. `run` is in no
//! identity (nothing reaches it from a root), so keep arithmetic out of it. The `finetune`
//! kind has one identity per registered defence (`finetune/<name>`, rooted at the
//! defence's `run`; see `crate::defences`); the `poison` kind's identity is rooted at the
//! `run` of every module in `crate::attacks::REGISTRY`, and the `dataset` kind's at the
//! `source` of each format module of `crate::data` (`dataset/<module>`).

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use burn::prelude::Device;
use serde::Deserialize;

use super::{Kind, Step};
use crate::store::Store;

/// One step kind.
pub struct KindDef {
    pub kind: Kind,
    /// The entry functions (paths from the crate root) whose code is this kind's
    /// identity; empty for `finetune` and `poison`, whose identities come from the defence
    /// and attack registries.
    pub roots: &'static [&'static str],
    /// Runs a step of this kind.
    pub run: fn(&StepRun) -> Result<()>,
}

/// Every kind, in DAG order.
pub static KINDS: &[KindDef] = &[
    KindDef {
        kind: Kind::Dataset,
        roots: &["data::split_and_save"],
        run: dataset,
    },
    KindDef {
        kind: Kind::Poison,
        roots: &[],
        run: poison,
    },
    KindDef {
        kind: Kind::Stegastamp,
        roots: &["attacks::issba::stegastamp::run_stegastamp_step"],
        run: stegastamp,
    },
    KindDef {
        kind: Kind::Pretrain,
        roots: &["train::pretrain::run_pretrain_step"],
        run: pretrain,
    },
    KindDef {
        kind: Kind::Import,
        roots: &["models::import::run_import_step"],
        run: import,
    },
    KindDef {
        kind: Kind::Stage1,
        roots: &["defences::ieu::stage1::run_stage1_step"],
        run: stage1,
    },
    KindDef {
        kind: Kind::Isolate,
        roots: &["defences::abl::run_isolate_step"],
        run: isolate,
    },
    KindDef {
        kind: Kind::Finetune,
        roots: &[],
        run: finetune,
    },
    KindDef {
        kind: Kind::Evaluate,
        roots: &["metrics::run_evaluate_step"],
        run: evaluate,
    },
];

/// The table row of a kind.
pub fn of(kind: Kind) -> &'static KindDef {
    KINDS
        .iter()
        .find(|k| k.kind == kind)
        .expect("every kind has a row in KINDS")
}

/// What a kind's `run` gets: the step, the store its inputs are in, where to write.
pub struct StepRun<'a> {
    pub step: &'a Step,
    pub store: &'a Store,
    /// `--data-dir` of this run (a step's own `data_dir` locator comes first).
    pub data_dir: Option<&'a Path>,
    pub out: &'a Path,
    pub device: &'a Device,
}

impl StepRun<'_> {
    pub fn params<T: for<'de> Deserialize<'de>>(&self) -> Result<T> {
        self.step.params()
    }

    /// The verified directory of the input step in `role`.
    pub fn input(&self, role: &str) -> Result<PathBuf> {
        let key = self
            .step
            .inputs
            .get(role)
            .ok_or_else(|| anyhow!("step {} has no input '{role}'", self.step.label))?;
        self.store.verified(key)
    }

    /// The dataset step a poison step was made from (its recorded input).
    pub fn dataset_of(&self, poison_dir: &Path) -> Result<PathBuf> {
        let key = poison_dir
            .file_name()
            .and_then(|s| s.to_str())
            .ok_or_else(|| anyhow!("bad store path"))?;
        let m = self.store.manifest(key)?;
        let d = m
            .inputs
            .get("dataset")
            .ok_or_else(|| anyhow!("poison step {key} has no dataset input"))?;
        self.store.verified(d)
    }
}

fn dataset(run: &StepRun) -> Result<()> {
    let p: crate::data::DatasetParams = run.params()?;
    let locators = &run.step.locators;
    let data_dir = locators
        .get("data_dir")
        .map(PathBuf::as_path)
        .or(run.data_dir);
    let root = locators.get("dataset_root").map(PathBuf::as_path);
    let meta = crate::data::run_dataset_step(&p, data_dir, root, run.out)?;
    tracing::info!(
        "    {}: {} pretrain, {} tune, {} test images",
        meta.name,
        meta.pretrain,
        meta.tune,
        meta.test
    );
    Ok(())
}

fn poison(run: &StepRun) -> Result<()> {
    let p: crate::attacks::PoisonParams = run.params()?;
    let name = p.attack.name();
    let attack = crate::attacks::registered(name).ok_or_else(|| {
        anyhow!(
            "unknown attack '{name}' in a poison step (known: {})",
            crate::attacks::names().join(", ")
        )
    })?;
    let mut others = std::collections::BTreeMap::new();
    for role in run.step.inputs.keys() {
        if role != "dataset" {
            others.insert(role.clone(), run.input(role)?);
        }
    }
    let locators = &run.step.locators;
    let inputs = crate::attacks::PoisonInputs {
        dataset: run.input("dataset")?,
        others,
        files: crate::attacks::TriggerFiles {
            trigger: locators.get("trigger_file").cloned(),
            mask: locators.get("mask_file").cloned(),
        },
    };
    let n = attack.run(&p, &inputs, run.out, run.device)?;
    tracing::info!("    {} poisoned training images", n);
    Ok(())
}

fn stegastamp(run: &StepRun) -> Result<()> {
    let p: crate::attacks::issba::StegaParams = run.params()?;
    let st = crate::attacks::issba::run_stegastamp_step(
        &p,
        &run.input("dataset")?,
        run.out,
        run.device,
    )?;
    tracing::info!(
        "    secret bit accuracy {:.3} (held-out {:.3}, clean {:.3}); PSNR {:.1} dB, max l_inf {:.4}",
        st.bit_acc_train,
        st.bit_acc_heldout,
        st.bit_acc_clean,
        st.psnr_mean,
        st.linf_max
    );
    Ok(())
}

fn pretrain(run: &StepRun) -> Result<()> {
    let p: crate::train::PretrainParams = run.params()?;
    let acc = crate::train::run_pretrain_step(&p, &run.input("dataset")?, run.out, run.device)?;
    tracing::info!("    pretrained checkpoint: {acc:.2}% clean test accuracy");
    Ok(())
}

fn import(run: &StepRun) -> Result<()> {
    let p: crate::models::import::ImportParams = run.params()?;
    let path = run
        .step
        .locators
        .get("checkpoint")
        .ok_or_else(|| anyhow!("import step {} has no checkpoint file", run.step.label))?;
    let note = crate::models::import::run_import_step(&p, path, run.out, run.device)?;
    tracing::info!("    {note}");
    Ok(())
}

fn stage1(run: &StepRun) -> Result<()> {
    let p: crate::defences::ieu::Stage1Params = run.params()?;
    let poison = run.input("poison")?;
    let dataset = run.dataset_of(&poison)?;
    let pretrain = run.input("pretrain")?;
    crate::defences::ieu::run_stage1_step(&p, &dataset, &poison, &pretrain, run.out, run.device)
}

fn isolate(run: &StepRun) -> Result<()> {
    let p: crate::defences::abl::IsolateParams = run.params()?;
    let poison = run.input("poison")?;
    let dataset = run.dataset_of(&poison)?;
    let pretrain = run.input("pretrain")?;
    let g = crate::defences::abl::run_isolate_step(
        &p, &dataset, &poison, &pretrain, run.out, run.device,
    )?;
    tracing::info!(
        "    isolated {} images, {} of them poisoned",
        g.poisoned_flagged + g.clean_flagged,
        g.poisoned_flagged
    );
    Ok(())
}

fn finetune(run: &StepRun) -> Result<()> {
    let p: crate::defences::FinetuneParams = run.params()?;
    let poison = run.input("poison")?;
    let mut others = std::collections::BTreeMap::new();
    for role in run.step.inputs.keys() {
        if role != "poison" && role != "pretrain" {
            others.insert(role.clone(), run.input(role)?);
        }
    }
    let inputs = crate::defences::FinetuneInputs {
        dataset: run.dataset_of(&poison)?,
        pretrain: run.input("pretrain")?,
        poison,
        others,
    };
    crate::defences::run_finetune_step(&p, &inputs, run.out, run.device)
}

fn evaluate(run: &StepRun) -> Result<()> {
    let p: crate::metrics::EvalParams = run.params()?;
    let m = crate::metrics::run_evaluate_step(
        &p,
        &run.input("finetune")?,
        &run.input("poison")?,
        &run.input("dataset")?,
        run.out,
        run.device,
    )?;
    tracing::info!("    CA {:.2}%  ASR {:.2}%", m.ca, m.asr);
    Ok(())
}
