//! Band plots of repeated runs as SVG, in the style of the library's training curves
//! ([`singlora::plot`]): per series the median over the runs as a line, an inner band (e.g. the
//! quartiles) shaded and an outer band (e.g. min to max) shaded lighter, on a logarithmic y axis
//! ([`write_bands`], losses) or a linear one ([`write_linear_bands`], accuracies).

use std::path::Path;

use plotters::prelude::*;
use singlora::error::{Error, Result};
use singlora::plot::{
    legend_line, log_ticks, min_max, padded, tick, widen, FONT, GRID_COLOR, HEIGHT, PALETTE, WIDTH,
};

type Points = Vec<(f64, f64)>;
type DrawResult = std::result::Result<(), String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// One series of a band plot: at each x, the median over repeated runs (drawn as a line), the
/// inner band (e.g. the quartiles, shaded) and the outer band (e.g. min to max, shaded lighter).
#[derive(Debug, Clone, PartialEq)]
pub struct BandPoint {
    pub x: f64,
    pub lo: f64,
    pub q1: f64,
    pub median: f64,
    pub q3: f64,
    pub hi: f64,
}

/// A labelled series of [`BandPoint`]s, sorted by x.
#[derive(Debug, Clone, PartialEq)]
pub struct BandSeries {
    pub label: String,
    pub points: Vec<BandPoint>,
}

/// The filled region between `lower` and `upper` over the points' x (a closed polygon).
fn band_polygon(
    points: &[BandPoint],
    lower: fn(&BandPoint) -> f64,
    upper: fn(&BandPoint) -> f64,
) -> Points {
    let mut poly: Points = points.iter().map(|p| (p.x, upper(p))).collect();
    poly.extend(points.iter().rev().map(|p| (p.x, lower(p))));
    poly
}

/// The series with only their finite points that `keep` accepts, x mapped by `fx`.
fn finite_points(
    series: &[BandSeries],
    keep: impl Fn(&BandPoint) -> bool,
    fx: impl Fn(f64) -> f64,
) -> Vec<BandSeries> {
    series
        .iter()
        .map(|s| BandSeries {
            label: s.label.clone(),
            points: s
                .points
                .iter()
                .filter(|p| {
                    [p.x, p.lo, p.q1, p.median, p.q3, p.hi]
                        .iter()
                        .all(|v| v.is_finite())
                        && keep(p)
                })
                .map(|p| BandPoint {
                    x: fx(p.x),
                    ..p.clone()
                })
                .collect(),
        })
        .collect()
}

fn draw_bands(
    svg: &mut String,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[BandSeries],
) -> DrawResult {
    // keep the points a logarithmic axis can show
    let series = finite_points(series, |p| p.lo > 0.0, |x| x);
    let all = || series.iter().flat_map(|s| s.points.iter());
    let x = match min_max(all().map(|p| p.x)) {
        Some((lo, hi)) if hi > lo => (lo, hi),
        Some((lo, _)) => widen(lo),
        None => (0.0, 1.0),
    };
    let (lo, hi) = min_max(all().flat_map(|p| [p.lo, p.hi])).unwrap_or((1e-3, 1.0));
    let (lo, hi) = if hi / lo < 1.0 + 1e-9 {
        (lo / 2.0, hi * 2.0)
    } else {
        let m = (hi / lo).powf(0.04);
        (lo / m, hi * m)
    };
    let root = SVGBackend::with_string(svg, (WIDTH, HEIGHT + 180)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = chart_on(&root, title)
        .build_cartesian_2d(
            x.0..x.1,
            (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
        )
        .map_err(err)?;
    band_chart(
        &mut chart,
        (x_desc, y_desc),
        &tick,
        &series,
        SeriesLabelPosition::UpperRight,
    )?;
    root.present().map_err(err)
}

/// A band plot's grid and labels (x ticks by `x_label`, y by [`tick`]), then each series'
/// outer band, inner band and median line, and the legend at `legend`.
fn band_chart<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    (x_desc, y_desc): (&str, &str),
    x_label: &dyn Fn(&f64) -> String,
    series: &[BandSeries],
    legend: SeriesLabelPosition,
) -> DrawResult
where
    X: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    draw_mesh(chart, (x_desc, y_desc), x_label)?;
    for (i, s) in series.iter().enumerate() {
        if s.points.is_empty() {
            continue;
        }
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(std::iter::once(Polygon::new(
                band_polygon(&s.points, |p| p.lo, |p| p.hi),
                color.mix(0.12).filled(),
            )))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once(Polygon::new(
                band_polygon(&s.points, |p| p.q1, |p| p.q3),
                color.mix(0.3).filled(),
            )))
            .map_err(err)?;
        let line: Points = s.points.iter().map(|p| (p.x, p.median)).collect();
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))
            .map_err(err)?
            .label(s.label.as_str())
            .legend(legend_line(color, 2));
    }
    draw_legend(chart, legend)
}

