//! Kernel helpers implemented in userspace, registered under the kernel's ids
//! (`enum bpf_func_id` in `include/uapi/linux/bpf.h`).
//!
//! Every helper follows the kernel's contract for return values: errors are negative errnos,
//! a faulting read returns `-EFAULT` (and zeroes the destination, as `bpf_probe_read_*` do).
//! Helpers touch the program's memory only through [`CallEnv::read_guest`] /
//! [`CallEnv::write_guest`]; user memory outside the program (`probe_read*` sources) is read
//! with `process_vm_readv` on ourselves, which reports a bad address instead of faulting.

use crate::host;
use bpftime_maps::MapType;
use bpftime_vm::helper::{CallEnv, HelperRegistry};
use std::cell::Cell;

/// `bpf_map_lookup_elem`.
pub const MAP_LOOKUP_ELEM: u32 = 1;
/// `bpf_map_update_elem`.
pub const MAP_UPDATE_ELEM: u32 = 2;
/// `bpf_map_delete_elem`.
pub const MAP_DELETE_ELEM: u32 = 3;
/// `bpf_probe_read`.
pub const PROBE_READ: u32 = 4;
/// `bpf_ktime_get_ns`.
pub const KTIME_GET_NS: u32 = 5;
/// `bpf_trace_printk`.
pub const TRACE_PRINTK: u32 = 6;
/// `bpf_get_prandom_u32`.
pub const GET_PRANDOM_U32: u32 = 7;
/// `bpf_get_smp_processor_id`.
pub const GET_SMP_PROCESSOR_ID: u32 = 8;
/// `bpf_tail_call`.
pub const TAIL_CALL: u32 = 12;
/// `bpf_get_current_pid_tgid`.
pub const GET_CURRENT_PID_TGID: u32 = 14;
/// `bpf_get_current_uid_gid`.
pub const GET_CURRENT_UID_GID: u32 = 15;
/// `bpf_get_current_comm`.
pub const GET_CURRENT_COMM: u32 = 16;
/// `bpf_get_stackid`.
pub const GET_STACKID: u32 = 27;
/// `bpf_probe_read_str`.
pub const PROBE_READ_STR: u32 = 45;
/// `bpf_override_return`.
pub const OVERRIDE_RETURN: u32 = 58;
/// `bpf_get_stack`.
pub const GET_STACK: u32 = 67;
/// `bpf_map_push_elem`.
pub const MAP_PUSH_ELEM: u32 = 87;
/// `bpf_map_pop_elem`.
pub const MAP_POP_ELEM: u32 = 88;
/// `bpf_map_peek_elem`.
pub const MAP_PEEK_ELEM: u32 = 89;
/// `bpf_probe_read_user`.
pub const PROBE_READ_USER: u32 = 112;
/// `bpf_probe_read_kernel`.
pub const PROBE_READ_KERNEL: u32 = 113;
/// `bpf_probe_read_user_str`.
pub const PROBE_READ_USER_STR: u32 = 114;
/// `bpf_probe_read_kernel_str`.
pub const PROBE_READ_KERNEL_STR: u32 = 115;
/// `bpf_ktime_get_boot_ns`.
pub const KTIME_GET_BOOT_NS: u32 = 125;
/// `bpf_ktime_get_coarse_ns`.
pub const KTIME_GET_COARSE_NS: u32 = 160;
/// `bpf_for_each_map_elem`.
pub const FOR_EACH_MAP_ELEM: u32 = 164;
/// `bpf_snprintf`.
pub const SNPRINTF: u32 = 165;
/// `bpf_get_func_ip`.
pub const GET_FUNC_IP: u32 = 173;
/// `bpf_get_attach_cookie`.
pub const GET_ATTACH_COOKIE: u32 = 174;
/// `bpf_loop`.
pub const LOOP: u32 = bpftime_vm::helper::BPF_LOOP;
/// `bpf_strncmp`.
pub const STRNCMP: u32 = 182;
/// `bpf_map_lookup_percpu_elem`.
pub const MAP_LOOKUP_PERCPU_ELEM: u32 = 195;

/// Largest buffer a probe-read helper copies in one call.
const MAX_READ: u64 = 1 << 16;

/// A scratch buffer for a key or value copied out of the program: on the stack up to 64 bytes
/// (nearly every key and value programs pass), on the heap beyond — no allocation on the
/// common helper path.
struct KeyBuf {
    // Small on purpose: it is zeroed on every helper call (keys are rarely over 64 bytes).
    stack: [u8; 64],
    heap: Vec<u8>,
}

impl KeyBuf {
    fn new() -> Self {
        KeyBuf {
            stack: [0; 64],
            heap: Vec::new(),
        }
    }

    fn get(&mut self, len: u32) -> &mut [u8] {
        let len = len as usize;
        if len <= self.stack.len() {
            &mut self.stack[..len]
        } else {
            self.heap.resize(len, 0);
            &mut self.heap
        }
    }
}

fn neg(errno: i32) -> u64 {
    (-(errno as i64)) as u64
}

/// A map operation's result as a helper returns it: 0 or a negative errno.
fn status(r: Result<(), bpftime_maps::MapError>) -> u64 {
    match r {
        Ok(()) => 0,
        Err(e) => neg(e.errno()),
    }
}

