//! The example guests of `examples/wasm` end to end, as uid 65534 (when run as root):
//! `bpftime wasm run` loads a guest whose BPF object is attached by the agent in a victim
//! started with `bpftime start`; the guest's WASI opens are counted and one is denied; an
//! interrupted guest removes what it put in the store.

mod wasm_support;

use bpftime_suite::{Proc, TestStore, artifacts, build_example, unprivileged};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;
use wasm_support::{bpftime_wasm, example_guests};

const T: Duration = Duration::from_secs(60);

/// The `bpftime list` lines after the store's own; `None` while the store does not exist.
fn try_listed(store: &TestStore) -> Option<Vec<String>> {
    let out = unprivileged(&artifacts().bpftime)
        .args(["list", "--store", &store.name])
        .output()
        .expect("run bpftime list");
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    })
}

/// [`try_listed`] of a store that exists.
fn listed(store: &TestStore) -> Vec<String> {
    try_listed(store).expect("bpftime list of an existing store")
}

#[test]
fn uprobe_events_guest_gets_every_call_of_a_victim_through_bpftime_wasm_run() {
    let Some(guests) = example_guests() else {
        return;
    };
    let Some(victim_dir) = build_example("uprobe-counter") else {
        return;
    };
    let victim = victim_dir.join("victim");
    let a = artifacts();
    let store = TestStore::new("wasm-uprobe");
    const N: usize = 100;

    // The guest, through the CLI's `bpftime wasm run` (which execs bpftime-wasm).
    let mut cmd = unprivileged(&a.bpftime);
    cmd.args(["wasm", "run", "--store", &store.name, "--no-status"])
        .arg(guests.join("uprobe_events.wasm"))
        .arg(&victim)
        .arg(N.to_string());
    let mut guest = Proc::spawn(cmd, "uprobe_events.wasm");
    guest.wait_line(T, |l| l.starts_with("attached count_calls to "));

    // The victim, with the agent: it attaches at start and the calls are counted.
    let mut v = unprivileged(&a.bpftime);
    v.args(["start", "--store", &store.name, "--"])
        .arg(&victim)
        .arg(N.to_string());
    let victim_out = Proc::spawn(v, "victim").finish(T);
    assert!(
        victim_out.iter().any(|l| l == &format!("calls {N}")),
        "{victim_out:?}"
    );

    let lines = guest.finish(T);
    let events: Vec<&String> = lines.iter().filter(|l| l.starts_with("event ")).collect();
    assert_eq!(
        events.len(),
        N,
        "one record per call:\n{}",
        lines.join("\n")
    );
    let pid: u32 = events[0]
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            **e,
            format!("event pid {pid} arg {i} count {}", i + 1),
            "records in call order"
        );
    }
    assert!(lines.contains(&format!("pid {pid} calls {N}")), "{lines:?}");
    let sum = N * (N - 1) / 2;
    assert!(
        lines.contains(&format!("total_calls {N} arg_sum {sum}")),
        "{lines:?}"
    );
    // The guest closed its object: the store is empty again.
    assert_eq!(listed(&store), Vec::<String>::new());
}

#[test]
fn wasi_guard_guest_counts_its_opens_and_one_is_denied() {
    let Some(guests) = example_guests() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("bpftime-wasi-guard-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in ["a.txt", "secret.txt"] {
        std::fs::write(dir.join(f), "x").unwrap();
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let store = TestStore::new("wasm-wasi");
    let mut cmd = unprivileged(bpftime_wasm());
    cmd.args(["run", "--store", &store.name, "--no-status", "--dir"])
        .arg(format!("{}::/data", dir.display()))
        .arg(guests.join("wasi_guard.wasm"))
        .args([
            "secret.txt",
            "/data/a.txt",
            "/data/secret.txt",
            "/data/missing.txt",
            "/data/a.txt",
        ]);
    let lines = Proc::spawn(cmd, "wasi_guard.wasm").finish(T);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        lines,
        [
            "open /data/a.txt: ok",
            "open /data/secret.txt: denied (EACCES)",
            "open /data/missing.txt: error 44", // WASI's ENOENT: the open really happened
            "open /data/a.txt: ok",
            "opens 4 denied 1",
        ]
    );
}

#[test]
fn an_interrupted_guest_detaches_and_removes_its_objects() {
    let Some(guests) = example_guests() else {
        return;
    };
    let Some(victim_dir) = build_example("uprobe-counter") else {
        return;
    };
    let store = TestStore::new("wasm-sigint");
    let mut cmd = unprivileged(bpftime_wasm());
    cmd.args(["run", "--store", &store.name, "--no-status"])
        .arg(guests.join("uprobe_events.wasm"))
        .arg(victim_dir.join("victim"))
        .arg("1000000");
    let mut guest = Proc::spawn(cmd, "uprobe_events.wasm");
    guest.wait_line(T, |l| l.starts_with("attached"));
    let objects = listed(&store);
    assert!(
        objects.iter().any(|l| l.contains("count_calls")),
        "the program is in the store: {objects:?}"
    );
    send_signal(guest.pid(), libc::SIGINT);
    let st = bpftime_suite::poll(T, "the guest to exit", || guest.child.try_wait().unwrap());
    assert_eq!(st.code(), Some(130), "interrupted");
    assert_eq!(listed(&store), Vec::<String>::new(), "nothing left behind");
    assert!(Path::new(store.path()).exists());
}

