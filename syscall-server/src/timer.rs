//! Timer perf events (`PERF_COUNT_SW_CPU_CLOCK`, `PERF_COUNT_SW_TASK_CLOCK`) for bpftrace's
//! `interval:` and `profile:` probes, run inside the loader.
//!
//! On the kernel such an event fires every `sample_period` ns (or `sample_freq` times a
//! second) on its CPU and runs the attached `BPF_PROG_TYPE_PERF_EVENT` program in whatever task
//! is running there. Userspace has no such interrupt: here each enabled timer event this
//! process created, with a program, gets a thread of the loader that sleeps one period and runs
//! the program with a zeroed `struct bpf_perf_event_data` (registers of no task, the period,
//! addr 0). So `interval:s:1 { … }` and `profile:hz:99 { @ = count(); }` run at the same rate,
//! but a `profile` probe samples no application (its `pid`, `comm` and `ustack` are the
//! loader's timer thread's).
//!
//! The event is stored as a perf event of kind `SoftwareBpfOutput` (the kind that takes
//! `BPF_PROG_TYPE_PERF_EVENT` programs and that agents leave alone); which ids are timers, and
//! their periods, is known to this process only. [`sync`] starts and stops the threads after
//! every perf ioctl and close (called with [`crate::selfprobe::sync`]).
//!
//! # Invariants
//!
//! - A timer thread owns its `LoadedProg` and a stack buffer of the program's context size; the
//!   only `unsafe` is running the program on that buffer.
#![allow(unsafe_code)]

use crate::Errno;
use crate::emu::Emulator;
use crate::uapi::*;
use bpftime_maps::store::ObjectKind;
use bpftime_runtime::object::{
    PerfEventRecord, PerfKind, create_perf_event, perf_enabled, perf_prog, set_perf_enabled,
};
use bpftime_runtime::prog::LoadedProg;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// `PERF_COUNT_SW_CPU_CLOCK`.
pub const PERF_COUNT_SW_CPU_CLOCK: u64 = 0;
/// `PERF_COUNT_SW_TASK_CLOCK`.
pub const PERF_COUNT_SW_TASK_CLOCK: u64 = 1;
/// `perf_event_attr.freq` (bit 10 of the flags word).
const ATTR_FREQ: u64 = 1 << 10;
/// `sizeof(struct bpf_perf_event_data)` on x86_64: pt_regs, sample_period, addr.
const CTX_LEN: usize = 21 * 8 + 16;
/// Shortest period we run (the kernel's `perf_event_max_sample_rate` is 100 kHz by default).
const MIN_PERIOD_NS: u64 = 10_000;

struct Timer {
    period_ns: u64,
    /// The running thread's stop flag and program, when running.
    running: Option<(Arc<AtomicBool>, u32)>,
}

static TIMERS: Mutex<Option<HashMap<u32, Timer>>> = Mutex::new(None);

/// Whether any timer event exists in this process.
pub(crate) fn active() -> bool {
    TIMERS.lock().as_ref().is_some_and(|t| !t.is_empty())
}

impl Emulator {
    /// `perf_event_open` of a CPU or task clock event.
    pub(crate) fn open_timer(
        &self,
        attr: &perf_event_attr,
        pid: i32,
        cpu: i32,
        flags: u64,
    ) -> Result<i64, Errno> {
        let period_ns = if attr.flags & ATTR_FREQ != 0 {
            if attr.sample_period == 0 {
                return Err(Errno(libc::EINVAL));
            }
            1_000_000_000 / attr.sample_period
        } else {
            attr.sample_period
        };
        if period_ns == 0 {
            // A counting event (no sampling): nothing ever runs a program on it.
            tracing::warn!("perf_event_open: counting clock events are not emulated: EOPNOTSUPP");
            return Err(Errno(libc::EOPNOTSUPP));
        }
        let rec = PerfEventRecord {
            kind: PerfKind::SoftwareBpfOutput,
            pid,
            cpu,
            offset: 0,
            ref_ctr_offset: 0,
            path: String::new(),
        };
        let id = create_perf_event(&self.store, &rec).map_err(|err| Errno(err.errno()))?;
        if attr.flags & PERF_ATTR_FLAG_DISABLED == 0
            && let Err(err) = set_perf_enabled(&self.store, id, true)
        {
            self.release(id);
            return Err(Errno(err.errno()));
        }
        TIMERS.lock().get_or_insert_with(HashMap::new).insert(
            id,
            Timer {
                period_ns: period_ns.max(MIN_PERIOD_NS),
                running: None,
            },
        );
        tracing::debug!("timer perf event {id}: every {period_ns} ns (cpu {cpu})");
        self.install(
            ObjectKind::PerfEvent,
            id,
            "timer",
            flags & PERF_FLAG_FD_CLOEXEC != 0,
            true,
            true,
        )
    }
}

/// Starts a thread for each enabled timer with a program, stops those disabled, closed or
/// whose program changed.
pub(crate) fn sync(emu: &Emulator) {
    let mut g = TIMERS.lock();
    let Some(timers) = g.as_mut() else {
        return;
    };
    let store = emu.store();
    timers.retain(|&id, t| {
        let alive = store
            .object(id)
            .is_some_and(|o| o.kind == ObjectKind::PerfEvent);
        let want = alive
            .then(|| {
                perf_enabled(store, id)
                    .then(|| perf_prog(store, id))
                    .flatten()
            })
            .flatten();
        if let Some((stop, prog)) = &t.running
            && want != Some(*prog)
        {
            stop.store(true, Ordering::Release);
            t.running = None;
        }
        if t.running.is_none()
            && let Some(prog) = want
        {
            match LoadedProg::load(store, prog, emu.helpers.clone()) {
                Ok(p) => {
                    let stop = Arc::new(AtomicBool::new(false));
                    let period = t.period_ns;
                    let s = stop.clone();
                    let spawned = std::thread::Builder::new()
                        .name("bpftime-timer".into())
                        .spawn(move || run(p, period, s));
                    match spawned {
                        Ok(_) => t.running = Some((stop, prog)),
                        Err(err) => tracing::warn!("timer perf event {id}: no thread: {err}"),
                    }
                }
                Err(err) => tracing::warn!("timer perf event {id}: program {prog}: {err}"),
            }
        }
        alive
    });
}

fn run(prog: LoadedProg, period_ns: u64, stop: Arc<AtomicBool>) {
    let period = Duration::from_nanos(period_ns);
    let mut next = std::time::Instant::now() + period;
    loop {
        let now = std::time::Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next += period;
        if stop.load(Ordering::Acquire) {
            return;
        }
        let mut ctx = [0u8; CTX_LEN];
        ctx[21 * 8..21 * 8 + 8].copy_from_slice(&period_ns.to_ne_bytes());
        crate::ffi::guarded(|| {
            // SAFETY: `ctx` is a live, writable buffer of `CTX_LEN` bytes for the call.
            let r = unsafe { prog.run(ctx.as_mut_ptr(), CTX_LEN) };
            if let Err(t) = r {
                tracing::debug!("timer program {} trapped: {t}", prog.id());
            }
        });
    }
}