/// The helpers every program type gets, under their kernel names.
pub fn registry() -> HelperRegistry {
    let mut h = HelperRegistry::new();
    h.register(MAP_LOOKUP_ELEM, "bpf_map_lookup_elem", map_lookup_elem)
        .register(MAP_UPDATE_ELEM, "bpf_map_update_elem", map_update_elem)
        .register(MAP_DELETE_ELEM, "bpf_map_delete_elem", map_delete_elem)
        .register(PROBE_READ, "bpf_probe_read", probe_read)
        .register(KTIME_GET_NS, "bpf_ktime_get_ns", ktime_get_ns)
        .register(TRACE_PRINTK, "bpf_trace_printk", trace_printk)
        .register(GET_PRANDOM_U32, "bpf_get_prandom_u32", get_prandom_u32)
        .register(
            GET_SMP_PROCESSOR_ID,
            "bpf_get_smp_processor_id",
            get_smp_processor_id,
        )
        .register(TAIL_CALL, "bpf_tail_call", tail_call)
        .register(
            GET_CURRENT_PID_TGID,
            "bpf_get_current_pid_tgid",
            get_current_pid_tgid,
        )
        .register(
            GET_CURRENT_UID_GID,
            "bpf_get_current_uid_gid",
            get_current_uid_gid,
        )
        .register(GET_CURRENT_COMM, "bpf_get_current_comm", get_current_comm)
        .register(PROBE_READ_STR, "bpf_probe_read_str", probe_read_str)
        .register(GET_STACKID, "bpf_get_stackid", get_stackid)
        .register(GET_STACK, "bpf_get_stack", get_stack)
        .register(OVERRIDE_RETURN, "bpf_override_return", override_return)
        .register(MAP_PUSH_ELEM, "bpf_map_push_elem", map_push_elem)
        .register(MAP_POP_ELEM, "bpf_map_pop_elem", map_pop_elem)
        .register(MAP_PEEK_ELEM, "bpf_map_peek_elem", map_peek_elem)
        .register(PROBE_READ_USER, "bpf_probe_read_user", probe_read)
        .register(PROBE_READ_KERNEL, "bpf_probe_read_kernel", probe_read)
        .register(
            PROBE_READ_USER_STR,
            "bpf_probe_read_user_str",
            probe_read_str,
        )
        .register(
            PROBE_READ_KERNEL_STR,
            "bpf_probe_read_kernel_str",
            probe_read_str,
        )
        .register(
            KTIME_GET_BOOT_NS,
            "bpf_ktime_get_boot_ns",
            ktime_get_boot_ns,
        )
        .register(
            KTIME_GET_COARSE_NS,
            "bpf_ktime_get_coarse_ns",
            ktime_get_coarse_ns,
        )
        .register_calling_back(
            FOR_EACH_MAP_ELEM,
            "bpf_for_each_map_elem",
            for_each_map_elem,
        )
        .register(SNPRINTF, "bpf_snprintf", snprintf)
        .register(GET_FUNC_IP, "bpf_get_func_ip", get_func_ip)
        .register(
            GET_ATTACH_COOKIE,
            "bpf_get_attach_cookie",
            get_attach_cookie,
        )
        .register_calling_back(LOOP, "bpf_loop", bpftime_vm::helper::bpf_loop)
        .register(STRNCMP, "bpf_strncmp", strncmp)
        .register(
            MAP_LOOKUP_PERCPU_ELEM,
            "bpf_map_lookup_percpu_elem",
            map_lookup_percpu_elem,
        );
    crate::buffers::register(&mut h);
    h
}

/// The kernel name of helper `id`, if this runtime knows it.
pub fn name(id: u32) -> Option<&'static str> {
    registry().get(id).map(|h| h.name)
}

extern "C" fn map_lookup_elem(
    map: u64,
    key: u64,
    _: u64,
    _: u64,
    _: u64,
    env: &mut CallEnv,
) -> u64 {
    let Some(m) = host::map_arg(env, map) else {
        return 0;
    };
    let mut kb = KeyBuf::new();
    let k = kb.get(m.def().key_size);
    if !env.read_guest(key, k) {
        return 0;
    }
    let ty = m.def().map_type;
    if (ty == MapType::ArrayOfMaps as u32 || ty == MapType::HashOfMaps as u32)
        && m.inner_template().is_some()
    {
        // A map of maps: the inner map, as a map pointer the program passes to helpers.
        return match m.inner_map_id(k) {
            Ok(id) => host::inner_map_handle(env, m, id).unwrap_or(0),
            Err(_) => 0,
        };
    }
    if let Some(p) = host::array_value(env, m, k) {
        host::grant_map_value(env, m, p);
        return p as u64;
    }
    match m.lookup_ptr(k) {
        Ok(p) => {
            host::grant_map_value(env, m, p);
            p as u64
        }
        Err(_) => 0,
    }
}

/// `bpf_map_lookup_percpu_elem(map, key, cpu)`: CPU `cpu`'s value of a per-CPU map, or NULL
/// (also for a CPU that is not possible, as the kernel's `cpu >= nr_cpu_ids` check).
extern "C" fn map_lookup_percpu_elem(
    map: u64,
    key: u64,
    cpu: u64,
    _: u64,
    _: u64,
    env: &mut CallEnv,
) -> u64 {
    let Some(m) = host::map_arg(env, map) else {
        return 0;
    };
    let Ok(cpu) = u32::try_from(cpu) else {
        return 0;
    };
    let mut kb = KeyBuf::new();
    let k = kb.get(m.def().key_size);
    if !env.read_guest(key, k) {
        return 0;
    }
    match m.lookup_percpu_ptr(k, cpu) {
        Ok(p) => {
            host::grant_map_value(env, m, p);
            p as u64
        }
        Err(_) => 0,
    }
}

