//! Reports: Polars collects the metrics of every grid cell; minijinja renders the tables.

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

/// Metric columns of the collected frame, in order.
pub const METRIC_COLUMNS: &[&str] = crate::spec::METRICS;

/// One row per grid cell: dataset, attack, defence, the metrics (null where the cell has not
/// been run) and the key of the evaluate step.
pub fn collect(plan: &Plan, store: &Store) -> Result<DataFrame> {
    let mut ds = Vec::new();
    let mut at = Vec::new();
    let mut de = Vec::new();
    let mut keys = Vec::new();
    let mut cols: BTreeMap<&str, Vec<Option<f64>>> =
        METRIC_COLUMNS.iter().map(|m| (*m, Vec::new())).collect();
    for cell in &plan.cells {
        ds.push(cell.dataset.clone());
        at.push(cell.attack.clone());
        de.push(cell.defence.clone());
        keys.push(cell.evaluate.clone());
        // Verified read: a metrics file that does not match its manifest is an error (and
        // quarantined), never a number in a table.
        let m = if store.contains(&cell.evaluate) {
            Some(Metrics::load(&store.verified(&cell.evaluate)?)?)
        } else {
            None
        };
        for name in METRIC_COLUMNS {
            cols.get_mut(name)
                .unwrap()
                .push(m.as_ref().and_then(|m| m.get(name)));
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
    columns.push(Column::new("evaluate_step".into(), keys));
    Ok(DataFrame::new_infer_height(columns)?)
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

fn value(df: &DataFrame, row: usize, metric: &str) -> Result<Option<f64>> {
    Ok(df.column(metric)?.f64()?.get(row))
}

#[derive(Serialize)]
struct CellKey {
    cell: String,
    key: String,
}

/// Every cell of the report with the key of the evaluate step it shows, and one key for
/// the whole report (blake3 of the cells and their keys): what `pull` needs to fetch
/// exactly these results.
fn provenance(df: &DataFrame) -> Result<(Vec<CellKey>, String)> {
    let mut cells = Vec::new();
    let mut h = blake3::Hasher::new();
    for row in 0..df.height() {
        let cell = format!(
            "{}/{}/{}",
            text(df, row, "dataset")?,
            text(df, row, "attack")?,
            text(df, row, "defence")?
        );
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

#[derive(Serialize)]
struct Value {
    text: String,
    bold: bool,
}

#[derive(Serialize)]
struct Row {
    labels: Vec<String>,
    values: Vec<Value>,
    average: bool,
}

/// Marks the best value of each metric across column groups in one row.
fn mark_best(
    values: &mut [Value],
    raw: &[Option<f64>],
    groups: usize,
    metrics: &[String],
    best: &BTreeMap<String, Better>,
) {
    for (mi, m) in metrics.iter().enumerate() {
        let Some(rule) = best.get(m) else { continue };
        let present: Vec<f64> = (0..groups)
            .filter_map(|g| raw[g * metrics.len() + mi])
            .collect();
        if present.len() < 2 {
            continue;
        }
        let target = match rule {
            Better::Min => present.iter().cloned().fold(f64::INFINITY, f64::min),
            Better::Max => present.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        };
        for g in 0..groups {
            let i = g * metrics.len() + mi;
            if let Some(v) = raw[i] {
                if format!("{v:.2}") == format!("{target:.2}") {
                    values[i].bold = true;
                }
            }
        }
    }
}

/// Markdown mirroring the paper's table: rows = the spec's row axes, column groups = the
/// column axis, metrics under each group, an averages row per outermost row group, best
/// values bold.
pub fn to_markdown(df: &DataFrame, spec: &LoadedSpec, scale: &str) -> Result<String> {
    let layout = &spec.spec.report;
    let grid = &spec.spec.grid;
    let groups: Vec<String> = grid.axis(&layout.columns).unwrap().clone();
    let metrics = &layout.metrics;
    // Index the frame by (row labels, column group).
    let mut index: BTreeMap<(Vec<String>, String), usize> = BTreeMap::new();
    for r in 0..df.height() {
        let labels = layout
            .rows
            .iter()
            .map(|a| text(df, r, a))
            .collect::<Result<Vec<_>>>()?;
        index.insert((labels, text(df, r, &layout.columns)?), r);
    }
    // Row label tuples in grid order.
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
    // Averages per outermost row group and column group, computed by Polars over the cells
    // that have values.
    let outer = &layout.rows[0];
    let mut averages: BTreeMap<(String, String), BTreeMap<String, f64>> = BTreeMap::new();
    if layout.average {
        for ov in grid.axis(outer).unwrap() {
            for g in &groups {
                let mask = df.column(outer)?.str()?.equal(ov.as_str())
                    & df.column(&layout.columns)?.str()?.equal(g.as_str());
                let part = df.filter(&mask)?;
                let mut vals = BTreeMap::new();
                for m in metrics {
                    if let Some(v) = part.column(m)?.f64()?.mean() {
                        vals.insert(m.clone(), v);
                    }
                }
                averages.insert((ov.clone(), g.clone()), vals);
            }
        }
    }
    let reference = layout.reference.as_ref();
    let mut rows = Vec::new();
    let mut missing = 0usize;
    let outer_values = grid.axis(outer).unwrap();
    for ov in outer_values {
        for labels in row_keys.iter().filter(|l| &l[0] == ov) {
            let mut raw = Vec::new();
            let mut values = Vec::new();
            for g in &groups {
                let r = index.get(&(labels.clone(), g.clone())).copied();
                for m in metrics {
                    // A cell not yet run shows "…"; a metric that does not apply to the
                    // defence (e.g. gate statistics without IEU) shows "–".
                    let run = r
                        .map(|r| {
                            df.column("ca")
                                .and_then(|c| c.f64().map(|c| c.get(r).is_some()))
                        })
                        .transpose()?
                        .unwrap_or(false);
                    let v = match r {
                        Some(r) => value(df, r, m)?,
                        None => None,
                    };
                    let mut text = match (v, run) {
                        (Some(v), _) => format!("{v:.2}"),
                        (None, true) => "–".into(),
                        (None, false) => {
                            missing += 1;
                            "…".into()
                        }
                    };
                    if let Some(refs) = reference {
                        let cell_key = cell_key(&layout.rows, labels, &layout.columns, g);
                        if let Some(rv) = refs.cells.get(&cell_key).and_then(|c| c.get(m)) {
                            text = format!("{text} ({rv:.2})");
                        }
                    }
                    raw.push(v);
                    values.push(Value { text, bold: false });
                }
            }
            mark_best(&mut values, &raw, groups.len(), metrics, &layout.best);
            rows.push(Row {
                labels: labels.clone(),
                values,
                average: false,
            });
        }
        if layout.average {
            let mut raw = Vec::new();
            let mut values = Vec::new();
            for g in &groups {
                for m in metrics {
                    let v = averages
                        .get(&(ov.clone(), g.clone()))
                        .and_then(|a| a.get(m))
                        .copied();
                    raw.push(v);
                    values.push(Value {
                        text: v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "–".into()),
                        bold: false,
                    });
                }
            }
            mark_best(&mut values, &raw, groups.len(), metrics, &layout.best);
            let mut labels = vec![ov.clone()];
            labels.extend(std::iter::repeat_n(String::new(), layout.rows.len() - 1));
            labels[layout.rows.len() - 1] = "Average".into();
            rows.push(Row {
                labels,
                values,
                average: true,
            });
        }
    }
    let (cells, report_key) = provenance(df)?;
    let mut env = Environment::new();
    env.add_template("table", TABLE_TEMPLATE)?;
    let tmpl = env.get_template("table")?;
    let out = tmpl
        .render(context! {
            title => &spec.spec.title,
            spec => &spec.origin,
            scale => scale,
            row_axes => &layout.rows,
            groups => &groups,
            metrics => metrics.iter().map(|m| metric_title(m)).collect::<Vec<_>>(),
            rows => rows,
            missing => missing,
            reference => reference.map(|r| r.source.clone()),
            gate_columns => metrics.iter().any(|m| m.ends_with("_flagged")),
            isolation_columns => metrics.iter().any(|m| m == "fpr" || m == "fnr"),
            backend => crate::backend_name(),
            cells => cells,
            report_key => report_key,
        })
        .context("rendering the markdown report")?;
    Ok(out)
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
        _ => "Unlearn steps",
    }
}

fn cell_key(row_axes: &[String], labels: &[String], col_axis: &str, group: &str) -> String {
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
