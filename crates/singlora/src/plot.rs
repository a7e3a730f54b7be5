//! Training curves as an SVG: the lines of a run's `metrics.jsonl` drawn in two panels.
//!
//! The left panel shows the training loss against the optimizer step, raw as a thin line and
//! smoothed by a bias-corrected exponential moving average, with the evaluation loss as points
//! on the same axes. The right panel shows the evaluation metrics: accuracy and macro-F1 on a
//! 0–1 axis for classification, or perplexity on a logarithmic axis for language modelling, or
//! a note that the log holds no evaluation. Non-finite values are skipped, constant series and
//! single points get a non-degenerate axis range, and the file is written atomically.
//!
//! Text is emitted as SVG `<text>` elements and laid out with plotters' built-in size estimate,
//! so no font files, fontconfig or font backend are needed; the viewer picks the font.
//!
//! The chart size, font, colours and axis helpers are public so that other charts (the lab's
//! band plots of repeated runs) are drawn in the same style.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

use crate::error::{Error, Result};

/// Width of a chart in pixels.
pub const WIDTH: u32 = 1280;
/// Height of the curves chart in pixels.
pub const HEIGHT: u32 = 540;
/// The font family of every text (the viewer resolves it).
pub const FONT: &str = "sans-serif";
/// The raw loss line keeps at most this many points (the minimum and maximum of each bucket),
/// so that a long run still gives an SVG of reasonable size.
const MAX_RAW_POINTS: usize = 4000;

const LOSS_COLOR: RGBColor = RGBColor(31, 119, 180);
const EVAL_LOSS_COLOR: RGBColor = RGBColor(214, 39, 40);
const ACCURACY_COLOR: RGBColor = RGBColor(44, 160, 44);
const F1_COLOR: RGBColor = RGBColor(148, 103, 189);
const PERPLEXITY_COLOR: RGBColor = RGBColor(255, 127, 14);
/// The colour of the grid lines.
pub const GRID_COLOR: RGBColor = RGBColor(225, 225, 225);
/// The series colours, in the order other charts cycle through them.
pub const PALETTE: [RGBColor; 5] = [
    LOSS_COLOR,
    EVAL_LOSS_COLOR,
    ACCURACY_COLOR,
    F1_COLOR,
    PERPLEXITY_COLOR,
];

/// Title of the left panel.
pub const LOSS_PANEL: &str = "training loss";
/// Title of the right panel for a classification run.
pub const CLASSIFICATION_PANEL: &str = "evaluation: accuracy and macro-F1";
/// Title of the right panel for a language-modelling run.
pub const PERPLEXITY_PANEL: &str = "evaluation: perplexity";
/// Title of the right panel when the log holds no evaluation metrics.
pub const NO_EVAL_PANEL: &str = "evaluation";

type Points = Vec<(f64, f64)>;

/// The series found in a log, each sorted by step, non-finite values left out.
#[derive(Default)]
struct Curves {
    loss: Points,
    eval_loss: Points,
    accuracy: Points,
    f1_macro: Points,
    perplexity: Points,
}