extern "C" fn map_update_elem(
    map: u64,
    key: u64,
    value: u64,
    flags: u64,
    _: u64,
    env: &mut CallEnv,
) -> u64 {
    let Some(m) = host::map_arg(env, map) else {
        return neg(libc::EINVAL);
    };
    if !prog_may_write(m) {
        return neg(libc::EPERM);
    }
    let (mut kb, mut vb) = (KeyBuf::new(), KeyBuf::new());
    let k = kb.get(m.def().key_size);
    let v = vb.get(m.def().value_size);
    if !env.read_guest(key, k) || !env.read_guest(value, v) {
        return neg(libc::EFAULT);
    }
    if host::update_array_in_place(env, m, k, v, flags) {
        return 0;
    }
    status(m.update(k, v, flags))
}

extern "C" fn map_delete_elem(
    map: u64,
    key: u64,
    _: u64,
    _: u64,
    _: u64,
    env: &mut CallEnv,
) -> u64 {
    let Some(m) = host::map_arg(env, map) else {
        return neg(libc::EINVAL);
    };
    if !prog_may_write(m) {
        return neg(libc::EPERM);
    }
    let mut kb = KeyBuf::new();
    let k = kb.get(m.def().key_size);
    if !env.read_guest(key, k) {
        return neg(libc::EFAULT);
    }
    status(m.delete(k))
}

/// `bpf_map_push_elem(map, value, flags)`: queue, stack, bloom filter.
extern "C" fn map_push_elem(
    map: u64,
    value: u64,
    flags: u64,
    _: u64,
    _: u64,
    env: &mut CallEnv,
) -> u64 {
    let Some(m) = host::map_arg(env, map) else {
        return neg(libc::EINVAL);
    };
    if !prog_may_write(m) {
        return neg(libc::EPERM);
    }
    let mut vb = KeyBuf::new();
    let v = vb.get(m.def().value_size);
    if !env.read_guest(value, v) {
        return neg(libc::EFAULT);
    }
    status(m.push(v, flags))
}

/// `bpf_map_pop_elem(map, value)` and `bpf_map_peek_elem(map, value)`.
fn take_elem(map: u64, value: u64, env: &mut CallEnv, pop: bool) -> u64 {
    let Some(m) = host::map_arg(env, map) else {
        return neg(libc::EINVAL);
    };
    if pop && !prog_may_write(m) {
        return neg(libc::EPERM);
    }
    let mut v = vec![0u8; m.def().value_size as usize];
    if m.def().map_type == bpftime_maps::MapType::BloomFilter as u32 {
        // The value is the input: is it (maybe) in the filter?
        if !env.read_guest(value, &mut v) {
            return neg(libc::EFAULT);
        }
        return match m.peek(&mut v) {
            Ok(()) => 0,
            Err(e) => neg(e.errno()),
        };
    }
    // Check the destination before an element is taken out, so none is lost to a bad buffer.
    if !env.write_guest(value, &v) {
        return neg(libc::EFAULT);
    }
    let r = if pop { m.pop(&mut v) } else { m.peek(&mut v) };
    match r {
        Ok(()) => {
            if env.write_guest(value, &v) {
                0
            } else {
                neg(libc::EFAULT)
            }
        }
        Err(e) => neg(e.errno()),
    }
}

extern "C" fn map_pop_elem(map: u64, value: u64, _: u64, _: u64, _: u64, env: &mut CallEnv) -> u64 {
    take_elem(map, value, env, true)
}

extern "C" fn map_peek_elem(
    map: u64,
    value: u64,
    _: u64,
    _: u64,
    _: u64,
    env: &mut CallEnv,
) -> u64 {
    take_elem(map, value, env, false)
}

/// Whether programs may change `m` (not `BPF_F_RDONLY_PROG`; the kernel refuses such
/// programs at load with "write into map forbidden", we refuse the call with `-EPERM`).
fn prog_may_write(m: &bpftime_maps::Map) -> bool {
    m.def().flags & bpftime_maps::map::BPF_F_RDONLY_PROG == 0
}

/// `BPF_F_SKIP_FIELD_MASK`: frames to skip, in the low byte of the flags.
const BPF_F_SKIP_FIELD_MASK: u64 = 0xff;
/// `BPF_F_USER_STACK`.
const BPF_F_USER_STACK: u64 = 1 << 8;
/// `BPF_F_FAST_STACK_CMP`.
const BPF_F_FAST_STACK_CMP: u64 = 1 << 9;
/// `BPF_F_REUSE_STACKID`.
const BPF_F_REUSE_STACKID: u64 = 1 << 10;
/// `BPF_F_USER_BUILD_ID`.
const BPF_F_USER_BUILD_ID: u64 = 1 << 11;
/// `sysctl_perf_event_max_stack`.
const MAX_STACK: usize = 127;

/// `struct pt_regs` (x86_64) offsets of `bp`, `ip`, `sp`.
const PT_REGS_BP: u64 = 4 * 8;
const PT_REGS_IP: u64 = 16 * 8;
const PT_REGS_SP: u64 = 19 * 8;

