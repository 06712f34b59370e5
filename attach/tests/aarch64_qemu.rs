//! Cross-check of the emulator the aarch64 hook tests use: every hooked run of
//! `aarch64_hook_exec` (each function, hook point, stub placement, input, with and without the
//! handler editing x0 and the flags) runs under Unicorn and natively under qemu-user, through
//! `aarch64_support/qemu_harness.c` (a static aarch64 binary that maps the same fixed
//! addresses and calls the function from C). The return value, the handler's hit count and
//! the x0, x1 and pc it saw must agree, and each unhooked function must return the same under
//! qemu as under Unicorn.
//!
//! Ignored by default (it needs Debian's `qemu-user` and `gcc-aarch64-linux-gnu`); run with
//! `cargo test -p bpftime-attach --test aarch64_qemu -- --ignored`.

mod aarch64_support;

use aarch64_support::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn build_harness(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/aarch64_support/qemu_harness.c");
    let exe = dir.join("hook_harness");
    let out = Command::new("aarch64-linux-gnu-gcc")
        .args(["-O2", "-static", "-no-pie", "-Wall", "-Werror"])
        // Link high: the tests' fixed addresses start at 0x400000, the default text address.
        .arg("-Wl,-Ttext-segment=0x60000000")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("aarch64-linux-gnu-gcc (apt-get install -y gcc-aarch64-linux-gnu)");
    assert!(
        out.status.success(),
        "harness build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Records for the harness.
#[derive(Default)]
struct Script(Vec<u8>);

impl Script {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn map(&mut self, addr: u64, len: u64, exec: bool) {
        self.u32(1);
        self.u64(addr);
        self.u64(len);
        self.u32(exec.into());
    }
    fn write(&mut self, addr: u64, bytes: &[u8]) {
        self.u32(2);
        self.u64(addr);
        self.u32(bytes.len() as u32);
        self.0.extend_from_slice(bytes);
    }
    fn call(&mut self, entry: u64, args: [u64; 2]) {
        self.u32(3);
        self.u64(entry);
        self.u64(args[0]);
        self.u64(args[1]);
        self.u64(USER);
    }
}

fn user_area(delta: u64, flip: u64) -> Vec<u8> {
    let mut u = vec![0u8; PAGE as usize];
    u[USER_DELTA as usize..][..8].copy_from_slice(&delta.to_le_bytes());
    u[USER_FLIP as usize..][..8].copy_from_slice(&flip.to_le_bytes());
    u
}

#[test]
#[ignore = "needs qemu-user and gcc-aarch64-linux-gnu"]
fn qemu_user_and_unicorn_agree_on_every_hooked_run() {
    let dir = std::env::temp_dir().join(format!("bpftime-a64-hook-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = build_harness(&dir);

    let img = image();
    let mut m = Machine::new(&img.bytes);
    let mut s = Script::default();
    for (addr, len, exec) in [
        (IMAGE, IMAGE_LEN, true),
        (MID, STUB_LEN, true),
        (FAR, STUB_LEN, true),
        (HANDLER, PAGE, true),
        (USER, PAGE, false),
    ] {
        s.map(addr, len, exec);
    }
    s.write(HANDLER, &handler());
    // (label, the line Unicorn predicts)
    let mut expected = Vec::new();
    for case in &img.cases {
        let mut plain_ret = Vec::new();
        for &args in &case.inputs {
            m.reset();
            let plain = m.run(&State::call(args), case.entry, EXIT).unwrap();
            plain_ret.push(plain.x[0]);
            s.write(IMAGE, &img.bytes);
            s.write(USER, &user_area(0, 0));
            s.call(case.entry, args);
            expected.push((
                format!("{} {args:?} unhooked", case.name),
                format!("{:x} 0 0 0 0", plain.x[0]),
            ));
        }
        for &(addr, _) in &case.hooks {
            for place in PLACEMENTS {
                let Ok(hook) = hook_for(&img.bytes, addr, place) else {
                    continue; // refusals are aarch64_hook_exec's business
                };
                for (&args, &plain) in case.inputs.iter().zip(&plain_ret) {
                    for (delta, flip) in [(0, 0), (0x1000, 1 << 30)] {
                        m.reset();
                        m.install(addr, place.stub, &hook);
                        m.write(USER, &user_area(delta, flip));
                        let end = m.run(&State::call(args), case.entry, EXIT).unwrap();
                        if delta == 0 {
                            // So qemu's hooked run must match the unhooked one as well.
                            assert_eq!(end.x[0], plain, "{} {args:?}", case.name);
                        }
                        let u = |i: u64| m.read_u64(USER + i);
                        let line = format!(
                            "{:x} {:x} {:x} {:x} {:x}",
                            end.x[0],
                            u(USER_HITS),
                            u(USER_REGS),
                            u(USER_REGS + 8),
                            u(USER_REGS + 32 * 8)
                        );
                        s.write(IMAGE, &img.bytes);
                        s.write(addr, &hook.patch);
                        s.write(place.stub, &hook.code);
                        s.write(USER, &user_area(delta, flip));
                        s.call(case.entry, args);
                        let label = format!(
                            "{} hooked at +{:#x}, {}, {args:?}, delta {delta:#x}",
                            case.name,
                            addr - case.entry,
                            place.name
                        );
                        expected.push((label, line));
                    }
                }
            }
        }
    }
    s.u32(0);

    let mut child = Command::new("qemu-aarch64")
        .arg(&exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-aarch64 (apt-get install -y qemu-user)");
    child.stdin.take().unwrap().write_all(&s.0).unwrap();
    let out = child.wait_with_output().unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        out.status.success(),
        "qemu harness failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), expected.len(), "one line per call");
    let bad: Vec<String> = lines
        .iter()
        .zip(&expected)
        .filter(|(got, (_, want))| *got != want)
        .map(|(got, (label, want))| format!("{label}: qemu `{got}`, unicorn `{want}`"))
        .collect();
    assert!(
        bad.is_empty(),
        "{} disagreements:\n{}",
        bad.len(),
        bad.join("\n")
    );
    println!("qemu-user: {} calls agree with unicorn", expected.len());
}
