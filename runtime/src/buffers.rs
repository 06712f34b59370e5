//! The ring buffer and perf buffer helpers: `bpf_perf_event_output` (25),
//! `bpf_ringbuf_output` (130), `bpf_ringbuf_reserve` (131), `bpf_ringbuf_submit` (132),
//! `bpf_ringbuf_discard` (133), `bpf_ringbuf_query` (134), with the kernel's contracts
//! (`kernel/bpf/ringbuf.c`, `kernel/trace/bpf_trace.c`).
//!
//! The kernel's verifier guarantees that every reservation is submitted or discarded exactly
//! once, with a pointer the reserve returned. Our loader checks are structural, so the runtime
//! enforces it: reservations made during a program run are tracked per thread; submit/discard
//! act only on a pointer from that list (anything else is ignored), and whatever the program
//! left uncommitted when it ends (or traps) is discarded, so a buggy program cannot wedge a
//! ring that other processes share.

use crate::host;
use bpftime_maps::Map;
use bpftime_maps::perf_array::{self, BPF_F_CURRENT_CPU, BPF_F_INDEX_MASK};
use bpftime_maps::ringbuf::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, Reservation, RingBuf};
use bpftime_vm::helper::{CallEnv, HelperRegistry};
use std::cell::RefCell;

/// `bpf_perf_event_output`.
pub const PERF_EVENT_OUTPUT: u32 = 25;
/// `bpf_ringbuf_output`.
pub const RINGBUF_OUTPUT: u32 = 130;
/// `bpf_ringbuf_reserve`.
pub const RINGBUF_RESERVE: u32 = 131;
/// `bpf_ringbuf_submit`.
pub const RINGBUF_SUBMIT: u32 = 132;
/// `bpf_ringbuf_discard`.
pub const RINGBUF_DISCARD: u32 = 133;
/// `bpf_ringbuf_query`.
pub const RINGBUF_QUERY: u32 = 134;

/// Largest sample a perf buffer record can carry (the 16-bit record size, minus headers).
const MAX_PERF_SAMPLE: u64 = u16::MAX as u64 - 12;

fn neg(errno: i32) -> u64 {
    (-(errno as i64)) as u64
}

/// Registers the helpers of this module.
pub(crate) fn register(h: &mut HelperRegistry) {
    h.register(
        PERF_EVENT_OUTPUT,
        "bpf_perf_event_output",
        perf_event_output,
    )
    .register(RINGBUF_OUTPUT, "bpf_ringbuf_output", ringbuf_output)
    .register(RINGBUF_RESERVE, "bpf_ringbuf_reserve", ringbuf_reserve)
    .register(RINGBUF_SUBMIT, "bpf_ringbuf_submit", ringbuf_submit)
    .register(RINGBUF_DISCARD, "bpf_ringbuf_discard", ringbuf_discard)
    .register(RINGBUF_QUERY, "bpf_ringbuf_query", ringbuf_query);
}

