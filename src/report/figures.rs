//! The paper's confidence figures (Figures 2, 3 and 6): for each panel (a grid cell), the
//! CDFs of f_p's maximum class probability max σ(f_p(x)) on the clean and on the poisoned
//! finetuning images, a dotted vertical line at c_thresh and dotted horizontal lines at
//! the share of each below it, read from the stage-1 step's `confidences.json`. Rendered
//! with `plotters` as SVG and PNG (text in DejaVu Sans, embedded, so no system font is
//! needed).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Once;

use anyhow::{Result, anyhow, bail};
use plotters::prelude::*;

use crate::dag::Plan;
use crate::defences::ieu::Confidences;
use crate::spec::FigureSpec;
use crate::store::Store;

/// One panel's data.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub clean: Vec<f64>,
    pub poisoned: Vec<f64>,
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
            title: p
                .title
                .clone()
                .unwrap_or_else(|| format!("{} / {}", p.dataset, p.attack)),
            clean,
            poisoned,
        });
    }
    if out.is_empty() {
        bail!("figure {}: none of its panels is in the plan", fig.name);
    }
    Ok(out)
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
    let root = root
        .titled(title, ("sans-serif", 20).into_font().style(FontStyle::Bold))
        .map_err(e)?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (area, p) in areas.iter().zip(panels) {
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
    Ok(s)
}
