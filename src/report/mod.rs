//! Reports: Polars collects the metrics of every grid cell from the store; one table model
//! ([`Table`]) holds what every format shows (values, the best and second best per row,
//! reference values, deltas against a baseline, provenance), and minijinja renders it as
//! markdown, LaTeX or HTML from `templates/`. CSV is the collected frame itself.

pub mod compare;
pub mod figures;
pub mod preview;

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use minijinja::{Environment, context};
use polars::prelude::*;
use serde::Serialize;

use crate::dag::Plan;
use crate::metrics::Metrics;
use crate::spec::{Better, LoadedSpec};
use crate::store::Store;

/// The markdown template, embedded from `templates/table.md.j2`.
pub const TABLE_TEMPLATE: &str = include_str!("../../templates/table.md.j2");
/// The LaTeX (booktabs) template.
pub const LATEX_TEMPLATE: &str = include_str!("../../templates/table.tex.j2");
/// The standalone HTML page.
pub const HTML_TEMPLATE: &str = include_str!("../../templates/report.html.j2");

/// Metric columns of the collected frame, in order.
pub const METRIC_COLUMNS: &[&str] = crate::spec::METRICS;

/// One row per grid cell (per seed, when the plan has several): dataset, attack, defence,
/// the metrics (null where the cell has not been run), the seed and the key of the evaluate
/// step. [`aggregate_seeds`] folds the seeds into one row per cell.
pub fn collect(plan: &Plan, store: &Store) -> Result<DataFrame> {
    let mut ds = Vec::new();
    let mut at = Vec::new();
    let mut de = Vec::new();
    let mut seeds = Vec::new();
    let mut keys = Vec::new();
    let mut cols: BTreeMap<&str, Vec<Option<f64>>> =
        METRIC_COLUMNS.iter().map(|m| (*m, Vec::new())).collect();
    let by_key: BTreeMap<&str, &crate::dag::Step> =
        plan.steps.iter().map(|s| (s.key.as_str(), s)).collect();
    // Cells share checkpoints: each is read (and verified) once.
    let mut checkpoints: BTreeMap<String, Option<(f64, Option<f64>)>> = BTreeMap::new();
    for cell in &plan.cells {
        ds.push(cell.dataset.clone());
        at.push(cell.attack.clone());
        de.push(cell.defence.clone());
        seeds.push(cell.seed);
        keys.push(cell.evaluate.clone());
        // Verified read: a metrics file that does not match its manifest is an error (and
        // quarantined), never a number in a table.
        let m = if store.contains(&cell.evaluate) {
            Some(Metrics::load(&store.verified(&cell.evaluate)?)?)
        } else {
            None
        };
        let checkpoint = match pretrain_of(&by_key, &cell.evaluate) {
            Some(k) => match checkpoints.get(k) {
                Some(c) => *c,
                None => {
                    let c = checkpoint_quality(store, k)?;
                    checkpoints.insert(k.to_string(), c);
                    c
                }
            },
            None => None,
        };
        for name in METRIC_COLUMNS {
            let v = match *name {
                "pretrain_accuracy" => checkpoint.map(|c| c.0),
                "pretrain_confidence" => checkpoint.and_then(|c| c.1),
                _ => m.as_ref().and_then(|m| m.get(name)),
            };
            cols.get_mut(name).unwrap().push(v);
        }
    }
    let mut columns: Vec<Column> = vec![
        Column::new("dataset".into(), ds),
        Column::new("attack".into(), at),
        Column::new("defence".into(), de),
    ];
    for name in METRIC_COLUMNS {
        columns.push(Column::new((*name).into(), cols.remove(name).unwrap()));
    }
    columns.push(Column::new("seed".into(), seeds));
    columns.push(Column::new("evaluate_step".into(), keys));
    Ok(DataFrame::new_infer_height(columns)?)
}

