//! Smoke run of `bpftime bench --quick --out DIR`: every scenario ran (or says why it was
//! skipped), the loaders counted every call, and results.json, results.md and the PNG plots
//! were written. No timing assertions.

use bpftime_suite::{artifacts, build_example, is_root};
use std::process::Command;

/// Scenarios the report must contain, one of each kind at least.
const EXPECTED: &[&str] = &[
    "uprobe/count/target",
    "uprobe/count/nop5",
    "uprobe/count/lea",
    "uretprobe/count/nop5",
    "uprobe+uretprobe/count/nop5",
    "uprobe/ringbuf/nop5",
    "syscall/sys_enter_getpid",
    "syscall/raw_syscalls:sys_enter",
    "map/hash/lookup/program",
    "map/array/update/loader",
    "map/percpu_array/lookup/program",
    "latency/load-to-first-event",
    "memory/agent-rss",
    "memory/agent-pss",
    "vm/geomean",
];

#[test]
fn quick_bench_writes_a_complete_report() {
    // The report builds these; a missing toolchain is a skip outside CI.
    for ex in ["uretprobe-counter", "ringbuf-events", "syscall-trace"] {
        if build_example(ex).is_none() {
            return;
        }
    }
    let a = artifacts();
    let out = std::env::temp_dir().join(format!("bpftime-bench-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let st = Command::new(&a.bpftime)
        .args(["bench", "--quick", "--out"])
        .arg(&out)
        .status()
        .expect("run bpftime bench");
    assert!(st.success(), "bpftime bench --quick failed: {st}");

    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("results.json")).expect("results.json written"),
    )
    .expect("results.json is JSON");
    for k in ["date", "kernel", "cpu", "commit"] {
        assert!(
            json["machine"][k].as_str().is_some_and(|s| !s.is_empty()),
            "machine.{k} missing: {}",
            json["machine"]
        );
    }
    let scenarios = json["scenarios"].as_array().expect("scenarios array");
    let names: Vec<&str> = scenarios
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    for want in EXPECTED {
        assert!(
            names.contains(want),
            "scenario {want} missing; have {names:?}"
        );
    }
    for s in scenarios {
        let name = s["name"].as_str().unwrap_or("?");
        let skipped = s["skipped"].as_str();
        let measured = s["bpftime"]["median"].is_number() || s["ratio"].is_number();
        assert!(
            measured || skipped.is_some_and(|r| !r.is_empty()),
            "{name}: neither measured nor skipped with a reason: {s}"
        );
        let note = s["note"].as_str().unwrap_or_default();
        assert!(!note.contains("MISSED EVENTS"), "{name}: {note}");
        if matches!(
            s["kind"].as_str(),
            Some("probe" | "syscall" | "map" | "latency")
        ) && measured
        {
            if is_root() {
                assert!(
                    s["kernel"]["median"].is_number(),
                    "{name}: no kernel figure as root: {s}"
                );
            } else {
                assert!(
                    skipped.is_some_and(|r| r.contains("needs root")),
                    "{name}: kernel column neither measured nor marked as needing root: {s}"
                );
            }
        }
    }
    let md = std::fs::read_to_string(out.join("results.md")).expect("results.md written");
    assert!(
        md.contains("| scenario |"),
        "results.md has no table:\n{md}"
    );
    for png in ["probes.png", "syscalls_maps.png", "vm.png"] {
        let bytes = std::fs::read(out.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{png} is not a PNG"
        );
        assert!(md.contains(png), "results.md does not show {png}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