impl Curves {
    fn from_lines(lines: &[Value]) -> Self {
        let mut c = Curves::default();
        for line in lines {
            let Some(step) = line.get("step").and_then(Value::as_f64) else {
                continue;
            };
            if !step.is_finite() {
                continue;
            }
            let take = |key: &str, into: &mut Points| {
                if let Some(v) = line.get(key).and_then(Value::as_f64) {
                    if v.is_finite() {
                        into.push((step, v));
                    }
                }
            };
            take("loss", &mut c.loss);
            take("eval_loss", &mut c.eval_loss);
            take("eval_accuracy", &mut c.accuracy);
            take("eval_f1_macro", &mut c.f1_macro);
            take("eval_perplexity", &mut c.perplexity);
        }
        c.perplexity.retain(|&(_, v)| v > 0.0);
        for s in [
            &mut c.loss,
            &mut c.eval_loss,
            &mut c.accuracy,
            &mut c.f1_macro,
            &mut c.perplexity,
        ] {
            s.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        c
    }

    /// The step range of every series, so that both panels share their x axis.
    fn step_range(&self) -> (f64, f64) {
        let steps = [
            &self.loss,
            &self.eval_loss,
            &self.accuracy,
            &self.f1_macro,
            &self.perplexity,
        ]
        .into_iter()
        .flatten()
        .map(|p| p.0);
        let (lo, hi) = min_max(steps).unwrap_or((0.0, 1.0));
        if hi > lo {
            // A little room each side, so that the markers at the ends are not cut.
            let m = (hi - lo) * 0.02;
            (lo - m, hi + m)
        } else {
            widen(lo)
        }
    }
}

/// The smallest and largest of `values`; None when there are none.
pub fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// A range around a single value.
pub fn widen(v: f64) -> (f64, f64) {
    let pad = (v.abs() * 0.05).max(0.5);
    (v - pad, v + pad)
}

/// A value range with a margin of 5% each side; a constant gets a range around it.
pub fn padded(values: impl Iterator<Item = f64>) -> (f64, f64) {
    match min_max(values) {
        None => (0.0, 1.0),
        Some((lo, hi)) if hi - lo <= 1e-12 * lo.abs().max(hi.abs()).max(1e-300) => widen(lo),
        Some((lo, hi)) => {
            let m = (hi - lo) * 0.05;
            (lo - m, hi + m)
        }
    }
}

/// The debiased exponential moving average of `points`, with a window that grows with the
/// run's length; `None` when the run is too short for smoothing to help.
fn smoothed(points: &[(f64, f64)]) -> Option<Points> {
    let window = (points.len() / 25).min(50);
    if window < 2 {
        return None;
    }
    let beta = 1.0 - 1.0 / window as f64;
    let mut ema = 0.0;
    let mut weight = 1.0;
    Some(
        points
            .iter()
            .map(|&(x, y)| {
                ema = beta * ema + (1.0 - beta) * y;
                weight *= beta;
                (x, ema / (1.0 - weight))
            })
            .collect(),
    )
}

/// At most about `max` points: each bucket of consecutive points is replaced by its minimum
/// and maximum, in step order, so that spikes stay visible.
fn decimate(points: &[(f64, f64)], max: usize) -> Points {
    if points.len() <= max {
        return points.to_vec();
    }
    let bucket = points.len().div_ceil(max / 2);
    let mut out = Vec::with_capacity(max + 2);
    for chunk in points.chunks(bucket) {
        let lo = chunk.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
        let hi = chunk.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
        if lo.0 <= hi.0 {
            out.extend([*lo, *hi]);
        } else {
            out.extend([*hi, *lo]);
        }
    }
    out.dedup_by(|a, b| a == b);
    out
}

/// Tick positions for a logarithmic axis over `lo..hi` (both positive): 1-2-5 steps per decade
/// where that gives at least three, every 1..9 multiple where the range is narrower, and evenly
/// spaced round values where it is narrower still.
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let decades = lo.log10().floor() as i32..=hi.log10().ceil() as i32;
    for multipliers in [
        &[1.0, 2.0, 5.0][..],
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
    ] {
        let ticks: Vec<f64> = decades
            .clone()
            .flat_map(|k| multipliers.iter().map(move |m| m * 10f64.powi(k)))
            .filter(|v| (lo..=hi).contains(v))
            .collect();
        if ticks.len() >= 3 {
            return ticks;
        }
    }
    linear_ticks(lo, hi, 5)
}

/// About `n` evenly spaced round values (steps of 1, 2 or 5 times a power of ten) in `lo..=hi`.
fn linear_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let raw = (hi - lo) / n as f64;
    if !(raw > 0.0 && raw.is_finite()) {
        return vec![lo];
    }
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// Tick labels: integers as such, other values with up to four decimals, extremes in
/// scientific notation.
pub fn tick(v: &f64) -> String {
    let v = *v;
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e6).contains(&a) {
        return format!("{v:.1e}");
    }
    if (v - v.round()).abs() < 1e-9 * a.max(1.0) {
        return format!("{:.0}", v.round());
    }
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type DrawResult = std::result::Result<(), String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A legend entry's sample: a line of `color`, `width` pixels wide.
pub fn legend_line(color: RGBColor, width: u32) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width))
}

