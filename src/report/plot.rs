//! The loss curve as an SVG string (plotters, SVG backend only: no fonts or bitmaps linked in;
//! the browser renders the labels).
use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// Light raw line (per-step diffusion loss is noisy: it depends on the sampled timestep) under a
/// dark smoothed line that shows the trend.
const RAW: RGBColor = RGBColor(150, 180, 220);
const SMOOTH: RGBColor = RGBColor(20, 70, 160);
const VAL: RGBColor = RGBColor(215, 95, 20);
/// The lines' stroke attributes in the SVG, for tests that count their points.
pub const RAW_STROKE: &str = "stroke=\"#96B4DC\"";
pub const SMOOTH_STROKE: &str = "stroke=\"#1446A0\"";
pub const VAL_STROKE: &str = "stroke=\"#D75F14\"";

/// Centred moving average over a window of about 1/25 of the run (no lag, unlike an EMA, so the
/// smoothed curve lines up with the steps it summarises). Same length as `v`.
pub fn smooth(v: &[f64]) -> Vec<f64> {
    let half = (v.len() / 50).clamp(1, 50);
    (0..v.len())
        .map(|i| {
            let w = &v[i.saturating_sub(half)..(i + half + 1).min(v.len())];
            w.iter().sum::<f64>() / w.len() as f64
        })
        .collect()
}

/// SVG (`<svg …>…</svg>`, no XML prolog, ready to inline in HTML) of the loss per optimizer step:
/// raw and smoothed, axes labelled. Steps with a non-finite loss (skipped steps) are left out.
/// Each line is one `<polyline>` with one point per finite step. `val`, (step, validation loss)
/// pairs, is drawn over them as a third line with dots.
pub fn loss_svg(losses: &[f64], val: &[(usize, f64)], width: u32, height: u32) -> Result<String> {
    let pts: Vec<(f64, f64)> =
        losses.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| ((i + 1) as f64, l)).collect();
    let val: Vec<(f64, f64)> = val.iter().filter(|v| v.1.is_finite()).map(|&(s, l)| (s as f64, l)).collect();
    let smoothed: Vec<(f64, f64)> =
        pts.iter().map(|p| p.0).zip(smooth(&pts.iter().map(|p| p.1).collect::<Vec<_>>())).collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        if pts.is_empty() {
            root.draw(&Text::new(
                "no loss recorded",
                (width as i32 / 2 - 60, height as i32 / 2),
                ("sans-serif", 16).into_font().color(&BLACK),
            ))
            .map_err(plot_err)?;
        } else {
            let (lo, hi) =
                pts.iter().chain(&val).fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
            let pad = if hi > lo { (hi - lo) * 0.05 } else { lo.abs().max(1e-3) * 0.5 };
            let x_max = pts.iter().chain(&val).map(|p| p.0).fold(2.0, f64::max);
            let x_min = if val.iter().any(|p| p.0 < 1.0) { 0.0 } else { 1.0 };
            let mut chart = ChartBuilder::on(&root)
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(64)
                .build_cartesian_2d(x_min..x_max, (lo - pad)..(hi + pad))
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc("optimizer step")
                .y_desc("loss (MSE of predicted noise)")
                .axis_desc_style(("sans-serif", 15))
                .label_style(("sans-serif", 13))
                .light_line_style(RGBColor(238, 238, 238))
                .bold_line_style(RGBColor(215, 215, 215))
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| format!("{y:.3}"))
                .draw()
                .map_err(plot_err)?;
            chart
                .draw_series(LineSeries::new(pts, RAW.stroke_width(1)))
                .map_err(plot_err)?
                .label("loss per step")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RAW.stroke_width(2)));
            chart
                .draw_series(LineSeries::new(smoothed, SMOOTH.stroke_width(2)))
                .map_err(plot_err)?
                .label("moving average")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], SMOOTH.stroke_width(2)));
            if !val.is_empty() {
                chart
                    .draw_series(LineSeries::new(val.clone(), VAL.stroke_width(2)))
                    .map_err(plot_err)?
                    .label("validation loss (held-out images)")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], VAL.stroke_width(2)));
                chart.draw_series(val.iter().map(|&p| Circle::new(p, 3, VAL.filled()))).map_err(plot_err)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .label_font(("sans-serif", 13))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(200, 200, 200))
                .draw()
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("loss plot: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Number of "x,y" pairs in the `points` of every `<polyline>` drawn with `stroke` (the mesh
    /// and axes are polylines too).
    pub(crate) fn polyline_points(svg: &str, stroke: &str) -> Vec<usize> {
        svg.split("<polyline")
            .skip(1)
            .filter(|p| p[..p.find("/>").unwrap_or(p.len())].contains(stroke))
            .filter_map(|p| {
                let start = p.find("points=\"")? + 8;
                let end = start + p[start..].find('"')?;
                Some(p[start..end].split_whitespace().filter(|s| s.contains(',')).count())
            })
            .collect()
    }

    #[test]
    fn smoothing_keeps_length_and_flattens() {
        let v: Vec<f64> = (0..200).map(|i| if i % 2 == 0 { 1.0 } else { 0.0 }).collect();
        let s = smooth(&v);
        assert_eq!(s.len(), 200);
        assert!(s[50..150].iter().all(|x| (x - 0.5).abs() < 0.2), "{:?}", &s[50..60]);
        assert_eq!(smooth(&[]), Vec::<f64>::new());
        assert_eq!(smooth(&[2.0]), vec![2.0]);
    }

    #[test]
    fn svg_has_both_lines_with_a_point_per_step_and_labels() {
        let losses: Vec<f64> = (0..120).map(|i| 0.2 * (-(i as f64) / 40.0).exp() + 0.05).collect();
        let svg = loss_svg(&losses, &[], 800, 360).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        assert!(svg.trim_end().ends_with("</svg>"));
        // Each line, then its legend swatch.
        assert_eq!(polyline_points(&svg, RAW_STROKE), vec![120, 2]);
        assert_eq!(polyline_points(&svg, SMOOTH_STROKE), vec![120, 2]);
        for label in ["optimizer step", "loss (MSE of predicted noise)", "moving average", "loss per step"] {
            assert!(svg.contains(label), "{label}");
        }
    }

    /// The validation loss is a third line over the same steps, from step 0, with a legend.
    #[test]
    fn validation_losses_are_a_third_line() {
        let losses: Vec<f64> = (0..40).map(|i| 0.3 - 0.005 * i as f64).collect();
        let svg = loss_svg(&losses, &[(0, 0.31), (20, 0.25), (40, 0.2)], 800, 360).unwrap();
        assert_eq!(polyline_points(&svg, VAL_STROKE), vec![3, 2]);
        assert!(svg.contains("validation loss (held-out images)"));
        assert_eq!(polyline_points(&svg, RAW_STROKE), vec![40, 2]);
    }

    #[test]
    fn skipped_steps_and_degenerate_runs_still_plot() {
        let svg = loss_svg(&[0.3, f64::NAN, 0.2, f64::INFINITY, 0.1], &[], 400, 300).unwrap();
        assert_eq!(polyline_points(&svg, RAW_STROKE), [3, 2]);
        let flat = loss_svg(&[0.1], &[], 400, 300).unwrap();
        assert_eq!(polyline_points(&flat, SMOOTH_STROKE), [1, 2]);
        let none = loss_svg(&[], &[], 400, 300).unwrap();
        assert!(none.contains("no loss recorded"));
        assert!(polyline_points(&none, RAW_STROKE).is_empty());
    }
}