thread_local! {
    /// Reservations of the program running on this thread not yet committed: the map handle's
    /// address (as the program passed it) and the reservation.
    static OUTSTANDING: RefCell<Vec<(usize, Reservation)>> = const { RefCell::new(Vec::new()) };
    /// Copy buffer for output helpers (no allocation per call).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Reads `size` bytes of guest memory at `addr` and passes them to `f`; `None` on a fault.
fn with_guest<R>(env: &CallEnv, addr: u64, size: usize, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
    SCRATCH.with(|s| {
        let mut s = s.try_borrow_mut().ok()?;
        s.clear();
        s.resize(size, 0);
        env.read_guest(addr, &mut s).then(|| f(&s))
    })
}

/// `bpf_ringbuf_reserve(map, size, flags)`: the sample's address, or NULL.
extern "C" fn ringbuf_reserve(
    map: u64,
    size: u64,
    flags: u64,
    _: u64,
    _: u64,
    env: &mut CallEnv,
) -> u64 {
    if flags != 0 {
        return 0;
    }
    let Some(m) = host::map_arg(env, map) else {
        return 0;
    };
    let Ok(rb) = RingBuf::new(m) else {
        return 0;
    };
    let Some(r) = rb.reserve(size) else {
        return 0;
    };
    host::grant_value(env, r.addr as *mut u8, r.size);
    OUTSTANDING.with(|o| o.borrow_mut().push((map as usize, r)));
    r.addr as u64
}

fn commit(sample: u64, flags: u64, discard: bool, env: &CallEnv) {
    let found = OUTSTANDING.with(|o| {
        let mut o = o.borrow_mut();
        let i = o.iter().position(|(_, r)| r.addr as u64 == sample)?;
        Some(o.swap_remove(i))
    });
    let Some((map, r)) = found else {
        return; // not a live reservation of this run: the kernel's verifier would reject it
    };
    if let Some(rb) = host::map_arg(env, map as u64).and_then(|m| RingBuf::new(m).ok()) {
        rb.commit(r.pos, discard, flags);
    }
}

/// `bpf_ringbuf_submit(sample, flags)`.
extern "C" fn ringbuf_submit(
    sample: u64,
    flags: u64,
    _: u64,
    _: u64,
    _: u64,
    env: &mut CallEnv,
) -> u64 {
    commit(sample, flags, false, env);
    0
}

/// `bpf_ringbuf_discard(sample, flags)`.
extern "C" fn ringbuf_discard(
    sample: u64,
    flags: u64,
    _: u64,
    _: u64,
    _: u64,
    env: &mut CallEnv,
) -> u64 {
    commit(sample, flags, true, env);
    0
}

/// `bpf_ringbuf_output(map, data, size, flags)`: 0, `-EINVAL` (flags), `-EAGAIN` (full).
extern "C" fn ringbuf_output(
    map: u64,
    data: u64,
    size: u64,
    flags: u64,
    _: u64,
    env: &mut CallEnv,
) -> u64 {
    if flags & !(BPF_RB_NO_WAKEUP | BPF_RB_FORCE_WAKEUP) != 0 {
        return neg(libc::EINVAL);
    }
    let Some(rb) = host::map_arg(env, map).and_then(|m| RingBuf::new(m).ok()) else {
        return neg(libc::EINVAL);
    };
    if size.saturating_add(8) > rb.size() {
        return neg(libc::EAGAIN); // __bpf_ringbuf_reserve() fails: larger than the ring
    }
    match with_guest(env, data, size as usize, |d| rb.output(d, flags)) {
        Some(Ok(())) => 0,
        Some(Err(e)) => neg(e),
        None => neg(libc::EFAULT),
    }
}

/// `bpf_ringbuf_query(map, flags)`.
extern "C" fn ringbuf_query(
    map: u64,
    flags: u64,
    _: u64,
    _: u64,
    _: u64,
    env: &mut CallEnv,
) -> u64 {
    host::map_arg(env, map)
        .and_then(|m| RingBuf::new(m).ok())
        .map_or(0, |rb| rb.query(flags))
}

/// `bpf_perf_event_output(ctx, map, flags, data, size)`: `flags` is the array index or
/// `BPF_F_CURRENT_CPU`. Unlike the kernel, an explicit index need not be the current CPU's
/// (any thread may write any ring here).
extern "C" fn perf_event_output(
    _ctx: u64,
    map: u64,
    flags: u64,
    data: u64,
    size: u64,
    env: &mut CallEnv,
) -> u64 {
    if flags & !BPF_F_INDEX_MASK != 0 {
        return neg(libc::EINVAL);
    }
    let Some(m) = host::map_arg(env, map) else {
        return neg(libc::EINVAL);
    };
    let index = match flags & BPF_F_INDEX_MASK {
        BPF_F_CURRENT_CPU => host::current_cpu(),
        i => i as u32,
    };
    if size > MAX_PERF_SAMPLE {
        return neg(libc::E2BIG);
    }
    match with_guest(env, data, size as usize, |d| {
        perf_array::output(m, index, d)
    }) {
        Some(Ok(())) => 0,
        Some(Err(e)) => neg(e),
        None => neg(libc::EFAULT),
    }
}

/// After a program run on this thread: discards the reservations it left uncommitted (with
/// the run's own map handles, `maps`).
pub(crate) fn end_of_run(maps: &[Box<Map>]) {
    // `try_with`: a run traced during the thread's TLS teardown has no reservations.
    let left = OUTSTANDING
        .try_with(|o| match o.try_borrow_mut() {
            Ok(mut o) if !o.is_empty() => std::mem::take(&mut *o),
            _ => Vec::new(),
        })
        .unwrap_or_default();
    for (addr, r) in left {
        match maps.iter().find(|m| &***m as *const Map as usize == addr) {
            Some(m) => {
                if let Ok(rb) = RingBuf::new(m) {
                    tracing::debug!("program ended without committing a ring buffer record");
                    rb.commit(r.pos, true, BPF_RB_NO_WAKEUP);
                }
            }
            None => tracing::warn!("uncommitted ring buffer record of an unknown map"),
        }
    }
}

/// Discards left-over reservations when dropped (also when a run unwinds).
pub(crate) struct RunGuard<'a>(pub(crate) &'a [Box<Map>]);

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        end_of_run(self.0);
    }
}