/// With several seeds per cell (`--seed 0,1,2`), one row per cell: each metric is the mean
/// over the seeds and `<metric>_sd` its sample standard deviation (n − 1), `seeds` lists
/// the seeds, `evaluate_step` the seeds' evaluate steps separated by spaces. A cell is
/// computed only when every seed is: a mean over fewer seeds than asked for is not
/// printed. With one seed per cell, the frame is returned as it is.
pub fn aggregate_seeds(df: &DataFrame) -> Result<DataFrame> {
    let mut order: Vec<String> = Vec::new();
    let mut rows_of: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for r in 0..df.height() {
        let name = cell_name(df, r)?;
        rows_of
            .entry(name.clone())
            .or_insert_with(|| {
                order.push(name);
                Vec::new()
            })
            .push(r);
    }
    if rows_of.values().all(|rows| rows.len() < 2) {
        return Ok(df.clone());
    }
    let seed = df.column("seed")?.u64()?;
    let (mut ds, mut at, mut de, mut seeds, mut keys) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut means: BTreeMap<&str, Vec<Option<f64>>> = BTreeMap::new();
    let mut sds: BTreeMap<&str, Vec<Option<f64>>> = BTreeMap::new();
    for name in &order {
        let rows = &rows_of[name];
        let first = rows[0];
        ds.push(text(df, first, "dataset")?);
        at.push(text(df, first, "attack")?);
        de.push(text(df, first, "defence")?);
        let listed: Vec<String> = rows
            .iter()
            .map(|&r| seed.get(r).map(|s| s.to_string()).unwrap_or_default())
            .collect();
        seeds.push(listed.join(" "));
        let evaluated: Vec<String> = rows
            .iter()
            .map(|&r| text(df, r, "evaluate_step"))
            .collect::<Result<_>>()?;
        keys.push(evaluated.join(" "));
        let mut computed = true;
        for &r in rows {
            computed &= value(df, r, "ca")?.is_some();
        }
        for m in METRIC_COLUMNS {
            let vals: Vec<f64> = rows
                .iter()
                .map(|&r| value(df, r, m))
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .flatten()
                .collect();
            let (mean, sd) = if computed && vals.len() == rows.len() {
                let n = vals.len() as f64;
                let mean = vals.iter().sum::<f64>() / n;
                // A cell planned with one seed only has no spread to show.
                let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
                (Some(mean), (rows.len() > 1).then(|| var.sqrt()))
            } else {
                (None, None)
            };
            means.entry(m).or_default().push(mean);
            sds.entry(m).or_default().push(sd);
        }
    }
    let mut columns: Vec<Column> = vec![
        Column::new("dataset".into(), ds),
        Column::new("attack".into(), at),
        Column::new("defence".into(), de),
    ];
    for m in METRIC_COLUMNS {
        columns.push(Column::new((*m).into(), means.remove(m).unwrap()));
    }
    for m in METRIC_COLUMNS {
        columns.push(Column::new(
            format!("{m}_sd").into(),
            sds.remove(m).unwrap(),
        ));
    }
    columns.push(Column::new("seeds".into(), seeds));
    columns.push(Column::new("evaluate_step".into(), keys));
    Ok(DataFrame::new_infer_height(columns)?)
}

/// The seeds a frame from [`aggregate_seeds`] folds together (`0, 1, 2`); `None` for one
/// row per cell.
fn aggregated_seeds(df: &DataFrame) -> Result<Option<String>> {
    if df.column("seeds").is_err() || df.height() == 0 {
        return Ok(None);
    }
    Ok(Some(text(df, 0, "seeds")?.replace(' ', ", ")))
}

