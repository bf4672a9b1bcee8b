//! Validation of a parsed spec: every name, range and cross-reference, with errors naming
//! the file and the field. Defence and attack settings are checked by their defences and
//! attacks.

use anyhow::{Result, anyhow, bail};

use super::{AttackVariant, DATASETS, DEFAULT_FIELDS, METRICS, Spec, names};

/// Every `per_dataset` entry names a known dataset (built in or the spec's own; it need
/// not be in the grid, so a spec can be sliced) and defences with settings.
fn check_per_dataset(spec: &Spec, file: &str) -> Result<()> {
    for (ds, defences) in &spec.per_dataset {
        let known = DATASETS.iter().any(|(n, _)| n == ds) || spec.datasets.contains_key(ds);
        if !known {
            bail!(
                "{file}: field `per_dataset.{ds}`: unknown dataset '{ds}' (known: {}{})",
                DATASETS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
                spec.datasets
                    .keys()
                    .map(|k| format!(", {k}"))
                    .collect::<String>()
            );
        }
        for name in defences.keys() {
            if crate::defences::registered(name).is_none_or(|d| d.default_settings().is_none()) {
                bail!(
                    "{file}: field `per_dataset.{ds}.{name}`: not a defence with settings (known: {})",
                    crate::defences::REGISTRY
                        .iter()
                        .filter(|d| d.default_settings().is_some())
                        .map(|d| d.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
    }
    Ok(())
}

/// Every key of `defaults:` is a known field or a registered defence with settings.
fn check_defaults_keys(spec: &Spec, file: &str) -> Result<()> {
    for key in spec.defaults.defences.keys() {
        let ok = crate::defences::registered(key).is_some_and(|d| d.default_settings().is_some());
        if !ok {
            let with_settings: Vec<&str> = crate::defences::REGISTRY
                .iter()
                .filter(|d| d.default_settings().is_some())
                .map(|d| d.name())
                .collect();
            bail!(
                "{file}: field `defaults.{key}`: unknown field (known: {}, and the settings of {})",
                DEFAULT_FIELDS.join(", "),
                with_settings.join(", ")
            );
        }
    }
    Ok(())
}

/// The defences that can train another architecture than the ViT.
fn any_architecture() -> Vec<&'static str> {
    crate::defences::REGISTRY
        .iter()
        .filter(|d| d.any_architecture())
        .map(|d| d.name())
        .collect()
}

/// Checks the merged settings of a defence entry (on every dataset with its own
/// settings); `at` is the field the error names.
fn check_settings(spec: &Spec, file: &str, entry: &str, at: &str) -> Result<()> {
    check_settings_on(spec, file, entry, at, None)?;
    for ds in spec.per_dataset.keys() {
        check_settings_on(spec, file, entry, at, Some(ds))?;
    }
    Ok(())
}

fn check_settings_on(
    spec: &Spec,
    file: &str,
    entry: &str,
    at: &str,
    dataset: Option<&str>,
) -> Result<()> {
    let base = spec.defence_base(entry);
    let Some(d) = crate::defences::registered(base) else {
        return Ok(());
    };
    let v = spec
        .defence_settings_for(entry, dataset)
        .map_err(|e| anyhow!("{file}: {e}"))?;
    let at = match dataset {
        Some(ds) if spec.per_dataset[ds].contains_key(base) && !at.starts_with("variants.") => {
            format!("per_dataset.{ds}.{base}")
        }
        _ => at.to_string(),
    };
    let at = at.as_str();
    if v.is_null() {
        return Ok(());
    }
    d.check(&v).map_err(|e| field_error(file, at, &e))
}

/// An error of settings at `at`: "c_thresh: 1.5 is not in (0, 1)" names a field inside
/// them.
fn field_error(file: &str, at: &str, e: &str) -> anyhow::Error {
    match e.split_once(": ") {
        Some((field, msg)) if is_field(field) => anyhow!("{file}: field `{at}.{field}`: {msg}"),
        _ => anyhow!("{file}: field `{at}`: {e}"),
    }
}

/// Every section of attack settings (`defaults.attacks`, a variant's `attacks:`; `at`)
/// names a registered attack.
fn check_attack_sections<'a>(
    file: &str,
    at: &str,
    sections: impl IntoIterator<Item = &'a String>,
) -> Result<()> {
    for key in sections {
        if crate::attacks::registered(key).is_none() {
            bail!(
                "{file}: field `{at}`: unknown attack section '{key}' (known: {})",
                crate::attacks::names().join(", ")
            );
        }
    }
    Ok(())
}

/// Checks the merged settings of attack `name` (with a variant's, if given); `at` is where
/// the spec sets them.
fn check_attack(
    spec: &Spec,
    file: &str,
    name: &str,
    variant: Option<(&str, &AttackVariant)>,
    at: &str,
) -> Result<()> {
    let Some(a) = crate::attacks::registered(name) else {
        return Ok(());
    };
    let v = spec
        .merged_attack_settings(name, variant)
        .map_err(|e| anyhow!("{file}: {e}"))?;
    a.check(&v).map_err(|e| field_error(file, at, &e))
}

/// `, cat+<attack>` for every attack that takes a base.
fn with_base() -> String {
    crate::attacks::REGISTRY
        .iter()
        .filter(|a| a.takes_base())
        .map(|a| format!(", {}+<attack>", a.name()))
        .collect()
}

fn is_field(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

pub(super) fn validate_spec(spec: &Spec, file: &str) -> Result<()> {
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
    check_defaults_keys(spec, file)?;
    check_per_dataset(spec, file)?;
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
    check_attack_sections(file, "defaults.attacks", d.attacks.keys())?;
    for a in crate::attacks::REGISTRY {
        let at = format!("defaults.attacks.{}", a.name());
        check_attack(spec, file, a.name(), None, &at)?;
    }
    let defences = crate::defences::names();
    let attacks = crate::attacks::names();
    let table = |axis: &str| -> Vec<&str> {
        match axis {
            "dataset" => DATASETS.iter().map(|(n, _)| *n).collect(),
            "attack" => attacks.clone(),
            _ => defences.clone(),
        }
    };
    for axis in ["dataset", "attack", "defence"] {
        let known = table(axis);
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
                    with_base()
                } else {
                    String::new()
                };
                bail!(
                    "{file}: field `grid.{axis}[{i}]`: unknown {axis} '{v}' (known: {}{also})",
                    known.join(", ")
                );
            }
            if list[..i].contains(v) {
                bail!("{file}: field `grid.{axis}[{i}]`: '{v}' is listed twice");
            }
        }
    }
    for (name, v) in &spec.attack_variants {
        let at = format!("attack_variants.{name}");
        if crate::attacks::registered(name).is_some() {
            bail!("{file}: field `{at}`: a variant cannot reuse the built-in attack name '{name}'");
        }
        if names::axis_availability("attack", &v.base).is_none() {
            bail!(
                "{file}: field `{at}.base`: unknown attack '{}' (known: {}{})",
                v.base,
                attacks.join(", "),
                with_base()
            );
        }
        if let Some(r) = v.poison_rate
            && !(0.0..1.0).contains(&r)
        {
            bail!("{file}: field `{at}.poison_rate`: {r} is not in [0, 1)");
        }
        check_attack_sections(file, &format!("{at}.attacks"), v.attacks.keys())?;
        for section in v.attacks.keys() {
            let field = format!("{at}.attacks.{section}");
            check_attack(spec, file, section, Some((name, v)), &field)?;
        }
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
    for def in crate::defences::REGISTRY {
        check_settings(spec, file, def.name(), &format!("defaults.{}", def.name()))?;
    }
    for (name, v) in &spec.variants {
        if crate::defences::registered(name).is_some() {
            bail!(
                "{file}: field `variants.{name}`: a variant cannot reuse the built-in defence name '{name}'"
            );
        }
        let Some(base) = crate::defences::registered(&v.base) else {
            bail!(
                "{file}: field `variants.{name}.base`: unknown defence '{}' (known: {})",
                v.base,
                defences.join(", ")
            );
        };
        if let Some(m) = &v.model {
            crate::models::Arch::parse(m)
                .map_err(|e| anyhow!("{file}: field `variants.{name}.model`: {e}"))?;
            if !base.any_architecture() {
                bail!(
                    "{file}: field `variants.{name}.model`: only {} variants can change f_r's architecture ({} runs on the ViT)",
                    any_architecture().join(" and "),
                    v.base
                );
            }
        }
        for key in v.settings.keys() {
            if key == &v.base && base.default_settings().is_some() {
                continue;
            }
            if crate::defences::registered(key).is_some() {
                bail!(
                    "{file}: field `variants.{name}.{key}`: a variant based on {} cannot set {key} settings",
                    v.base
                );
            }
            bail!(
                "{file}: field `variants.{name}.{key}`: unknown field (a variant has `base`, `model` and its base's settings `{}:`)",
                v.base
            );
        }
        if base.default_settings().is_none() && v.model.is_none() {
            bail!(
                "{file}: field `variants.{name}.base`: '{}' has no settings to vary (known: {}; or give `model:`)",
                v.base,
                crate::defences::REGISTRY
                    .iter()
                    .filter(|d| d.default_settings().is_some())
                    .map(|d| d.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        check_settings(spec, file, name, &format!("variants.{name}.{}", v.base))?;
    }
    if d.model != "vit" {
        for v in &spec.grid.defence {
            let base = spec.defence_base(v);
            if crate::defences::registered(base).is_some_and(|d| !d.any_architecture()) {
                bail!(
                    "{file}: field `defaults.model`: defence {v} ({base}) runs on the ViT only, not on {} (give the architecture to {} variants with `model:` instead)",
                    d.model,
                    any_architecture().join("/")
                );
            }
        }
    }
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
