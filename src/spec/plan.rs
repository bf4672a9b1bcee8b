//! Resolving a spec at a scale into a DAG of steps.
//!
//! dataset ─┬─ poison ─┬──────────────── finetune(none) ── evaluate
//!          │          └─ stage1 (f_p) ─ finetune(ieu)  ── evaluate
//!          └─ pretrain ──────────────────┘ (f_r and f_p start from it)
//!
//! With `defaults.pretrained: FILE` an `import` step (no inputs, shared by every dataset)
//! takes the place of `pretrain`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};

use super::names::{ATTACKS, Availability, DATASETS, DEFENCES, availability};
use super::{LoadedSpec, Scale};
use crate::attacks::{AttackParams, PoisonParams};
use crate::dag::{Cell, Kind, Plan, Step};
use crate::data::DatasetParams;
use crate::defences::{DefenceParams, FinetuneParams, ieu::Stage1Params};
use crate::metrics::EvalParams;
use crate::models::import::ImportParams;
use crate::train::PretrainParams;

fn inputs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn check_available(table: &[(&str, Availability)], axis: &str, name: &str) -> Result<()> {
    if availability(table, name) != Some(Availability::Implemented) {
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
        check_available(DATASETS, "dataset", v)?;
    }
    for v in &g.attack {
        check_available(ATTACKS, "attack", v)?;
    }
    for v in &g.defence {
        check_available(DEFENCES, "defence", spec.spec.defence_base(v))?;
    }
    build(spec, scale, data_dir)
}

/// Like [`plan`], but grid entries that are not implemented yet are left out and listed in
/// `Plan::skipped` (for reports of specs that name them).
pub fn plan_available(spec: &LoadedSpec, scale: &Scale, data_dir: Option<&Path>) -> Result<Plan> {
    let mut spec = spec.clone();
    let mut skipped = Vec::new();
    let own: Vec<String> = spec.spec.datasets.keys().cloned().collect();
    for (axis, table) in [
        ("dataset", DATASETS),
        ("attack", ATTACKS),
        ("defence", DEFENCES),
    ] {
        let ok = |v: &String| {
            availability(table, v) == Some(Availability::Implemented)
                || axis == "dataset" && own.contains(v)
        };
        let list = spec.spec.grid.axis_mut(axis).unwrap();
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
        let located = crate::data::locate(dataset, format.as_deref(), data_dir, root.as_deref())
            .map_err(|e| match entry {
                Some(_) => anyhow!("{}: field `datasets.{dataset}.path`: {e}", spec.origin),
                None => e,
            })?;
        let dp = DatasetParams {
            name: dataset.clone(),
            format,
            image_size: scale.image_size,
            pretrain: scale.data.pretrain,
            tune: scale.data.tune,
            test: scale.data.test,
            seed: d.seed,
            source_digest: located.as_ref().map(|(_, digest)| digest.clone()),
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
                let pp = PretrainParams::from_scale(scale, d.seed);
                let key = plan.add(Step::new(
                    Kind::Pretrain,
                    format!("pretrain {dataset}"),
                    &pp,
                    inputs(&[("dataset", &data_key)]),
                )?);
                (key, scale.model.depth)
            }
        };

        for attack in &g.attack {
            let (attack_params, locators) = attack_params(spec, attack)?;
            let pp = PoisonParams {
                attack: attack_params,
                poison_rate: d.poison_rate,
                target: d.target,
                seed: d.seed,
            };
            let mut step = Step::new(
                Kind::Poison,
                format!("poison {dataset}/{attack}"),
                &pp,
                inputs(&[("dataset", &data_key)]),
            )?;
            for (name, path) in locators {
                step = step.with_locator(name, path);
            }
            let poison_key = plan.add(step);

            for defence in &g.defence {
                let (defence_params, fp_key) = match s.defence_base(defence) {
                    "none" => (DefenceParams::None, None),
                    "ieu" => {
                        let ieu = s.ieu_settings(defence)?;
                        if ieu.fp_depth > start_depth {
                            bail!(
                                "{}: defence {defence}: f_p depth {} exceeds the {}-block starting checkpoint",
                                spec.origin,
                                ieu.fp_depth,
                                start_depth
                            );
                        }
                        let mut label = format!("stage1 f_p {dataset}/{attack}");
                        if ieu.fp_depth != 1 {
                            label.push_str(&format!(" depth {}", ieu.fp_depth));
                        }
                        if !ieu.stage1_loss.is_ce() {
                            label.push_str(&format!(" {:?}", ieu.stage1_loss).to_lowercase());
                        }
                        let sp = Stage1Params::from_scale(
                            scale,
                            ieu.fp_depth,
                            ieu.stage1_loss.clone(),
                            d.seed,
                        );
                        let fp_key = plan.add(Step::new(
                            Kind::Stage1,
                            label,
                            &sp,
                            inputs(&[("poison", &poison_key), ("pretrain", &pretrain_key)]),
                        )?);
                        (
                            DefenceParams::Ieu {
                                c_thresh: ieu.c_thresh,
                                logit_masking: ieu.logit_masking,
                                unlearn_rate: ieu.unlearn_rate.clone(),
                                gate_noise_std: ieu.gate_noise_std,
                            },
                            Some(fp_key),
                        )
                    }
                    other => bail!("not implemented yet: defence {other}"),
                };
                let fp = FinetuneParams::from_scale(scale, defence_params, d.seed);
                let mut ins = inputs(&[("poison", &poison_key), ("pretrain", &pretrain_key)]);
                if let Some(k) = &fp_key {
                    ins.insert("stage1".into(), k.clone());
                }
                let ft_key = plan.add(Step::new(
                    Kind::Finetune,
                    format!("finetune {dataset}/{attack}/{defence}"),
                    &fp,
                    ins,
                )?);
                let ep = EvalParams {
                    batch_size: scale.eval_batch_size,
                };
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
                    evaluate: eval_key,
                });
            }
        }
    }
    Ok(plan)
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
    let digest = crate::store::digest_file(&path).map_err(field)?.blake3;
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

