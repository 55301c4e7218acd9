//! `simulate --plot FILE.png`: SLO attainment and busy share per device class against the
//! offered load, from a sweep of simulations (plotters, PNG).

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::FontStyle;

use super::SimResult;

/// Errors of plotting.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// No font to draw text with.
    #[error(
        "--plot needs a TrueType font; none of {0:?} exists (install fonts-dejavu-core; ./setup.sh does)"
    )]
    NoFont(Vec<PathBuf>),
    /// Drawing or writing failed.
    #[error("plotting to {path}: {message}")]
    Draw {
        /// Output file.
        path: PathBuf,
        /// What.
        message: String,
    },
}

use crate::osd::{FONT_PATHS, system_font};

/// Gives plotters the system font that the on-screen display loads (once, for both).
fn register_font() -> Result<(), PlotError> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        system_font().is_some_and(|f| {
            plotters::style::register_font("sans-serif", FontStyle::Normal, f.as_slice()).is_ok()
        })
    });
    if ok {
        Ok(())
    } else {
        Err(PlotError::NoFont(
            FONT_PATHS.iter().map(PathBuf::from).collect(),
        ))
    }
}

/// Draws attainment per model (and overall) and busy share per class against load.
pub fn plot(path: &Path, title: &str, runs: &[SimResult]) -> Result<(), PlotError> {
    register_font()?;
    let err = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let max_load = runs.iter().map(|r| r.load).fold(0.0, f64::max).max(0.1);
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(700);
    let colour = |i: usize| Palette99::pick(i).to_rgba();

    let mut a = ChartBuilder::on(&left)
        .caption("SLO attainment", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..max_load * 1.02, 0.0..1.02)
        .map_err(|e| err(&e))?;
    a.configure_mesh()
        .x_desc("offered load (fraction of planned)")
        .y_desc("frames on time / offered")
        .draw()
        .map_err(|e| err(&e))?;
    let models = runs.first().map_or(0, |r| r.models.len());
    for m in 0..models {
        let name = runs[0].models[m].name.clone();
        let c = colour(m);
        a.draw_series(LineSeries::new(
            runs.iter().map(|r| (r.load, r.models[m].attainment)),
            c.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    a.draw_series(LineSeries::new(
        runs.iter().map(|r| (r.load, r.attainment)),
        BLACK.stroke_width(3),
    ))
    .map_err(|e| err(&e))?
    .label("all models")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(3)));
    a.draw_series(LineSeries::new(
        [(0.0, 0.99), (max_load * 1.02, 0.99)],
        RED.mix(0.6),
    ))
    .map_err(|e| err(&e))?
    .label("99%")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.mix(0.6)));
    a.configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;

    let mut b = ChartBuilder::on(&right)
        .caption("busy share per device class", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..max_load * 1.02, 0.0..1.02)
        .map_err(|e| err(&e))?;
    b.configure_mesh()
        .x_desc("offered load (fraction of planned)")
        .y_desc("busy device-time / available")
        .draw()
        .map_err(|e| err(&e))?;
    let classes = runs.first().map_or(0, |r| r.busy.len());
    for k in 0..classes {
        let c = colour(k + 5);
        b.draw_series(LineSeries::new(
            runs.iter().map(|r| (r.load, r.busy[k].busy)),
            c.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label(runs[0].busy[k].class.clone())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    b.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