/// The `pretrain` step of the plan that a step's model was finetuned from, if one trained it
/// (none when the checkpoint was imported). Each step's own `pretrain` input is searched
/// before its other inputs, so the answer is the evaluated model's checkpoint.
fn pretrain_of<'p>(by_key: &BTreeMap<&str, &'p crate::dag::Step>, step: &str) -> Option<&'p str> {
    let mut stack = vec![step.to_string()];
    let mut seen = std::collections::BTreeSet::new();
    while let Some(k) = stack.pop() {
        let Some(s) = by_key.get(k.as_str()).copied() else {
            continue;
        };
        if !seen.insert(k) {
            continue;
        }
        if s.kind == crate::dag::Kind::Pretrain {
            return Some(s.key.as_str());
        }
        // A finetune's `pretrain` input is the checkpoint its model starts from; its other
        // inputs (IEU's `stage1`, whose f_p is always cut from the ViT) are followed only
        // after it, so an f_r of another architecture reports its own checkpoint.
        let (own, other): (Vec<_>, Vec<_>) = s
            .inputs
            .iter()
            .partition(|(role, _)| role.as_str() == "pretrain");
        stack.extend(other.into_iter().map(|(_, k)| k.clone()));
        stack.extend(own.into_iter().map(|(_, k)| k.clone()));
    }
    None
}

