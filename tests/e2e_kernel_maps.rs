//! End to end: `bpftime load --kernel-maps` — the example libbpf tool's maps live in the kernel,
//! the agent in a victim runs the tool's uprobe program on them from userspace, and a real
//! kernel eBPF program (a socket filter run with `BPF_PROG_TEST_RUN`) adds to the same maps.
//! Both sides' writes show up in the loader's report and in the kernel's own view.
//!
//! Needs root (kernel maps need `CAP_BPF`, agents `CAP_SYS_ADMIN` to open them by id); the
//! unprivileged refusal is tested as uid 65534.

use bpftime_maps::{Map, Store};
use bpftime_suite::{Proc, artifacts, build_example, is_root, skip, unprivileged};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// The store of a root loader (`/dev/shm/bpftime-0-<name>`), removed on drop.
struct RootStore {
    name: String,
    path: PathBuf,
}

impl RootStore {
    fn new(tag: &str) -> RootStore {
        let name = format!("test-{tag}-{}", std::process::id());
        let path = PathBuf::from(format!("/dev/shm/bpftime-0-{name}"));
        let _ = std::fs::remove_file(&path);
        RootStore { name, path }
    }
}

impl Drop for RootStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn bpf(cmd: i64, attr: &mut [u8; 80], size: usize) -> Result<i64, i32> {
    // SAFETY: `attr` is a live 80-byte buffer, `size` ≤ 80; the pointers put in it point at
    // live buffers of the sizes the command uses.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r)
    }
}

fn put(a: &mut [u8; 80], off: usize, v: &[u8]) {
    a[off..off + v.len()].copy_from_slice(v);
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | dst;
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    b
}