/// The user stack of the probe whose `struct pt_regs` is the program's context, innermost
/// first, after skipping `skip` frames, at most `depth` frames. `None` if the context cannot
/// be read or has no more than `skip` frames (the kernel's `-EFAULT`).
fn probe_stack(env: &CallEnv, skip: usize, depth: usize) -> Option<Vec<u64>> {
    let reg = |off: u64| {
        let mut b = [0u8; 8];
        env.read_guest(env.ctx.checked_add(off)?, &mut b)
            .then(|| u64::from_ne_bytes(b))
    };
    if env.ctx == 0 {
        return None;
    }
    let (ip, bp, sp) = (reg(PT_REGS_IP)?, reg(PT_REGS_BP)?, reg(PT_REGS_SP)?);
    let all = host::user_stack(ip, bp, sp, (skip + depth).min(MAX_STACK));
    if all.len() <= skip {
        return None;
    }
    Some(all[skip..].to_vec())
}

/// `bpf_get_stackid(ctx, map, flags)`: the id of the current user stack in a stack trace map.
/// Only user stacks exist here: without `BPF_F_USER_STACK` (a kernel stack) it is `-EFAULT`,
/// as the kernel answers when it has no callchain.
extern "C" fn get_stackid(
    _ctx: u64,
    map: u64,
    flags: u64,
    _: u64,
    _: u64,
    env: &mut CallEnv,
) -> u64 {
    let Some(m) = host::map_arg(env, map) else {
        return neg(libc::EINVAL);
    };
    if flags
        & !(BPF_F_SKIP_FIELD_MASK | BPF_F_USER_STACK | BPF_F_FAST_STACK_CMP | BPF_F_REUSE_STACKID)
        != 0
    {
        return neg(libc::EINVAL);
    }
    if flags & BPF_F_USER_STACK == 0 {
        return neg(libc::EFAULT);
    }
    let skip = (flags & BPF_F_SKIP_FIELD_MASK) as usize;
    let depth = (m.def().value_size / 8) as usize;
    let Some(ips) = probe_stack(env, skip, depth) else {
        return neg(libc::EFAULT);
    };
    match m.stack_id(&ips, flags & (BPF_F_FAST_STACK_CMP | BPF_F_REUSE_STACKID)) {
        Ok(id) => u64::from(id),
        Err(e) => neg(e.errno()),
    }
}

/// `bpf_get_stack(ctx, buf, size, flags)`: the user stack into `buf` (8 bytes per frame,
/// the rest zeroed); the bytes written, or a negative errno with `buf` zeroed.
extern "C" fn get_stack(
    _ctx: u64,
    buf: u64,
    size: u64,
    flags: u64,
    _: u64,
    env: &mut CallEnv,
) -> u64 {
    if size > MAX_READ {
        return neg(libc::EINVAL);
    }
    let mut out = vec![0u8; size as usize];
    let err = |env: &mut CallEnv, out: &[u8], errno: i32| {
        let _ = env.write_guest(buf, out);
        neg(errno)
    };
    if flags & !(BPF_F_SKIP_FIELD_MASK | BPF_F_USER_STACK | BPF_F_USER_BUILD_ID) != 0
        || flags & BPF_F_USER_BUILD_ID != 0 && flags & BPF_F_USER_STACK == 0
    {
        return err(env, &out, libc::EINVAL);
    }
    if flags & BPF_F_USER_BUILD_ID != 0 {
        // Build ids (ELF notes of the mapped files) are not produced here.
        return err(env, &out, libc::EOPNOTSUPP);
    }
    if !size.is_multiple_of(8) {
        return err(env, &out, libc::EINVAL);
    }
    if flags & BPF_F_USER_STACK == 0 {
        return err(env, &out, libc::EFAULT);
    }
    let skip = (flags & BPF_F_SKIP_FIELD_MASK) as usize;
    let Some(ips) = probe_stack(env, skip, size as usize / 8) else {
        return err(env, &out, libc::EFAULT);
    };
    let n = ips.len().min(size as usize / 8);
    for (dst, ip) in out.chunks_exact_mut(8).zip(&ips[..n]) {
        dst.copy_from_slice(&ip.to_ne_bytes());
    }
    if !env.write_guest(buf, &out) {
        return neg(libc::EFAULT);
    }
    (n * 8) as u64
}

/// `bpf_probe_read{,_user,_kernel}(dst, size, src)`.
extern "C" fn probe_read(dst: u64, size: u64, src: u64, _: u64, _: u64, env: &mut CallEnv) -> u64 {
    if size > MAX_READ {
        return neg(libc::EINVAL);
    }
    let mut buf = vec![0u8; size as usize];
    let ok = host::read_user(src, &mut buf);
    if !ok {
        buf.fill(0);
    }
    if !env.write_guest(dst, &buf) {
        return neg(libc::EFAULT);
    }
    if ok { 0 } else { neg(libc::EFAULT) }
}

/// `bpf_probe_read{,_user,_kernel}_str(dst, size, src)`: copies up to `size - 1` bytes and a
/// NUL; returns the length including the NUL.
extern "C" fn probe_read_str(
    dst: u64,
    size: u64,
    src: u64,
    _: u64,
    _: u64,
    env: &mut CallEnv,
) -> u64 {
    if size == 0 {
        return 0;
    }
    if size > MAX_READ {
        return neg(libc::EINVAL);
    }
    let mut buf = vec![0u8; size as usize];
    match host::read_user_str(src, &mut buf) {
        Some(n) => {
            if !env.write_guest(dst, &buf[..n]) {
                return neg(libc::EFAULT);
            }
            n as u64
        }
        None => {
            let _ = env.write_guest(dst, &buf[..1]);
            neg(libc::EFAULT)
        }
    }
}

extern "C" fn ktime_get_ns(_: u64, _: u64, _: u64, _: u64, _: u64, _: &mut CallEnv) -> u64 {
    host::clock_ns(libc::CLOCK_MONOTONIC)
}

