//! Resolving a spec at a scale into a DAG of steps.
//!
//! dataset ─┬─ poison ─┬──────────────── finetune(none) ─┬─ evaluate
//!          │          │                                 ├─ evaluate(attnblock)
//!          │          │                                 └─ finetune(ibau) ── evaluate
//!          │          ├─ stage1 (f_p) ─ finetune(ieu)  ── evaluate
//!          │          └─ isolate (ABL) ─ finetune(abl) ── evaluate
//!          └─ pretrain ──────────────────┘ (f_r, f_p and ABL's model start from it)
//!
//! With `defaults.pretrained: FILE` an `import` step (no inputs, shared by every dataset)
//! takes the place of `pretrain`.
//!
//! Each attack plans its poison step (`plan/poison.rs`, through `crate::attacks::REGISTRY`),
//! and two read other steps. ISSBA: dataset → stegastamp (its trained encoder) →
//! poison(issba). CAT on a base attack: dataset → poison(base) → stage1 f_p (tuned on the
//! base attack's data with the spec's IEU settings, as the defender would) → poison(cat);
//! the poison(cat) step then feeds the defences like any other.

pub mod poison;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Result, anyhow, bail};

use super::names::{Availability, axis_availability};
use super::{LoadedSpec, Scale};
use crate::dag::{Cell, Kind, Plan, Step};
use crate::data::DatasetParams;
use crate::defences::{DefenceParams, FinetuneParams};
use crate::metrics::EvalParams;
use crate::models::Arch;
use crate::models::import::ImportParams;
use crate::spec::BaselineRates;
use crate::train::PretrainParams;
pub use poison::{PoisonPlan, SpecFiles};

/// Input roles and keys of a step.
pub fn inputs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn check_available(axis: &str, name: &str) -> Result<()> {
    if axis_availability(axis, name) != Some(Availability::Implemented) {
        bail!("not implemented yet: {axis} {name} (leave it out with --only {axis}=...)");
    }
    Ok(())
}

/// Builds the plan for every cell of the (possibly filtered) grid. Grid entries this version
/// cannot run yet are an error.
pub fn plan(spec: &LoadedSpec, scale: &Scale, data_dir: Option<&Path>) -> Result<Plan> {
    let g = &spec.spec.grid;
    for v in g
        .dataset
        .iter()
        .filter(|v| !spec.spec.datasets.contains_key(*v))
    {
        check_available("dataset", v)?;
    }
    for v in &g.attack {
        check_available("attack", spec.spec.attack_base(v))?;
    }
    for v in &g.defence {
        check_available("defence", spec.spec.defence_base(v))?;
    }
    build(spec, scale, data_dir)
}

/// The spec planned once per seed, `defaults.seed` replaced by each (`--seed 0,1,2`), the
/// plans merged: steps shared by the seeds (none, in practice: every step descends from the
/// seeded dataset) are planned once, and each cell carries its seed. No seeds: the spec's
/// own. `available`: plan as [`plan_available`] does (reports), else as [`plan`].
pub fn plan_seeds(
    spec: &LoadedSpec,
    scale: &Scale,
    data_dir: Option<&Path>,
    seeds: &[u64],
    available: bool,
) -> Result<Plan> {
    let one = |spec: &LoadedSpec| {
        if available {
            plan_available(spec, scale, data_dir)
        } else {
            plan(spec, scale, data_dir)
        }
    };
    let Some((first, rest)) = seeds.split_first() else {
        return one(spec);
    };
    let seeded = |seed: u64| {
        let mut s = spec.clone();
        s.spec.defaults.seed = seed;
        s
    };
    let mut merged = one(&seeded(*first))?;
    for &seed in rest {
        if merged.seeds().contains(&seed) {
            bail!("--seed: seed {seed} is given twice");
        }
        merged.merge(one(&seeded(seed))?);
    }
    Ok(merged)
}