/// The clean test accuracy and mean max-probability of a stored `pretrain` step (the
/// confidence is absent in checkpoints trained before it was recorded); `None` while it is
/// not stored.
fn checkpoint_quality(store: &Store, key: &str) -> Result<Option<(f64, Option<f64>)>> {
    if !store.contains(key) {
        return Ok(None);
    }
    let path = store.verified(key)?.join("train_log.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let log: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let acc = log.get("clean_test_accuracy").and_then(|v| v.as_f64());
    let conf = log.get("mean_max_probability").and_then(|v| v.as_f64());
    Ok(acc.map(|a| (a, conf)))
}

/// CSV with one row per grid cell; metrics as percentages with two decimals.
pub fn to_csv(df: &mut DataFrame) -> Result<String> {
    let mut buf = Vec::new();
    CsvWriter::new(&mut buf)
        .include_header(true)
        .with_float_precision(Some(2))
        .finish(df)?;
    Ok(String::from_utf8(buf)?)
}

/// A metric value as every format prints it: two decimals, exactly as `{:.2}` rounds
/// (so a value compares equal to its own CSV).
pub fn round2(v: f64) -> f64 {
    format!("{v:.2}").parse().unwrap_or(v)
}

fn value(df: &DataFrame, row: usize, metric: &str) -> Result<Option<f64>> {
    Ok(df.column(metric)?.f64()?.get(row))
}

/// A cell's name, `dataset/attack/defence`.
pub fn cell_name(df: &DataFrame, row: usize) -> Result<String> {
    Ok(format!(
        "{}/{}/{}",
        text(df, row, "dataset")?,
        text(df, row, "attack")?,
        text(df, row, "defence")?
    ))
}

/// Every metric value of the frame by cell name (values rounded as printed).
pub fn values_by_cell(df: &DataFrame) -> Result<BTreeMap<String, BTreeMap<String, f64>>> {
    let mut out = BTreeMap::new();
    for row in 0..df.height() {
        let mut vals = BTreeMap::new();
        for m in METRIC_COLUMNS {
            if let Some(v) = value(df, row, m)? {
                vals.insert(m.to_string(), round2(v));
            }
        }
        out.insert(cell_name(df, row)?, vals);
    }
    Ok(out)
}

#[derive(Serialize, Clone, Debug)]
pub struct CellKey {
    pub cell: String,
    pub key: String,
}

/// Every cell of the report with the key of the evaluate step it shows, and one key for
/// the whole report (blake3 of the cells and their keys): what `pull` needs to fetch
/// exactly these results.
pub fn provenance(df: &DataFrame) -> Result<(Vec<CellKey>, String)> {
    let mut cells = Vec::new();
    let mut h = blake3::Hasher::new();
    for row in 0..df.height() {
        let cell = cell_name(df, row)?;
        let key = text(df, row, "evaluate_step")?;
        h.update(cell.as_bytes());
        h.update(b"=");
        h.update(key.as_bytes());
        h.update(b"\n");
        cells.push(CellKey { cell, key });
    }
    Ok((cells, h.finalize().to_hex()[..16].to_string()))
}

fn text(df: &DataFrame, row: usize, col: &str) -> Result<String> {
    Ok(df
        .column(col)?
        .str()?
        .get(row)
        .unwrap_or_default()
        .to_string())
}

/// One value of the table.
#[derive(Serialize, Clone, Debug)]
pub struct TCell {
    /// The value as printed: two decimals, `–` where the metric does not apply to the
    /// defence, `…` where the cell has not been computed.
    pub text: String,
    pub value: Option<f64>,
    /// The reference value (e.g. the paper's), two decimals.
    pub reference: Option<String>,
    /// Signed difference to the compared baseline, two decimals (`+1.20`, `−0.35`).
    pub delta: Option<String>,
    pub best: bool,
    pub second: bool,
}

#[derive(Serialize, Clone, Debug)]
pub struct TRow {
    pub labels: Vec<String>,
    /// Whether this row starts a new outermost group (LaTeX rules, HTML borders).
    pub first_of_group: bool,
    pub cells: Vec<TCell>,
    pub average: bool,
}

/// What every format shows.
#[derive(Serialize, Debug)]
pub struct Table {
    pub name: String,
    pub title: String,
    pub spec: String,
    pub scale: String,
    pub backend: String,
    pub tool_version: String,
    pub row_axes: Vec<String>,
    pub groups: Vec<String>,
    pub metrics: Vec<String>,
    pub metric_titles: Vec<String>,
    pub rows: Vec<TRow>,
    pub missing: usize,
    pub reference: Option<String>,
    pub compare: Option<String>,
    pub gate_columns: bool,
    pub isolation_columns: bool,
    pub cells: Vec<CellKey>,
    pub report_key: String,
    /// The seeds each value is the mean of (`0, 1, 2`), when the report folds several.
    pub seeds: Option<String>,
}

/// A baseline to compare with: values by cell name and metric.
#[derive(Debug, Clone)]
pub struct Baseline {
    /// What it is (`base.csv`, `the paper's Table 3`, `store ../old`).
    pub source: String,
    pub cells: BTreeMap<String, BTreeMap<String, f64>>,
}

fn signed(d: f64) -> String {
    let d = round2(d);
    if d > 0.0 {
        format!("+{d:.2}")
    } else if d < 0.0 {
        format!("−{:.2}", -d)
    } else {
        "±0.00".into()
    }
}

/// Marks the best and second-best value of each metric across column groups in one row
/// (ties share the mark; values compare as printed).
fn mark_ranks(
    cells: &mut [TCell],
    groups: usize,
    metrics: &[String],
    best: &BTreeMap<String, Better>,
) {
    for (mi, m) in metrics.iter().enumerate() {
        let Some(rule) = best.get(m) else { continue };
        let mut present: Vec<f64> = (0..groups)
            .filter_map(|g| cells[g * metrics.len() + mi].value.map(round2))
            .collect();
        if present.len() < 2 {
            continue;
        }
        present.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if *rule == Better::Max {
            present.reverse();
        }
        present.dedup();
        let first = present[0];
        let second = present.get(1).copied();
        for g in 0..groups {
            let c = &mut cells[g * metrics.len() + mi];
            if let Some(v) = c.value.map(round2) {
                c.best = v == first;
                c.second = Some(v) == second;
            }
        }
    }
}

/// The table of `df` as the spec's `report:` section lays it out: rows = the row axes,
/// column groups = the column axis, the metrics under each group, an averages row per
/// outermost row group; with `baseline`, each value's delta against it.
pub fn build_table(
    df: &DataFrame,
    spec: &LoadedSpec,
    scale: &str,
    baseline: Option<&Baseline>,
) -> Result<Table> {
    let layout = &spec.spec.report;
    let grid = &spec.spec.grid;
    let groups: Vec<String> = grid.axis(&layout.columns).unwrap().clone();
    let metrics = &layout.metrics;
    let mut index: BTreeMap<(Vec<String>, String), usize> = BTreeMap::new();
    for r in 0..df.height() {
        let labels = layout
            .rows
            .iter()
            .map(|a| text(df, r, a))
            .collect::<Result<Vec<_>>>()?;
        index.insert((labels, text(df, r, &layout.columns)?), r);
    }
    let mut row_keys: Vec<Vec<String>> = vec![vec![]];
    for axis in &layout.rows {
        let vals = grid.axis(axis).unwrap();
        row_keys = row_keys
            .into_iter()
            .flat_map(|prefix| {
                vals.iter()
                    .map(move |v| [prefix.clone(), vec![v.clone()]].concat())
            })
            .collect();
    }
    let reference = layout.reference.as_ref();
    let seeds = aggregated_seeds(df)?;
    let outer = &layout.rows[0];
    let mut rows = Vec::new();
    let mut missing = 0usize;
    for ov in grid.axis(outer).unwrap() {
        // Per column group and metric: the values (and baseline values) of this outer
        // group, for its averages row.
        let mut sums: BTreeMap<(usize, usize), (Vec<f64>, Vec<f64>)> = BTreeMap::new();
        // Metrics that do not apply to a column (the gate's columns under no defence): their
        // average is `–` too, not `…` (not yet computed).
        let mut not_applicable: std::collections::BTreeSet<(usize, usize)> = Default::default();
        for (li, labels) in row_keys.iter().filter(|l| &l[0] == ov).enumerate() {
            let mut cells = Vec::new();
            for (gi, g) in groups.iter().enumerate() {
                let r = index.get(&(labels.clone(), g.clone())).copied();
                let name = cell_key(&layout.rows, labels, &layout.columns, g);
                for (mi, m) in metrics.iter().enumerate() {
                    let run = match r {
                        Some(r) => value(df, r, "ca")?.is_some(),
                        None => false,
                    };
                    let v = match r {
                        Some(r) => value(df, r, m)?,
                        None => None,
                    };
                    let sd = match (r, &seeds) {
                        (Some(r), Some(_)) => value(df, r, &format!("{m}_sd"))?,
                        _ => None,
                    };
                    let text = match (v, run) {
                        (Some(v), _) => match sd {
                            Some(sd) => format!("{v:.2} ± {sd:.2}"),
                            None => format!("{v:.2}"),
                        },
                        (None, true) => {
                            not_applicable.insert((gi, mi));
                            "–".into()
                        }
                        (None, false) => {
                            missing += 1;
                            "…".into()
                        }
                    };
                    let refv = reference
                        .and_then(|refs| refs.cells.get(&name))
                        .and_then(|c| c.get(m))
                        .map(|rv| format!("{rv:.2}"));
                    let base = baseline
                        .and_then(|b| b.cells.get(&name))
                        .and_then(|c| c.get(m));
                    let delta = match (v, base) {
                        (Some(v), Some(b)) => Some(signed(round2(v) - b)),
                        _ => None,
                    };
                    if let Some(v) = v {
                        let e = sums.entry((gi, mi)).or_default();
                        e.0.push(v);
                        if let Some(b) = base {
                            e.1.push(round2(v) - b);
                        }
                    }
                    cells.push(TCell {
                        text,
                        value: v,
                        reference: refv,
                        delta,
                        best: false,
                        second: false,
                    });
                }
            }
            mark_ranks(&mut cells, groups.len(), metrics, &layout.best);
            rows.push(TRow {
                labels: labels.clone(),
                first_of_group: li == 0,
                cells,
                average: false,
            });
        }
        if layout.average {
            let mut cells = Vec::new();
            for gi in 0..groups.len() {
                for mi in 0..metrics.len() {
                    let (vals, deltas) = sums.get(&(gi, mi)).cloned().unwrap_or_default();
                    let mean =
                        |x: &[f64]| (!x.is_empty()).then(|| x.iter().sum::<f64>() / x.len() as f64);
                    let v = mean(&vals);
                    cells.push(TCell {
                        text: match v {
                            Some(v) => format!("{v:.2}"),
                            None if not_applicable.contains(&(gi, mi)) => "–".into(),
                            None => "…".into(),
                        },
                        value: v,
                        reference: None,
                        delta: mean(&deltas).map(signed),
                        best: false,
                        second: false,
                    });
                }
            }
            mark_ranks(&mut cells, groups.len(), metrics, &layout.best);
            let mut labels = vec![ov.clone()];
            labels.extend(std::iter::repeat_n(String::new(), layout.rows.len() - 1));
            labels[layout.rows.len() - 1] = "Average".into();
            rows.push(TRow {
                labels,
                first_of_group: false,
                cells,
                average: true,
            });
        }
    }
    let (cells, report_key) = provenance(df)?;
    Ok(Table {
        name: spec.spec.name.clone(),
        title: spec.spec.title.clone(),
        spec: spec.origin.clone(),
        scale: scale.to_string(),
        backend: crate::backend_name().to_string(),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        row_axes: layout.rows.clone(),
        groups,
        metrics: metrics.clone(),
        metric_titles: metrics
            .iter()
            .map(|m| metric_title(m).to_string())
            .collect(),
        rows,
        missing,
        reference: reference.map(|r| r.source.clone()),
        compare: baseline.map(|b| b.source.clone()),
        gate_columns: metrics.iter().any(|m| m.ends_with("_flagged")),
        isolation_columns: metrics.iter().any(|m| m == "fpr" || m == "fnr"),
        cells,
        report_key,
        seeds,
    })
}

/// Escapes text for LaTeX.
fn latex_escape(s: String) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\textbackslash{}"),
            '&' | '%' | '$' | '#' | '_' | '{' | '}' => {
                out.push('\\');
                out.push(c);
            }
            '~' => out.push_str("\\textasciitilde{}"),
            '^' => out.push_str("\\textasciicircum{}"),
            '–' => out.push_str("--"),
            '…' => out.push_str("\\dots{}"),
            '−' => out.push('-'),
            '±' => out.push_str("$\\pm$"),
            '²' => out.push_str("$^2$"),
            _ => out.push(c),
        }
    }
    out
}

