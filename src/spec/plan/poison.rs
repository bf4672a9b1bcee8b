//! Planning the poison step of a grid attack entry: through the attack registry, each
//! attack adding its step (and what that step reads) with [`Attack::plan`].
//!
//! [`Attack::plan`]: crate::attacks::Attack::plan

use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use serde_json::Value;

use super::{DatasetPlan, inputs};
use crate::attacks::{AttackParams, PoisonParams};
use crate::dag::{Kind, Plan, Step};
use crate::spec::LoadedSpec;

/// The poison step of a grid attack entry (and the steps it reads); returns its key.
pub(super) fn poison_step(plan: &mut Plan, ds: &DatasetPlan, entry: &str) -> Result<String> {
    let s = &ds.spec.spec;
    let d = &s.defaults;
    let variant = s.attack_variants.get(entry);
    let rate = variant.and_then(|v| v.poison_rate).unwrap_or(d.poison_rate);
    let target = variant.and_then(|v| v.target).unwrap_or(d.target);
    if target >= ds.classes {
        let field = match variant.and_then(|v| v.target) {
            Some(_) => format!("attack_variants.{entry}.target"),
            None => "defaults.target".to_string(),
        };
        bail!(
            "{}: field `{field}`: target class {target} does not exist in dataset {} ({} classes, 0..{})",
            ds.spec.origin,
            ds.dataset,
            ds.classes,
            ds.classes - 1
        );
    }
    let at = if variant.is_some() {
        format!("attack_variants.{entry}.attacks")
    } else {
        "defaults.attacks".to_string()
    };
    let name = s.attack_base(entry);
    let (attack, base) = crate::attacks::resolve(name)
        .ok_or_else(|| anyhow!("not implemented yet: attack {name}"))?;
    let mut cx = PoisonPlan {
        plan,
        ds,
        entry,
        label: entry,
        base,
        rate,
        target,
        files: SpecFiles::of(ds.spec, format!("{at}.{}", attack.name())),
        at,
    };
    let settings = cx.settings(attack.name())?;
    attack.plan(&mut cx, &settings)
}

/// One poison step being planned (a grid attack entry's, or the base attack's of one):
/// what an attack's [`Attack::plan`] builds on.
///
/// [`Attack::plan`]: crate::attacks::Attack::plan
pub struct PoisonPlan<'a> {
    pub plan: &'a mut Plan,
    pub ds: &'a DatasetPlan<'a>,
    /// The grid entry whose settings apply (an attack, `<attack>+<base>`, or a variant).
    pub entry: &'a str,
    /// The step is labelled `poison <dataset>/<label>`: the grid entry, or for the base
    /// attack of one its name.
    pub label: &'a str,
    /// The base attack a `<attack>+<base>` entry names.
    pub base: Option<&'a str>,
    pub rate: f64,
    pub target: usize,
    /// The trigger files the attack's settings name.
    pub files: SpecFiles<'a>,
    /// Where the entry's attack settings are in the spec (`defaults.attacks`,
    /// `attack_variants.<entry>.attacks`).
    at: String,
}

impl PoisonPlan<'_> {
    /// The settings of `attack` for this entry (merged; checked when the spec was loaded).
    pub fn settings(&self, attack: &str) -> Result<Value> {
        let spec = self.ds.spec;
        spec.spec
            .attack_settings(self.entry, attack)
            .map_err(|e| anyhow!("{}: {e}", spec.origin))
    }

    /// Adds the poison step with the attack's parameters: its inputs are the dataset step
    /// and `extra` (`(role, key)`), its locators the files in [`PoisonPlan::files`].
    pub fn poison(&mut self, attack: AttackParams, extra: &[(&str, &str)]) -> Result<String> {
        let params = PoisonParams {
            attack,
            poison_rate: self.rate,
            target: self.target,
            seed: self.ds.spec.spec.defaults.seed,
        };
        let mut ins = inputs(&[("dataset", self.ds.data_key)]);
        ins.extend(extra.iter().map(|(r, k)| (r.to_string(), k.to_string())));
        let mut step = Step::new(
            Kind::Poison,
            format!("poison {}/{}", self.ds.dataset, self.label),
            &params,
            ins,
        )?;
        for (role, path) in std::mem::take(&mut self.files.locators) {
            step = step.with_locator(&role, path);
        }
        Ok(self.plan.add(step))
    }

    /// Plans the poison step of another attack with this entry's settings, rate and
    /// target, labelled with its name (CAT's base attack); returns its key.
    pub fn poison_of(&mut self, name: &str) -> Result<String> {
        let attack = crate::attacks::registered(name)
            .ok_or_else(|| anyhow!("not implemented yet: attack {name}"))?;
        let mut cx = PoisonPlan {
            plan: &mut *self.plan,
            ds: self.ds,
            entry: self.entry,
            label: name,
            base: None,
            rate: self.rate,
            target: self.target,
            files: SpecFiles::of(self.ds.spec, format!("{}.{name}", self.at)),
            at: self.at.clone(),
        };
        let settings = cx.settings(name)?;
        attack.plan(&mut cx, &settings)
    }
}

/// The trigger files an attack's settings name (`trigger_file`, `mask_file`; relative to
/// the spec file): each enters the step's parameters as its content digest, and the step
/// finds it through a locator named like the field.
pub struct SpecFiles<'a> {
    spec: Option<&'a LoadedSpec>,
    /// Where the attack's settings are in the spec (`defaults.attacks.blended`).
    at: String,
    locators: Vec<(String, PathBuf)>,
}

impl<'a> SpecFiles<'a> {
    /// No spec: settings that name a file are an error (default settings name none).
    pub fn none() -> Self {
        Self {
            spec: None,
            at: String::new(),
            locators: Vec::new(),
        }
    }

    /// The files of the attack settings at `at` in `spec`.
    pub fn of(spec: &'a LoadedSpec, at: String) -> Self {
        Self {
            spec: Some(spec),
            at,
            locators: Vec::new(),
        }
    }

    /// The content digest of the file the setting `field` names, if it names one; the
    /// step will find the file through the locator `field`.
    pub fn digest(&mut self, field: &str, file: &Option<String>) -> Result<Option<String>> {
        let Some(f) = file else { return Ok(None) };
        let Some(spec) = self.spec else {
            bail!("{field}: {f}: trigger files are named in a spec");
        };
        let path = spec.dir.join(f);
        if !path.is_file() {
            bail!(
                "{}: field `{}.{field}`: {} does not exist",
                spec.origin,
                self.at,
                path.display()
            );
        }
        let digest = crate::store::stat_cache::digest(&path)?;
        self.locators.push((field.to_string(), path));
        Ok(Some(digest))
    }
}