/// Like [`plan`], but grid entries that are not implemented yet are left out and listed in
/// `Plan::skipped` (for reports of specs that name them).
pub fn plan_available(spec: &LoadedSpec, scale: &Scale, data_dir: Option<&Path>) -> Result<Plan> {
    let mut spec = spec.clone();
    let mut skipped = Vec::new();
    let own: Vec<String> = spec.spec.datasets.keys().cloned().collect();
    for axis in ["dataset", "attack", "defence"] {
        let list = spec.spec.grid.axis_mut(axis).unwrap();
        // Variants are available when the built-in entry they are based on is.
        let (attacks, defences) = (&spec.spec.attack_variants, &spec.spec.variants);
        let ok = |v: &String| {
            let base = match axis {
                "attack" => attacks.get(v).map(|a| a.base.as_str()),
                "defence" => defences.get(v).map(|d| d.base.as_str()),
                _ => None,
            };
            axis_availability(axis, base.unwrap_or(v)) == Some(Availability::Implemented)
                || axis == "dataset" && own.contains(v)
        };
        for v in list.iter().filter(|v| !ok(v)) {
            skipped.push(format!("{axis} {v}"));
        }
        list.retain(ok);
        if list.is_empty() {
            bail!(
                "nothing to report: no {axis} of {} is implemented yet",
                spec.origin
            );
        }
    }
    // Built-in datasets whose files are not there are left out too (with a warning), so a
    // report of a spec naming several datasets works with the data at hand.
    let missing: Vec<String> = spec
        .spec
        .grid
        .dataset
        .iter()
        .filter(|v| !own.contains(v))
        .filter(|v| {
            let found =
                crate::data::Format::of(v, None).and_then(|f| crate::data::find(f, data_dir, None));
            if let Err(e) = &found {
                tracing::warn!("dataset {v} left out of the report: {e:#}");
            }
            found.is_err()
        })
        .cloned()
        .collect();
    if !missing.is_empty() {
        spec.spec.grid.dataset.retain(|v| !missing.contains(v));
        if spec.spec.grid.dataset.is_empty() {
            bail!(
                "nothing to report: no dataset of {} was found (pass --data-dir)",
                spec.origin
            );
        }
        skipped.extend(missing.iter().map(|v| format!("dataset {v}")));
    }
    let mut plan = build(&spec, scale, data_dir)?;
    plan.skipped = skipped;
    Ok(plan)
}