/// `kill -SIG PID` (the `kill` command keeps this file free of unsafe code).
fn send_signal(pid: u32, sig: i32) {
    let st = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid}");
}

#[test]
fn opensnoop_guest_traces_openat_in_a_victim_through_syscall_tracepoints() {
    let Some(guests) = example_guests() else {
        return;
    };
    let a = artifacts();
    let store = TestStore::new("wasm-opensnoop");
    let file = std::env::temp_dir().join(format!("bpftime-opensnoop-{}.txt", std::process::id()));
    std::fs::write(&file, "x\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let missing = format!("/tmp/bpftime-opensnoop-missing-{}", std::process::id());

    let mut cmd = unprivileged(bpftime_wasm());
    cmd.args(["run", "--store", &store.name, "--no-status"])
        .arg(guests.join("opensnoop.wasm"))
        .args(["-x", &missing]);
    let mut guest = Proc::spawn(cmd, "opensnoop.wasm");
    guest.wait_line(T, |l| l.starts_with("PID"));

    let mut v = unprivileged(&a.bpftime);
    v.args(["start", "--store", &store.name, "--", "cat"])
        .arg(&file)
        .arg(&missing);
    let out = v.output().expect("run cat under bpftime start");
    let _ = std::fs::remove_file(&file);
    assert_eq!(out.status.code(), Some(1), "cat fails on the missing file");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "x\n");

    let lines = guest.finish(T);
    let ours: Vec<Vec<&str>> = lines
        .iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() == 5 && f[1] == "cat")
        .collect();
    let found = |path: &str| {
        ours.iter()
            .find(|f| f[4] == path)
            .unwrap_or_else(|| panic!("no open of {path}:\n{}", lines.join("\n")))
    };
    let ok = found(file.to_str().unwrap());
    assert!(ok[2].parse::<i32>().unwrap() >= 3 && ok[3] == "0", "{ok:?}");
    let bad = found(&missing);
    assert_eq!((bad[2], bad[3]), ("-1", "2"), "ENOENT");
    assert_eq!(ok[0], bad[0], "same pid");
    assert_eq!(listed(&store), Vec::<String>::new());
}

#[test]
fn a_guest_trapping_mid_trace_ends_alone_and_the_victim_runs_on() {
    let Some(guests) = example_guests() else {
        return;
    };
    let Some(victim_dir) = build_example("uprobe-counter") else {
        return;
    };
    let victim = victim_dir.join("victim");
    let a = artifacts();
    let store = TestStore::new("wasm-trap");
    // A guest that attaches uprobe_events' count_calls to the victim, then polls its ring
    // buffer with a callback that traps on the first record.
    let object = std::fs::read(guests.join("uprobe_events.bpf.o")).unwrap();
    let target = format!("{}:target_function", victim.display());
    let esc = |b: &[u8]| b.iter().map(|b| format!("\\{b:02x}")).collect::<String>();
    let src = format!(
        r#"(module
  (import "wasm_bpf" "wasm_load_bpf_object" (func $load (param i32 i32) (result i64)))
  (import "wasm_bpf" "wasm_attach_bpf_program" (func $attach (param i64 i32 i32) (result i32)))
  (import "wasm_bpf" "wasm_bpf_map_fd_by_name" (func $fd (param i64 i32) (result i32)))
  (import "wasm_bpf" "wasm_bpf_buffer_poll"
    (func $poll (param i64 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 4)
  (table (export "__indirect_function_table") 2 funcref)
  (elem (i32.const 1) $boom)
  (data (i32.const 1024) "count_calls\00")
  (data (i32.const 1536) "events\00")
  (data (i32.const 2048) "{target}\00")
  (data (i32.const 65536) "{obj}")
  (func $boom (param i32 i32 i32) (result i32) unreachable)
  (func (export "_start") (local $h i64)
    (local.set $h (call $load (i32.const 65536) (i32.const {len})))
    (if (i64.eqz (local.get $h)) (then (unreachable)))
    (if (call $attach (local.get $h) (i32.const 1024) (i32.const 2048)) (then (unreachable)))
    (drop (call $poll (local.get $h) (call $fd (local.get $h) (i32.const 1536)) (i32.const 1)
      (i32.const 0) (i32.const 4096) (i32.const 64) (i32.const -1))))
)"#,
        obj = esc(&object),
        len = object.len(),
    );
    let module = std::env::temp_dir().join(format!("bpftime-trap-{}.wasm", std::process::id()));
    std::fs::write(&module, wasm_support::wat(&src)).unwrap();
    std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o644)).unwrap();

    let mut cmd = unprivileged(bpftime_wasm());
    cmd.args(["run", "--store", &store.name, "--no-status", "--log", "off"])
        .arg(&module);
    let mut guest = Proc::spawn(cmd, "trapping guest");
    bpftime_suite::poll(T, "the guest's link in the store", || {
        try_listed(&store)?
            .iter()
            .any(|l| l.starts_with("link"))
            .then_some(())
    });
    let mut v = unprivileged(&a.bpftime);
    v.args(["start", "--store", &store.name, "--"])
        .arg(&victim)
        .arg("1000");
    let out = Proc::spawn(v, "victim").finish(T);
    assert!(out.iter().any(|l| l == "calls 1000"), "{out:?}");
    let st = bpftime_suite::poll(T, "the guest to end", || guest.child.try_wait().unwrap());
    let _ = std::fs::remove_file(&module);
    assert_eq!(st.code(), Some(3), "a trap ends the guest with status 3");
    assert_eq!(listed(&store), Vec::<String>::new(), "its objects are gone");
}

