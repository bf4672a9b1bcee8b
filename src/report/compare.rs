//! Comparing a spec's results with a baseline: `report --compare` (deltas) and `check`
//! (a regression gate with an exit code and JUnit XML).
//!
//! A baseline is a CSV written by `report --format csv` (a file committed next to the
//! code), another store, or `paper` (the spec's `reference:` values). Values compare as
//! printed (two decimals), so a baseline CSV written from the same store shows no change.
//! The direction of every metric is fixed: ASR, FPR, FNR and the share of clean images
//! flagged should go down; CA, CA on unseen images and the share of poisoned images
//! flagged should go up. A move in the wrong direction by more than the tolerance is a
//! regression; a move in the right direction is reported as an improvement, never a
//! failure.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use minijinja::{Environment, context};
use serde::Serialize;

use super::Baseline;
use crate::spec::LoadedSpec;

/// The JUnit XML template (`.xml`: minijinja escapes every value).
pub const JUNIT_TEMPLATE: &str = include_str!("../../templates/junit.xml.j2");

/// Whether lower values of a metric are better; `None` for metrics with no direction.
pub fn lower_is_better(metric: &str) -> Option<bool> {
    match metric {
        "asr" | "fpr" | "fnr" | "clean_flagged" => Some(true),
        "ca" | "ca_unseen" | "poison_flagged" => Some(false),
        _ => None,
    }
}

/// A baseline from a `report --format csv` file.
pub fn from_csv(path: &Path) -> Result<Baseline> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read baseline {}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| anyhow!("baseline {} is empty", path.display()))?
        .split(',')
        .collect();
    let col = |name: &str| {
        header.iter().position(|h| *h == name).ok_or_else(|| {
            anyhow!(
                "baseline {}: no `{name}` column (write it with `ieu-bench report --format csv`)",
                path.display()
            )
        })
    };
    let (d, a, f) = (col("dataset")?, col("attack")?, col("defence")?);
    let metric_cols: Vec<(usize, &str)> = super::METRIC_COLUMNS
        .iter()
        .filter_map(|m| header.iter().position(|h| h == m).map(|i| (i, *m)))
        .collect();
    let mut cells = BTreeMap::new();
    for (i, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != header.len() {
            bail!(
                "baseline {} line {}: {} fields, the header has {}",
                path.display(),
                i + 2,
                fields.len(),
                header.len()
            );
        }
        let mut vals = BTreeMap::new();
        for (ci, m) in &metric_cols {
            let f = fields[*ci].trim();
            if f.is_empty() {
                continue;
            }
            let v: f64 = f.parse().map_err(|_| {
                anyhow!(
                    "baseline {} line {}: `{m}` is '{f}', not a number",
                    path.display(),
                    i + 2
                )
            })?;
            vals.insert(m.to_string(), v);
        }
        cells.insert(format!("{}/{}/{}", fields[d], fields[a], fields[f]), vals);
    }
    Ok(Baseline {
        source: path.display().to_string(),
        cells,
    })
}

/// The spec's `reference:` values (the paper's).
pub fn from_paper(spec: &LoadedSpec) -> Result<Baseline> {
    let r = spec.spec.report.reference.as_ref().ok_or_else(|| {
        anyhow!(
            "{}: no `report.reference` values to compare with (baseline `paper`)",
            spec.origin
        )
    })?;
    Ok(Baseline {
        source: r.source.clone(),
        cells: r.cells.clone(),
    })
}

/// Tolerances: per metric, and per cell pattern (`cifar10/*/ieu:asr=2`, `*` matches one
/// component).
#[derive(Debug, Clone, Default)]
pub struct Tolerances {
    pub metric: BTreeMap<String, f64>,
    pub cells: Vec<(String, String, f64)>,
}

impl Tolerances {
    /// Parses `--tol` values: `asr=1,ca=1`, or `PATTERN:metric=v`.
    pub fn parse(items: &[String]) -> Result<Self> {
        let mut t = Tolerances::default();
        if items.is_empty() {
            t.metric.insert("asr".into(), 1.0);
            t.metric.insert("ca".into(), 1.0);
        }
        for item in items {
            let (cell, rest) = match item.split_once(':') {
                Some((c, r)) => (Some(c.to_string()), r),
                None => (None, item.as_str()),
            };
            for part in rest.split(',').filter(|p| !p.is_empty()) {
                let (m, v) = part.split_once('=').ok_or_else(|| {
                    anyhow!("--tol {item}: expected METRIC=VALUE (e.g. asr=1,ca=0.5)")
                })?;
                if !super::METRIC_COLUMNS.contains(&m) {
                    bail!(
                        "--tol {item}: unknown metric '{m}' (one of {})",
                        super::METRIC_COLUMNS.join(", ")
                    );
                }
                let v: f64 = v
                    .parse()
                    .ok()
                    .filter(|v: &f64| *v >= 0.0)
                    .ok_or_else(|| anyhow!("--tol {item}: '{v}' is not a number ≥ 0"))?;
                match &cell {
                    Some(c) => {
                        if c.split('/').count() != 3 {
                            bail!(
                                "--tol {item}: the cell is DATASET/ATTACK/DEFENCE (with * for any)"
                            );
                        }
                        t.cells.push((c.clone(), m.to_string(), v));
                    }
                    None => {
                        t.metric.insert(m.to_string(), v);
                    }
                }
            }
        }
        Ok(t)
    }

