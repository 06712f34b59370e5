//! `bpftime bench`: every benchmark scenario in one process tree, the same BPF object and the
//! same unmodified loader natively against the kernel (root only; otherwise the kernel column
//! says why it is missing) and under bpftime (`bpftime load` + `bpftime start`, current user),
//! then a report: `results.json`, `results.md` and PNG plots in the output folder.
//!
//! Scenarios:
//! - probes: uprobe, uretprobe, uprobe+uretprobe with a count() program
//!   (`examples/uretprobe-counter`) and a uprobe with a ring-buffer event program
//!   (`examples/ringbuf-events`) on `target_function` (`push %rbp`), `nop5_entry` and
//!   `lea_entry` (the kernel single-steps it) of `retvictim -t`;
//! - syscall tracepoints: `syscalls:sys_enter_getpid` and `raw_syscalls:sys_enter`
//!   (`examples/syscall-trace`, victim `syscall-victim -b`);
//! - map operations from programs and from the loader (hash, array, percpu_array): the `maps`
//!   bench binary, its table parsed;
//! - `bpftime load` to first event (ring-buffer loader started, then a victim, until the loader
//!   has its first event) and the agent's memory footprint (RSS/PSS of a victim with and
//!   without the agent);
//! - the VM suite (interpreter, JIT, checked JIT, rbpf JIT, native C): the `jit` bench binary's
//!   summary table, parsed.
//!
//! Each figure is the median of repeated runs with min–max spread; ratios are computed from
//! measurements of this run. Run with `bpftime bench [--quick] [--out DIR]`, or
//! `cargo bench --bench report -- [--quick] [--out DIR]`; under `cargo test --benches` (no
//! `--bench` argument) it does nothing.

use bpftime_suite::bench::{Loader, Stats, Stop, maybe_under_bpftime, run_victim};
use bpftime_suite::{Proc, artifacts, build_example, is_root, workspace_root};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "report/plot.rs"]
mod plot;

/// Command-line options.
#[derive(Debug)]
struct Opts {
    quick: bool,
    out: PathBuf,
}

/// One measured series: values in `unit`.
type Series = Option<Stats>;

/// One row of the report.
#[derive(Debug, Clone)]
pub struct Entry {
    /// `group/scenario`, e.g. `uprobe/count/nop5`.
    pub name: String,
    /// `probe`, `syscall`, `map`, `latency`, `memory`, `vm`.
    pub kind: &'static str,
    /// `ns` (per call or operation) or `kB`.
    pub unit: &'static str,
    /// The reference without bpftime or kernel (bare victim, native code), if any.
    pub baseline: Series,
    /// Native run against the kernel.
    pub kernel: Series,
    /// Under bpftime.
    pub bpftime: Series,
    /// The headline ratio, see `ratio_meaning`.
    pub ratio: Option<f64>,
    /// Min and max of the ratio over the run pairs (pair i: the i-th run of each column).
    pub ratio_spread: Option<(f64, f64)>,
    /// What `ratio` is.
    pub ratio_meaning: &'static str,
    /// Why a column (or the whole scenario) is missing.
    pub skipped: Option<String>,
    /// Other series (e.g. the interpreter and rbpf of the VM suite).
    pub extra: BTreeMap<String, Stats>,
    /// Checks made on the way (events counted, …).
    pub note: String,
}

impl Entry {
    fn new(name: impl Into<String>, kind: &'static str, unit: &'static str) -> Entry {
        Entry {
            name: name.into(),
            kind,
            unit,
            baseline: None,
            kernel: None,
            bpftime: None,
            ratio: None,
            ratio_spread: None,
            ratio_meaning: "",
            skipped: None,
            extra: BTreeMap::new(),
            note: String::new(),
        }
    }

    /// Overhead over the baseline (median − median).
    pub fn overhead(s: Series, base: Series) -> Option<f64> {
        Some(s?.median - base?.median)
    }

    fn to_json(&self) -> Value {
        let st = |s: &Series| {
            s.map_or(
                Value::Null,
                |s| json!({"median": s.median, "min": s.min, "max": s.max, "runs": s.n}),
            )
        };
        let overhead =
            |s: &Series| Entry::overhead(*s, self.baseline).map_or(Value::Null, |v| json!(v));
        json!({
            "name": self.name,
            "kind": self.kind,
            "unit": self.unit,
            "baseline": st(&self.baseline),
            "kernel": st(&self.kernel),
            "bpftime": st(&self.bpftime),
            "kernel_overhead": if self.kind == "probe" || self.kind == "syscall" { overhead(&self.kernel) } else { Value::Null },
            "bpftime_overhead": if self.kind == "probe" || self.kind == "syscall" { overhead(&self.bpftime) } else { Value::Null },
            "ratio": self.ratio,
            "ratio_spread": self.ratio_spread.map(|(a, b)| json!([a, b])),
            "ratio_meaning": self.ratio_meaning,
            "skipped": self.skipped,
            "extra": self.extra.iter().map(|(k, s)| (k.clone(), st(&Some(*s)))).collect::<serde_json::Map<_, _>>(),
            "note": self.note,
        })
    }
}