/// The paper's spelling of the grid's names (`ibau` → I-BAU, `cifar10` → CIFAR-10); other
/// names (variants, a user's datasets) are shown as written.
pub fn display_name(name: String) -> String {
    let known = match name.as_str() {
        "none" => "No defence",
        "ieu" => "IEU",
        "abl" => "ABL",
        "ibau" => "I-BAU",
        "attnblock" => "AttnBlock",
        "cifar10" => "CIFAR-10",
        "gtsrb" => "GTSRB",
        "tinyimagenet" => "Tiny-ImageNet",
        "synthetic" => "Synthetic",
        "badnets-white" => "BadNets-White",
        "badnets-pattern" => "BadNets-Pattern",
        "issba" => "ISSBA",
        "batt" => "BATT",
        "blended" => "Blended",
        "trojan-wm" => "Trojan-WM",
        "trojan-sq" => "Trojan-SQ",
        "smooth" => "Smooth",
        "l0-inv" => "l0-inv",
        "l2-inv" => "l2-inv",
        "sig" => "SIG",
        "wanet" => "WaNet",
        _ => return name,
    };
    known.to_string()
}

fn environment() -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.add_filter("latex", latex_escape);
    env.add_filter("display", display_name);
    env.add_template("table.md", TABLE_TEMPLATE)?;
    env.add_template("table.tex", LATEX_TEMPLATE)?;
    // `.html`: minijinja escapes every value (auto-escape by extension).
    env.add_template("report.html", HTML_TEMPLATE)?;
    Ok(env)
}

