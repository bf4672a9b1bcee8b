//! Attack settings of a spec (`defaults.attacks`, an attack variant's `attacks:`): one
//! section per attack, every field with the paper's default, and their range checks.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

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

/// `defaults` with each section of `overrides` (`{ <attack>: { field: value } }`) merged
/// into the section of the same name.
pub(crate) fn merged_attacks(
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

/// Range checks of every attack setting; `at` is the field path of `a` in the spec.
pub(crate) fn check_attacks(file: &str, at: &str, a: &AttackDefaults) -> Result<()> {
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