/// Sizes of one run mode.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    reps: usize,
    /// Calls per victim run (bare and bpftime).
    calls: u64,
    /// Calls per victim run with kernel uprobes (about 1–3 µs each).
    kernel_calls: u64,
    /// Victim calls of the syscall scenarios.
    syscalls: u64,
    latency_reps: usize,
    vm_runs: usize,
    map_runs: usize,
    map_ms: u64,
}

const QUICK: Sizes = Sizes {
    reps: 3,
    calls: 200_000,
    kernel_calls: 20_000,
    syscalls: 100_000,
    latency_reps: 3,
    vm_runs: 1,
    map_runs: 3,
    map_ms: 20,
};

const FULL: Sizes = Sizes {
    reps: 5,
    calls: 1_000_000,
    kernel_calls: 100_000,
    syscalls: 1_000_000,
    latency_reps: 10,
    vm_runs: 3,
    map_runs: 3,
    map_ms: 100,
};

fn parse_args() -> Option<Opts> {
    let mut quick = false;
    let mut out = None;
    let mut bench = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--bench" => bench = true,
            "--out" => out = it.next().map(PathBuf::from),
            s if s.starts_with("--out=") => out = Some(PathBuf::from(&s[6..])),
            _ => {}
        }
    }
    // `cargo test --benches` runs every bench binary without `--bench`: nothing to do here
    // (the smoke test `tests/bench_smoke.rs` runs the quick mode).
    if !bench && out.is_none() && !quick {
        return None;
    }
    let out = out.unwrap_or_else(|| PathBuf::from("bench-results"));
    let out = if out.is_absolute() {
        out
    } else {
        workspace_root().join(out)
    };
    Some(Opts { quick, out })
}