/// A trigger file named by the spec: its path and content digest.
fn spec_file(
    spec: &LoadedSpec,
    field: &str,
    file: &Option<String>,
) -> Result<Option<(PathBuf, String)>> {
    let Some(f) = file else { return Ok(None) };
    let path = spec.dir.join(f);
    if !path.is_file() {
        bail!(
            "{}: field `defaults.attacks.{field}`: {} does not exist",
            spec.origin,
            path.display()
        );
    }
    let digest = crate::store::digest_file(&path)?.blake3;
    Ok(Some((path, digest)))
}

/// The attack's step parameters and the files it reads (as step locators).
fn attack_params(
    spec: &LoadedSpec,
    attack: &str,
) -> Result<(AttackParams, Vec<(&'static str, PathBuf)>)> {
    let a = &spec.spec.defaults.attacks;
    let mut files = Vec::new();
    let mut file =
        |field: &str, role: &'static str, f: &Option<String>| -> Result<Option<String>> {
            Ok(spec_file(spec, field, f)?.map(|(path, digest)| {
                files.push((role, path));
                digest
            }))
        };
    let p = match attack {
        "badnets-white" => AttackParams::BadnetsWhite(a.badnets_white.clone()),
        "badnets-pattern" => AttackParams::BadnetsPattern(a.badnets_pattern.clone()),
        "blended" => AttackParams::Blended {
            alpha: a.blended.alpha,
            trigger_digest: file(
                "blended.trigger_file",
                "trigger_file",
                &a.blended.trigger_file,
            )?,
        },
        "trojan-sq" => AttackParams::TrojanSq {
            trigger_digest: file(
                "trojan-sq.trigger_file",
                "trigger_file",
                &a.trojan_sq.trigger_file,
            )?,
        },
        "trojan-wm" => AttackParams::TrojanWm {
            trigger_digest: file(
                "trojan-wm.trigger_file",
                "trigger_file",
                &a.trojan_wm.trigger_file,
            )?,
        },
        "l0-inv" => AttackParams::L0Inv {
            pixels: a.l0_inv.pixels,
            trigger_digest: file(
                "l0-inv.trigger_file",
                "trigger_file",
                &a.l0_inv.trigger_file,
            )?,
            mask_digest: file("l0-inv.mask_file", "mask_file", &a.l0_inv.mask_file)?,
        },
        "l2-inv" => AttackParams::L2Inv {
            l2_norm: a.l2_inv.l2_norm,
            trigger_digest: file(
                "l2-inv.trigger_file",
                "trigger_file",
                &a.l2_inv.trigger_file,
            )?,
        },
        "smooth" => AttackParams::Smooth {
            max: a.smooth.max,
            trigger_digest: file(
                "smooth.trigger_file",
                "trigger_file",
                &a.smooth.trigger_file,
            )?,
        },
        "sig" => AttackParams::Sig(a.sig.clone()),
        "batt" => AttackParams::Batt(a.batt.clone()),
        "wanet" => AttackParams::Wanet(a.wanet.clone()),
        other => bail!("not implemented yet: attack {other}"),
    };
    Ok((p, files))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dag::exec::Executor;
    use crate::models::{Vit, VitConfig};

    const SPEC: &str = "name: t\ntitle: T\ndefaults: { pretrained: ckpt.safetensors }\n\
        grid: { dataset: [synthetic], attack: [badnets-white], defence: [none, ieu] }\n\
        report: { rows: [dataset, attack], columns: defence, metrics: [asr, ca] }\n";

    fn write_checkpoint(path: &Path, seed: u64) {
        // The smoke scale's width and heads, fewer blocks and a smaller image (8² → 16²).
        let cfg = VitConfig {
            image_size: 8,
            patch_size: 4,
            dim: 32,
            depth: 2,
            heads: 2,
            mlp_ratio: 2,
            num_classes: 1000,
        };
        let vit = Vit::new(&cfg, seed, &burn::prelude::Device::flex());
        crate::models::timm::export(&vit, &cfg, path).unwrap();
    }

    #[test]
    fn pretrained_checkpoint_replaces_pretrain_with_an_import_step() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt.safetensors");
        write_checkpoint(&ckpt, 1);
        let spec = LoadedSpec::from_str(SPEC, "t.yaml", dir.path().to_path_buf()).unwrap();
        let scale = spec.scale("smoke").unwrap();
        let p = plan(&spec, &scale, None).unwrap();
        let kinds: Vec<Kind> = p.steps.iter().map(|s| s.kind).collect();
        assert_eq!(kinds.iter().filter(|k| **k == Kind::Import).count(), 1);
        assert!(!kinds.contains(&Kind::Pretrain), "{kinds:?}");
        let import = p.steps.iter().find(|s| s.kind == Kind::Import).unwrap();
        assert_eq!(import.label, "import ckpt.safetensors");
        let ip: ImportParams = import.params().unwrap();
        assert_eq!((ip.model.depth, ip.model.heads, ip.image_size), (2, 2, 16));

        // Downstream steps (stage-1 truncation, finetuning with a new head) run unchanged.
        let store = crate::store::Store::open(&dir.path().join("store")).unwrap();
        let summary = Executor::new(store.clone(), None, 1).run(&p).unwrap();
        assert_eq!(summary.ran, p.steps.len());
        assert!(
            store
                .object_dir(&import.key)
                .join("model.safetensors")
                .is_file()
        );

        // A different file is a different key; a missing file names the field.
        write_checkpoint(&ckpt, 2);
        let again = plan(&spec, &scale, None).unwrap();
        assert!(!again.steps.iter().any(|s| s.key == import.key));
        std::fs::remove_file(&ckpt).unwrap();
        let e = plan(&spec, &scale, None).unwrap_err().to_string();
        assert!(
            e.contains("defaults.pretrained") && e.contains("does not exist"),
            "{e}"
        );
        // f_p deeper than the imported checkpoint is caught when planning.
        write_checkpoint(&ckpt, 1);
        let deep = SPEC.replace(
            "pretrained: ckpt.safetensors",
            "pretrained: ckpt.safetensors, ieu: { fp_depth: 3 }",
        );
        let spec = LoadedSpec::from_str(&deep, "t.yaml", dir.path().to_path_buf()).unwrap();
        let e = plan(&spec, &scale, None).unwrap_err().to_string();
        assert!(e.contains("f_p depth 3 exceeds the 2-block"), "{e}");
    }
}