/// Markdown mirroring the paper's table (best bold, second best underlined).
pub fn to_markdown(table: &Table) -> Result<String> {
    let env = environment()?;
    env.get_template("table.md")?
        .render(context! { t => table })
        .context("rendering the markdown report")
}

/// A booktabs table ready to `\input` (needs `\usepackage{booktabs}`).
pub fn to_latex(table: &Table) -> Result<String> {
    let env = environment()?;
    env.get_template("table.tex")?
        .render(context! { t => table })
        .context("rendering the LaTeX report")
}

/// A figure embedded in the HTML report.
#[derive(Serialize)]
pub struct HtmlFigure {
    pub title: String,
    /// SVG markup (inlined as is) or a PNG as a data URI.
    pub svg: Option<String>,
    pub png_data_uri: Option<String>,
}

/// One standalone HTML page: the table, the figures, the provenance.
pub fn to_html(table: &Table, figures: &[HtmlFigure]) -> Result<String> {
    let env = environment()?;
    let svgs: Vec<minijinja::Value> = figures
        .iter()
        .map(|f| {
            context! {
                title => &f.title,
                svg => f.svg.clone().map(minijinja::Value::from_safe_string),
                // base64 and `data:image/png;base64,`: nothing to escape.
                png => f.png_data_uri.clone().map(minijinja::Value::from_safe_string),
            }
        })
        .collect();
    env.get_template("report.html")?
        .render(context! { t => table, figures => svgs })
        .context("rendering the HTML report")
}

