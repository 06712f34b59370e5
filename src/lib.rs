//! Support code for bpftime's end-to-end tests (`tests/`) and benchmarks (`benches/`): where
//! the built artifacts are, building the C examples, running commands as an unprivileged user,
//! and reading their output line by line with timeouts.
#![forbid(unsafe_code)]

pub mod bench;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The bpf_conformance vectors: `BPF_CONFORMANCE_DIR`, else `../shared/conformance` beside the
/// checkout.
pub fn conformance_dir() -> PathBuf {
    std::env::var_os("BPF_CONFORMANCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/conformance"))
}

/// True when running under CI (`CI=true`), where a missing prerequisite must fail, not skip.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skips the calling test (returns `true` so the caller can `return`) when a prerequisite is
/// missing outside CI; panics under CI, where a missing prerequisite is a failure.
pub fn skip(reason: &str) -> bool {
    if under_ci() {
        panic!("prerequisite missing under CI: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
    true
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// The cargo target profile directory the tests were built into (`target/debug`, …).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in <target>/<profile>/deps")
        .to_path_buf()
}

/// Paths of the built `bpftime` binary and libraries.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// The `bpftime` CLI.
    pub bpftime: PathBuf,
    /// `libbpftime_syscall_server.so`.
    pub syscall_server: PathBuf,
    /// `libbpftime_agent.so`.
    pub agent: PathBuf,
}

/// Builds (if needed) and locates the CLI and libraries in this test's profile directory.
pub fn artifacts() -> &'static Artifacts {
    static A: OnceLock<Artifacts> = OnceLock::new();
    A.get_or_init(|| {
        let dir = profile_dir();
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root()).args([
            "build",
            "-p",
            "bpftime-tools",
            "-p",
            "bpftime-agent",
            "-p",
            "bpftime-syscall-server",
        ]);
        if release {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "cargo build of the CLI and libraries failed");
        let a = Artifacts {
            bpftime: dir.join("bpftime"),
            syscall_server: dir.join("libbpftime_syscall_server.so"),
            agent: dir.join("libbpftime_agent.so"),
        };
        for p in [&a.bpftime, &a.syscall_server, &a.agent] {
            assert!(p.is_file(), "{} was not built", p.display());
        }
        a
    })
}

/// Builds the C example in `examples/<name>` with its Makefile into
/// `<target>/examples/<name>`; `None` (after [`skip`]) when clang, bpftool or libbpf are
/// missing outside CI.
pub fn build_example(name: &str) -> Option<PathBuf> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for tool in ["clang", "make", "cc"] {
        if Command::new(tool).arg("--version").output().is_err() {
            skip(&format!(
                "{tool} is not installed (scripts/deps installs it)"
            ));
            return None;
        }
    }
    let bpftool = ["/usr/sbin/bpftool", "/usr/bin/bpftool"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(bpftool) = bpftool else {
        skip("bpftool is not installed (scripts/deps installs it)");
        return None;
    };
    let out = profile_dir().join("examples").join(name);
    std::fs::create_dir_all(&out).expect("create example build dir");
    let r = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(workspace_root().join("examples").join(name))
        .arg(format!("BUILD={}", out.display()))
        .arg(format!("BPFTOOL={bpftool}"))
        .output()
        .expect("run make");
    assert!(
        r.status.success(),
        "building examples/{name} failed:\n{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    Some(out)
}

/// A command that runs as an unprivileged user: uid/gid 65534 via `setpriv` when we are root,
/// else as ourselves (already unprivileged).
pub fn unprivileged(program: impl AsRef<Path>) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(program.as_ref());
        c.current_dir("/tmp");
        c
    } else {
        let mut c = Command::new(program.as_ref());
        c.current_dir("/tmp");
        c
    }
}

/// The uid unprivileged commands run as.
pub fn unprivileged_uid() -> u32 {
    if is_root() {
        65534
    } else {
        std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .unwrap_or(0)
    }
}

/// A unique store name for one test, and its path (removed on drop).
#[derive(Debug)]
pub struct TestStore {
    /// Name to pass as `--store`.
    pub name: String,
    path: PathBuf,
}

