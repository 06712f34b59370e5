//! The preloaded library in a real, unprivileged process: a small C program built at test time
//! calls `syscall(__NR_bpf, ...)`, `perf_event_open`, `ioctl`, `mmap` and reads the uprobe PMU
//! files, under `LD_PRELOAD`, as uid 65534 when the test runs as root (the kernel's bpf() is
//! off limits to that user, so every success below is the emulation's).
//!
//! Needs `cc`. Without it the test is skipped, except under `CI=true`, where it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

const PROGRAM: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <linux/bpf.h>
#include <linux/perf_event.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

static long sys_bpf(int cmd, union bpf_attr *a, unsigned size)
{
	return syscall(__NR_bpf, cmd, a, size);
}

static int map_create(int type, int key, int value, int max, int flags, const char *name)
{
	union bpf_attr a;
	memset(&a, 0, sizeof(a));
	a.map_type = type;
	a.key_size = key;
	a.value_size = value;
	a.max_entries = max;
	a.map_flags = flags;
	strncpy(a.map_name, name, sizeof(a.map_name) - 1);
	return sys_bpf(BPF_MAP_CREATE, &a, sizeof(a));
}

static long elem(int cmd, int fd, void *key, void *value, uint64_t flags)
{
	union bpf_attr a;
	memset(&a, 0, sizeof(a));
	a.map_fd = fd;
	a.key = (uintptr_t)key;
	a.value = (uintptr_t)value;
	a.flags = flags;
	return sys_bpf(cmd, &a, sizeof(a));
}

int main(int argc, char **argv)
{
	(void)argc;
	int h = map_create(BPF_MAP_TYPE_HASH, 4, 8, 64, 0, "counts");
	printf("hash fd %s\n", h >= 0 ? "ok" : strerror(errno));
	for (uint32_t k = 1; k <= 3; k++) {
		uint64_t v = k * 100;
		if (elem(BPF_MAP_UPDATE_ELEM, h, &k, &v, BPF_ANY))
			printf("update %u: %s\n", k, strerror(errno));
	}
	uint32_t k = 2;
	uint64_t v = 0;
	long r = elem(BPF_MAP_LOOKUP_ELEM, h, &k, &v, 0);
	printf("lookup 2 = %ld value %llu\n", r, (unsigned long long)v);
	uint64_t sum = 0;
	uint32_t cur, next;
	void *prev = NULL;
	while (elem(BPF_MAP_GET_NEXT_KEY, h, prev, &next, 0) == 0) {
		cur = next;
		prev = &cur;
		elem(BPF_MAP_LOOKUP_ELEM, h, &cur, &v, 0);
		sum += v;
	}
	printf("iterated sum %llu end %s\n", (unsigned long long)sum, strerror(errno));
	k = 9;
	r = elem(BPF_MAP_LOOKUP_ELEM, h, &k, &v, 0);
	printf("lookup 9 = %ld errno %s\n", r, errno == ENOENT ? "ENOENT" : strerror(errno));

	r = syscall(__NR_bpf, BPF_MAP_LOOKUP_ELEM, (void *)0x10, 32);
	printf("garbage attr = %ld errno %s\n", r, errno == EFAULT ? "EFAULT" : strerror(errno));
	union bpf_attr z;
	memset(&z, 0, sizeof(z));
	r = syscall(__NR_bpf, 4242, &z, sizeof(z));
	printf("unknown cmd = %ld errno %s\n", r, errno == EINVAL ? "EINVAL" : strerror(errno));

	/* .bss-like mmapable array */
	int arr = map_create(BPF_MAP_TYPE_ARRAY, 4, 8, 4, BPF_F_MMAPABLE, "demo.bss");
	uint64_t *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, arr, 0);
	if (p == MAP_FAILED) {
		printf("mmap failed: %s\n", strerror(errno));
	} else {
		p[3] = 777;
		k = 3;
		elem(BPF_MAP_LOOKUP_ELEM, arr, &k, &v, 0);
		printf("mmap write seen by lookup %llu\n", (unsigned long long)v);
		munmap(p, 4096);
	}

	/* the uprobe PMU, as libbpf finds it */
	int type = -1;
	FILE *f = fopen("/sys/bus/event_source/devices/uprobe/type", "re");
	if (f) {
		if (fscanf(f, "%d", &type) != 1)
			type = -2;
		fclose(f);
	}
	printf("uprobe pmu type %d\n", type);
	struct perf_event_attr pa;
	memset(&pa, 0, sizeof(pa));
	pa.size = sizeof(pa);
	pa.type = type;
	pa.config1 = (uintptr_t)argv[0];
	pa.config2 = 0x1000;
	int pe = syscall(__NR_perf_event_open, &pa, -1, 0, -1, PERF_FLAG_FD_CLOEXEC);
	printf("perf fd %s\n", pe >= 0 ? "ok" : strerror(errno));

	struct bpf_insn insns[] = {
		{ .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 0, .imm = 0 },
		{ .code = BPF_JMP | BPF_EXIT },
	};
	union bpf_attr pl;
	memset(&pl, 0, sizeof(pl));
	pl.prog_type = BPF_PROG_TYPE_KPROBE;
	pl.insns = (uintptr_t)insns;
	pl.insn_cnt = 2;
	pl.license = (uintptr_t)"GPL";
	int prog = sys_bpf(BPF_PROG_LOAD, &pl, sizeof(pl));
	printf("prog fd %s\n", prog >= 0 ? "ok" : strerror(errno));
	r = ioctl(pe, PERF_EVENT_IOC_SET_BPF, prog);
	printf("set_bpf %ld\n", r);
	r = ioctl(pe, PERF_EVENT_IOC_ENABLE, 0);
	printf("enable %ld\n", r);

	char link[256] = "";
	char fdpath[64];
	snprintf(fdpath, sizeof(fdpath), "/proc/self/fd/%d", h);
	ssize_t n = readlink(fdpath, link, sizeof(link) - 1);
	if (n > 0)
		link[n] = 0;
	printf("fd is %s\n", strstr(link, "bpftime-map:counts") ? "a bpftime placeholder" : link);
	int d = dup(h);
	close(h);
	k = 1;
	r = elem(BPF_MAP_LOOKUP_ELEM, d, &k, &v, 0);
	printf("dup lookup %ld value %llu\n", r, (unsigned long long)v);
	close(d);
	printf("still running\n");
	return 0;
}
"#;

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The preloadable library: `$CARGO_TARGET_DIR` or the workspace's `target/`, debug or
/// release, built first if missing.
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
    assert!(st.success(), "cargo build -p bpftime-syscall-server failed");
    find()
        .expect("libbpftime_syscall_server.so after cargo build")
        .canonicalize()
        .unwrap()
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

