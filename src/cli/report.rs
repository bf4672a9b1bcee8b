//! `report` and `check`: what the store holds for a spec, rendered or compared with a baseline.

use std::path::PathBuf;

use anyhow::Result;

use super::run::load;
use super::{Common, Exit, Format};
use crate::spec::LoadedSpec;
use crate::store::Store;

/// What `report` and `check` read: the spec, its plan (the grid entries that can be
/// planned), the store and the collected metrics.
fn load_report(
    common: &Common,
) -> Result<(
    LoadedSpec,
    crate::dag::Plan,
    Store,
    polars::prelude::DataFrame,
)> {
    let (mut spec, _scale, plan, store) = load(common, true)?;
    for s in &plan.skipped {
        let (axis, name) = s.split_once(' ').unwrap();
        spec.spec.grid.axis_mut(axis).unwrap().retain(|v| v != name);
    }
    if !plan.skipped.is_empty() {
        eprintln!(
            "note: not implemented yet or data not found, left out of the report: {}",
            plan.skipped.join(", ")
        );
    }
    let df = crate::report::aggregate_seeds(&crate::report::collect(&plan, &store)?)?;
    Ok((spec, plan, store, df))
}

/// `paper` or a CSV file.
fn load_baseline(spec: &LoadedSpec, base: &str) -> Result<crate::report::Baseline> {
    if base == "paper" {
        crate::report::compare::from_paper(spec)
    } else {
        crate::report::compare::from_csv(std::path::Path::new(base))
    }
}

/// What another store holds for the same spec, planned the same way.
fn baseline_from_store(common: &Common, dir: &std::path::Path) -> Result<crate::report::Baseline> {
    let other = Common {
        store: dir.to_path_buf(),
        ..common.clone()
    };
    let (_, _, _, df) = load_report(&other)?;
    let mut cells = crate::report::values_by_cell(&df)?;
    cells.retain(|_, v| !v.is_empty());
    Ok(crate::report::Baseline {
        source: format!("store {}", dir.display()),
        cells,
    })
}

/// `ieu-bench report`.
pub(super) fn report(
    common: Common,
    format: Format,
    out: Option<PathBuf>,
    compare: Option<String>,
    compare_store: Option<PathBuf>,
    figures: Option<PathBuf>,
) -> Result<()> {
    let (spec, plan, store, mut df) = load_report(&common)?;
    let mut html_figures = Vec::new();
    for fig in &spec.spec.figures {
        let panels = match crate::report::figures::panels(fig, &plan, &store) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("note: figure {} left out: {e:#}", fig.name);
                continue;
            }
        };
        let svg = match &figures {
            Some(dir) => {
                let svg = crate::report::figures::write(fig, &panels, dir)?;
                eprintln!("wrote {0}/{1}.png and {0}/{1}.svg", dir.display(), fig.name);
                svg
            }
            None if format == Format::Html => crate::report::figures::svg(fig, &panels)?,
            None => continue,
        };
        html_figures.push(crate::report::HtmlFigure {
            title: fig.title.clone(),
            svg: Some(svg),
            png_data_uri: None,
        });
    }
    let baseline = match (compare, compare_store) {
        (Some(b), _) => Some(load_baseline(&spec, &b)?),
        (None, Some(dir)) => Some(baseline_from_store(&common, &dir)?),
        (None, None) => None,
    };
    let table = crate::report::build_table(&df, &spec, &common.scale, baseline.as_ref())?;
    let text = match format {
        Format::Csv => crate::report::to_csv(&mut df)?,
        Format::Markdown => crate::report::to_markdown(&table)?,
        Format::Latex => crate::report::to_latex(&table)?,
        Format::Html => {
            // The triggers of the table's attacks on a test image (Figures 4 and 5).
            let mut names: Vec<String> = Vec::new();
            for a in &spec.spec.grid.attack {
                let base = spec.spec.attack_base(a).to_string();
                if base != "none" && !names.contains(&base) {
                    names.push(base);
                }
            }
            let dataset = &spec.spec.grid.dataset[0];
            let scale = spec.scale(&common.scale)?;
            match crate::report::preview::render(
                dataset,
                common.data_dir.as_deref(),
                &scale,
                &names,
                0,
            ) {
                Ok(r) => {
                    use base64::Engine;
                    html_figures.push(crate::report::HtmlFigure {
                            title: format!(
                                "The triggers on a {dataset} test image: clean, poisoned, amplified difference (Figures 4 and 5)"
                            ),
                            svg: None,
                            png_data_uri: Some(format!(
                                "data:image/png;base64,{}",
                                base64::engine::general_purpose::STANDARD.encode(&r.png)
                            )),
                        });
                }
                Err(e) => eprintln!("note: trigger grid left out: {e:#}"),
            }
            crate::report::to_html(&table, &html_figures)?
        }
    };
    match out {
        Some(p) => crate::store::write_atomic(&p, text.as_bytes())?,
        None => print!("{text}"),
    }
    Ok(())
}