    /// The tolerance of `metric` in `cell`, if the metric is checked there.
    pub fn of(&self, cell: &str, metric: &str) -> Option<f64> {
        let specific = self
            .cells
            .iter()
            .rev()
            .find(|(p, m, _)| m == metric && matches(p, cell))
            .map(|(_, _, v)| *v);
        specific.or_else(|| self.metric.get(metric).copied())
    }

    pub fn metrics(&self) -> Vec<String> {
        let mut ms: Vec<String> = self.metric.keys().cloned().collect();
        for (_, m, _) in &self.cells {
            if !ms.contains(m) {
                ms.push(m.clone());
            }
        }
        ms
    }
}

fn matches(pattern: &str, cell: &str) -> bool {
    pattern
        .split('/')
        .zip(cell.split('/'))
        .all(|(p, c)| p == "*" || p == c)
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Unchanged,
    WithinTolerance,
    Improved,
    Regressed,
    /// Not computed here, or not in the baseline.
    Missing,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub cell: String,
    pub metric: String,
    pub baseline: Option<f64>,
    pub now: Option<f64>,
    pub delta: Option<f64>,
    pub tolerance: f64,
    pub verdict: Verdict,
    pub note: String,
}

/// Compares every cell in `now` (values by cell, as printed) with `base`. With `only_in_base`,
/// cells the baseline has no values for are skipped (a paper's table covers some cells).
pub fn check(
    now: &BTreeMap<String, Option<BTreeMap<String, f64>>>,
    base: &Baseline,
    tol: &Tolerances,
    only_in_base: bool,
) -> Vec<Check> {
    let mut out = Vec::new();
    for (cell, vals) in now {
        let b = base.cells.get(cell);
        if only_in_base && b.is_none() {
            continue;
        }
        for metric in tol.metrics() {
            let Some(t) = tol.of(cell, &metric) else {
                continue;
            };
            let bv = b.and_then(|b| b.get(&metric)).copied();
            let nv = vals.as_ref().and_then(|v| v.get(&metric)).copied();
            let mk = |verdict, delta, note: &str| Check {
                cell: cell.clone(),
                metric: metric.clone(),
                baseline: bv,
                now: nv,
                delta,
                tolerance: t,
                verdict,
                note: note.to_string(),
            };
            match (vals, bv, nv) {
                (None, _, _) => out.push(mk(Verdict::Missing, None, "not computed here")),
                (Some(_), None, None) => {} // the metric does not apply to this cell
                (Some(_), None, Some(_)) if only_in_base => {}
                (Some(_), None, Some(_)) => {
                    out.push(mk(Verdict::Missing, None, "not in the baseline"))
                }
                (Some(_), Some(_), None) => out.push(mk(Verdict::Missing, None, "no value here")),
                (Some(_), Some(bv), Some(nv)) => {
                    let d = super::round2(nv - bv);
                    let worse = match lower_is_better(&metric) {
                        Some(true) => d,
                        Some(false) => -d,
                        None => d.abs(),
                    };
                    let verdict = if d == 0.0 {
                        Verdict::Unchanged
                    } else if worse > t + 1e-9 {
                        Verdict::Regressed
                    } else if worse < -(t + 1e-9) {
                        Verdict::Improved
                    } else {
                        Verdict::WithinTolerance
                    };
                    out.push(mk(verdict, Some(d), ""));
                }
            }
        }
    }
    out
}

/// Cells of the baseline that `now` does not plan (a smaller grid, `--only`): not compared.
pub fn unplanned(
    now: &BTreeMap<String, Option<BTreeMap<String, f64>>>,
    base: &Baseline,
) -> Vec<String> {
    base.cells
        .keys()
        .filter(|c| !now.contains_key(*c))
        .cloned()
        .collect()
}

/// The checks as JUnit XML: one test case per cell and metric.
pub fn junit(checks: &[Check], suite: &str) -> Result<String> {
    let mut env = Environment::new();
    env.add_template("junit.xml", JUNIT_TEMPLATE)?;
    let failures = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Regressed)
        .count();
    let errors = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Missing)
        .count();
    Ok(env.get_template("junit.xml")?.render(context! {
        suite => suite,
        checks => checks,
        failures => failures,
        errors => errors,
    })?)
}