#[test]
fn unprivileged_c_program_runs_on_the_emulation() {
    if !have("cc") {
        assert!(!ci(), "cc is required for this test under CI=true");
        eprintln!("skipped: no cc");
        return;
    }
    let so = library();
    let dir = std::env::temp_dir().join(format!("bpftime-sst-preload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("prog.c");
    let bin = dir.join("prog");
    std::fs::write(&src, PROGRAM).unwrap();
    let st = Command::new("cc")
        .args(["-O1", "-Wall", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success(), "cc failed");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();

    let store = format!("sst-preload-{}", std::process::id());
    let root = euid() == 0;
    let uid = if root { 65534 } else { euid() };
    let mut cmd = if root {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    let out = cmd
        .env("LD_PRELOAD", &so)
        .env("BPFTIME_STORE", &store)
        .env_remove("BPFTIME_LOG")
        .output()
        .expect("run the program");
    let shm = PathBuf::from(format!("/dev/shm/bpftime-{uid}-{store}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let _ = std::fs::remove_file(&shm);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert_eq!(stderr, "", "nothing on stderr without BPFTIME_LOG");
    let expected = "\
hash fd ok
lookup 2 = 0 value 200
iterated sum 600 end No such file or directory
lookup 9 = -1 errno ENOENT
garbage attr = -1 errno EFAULT
unknown cmd = -1 errno EINVAL
mmap write seen by lookup 777
uprobe pmu type 8
perf fd ok
prog fd ok
set_bpf 0
enable 0
fd is a bpftime placeholder
dup lookup 0 value 100
still running
";
    assert_eq!(stdout, expected);
}
