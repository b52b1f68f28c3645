//! PNG plots of a SAFE run: adapter importance over SAFE's decision rounds (several per epoch by
//! default) and the resulting freezing pattern.
//!
//! Rendering is pure Rust (plotters' bitmap backend) so reports work on headless training
//! machines. Text uses a TTF shipped in the repository (`assets/DejaVuSans.ttf`) and embedded
//! at compile time, so the output never depends on the fonts installed on the host.

use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const FONT: &str = "sans-serif";

/// Why a plot could not be written; always names the output path.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("plot {path}: invalid input: {problem}")]
    Input { path: PathBuf, problem: String },
    #[error("plot {path}: drawing failed: {message}")]
    Draw { path: PathBuf, message: String },
}

/// Register the embedded font under plotters' default family name, once per process.
fn font_ready(path: &Path) -> Result<(), PlotError> {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok = *OK.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    ok.then_some(()).ok_or_else(|| PlotError::Draw {
        path: path.to_path_buf(),
        message: "the embedded font could not be loaded".into(),
    })
}

fn draw_err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> PlotError + '_ {
    move |e| PlotError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Pixel width of `text` in the embedded font (used to size label areas and legends).
fn text_width(text: &str, size: u32) -> u32 {
    (FONT, size)
        .into_font()
        .box_size(text)
        .map_or(0, |(w, _)| w)
}

const IMP_PLOT_W: u32 = 900;
const IMP_H: u32 = 560;
const LEGEND_ROW: u32 = 20;
const LEGEND_TOP: u32 = 50;

/// Legend layout for the importance plot: (rows per column, column width, columns).
fn legend_layout(adapter_names: &[String]) -> (u32, u32, u32) {
    let rows = (IMP_H - LEGEND_TOP - 20) / LEGEND_ROW;
    let widest = adapter_names
        .iter()
        .map(|n| text_width(n, 14))
        .chain([text_width("threshold τ", 14)])
        .max()
        .unwrap_or(0);
    let entries = adapter_names.len() as u32 + 1;
    (rows, widest + 50, entries.div_ceil(rows))
}

/// Image size of the importance plot: a fixed plot area plus as many legend columns as the
/// adapter names need, so the legend never covers the lines however many adapters there are.
fn importance_size(adapter_names: &[String]) -> (u32, u32) {
    let (_, col_w, cols) = legend_layout(adapter_names);
    (IMP_PLOT_W + cols * col_w + 10, IMP_H)
}