fn main() {
    let Some(opts) = parse_args() else {
        eprintln!("report: run `bpftime bench` or `cargo bench --bench report`");
        return;
    };
    let t0 = Instant::now();
    let sizes = if opts.quick { QUICK } else { FULL };
    std::fs::create_dir_all(&opts.out)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", opts.out.display()));
    let machine = machine();
    eprintln!(
        "bpftime bench ({}), output in {}",
        if opts.quick { "quick" } else { "full" },
        opts.out.display()
    );
    let root = is_root();
    let kernel_skip = (!root).then(|| "kernel: skipped: needs root".to_string());

    // Build everything first, so that the clock of the measurements starts after it.
    let a = artifacts();
    let bins = bench_binaries(&["jit", "maps"]);
    let ret = build_example("uretprobe-counter").expect("examples/uretprobe-counter builds");
    let rb = build_example("ringbuf-events").expect("examples/ringbuf-events builds");
    let sys = build_example("syscall-trace").expect("examples/syscall-trace builds");
    let build_s = t0.elapsed().as_secs_f64();
    eprintln!("built in {build_s:.0} s");
    let t0 = Instant::now();
    let mut entries = Vec::new();

    // Probes.
    let entries_of = [
        ("target", "target_function"),
        ("nop5", "nop5_entry"),
        ("lea", "lea_entry"),
    ];
    for (probe, flags) in [
        ("uprobe", &["-e"][..]),
        ("uretprobe", &["-r"][..]),
        ("uprobe+uretprobe", &[][..]),
    ] {
        for (mode, func) in entries_of {
            let mut args = vec!["-s", "0", "-d", "600"];
            args.extend_from_slice(flags);
            let victim = ret.join("retvictim");
            let v = victim.to_string_lossy().into_owned();
            args.extend([v.as_str(), func]);
            let name = format!("{probe}/count/{mode}");
            eprintln!("[{:>5.1}s] {name}", t0.elapsed().as_secs_f64());
            let e = probe_scenario(
                &name,
                &a.bpftime,
                &ret.join("uretprobe-counter"),
                &args,
                &victim,
                &["-t", "-m", mode],
                sizes,
                root,
                |lines, calls| check_counts(lines, probe, calls),
            );
            entries.push(e);
        }
    }
    for (mode, func) in entries_of {
        let victim = ret.join("retvictim");
        let v = victim.to_string_lossy().into_owned();
        let args = ["-s", "0", "-d", "600", v.as_str(), func];
        let name = format!("uprobe/ringbuf/{mode}");
        eprintln!("[{:>5.1}s] {name}", t0.elapsed().as_secs_f64());
        entries.push(probe_scenario(
            &name,
            &a.bpftime,
            &rb.join("ringbuf-events"),
            &args,
            &victim,
            &["-t", "-m", mode],
            sizes,
            root,
            |lines, _| lines.join(" "),
        ));
    }
    for probe in ["uretprobe", "uprobe+uretprobe"] {
        let mut e = Entry::new(format!("{probe}/ringbuf/*"), "probe", "ns");
        e.skipped = Some(
            "not run: the examples have no ring-buffer program on a uretprobe (ringbuf-events \
             attaches a uprobe only)"
                .into(),
        );
        entries.push(e);
    }

    // Syscall tracepoints.
    for (name, flags) in [
        ("syscall/sys_enter_getpid", &["-g"][..]),
        ("syscall/raw_syscalls:sys_enter", &[][..]),
    ] {
        eprintln!("[{:>5.1}s] {name}", t0.elapsed().as_secs_f64());
        entries.push(syscall_scenario(name, &a.bpftime, &sys, flags, sizes, root));
    }

    // Load-to-first-event latency and memory footprint.
    eprintln!("[{:>5.1}s] latency", t0.elapsed().as_secs_f64());
    entries.push(latency_scenario(&a.bpftime, &rb, &ret, sizes, root));
    eprintln!("[{:>5.1}s] memory", t0.elapsed().as_secs_f64());
    entries.extend(memory_scenario(&a.bpftime, &ret, sizes));

    // Maps and the VM suite, from their bench binaries.
    eprintln!("[{:>5.1}s] maps", t0.elapsed().as_secs_f64());
    entries.extend(map_scenarios(&bins["maps"], sizes));
    eprintln!("[{:>5.1}s] vm", t0.elapsed().as_secs_f64());
    entries.extend(vm_scenarios(&bins["jit"], sizes));

    if let Some(k) = &kernel_skip {
        for e in &mut entries {
            if e.kernel.is_none()
                && e.skipped.is_none()
                && matches!(e.kind, "probe" | "syscall" | "map" | "latency")
            {
                e.skipped = Some(k.clone());
            }
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    eprintln!("[{elapsed:>5.1}s] writing the report");
    let heads = headlines(&entries);
    write_report(&opts, &machine, &entries, &heads, (build_s, elapsed));
    eprintln!(
        "report in {} (measured in {elapsed:.0} s after {build_s:.0} s of builds)",
        opts.out.display()
    );
}

/// Builds the named bench targets of this package (release, as `cargo bench`) and returns
/// their executables.
fn bench_binaries(names: &[&str]) -> BTreeMap<String, PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(workspace_root()).args([
        "bench",
        "-p",
        "bpftime-suite",
        "--no-run",
        "--message-format=json",
    ]);
    for n in names {
        c.args(["--bench", n]);
    }
    let out = c.output().expect("run cargo bench --no-run");
    assert!(
        out.status.success(),
        "building the bench binaries failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut bins = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let name = v["target"]["name"].as_str().unwrap_or_default();
        if let (Some(exe), true) = (v["executable"].as_str(), names.contains(&name)) {
            bins.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    for n in names {
        assert!(bins.contains_key(*n), "cargo built no `{n}` bench binary");
    }
    bins
}

/// Pairwise ratio spread: (k_i − b_i) / (o_i − b_i) over run index i.
fn pair_ratios(base: &[f64], kernel: &[f64], ours: &[f64]) -> Option<(f64, f64)> {
    let r: Vec<f64> = base
        .iter()
        .zip(kernel)
        .zip(ours)
        .map(|((b, k), o)| (k - b) / (o - b).max(0.01))
        .collect();
    let s = Stats::of(&r)?;
    Some((s.min, s.max))
}

/// Bare victim runs, then a bpftime session, then a kernel session (root only), the same
/// loader and victim in each.
#[allow(clippy::too_many_arguments)]
fn probe_scenario(
    name: &str,
    bpftime: &Path,
    loader: &Path,
    loader_args: &[&str],
    victim: &Path,
    victim_args: &[&str],
    sizes: Sizes,
    root: bool,
    check: impl Fn(&[String], u64) -> String,
) -> Entry {
    let run = |under: Option<(&Path, &str)>, n: u64| {
        let mut c = maybe_under_bpftime(under, victim);
        c.args(victim_args).arg(n.to_string());
        run_victim(c, name)
    };
    let bare: Vec<f64> = (0..sizes.reps).map(|_| run(None, sizes.calls)).collect();
    let l = Loader::start(Some(bpftime), "bench", loader, loader_args, Stop::Interrupt);
    let ours: Vec<f64> = (0..sizes.reps)
        .map(|_| run(l.under(bpftime), sizes.calls))
        .collect();
    let lines = l.finish();
    let mut e = Entry::new(name, "probe", "ns");
    e.note = format!(
        "bpftime: {}",
        check(&lines, sizes.calls * sizes.reps as u64)
    );
    let kernel: Option<Vec<f64>> = root.then(|| {
        let l = Loader::start(None, "bench", loader, loader_args, Stop::Interrupt);
        let v = (0..sizes.reps)
            .map(|_| run(None, sizes.kernel_calls))
            .collect();
        let lines = l.finish();
        e.note += &format!(
            "; kernel: {}",
            check(&lines, sizes.kernel_calls * sizes.reps as u64)
        );
        v
    });
    e.baseline = Stats::of(&bare);
    e.bpftime = Stats::of(&ours);
    e.ratio_meaning = "kernel overhead / bpftime overhead (per call, over the bare call)";
    if let Some(k) = &kernel {
        e.kernel = Stats::of(k);
        e.ratio = Some(
            Entry::overhead(e.kernel, e.baseline).unwrap_or(f64::NAN)
                / Entry::overhead(e.bpftime, e.baseline)
                    .unwrap_or(f64::NAN)
                    .max(0.01),
        );
        e.ratio_spread = pair_ratios(&bare, k, &ours);
    }
    e
}

/// What uretprobe-counter counted, against what the victims called.
fn check_counts(lines: &[String], probe: &str, calls: u64) -> String {
    let get = |k: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (en, re) = (get("entries "), get("returns "));
    let want_e = if probe == "uretprobe" { 0 } else { calls };
    let want_r = if probe == "uprobe" { 0 } else { calls };
    let missed = en < want_e || re < want_r;
    // count() is lookup + update on a per-CPU slot: a thread that migrates between the two
    // (userspace cannot disable preemption, unlike the kernel) copies one CPU's count into
    // another's, so the sum can exceed the calls.
    let extra = en > want_e || re > want_r;
    format!(
        "entries {en} returns {re} (victims made {calls} calls){}",
        if missed {
            " MISSED EVENTS"
        } else if extra {
            " (over-count: per-CPU count() is not migration-safe in userspace)"
        } else {
            ""
        }
    )
}

fn syscall_scenario(
    name: &str,
    bpftime: &Path,
    build: &Path,
    flags: &[&str],
    sizes: Sizes,
    root: bool,
) -> Entry {
    let victim = build.join("syscall-victim");
    let run = |under: Option<(&Path, &str)>| {
        let mut c = maybe_under_bpftime(under, &victim);
        c.args(["-b", &sizes.syscalls.to_string()]);
        run_victim(c, name)
    };
    let loader = build.join("syscall-trace");
    let bare: Vec<f64> = (0..sizes.reps).map(|_| run(None)).collect();
    let l = Loader::start(Some(bpftime), "bench-sys", &loader, flags, Stop::Line);
    let ours: Vec<f64> = (0..sizes.reps).map(|_| run(l.under(bpftime))).collect();
    let lines = l.finish();
    let mut e = Entry::new(name, "syscall", "ns");
    e.note = format!("bpftime: {}", syscall_count(&lines, flags));
    let kernel: Option<Vec<f64>> = root.then(|| {
        let l = Loader::start(None, "bench-sys", &loader, flags, Stop::Line);
        let v = (0..sizes.reps).map(|_| run(None)).collect();
        let lines = l.finish();
        e.note += &format!("; kernel: {}", syscall_count(&lines, flags));
        v
    });
    e.baseline = Stats::of(&bare);
    e.bpftime = Stats::of(&ours);
    e.ratio_meaning = "kernel overhead / bpftime overhead (per getpid(), over the bare call)";
    if let Some(k) = &kernel {
        e.kernel = Stats::of(k);
        e.ratio = Some(
            Entry::overhead(e.kernel, e.baseline).unwrap_or(f64::NAN)
                / Entry::overhead(e.bpftime, e.baseline)
                    .unwrap_or(f64::NAN)
                    .max(0.01),
        );
        e.ratio_spread = pair_ratios(&bare, k, &ours);
    }
    e
}

fn syscall_count(lines: &[String], flags: &[&str]) -> String {
    if flags.contains(&"-g") {
        lines
            .iter()
            .find(|l| l.starts_with("getpid_calls "))
            .cloned()
            .unwrap_or_else(|| "no getpid_calls line".into())
    } else {
        // `nr 39 calls N`: getpid is system call 39 on x86_64.
        lines
            .iter()
            .find(|l| l.starts_with("nr 39 "))
            .map(|l| format!("getpid {l}"))
            .unwrap_or_else(|| "no getpid (nr 39) line".into())
    }
}

/// Time from starting the ring-buffer loader to its first event: loader started, `attached`,
/// then a victim started that calls the probed function; the loader (`-n 1`) prints its
/// summary once it has the event.
fn latency_scenario(bpftime: &Path, rb: &Path, ret: &Path, sizes: Sizes, root: bool) -> Entry {
    let victim = ret.join("retvictim");
    let v = victim.to_string_lossy().into_owned();
    let args = [
        "-s",
        "0",
        "-t",
        "1",
        "-n",
        "1",
        v.as_str(),
        "target_function",
    ];
    let once = |bpf: Option<&Path>| -> f64 {
        let t = Instant::now();
        let mut l = Loader::start(
            bpf,
            "bench-lat",
            &rb.join("ringbuf-events"),
            &args,
            Stop::Interrupt,
        );
        let mut c = maybe_under_bpftime(l.under(bpftime), &victim);
        // One call: the loader (`-n 1`) checks that it got exactly one event.
        c.args(["-m", "target", "1"]);
        let vp = Proc::spawn(c, "latency victim");
        l.proc().wait_line(Duration::from_secs(30), |_| true);
        let ns = t.elapsed().as_nanos() as f64;
        let _ = vp.finish(Duration::from_secs(30));
        let _ = l.finish();
        ns
    };
    let ours: Vec<f64> = (0..sizes.latency_reps)
        .map(|_| once(Some(bpftime)))
        .collect();
    let mut e = Entry::new("latency/load-to-first-event", "latency", "ns");
    e.bpftime = Stats::of(&ours);
    e.ratio_meaning = "kernel / bpftime (time from starting the loader to its first event)";
    if root {
        let k: Vec<f64> = (0..sizes.latency_reps).map(|_| once(None)).collect();
        e.kernel = Stats::of(&k);
        e.ratio = Some(
            e.kernel.map_or(f64::NAN, |k| k.median) / e.bpftime.map_or(f64::NAN, |o| o.median),
        );
    }
    e.note = "includes the loader's start, the victim's start (with the agent under bpftime) and the ring buffer wake-up".into();
    e
}

/// `Rss` and `Pss` (kB) of `pid` from `/proc/PID/smaps_rollup`.
fn rss_pss(pid: u32) -> Option<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some((get("Rss:")?, get("Pss:")?))
}

/// RSS/PSS of the victim paused before its loop, with the agent (probes attached) and
/// without.
fn memory_scenario(bpftime: &Path, ret: &Path, sizes: Sizes) -> Vec<Entry> {
    let victim = ret.join("retvictim");
    let v = victim.to_string_lossy().into_owned();
    let loader_args = ["-s", "0", "-d", "600", v.as_str(), "target_function"];
    let dir = std::env::temp_dir();
    let once = |under: Option<(&Path, &str)>, i: usize| -> (f64, f64) {
        let go = dir.join(format!("bpftime-bench-mem-{}-{i}", std::process::id()));
        let _ = std::fs::remove_file(&go);
        let mut c = maybe_under_bpftime(under, &victim);
        c.arg("-W").arg(&go).args(["-m", "target", "1000"]);
        let mut p = Proc::spawn(c, "memory victim");
        p.wait_line(Duration::from_secs(30), |l| l.starts_with("pid "));
        std::thread::sleep(Duration::from_millis(100));
        let m = rss_pss(p.pid()).unwrap_or((f64::NAN, f64::NAN));
        let _ = std::fs::write(&go, b"");
        let _ = p.finish(Duration::from_secs(30));
        let _ = std::fs::remove_file(&go);
        m
    };
    let bare: Vec<(f64, f64)> = (0..sizes.reps).map(|i| once(None, i)).collect();
    let l = Loader::start(
        Some(bpftime),
        "bench-mem",
        &ret.join("uretprobe-counter"),
        &loader_args,
        Stop::Interrupt,
    );
    let ours: Vec<(f64, f64)> = (0..sizes.reps).map(|i| once(l.under(bpftime), i)).collect();
    let _ = l.finish();
    let mut out = Vec::new();
    for (k, pick) in [("rss", 0usize), ("pss", 1)] {
        let f = |v: &[(f64, f64)]| -> Vec<f64> {
            v.iter()
                .map(|p| if pick == 0 { p.0 } else { p.1 })
                .collect()
        };
        let mut e = Entry::new(format!("memory/agent-{k}"), "memory", "kB");
        e.baseline = Stats::of(&f(&bare));
        e.bpftime = Stats::of(&f(&ours));
        e.ratio_meaning = "with agent / without (victim's footprint)";
        e.ratio = Some(
            e.bpftime.map_or(f64::NAN, |s| s.median) / e.baseline.map_or(f64::NAN, |s| s.median),
        );
        e.note = format!(
            "agent delta {:.0} kB; the kernel column does not apply (kernel probes live in the kernel)",
            Entry::overhead(e.bpftime, e.baseline).unwrap_or(f64::NAN)
        );
        out.push(e);
    }
    out
}

/// Splits a Markdown table row into trimmed cells.
fn cells(line: &str) -> Vec<String> {
    let t = line.trim();
    if !t.starts_with('|') {
        return Vec::new();
    }
    t.trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

fn num(s: &str) -> Option<f64> {
    s.trim_end_matches('×').trim().parse().ok()
}

/// Runs `bin --bench` with `env` and returns its stdout lines.
fn run_bench_bin(bin: &Path, env: &[(&str, String)]) -> Vec<String> {
    let mut c = Command::new(bin);
    c.arg("--bench").current_dir(workspace_root());
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(std::process::Stdio::null());
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Map operations (ns per operation, one thread) from the `maps` bench: a program's helper
/// calls (our JIT vs the kernel's program) and the loader's `bpf()` calls (emulated vs kernel).
fn map_scenarios(bin: &Path, sizes: Sizes) -> Vec<Entry> {
    // name -> (bpftime values, kernel values)
    let mut acc: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    // The bench takes the median of its own runs; we repeat it for a spread.
    let outer = if sizes.map_runs > 1 && sizes.map_ms >= 100 {
        3
    } else {
        1
    };
    for _ in 0..outer {
        let lines = run_bench_bin(
            bin,
            &[
                ("BPFTIME_BENCH_RUNS", sizes.map_runs.to_string()),
                ("BPFTIME_BENCH_MS", sizes.map_ms.to_string()),
            ],
        );
        let mut header: Vec<String> = Vec::new();
        for l in &lines {
            let c = cells(l);
            if c.first().is_some_and(|h| h == "map") && c.iter().any(|h| h == "JIT program") {
                header = c;
                continue;
            }
            if header.is_empty() || c.len() != header.len() || c[0].starts_with("---") {
                continue;
            }
            let col = |name: &str| {
                header
                    .iter()
                    .position(|h| h == name)
                    .and_then(|i| num(&c[i]))
            };
            let (map, op, threads) = (&c[0], &c[1], &c[2]);
            if threads != "1" || !["hash", "array", "percpu_array"].contains(&map.as_str()) {
                continue;
            }
            // Millions of operations per second -> ns per operation.
            let ns = |v: Option<f64>| v.filter(|v| *v > 0.0).map(|v| 1000.0 / v);
            for (from, ours, kernel) in [
                ("program", ns(col("JIT program")), ns(col("kernel program"))),
                ("loader", ns(col("emulated bpf()")), ns(col("kernel bpf()"))),
            ] {
                let e = acc.entry(format!("map/{map}/{op}/{from}")).or_default();
                e.0.extend(ours);
                e.1.extend(kernel);
            }
        }
    }
    if acc.is_empty() {
        let mut e = Entry::new("map/*", "map", "ns");
        e.skipped = Some("the maps bench printed no table this report understands".into());
        return vec![e];
    }
    acc.into_iter()
        .map(|(name, (ours, kernel))| {
            let mut e = Entry::new(name.clone(), "map", "ns");
            e.bpftime = Stats::of(&ours);
            e.kernel = Stats::of(&kernel);
            e.ratio_meaning = "kernel / bpftime (ns per operation)";
            e.ratio = match (e.kernel, e.bpftime) {
                (Some(k), Some(o)) => Some(k.median / o.median),
                _ => None,
            };
            e.note = if name.ends_with("/program") {
                "a program doing map helper calls: our JIT + runtime helpers vs the same bytecode in the kernel (BPF_PROG_TEST_RUN)".into()
            } else {
                "the loader's bpf() map calls: emulated by the syscall server vs the kernel's bpf()".into()
            };
            e
        })
        .collect()
}

/// The VM suite from the `jit` bench's summary table: ns per program run for native C, our
/// JIT (unchecked and checked), rbpf's JIT and our interpreter.
fn vm_scenarios(bin: &Path, sizes: Sizes) -> Vec<Entry> {
    let engines = ["native", "jit", "jit checked", "rbpf jit", "interpreter"];
    let mut acc: BTreeMap<String, BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
    for _ in 0..sizes.vm_runs {
        let lines = run_bench_bin(bin, &[("BPFTIME_BENCH_SUMMARY_ONLY", "1".into())]);
        let mut header: Vec<String> = Vec::new();
        for l in &lines {
            let c = cells(l);
            if c.first().is_some_and(|h| h == "program") && c.iter().any(|h| h == "native ns") {
                header = c;
                continue;
            }
            if c.first().is_some_and(|h| h == "program") {
                header.clear();
                continue;
            }
            if header.is_empty() || c.len() != header.len() || c[0].starts_with("---") {
                continue;
            }
            for eng in engines {
                let i = header.iter().position(|h| *h == format!("{eng} ns"));
                if let Some(v) = i.and_then(|i| num(&c[i])) {
                    acc.entry(c[0].clone())
                        .or_default()
                        .entry(eng)
                        .or_default()
                        .push(v);
                }
            }
        }
    }
    if acc.is_empty() {
        let mut e = Entry::new("vm/*", "vm", "ns");
        e.skipped = Some("the jit bench printed no table this report understands".into());
        return vec![e];
    }
    let mut out = Vec::new();
    let mut logs: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for (prog, by) in &acc {
        let mut e = Entry::new(format!("vm/{prog}"), "vm", "ns");
        e.baseline = by.get("native").and_then(|v| Stats::of(v));
        e.bpftime = by.get("jit").and_then(|v| Stats::of(v));
        for eng in ["jit checked", "rbpf jit", "interpreter"] {
            if let Some(s) = by.get(eng).and_then(|v| Stats::of(v)) {
                e.extra.insert(eng.replace(' ', "_"), s);
            }
        }
        e.ratio_meaning = "bpftime JIT / native C (time per program run)";
        if let (Some(b), Some(o)) = (e.baseline, e.bpftime) {
            e.ratio = Some(o.median / b.median);
            for eng in engines.iter().skip(1) {
                if let Some(s) = by.get(eng).and_then(|v| Stats::of(v)) {
                    let l = logs.entry(eng).or_default();
                    l.0 += (s.median / b.median).ln();
                    l.1 += 1;
                }
            }
        }
        e.note = "kernel column: not applicable (no kernel JIT timing here)".into();
        out.push(e);
    }
    let mut g = Entry::new("vm/geomean", "vm", "ratio");
    g.ratio_meaning = "geometric mean over programs of engine / native C";
    for (eng, (sum, n)) in &logs {
        let gm = (sum / *n as f64).exp();
        let s = Stats {
            median: gm,
            min: gm,
            max: gm,
            n: *n,
        };
        if *eng == "jit" {
            g.ratio = Some(gm);
        } else {
            g.extra.insert(eng.replace(' ', "_"), s);
        }
    }
    g.note = "ratios, not times".into();
    out.push(g);
    out
}

/// Machine, kernel, CPU and commit.
fn machine() -> BTreeMap<&'static str, String> {
    let sh = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .current_dir(workspace_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|m| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let dirty = !sh("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    let mut m = BTreeMap::new();
    m.insert("date", sh("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]));
    m.insert("host", read("/proc/sys/kernel/hostname"));
    m.insert(
        "kernel",
        format!(
            "{} {}",
            read("/proc/sys/kernel/ostype"),
            read("/proc/sys/kernel/osrelease")
        ),
    );
    m.insert("arch", std::env::consts::ARCH.to_string());
    m.insert("cpu", cpu);
    m.insert(
        "cpus",
        std::thread::available_parallelism()
            .map_or(0, |n| n.get())
            .to_string(),
    );
    m.insert(
        "commit",
        format!(
            "{}{}",
            sh("git", &["rev-parse", "--short=12", "HEAD"]),
            if dirty {
                " (with uncommitted changes)"
            } else {
                ""
            }
        ),
    );
    m.insert("load_before", read("/proc/loadavg"));
    m.insert(
        "user",
        if is_root() {
            "root".into()
        } else {
            format!("uid {}", bpftime_suite::unprivileged_uid())
        },
    );
    m
}

/// Headline figures against the targets of the attach and JIT issues.
fn headlines(entries: &[Entry]) -> Vec<(String, String, Option<bool>)> {
    let find = |n: &str| entries.iter().find(|e| e.name == n);
    let mut h = Vec::new();
    if let Some(e) = find("uprobe/count/nop5") {
        let ov = Entry::overhead(e.bpftime, e.baseline);
        h.push((
            "uprobe on nop5: kernel/bpftime overhead ≥ 40×".into(),
            e.ratio
                .map_or("kernel not measured".into(), |r| format!("{r:.1}×")),
            e.ratio.map(|r| r >= 40.0),
        ));
        h.push((
            "uprobe on nop5: bpftime overhead ≤ 25 ns".into(),
            ov.map_or("–".into(), |v| format!("{v:.1} ns")),
            ov.map(|v| v <= 25.0),
        ));
    }
    if let Some(e) = find("uretprobe/count/nop5") {
        h.push((
            "uretprobe on nop5: kernel/bpftime overhead ≥ 40×".into(),
            e.ratio
                .map_or("kernel not measured".into(), |r| format!("{r:.1}×")),
            e.ratio.map(|r| r >= 40.0),
        ));
    }
    if let Some(e) = find("syscall/sys_enter_getpid") {
        let frac = e.ratio.map(|r| 1.0 / r);
        h.push((
            "sys_enter_getpid: bpftime overhead ≤ 1/4 of the kernel's".into(),
            frac.map_or("kernel not measured".into(), |f| {
                format!("{f:.2} of the kernel's")
            }),
            frac.map(|f| f <= 0.25),
        ));
    }
    if let Some(e) = find("vm/geomean") {
        h.push((
            "JIT geomean ≤ 1.5× native".into(),
            e.ratio.map_or("–".into(), |r| format!("{r:.2}×")),
            e.ratio.map(|r| r <= 1.5),
        ));
    }
    h
}

fn fmt_stats(s: &Series, unit: &str) -> String {
    match s {
        None => "–".into(),
        Some(s) => {
            let p = |v: f64| {
                if unit == "ns" && v >= 100_000.0 {
                    format!("{:.2} ms", v / 1e6)
                } else if v.abs() >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.1}")
                }
            };
            if s.n > 1 {
                format!("{} ({}–{})", p(s.median), p(s.min), p(s.max))
            } else {
                p(s.median)
            }
        }
    }
}

fn write_report(
    opts: &Opts,
    machine: &BTreeMap<&'static str, String>,
    entries: &[Entry],
    heads: &[(String, String, Option<bool>)],
    (build_s, elapsed): (f64, f64),
) {
    let mut m = machine.clone();
    m.insert(
        "load_after",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string(),
    );
    let json = json!({
        "mode": if opts.quick { "quick" } else { "full" },
        "machine": m,
        "build_s": build_s,
        "measure_s": elapsed,
        "headlines": heads.iter().map(|(t, v, ok)| json!({"target": t, "measured": v, "met": ok})).collect::<Vec<_>>(),
        "scenarios": entries.iter().map(Entry::to_json).collect::<Vec<_>>(),
    });
    let p = opts.out.join("results.json");
    std::fs::write(
        &p,
        serde_json::to_string_pretty(&json).unwrap_or_default() + "\n",
    )
    .unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));

    let mut md = String::new();
    md += &format!(
        "# bpftime bench ({} mode)\n\n{} · {} · {} CPUs · kernel {} · commit {} · {} · measured in \
         {:.0} s (after {build_s:.0} s of builds) · load average before: {}\n\n",
        if opts.quick { "quick" } else { "full" },
        m["date"],
        m["cpu"],
        m["cpus"],
        m["kernel"],
        m["commit"],
        m["user"],
        elapsed,
        m["load_before"]
    );
    md += "## Headlines\n\n| target | measured | met |\n|---|---:|---|\n";
    for (t, v, ok) in heads {
        md += &format!(
            "| {t} | {v} | {} |\n",
            ok.map_or("–", |b| if b { "yes" } else { "no" })
        );
    }
    md += "\nMedians with (min–max) over the runs; probe and syscall rows are ns per call of the victim \
           (its thread's CPU time, user + system, so the kernel's probe work counts), \
           the overheads are over the bare call; map rows are ns per operation; VM rows ns per program run \
           (baseline: native C, bpftime: our JIT); memory rows kB.\n\n";
    md += "| scenario | unit | baseline | kernel | bpftime | kernel overhead | bpftime overhead | ratio | note |\n";
    md += "|---|---|---:|---:|---:|---:|---:|---:|---|\n";
    for e in entries {
        let ov = |s: &Series| {
            if matches!(e.kind, "probe" | "syscall") {
                Entry::overhead(*s, e.baseline).map_or("–".into(), |v| format!("{v:.1}"))
            } else {
                "".into()
            }
        };
        let mut note = e.note.clone();
        if let Some(s) = &e.skipped {
            note = if note.is_empty() {
                s.clone()
            } else {
                format!("{s}; {note}")
            };
        }
        for (k, s) in &e.extra {
            note += &format!("; {k}: {}", fmt_stats(&Some(*s), e.unit));
        }
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            e.name,
            e.unit,
            fmt_stats(&e.baseline, e.unit),
            fmt_stats(&e.kernel, e.unit),
            fmt_stats(&e.bpftime, e.unit),
            ov(&e.kernel),
            ov(&e.bpftime),
            e.ratio.map_or("–".into(), |r| format!("{r:.2}×")),
            note.replace('|', "/"),
        );
    }
    md += "\nRatio column: probes and syscalls: kernel overhead / bpftime overhead; maps and latency: \
           kernel / bpftime; VM: JIT / native; memory: with agent / without.\n";
    let plots = plot::all(&opts.out, entries);
    md += "\n## Plots\n\n";
    for p in &plots {
        md += &format!("![{p}]({p})\n\n");
    }
    let p = opts.out.join("results.md");
    std::fs::write(&p, md).unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));
}
