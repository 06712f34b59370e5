//! The `wasm_bpf` host functions called by real Wasm guests (Wasm text): every function with
//! bad handles, fds, commands, pointers and lengths gets an error code, never a host crash;
//! the good paths work; a guest's objects leave the store when it closes them or its run
//! ends, also when its callback traps.

mod wasm_support;

use bpftime_attach::syscall::Tracepoint;
use bpftime_maps::perf_array;
use bpftime_maps::ringbuf::RingBuf;
use bpftime_wasm_host::{Guest, GuestConfig};
use libc::{EBADF, EBUSY, EFAULT, EINVAL, ENOENT, EOPNOTSUPP};
use std::path::Path;
use wasm_support::{ScratchStore, bpf_object, wat};

/// Memory offsets used by the tests.
const STR: i32 = 1024; // strings
const KEY: i32 = 2048;
const VAL: i32 = 2304;
const DATA: i32 = 4096; // record buffer
const OBJ: i32 = 65536; // the BPF object
/// Guest memory: 4 pages.
const MEM_END: i32 = 4 * 65536;

/// A guest that re-exports every import, plus callbacks in its function table:
/// 1 = count (adds the record's first u64 to `sum`), 2 = stop (returns 7), 3 = trap,
/// 4 = wrong signature; 0 is a null entry.
const GUEST: &str = r#"
(module
  (import "wasm_bpf" "wasm_load_bpf_object" (func $load (param i32 i32) (result i64)))
  (import "wasm_bpf" "wasm_attach_bpf_program" (func $attach (param i64 i32 i32) (result i32)))
  (import "wasm_bpf" "wasm_bpf_buffer_poll"
    (func $poll (param i64 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasm_bpf" "wasm_bpf_map_fd_by_name" (func $fd (param i64 i32) (result i32)))
  (import "wasm_bpf" "wasm_bpf_map_operate"
    (func $op (param i32 i32 i32 i32 i32 i64) (result i32)))
  (import "wasm_bpf" "wasm_close_bpf_object" (func $close (param i64) (result i32)))
  (memory (export "memory") 4)
  (table (export "__indirect_function_table") 5 funcref)
  (elem (i32.const 1) $count $stop $trap $wrong)
  (global $n (mut i32) (i32.const 0))
  (global $sum (mut i64) (i64.const 0))
  (global $size (mut i32) (i32.const 0))
  (func $count (param i32 i32 i32) (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (global.set $size (local.get 2))
    (global.set $sum (i64.add (global.get $sum) (i64.load (local.get 1))))
    (i32.const 0))
  (func $stop (param i32 i32 i32) (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (i32.const 7))
  (func $trap (param i32 i32 i32) (result i32) unreachable)
  (func $wrong (param i32) (result i32) (i32.const 0))
  (func (export "n") (result i32) (global.get $n))
  (func (export "sum") (result i64) (global.get $sum))
  (func (export "size") (result i32) (global.get $size))
  (func (export "load") (param i32 i32) (result i64) (call $load (local.get 0) (local.get 1)))
  (func (export "attach") (param i64 i32 i32) (result i32)
    (call $attach (local.get 0) (local.get 1) (local.get 2)))
  (func (export "poll") (param i64 i32 i32 i32 i32 i32 i32) (result i32)
    (call $poll (local.get 0) (local.get 1) (local.get 2) (local.get 3) (local.get 4)
      (local.get 5) (local.get 6)))
  (func (export "fd") (param i64 i32) (result i32) (call $fd (local.get 0) (local.get 1)))
  (func (export "op") (param i32 i32 i32 i32 i32 i64) (result i32)
    (call $op (local.get 0) (local.get 1) (local.get 2) (local.get 3) (local.get 4)
      (local.get 5)))
  (func (export "close") (param i64) (result i32) (call $close (local.get 0)))
  (func (export "_start"))
)
"#;

struct T {
    scratch: ScratchStore,
    g: Guest,
    object: Vec<u8>,
}

impl T {
    fn new(tag: &str) -> Option<T> {
        let object = bpf_object("api_test")?;
        let scratch = ScratchStore::new(tag);
        let g = Guest::new(scratch.store.clone(), &wat(GUEST), &GuestConfig::default())
            .expect("instantiate the test guest");
        Some(T { scratch, g, object })
    }

    fn str(&mut self, at: i32, s: &str) -> i32 {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.g.write_memory(at as usize, &b).unwrap();
        at
    }

    fn load(&mut self) -> i64 {
        let obj = self.object.clone();
        self.g.write_memory(OBJ as usize, &obj).unwrap();
        let h: i64 = self.g.call("load", (OBJ, obj.len() as i32)).unwrap();
        assert_ne!(h, 0, "the test object loads");
        h
    }

    fn fd(&mut self, h: i64, name: &str) -> i32 {
        let p = self.str(STR, name);
        self.g.call("fd", (h, p)).unwrap()
    }

    fn op(&mut self, fd: i32, cmd: i32, key: i32, value: i32, next: i32, flags: i64) -> i32 {
        self.g
            .call("op", (fd, cmd, key, value, next, flags))
            .unwrap()
    }

    #[allow(clippy::too_many_arguments, reason = "the ABI")]
    fn poll(&mut self, h: i64, fd: i32, cb: i32, data: i32, max: i32, timeout: i32) -> i32 {
        self.g
            .call("poll", (h, fd, cb, 0i32, data, max, timeout))
            .unwrap()
    }

    fn n(&mut self) -> i32 {
        self.g.call("n", ()).unwrap()
    }
}

#[test]
fn load_rejects_bad_buffers_and_objects() {
    let Some(mut t) = T::new("load") else { return };
    let before = t.scratch.live();
    let len = t.object.len() as i32;
    t.g.write_memory(OBJ as usize, &t.object.clone()).unwrap();
    for (buf, size) in [
        (OBJ, -1),           // negative size
        (OBJ, 0),            // empty
        (MEM_END - 10, 100), // runs off the end of memory
        (MEM_END, 1),        // starts at the end
        (-8, 16),            // wraps (0xfffffff8)
        (OBJ, i32::MAX),     // huge
        (OBJ, len - 100),    // truncated ELF
        (OBJ + 1, len - 1),  // not at the ELF header
        (0, 4096),           // zeros
    ] {
        let h: i64 = t.g.call("load", (buf, size)).unwrap();
        assert_eq!(h, 0, "load({buf:#x}, {size}) must fail");
    }
    assert_eq!(
        t.scratch.live(),
        before,
        "failed loads leave nothing behind"
    );
    let h = t.load();
    let h2 = t.load();
    assert!(h > 0 && h2 > 0 && h != h2, "distinct non-zero handles");
    // 5 maps + .rodata + .bss, and the 5 attachable programs (socket is skipped).
    assert_eq!(t.scratch.live(), before + 2 * (7 + 5));
    assert_eq!(t.g.call::<i64, i32>("close", h).unwrap(), 0);
    assert_eq!(t.g.call::<i64, i32>("close", h2).unwrap(), 0);
    assert_eq!(t.scratch.live(), before, "closed objects leave the store");
}

#[test]
fn attach_checks_handles_names_and_targets() {
    let Some(mut t) = T::new("attach") else {
        return;
    };
    let h = t.load();
    let exe = std::env::current_exe().unwrap();
    let good_target = format!("{}:main", exe.display());
    let probe = t.str(STR, "probe");
    let tgt = t.str(STR + 64, &good_target);
    let call = |t: &mut T, h: i64, name: i32, target: i32| -> i32 {
        t.g.call("attach", (h, name, target)).unwrap()
    };
    // Bad handles.
    for bad in [0i64, -1, h + 100, i64::MAX] {
        assert_eq!(call(&mut t, bad, probe, tgt), -ENOENT, "handle {bad}");
    }
    // Bad name pointers: null, out of memory, no NUL before the end of memory.
    assert_eq!(call(&mut t, h, 0, tgt), -EFAULT);
    assert_eq!(call(&mut t, h, MEM_END + 5, tgt), -EFAULT);
    t.g.write_memory((MEM_END - 4) as usize, b"abcd").unwrap();
    assert_eq!(call(&mut t, h, MEM_END - 4, tgt), -EFAULT);
    // Unknown program.
    let nope = t.str(STR + 8192, "no_such_prog");
    assert_eq!(call(&mut t, h, nope, tgt), -ENOENT);
    // Bad targets: out of memory, malformed, missing binary, missing symbol.
    assert_eq!(call(&mut t, h, probe, MEM_END - 4), -EFAULT);
    for bad in [
        "no-colon",
        "/no/such/binary:main",
        &format!("{}:no_such_symbol_anywhere", exe.display()),
        &format!("{}:", exe.display()),
    ] {
        let p = t.str(STR + 128, bad);
        assert_eq!(call(&mut t, h, probe, p), -ENOENT, "target {bad:?}");
    }
    // No target at all: the section `uprobe` names none.
    assert_eq!(call(&mut t, h, probe, 0), -ENOENT);
    // Unknown WASI call.
    let w = t.str(STR + 128, "wasi:fd_write");
    assert_eq!(call(&mut t, h, probe, w), -EOPNOTSUPP);
    // Kprobes cannot attach here; tracepoints need a syscall tracepoint.
    let kp = t.str(STR + 8192, "kp");
    assert_eq!(call(&mut t, h, kp, tgt), -EOPNOTSUPP);
    let tp = t.str(STR + 8192, "tp");
    for bad in [
        "syscalls:sys_enter_nosuchcall",
        "sched:sched_switch",
        "nocolon",
    ] {
        let p = t.str(STR + 128, bad);
        assert_eq!(call(&mut t, h, tp, p), -ENOENT, "tracepoint {bad:?}");
    }
    let rawtp = t.str(STR + 8192 + 64, "rawtp");
    let p = t.str(STR + 128, "sys_enter_openat");
    assert_eq!(
        call(&mut t, h, rawtp, p),
        -ENOENT,
        "raw tracepoints: sys_enter, sys_exit"
    );
    let sock = t.str(STR + 8192, "sock");
    assert_eq!(
        call(&mut t, h, sock, tgt),
        -ENOENT,
        "socket programs are not loaded"
    );

    // The good path writes a perf event and a link into the store.
    let before = t.scratch.live();
    let tgt = t.str(STR + 64, &good_target);
    assert_eq!(call(&mut t, h, probe, tgt), 0);
    let ret = t.str(STR + 8192, "retprobe");
    assert_eq!(call(&mut t, h, ret, tgt), 0);
    // Tracepoints from the section name (`tracepoint/syscalls/sys_enter_openat`,
    // `raw_tp/sys_exit`) and from a target.
    let tp = t.str(STR + 8192, "tp");
    assert_eq!(call(&mut t, h, tp, 0), 0);
    let p = t.str(STR + 128, "syscalls:sys_exit_openat");
    assert_eq!(call(&mut t, h, tp, p), 0);
    let rawtp = t.str(STR + 8192 + 64, "rawtp");
    assert_eq!(call(&mut t, h, rawtp, 0), 0);
    assert_eq!(t.scratch.live(), before + 10);
    let a = bpftime_runtime::object::attachments(&t.scratch.store);
    assert_eq!(a.len(), 5, "five enabled perf events with programs");
    let exe_path = exe.canonicalize().unwrap();
    let (tps, ups): (Vec<_>, Vec<_>) = a
        .iter()
        .partition(|a| a.event.kind == bpftime_runtime::object::PerfKind::Tracepoint);
    assert!(ups.iter().all(|a| Path::new(&a.event.path) == exe_path));
    let mut ids: Vec<u64> = tps.iter().map(|a| a.event.offset).collect();
    ids.sort();
    let tp_id = |c: &str, n: &str| u64::from(Tracepoint::by_path(c, n).unwrap().id());
    let mut want = vec![
        tp_id("syscalls", "sys_enter_openat"),
        tp_id("syscalls", "sys_exit_openat"),
        tp_id("raw_syscalls", "sys_exit") | bpftime_attach::syscall::table::RAW_TP_FLAG,
    ];
    want.sort();
    assert_eq!(ids, want);
    assert_eq!(t.g.call::<i64, i32>("close", h).unwrap(), 0);
    assert!(bpftime_runtime::object::attachments(&t.scratch.store).is_empty());
}

#[test]
fn map_fd_by_name_checks_handles_and_names() {
    let Some(mut t) = T::new("fdname") else {
        return;
    };
    let h = t.load();
    let p = t.str(STR, "hash");
    assert_eq!(t.g.call::<(i64, i32), i32>("fd", (0, p)).unwrap(), -ENOENT);
    assert_eq!(
        t.g.call::<(i64, i32), i32>("fd", (h + 9, p)).unwrap(),
        -ENOENT
    );
    assert_eq!(t.g.call::<(i64, i32), i32>("fd", (h, 0)).unwrap(), -EFAULT);
    assert_eq!(t.g.call::<(i64, i32), i32>("fd", (h, -1)).unwrap(), -EFAULT);
    assert_eq!(t.fd(h, "nope"), -ENOENT);
    assert_eq!(t.fd(h, ""), -ENOENT);
    let long = "x".repeat(300);
    assert_eq!(t.fd(h, &long), -EINVAL, "names longer than 256 bytes");
    let a = t.fd(h, "hash");
    assert!(a >= 3);
    assert_eq!(t.fd(h, "hash"), a, "same map, same fd");
    let b = t.fd(h, ".rodata");
    assert!(b >= 3 && b != a);
}

#[test]
fn map_operate_checks_fds_commands_and_pointers() {
    let Some(mut t) = T::new("mapop") else { return };
    let h = t.load();
    let hash = t.fd(h, "hash");
    t.g.write_memory(KEY as usize, &5u32.to_ne_bytes()).unwrap();
    t.g.write_memory(VAL as usize, &42u64.to_ne_bytes())
        .unwrap();
    // Bad fds.
    for fd in [-1, 0, 1, 2, hash + 1000] {
        assert_eq!(t.op(fd, 1, KEY, VAL, 0, 0), -EBADF, "fd {fd}");
    }
    // Bad commands.
    for cmd in [0, 5, 6, -1, i32::MAX] {
        assert_eq!(t.op(hash, cmd, KEY, VAL, 0, 0), -EINVAL, "cmd {cmd}");
    }
    // Bad pointers for each command.
    for cmd in [1, 2, 3] {
        assert_eq!(
            t.op(hash, cmd, 0, VAL, 0, 0),
            -EFAULT,
            "cmd {cmd}: null key"
        );
        assert_eq!(
            t.op(hash, cmd, MEM_END - 2, VAL, 0, 0),
            -EFAULT,
            "cmd {cmd}: key"
        );
        assert_eq!(
            t.op(hash, cmd, -4, VAL, 0, 0),
            -EFAULT,
            "cmd {cmd}: wrapping key"
        );
    }
    for cmd in [1, 2] {
        assert_eq!(
            t.op(hash, cmd, KEY, 0, 0, 0),
            -EFAULT,
            "cmd {cmd}: null value"
        );
        assert_eq!(
            t.op(hash, cmd, KEY, MEM_END - 4, 0, 0),
            -EFAULT,
            "cmd {cmd}: value"
        );
    }
    assert_eq!(t.op(hash, 4, KEY, 0, 0, 0), -EFAULT, "null next_key");
    assert_eq!(t.op(hash, 4, KEY, 0, MEM_END - 1, 0), -EFAULT, "next_key");
    // Kernel errnos from the map: missing key, bad flags.
    assert_eq!(t.op(hash, 1, KEY, VAL, 0, 0), -ENOENT);
    assert_eq!(t.op(hash, 3, KEY, 0, 0, 0), -ENOENT);
    assert_eq!(t.op(hash, 2, KEY, VAL, 0, 99), -EINVAL);
    assert_eq!(t.op(hash, 1, KEY, VAL, 0, 1), -EINVAL, "lookup flags");
    // The good path: update, lookup, next key, delete.
    assert_eq!(t.op(hash, 2, KEY, VAL, 0, 0), 0);
    assert_eq!(
        t.op(hash, 2, KEY, VAL, 0, 1 /* BPF_NOEXIST */),
        -libc::EEXIST
    );
    t.g.write_memory(VAL as usize, &[0; 8]).unwrap();
    assert_eq!(t.op(hash, 1, KEY, VAL, 0, 0), 0);
    assert_eq!(
        t.g.read_memory(VAL as usize, 8).unwrap(),
        42u64.to_ne_bytes()
    );
    assert_eq!(t.op(hash, 4, 0, 0, KEY + 64, 0), 0, "first key");
    assert_eq!(
        t.g.read_memory((KEY + 64) as usize, 4).unwrap(),
        5u32.to_ne_bytes()
    );
    assert_eq!(
        t.op(hash, 4, KEY, 0, KEY + 64, 0),
        -ENOENT,
        "no key after the last"
    );
    assert_eq!(t.op(hash, 3, KEY, 0, 0, 0), 0);
    // Global data: .rodata holds the initial value of `config`.
    let ro = t.fd(h, ".rodata");
    t.g.write_memory(KEY as usize, &0u32.to_ne_bytes()).unwrap();
    assert_eq!(t.op(ro, 1, KEY, VAL, 0, 0), 0);
    assert_eq!(
        t.g.read_memory(VAL as usize, 8).unwrap(),
        7u64.to_ne_bytes()
    );
    // Queue: no key; lookup peeks, an empty queue is ENOENT.
    let q = t.fd(h, "queue");
    assert_eq!(t.op(q, 1, 0, VAL, 0, 0), -ENOENT);
    assert_eq!(t.op(q, 2, 0, VAL, 0, 0), 0);
    assert_eq!(t.op(q, 1, 0, VAL, 0, 0), 0);
    // Ring buffers have no elements (the kernel's ENOTSUPP, 524); perf arrays take no guest
    // updates (their values are perf events the host makes).
    let ring = t.fd(h, "ring");
    assert_eq!(t.op(ring, 1, KEY, VAL, 0, 0), -524);
    let perf = t.fd(h, "perf");
    assert_eq!(t.op(perf, 2, KEY, VAL, 0, 0), -EOPNOTSUPP);
    assert_eq!(t.op(perf, 3, KEY, 0, 0, 0), -EOPNOTSUPP);
    // A closed object's fds are gone.
    assert_eq!(t.g.call::<i64, i32>("close", h).unwrap(), 0);
    assert_eq!(t.op(hash, 1, KEY, VAL, 0, 0), -EBADF);
}

#[test]
fn buffer_poll_checks_arguments_and_delivers_ring_records() {
    let Some(mut t) = T::new("ringpoll") else {
        return;
    };
    let h = t.load();
    let ring = t.fd(h, "ring");
    let hash = t.fd(h, "hash");
    // Bad handle, fd, map type, sizes, buffer, callbacks.
    assert_eq!(t.poll(0, ring, 1, DATA, 64, 0), -ENOENT);
    assert_eq!(t.poll(h + 5, ring, 1, DATA, 64, 0), -ENOENT);
    assert_eq!(t.poll(h, -1, 1, DATA, 64, 0), -EBADF);
    assert_eq!(t.poll(h, 999, 1, DATA, 64, 0), -EBADF);
    assert_eq!(t.poll(h, hash, 1, DATA, 64, 0), -EINVAL);
    assert_eq!(t.poll(h, ring, 1, DATA, 0, 0), -EINVAL);
    assert_eq!(t.poll(h, ring, 1, DATA, -5, 0), -EINVAL);
    assert_eq!(t.poll(h, ring, 1, MEM_END - 8, 64, 0), -EFAULT);
    assert_eq!(t.poll(h, ring, 1, -64, 128, 0), -EFAULT);
    assert_eq!(t.poll(h, ring, 0, DATA, 64, 0), -EINVAL, "null table entry");
    assert_eq!(t.poll(h, ring, 5, DATA, 64, 0), -EINVAL, "past the table");
    assert_eq!(t.poll(h, ring, -1, DATA, 64, 0), -EINVAL, "negative index");
    assert_eq!(t.poll(h, ring, 4, DATA, 64, 0), -EINVAL, "wrong signature");
    // Nothing there: 0 after the timeout.
    assert_eq!(t.poll(h, ring, 1, DATA, 64, 0), 0);
    assert_eq!(t.poll(h, ring, 1, DATA, 64, 20), 0);

    // Records from a producer (as a program in another process would write them).
    let map = t.g.state().bpf.map_of_fd(ring).unwrap().clone();
    let rb = RingBuf::new(&map).unwrap();
    for v in [1u64, 20, 300] {
        rb.output(&v.to_ne_bytes(), 0).unwrap();
    }
    assert_eq!(t.poll(h, ring, 1, DATA, 64, 1000), 3);
    assert_eq!(t.n(), 3);
    assert_eq!(t.g.call::<(), i64>("sum", ()).unwrap(), 321);
    assert_eq!(t.g.call::<(), i32>("size", ()).unwrap(), 8);

    // A record longer than max_size is cut to it.
    rb.output(&[9u8; 32], 0).unwrap();
    assert_eq!(t.poll(h, ring, 1, DATA, 16, 1000), 1);
    assert_eq!(t.g.call::<(), i32>("size", ()).unwrap(), 16);

    // A callback that returns non-zero stops the poll; the rest wait for the next one.
    for v in [1u64, 2, 3] {
        rb.output(&v.to_ne_bytes(), 0).unwrap();
    }
    let n0 = t.n();
    assert_eq!(t.poll(h, ring, 2, DATA, 64, 1000), 7);
    assert_eq!(t.n(), n0 + 1, "stopped after one record");
    assert_eq!(
        t.poll(h, ring, 1, DATA, 64, 0),
        2,
        "the other two come next"
    );
    assert_eq!(t.poll(h, ring, 1, DATA, 64, 0), 0);

    // A producer waking a waiting poll.
    let producer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        RingBuf::new(&map)
            .unwrap()
            .output(&5u64.to_ne_bytes(), 0)
            .unwrap();
    });
    assert_eq!(t.poll(h, ring, 1, DATA, 64, 5000), 1);
    producer.join().unwrap();
    assert_eq!(t.g.call::<i64, i32>("close", h).unwrap(), 0);
    assert_eq!(
        t.poll(h, ring, 1, DATA, 64, 0),
        -EBADF,
        "closed: its fds are gone"
    );
}

#[test]
fn buffer_poll_delivers_perf_buffer_samples() {
    let Some(mut t) = T::new("perfpoll") else {
        return;
    };
    let h = t.load();
    let perf = t.fd(h, "perf");
    let before = t.scratch.live();
    // The first poll makes one BPF-output perf event (with a ring) per array slot.
    assert_eq!(t.poll(h, perf, 1, DATA, 64, 0), 0);
    let slots = t.g.state().bpf.map_of_fd(perf).unwrap().def().max_entries as usize;
    assert_eq!(slots, bpftime_maps::percpu::nr_possible_cpus() as usize);
    assert_eq!(t.scratch.live(), before + slots);
    let map = t.g.state().bpf.map_of_fd(perf).unwrap().clone();
    for (i, v) in [4u64, 40, 400].into_iter().enumerate() {
        perf_array::output(&map, (i % slots) as u32, &v.to_ne_bytes()).unwrap();
    }
    assert_eq!(t.poll(h, perf, 1, DATA, 64, 1000), 3);
    assert_eq!(t.g.call::<(), i64>("sum", ()).unwrap(), 444);
    // No second set of events on later polls.
    assert_eq!(t.poll(h, perf, 1, DATA, 64, 0), 0);
    assert_eq!(t.scratch.live(), before + slots);
    assert_eq!(t.g.call::<i64, i32>("close", h).unwrap(), 0);
    assert_eq!(
        t.scratch.live(),
        before - 7 - 5,
        "events, maps and programs gone"
    );
}

#[test]
fn close_checks_handles() {
    let Some(mut t) = T::new("close") else { return };
    let before = t.scratch.live();
    let h = t.load();
    for bad in [0i64, -1, h + 1, i64::MIN] {
        assert_eq!(t.g.call::<i64, i32>("close", bad).unwrap(), -ENOENT);
    }
    assert_eq!(t.g.call::<i64, i32>("close", h).unwrap(), 0);
    assert_eq!(t.g.call::<i64, i32>("close", h).unwrap(), -ENOENT, "twice");
    assert_eq!(t.scratch.live(), before);
}

#[test]
fn a_trapping_callback_ends_the_guest_and_its_objects_leave_the_store() {
    let Some(mut t) = T::new("trap") else { return };
    let before = t.scratch.live();
    let h = t.load();
    let ring = t.fd(h, "ring");
    let map = t.g.state().bpf.map_of_fd(ring).unwrap().clone();
    RingBuf::new(&map)
        .unwrap()
        .output(&1u64.to_ne_bytes(), 0)
        .unwrap();
    let r =
        t.g.call::<_, i32>("poll", (h, ring, 3i32, 0i32, DATA, 64i32, 1000i32));
    let e = r.expect_err("the trap reaches the caller");
    assert!(format!("{e:?}").contains("unreachable"), "{e:?}");
    // The host is fine: the buffer is usable and ending the run closes everything.
    assert_eq!(t.poll(h, ring, 1, DATA, 64, 0), 0);
    drop(map);
    t.g.state().bpf.close_all();
    assert_eq!(t.scratch.live(), before);
}

#[test]
fn polling_a_buffer_from_its_own_callback_is_ebusy() {
    // The callback calls poll on the same fd again (the guest passes fd and handle through
    // the ctx argument).
    let Some(object) = bpf_object("api_test") else {
        return;
    };
    let scratch = ScratchStore::new("reenter");
    let src = r#"
(module
  (import "wasm_bpf" "wasm_load_bpf_object" (func $load (param i32 i32) (result i64)))
  (import "wasm_bpf" "wasm_bpf_map_fd_by_name" (func $fd (param i64 i32) (result i32)))
  (import "wasm_bpf" "wasm_bpf_buffer_poll"
    (func $poll (param i64 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 4)
  (table (export "__indirect_function_table") 2 funcref)
  (elem (i32.const 1) $again)
  (global $h (mut i64) (i64.const 0))
  (global $fd (mut i32) (i32.const 0))
  (global $inner (mut i32) (i32.const 1))
  (data (i32.const 1024) "ring\00")
  (func $again (param i32 i32 i32) (result i32)
    (global.set $inner (call $poll (global.get $h) (global.get $fd) (i32.const 1)
      (i32.const 0) (i32.const 8192) (i32.const 64) (i32.const 0)))
    (i32.const 0))
  (func (export "setup") (param i32 i32) (result i32)
    (global.set $h (call $load (local.get 0) (local.get 1)))
    (global.set $fd (call $fd (global.get $h) (i32.const 1024)))
    (global.get $fd))
  (func (export "poll") (result i32)
    (call $poll (global.get $h) (global.get $fd) (i32.const 1) (i32.const 0)
      (i32.const 4096) (i32.const 64) (i32.const 1000)))
  (func (export "inner") (result i32) (global.get $inner))
)"#;
    let mut g = Guest::new(scratch.store.clone(), &wat(src), &GuestConfig::default()).unwrap();
    g.write_memory(OBJ as usize, &object).unwrap();
    let fd: i32 = g.call("setup", (OBJ, object.len() as i32)).unwrap();
    assert!(fd >= 3);
    let map = g.state().bpf.map_of_fd(fd).unwrap().clone();
    RingBuf::new(&map)
        .unwrap()
        .output(&1u64.to_ne_bytes(), 0)
        .unwrap();
    assert_eq!(g.call::<(), i32>("poll", ()).unwrap(), 1);
    assert_eq!(g.call::<(), i32>("inner", ()).unwrap(), -EBUSY);
}

#[test]
fn a_guest_without_memory_gets_efault_not_a_crash() {
    let Some(object) = bpf_object("api_test") else {
        return;
    };
    drop(object);
    let scratch = ScratchStore::new("nomem");
    let src = r#"
(module
  (import "wasm_bpf" "wasm_load_bpf_object" (func $load (param i32 i32) (result i64)))
  (import "wasm_bpf" "wasm_attach_bpf_program" (func $attach (param i64 i32 i32) (result i32)))
  (import "wasm_bpf" "wasm_bpf_map_fd_by_name" (func $fd (param i64 i32) (result i32)))
  (import "wasm_bpf" "wasm_bpf_map_operate"
    (func $op (param i32 i32 i32 i32 i32 i64) (result i32)))
  (import "wasm_bpf" "wasm_bpf_buffer_poll"
    (func $poll (param i64 i32 i32 i32 i32 i32 i32) (result i32)))
  (func (export "load") (result i64) (call $load (i32.const 0) (i32.const 16)))
  (func (export "attach") (result i32) (call $attach (i64.const 1) (i32.const 8) (i32.const 0)))
  (func (export "fd") (result i32) (call $fd (i64.const 1) (i32.const 8)))
  (func (export "op") (result i32)
    (call $op (i32.const 3) (i32.const 1) (i32.const 8) (i32.const 16) (i32.const 0)
      (i64.const 0)))
  (func (export "poll") (result i32)
    (call $poll (i64.const 1) (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 0)
      (i32.const 8) (i32.const 0)))
)"#;
    let mut g = Guest::new(scratch.store.clone(), &wat(src), &GuestConfig::default()).unwrap();
    assert_eq!(g.call::<(), i64>("load", ()).unwrap(), 0);
    assert_eq!(g.call::<(), i32>("attach", ()).unwrap(), -EFAULT);
    assert_eq!(g.call::<(), i32>("fd", ()).unwrap(), -EFAULT);
    assert_eq!(g.call::<(), i32>("op", ()).unwrap(), -EFAULT);
    assert_eq!(g.call::<(), i32>("poll", ()).unwrap(), -EFAULT);
}

#[test]
fn a_rejected_program_fails_the_load() {
    // An object whose program reads past its stack frame's top is refused by the loader
    // checks, as BPF_PROG_LOAD would refuse it; nothing is left in the store.
    let Some(object) = bpf_object("rejected") else {
        return;
    };
    let scratch = ScratchStore::new("rejected");
    let mut g = Guest::new(scratch.store.clone(), &wat(GUEST), &GuestConfig::default()).unwrap();
    g.write_memory(OBJ as usize, &object).unwrap();
    let before = scratch.live();
    assert_eq!(
        g.call::<(i32, i32), i64>("load", (OBJ, object.len() as i32))
            .unwrap(),
        0
    );
    assert_eq!(scratch.live(), before);
}