/// Importance per adapter over SAFE's rounds (the SAFE paper's Fig. 3 in spirit): one line per
/// adapter (x = round 1.., y = importance 1-CKA on a log axis, since scores span orders of
/// magnitude: 1e-6 beside 0.3) and the freezing threshold tau_t per round as a dashed black line;
/// the legend sits in its own panel on the right. Missing, non-finite or non-positive scores
/// (e.g. adapters no longer scored after freezing) are skipped.
pub fn plot_importance(
    path: &Path,
    adapter_names: &[String],
    scores_per_epoch: &[Vec<f64>],
    thresholds: &[f64],
) -> Result<(), PlotError> {
    if let Some((e, row)) = scores_per_epoch
        .iter()
        .enumerate()
        .find(|(_, r)| r.len() > adapter_names.len())
    {
        return Err(PlotError::Input {
            path: path.to_path_buf(),
            problem: format!(
                "epoch {} has {} scores for {} adapter names",
                e + 1,
                row.len(),
                adapter_names.len()
            ),
        });
    }
    font_ready(path)?;
    let err = draw_err(path);
    let size = importance_size(adapter_names);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let (plot, legend) = root.split_horizontally(IMP_PLOT_W);

    let epochs = scores_per_epoch.len().max(thresholds.len()).max(2) as i32;
    let shown = |v: &f64| v.is_finite() && *v > 0.0;
    let (y_lo, y_hi) = log_range(scores_per_epoch.iter().flatten().chain(thresholds).copied());
    let mut chart = ChartBuilder::on(&plot)
        .caption("Adapter importance per SAFE round", (FONT, 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(1..epochs, (y_lo..y_hi).log_scale())
        .map_err(&err)?;
    chart
        .configure_mesh()
        .x_desc("SAFE round")
        .y_desc("importance (1 − CKA), log scale")
        .x_labels(epochs.min(20) as usize)
        .y_label_formatter(&|v| importance_label(*v))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(&err)?;

    let colors: Vec<RGBColor> = (0..adapter_names.len()).map(series_color).collect();
    for (j, color) in colors.iter().enumerate() {
        let points = scores_per_epoch
            .iter()
            .enumerate()
            .filter_map(|(e, row)| Some((e as i32 + 1, *row.get(j)?)))
            .filter(|(_, v)| shown(v));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(3))
            .map_err(&err)?;
    }
    let tau = thresholds
        .iter()
        .enumerate()
        .map(|(e, t)| (e as i32 + 1, *t))
        .filter(|(_, t)| shown(t));
    chart
        .draw_series(DashedLineSeries::new(
            tau.clone(),
            10,
            6,
            BLACK.stroke_width(2),
        ))
        .map_err(&err)?;
    // Crosses mark each epoch's threshold (and keep a one-epoch threshold visible).
    chart
        .draw_series(tau.map(|p| Cross::new(p, 4, BLACK.stroke_width(2))))
        .map_err(&err)?;

    draw_legend(&legend, adapter_names, &colors).map_err(&err)?;
    root.present().map_err(&err)
}

/// The importance axis's range: the positive finite values' span, widened a little on the log
/// scale (a decade when all are equal); 1e-3..1 when there are none.
fn log_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if hi == 0.0 {
        return (1e-3, 1.0);
    }
    if lo == hi {
        return (lo / 3.0, hi * 3.0);
    }
    (lo / 1.5, hi * 1.5)
}

/// An importance tick's label: two decimals from 0.01 up, scientific below (1e-6 must not read
/// "0.00").
fn importance_label(v: f64) -> String {
    if v >= 0.01 {
        format!("{v:.2}")
    } else {
        format!("{v:.0e}")
    }
}

/// Distinct colours for up to ~100 series; adjacent layers get clearly different hues.
fn series_color(i: usize) -> RGBColor {
    let c = Palette99::pick(i).to_rgba();
    RGBColor(c.0, c.1, c.2)
}

/// Legend in its own panel: a line sample and the name per adapter, the dashed threshold last.
fn draw_legend(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    adapter_names: &[String],
    colors: &[RGBColor],
) -> Result<(), DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>> {
    let (rows, col_w, _) = legend_layout(adapter_names);
    let style = (FONT, 14).into_font();
    for i in 0..=adapter_names.len() {
        let x = ((i as u32 / rows) * col_w) as i32;
        let y = (LEGEND_TOP + (i as u32 % rows) * LEGEND_ROW) as i32;
        // Solid sample for adapters, two dashes for the threshold (x extents of each stroke).
        let (label, strokes): (&str, &[(i32, i32)]) = match adapter_names.get(i) {
            Some(name) => (name, &[(0, 28)]),
            None => ("threshold τ", &[(0, 10), (16, 28)]),
        };
        let color = colors.get(i).copied().unwrap_or(BLACK);
        for &(a, b) in strokes {
            let stroke = vec![(x + a, y), (x + b, y)];
            area.draw(&PathElement::new(stroke, color.stroke_width(2)))?;
        }
        let pos = (x + 34, y - 8);
        area.draw(&Text::new(label.to_string(), pos, style.clone()))?;
    }
    Ok(())
}

const FREEZE_DESC: &str = "SAFE round (shade = last importance, darker = higher; white = training)";

