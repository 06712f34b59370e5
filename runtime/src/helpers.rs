//! Kernel helpers implemented in userspace, registered under the kernel's ids
//! (`enum bpf_func_id` in `include/uapi/linux/bpf.h`).
//!
//! Every helper follows the kernel's contract for return values: errors are negative errnos,
//! a faulting read returns `-EFAULT` (and zeroes the destination, as `bpf_probe_read_*` do).
//! Helpers touch the program's memory only through [`CallEnv::read_guest`] /
//! [`CallEnv::write_guest`]; user memory outside the program (`probe_read*` sources) is read
//! with `process_vm_readv` on ourselves, which reports a bad address instead of faulting.

use crate::host;
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
/// `bpf_get_current_pid_tgid`.
pub const GET_CURRENT_PID_TGID: u32 = 14;
/// `bpf_get_current_uid_gid`.
pub const GET_CURRENT_UID_GID: u32 = 15;
/// `bpf_get_current_comm`.
pub const GET_CURRENT_COMM: u32 = 16;
/// `bpf_probe_read_str`.
pub const PROBE_READ_STR: u32 = 45;
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

/// Largest buffer a probe-read helper copies in one call.
const MAX_READ: u64 = 1 << 16;

fn neg(errno: i32) -> u64 {
    (-(errno as i64)) as u64
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
        );
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
    let mut k = [0u8; bpftime_maps::map::MAX_KEY_SIZE as usize];
    let k = &mut k[..m.def().key_size as usize];
    if !env.read_guest(key, k) {
        return 0;
    }
    match m.lookup_ptr(k) {
        Ok(p) => {
            host::grant_value(env, p, m.def().value_size);
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
    let mut k = [0u8; bpftime_maps::map::MAX_KEY_SIZE as usize];
    let k = &mut k[..m.def().key_size as usize];
    let mut v = vec![0u8; m.def().value_size as usize];
    if !env.read_guest(key, k) || !env.read_guest(value, &mut v) {
        return neg(libc::EFAULT);
    }
    match m.update(k, &v, flags) {
        Ok(()) => 0,
        Err(e) => neg(e.errno()),
    }
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
    let mut k = [0u8; bpftime_maps::map::MAX_KEY_SIZE as usize];
    let k = &mut k[..m.def().key_size as usize];
    if !env.read_guest(key, k) {
        return neg(libc::EFAULT);
    }
    match m.delete(k) {
        Ok(()) => 0,
        Err(e) => neg(e.errno()),
    }
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
    fn every_registered_helper_has_its_kernel_name() {
        let r = registry();
        assert_eq!(r.get(1).unwrap().name, "bpf_map_lookup_elem");
        assert_eq!(r.get(160).unwrap().name, "bpf_ktime_get_coarse_ns");
        assert_eq!(r.ids().count(), 18);
    }
}
