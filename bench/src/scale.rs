//! Scale curves: B1 (independent `true` steps, 2 agents × 1 slot) and B4 (`noop`,
//! 4 agents × 8 slots) at 1,000, 10,000 and 100,000 steps; per-step time and the
//! controller's peak memory at each size, as a table and a PNG chart.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use plotters::prelude::*;

use crate::cluster::Cluster;
use crate::compare::{self, Shape};
use crate::scenarios::{Options, run_to_end, spec};

/// The sizes of the curves.
pub const SIZES: [usize; 3] = [1_000, 10_000, 100_000];

/// One point of a curve.
pub struct Point {
    pub steps: usize,
    pub makespan: f64,
    /// make's time for the same steps (B1 only, when compared).
    pub make: Option<f64>,
    pub controller_mib: f64,
}

impl Point {
    /// Microseconds per step.
    fn per_step_us(&self) -> f64 {
        self.makespan * 1e6 / self.steps as f64
    }
}

/// Runs both curves; prints their table and draws `chart`.
pub async fn run(o: &Options, chart: &Path) -> anyhow::Result<()> {
    let mut curves: Vec<(&str, Vec<Point>)> = Vec::new();
    for (name, tool, agents) in
        [("B1 shell true", "shell", &[1u32, 1][..]), ("B4 noop", "noop", &[8, 8, 8, 8][..])]
    {
        let mut points = Vec::new();
        for n in SIZES {
            eprintln!("scale: {name} at {n} steps ...");
            let cluster = Cluster::start(
                o.backend,
                o.postgres_url.as_deref(),
                agents,
                Duration::from_secs(1),
                o.pipeline,
            )
            .await?;
            let mut c = cluster.client().await?;
            let (took, _) = run_to_end(&mut c, spec(name, Shape::Independent(n), tool)).await?;
            let make = (o.compare && tool == "shell")
                .then(|| compare::make(Shape::Independent(n), 2))
                .transpose()?
                .map(|d| d.as_secs_f64());
            points.push(Point {
                steps: n,
                makespan: took.as_secs_f64(),
                make,
                controller_mib: cluster.peak_rss().0,
            });
        }
        curves.push((name, points));
    }
    println!();
    println!("## Scale curves");
    println!();
    println!(
        "| scenario | steps | makespan | per step | make | overhead/step vs make | controller peak RSS | per step |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, points) in &curves {
        for p in points {
            let overhead =
                p.make.map_or("-".into(), |m| format!("{:.1}µs", (p.makespan - m) * 1e6 / p.steps as f64));
            println!(
                "| {name} | {} | {:.3}s | {:.1}µs | {} | {overhead} | {:.0} MiB | {:.1} KiB |",
                p.steps,
                p.makespan,
                p.per_step_us(),
                p.make.map_or("-".into(), |m| format!("{m:.3}s")),
                p.controller_mib,
                p.controller_mib * 1024.0 / p.steps as f64,
            );
        }
    }
    draw(&curves, chart)?;
    println!("\nchart: {}", chart.display());
    Ok(())
}

/// What a panel shows of a point.
type Measure = fn(&Point) -> f64;

/// Two panels: time per step, and the controller's peak memory, against steps (log).
pub fn draw(curves: &[(&str, Vec<Point>)], path: &Path) -> anyhow::Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    let colors = [RGBColor(47, 110, 200), RGBColor(214, 69, 61)];
    let panels = [
        (&left, "time per step (µs)", Point::per_step_us as Measure),
        (&right, "controller peak RSS (MiB)", |p: &Point| p.controller_mib),
    ];
    for (area, title, value) in panels {
        let top = curves.iter().flat_map(|(_, ps)| ps.iter().map(value)).fold(1.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d((500f64..200_000f64).log_scale(), 0f64..top)?;
        chart.configure_mesh().x_desc("steps in the run").x_labels(4).y_labels(6).draw()?;
        for ((name, points), color) in curves.iter().zip(colors) {
            let xy: Vec<(f64, f64)> = points.iter().map(|p| (p.steps as f64, value(p))).collect();
            chart
                .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            chart.draw_series(xy.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.9)).border_style(BLACK).draw()?;
    }
    root.present().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The chart's text is set in DejaVu Sans (Debian's fonts-dejavu-core), read once.
fn register_font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let path = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
        let bytes =
            std::fs::read(path).map_err(|e| format!("{path}: {e} (apt-get install fonts-dejavu-core)"))?;
        plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
            .map_err(|_| format!("{path} is not a font plotters can read"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_is_a_png_with_both_curves() {
        if !Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").exists() {
            eprintln!("SKIPPED: no DejaVu font to draw the chart's text with");
            return;
        }
        let curve = |k: f64| {
            SIZES
                .iter()
                .map(|&n| Point {
                    steps: n,
                    makespan: n as f64 * k,
                    make: None,
                    controller_mib: 20.0 + n as f64 / 1e3,
                })
                .collect()
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scale.png");
        draw(&[("a", curve(1e-3)), ("b", curve(1e-4))], &path).unwrap();
        let png = std::fs::read(&path).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(png.len() > 5_000, "something was drawn: {} bytes", png.len());
    }
}