/// Freezing-plot geometry: (label area width, image size). Cells get a fixed pixel size, so
/// long runs and deep models grow the image instead of squashing the rows.
fn freezing_layout(adapter_names: &[String], epochs: usize) -> (u32, (u32, u32)) {
    let n = adapter_names.len().max(1) as u32;
    let e = epochs.max(1) as u32;
    let cell_h = if n > 40 { 14 } else { 22 };
    let cell_w = (640 / e).clamp(14, 60);
    let label_w = adapter_names
        .iter()
        .map(|s| text_width(s, 13))
        .max()
        .unwrap_or(0)
        + 20;
    // The plot area must at least fit the axis description and the title.
    let plot_w = (e * cell_w).max(text_width(FREEZE_DESC, 14) + 20);
    let w = label_w + plot_w + 50;
    let h = n * cell_h + 130;
    (label_w, (w, h))
}

/// Freezing pattern (paper Fig. 5): adapters as rows (first adapter = bottom layer at the
/// bottom), SAFE's rounds as columns (`total_epochs` of them, the name kept from the paper's one
/// round per epoch). A cell is coloured from the round the adapter froze onwards, darker for a
/// higher last importance; white while it still trains.
pub fn plot_freezing(
    path: &Path,
    adapter_names: &[String],
    frozen_at: &[Option<usize>],
    total_epochs: usize,
    last_scores: &[f64],
) -> Result<(), PlotError> {
    let n = adapter_names.len();
    let problem = if frozen_at.len() != n || last_scores.len() != n {
        Some(format!(
            "{n} adapter names but {} freeze epochs and {} scores",
            frozen_at.len(),
            last_scores.len()
        ))
    } else if total_epochs == 0 {
        Some("total_epochs is 0".into())
    } else {
        None
    };
    if let Some(problem) = problem {
        return Err(PlotError::Input {
            path: path.to_path_buf(),
            problem,
        });
    }
    font_ready(path)?;
    let err = draw_err(path);
    let (label_w, size) = freezing_layout(adapter_names, total_epochs);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;

    let frozen: Vec<usize> = (0..n).filter(|&i| frozen_at[i].is_some()).collect();
    let (lo, hi) = frozen
        .iter()
        .map(|&i| last_scores[i])
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    let shade = |v: f64| {
        let t = if hi > lo && v.is_finite() {
            (v - lo) / (hi - lo)
        } else {
            0.5
        };
        // Light to dark blue ("Blues"): low-importance adapters freeze first and stay pale.
        let mix = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
        RGBColor(mix(189.0, 8.0), mix(215.0, 48.0), mix(238.0, 107.0))
    };

    let title = format!("Freezing pattern: {} of {n} adapters frozen", frozen.len());
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(label_w)
        .build_cartesian_2d(0.5..total_epochs as f64 + 0.5, -0.5..n.max(1) as f64 - 0.5)
        .map_err(&err)?;
    let name_at = |v: &f64| {
        let i = v.round();
        let exact = (v - i).abs() < 1e-6 && i >= 0.0;
        adapter_names
            .get(i as usize)
            .filter(|_| exact)
            .cloned()
            .unwrap_or_default()
    };
    let epoch_at = |v: &f64| {
        let i = v.round();
        if (v - i).abs() < 1e-6 && i >= 1.0 {
            format!("{i:.0}")
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(FREEZE_DESC)
        .x_labels(total_epochs.min(20))
        .y_labels(n)
        .x_label_formatter(&epoch_at)
        .y_label_formatter(&name_at)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .draw()
        .map_err(&err)?;

    let grid = RGBColor(200, 200, 200);
    let cells = (0..n).flat_map(|a| (1..=total_epochs).map(move |e| (a, e)));
    chart
        .draw_series(cells.flat_map(|(a, e)| {
            let corners = [
                (e as f64 - 0.5, a as f64 - 0.5),
                (e as f64 + 0.5, a as f64 + 0.5),
            ];
            let fill = match frozen_at[a] {
                Some(f) if e >= f => shade(last_scores[a]),
                _ => WHITE,
            };
            [
                Rectangle::new(corners, fill.filled()),
                Rectangle::new(corners, grid.stroke_width(1)),
            ]
        }))
        .map_err(&err)?;
    root.present().map_err(&err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (width, height) from the PNG signature and IHDR chunk.
    fn png_size(path: &Path) -> (u32, u32) {
        let b = std::fs::read(path).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
        assert_eq!(&b[12..16], b"IHDR");
        let be = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
        (be(16), be(20))
    }

    /// Count of clearly non-white pixels, to prove something (lines, text, cells) was drawn.
    fn inked_pixels(path: &Path) -> usize {
        let img = image::open(path).unwrap().to_rgb8();
        img.pixels()
            .filter(|p| p.0.iter().any(|&c| c < 200))
            .count()
    }

    fn make_names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("layer{}.{}", i / 2, ["q", "v"][i % 2]))
            .collect()
    }

    #[test]
    fn importance_plot_is_a_png_with_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("importance.png");
        let names = make_names(12);
        let scores: Vec<Vec<f64>> = (0..8)
            .map(|e| {
                (0..12)
                    .map(|a| 0.05 + 0.04 * a as f64 / (1.0 + e as f64 * 0.3))
                    .collect()
            })
            .collect();
        let tau: Vec<f64> = (0..8).map(|e| 0.02 + 0.03 * e as f64 / 7.0).collect();
        plot_importance(&path, &names, &scores, &tau).unwrap();
        assert_eq!(png_size(&path), importance_size(&names));
        assert_eq!(png_size(&path).1, IMP_H);
        assert!(inked_pixels(&path) > 5_000);
        // Many adapters: the legend grows extra columns instead of overlapping.
        let many = make_names(60);
        assert!(importance_size(&many).0 > importance_size(&names).0);
        let row = vec![0.1; 61];
        let bad = plot_importance(&path, &many, &[row], &[]).unwrap_err();
        assert!(bad.to_string().contains("importance.png"), "{bad}");
    }

    /// Scores across six decades get a log axis that holds them all, labelled so that 1e-6 does
    /// not read "0.00"; the plot of such scores is drawn.
    #[test]
    fn small_scores_get_a_log_axis_and_readable_labels() {
        let (lo, hi) = log_range([1e-6, 0.3, f64::NAN, 0.0, 2e-4].into_iter());
        assert!(lo < 1e-6 && lo > 1e-7 && hi > 0.3 && hi < 1.0, "{lo} {hi}");
        assert_eq!(log_range([0.0, f64::NAN].into_iter()), (1e-3, 1.0));
        let (lo, hi) = log_range([0.2, 0.2].into_iter());
        assert!(lo < 0.2 && hi > 0.2);
        assert_eq!(importance_label(1e-6), "1e-6");
        assert_eq!(importance_label(0.25), "0.25");
        assert_ne!(importance_label(3e-3), "0.00");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("importance.png");
        let names = make_names(4);
        let scores: Vec<Vec<f64>> = (0..6)
            .map(|e| {
                (0..4)
                    .map(|a| 1e-6 * 10f64.powi(a) / (1.0 + e as f64))
                    .collect()
            })
            .collect();
        plot_importance(&path, &names, &scores, &[1e-5; 6]).unwrap();
        assert!(inked_pixels(&path) > 5_000);
    }

    #[test]
    fn freezing_plot_is_a_png_with_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("freezing.png");
        let names = make_names(12);
        let frozen: Vec<Option<usize>> = (0..12).map(|a| (a < 8).then_some(2 + a / 2)).collect();
        let last: Vec<f64> = (0..12).map(|a| 0.01 * a as f64).collect();
        plot_freezing(&path, &names, &frozen, 10, &last).unwrap();
        let (_, size) = freezing_layout(&names, 10);
        assert_eq!(png_size(&path), size);
        assert!(inked_pixels(&path) > 5_000);
        let bad = plot_freezing(&path, &names, &frozen[1..], 10, &last).unwrap_err();
        assert!(matches!(bad, PlotError::Input { .. }));
        assert!(bad.to_string().contains("freezing.png"), "{bad}");
    }
}
