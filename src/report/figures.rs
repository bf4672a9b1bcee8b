//! Figures, rendered with `plotters` as SVG and PNG (text in DejaVu Sans, embedded, so no
//! system font is needed):
//! - the paper's confidence figures (Figures 2, 3 and 6): for each panel (a grid cell), the
//!   CDFs of f_p's maximum class probability max σ(f_p(x)) on the clean and on the poisoned
//!   finetuning images, a dotted vertical line at c_thresh and dotted horizontal lines at
//!   the share of each below it, read from the stage-1 step's `confidences.json`;
//! - Eq. 3 over stage 2 (`kind: unlearn_rate`, a figure the paper does not have): per
//!   unlearned batch, the factor lr_ul / lr_tune, the unlearning loss ℓ_k and the batch's
//!   poisoned share, read from the IEU finetune step's `unlearn_trace`, with the factor's
//!   0.2 floor and the loss √2·ln(5.8·N_c) at which the factor reaches it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Once;

use anyhow::{Result, anyhow, bail};
use plotters::prelude::*;

use crate::dag::Plan;
use crate::defences::ieu::{Confidences, UnlearnRecord};
use crate::spec::{FigureKind, FigureSpec};
use crate::store::Store;

/// One panel's data.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub clean: Vec<f64>,
    pub poisoned: Vec<f64>,
    /// `unlearn_rate` figures: the stage-2 trace, and the dataset's number of classes.
    pub trace: Vec<UnlearnRecord>,
    pub classes: usize,
}

/// Percent of `values` at or below `t`.
pub fn pct_below(values: &[f64], t: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    100.0 * values.iter().filter(|&&v| v <= t).count() as f64 / values.len() as f64
}

/// The panels of a figure from the stage-1 steps of its cells (which must be stored).
pub fn panels(fig: &FigureSpec, plan: &Plan, store: &Store) -> Result<Vec<Panel>> {
    let by_key: HashMap<&str, &crate::dag::Step> =
        plan.steps.iter().map(|s| (s.key.as_str(), s)).collect();
    let mut out = Vec::new();
    for p in &fig.panels {
        // Panels of cells left out of the plan (`--only`, data not found) are left out.
        let Some(cell) = plan
            .cells
            .iter()
            .find(|c| c.dataset == p.dataset && c.attack == p.attack && c.defence == p.defence)
        else {
            eprintln!(
                "note: figure {}: panel {}/{}/{} left out (not in the plan)",
                fig.name, p.dataset, p.attack, p.defence
            );
            continue;
        };
        let mut title = p
            .title
            .clone()
            .unwrap_or_else(|| format!("{} / {}", p.dataset, p.attack));
        // A figure draws one run: with several seeds, the first seed's, and says so.
        if plan.seeds().len() > 1 {
            title = format!("{title} (seed {})", cell.seed);
        }
        if fig.kind == FigureKind::UnlearnRate {
            out.push(trace_panel(fig, cell, &by_key, store, title)?);
            continue;
        }
        let stage1 = by_key
            .get(cell.evaluate.as_str())
            .and_then(|e| e.inputs.get("finetune"))
            .and_then(|f| by_key.get(f.as_str()))
            .and_then(|f| f.inputs.get("stage1"))
            .ok_or_else(|| {
                anyhow!(
                    "figure {}: defence {} of {}/{} has no stage-1 f_p",
                    fig.name,
                    p.defence,
                    p.dataset,
                    p.attack
                )
            })?;
        if !store.contains(stage1) {
            bail!(
                "figure {}: the stage-1 step of {}/{}/{} ({}) is not computed yet: run the spec first",
                fig.name,
                p.dataset,
                p.attack,
                p.defence,
                &stage1[..12]
            );
        }
        let c = Confidences::load(&store.verified(stage1)?)?;
        let (mut clean, mut poisoned) = (Vec::new(), Vec::new());
        for (v, &is_p) in c.max_prob.iter().zip(&c.poisoned) {
            if is_p {
                poisoned.push(*v as f64);
            } else {
                clean.push(*v as f64);
            }
        }
        out.push(Panel {
            title,
            clean,
            poisoned,
            trace: Vec::new(),
            classes: 0,
        });
    }
    if out.is_empty() {
        bail!("figure {}: none of its panels is in the plan", fig.name);
    }
    Ok(out)
}