/// A socket filter that adds 1,000,000 to `arg_sum[0]`, 1 to the `.bss` `total_calls` and sets
/// `calls[424242] = 7`, as the tool's own program would from a kernel uprobe.
fn kernel_program(arg_sum: i32, bss: i32, calls: i32) -> OwnedFd {
    let mut p: Vec<[u8; 8]> = Vec::new();
    let lookup_add = |p: &mut Vec<[u8; 8]>, map: i32, add: i32| {
        p.push(insn(0x62, 10, 0, -4, 0)); // *(u32 *)(r10 - 4) = 0
        p.push(insn(0xbf, 2, 10, 0, 0)); // r2 = r10
        p.push(insn(0x07, 2, 0, 0, -4)); // r2 -= 4
        p.push(insn(0x18, 1, 1, 0, map)); // r1 = map
        p.push(insn(0, 0, 0, 0, 0));
        p.push(insn(0x85, 0, 0, 0, 1)); // bpf_map_lookup_elem
        p.push(insn(0x15, 0, 0, 2, 0)); // if r0 == 0 skip
        p.push(insn(0xb7, 1, 0, 0, add)); // r1 = add
        p.push(insn(0xdb, 0, 1, 0, 0)); // lock *(u64 *)(r0 + 0) += r1
    };
    lookup_add(&mut p, arg_sum, 1_000_000);
    lookup_add(&mut p, bss, 1);
    p.push(insn(0x62, 10, 0, -4, 424242)); // key
    p.push(insn(0x7a, 10, 0, -16, 7)); // value
    p.push(insn(0xbf, 2, 10, 0, 0));
    p.push(insn(0x07, 2, 0, 0, -4));
    p.push(insn(0xbf, 3, 10, 0, 0));
    p.push(insn(0x07, 3, 0, 0, -16));
    p.push(insn(0xb7, 4, 0, 0, 0)); // BPF_ANY
    p.push(insn(0x18, 1, 1, 0, calls));
    p.push(insn(0, 0, 0, 0, 0));
    p.push(insn(0x85, 0, 0, 0, 2)); // bpf_map_update_elem
    p.push(insn(0xb7, 0, 0, 0, 0));
    p.push(insn(0x95, 0, 0, 0, 0));
    let bytes: Vec<u8> = p.iter().flatten().copied().collect();
    let lic = b"GPL\0";
    let mut a = [0u8; 80];
    put(&mut a, 0, &1u32.to_ne_bytes()); // BPF_PROG_TYPE_SOCKET_FILTER
    put(&mut a, 4, &(p.len() as u32).to_ne_bytes());
    put(&mut a, 8, &(bytes.as_ptr() as u64).to_ne_bytes());
    put(&mut a, 16, &(lic.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(5, &mut a, 72).expect("load the kernel program");
    // SAFETY: a new fd the kernel just gave us.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// `BPF_PROG_TEST_RUN` `repeat` times on a 64-byte packet.
fn run(prog: &OwnedFd, repeat: u32) {
    let pkt = [0u8; 64];
    let mut a = [0u8; 80];
    put(&mut a, 0, &(prog.as_raw_fd() as u32).to_ne_bytes());
    put(&mut a, 8, &(pkt.len() as u32).to_ne_bytes());
    put(&mut a, 16, &(pkt.as_ptr() as u64).to_ne_bytes());
    put(&mut a, 32, &repeat.to_ne_bytes());
    bpf(10, &mut a, 80).expect("BPF_PROG_TEST_RUN");
}

/// The kernel's value of `key` (u32) in a map of u64 values.
fn klookup(fd: &OwnedFd, key: u32) -> Option<u64> {
    let k = key.to_ne_bytes();
    let mut v = [0u8; 8];
    let mut a = [0u8; 80];
    put(&mut a, 0, &(fd.as_raw_fd() as u32).to_ne_bytes());
    put(&mut a, 8, &(k.as_ptr() as u64).to_ne_bytes());
    put(&mut a, 16, &(v.as_mut_ptr() as u64).to_ne_bytes());
    bpf(1, &mut a, 32).ok()?;
    Some(u64::from_ne_bytes(v))
}

/// The kernel map behind the store map named `name`, opened by its kernel id.
fn kernel_map(store: &Arc<Store>, name: &str) -> OwnedFd {
    let id = store
        .live_ids()
        .into_iter()
        .find(|&id| store.object(id).is_some_and(|o| o.name == name))
        .unwrap_or_else(|| panic!("no map {name} in the store"));
    let m = Map::open_meta(store, id).expect("map record");
    let kid = m
        .kernel_id()
        .unwrap_or_else(|| panic!("map {name} is not kernel-backed"));
    bpftime_maps::kernel::get_fd_by_id(kid, 0).expect("open the kernel map by id")
}

#[test]
fn kernel_program_and_agent_share_the_tools_kernel_maps() {
    if !is_root() {
        skip("--kernel-maps needs root (CAP_BPF, CAP_SYS_ADMIN)");
        return;
    }
    let Some(build) = build_example("uprobe-counter") else {
        return;
    };
    let a = artifacts();
    let store = RootStore::new("kmaps");
    // The loader waits for SIGINT, then reports (its `-n` mode sums the per-pid hash, whose
    // in-place increments a kernel-backed hash does not see: see the README's limits).
    let mut c = Command::new(&a.bpftime);
    c.args(["load", "--kernel-maps", "--store", &store.name, "--"])
        .arg(build.join("uprobe-counter"))
        .arg(build.join("victim"))
        .arg("target_function");
    let mut loader = Proc::spawn(c, "bpftime load --kernel-maps uprobe-counter");
    loader.wait_line(T, |l| l == "attached");

    // The kernel side: the same maps, by their kernel ids from the store records.
    let s = Arc::new(Store::open(&store.path).expect("open the loader's store"));
    let arg_sum = kernel_map(&s, "arg_sum");
    let bss = kernel_map(&s, "uprobe_c.bss");
    let calls = kernel_map(&s, "calls");
    let prog = kernel_program(arg_sum.as_raw_fd(), bss.as_raw_fd(), calls.as_raw_fd());
    run(&prog, 500);

    // The userspace side: the agent runs the tool's program on the same maps.
    let mut c = Command::new(&a.bpftime);
    c.args(["start", "--kernel-maps", "--store", &store.name, "--"])
        .arg(build.join("victim"))
        .arg("1000");
    let victim = Proc::spawn(c, "bpftime start victim");
    let vpid = victim.pid();
    let vout = victim.finish(T);
    assert_eq!(vout.last().map(String::as_str), Some("calls 1000"));

    // Kernel's view: both sides' additions in the same values.
    let sum = 1000 * 999 / 2 + 500 * 1_000_000;
    assert_eq!(klookup(&bss, 0), Some(1500));
    assert_eq!(klookup(&arg_sum, 0), Some(sum));
    assert_eq!(klookup(&calls, 424242), Some(7));
    assert!(
        klookup(&calls, vpid).is_some(),
        "the agent's update is in the kernel map"
    );

    // Loader's view (its bpf() calls and mmap of `.bss` went to the kernel).
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    unsafe { libc::kill(loader.pid() as i32, libc::SIGINT) };
    let out = loader.finish(T);
    for want in [
        "total_calls 1500".to_string(),
        format!("arg_sum {sum}"),
        "pid 424242 calls 7".to_string(),
    ] {
        assert!(out.contains(&want), "missing {want:?} in {out:?}");
    }
    assert!(
        out.iter()
            .any(|l| l.starts_with(&format!("pid {vpid} calls "))),
        "{out:?}"
    );
}

#[test]
fn kernel_maps_without_privileges_fail_with_a_clear_message() {
    let bpftime = &artifacts().bpftime;
    for (cmd, needs) in [("load", "needs BPF privileges"), ("start", "CAP_SYS_ADMIN")] {
        let out = unprivileged(bpftime)
            .args([cmd, "--kernel-maps", "--", "/bin/true"])
            .output()
            .expect("run bpftime");
        let err = String::from_utf8_lossy(&out.stderr);
        if !is_root() && out.status.success() {
            // Not root but privileged anyway (capabilities): nothing to refuse.
            skip("this user has BPF privileges; cannot test the refusal");
            return;
        }
        assert!(
            !out.status.success(),
            "{cmd} --kernel-maps ran unprivileged"
        );
        assert!(
            err.contains("--kernel-maps") && err.contains(needs),
            "{cmd}: {err}"
        );
    }
}