#[test]
fn perf_buffer_samples_from_a_victim_reach_the_guest() {
    let Some(object) = wasm_support::bpf_object("api_test") else {
        return;
    };
    let Some(victim_dir) = build_example("uprobe-counter") else {
        return;
    };
    let victim = victim_dir.join("victim");
    let a = artifacts();
    let store = TestStore::new("wasm-perf");
    // api_test's `probe` sends `config` (7) with bpf_perf_event_output on every call; the
    // guest polls the perf buffer until 50 samples arrived and exits 0 if each carried 7.
    let target = format!("{}:target_function", victim.display());
    let esc = |b: &[u8]| b.iter().map(|b| format!("\\{b:02x}")).collect::<String>();
    let src = format!(
        r#"(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (import "wasm_bpf" "wasm_load_bpf_object" (func $load (param i32 i32) (result i64)))
  (import "wasm_bpf" "wasm_attach_bpf_program" (func $attach (param i64 i32 i32) (result i32)))
  (import "wasm_bpf" "wasm_bpf_map_fd_by_name" (func $fd (param i64 i32) (result i32)))
  (import "wasm_bpf" "wasm_bpf_buffer_poll"
    (func $poll (param i64 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 4)
  (table (export "__indirect_function_table") 2 funcref)
  (elem (i32.const 1) $count)
  (global $n (mut i32) (i32.const 0))
  (global $bad (mut i32) (i32.const 0))
  (data (i32.const 1024) "probe\00")
  (data (i32.const 1536) "perf\00")
  (data (i32.const 2048) "{target}\00")
  (data (i32.const 65536) "{obj}")
  (func $count (param i32 i32 i32) (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (if (i32.or (i32.lt_u (local.get 2) (i32.const 8))
                (i64.ne (i64.load (local.get 1)) (i64.const 7)))
      (then (global.set $bad (i32.const 1))))
    (i32.const 0))
  (func (export "_start") (local $h i64) (local $fd i32) (local $r i32)
    (local.set $h (call $load (i32.const 65536) (i32.const {len})))
    (if (i64.eqz (local.get $h)) (then (call $exit (i32.const 10))))
    ;; The first poll makes the perf events, before anything can be sent.
    (local.set $fd (call $fd (local.get $h) (i32.const 1536)))
    (if (call $poll (local.get $h) (local.get $fd) (i32.const 1) (i32.const 0)
          (i32.const 4096) (i32.const 64) (i32.const 0))
      (then (call $exit (i32.const 12))))
    (if (call $attach (local.get $h) (i32.const 1024) (i32.const 2048))
      (then (call $exit (i32.const 11))))
    (block $done (loop $l
      (br_if $done (i32.ge_u (global.get $n) (i32.const 50)))
      (local.set $r (call $poll (local.get $h) (local.get $fd) (i32.const 1) (i32.const 0)
        (i32.const 4096) (i32.const 64) (i32.const 1000)))
      (if (i32.lt_s (local.get $r) (i32.const 0)) (then (call $exit (i32.const 12))))
      (br $l)))
    (call $exit (global.get $bad)))
)"#,
        obj = esc(&object),
        len = object.len(),
    );
    let module = std::env::temp_dir().join(format!("bpftime-perf-{}.wasm", std::process::id()));
    std::fs::write(&module, wasm_support::wat(&src)).unwrap();
    std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o644)).unwrap();

    let mut cmd = unprivileged(bpftime_wasm());
    cmd.args(["run", "--store", &store.name, "--no-status"])
        .arg(&module);
    let mut guest = Proc::spawn(cmd, "perf guest");
    bpftime_suite::poll(T, "the guest's link in the store", || {
        try_listed(&store)?
            .iter()
            .any(|l| l.starts_with("link"))
            .then_some(())
    });
    let mut v = unprivileged(&a.bpftime);
    v.args(["start", "--store", &store.name, "--"])
        .arg(&victim)
        .arg("50");
    let out = Proc::spawn(v, "victim").finish(T);
    assert!(out.iter().any(|l| l == "calls 50"), "{out:?}");
    let st = bpftime_suite::poll(T, "the guest to end", || guest.child.try_wait().unwrap());
    let _ = std::fs::remove_file(&module);
    assert_eq!(
        st.code(),
        Some(0),
        "50 samples of value 7 (10-12: load/attach/poll failed)"
    );
    assert_eq!(listed(&store), Vec::<String>::new());
}
