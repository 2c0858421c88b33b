//! report.svg: quality against size, one point per file, labelled with its generation speed,
//! drawn with plotters' SVG backend (plain SVG, readable in any viewer, no browser needed).

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::compare::Report;

const W: u32 = 900;
const H: u32 = 560;

/// The chart as SVG text: x = size on disk (MB), y = perplexity on the text, each point
/// labelled `name: PPL, N tokens/s generated` (and mean KLD for variants).
pub fn svg(r: &Report) -> Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (W, H)).into_drawing_area();
        draw(&root, r).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    r: &Report,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let sizes: Vec<f64> = r.rows.iter().map(|x| x.size_bytes as f64 / 1e6).collect();
    let ppls: Vec<f64> = r.rows.iter().map(|x| x.ppl).collect();
    let max_x = sizes.iter().cloned().fold(1.0, f64::max) * 1.25;
    let (lo, hi) = ppls
        .iter()
        .cloned()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    let (lo, hi) = if lo.is_finite() && hi.is_finite() {
        let pad = ((hi - lo) * 0.15).max(hi.abs() * 0.02).max(1e-3);
        ((lo - pad).max(0.0), hi + pad)
    } else {
        (0.0, 1.0)
    };
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!("Perplexity against size ({})", r.text),
            ("sans-serif", 20),
        )
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0.0..max_x, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("size on disk (MB)")
        .y_desc("perplexity (lower is better)")
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (i, row) in r.rows.iter().enumerate() {
        let color = if row.is_base { &RED } else { &BLUE };
        let at = (sizes[i], ppls[i]);
        chart.draw_series(std::iter::once(Circle::new(at, 5, color.filled())))?;
        let mut detail = format!(
            "PPL {:.3}, {:.1} t/s generated",
            row.ppl, row.gen_tokens_per_s
        );
        if let Some(k) = row.kld_mean {
            detail.push_str(&format!(", KLD {k:.4}"));
        }
        let name = if row.is_base {
            format!("{} (base)", row.name)
        } else {
            row.name.clone()
        };
        // Labels left of points in the right half, so they stay inside the chart; alternate
        // above and below so neighbours do not overprint.
        let right_half = sizes[i] > max_x / 2.0;
        let (hpos, dx) = if right_half {
            (HPos::Right, -9)
        } else {
            (HPos::Left, 9)
        };
        let dy = if i % 2 == 0 { -26 } else { 6 };
        let style = |size| {
            ("sans-serif", size)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(hpos, VPos::Top))
        };
        chart.draw_series(std::iter::once(
            EmptyElement::at(at)
                + Text::new(name, (dx, dy), style(14))
                + Text::new(detail, (dx, dy + 14), style(12)),
        ))?;
    }
    Ok(())
}