/// The grid and axis labels of every plot here: x ticks by `x_label`, y by [`tick`].
fn draw_mesh<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    (x_desc, y_desc): (&str, &str),
    x_label: &dyn Fn(&f64) -> String,
) -> DrawResult
where
    X: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(x_label)
        .y_label_formatter(&tick)
        .x_labels(10)
        .y_labels(12)
        .light_line_style(TRANSPARENT)
        .bold_line_style(GRID_COLOR)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(err)
}

/// The legend of the labelled series, at `position`.
fn draw_legend<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    position: SeriesLabelPosition,
) -> DrawResult
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .label_font((FONT, 14))
        .draw()
        .map_err(err)
}

/// The chart area every plot here draws in: the title above, room for the axis labels.
fn chart_on<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    title: &str,
) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut b = ChartBuilder::on(root);
    b.caption(title, (FONT, 22))
        .margin(16)
        .x_label_area_size(45)
        .y_label_area_size(75);
    b
}

/// Tick labels for an x axis drawn as log10(x) when `log_x` (labelled with x), else as is.
fn x_labels(log_x: bool) -> impl Fn(&f64) -> String {
    move |v: &f64| {
        if log_x {
            format!("{:.1e}", 10f64.powf(*v))
        } else {
            tick(v)
        }
    }
}

/// Like [`write_bands`] on a linear y axis (accuracies), with x on a log scale when `log_x`
/// (learning rates). The inner band is whatever the caller puts in q1..q3 (e.g. ±1 std).
pub fn write_linear_bands(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[BandSeries],
    log_x: bool,
) -> Result<()> {
    let mut svg = String::new();
    draw_linear_bands(&mut svg, title, x_desc, y_desc, series, log_x)
        .map_err(|e| Error::msg(format!("{}: cannot draw the bands: {e}", path.display())))?;
    singlora::atomic::write_file(path, svg.as_bytes())
}