/// Column title of a metric.
pub fn metric_title(m: &str) -> &'static str {
    match m {
        "asr" => "ASR",
        "ca" => "CA",
        "fpr" => "FPR",
        "fnr" => "FNR",
        "poison_flagged" => "Poison",
        "clean_flagged" => "Clean",
        "ca_unseen" => "CA (unseen)",
        "unlearn_steps" => "Unlearn steps",
        "unlearn_factor" => "Eq. 3 factor",
        "unlearn_loss" => "Unlearn loss",
        "pretrain_accuracy" => "Checkpoint acc.",
        "pretrain_confidence" => "Checkpoint conf.",
        // The spec checks metric names against `spec::METRICS` before a report is built.
        _ => "?",
    }
}

pub fn cell_key(row_axes: &[String], labels: &[String], col_axis: &str, group: &str) -> String {
    // Always dataset/attack/defence order.
    let mut parts = BTreeMap::new();
    for (a, l) in row_axes.iter().zip(labels) {
        parts.insert(a.as_str(), l.as_str());
    }
    parts.insert(col_axis, group);
    format!(
        "{}/{}/{}",
        parts["dataset"], parts["attack"], parts["defence"]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IEU with f_r of another architecture: the evaluated model's checkpoint is f_r's
    /// (`pretrain` input of its finetune), not the ViT that f_p is cut from.
    #[test]
    fn checkpoint_column_follows_the_evaluated_model() {
        use crate::spec::{DEFAULT_SCALES, LoadedSpec, load_scale, plan};
        let spec = LoadedSpec::from_str(
            r#"
name: t
title: T
variants: { ieu-vgg11: { base: ieu, model: vgg11 } }
grid: { dataset: [synthetic], attack: [badnets-white], defence: [ieu, ieu-vgg11] }
report: { rows: [dataset, attack], columns: defence, metrics: [asr, ca] }
"#,
            "t.yaml",
            ".".into(),
        )
        .unwrap();
        let scale = load_scale(DEFAULT_SCALES, "scales.yaml", "smoke").unwrap();
        let p = plan::plan(&spec, &scale, None).unwrap();
        let by_key: BTreeMap<&str, &crate::dag::Step> =
            p.steps.iter().map(|s| (s.key.as_str(), s)).collect();
        let checkpoint = |defence: &str| {
            let cell = p.cells.iter().find(|c| c.defence == defence).unwrap();
            by_key[pretrain_of(&by_key, &cell.evaluate).unwrap()]
                .label
                .clone()
        };
        assert_eq!(checkpoint("ieu"), "pretrain synthetic");
        assert_eq!(checkpoint("ieu-vgg11"), "pretrain synthetic vgg11");
    }

    /// A collected frame: (defence, seed, asr, ca) rows of one dataset and attack, the
    /// other metrics null.
    fn frame(rows: &[(&str, u64, Option<f64>, Option<f64>)]) -> DataFrame {
        let n = rows.len();
        let mut columns = vec![
            Column::new("dataset".into(), vec!["synthetic"; n]),
            Column::new("attack".into(), vec!["blended"; n]),
            Column::new(
                "defence".into(),
                rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            ),
        ];
        for m in METRIC_COLUMNS {
            let v: Vec<Option<f64>> = rows
                .iter()
                .map(|r| match *m {
                    "asr" => r.2,
                    "ca" => r.3,
                    _ => None,
                })
                .collect();
            columns.push(Column::new((*m).into(), v));
        }
        columns.push(Column::new(
            "seed".into(),
            rows.iter().map(|r| r.1).collect::<Vec<_>>(),
        ));
        columns.push(Column::new(
            "evaluate_step".into(),
            rows.iter()
                .map(|r| format!("k{}{}", r.0, r.1))
                .collect::<Vec<_>>(),
        ));
        DataFrame::new_infer_height(columns).unwrap()
    }

    #[test]
    fn seeds_fold_into_mean_and_standard_deviation() {
        let df = frame(&[
            ("none", 0, Some(90.0), Some(80.0)),
            ("ieu", 0, Some(2.0), Some(78.0)),
            ("none", 1, Some(96.0), Some(84.0)),
            ("ieu", 1, Some(4.0), None),
        ]);
        let agg = aggregate_seeds(&df).unwrap();
        assert_eq!(agg.height(), 2);
        assert_eq!(cell_name(&agg, 0).unwrap(), "synthetic/blended/none");
        assert_eq!(value(&agg, 0, "asr").unwrap(), Some(93.0));
        assert_eq!(value(&agg, 0, "ca").unwrap(), Some(82.0));
        // Sample standard deviation: sqrt(((90 − 93)² + (96 − 93)²) / 1).
        let sd = value(&agg, 0, "asr_sd").unwrap().unwrap();
        assert!((sd - 18f64.sqrt()).abs() < 1e-12, "{sd}");
        assert_eq!(text(&agg, 0, "seeds").unwrap(), "0 1");
        assert_eq!(text(&agg, 0, "evaluate_step").unwrap(), "knone0 knone1");
        // Seed 1 of IEU has no CA yet: no mean over one seed of two.
        assert_eq!(value(&agg, 1, "asr").unwrap(), None);
        assert_eq!(value(&agg, 1, "ca").unwrap(), None);
        assert_eq!(aggregated_seeds(&agg).unwrap().as_deref(), Some("0, 1"));
        // One seed per cell: nothing to fold.
        let one = frame(&[("none", 3, Some(90.0), Some(80.0))]);
        let same = aggregate_seeds(&one).unwrap();
        assert!(same.equals_missing(&one));
        assert_eq!(aggregated_seeds(&same).unwrap(), None);
    }

    #[test]
    fn every_metric_has_its_own_column_title() {
        let titles: std::collections::BTreeSet<&str> = crate::spec::METRICS
            .iter()
            .map(|m| super::metric_title(m))
            .collect();
        assert_eq!(titles.len(), crate::spec::METRICS.len(), "{titles:?}");
        assert!(!titles.contains("?"), "{titles:?}");
    }
}