fn build(spec: &LoadedSpec, scale: &Scale, data_dir: Option<&Path>) -> Result<Plan> {
    let s = &spec.spec;
    let d = &s.defaults;
    let g = &s.grid;
    let mut plan = Plan::default();
    let imported = import_step(spec, scale)?;
    for dataset in &g.dataset {
        let entry = s.datasets.get(dataset);
        let root = entry.map(|e| spec.dir.join(&e.path));
        let format = entry.map(|e| e.format.name().to_string());
        let located_all =
            crate::data::locate_with_classes(dataset, format.as_deref(), data_dir, root.as_deref())
                .map_err(|e| match entry {
                    Some(_) => anyhow!("{}: field `datasets.{dataset}.path`: {e}", spec.origin),
                    None => e,
                })?;
        let classes = located_all.classes;
        let located = located_all.found;
        if located.is_none() {
            // Generated data has exactly the sizes asked for: none may be empty.
            for (field, n) in [
                ("data.pretrain", scale.data.pretrain),
                ("data.tune", scale.data.tune),
                ("data.test", scale.data.test),
            ] {
                if n == 0 && !(field == "data.pretrain" && imported.is_some()) {
                    bail!(
                        "{}: field `{}.{field}`: 0 images of generated dataset {dataset} \
                         (0 means \"all\" only for datasets read from files)",
                        scale.origin,
                        scale.name
                    );
                }
            }
        }
        // With an imported checkpoint nothing is pretrained here, so every training image
        // goes to D_tune (the paper's setting) — unless another architecture of the spec
        // still pretrains from scratch on the pretrain split (Table 8).
        let whole = imported.is_some() && g.defence.iter().all(|def| s.model_of(def).is_vit());
        let dp = DatasetParams {
            name: dataset.clone(),
            format,
            image_size: scale.image_size,
            pretrain: if whole { 0 } else { scale.data.pretrain },
            // Generated data: the scale's pretrain + tune images, all of them D_tune.
            tune: if whole {
                scale.data.pretrain + scale.data.tune
            } else {
                scale.data.tune
            },
            test: scale.data.test,
            seed: d.seed,
            source_digest: located.as_ref().map(|(_, digest)| digest.clone()),
            whole_train_as_tune: whole,
        };
        let mut step = Step::new(
            Kind::Dataset,
            format!("dataset {dataset}"),
            &dp,
            BTreeMap::new(),
        )?;
        if let Some(root) = data_dir {
            step = step.with_locator("data_dir", root.to_path_buf());
        }
        if let Some(root) = root {
            step = step.with_locator("dataset_root", root);
        }
        let data_key = plan.add(step);

        let (pretrain_key, start_depth) = match &imported {
            Some(step) => (
                plan.add(step.clone()),
                step.params::<ImportParams>()?.model.depth,
            ),
            None => {
                let pp = PretrainParams::from_scale(scale, dataset, d.seed);
                let key = plan.add(Step::new(
                    Kind::Pretrain,
                    format!("pretrain {dataset}"),
                    &pp,
                    inputs(&[("dataset", &data_key)]),
                )?);
                (key, scale.model.depth)
            }
        };

        // f_r's pretrained checkpoint of each other architecture (Table 8), made on first
        // use; the ViT's is `pretrain_key` (and f_p always starts from it).
        let mut arch_pretrain: BTreeMap<Arch, String> = BTreeMap::new();
        let mut pretrain_of = |plan: &mut Plan, arch: Arch| -> Result<String> {
            if arch.is_vit() {
                return Ok(pretrain_key.clone());
            }
            if let Some(k) = arch_pretrain.get(&arch) {
                return Ok(k.clone());
            }
            let pp = PretrainParams {
                arch,
                ..PretrainParams::from_scale(scale, dataset, d.seed)
            };
            let key = plan.add(Step::new(
                Kind::Pretrain,
                format!("pretrain {dataset} {}", arch.name()),
                &pp,
                inputs(&[("dataset", &data_key)]),
            )?);
            arch_pretrain.insert(arch, key.clone());
            Ok(key)
        };
        let ds = DatasetPlan {
            spec,
            scale,
            dataset,
            data_key: &data_key,
            pretrain_key: &pretrain_key,
            start_depth,
            classes,
        };
        for attack in &g.attack {
            let poison_key = poison::poison_step(&mut plan, &ds, attack)?;
            for defence in &g.defence {
                let arch = s.model_of(defence);
                arch.check(scale.image_size, scale.model.patch_size)
                    .map_err(|e| anyhow!("{}: defence {defence}: {e}", spec.origin))?;
                let fr_pretrain_key = pretrain_of(&mut plan, arch)?;
                let base = s.defence_base(defence);
                let method = crate::defences::registered(base)
                    .ok_or_else(|| anyhow!("not implemented yet: defence {base}"))?;
                let settings = s
                    .defence_settings_at(defence, Some(dataset), Some(scale))
                    .map_err(|e| anyhow!("{}: {e}", spec.origin))?;
                let mut cell = CellPlan {
                    plan: &mut plan,
                    ds: &ds,
                    attack,
                    defence,
                    poison_key: &poison_key,
                    fr_pretrain_key: &fr_pretrain_key,
                    eval: EvalParams {
                        batch_size: scale.eval_batch_size,
                        attnblock: None,
                    },
                };
                let ft_key = method.plan(&mut cell, &settings)?;
                let ep = cell.eval;
                let eval_key = plan.add(Step::new(
                    Kind::Evaluate,
                    format!("evaluate {dataset}/{attack}/{defence}"),
                    &ep,
                    inputs(&[
                        ("finetune", &ft_key),
                        ("poison", &poison_key),
                        ("dataset", &data_key),
                    ]),
                )?);
                plan.cells.push(Cell {
                    dataset: dataset.clone(),
                    attack: attack.clone(),
                    defence: defence.clone(),
                    seed: d.seed,
                    evaluate: eval_key,
                });
            }
        }
    }
    Ok(plan)
}

/// What every step of one dataset shares.
pub struct DatasetPlan<'a> {
    pub spec: &'a LoadedSpec,
    pub scale: &'a Scale,
    pub dataset: &'a str,
    pub data_key: &'a str,
    /// The ViT starting checkpoint (pretrained or imported); f_p always starts from it.
    pub pretrain_key: &'a str,
    /// Blocks of the starting checkpoint.
    pub start_depth: usize,
    /// Classes of the dataset (attack targets must be below).
    pub classes: usize,
}

