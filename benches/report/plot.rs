//! The report's PNG plots (plotters, bitmap backend, pure Rust): grouped bars on a log scale
//! with min–max whiskers. Text needs a TrueType font: `BPFTIME_BENCH_FONT`, else DejaVu Sans or
//! Liberation Sans from the usual places; without one the plots are skipped (noted in the
//! report).

use crate::Entry;
use bpftime_suite::bench::Stats;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use std::path::Path;

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn load_font() -> Result<(), String> {
    let path = std::env::var("BPFTIME_BENCH_FONT")
        .ok()
        .or_else(|| {
            FONTS
                .iter()
                .find(|p| Path::new(p).is_file())
                .map(|p| p.to_string())
        })
        .ok_or("no TrueType font found (set BPFTIME_BENCH_FONT)")?;
    let bytes = std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| format!("{path}: bad font"))
}

/// One series of a grouped bar chart: a name, a colour and one value per category.
type Bars = (&'static str, RGBColor, Vec<Option<Stats>>);

/// Stats minus `base` (an overhead), clamped positive for the log scale.
fn minus(s: Option<Stats>, base: Option<Stats>) -> Option<Stats> {
    let (s, b) = (s?, base?.median);
    Some(Stats {
        median: (s.median - b).max(0.1),
        min: (s.min - b).max(0.1),
        max: (s.max - b).max(0.1),
        n: s.n,
    })
}

fn grouped(
    path: &Path,
    title: &str,
    y_desc: &str,
    cats: &[String],
    series: &[Bars],
) -> Result<(), Box<dyn std::error::Error>> {
    let (mut lo, mut hi) = (f64::INFINITY, 0f64);
    for s in series.iter().flat_map(|s| s.2.iter().flatten()) {
        lo = lo.min(s.min.max(0.05));
        hi = hi.max(s.max);
    }
    if !lo.is_finite() || hi <= 0.0 {
        return Err("nothing to plot".into());
    }
    let width = (260 + cats.len() as u32 * 26 * series.len() as u32).clamp(900, 2000);
    let root = BitMapBackend::new(path, (width, 720)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = cats.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(240)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..n, (lo / 2.0..hi * 12.0).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(y_desc)
        .y_label_formatter(&|v| {
            if *v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v}")
            }
        })
        .label_style(("sans-serif", 15))
        .draw()?;
    let w = 0.8 / series.len() as f64;
    for (k, (name, color, vals)) in series.iter().enumerate() {
        let color = *color;
        let x0 = |i: usize| i as f64 + 0.1 + k as f64 * w;
        chart
            .draw_series(vals.iter().enumerate().filter_map(|(i, s)| {
                let s = (*s)?;
                Some(Rectangle::new(
                    [(x0(i), lo / 2.0), (x0(i) + w * 0.9, s.median)],
                    color.filled(),
                ))
            }))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
        chart.draw_series(vals.iter().enumerate().filter_map(|(i, s)| {
            let s = (*s)?;
            let x = x0(i) + w * 0.45;
            (s.n > 1).then(|| PathElement::new(vec![(x, s.min), (x, s.max)], BLACK.stroke_width(2)))
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    let style = ("sans-serif", 15)
        .into_font()
        .transform(FontTransform::Rotate90)
        .color(&BLACK);
    for (i, c) in cats.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64 + 0.5, lo / 2.0));
        root.draw(&Text::new(c.clone(), (x + 7, y + 8), style.clone()))?;
    }
    root.present()?;
    Ok(())
}

/// Draws every plot into `out`; returns the files written (an error line per failed plot).
pub fn all(out: &Path, entries: &[Entry]) -> Vec<String> {
    if let Err(e) = load_font() {
        eprintln!("plots skipped: {e}");
        return Vec::new();
    }
    let mut files = Vec::new();
    let mut draw = |file: &str, title: &str, y: &str, cats: Vec<String>, series: Vec<Bars>| {
        if cats.is_empty() {
            return;
        }
        match grouped(&out.join(file), title, y, &cats, &series) {
            Ok(()) => files.push(file.to_string()),
            Err(e) => eprintln!("plot {file} failed: {e}"),
        }
    };
    let bpf_c = RGBColor(31, 119, 180);
    let ker_c = RGBColor(214, 39, 40);

    let probes: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.kind == "probe" && e.bpftime.is_some())
        .collect();
    draw(
        "probes.png",
        "Probe overhead per call: bpftime vs kernel (log scale)",
        "ns per call over the bare call",
        probes.iter().map(|e| e.name.clone()).collect(),
        vec![
            (
                "bpftime",
                bpf_c,
                probes
                    .iter()
                    .map(|e| minus(e.bpftime, e.baseline))
                    .collect(),
            ),
            (
                "kernel",
                ker_c,
                probes.iter().map(|e| minus(e.kernel, e.baseline)).collect(),
            ),
        ],
    );

    let other: Vec<&Entry> = entries
        .iter()
        .filter(|e| matches!(e.kind, "syscall" | "map") && e.bpftime.is_some())
        .collect();
    let pick = |e: &Entry, s: Option<Stats>| {
        if e.kind == "syscall" {
            minus(s, e.baseline)
        } else {
            s
        }
    };
    draw(
        "syscalls_maps.png",
        "Syscall tracepoint overhead and map operations: bpftime vs kernel (log scale)",
        "ns per call / operation",
        other.iter().map(|e| e.name.clone()).collect(),
        vec![
            (
                "bpftime",
                bpf_c,
                other.iter().map(|e| pick(e, e.bpftime)).collect(),
            ),
            (
                "kernel",
                ker_c,
                other.iter().map(|e| pick(e, e.kernel)).collect(),
            ),
        ],
    );

    let vm: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.kind == "vm" && e.baseline.is_some())
        .collect();
    let extra = |k: &str| {
        vm.iter()
            .map(|e| e.extra.get(k).copied())
            .collect::<Vec<_>>()
    };
    draw(
        "vm.png",
        "VM suite: time per program run (log scale)",
        "ns per run",
        vm.iter().map(|e| e.name.clone()).collect(),
        vec![
            (
                "native C",
                RGBColor(44, 160, 44),
                vm.iter().map(|e| e.baseline).collect(),
            ),
            ("bpftime JIT", bpf_c, vm.iter().map(|e| e.bpftime).collect()),
            (
                "bpftime JIT (checked)",
                RGBColor(23, 190, 207),
                extra("jit_checked"),
            ),
            ("rbpf JIT", RGBColor(255, 127, 14), extra("rbpf_jit")),
            ("interpreter", RGBColor(148, 103, 189), extra("interpreter")),
        ],
    );
    files
}
