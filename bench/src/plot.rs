//! SVG plots from result JSON: throughput and latency percentiles against the swept parameter,
//! and the cost of idle shards.

use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::prelude::*;

use crate::sweep::{IdleResult, SweepResult};

const SIZE: (u32, u32) = (900, 540);
const COLORS: [RGBColor; 5] =
    [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44), RGBColor(148, 103, 189), RGBColor(255, 127, 14)];

/// One line of a chart.
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

fn draw<Y>(path: &Path, title: &str, x_label: &str, y_label: &str, lines: &[Line], y: Y) -> anyhow::Result<()>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let xs = lines.iter().flat_map(|l| l.points.iter().map(|p| p.0));
    let (x0, x1) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    anyhow::ensure!(x0.is_finite() && x1.is_finite() && x0 > 0.0, "{title}: nothing to plot");
    let x_range = (x0 / 1.3..x1 * 1.3).log_scale();
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(x_range, y)
        .map_err(|e| anyhow::anyhow!("{title}: {e}"))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|x| format!("{}", x.round()))
        .draw()
        .map_err(|e| anyhow::anyhow!("{title}: {e}"))?;
    for (i, line) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(line.points.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{title}: {e}"))?
            .label(line.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(line.points.iter().map(|p| Circle::new(*p, 3, color.filled()))).map_err(|e| anyhow::anyhow!("{title}: {e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| anyhow::anyhow!("{title}: {e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(())
}

fn max_y(lines: &[Line]) -> f64 {
    lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)).fold(0.0, f64::max)
}

/// A chart with a linear y axis from zero.
pub fn linear(path: &Path, title: &str, x_label: &str, y_label: &str, lines: &[Line]) -> anyhow::Result<()> {
    let top = max_y(lines).max(1e-9) * 1.15;
    draw(path, title, x_label, y_label, lines, 0.0..top)
}

/// A chart with a logarithmic y axis (for latency percentiles, which span decades).
pub fn logarithmic(path: &Path, title: &str, x_label: &str, y_label: &str, lines: &[Line]) -> anyhow::Result<()> {
    let low = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)).filter(|v| *v > 0.0).fold(f64::MAX, f64::min);
    let low = if low == f64::MAX { 0.01 } else { low / 1.5 };
    let top = max_y(lines).max(low * 10.0) * 1.5;
    draw(path, title, x_label, y_label, lines, (low..top).log_scale())
}

/// `PARAM-throughput.svg` and `PARAM-latency.svg` for a sweep, in `dir`.
pub fn sweep(result: &SweepResult, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let param = result.param.name();
    let x_label = result.param.axis();
    let xs: Vec<f64> = result.points.iter().map(|p| p.value as f64).collect();
    let col = |f: &dyn Fn(&crate::run::RunResult) -> f64| -> Vec<(f64, f64)> {
        xs.iter().copied().zip(result.points.iter().map(|p| f(&p.result))).collect()
    };
    let tput = dir.join(format!("{param}-throughput.svg"));
    let what = &result.label;
    linear(
        &tput,
        &format!("throughput vs {param} ({what})"),
        x_label,
        "operations per second",
        &[Line { label: "ops/s".into(), points: col(&|r| r.ops_per_sec) }],
    )?;
    let lat = dir.join(format!("{param}-latency.svg"));
    let ms = |us: u64| us as f64 / 1000.0;
    logarithmic(
        &lat,
        &format!("latency vs {param} ({what})"),
        x_label,
        "latency (ms, log scale)",
        &[
            Line { label: "p50".into(), points: col(&|r| ms(r.p50_us)) },
            Line { label: "p99".into(), points: col(&|r| ms(r.p99_us)) },
            Line { label: "p99.9".into(), points: col(&|r| ms(r.p999_us)) },
        ],
    )?;
    Ok(vec![tput, lat])
}

/// `idle-cpu.svg` and `idle-memory.svg` for an idle-shard measurement, in `dir`.
pub fn idle(result: &IdleResult, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let xs = |f: &dyn Fn(&crate::sweep::IdlePoint) -> f64| -> Vec<(f64, f64)> {
        result.points.iter().map(|p| (p.shards as f64, f(p))).collect()
    };
    let cpu = dir.join("idle-cpu.svg");
    linear(
        &cpu,
        &format!("CPU of an idle node vs shards ({} nodes)", result.nodes),
        "shards in the cluster",
        "CPU % of one core, per node",
        &[
            Line { label: "mean per node".into(), points: xs(&|p| p.cpu_percent_mean) },
            Line { label: "busiest node".into(), points: xs(&|p| p.cpu_percent_max) },
        ],
    )?;
    let mem = dir.join("idle-memory.svg");
    linear(
        &mem,
        &format!("memory of an idle node vs shards ({} nodes)", result.nodes),
        "shards in the cluster",
        "resident memory per node (MiB)",
        &[
            Line { label: "mean per node".into(), points: xs(&|p| p.rss_mib_mean) },
            Line { label: "largest node".into(), points: xs(&|p| p.rss_mib_max) },
        ],
    )?;
    Ok(vec![cpu, mem])
}
