//! Drawing the figure with plotters: one panel per metric stacked top to bottom, a
//! colour per run; checkpoints as dashed vertical lines in the run's colour, the best
//! checkpoint as a solid line and a ring on the curve of the metric that chose it.
//!
//! Text uses DejaVu Sans embedded in the binary (plotters' `ab_glyph` backend), so the
//! figure looks the same on machines without system fonts; PNGs are encoded by the
//! `png` crate from plotters' RGB buffer.

use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{ImageFormat, Run, best_point, padded};
use crate::Error;

/// An encoded figure.
#[derive(Debug, Clone)]
pub struct Image(Vec<u8>);

impl Image {
    /// The file's bytes (PNG or SVG).
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The font family every text of the figure uses, registered once.
const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // DejaVu Sans parses (it is a fixed asset); a failure would only lose the text.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

/// The largest side drawn: 16384 × 16384 RGB is 768 MiB of buffer already.
const MAX_SIDE: u32 = 16384;

/// Draws `metrics` of `runs` into a `width` × `height` image.
pub fn render(
    runs: &[Run],
    metrics: &[String],
    format: ImageFormat,
    width: u32,
    height: u32,
) -> Result<Image, Error> {
    if width < 200 || height < 100 * u32::try_from(metrics.len()).unwrap_or(u32::MAX) {
        return Err(Error::Usage(format!(
            "--size {width}x{height}: too small for {} panels (at least 200 wide and 100 high \
             per panel)",
            metrics.len()
        )));
    }
    if width > MAX_SIDE || height > MAX_SIDE {
        return Err(Error::Usage(format!(
            "--size {width}x{height}: larger than {MAX_SIDE} pixels on a side"
        )));
    }
    register_font();
    let failed = |e: String| Error::Config(format!("drawing the figure failed: {e}"));
    match format {
        ImageFormat::Svg => {
            let mut text = String::new();
            {
                let root = SVGBackend::with_string(&mut text, (width, height)).into_drawing_area();
                draw(&root, runs, metrics).map_err(|e| failed(e.to_string()))?;
                root.present().map_err(|e| failed(e.to_string()))?;
            }
            Ok(Image(text.into_bytes()))
        }
        ImageFormat::Png => {
            let mut rgb = vec![0u8; width as usize * height as usize * 3];
            {
                let root =
                    BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
                draw(&root, runs, metrics).map_err(|e| failed(e.to_string()))?;
                root.present().map_err(|e| failed(e.to_string()))?;
            }
            encode_png(&rgb, width, height).map_err(|e| failed(e.to_string()))
        }
    }
}

fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Image, png::EncodingError> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    w.write_image_data(rgb)?;
    w.finish()?;
    Ok(Image(out))
}

/// The colour of run `i`: plotters' 99-colour palette, which starts with distinct hues.
fn colour(i: usize) -> RGBColor {
    let (r, g, b) = Palette99::pick(i).rgb();
    RGBColor(r, g, b)
}

type DrawResult<E> = Result<(), DrawingAreaErrorKind<E>>;

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    runs: &[Run],
    metrics: &[String],
) -> DrawResult<DB::ErrorType> {
    root.fill(&WHITE)?;
    let panels = root.split_evenly((metrics.len(), 1));
    for (i, (panel, metric)) in panels.iter().zip(metrics).enumerate() {
        draw_panel(panel, runs, metric, i == 0)?;
    }
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    runs: &[Run],
    metric: &str,
    legend: bool,
) -> DrawResult<DB::ErrorType> {
    let curves: Vec<Vec<(f64, f64)>> = runs.iter().map(|r| r.series(metric)).collect();
    let values = curves.iter().flatten().map(|p| p.1);
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let (y0, y1) = padded(lo, hi);
    let last_step = runs
        .iter()
        .map(|r| r.global_step as f64)
        .chain(curves.iter().flatten().map(|p| p.0))
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(metric, (FONT, 18))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(70)
        // A little room right of the last step, so its markers are not on the frame.
        .build_cartesian_2d(0.0..last_step * 1.02, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .label_style((FONT, 13))
        .y_label_formatter(&|v| tick(*v))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;

    for (i, (run, curve)) in runs.iter().zip(&curves).enumerate() {
        let c = colour(i);
        for &s in &run.checkpoints {
            let s = s as f64;
            chart.draw_series(DashedLineSeries::new(
                [(s, y0), (s, y1)],
                4,
                4,
                c.mix(0.45).stroke_width(1),
            ))?;
        }
        if let Some((s, _)) = run.best {
            let s = s as f64;
            chart.draw_series(LineSeries::new([(s, y0), (s, y1)], c.stroke_width(2)))?;
        }
        chart
            .draw_series(LineSeries::new(curve.iter().copied(), c.stroke_width(2)))?
            .label(run.name.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
        // Sparse curves (evaluations) get a dot at each value.
        if curve.len() <= 60 {
            chart.draw_series(curve.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
        }
        if let Some(p) = best_point(run, metric) {
            chart.draw_series([Circle::new(p, 8, BLACK.stroke_width(2))])?;
        }
    }
    if runs.iter().any(|r| !r.checkpoints.is_empty()) {
        chart
            .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())?
            .label("checkpoint")
            .legend(|(x, y)| PathElement::new([(x + 10, y - 6), (x + 10, y + 6)], BLACK.mix(0.45)));
    }
    if runs.iter().any(|r| r.best.is_some()) {
        chart
            .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())?
            .label("best checkpoint")
            .legend(|(x, y)| Circle::new((x + 10, y), 6, BLACK.stroke_width(2)));
    }
    // One legend, on the top panel: the runs' colours are the same in every panel.
    if !legend {
        return Ok(());
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .draw()?;
    Ok(())
}

/// An axis tick: plain for values of ordinary size, scientific for learning rates.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".to_string()
    } else if !(1e-2..1e5).contains(&a) {
        format!("{v:.1e}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::tick;

    #[test]
    fn ticks_are_readable() {
        assert_eq!(tick(0.0), "0");
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(0.125), "0.125");
        assert_eq!(tick(5e-5), "5.0e-5");
        assert_eq!(tick(3.0), "3");
    }
}