/// The stage-2 trace of a cell's IEU finetune step.
fn trace_panel(
    fig: &FigureSpec,
    cell: &crate::dag::Cell,
    by_key: &HashMap<&str, &crate::dag::Step>,
    store: &Store,
    title: String,
) -> Result<Panel> {
    let ft = by_key
        .get(cell.evaluate.as_str())
        .and_then(|e| e.inputs.get("finetune"))
        .ok_or_else(|| anyhow!("figure {}: cell has no finetune step", fig.name))?;
    if !store.contains(ft) {
        bail!(
            "figure {}: the finetune step of {}/{}/{} ({}) is not computed yet: run the spec first",
            fig.name,
            cell.dataset,
            cell.attack,
            cell.defence,
            &ft[..12]
        );
    }
    let dir = store.verified(ft)?;
    #[derive(serde::Deserialize)]
    struct Stats {
        #[serde(default)]
        unlearn_trace: Vec<UnlearnRecord>,
    }
    let stats: Stats =
        serde_json::from_str(&std::fs::read_to_string(dir.join("train_stats.json"))?)?;
    let classes = crate::models::net::load_net_config(&dir)?.vit.num_classes;
    if stats.unlearn_trace.is_empty() {
        bail!(
            "figure {}: {}/{}/{} unlearned nothing (or is not an IEU cell)",
            fig.name,
            cell.dataset,
            cell.attack,
            cell.defence
        );
    }
    Ok(Panel {
        title,
        clean: Vec::new(),
        poisoned: Vec::new(),
        trace: stats.unlearn_trace,
        classes,
    })
}

/// The loss ℓ at which Eq. 3's factor reaches its 0.2 floor: 6 − exp(ℓ/√2)/N_c = 0.2.
pub fn floor_loss(classes: usize) -> f64 {
    std::f64::consts::SQRT_2 * (5.8 * classes as f64).ln()
}

/// The trace of an `unlearn_rate` figure's panels as CSV (one row per unlearned batch).
pub fn trace_csv(panels: &[Panel]) -> String {
    let mut out = String::from(
        "panel,step,epoch,iter,k,prev_loss,factor,lr_tune,lr_ul,loss,poisoned_fraction\n",
    );
    for p in panels {
        for (i, r) in p.trace.iter().enumerate() {
            out.push_str(&format!(
                "{},{i},{},{},{},{},{},{},{},{},{}\n",
                p.title.replace(',', ";"),
                r.epoch,
                r.iter,
                r.k,
                r.prev_loss.map(|v| v.to_string()).unwrap_or_default(),
                r.factor,
                r.lr_tune,
                r.lr_ul,
                r.loss,
                r.poisoned_fraction
            ));
        }
    }
    out
}

fn draw_trace<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    p: &Panel,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the figure: {e:?}");
    let n = p.trace.len();
    let floor = floor_loss(p.classes);
    let ymax = p
        .trace
        .iter()
        .map(|r| r.loss)
        .fold(floor, f64::max)
        .max(6.0)
        * 1.05;
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..n.max(1) as f64, 0f64..ymax)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("unlearned batch")
        .y_desc("factor lr_ul / lr_tune; loss ℓ_k")
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 13))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(e)?;
    let series = |f: fn(&UnlearnRecord) -> f64| -> Vec<(f64, f64)> {
        p.trace
            .iter()
            .enumerate()
            .map(|(i, r)| (i as f64, f(r)))
            .collect()
    };
    let scaled_share = move |r: &UnlearnRecord| r.poisoned_fraction * 6.0;
    for (label, pts, color) in [
        ("factor (Eq. 3)", series(|r| r.factor), CLEAN),
        ("unlearning loss ℓ_k", series(|r| r.loss), POISON),
        (
            "poisoned share of the batch (× 6)",
            p.trace
                .iter()
                .enumerate()
                .map(|(i, r)| (i as f64, scaled_share(r)))
                .collect(),
            RGBColor(44, 160, 44),
        ),
    ] {
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(e)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    for (y, text) in [
        (0.2, "factor floor 0.2".to_string()),
        (floor, format!("ℓ = √2·ln(5.8·{}) = {floor:.2}", p.classes)),
    ] {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, y), (n as f64, y)],
                4,
                4,
                BLACK.stroke_width(1),
            ))
            .map_err(e)?;
        chart
            .draw_series(std::iter::once(Text::new(
                text,
                (n as f64 * 0.02, y + ymax * 0.015),
                ("sans-serif", 11),
            )))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 12))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(e)?;
    Ok(())
}

fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
        let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold());
    });
}

/// Empirical CDF points (value, fraction ≤ value), at most ~400 of them.
fn cdf(values: &[f64]) -> Vec<(f64, f64)> {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n == 0 {
        return Vec::new();
    }
    let step = (n / 400).max(1);
    let mut pts = vec![(0.0, 0.0)];
    for i in (0..n).step_by(step).chain([n - 1]) {
        pts.push((v[i], (i + 1) as f64 / n as f64));
    }
    pts.push((1.0, 1.0));
    pts
}

const CLEAN: RGBColor = RGBColor(31, 119, 180);
const POISON: RGBColor = RGBColor(214, 39, 40);