/// `ieu-bench check`.
pub(super) fn check(
    common: Common,
    baseline: Option<String>,
    baseline_store: Option<PathBuf>,
    tol: Vec<String>,
    junit: Option<PathBuf>,
) -> Result<()> {
    let tol = crate::report::compare::Tolerances::parse(&tol)?;
    let (spec, _plan, _store, df) = load_report(&common)?;
    let exit2 = |e: anyhow::Error| Exit {
        code: 2,
        message: format!("{e:#}"),
    };
    let paper = baseline.as_deref() == Some("paper");
    let base = match (&baseline, &baseline_store) {
        (Some(b), _) => load_baseline(&spec, b).map_err(exit2)?,
        (None, Some(dir)) => baseline_from_store(&common, dir).map_err(exit2)?,
        (None, None) => unreachable!("clap requires one"),
    };
    let values = crate::report::values_by_cell(&df)?;
    let mut now = std::collections::BTreeMap::new();
    for row in 0..df.height() {
        let cell = crate::report::cell_name(&df, row)?;
        let computed = df.column("ca")?.f64()?.get(row).is_some();
        now.insert(cell.clone(), computed.then(|| values[&cell].clone()));
    }
    let checks = crate::report::compare::check(&now, &base, &tol, paper);
    let extra = crate::report::compare::unplanned(&now, &base);
    if !extra.is_empty() && !paper {
        eprintln!(
            "note: {} cells of the baseline are not planned here and were not compared: {}",
            extra.len(),
            extra.join(", ")
        );
    }
    use crate::report::compare::Verdict;
    let count = |v: Verdict| checks.iter().filter(|c| c.verdict == v).count();
    let moved: Vec<_> = checks
        .iter()
        .filter(|c| c.verdict != Verdict::Unchanged)
        .collect();
    if !moved.is_empty() {
        println!(
            "{:<40} {:<14} {:>9} {:>9} {:>8}  verdict",
            "cell", "metric", "baseline", "now", "delta"
        );
        let f = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "–".into());
        for c in &moved {
            let verdict = match c.verdict {
                Verdict::Regressed => format!("REGRESSED (tolerance {})", c.tolerance),
                Verdict::Improved => "improved".into(),
                Verdict::WithinTolerance => "within tolerance".into(),
                Verdict::Missing => format!("MISSING: {}", c.note),
                Verdict::Unchanged => "unchanged".into(),
            };
            println!(
                "{:<40} {:<14} {:>9} {:>9} {:>8}  {verdict}",
                c.cell,
                c.metric,
                f(c.baseline),
                f(c.now),
                c.delta
                    .map(|d| format!("{d:+.2}"))
                    .unwrap_or_else(|| "–".into())
            );
        }
    }
    let (reg, missing) = (count(Verdict::Regressed), count(Verdict::Missing));
    println!(
        "check against {}: {} values compared: {reg} regressed, {} improved, {} within tolerance, {} unchanged, {missing} missing",
        base.source,
        checks.len(),
        count(Verdict::Improved),
        count(Verdict::WithinTolerance),
        count(Verdict::Unchanged)
    );
    if let Some(path) = junit {
        let xml =
            crate::report::compare::junit(&checks, &format!("ieu-bench check {}", spec.spec.name))?;
        crate::store::write_atomic(&path, xml.as_bytes())?;
    }
    if missing > 0 {
        return Err(Exit {
            code: 2,
            message: format!(
                "{missing} values could not be compared (cells missing here or in the baseline)"
            ),
        }
        .into());
    }
    if reg > 0 {
        let cells: Vec<String> = checks
            .iter()
            .filter(|c| c.verdict == Verdict::Regressed)
            .map(|c| format!("{} {}", c.cell, c.metric))
            .collect();
        return Err(Exit {
            code: 1,
            message: format!("{reg} regressions: {}", cells.join(", ")),
        }
        .into());
    }
    Ok(())
}