extern "C" fn ktime_get_coarse_ns(_: u64, _: u64, _: u64, _: u64, _: u64, _: &mut CallEnv) -> u64 {
    host::clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

extern "C" fn ktime_get_boot_ns(_: u64, _: u64, _: u64, _: u64, _: u64, _: &mut CallEnv) -> u64 {
    host::clock_ns(libc::CLOCK_BOOTTIME)
}

thread_local! {
    static RNG: Cell<u64> = const { Cell::new(0) };
}

extern "C" fn get_prandom_u32(_: u64, _: u64, _: u64, _: u64, _: u64, _: &mut CallEnv) -> u64 {
    RNG.with(|c| {
        let mut x = c.get();
        if x == 0 {
            x = host::clock_ns(libc::CLOCK_MONOTONIC) ^ (u64::from(host::tid()) << 32) | 1;
        }
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) & 0xffff_ffff
    })
}

extern "C" fn get_smp_processor_id(_: u64, _: u64, _: u64, _: u64, _: u64, _: &mut CallEnv) -> u64 {
    u64::from(host::current_cpu())
}

/// `bpf_tail_call(ctx, prog_array, index)`: see [`crate::prog`] (the program array is read at
/// call time; a failed call falls through with a negative errno).
extern "C" fn tail_call(_ctx: u64, map: u64, index: u64, _: u64, _: u64, env: &mut CallEnv) -> u64 {
    crate::prog::tail_call(env, map, index)
}

extern "C" fn get_current_pid_tgid(_: u64, _: u64, _: u64, _: u64, _: u64, _: &mut CallEnv) -> u64 {
    (u64::from(host::pid()) << 32) | u64::from(host::tid())
}

extern "C" fn get_current_uid_gid(_: u64, _: u64, _: u64, _: u64, _: u64, _: &mut CallEnv) -> u64 {
    let (uid, gid) = host::uid_gid();
    (u64::from(gid) << 32) | u64::from(uid)
}

extern "C" fn get_current_comm(
    buf: u64,
    size: u64,
    _: u64,
    _: u64,
    _: u64,
    env: &mut CallEnv,
) -> u64 {
    if size == 0 || size > MAX_READ {
        return neg(libc::EINVAL);
    }
    let comm = host::comm();
    let mut out = vec![0u8; size as usize];
    let n = comm.len().min(out.len() - 1);
    out[..n].copy_from_slice(&comm[..n]);
    if !env.write_guest(buf, &out) {
        return neg(libc::EFAULT);
    }
    0
}

thread_local! {
    static COOKIE: Cell<u64> = const { Cell::new(0) };
}

/// Makes `bpf_get_attach_cookie` return a cookie on this thread until dropped (restoring the
/// previous one, so nested runs are fine).
#[derive(Debug)]
pub struct CookieGuard(Option<u64>);

impl CookieGuard {
    /// Sets `cookie` for the current run.
    #[inline]
    pub fn set(cookie: u64) -> CookieGuard {
        // Nothing to restore when the cookie does not change (the common case of runs without
        // cookies): one thread-local access per run instead of two.
        let prev = COOKIE.try_with(|c| c.replace(cookie)).ok();
        CookieGuard(prev.filter(|&p| p != cookie))
    }
}

impl Drop for CookieGuard {
    #[inline]
    fn drop(&mut self) {
        if let Some(prev) = self.0 {
            let _ = COOKIE.try_with(|c| c.set(prev));
        }
    }
}

/// `bpf_get_attach_cookie(ctx)`: the BPF cookie of the link (or `perf_event_open`'s
/// `bpf_cookie`) the program runs for, set by whoever runs it through
/// [`crate::LoadedProg::run_with_cookie`]; 0 otherwise.
///
/// The agent passes each program's link cookie (uprobe_multi: each probe point's).
extern "C" fn get_attach_cookie(_: u64, _: u64, _: u64, _: u64, _: u64, _: &mut CallEnv) -> u64 {
    COOKIE.with(Cell::get)
}

thread_local! {
    static OVERRIDE: Cell<Option<u64>> = const { Cell::new(None) };
}

/// `bpf_override_return(ctx, rc)`: records `rc` for whoever runs the program, read with
/// [`take_override`] after the run (a syscall tracepoint skips the system call and makes `rc`
/// its result). Returns 0. The kernel allows it only in kprobes on error-injectable functions.
extern "C" fn override_return(_: u64, rc: u64, _: u64, _: u64, _: u64, _: &mut CallEnv) -> u64 {
    OVERRIDE.with(|o| o.set(Some(rc)));
    0
}

/// Takes the value the last `bpf_override_return` on this thread recorded, if any since the
/// previous call.
pub fn take_override() -> Option<u64> {
    OVERRIDE.with(Cell::take)
}

thread_local! {
    static FUNC_IP: Cell<u64> = const { Cell::new(0) };
}

/// Makes `bpf_get_func_ip` return `ip` on this thread until dropped (restoring the previous
/// value). For runners whose context's `ip` is not the probed function: a uretprobe's
/// `pt_regs.ip` is the return address, but the kernel's helper returns the function.
#[derive(Debug)]
pub struct FuncIpGuard(u64);

impl FuncIpGuard {
    /// Sets `ip` for the programs run while the guard lives.
    pub fn set(ip: u64) -> FuncIpGuard {
        FuncIpGuard(FUNC_IP.with(|c| c.replace(ip)))
    }
}