impl TestStore {
    /// A new store name for `tag`, owned by the unprivileged uid (the stores of commands made
    /// with [`unprivileged`]).
    pub fn new(tag: &str) -> TestStore {
        Self::with_uid(tag, unprivileged_uid())
    }

    /// A new store name for `tag` that this process's own user creates (benchmarks run
    /// `bpftime` as themselves): the file removed on drop is then the one they made.
    pub fn for_current_user(tag: &str) -> TestStore {
        let uid = std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .unwrap_or(0);
        Self::with_uid(tag, uid)
    }

    fn with_uid(tag: &str, uid: u32) -> TestStore {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!("test-{tag}-{}-{nanos}", std::process::id());
        let path = PathBuf::from(format!("/dev/shm/bpftime-{uid}-{name}"));
        let _ = std::fs::remove_file(&path);
        TestStore { name, path }
    }
    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A log file for the agent in a victim (`BPFTIME_LOG=info` into `BPFTIME_LOG_FILE`, in the
/// temporary directory, which the unprivileged uid can write), removed on drop.
#[derive(Debug)]
pub struct AgentLog {
    path: PathBuf,
}

impl AgentLog {
    /// A fresh log for `tag`.
    pub fn new(tag: &str) -> AgentLog {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "bpftime-log-{tag}-{}-{nanos}.log",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        AgentLog { path }
    }

    /// The environment that sends the agent's log here.
    pub fn env(&self) -> [(&str, &str); 2] {
        [
            ("BPFTIME_LOG", "info"),
            (
                "BPFTIME_LOG_FILE",
                self.path.to_str().expect("a UTF-8 temporary path"),
            ),
        ]
    }

    /// What the agent wrote so far.
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap_or_default()
    }
}

impl Drop for AgentLog {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A running child whose stdout is read line by line on a thread.
#[derive(Debug)]
pub struct Proc {
    /// The child.
    pub child: Child,
    lines: Receiver<String>,
    /// Every stdout line seen so far.
    pub seen: Vec<String>,
    what: String,
}

impl Proc {
    /// Spawns `cmd` with piped stdin/stdout (stderr inherited, so failures show in test logs).
    pub fn spawn(mut cmd: Command, what: &str) -> Proc {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let out: ChildStdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines: rx,
            seen: Vec::new(),
            what: what.to_string(),
        }
    }

    /// Waits up to `timeout` for a stdout line satisfying `pred`; returns it.
    pub fn wait_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!(
                        "{}: no expected line within {timeout:?}; output so far:\n{}",
                        self.what,
                        self.seen.join("\n")
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let st = self.child.wait();
                    panic!(
                        "{}: exited ({st:?}) before the expected line; output:\n{}",
                        self.what,
                        self.seen.join("\n")
                    );
                }
            }
        }
    }

    /// Sends a line to the child's stdin.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        writeln!(stdin, "{line}").expect("write to child stdin");
        stdin.flush().expect("flush child stdin");
    }

    /// Waits for exit (killing the child after `timeout`), collects the rest of stdout, and
    /// returns all lines. Panics on a non-zero exit.
    pub fn finish(self, timeout: Duration) -> Vec<String> {
        let what = self.what.clone();
        let (st, lines) = self.finish_status(timeout);
        assert!(
            st.success(),
            "{what} failed ({st}); output:\n{}",
            lines.join("\n")
        );
        lines
    }

    /// [`Proc::finish`] for a child that may fail: its exit status and all its lines.
    pub fn finish_status(mut self, timeout: Duration) -> (std::process::ExitStatus, Vec<String>) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait child") {
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(l);
                }
                return (st, std::mem::take(&mut self.seen));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "{}: still running after {timeout:?}; output:\n{}",
                    self.what,
                    self.seen.join("\n")
                );
            }
            while let Ok(l) = self.lines.try_recv() {
                self.seen.push(l);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `f` every 20 ms until it returns `Some`, up to `timeout`.
pub fn poll<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