/// A panel with a title and a line of text instead of a chart.
/// The panels' common axes: step on x, `$y_desc` on y, light grid, 8 labels each.
macro_rules! mesh {
    ($chart:expr, $y_desc:expr) => {
        $chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc($y_desc)
            .x_label_formatter(&tick)
            .y_label_formatter(&tick)
            .x_labels(8)
            .y_labels(8)
            .light_line_style(TRANSPARENT)
            .bold_line_style(GRID_COLOR)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .draw()
            .map_err(err)?
    };
}

/// The panels' legend box, at `$position` (a `SeriesLabelPosition`).
macro_rules! legend {
    ($chart:expr, $position:ident) => {
        $chart
            .configure_series_labels()
            .position(SeriesLabelPosition::$position)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .label_font((FONT, 13))
            .draw()
            .map_err(err)
    };
}

fn message_panel(area: &Area, title: &str, message: &str) -> DrawResult {
    let inner = area
        .margin(12, 12, 12, 12)
        .titled(title, (FONT, 20))
        .map_err(err)?;
    let (w, h) = inner.dim_in_pixel();
    let style = TextStyle::from((FONT, 16).into_font())
        .color(&RGBColor(110, 110, 110))
        .pos(plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Center,
        ));
    inner
        .draw_text(message, &style, (w as i32 / 2, h as i32 / 2))
        .map_err(err)
}

fn loss_panel(area: &Area, c: &Curves, x: (f64, f64)) -> DrawResult {
    if c.loss.is_empty() && c.eval_loss.is_empty() {
        return message_panel(area, LOSS_PANEL, "no finite loss in the log");
    }
    let y = padded(c.loss.iter().chain(&c.eval_loss).map(|p| p.1));
    let mut chart = ChartBuilder::on(area)
        .caption(LOSS_PANEL, (FONT, 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(x.0..x.1, y.0..y.1)
        .map_err(err)?;
    mesh!(chart, "loss");
    if !c.loss.is_empty() {
        let smooth = smoothed(&c.loss);
        let raw_style = if smooth.is_some() {
            LOSS_COLOR.mix(0.35).stroke_width(1)
        } else {
            LOSS_COLOR.stroke_width(2)
        };
        let raw = LineSeries::new(decimate(&c.loss, MAX_RAW_POINTS), raw_style);
        let raw = if c.loss.len() == 1 {
            raw.point_size(3)
        } else {
            raw
        };
        let label = if smooth.is_some() {
            "training loss (raw)"
        } else {
            "training loss"
        };
        chart
            .draw_series(raw)
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], raw_style.stroke_width(2))
            });
        if let Some(smooth) = smooth {
            chart
                .draw_series(LineSeries::new(smooth, LOSS_COLOR.stroke_width(2)))
                .map_err(err)?
                .label("training loss (smoothed)")
                .legend(legend_line(LOSS_COLOR, 2));
        }
    }
    if !c.eval_loss.is_empty() {
        chart
            .draw_series(
                LineSeries::new(c.eval_loss.clone(), EVAL_LOSS_COLOR.stroke_width(2)).point_size(3),
            )
            .map_err(err)?
            .label("eval loss")
            .legend(legend_line(EVAL_LOSS_COLOR, 2));
    }
    legend!(chart, UpperRight)
}