impl Drop for FuncIpGuard {
    fn drop(&mut self) {
        FUNC_IP.with(|c| c.set(self.0));
    }
}

/// `bpf_get_func_ip(ctx)`: for a uprobe the probed address (the kernel returns the uprobe's
/// `bp_addr`, the function's address for a uretprobe too): the runner's [`FuncIpGuard`] when
/// set, else the `ip` of the `struct pt_regs` the program gets.
extern "C" fn get_func_ip(_: u64, _: u64, _: u64, _: u64, _: u64, env: &mut CallEnv) -> u64 {
    let ip = FUNC_IP.with(Cell::get);
    if ip != 0 {
        return ip;
    }
    let mut b = [0u8; 8];
    if env.ctx == 0 || !env.read_guest(env.ctx.wrapping_add(PT_REGS_IP), &mut b) {
        return 0;
    }
    u64::from_ne_bytes(b)
}

/// `bpf_for_each_map_elem(map, callback_fn, callback_ctx, flags)` (`kernel/bpf/hashtab.c`,
/// `arraymap.c`): calls `callback_fn(map, &key, &value, callback_ctx)` for each element of a
/// hash, LRU hash, array or their per-CPU variants (this CPU's value), stopping after a call
/// that returns non-zero; returns the number of calls. The key (a read-only copy) and the value
/// (the element itself, read-only in a `BPF_F_RDONLY_PROG` map) are valid during the call
/// only. `-EINVAL` for other maps, non-zero flags or a bad callback. Hash maps are walked with
/// `next_key` (elements the callback deletes or adds may be missed or seen twice, as with a
/// concurrent writer), at most `max_entries` calls.
extern "C" fn for_each_map_elem(
    map: u64,
    func: u64,
    ctx: u64,
    flags: u64,
    _: u64,
    env: &mut CallEnv,
) -> u64 {
    use bpftime_maps::MapType;
    use bpftime_vm::helper::{CallbackError, MemRegion};
    let Some(m) = host::map_arg(env, map) else {
        return neg(libc::EINVAL);
    };
    if flags != 0 {
        return neg(libc::EINVAL);
    }
    let ty = MapType::try_from(m.def().map_type);
    let array = match ty {
        Ok(MapType::Array | MapType::PercpuArray) => true,
        Ok(MapType::Hash | MapType::PercpuHash | MapType::LruHash | MapType::LruPercpuHash) => {
            false
        }
        _ => return neg(libc::EINVAL),
    };
    let key_size = m.def().key_size as usize;
    let value_size = u64::from(m.def().value_size);
    let writable = prog_may_write(m);
    // Two key buffers: the one the callback sees, and the next one; the callback's is not
    // touched by Rust while it runs.
    let (mut key, mut next) = (vec![0u8; key_size], vec![0u8; key_size]);
    let max = u64::from(m.def().max_entries);
    let mut calls = 0u64;
    let mut first = true;
    // Bounded even when other threads keep deleting the elements met.
    for _ in 0..max.saturating_mul(2) {
        if calls >= max {
            break;
        }
        if array {
            key.copy_from_slice(&(calls as u32).to_ne_bytes()[..key_size.min(4)]);
        } else {
            let prev = (!first).then_some(&key[..]);
            if m.next_key(prev, &mut next).is_err() {
                break;
            }
            std::mem::swap(&mut key, &mut next);
            first = false;
        }
        let Ok(value) = m.lookup_ptr(&key) else {
            if array {
                break;
            }
            continue;
        };
        calls += 1;
        let grants = [
            MemRegion {
                start: key.as_ptr() as u64,
                len: key_size as u64,
                writable: false,
            },
            MemRegion {
                start: value as u64,
                len: value_size,
                writable,
            },
        ];
        let args = [map, key.as_ptr() as u64, value as u64, ctx, 0];
        // SAFETY: `key` is not touched until the call returns; `value` is an element in the
        // store mapping, which stays mapped while the program's map handle lives.
        match unsafe { env.call_func_granting(func, args, &grants) } {
            Ok(0) => {}
            Ok(_) => break,
            Err(CallbackError::Invalid) => return neg(libc::EINVAL),
            Err(CallbackError::Stop) => return 0,
        }
    }
    calls
}

/// `bpf_strncmp(s1, s1_sz, s2)`: `strncmp(s1, s2, s1_sz)` as the kernel's (`-1`, `0`, `1`);
/// `s2` is a NUL-terminated constant of the program (`.rodata`).
extern "C" fn strncmp(s1: u64, s1_sz: u64, s2: u64, _: u64, _: u64, env: &mut CallEnv) -> u64 {
    if s1_sz > MAX_READ {
        return neg(libc::E2BIG);
    }
    for i in 0..s1_sz {
        let (mut a, mut b) = ([0u8], [0u8]);
        if !env.read_guest(s1.wrapping_add(i), &mut a)
            || !env.read_guest(s2.wrapping_add(i), &mut b)
        {
            return neg(libc::EFAULT);
        }
        if a[0] != b[0] {
            return if a[0] < b[0] { u64::MAX } else { 1 };
        }
        if a[0] == 0 {
            break;
        }
    }
    0
}

/// `MAX_BPRINTF_VARARGS`.
const MAX_BPRINTF_VARARGS: u64 = 12;