/// One grid cell being planned: what a defence's [`Defence::plan`] builds on.
///
/// [`Defence::plan`]: crate::defences::Defence::plan
pub struct CellPlan<'a> {
    pub plan: &'a mut Plan,
    pub ds: &'a DatasetPlan<'a>,
    pub attack: &'a str,
    /// The grid entry (a defence or a variant of one).
    pub defence: &'a str,
    pub poison_key: &'a str,
    /// f_r's starting checkpoint: the entry's architecture's (the ViT's by default).
    pub fr_pretrain_key: &'a str,
    /// How the cell's model is evaluated (AttnBlock blocks patches at test time).
    pub eval: EvalParams,
}

impl CellPlan<'_> {
    /// Whether f_r is the ViT (its checkpoint is the ViT's).
    pub fn fr_is_vit(&self) -> bool {
        self.fr_pretrain_key == self.ds.pretrain_key
    }

    /// The finetuning recipe of the scale with a defence's parameters.
    pub fn finetune_params(&self, defence: DefenceParams) -> FinetuneParams {
        FinetuneParams::from_scale(self.ds.scale, defence, self.ds.spec.spec.defaults.seed)
    }

    /// The cell's no-defence ViT finetune: the `none` defence's model, and what
    /// post-training and test-time defences start from. Planned once per cell.
    pub fn undefended(&mut self) -> Result<String> {
        let step = Step::new(
            Kind::Finetune,
            format!("finetune {}/{}/none", self.ds.dataset, self.attack),
            &self.finetune_params(DefenceParams::none()),
            inputs(&[
                ("poison", self.poison_key),
                ("pretrain", self.ds.pretrain_key),
            ]),
        )?;
        Ok(self.plan.add(step))
    }

    /// The entry's `finetune` step: f_r from its checkpoint on the poisoned set, with the
    /// defence's parameters and its own inputs (`(role, key)`).
    pub fn finetune(&mut self, defence: DefenceParams, extra: &[(&str, &str)]) -> Result<String> {
        let mut ins = inputs(&[
            ("poison", self.poison_key),
            ("pretrain", self.fr_pretrain_key),
        ]);
        ins.extend(extra.iter().map(|(r, k)| (r.to_string(), k.to_string())));
        let step = Step::new(
            Kind::Finetune,
            format!(
                "finetune {}/{}/{}",
                self.ds.dataset, self.attack, self.defence
            ),
            &self.finetune_params(defence),
            ins,
        )?;
        Ok(self.plan.add(step))
    }

    /// A per-dataset value of the scale (`{ default: …, gtsrb: … }`) for this dataset.
    pub fn per_dataset(&self, map: &crate::spec::PerDataset) -> f64 {
        BaselineRates::for_dataset(map, self.ds.dataset)
    }
}

/// The `import` step of `defaults.pretrained`, if the spec names a checkpoint. It has no
/// inputs, so every dataset shares it; its key hashes the file's content digest.
fn import_step(spec: &LoadedSpec, scale: &Scale) -> Result<Option<Step>> {
    let Some(p) = &spec.spec.defaults.pretrained else {
        return Ok(None);
    };
    let path = spec.dir.join(&p.path);
    if !path.is_file() {
        bail!(
            "{}: field `defaults.pretrained`: {} does not exist",
            spec.origin,
            path.display()
        );
    }
    let field = |e: anyhow::Error| anyhow!("{}: field `defaults.pretrained`: {e:#}", spec.origin);
    let digest = crate::store::stat_cache::digest(&path).map_err(field)?;
    let params = crate::models::import::plan_params(
        &path,
        digest,
        p.checkpoint_key.as_deref(),
        p.heads,
        scale,
        spec.spec.defaults.seed,
    )
    .map_err(field)?;
    let name = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Some(
        Step::new(
            Kind::Import,
            format!("import {name}"),
            &params,
            BTreeMap::new(),
        )?
        .with_locator("checkpoint", path),
    ))
}

#[cfg(test)]
mod tests;