/// The figure title's font size: 20 px, or smaller (down to 11 px) until the title fits the
/// figure's width with a margin, so a long title is not cut off at both edges.
fn title_font_size<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
) -> f64 {
    let width = root.dim_in_pixel().0;
    let fits = |size: f64| {
        let font = ("sans-serif", size).into_font().style(FontStyle::Bold);
        root.estimate_text_size(title, &font.into())
            .map(|(w, _)| w + 24 <= width)
            .unwrap_or(true)
    };
    let mut size = 20.0;
    while size > 11.0 && !fits(size) {
        size -= 1.0;
    }
    size
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    c_thresh: f64,
    panels: &[Panel],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the figure: {e:?}");
    root.fill(&WHITE).map_err(e)?;
    let size = title_font_size(&root, title);
    let root = root
        .titled(
            title,
            ("sans-serif", size).into_font().style(FontStyle::Bold),
        )
        .map_err(e)?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (area, p) in areas.iter().zip(panels) {
        if !p.trace.is_empty() {
            draw_trace(area, p)?;
            continue;
        }
        let mut chart = ChartBuilder::on(area)
            .caption(&p.title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("max σ(f_p(x))")
            .y_desc("fraction of images ≤ x")
            .label_style(("sans-serif", 12))
            .axis_desc_style(("sans-serif", 13))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(e)?;
        for (label, values, color) in [
            ("clean", &p.clean, CLEAN),
            ("poisoned", &p.poisoned, POISON),
        ] {
            let below = pct_below(values, c_thresh);
            chart
                .draw_series(LineSeries::new(cdf(values), color.stroke_width(2)))
                .map_err(e)?
                .label(format!(
                    "{label} ({} images): {below:.1}% ≤ {c_thresh}",
                    values.len()
                ))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            let y = below / 100.0;
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(0.0, y), (c_thresh, y)],
                    4,
                    4,
                    color.stroke_width(1),
                ))
                .map_err(e)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{below:.1}%"),
                    // Beside the threshold line, where the dotted line meets it.
                    ((c_thresh - 0.16).max(0.0), (y + 0.045).min(0.99)),
                    ("sans-serif", 12).into_font().color(&color),
                )))
                .map_err(e)?;
        }
        chart
            .draw_series(DashedLineSeries::new(
                vec![(c_thresh, 0.0), (c_thresh, 1.0)],
                3,
                3,
                BLACK.stroke_width(1),
            ))
            .map_err(e)?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 12))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(e)?;
    }
    root.present().map_err(e)?;
    Ok(())
}

fn size(panels: &[Panel]) -> (u32, u32) {
    // Wide enough for the title over a single panel.
    ((480 * panels.len().max(1) as u32).max(720), 420)
}

/// The figure as SVG markup.
pub fn svg(fig: &FigureSpec, panels: &[Panel]) -> Result<String> {
    register_fonts();
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, size(panels)).into_drawing_area();
        draw(root, &fig.title, fig.c_thresh, panels)?;
    }
    Ok(out)
}

/// The figure as PNG bytes.
pub fn png(fig: &FigureSpec, panels: &[Panel]) -> Result<Vec<u8>> {
    register_fonts();
    let (w, h) = size(panels);
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        draw(root, &fig.title, fig.c_thresh, panels)?;
    }
    let img = image::RgbImage::from_raw(w, h, rgb).ok_or_else(|| anyhow!("bad figure buffer"))?;
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)?;
    Ok(png.into_inner())
}

/// Writes `<dir>/<name>.svg` and `<dir>/<name>.png` (atomically); returns the SVG.
pub fn write(fig: &FigureSpec, panels: &[Panel], dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    let s = svg(fig, panels)?;
    crate::store::write_atomic(&dir.join(format!("{}.svg", fig.name)), s.as_bytes())?;
    crate::store::write_atomic(&dir.join(format!("{}.png", fig.name)), &png(fig, panels)?)?;
    if fig.kind == FigureKind::UnlearnRate {
        crate::store::write_atomic(
            &dir.join(format!("{}.csv", fig.name)),
            trace_csv(panels).as_bytes(),
        )?;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn title_width(size: f64, title: &str) -> u32 {
        let mut buf = vec![0u8; 720 * 420 * 3];
        let root = BitMapBackend::with_buffer(&mut buf, (720, 420)).into_drawing_area();
        let font = ("sans-serif", size).into_font().style(FontStyle::Bold);
        root.estimate_text_size(title, &font.into()).unwrap().0
    }

    #[test]
    fn a_long_title_shrinks_to_the_figure_width_and_a_short_one_does_not() {
        register_fonts();
        let long = "Eq. 3 over IEU's stage 2 on BadNets-white: factor lr_ul / lr_tune and \
                    unlearning loss per unlearned batch";
        let short = "max σ(f_p(x)) CDF, ISSBA on GTSRB";
        let mut buf = vec![0u8; 720 * 420 * 3];
        let root = BitMapBackend::with_buffer(&mut buf, (720, 420)).into_drawing_area();
        // At the default 20 px the long title is wider than the figure: it would be cut off.
        assert!(title_width(20.0, long) > 720);
        let size = title_font_size(&root, long);
        assert!((11.0..20.0).contains(&size), "size {size}");
        assert!(title_width(size, long) + 24 <= 720);
        assert_eq!(title_font_size(&root, short), 20.0);
    }
}