/// `bpf_snprintf(str, str_size, fmt, data, data_len)`: formats `data_len / 8` u64 arguments
/// with the kernel's `bpf_bprintf_prepare` rules into `str` (NUL-terminated, truncated to
/// `str_size`); returns the length the whole output needs including the NUL, or a negative
/// errno (`-EINVAL` for a format the kernel refuses, `-E2BIG` for too many arguments).
extern "C" fn snprintf(
    out: u64,
    size: u64,
    fmt: u64,
    data: u64,
    data_len: u64,
    env: &mut CallEnv,
) -> u64 {
    if !data_len.is_multiple_of(8) || data_len / 8 > MAX_BPRINTF_VARARGS {
        return neg(libc::EINVAL);
    }
    if size > MAX_READ {
        return neg(libc::E2BIG);
    }
    let mut args = vec![0u8; data_len as usize];
    if !env.read_guest(data, &mut args) {
        return neg(libc::EFAULT);
    }
    let args: Vec<u64> = args
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()))
        .collect();
    // The format is a NUL-terminated constant of the program.
    let mut f = Vec::new();
    loop {
        let mut c = [0u8];
        if f.len() as u64 >= MAX_READ || !env.read_guest(fmt.wrapping_add(f.len() as u64), &mut c) {
            return neg(libc::EINVAL);
        }
        if c[0] == 0 {
            break;
        }
        f.push(c[0]);
    }
    let Some(text) = format_bprintf(&f, &args) else {
        return neg(libc::EINVAL);
    };
    let need = text.len() as u64 + 1;
    if size > 0 {
        let n = (size - 1).min(text.len() as u64) as usize;
        let mut buf = text.as_bytes()[..n].to_vec();
        buf.push(0);
        if !env.write_guest(out, &buf) {
            return neg(libc::EFAULT);
        }
    }
    need
}

/// Formats like the kernel's `bpf_bprintf_prepare` + `bstr_printf`: flags `0 + - ' '` and a
/// width, `l`/`ll` lengths, conversions `d i u x X c s %`, `p` (`px`, `pK`: the address; `pI4`,
/// `pi4`: an IPv4 address read from the pointer; `pks`, `pus`: a string). At least as many
/// arguments as conversions; `None` for anything else (the kernel's `-EINVAL`).
pub fn format_bprintf(fmt: &[u8], args: &[u64]) -> Option<String> {
    let mut out = String::new();
    let mut args = args.iter().copied();
    let mut i = 0;
    while i < fmt.len() {
        let c = fmt[i];
        i += 1;
        if c != b'%' {
            if !c.is_ascii() || c.is_ascii_control() && !c.is_ascii_whitespace() {
                return None;
            }
            out.push(c as char);
            continue;
        }
        if fmt.get(i) == Some(&b'%') {
            out.push('%');
            i += 1;
            continue;
        }
        let (mut left, mut zero, mut plus, mut space) = (false, false, false, false);
        while let Some(&f) = fmt.get(i) {
            match f {
                b'-' => left = true,
                b'0' => zero = true,
                b'+' => plus = true,
                b' ' => space = true,
                _ => break,
            }
            i += 1;
        }
        let mut width = 0usize;
        while let Some(d) = fmt.get(i).filter(|d| d.is_ascii_digit()) {
            width = width.checked_mul(10)?.checked_add(usize::from(d - b'0'))?;
            i += 1;
        }
        let v = args.next()?;
        let conv = *fmt.get(i)?;
        i += 1;
        let s = if conv == b'p' {
            match fmt.get(i) {
                Some(b'x' | b'K') => {
                    i += 1;
                    format!("{v:x}")
                }
                Some(b'k' | b'u') if fmt.get(i + 1) == Some(&b's') => {
                    i += 2;
                    let mut b = [0u8; 512];
                    match host::read_user_str(v, &mut b) {
                        Some(n) => String::from_utf8_lossy(&b[..n.saturating_sub(1)]).into_owned(),
                        None => "(fault)".into(),
                    }
                }
                Some(b'I' | b'i') if fmt.get(i + 1) == Some(&b'4') => {
                    i += 2;
                    let mut ip = [0u8; 4];
                    if !host::read_user(v, &mut ip) {
                        return None;
                    }
                    format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3])
                }
                Some(c) if c.is_ascii_alphanumeric() => return None,
                _ => format!("0x{v:x}"),
            }
        } else {
            let mut longs = 0;
            let mut conv = conv;
            while conv == b'l' {
                longs += 1;
                conv = *fmt.get(i)?;
                i += 1;
            }
            if longs > 2 {
                return None;
            }
            let signed = |x: i64| {
                if plus && x >= 0 {
                    format!("+{x}")
                } else if space && x >= 0 {
                    format!(" {x}")
                } else {
                    x.to_string()
                }
            };
            match conv {
                b'd' | b'i' if longs == 0 => signed(i64::from(v as i32)),
                b'd' | b'i' => signed(v as i64),
                b'u' if longs == 0 => (v as u32).to_string(),
                b'u' => v.to_string(),
                b'x' if longs == 0 => format!("{:x}", v as u32),
                b'x' => format!("{v:x}"),
                b'X' if longs == 0 => format!("{:X}", v as u32),
                b'X' => format!("{v:X}"),
                b'c' if longs == 0 => char::from(v as u8).to_string(),
                b's' if longs == 0 => {
                    let mut b = [0u8; 512];
                    match host::read_user_str(v, &mut b) {
                        Some(n) => String::from_utf8_lossy(&b[..n.saturating_sub(1)]).into_owned(),
                        None => "(fault)".into(),
                    }
                }
                _ => return None,
            }
        };
        let pad = width.saturating_sub(s.chars().count());
        if left {
            out.push_str(&s);
            out.extend(std::iter::repeat_n(' ', pad));
        } else if zero && conv_is_numeric(&s) {
            let (sign, digits) = s.split_at(usize::from(s.starts_with(['-', '+', ' '])));
            out.push_str(sign);
            out.extend(std::iter::repeat_n('0', pad));
            out.push_str(digits);
        } else {
            out.extend(std::iter::repeat_n(' ', pad));
            out.push_str(&s);
        }
    }
    Some(out)
}