fn classification_panel(area: &Area, c: &Curves, x: (f64, f64)) -> DrawResult {
    let mut chart = ChartBuilder::on(area)
        .caption(CLASSIFICATION_PANEL, (FONT, 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(x.0..x.1, 0.0..1.0)
        .map_err(err)?;
    mesh!(chart, "fraction of examples");
    for (points, color, label) in [
        (&c.accuracy, ACCURACY_COLOR, "accuracy"),
        (&c.f1_macro, F1_COLOR, "macro-F1"),
    ] {
        if points.is_empty() {
            continue;
        }
        let clamped = points.iter().map(|&(s, v)| (s, v.clamp(0.0, 1.0)));
        chart
            .draw_series(LineSeries::new(clamped, color.stroke_width(2)).point_size(3))
            .map_err(err)?
            .label(label)
            .legend(legend_line(color, 2));
    }
    legend!(chart, LowerRight)
}

fn perplexity_panel(area: &Area, c: &Curves, x: (f64, f64)) -> DrawResult {
    let (lo, hi) = min_max(c.perplexity.iter().map(|p| p.1)).unwrap_or((1.0, 10.0));
    // A margin of 10% each side in log space; a constant gets ±20%.
    let (lo, hi) = if hi / lo < 1.0 + 1e-9 {
        (lo / 1.2, hi * 1.2)
    } else {
        let m = (hi / lo).powf(0.1);
        (lo / m, hi * m)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(PERPLEXITY_PANEL, (FONT, 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(
            x.0..x.1,
            (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
        )
        .map_err(err)?;
    mesh!(chart, "perplexity (log scale)");
    chart
        .draw_series(
            LineSeries::new(c.perplexity.clone(), PERPLEXITY_COLOR.stroke_width(2)).point_size(3),
        )
        .map_err(err)?
        .label("eval perplexity")
        .legend(legend_line(PERPLEXITY_COLOR, 2));
    legend!(chart, UpperRight)
}

fn draw(svg: &mut String, lines: &[Value], title: &str) -> DrawResult {
    let curves = Curves::from_lines(lines);
    let x = curves.step_range();
    let root = SVGBackend::with_string(svg, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let body = root.titled(title, (FONT, 24)).map_err(err)?;
    let panels = body.split_evenly((1, 2));
    loss_panel(&panels[0], &curves, x)?;
    if !curves.accuracy.is_empty() || !curves.f1_macro.is_empty() {
        classification_panel(&panels[1], &curves, x)?;
    } else if !curves.perplexity.is_empty() {
        perplexity_panel(&panels[1], &curves, x)?;
    } else {
        message_panel(&panels[1], NO_EVAL_PANEL, "no evaluation")?;
    }
    root.present().map_err(err)
}

/// Draws the curves of a run's metrics lines (as read by [`crate::metrics::read_metrics`])
/// into an SVG file at `path`, written through a temporary file and a rename.
///
/// Training lines carry `step` and `loss`; evaluation lines carry `step`, `eval_loss` and
/// either `eval_accuracy` and `eval_f1_macro` (fractions) or `eval_perplexity`. Other keys,
/// lines without a numeric `step` and non-finite values are ignored.
pub fn write_curves(path: &Path, lines: &[Value], title: &str) -> Result<()> {
    let mut svg = String::new();
    draw(&mut svg, lines, title)
        .map_err(|e| Error::msg(format!("{}: cannot draw the curves: {e}", path.display())))?;
    crate::atomic::write_file(path, svg.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn training(n: u64) -> Vec<Value> {
        (1..=n)
            .map(|s| {
                let noise = ((s * 7919) % 13) as f64 / 40.0;
                json!({"step": s, "loss": 2.5 / (1.0 + s as f64 / 20.0) + noise, "lr": 1e-4,
                       "u": 1.0, "tokens_per_s": 1000.0})
            })
            .collect()
    }

    fn render(lines: &[Value], title: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curves.svg");
        write_curves(&path, lines, title).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "temporary left behind: {names:?}");
        std::fs::read_to_string(&path).unwrap()
    }

    fn check_svg(svg: &str, title: &str) {
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("<text"));
        assert!(svg.contains(title), "title {title} missing");
        assert!(svg.contains(LOSS_PANEL));
    }

    #[test]
    fn classification_run() {
        let mut lines = training(300);
        for s in (50..=300).step_by(50) {
            let f = s as f64 / 300.0;
            lines.push(json!({"step": s, "eval_loss": 1.0 - 0.5 * f,
                              "eval_accuracy": 0.5 + 0.4 * f, "eval_f1_macro": 0.4 + 0.45 * f}));
        }
        lines.push(json!({"step": 301, "loss": f64::NAN})); // becomes null: skipped
        let svg = render(&lines, "sst2 & <singlora>");
        check_svg(&svg, "sst2 &amp; &lt;singlora&gt;");
        assert!(svg.contains(CLASSIFICATION_PANEL));
        for label in [
            "optimizer step",
            "loss",
            "fraction of examples",
            "training loss (raw)",
            "training loss (smoothed)",
            "eval loss",
            "accuracy",
            "macro-F1",
        ] {
            assert!(svg.contains(label), "missing {label}");
        }
        assert!(svg.contains("<polyline"));
        assert!(svg.contains("<circle"));
    }

    #[test]
    fn sft_run_with_perplexity() {
        let mut lines = training(120);
        for s in [40, 80, 120] {
            let nll = 2.0 - s as f64 / 100.0;
            lines.push(json!({"step": s, "eval_loss": nll, "eval_perplexity": nll.exp()}));
        }
        let svg = render(&lines, "alpaca");
        check_svg(&svg, "alpaca");
        assert!(svg.contains(PERPLEXITY_PANEL));
        assert!(svg.contains("perplexity (log scale)"));
        assert!(svg.contains("eval perplexity"));
        assert!(svg.contains("<polyline"));
    }

    #[test]
    fn training_only() {
        let svg = render(&training(40), "no eval");
        check_svg(&svg, "no eval");
        assert!(svg.contains(NO_EVAL_PANEL));
        assert!(svg.contains("no evaluation"));
        assert!(svg.contains("optimizer step"));
        assert!(svg.contains("<polyline"));
    }

    #[test]
    fn one_line_and_degenerate_logs() {
        let svg = render(&[json!({"step": 1, "loss": 0.7})], "one");
        check_svg(&svg, "one");
        assert!(svg.contains("no evaluation"));
        assert!(svg.contains("<circle"));

        // Constant values, infinities, one eval point.
        let mut lines: Vec<Value> = (0..10)
            .map(|s| json!({"step": s * 10, "loss": 1.25}))
            .collect();
        lines.push(json!({"step": 100, "loss": f64::INFINITY}));
        lines.push(json!({"step": 100, "loss": "inf"}));
        lines.push(json!({"step": 90, "eval_loss": 1.25, "eval_perplexity": 3.49}));
        let svg = render(&lines, "flat");
        check_svg(&svg, "flat");
        assert!(svg.contains(PERPLEXITY_PANEL));

        // Nothing to draw at all still gives a valid file.
        let svg = render(&[json!({"note": "x"})], "empty");
        check_svg(&svg, "empty");
        assert!(svg.contains("no finite loss"));
    }

    #[test]
    fn smoothing_and_decimation() {
        assert!(smoothed(&[(1.0, 1.0); 10]).is_none());
        let flat: Points = (0..200).map(|s| (s as f64, 2.0)).collect();
        let s = smoothed(&flat).unwrap();
        assert!(s.iter().all(|p| (p.1 - 2.0).abs() < 1e-12), "EMA is biased");
        let long: Points = (0..100_000)
            .map(|s| (s as f64, if s == 5_000 { 9.0 } else { 1.0 }))
            .collect();
        let d = decimate(&long, 4000);
        assert!(d.len() <= 4002);
        assert!(d.iter().any(|p| p.1 == 9.0), "spike lost");
        assert!(d.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    #[test]
    fn log_axis_ticks() {
        assert_eq!(
            log_ticks(1.5, 900.0),
            vec![2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0]
        );
        assert_eq!(log_ticks(2.2, 7.5), vec![3.0, 4.0, 5.0, 6.0, 7.0]);
        let t = log_ticks(3.3, 3.6);
        assert!(
            t.len() >= 3 && t.iter().all(|v| (3.3..=3.6).contains(v)),
            "{t:?}"
        );
    }

    #[test]
    fn tick_labels() {
        assert_eq!(tick(&0.0), "0");
        assert_eq!(tick(&1000.0), "1000");
        assert_eq!(tick(&0.25), "0.25");
        assert_eq!(tick(&1.5e7), "1.5e7");
    }
}