fn draw_linear_bands(
    svg: &mut String,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[BandSeries],
    log_x: bool,
) -> DrawResult {
    // a log x axis is drawn as log10(x) on a linear one, labelled with x
    let series = finite_points(
        series,
        |p| !log_x || p.x > 0.0,
        |x| if log_x { x.log10() } else { x },
    );
    let all = || series.iter().flat_map(|s| s.points.iter());
    let x = match min_max(all().map(|p| p.x)) {
        Some((lo, hi)) if hi > lo => {
            let pad = 0.03 * (hi - lo);
            (lo - pad, hi + pad)
        }
        Some((lo, _)) => widen(lo),
        None => (0.0, 1.0),
    };
    let y = padded(all().flat_map(|p| [p.lo, p.hi]));
    let root = SVGBackend::with_string(svg, (WIDTH, HEIGHT + 180)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = chart_on(&root, title)
        .build_cartesian_2d(x.0..x.1, y.0..y.1)
        .map_err(err)?;
    let x_label = x_labels(log_x);
    band_chart(
        &mut chart,
        (x_desc, y_desc),
        &x_label,
        &series,
        SeriesLabelPosition::LowerRight,
    )?;
    root.present().map_err(err)
}

/// One series of a dot plot: a point per run (e.g. per seed) at its x.
#[derive(Debug, Clone, PartialEq)]
pub struct DotSeries {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Every run as a dot and the mean at each x as a line, on a linear y axis, x on a log scale
/// when `log_x`. Series are nudged apart along x so that their dots do not hide each other.
pub fn write_dots(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[DotSeries],
    log_x: bool,
) -> Result<()> {
    let mut svg = String::new();
    draw_dots(&mut svg, title, x_desc, y_desc, series, log_x)
        .map_err(|e| Error::msg(format!("{}: cannot draw the dots: {e}", path.display())))?;
    singlora::atomic::write_file(path, svg.as_bytes())
}

fn draw_dots(
    svg: &mut String,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[DotSeries],
    log_x: bool,
) -> DrawResult {
    let fx = |x: f64| if log_x { x.log10() } else { x };
    let series: Vec<DotSeries> = series
        .iter()
        .map(|s| DotSeries {
            label: s.label.clone(),
            points: s
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_x || *x > 0.0))
                .map(|&(x, y)| (fx(x), y))
                .collect(),
        })
        .collect();
    let all = || series.iter().flat_map(|s| s.points.iter());
    let x = padded(all().map(|p| p.0));
    let nudge = 0.006 * (x.1 - x.0);
    let y = padded(all().map(|p| p.1));
    let root = SVGBackend::with_string(svg, (WIDTH, HEIGHT + 180)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = chart_on(&root, title)
        .build_cartesian_2d(x.0..x.1, y.0..y.1)
        .map_err(err)?;
    draw_mesh(&mut chart, (x_desc, y_desc), &x_labels(log_x))?;
    let n = series.len() as f64;
    for (i, s) in series.iter().enumerate() {
        if s.points.is_empty() {
            continue;
        }
        let color = PALETTE[i % PALETTE.len()];
        let dx = (i as f64 - (n - 1.0) / 2.0) * nudge;
        chart
            .draw_series(
                s.points
                    .iter()
                    .map(|&(x, y)| Circle::new((x + dx, y), 3, color.mix(0.7).filled())),
            )
            .map_err(err)?;
        let mut xs: Vec<f64> = s.points.iter().map(|p| p.0).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        let means: Points = xs
            .iter()
            .map(|&x| {
                let ys: Vec<f64> = s.points.iter().filter(|p| p.0 == x).map(|p| p.1).collect();
                (x + dx, ys.iter().sum::<f64>() / ys.len() as f64)
            })
            .collect();
        chart
            .draw_series(LineSeries::new(means, color.stroke_width(2)))
            .map_err(err)?
            .label(s.label.as_str())
            .legend(legend_line(color, 2));
    }
    draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(err)
}

/// Draws repeated-run curves on a logarithmic y axis: per series the median as a line, the
/// quartile band shaded and the min–max band shaded lighter. Non-finite and non-positive
/// points are left out; the file is written through a temporary file and a rename.
pub fn write_bands(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[BandSeries],
) -> Result<()> {
    let mut svg = String::new();
    draw_bands(&mut svg, title, x_desc, y_desc, series)
        .map_err(|e| Error::msg(format!("{}: cannot draw the bands: {e}", path.display())))?;
    singlora::atomic::write_file(path, svg.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn band_plot() {
        let series: Vec<BandSeries> = ["singlora r=16", "lora r=8"]
            .iter()
            .enumerate()
            .map(|(k, label)| BandSeries {
                label: label.to_string(),
                points: (0..50)
                    .map(|i| {
                        let m = 10f64.powf(-(i as f64) / (10.0 + 5.0 * k as f64));
                        BandPoint {
                            x: i as f64 * 100.0,
                            lo: m / 3.0,
                            q1: m / 1.5,
                            median: m,
                            q3: m * 1.5,
                            hi: m * 3.0,
                        }
                    })
                    .collect(),
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bands.svg");
        write_bands(
            &path,
            "attention fit",
            "optimizer step",
            "loss (log)",
            &series,
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for label in ["attention fit", "singlora r=16", "lora r=8", "loss (log)"] {
            assert!(svg.contains(label), "missing {label}");
        }
        assert_eq!(svg.matches("<polygon").count(), 4, "two bands per series");
        assert!(svg.contains("<polyline"));
        // nothing drawable still gives a valid file
        let empty = [BandSeries {
            label: "none".into(),
            points: vec![],
        }];
        write_bands(&path, "empty", "x", "y", &empty).unwrap();
    }

    #[test]
    fn dot_plot_draws_every_run_and_a_mean_line_per_series() {
        let series = vec![
            DotSeries {
                label: "singlora-r8".into(),
                points: vec![(1e-3, 70.0), (1e-3, 72.0), (2e-3, 74.0), (2e-3, f64::NAN)],
            },
            DotSeries {
                label: "lora-r8".into(),
                points: vec![(1e-3, 71.0), (4e-3, 40.0), (0.0, 50.0)],
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dots.svg");
        write_dots(
            &path,
            "stability",
            "learning rate",
            "accuracy (%)",
            &series,
            true,
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        // the NaN and the x = 0 a log axis cannot show are left out: 3 + 2 dots
        assert_eq!(svg.matches("<circle").count(), 5);
        for label in ["stability", "singlora-r8", "lora-r8", "accuracy (%)"] {
            assert!(svg.contains(label), "missing {label}");
        }
    }
}