fn conv_is_numeric(s: &str) -> bool {
    s.trim_start_matches(['-', '+', ' '])
        .chars()
        .all(|c| c.is_ascii_hexdigit())
}

/// `bpf_trace_printk(fmt, fmt_size, a1, a2, a3)`: formats like the kernel (`%d %i %u %x %X
/// %ld %lu %lx %lld %llu %llx %p %s %c %%`) and hands the line to the runtime's trace sink.
extern "C" fn trace_printk(
    fmt: u64,
    size: u64,
    a1: u64,
    a2: u64,
    a3: u64,
    env: &mut CallEnv,
) -> u64 {
    if size == 0 || size > 4096 {
        return neg(libc::EINVAL);
    }
    let mut f = vec![0u8; size as usize];
    if !env.read_guest(fmt, &mut f) {
        return neg(libc::EFAULT);
    }
    let end = f.iter().position(|&b| b == 0).unwrap_or(f.len());
    match format_printk(&f[..end], [a1, a2, a3]) {
        Some(line) => {
            let n = line.len();
            crate::trace::emit(&line);
            n as u64
        }
        None => neg(libc::EINVAL),
    }
}

/// Formats a `bpf_trace_printk` line; `None` for a format the kernel refuses.
pub fn format_printk(fmt: &[u8], args: [u64; 3]) -> Option<String> {
    let mut out = String::new();
    let mut args = args.into_iter();
    let mut i = 0;
    while i < fmt.len() {
        let c = fmt[i];
        if c != b'%' {
            out.push(c as char);
            i += 1;
            continue;
        }
        i += 1;
        if fmt.get(i) == Some(&b'%') {
            out.push('%');
            i += 1;
            continue;
        }
        let mut longs = 0;
        while fmt.get(i) == Some(&b'l') {
            longs += 1;
            i += 1;
        }
        if longs > 2 {
            return None;
        }
        let conv = *fmt.get(i)?;
        i += 1;
        let v = args.next()?;
        let s = match conv {
            b'd' | b'i' if longs == 0 => (v as i32).to_string(),
            b'd' | b'i' => (v as i64).to_string(),
            b'u' if longs == 0 => (v as u32).to_string(),
            b'u' => v.to_string(),
            b'x' if longs == 0 => format!("{:x}", v as u32),
            b'x' => format!("{v:x}"),
            b'X' if longs == 0 => format!("{:X}", v as u32),
            b'X' => format!("{v:X}"),
            b'p' => format!("0x{v:x}"),
            b'c' => char::from(v as u8).to_string(),
            b's' => {
                let mut b = [0u8; 256];
                match host::read_user_str(v, &mut b) {
                    Some(n) => String::from_utf8_lossy(&b[..n.saturating_sub(1)]).into_owned(),
                    None => "(fault)".into(),
                }
            }
            _ => return None,
        };
        out.push_str(&s);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printk_formats_like_the_kernel() {
        assert_eq!(
            format_printk(b"a=%d b=%lu c=%x %%", [(-5i64) as u64, 7, 255]).unwrap(),
            "a=-5 b=7 c=ff %"
        );
        assert!(format_printk(b"%q", [0; 3]).is_none());
        assert!(
            format_printk(b"%d %d %d %d", [0; 3]).is_none(),
            "at most 3 args"
        );
    }

    #[test]
    fn bprintf_formats_like_bstr_printf() {
        assert_eq!(
            format_bprintf(
                b"%d|%5u|%-4x|%05d|%llx|%c|%%",
                &[(-3i64) as u64, 7, 255, 42, 1 << 40, 65]
            )
            .unwrap(),
            "-3|    7|ff  |00042|10000000000|A|%"
        );
        let ip = [10u8, 0, 0, 1];
        assert_eq!(
            format_bprintf(b"%pI4 %px", &[ip.as_ptr() as u64, 0xab]).unwrap(),
            "10.0.0.1 ab"
        );
        assert!(format_bprintf(b"%d %d", &[1]).is_none(), "missing argument");
        assert_eq!(
            format_bprintf(b"%d", &[1, 2]).unwrap(),
            "1",
            "extra arguments are fine"
        );
        let s = b"hi\0";
        assert_eq!(
            format_bprintf(b"<%pks>", &[s.as_ptr() as u64]).unwrap(),
            "<hi>"
        );
        assert!(format_bprintf(b"%q", &[1]).is_none());
        assert!(format_bprintf(b"%pZ", &[1]).is_none());
    }

    #[test]
    fn every_registered_helper_has_its_kernel_name() {
        let r = registry();
        assert_eq!(r.get(1).unwrap().name, "bpf_map_lookup_elem");
        assert_eq!(r.get(160).unwrap().name, "bpf_ktime_get_coarse_ns");
        assert_eq!(r.get(12).unwrap().name, "bpf_tail_call");
        assert!(r.get(164).unwrap().calls_back && r.get(181).unwrap().calls_back);
        // + 6 ring/perf buffer helpers (`buffers`), 58 (override_return), 12, 164, 181.
        assert_eq!(r.ids().count(), 38);
    }
}
