//! The real libbpf 1.1 flow: `examples/uprobe-counter` (a bpftool-skeleton tool, unmodified)
//! runs under `LD_PRELOAD` as an unprivileged user: feature probes, BTF, maps with
//! `.rodata`/`.bss`, freeze, program load with BTF func/line info, `PROG_BIND_MAP`, mmap of the
//! global-data maps, the uprobe PMU files, `perf_event_open`, the `LINK_CREATE` probe and the
//! link, enable/disable, map reads, and teardown. Afterwards nothing is left in the store.
//!
//! Needs make, clang, bpftool, cc and libbpf's headers; skipped without them unless `CI=true`,
//! where a missing tool fails the test.

use bpftime_maps::Store;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn library() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let find = || {
        ["debug", "release"]
            .iter()
            .map(|p| target.join(p).join("libbpftime_syscall_server.so"))
            .find(|p| p.exists())
    };
    if let Some(p) = find() {
        return p.canonicalize().unwrap();
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "-p", "bpftime-syscall-server"])
        .status()
        .expect("run cargo build");
    assert!(st.success());
    find().unwrap().canonicalize().unwrap()
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

struct Run {
    so: PathBuf,
    store: String,
}

impl Run {
    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = if euid() == 0 {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ]);
            c.args(args);
            c
        } else {
            let mut c = Command::new(args[0]);
            c.args(&args[1..]);
            c
        };
        cmd.env("LD_PRELOAD", &self.so)
            .env("BPFTIME_STORE", &self.store)
            .env("BPFTIME_LOG", "warn")
            .output()
            .expect("run uprobe-counter")
    }
}

#[test]
fn libbpf_skeleton_tool_loads_attaches_and_cleans_up() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/uprobe-counter");
    if !example.join("Makefile").exists() {
        eprintln!("skipped: examples/uprobe-counter is not in this tree");
        return;
    }
    let tools = ["make", "clang", "bpftool", "cc"];
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    let headers = Path::new("/usr/include/bpf/libbpf.h").exists();
    if !missing.is_empty() || !headers {
        assert!(
            !ci(),
            "missing prerequisites under CI=true: {missing:?}, libbpf headers: {headers}"
        );
        eprintln!("skipped: missing {missing:?} (libbpf headers: {headers})");
        return;
    }
    let so = library();
    let build = std::env::temp_dir().join(format!("bpftime-sst-libbpf-{}", std::process::id()));
    std::fs::create_dir_all(&build).unwrap();
    let out = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&example)
        .arg(format!("BUILD={}", build.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&build, std::fs::Permissions::from_mode(0o755)).unwrap();
    let counter = build.join("uprobe-counter");
    let victim = build.join("victim");
    let run = Run {
        so,
        store: format!("sst-libbpf-{}", std::process::id()),
    };
    let uid = if euid() == 0 { 65534 } else { euid() };
    let shm = PathBuf::from(format!("/dev/shm/bpftime-{uid}-{}", run.store));

    // Attach, report at once (-d 0), detach, exit.
    let ok = run.run(&[
        counter.to_str().unwrap(),
        "-d",
        "0",
        victim.to_str().unwrap(),
        "target_function",
    ]);
    let stdout = String::from_utf8_lossy(&ok.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&ok.stderr).into_owned();
    // A function that does not exist: libbpf fails cleanly, no crash.
    let bad = run.run(&[
        counter.to_str().unwrap(),
        "-d",
        "0",
        victim.to_str().unwrap(),
        "no_such_function",
    ]);
    // A pid filter on a process that does not exist: ESRCH, as from the kernel.
    let nopid = run.run(&[
        counter.to_str().unwrap(),
        "-p",
        "1073741800",
        "-d",
        "0",
        victim.to_str().unwrap(),
        "target_function",
    ]);

    let live = if shm.exists() {
        if euid() == 0 {
            std::os::unix::fs::chown(&shm, Some(0), Some(0)).unwrap();
        }
        let s = Store::open(&shm).expect("open the store");
        s.live_ids()
    } else {
        Vec::new()
    };
    let _ = std::fs::remove_file(&shm);
    let _ = std::fs::remove_dir_all(&build);

    assert!(
        ok.status.success(),
        "uprobe-counter failed: {:?}\n{stdout}\n{stderr}",
        ok.status
    );
    assert_eq!(stdout, "attached\ntotal_calls 0\narg_sum 0\n");
    assert_eq!(stderr, "", "no libbpf errors and no emulation warnings");
    let bad_err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{bad_err}");
    assert!(bad_err.contains("failed to attach uprobe"), "{bad_err}");
    let nopid_err = String::from_utf8_lossy(&nopid.stderr);
    assert_eq!(nopid.status.code(), Some(1), "{nopid_err}");
    assert!(nopid_err.contains("No such process"), "{nopid_err}");
    assert!(live.is_empty(), "objects left in the store: {live:?}");
}
