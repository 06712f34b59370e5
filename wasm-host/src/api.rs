//! The `wasm_bpf` import module, as wasm-bpf defines it (32-bit guest pointers):
//!
//! | import | signature | returns |
//! |---|---|---|
//! | `wasm_load_bpf_object` | `(buf: i32, size: i32) -> i64` | object handle, 0 on failure |
//! | `wasm_attach_bpf_program` | `(obj: i64, name: i32, target: i32) -> i32` | 0 or `-errno` |
//! | `wasm_bpf_buffer_poll` | `(obj: i64, fd: i32, sample_func: i32, ctx: i32, data: i32, max_size: i32, timeout_ms: i32) -> i32` | records delivered, the callback's non-zero return, or `-errno` |
//! | `wasm_bpf_map_fd_by_name` | `(obj: i64, name: i32) -> i32` | map fd or `-errno` |
//! | `wasm_bpf_map_operate` | `(fd: i32, cmd: i32, key: i32, value: i32, next_key: i32, flags: i64) -> i32` | 0 or `-errno` |
//! | `wasm_close_bpf_object` | `(obj: i64) -> i32` | 0 or `-errno` |
//!
//! Every pointer/length pair is checked against the guest's exported `memory` before use
//! ([`crate::guest`]); a missing memory export makes every pointer `EFAULT`. Bad handles are
//! `ENOENT`, bad fds `EBADF`, unknown commands `EINVAL`. Errors are returned, never trapped:
//! the only traps are the guest's own (its callback trapping, which ends its run) and the
//! run being interrupted by a signal.
//!
//! `wasm_bpf_buffer_poll` copies each record into `data` (cut to `max_size`) and calls
//! `sample_func(ctx, data, size)`, an index into the guest's exported
//! `__indirect_function_table` of type `(i32, i32, i32) -> i32`; a non-zero return stops the
//! poll and is returned (the records after it wait for the next poll).
//!
//! The module also wraps WASI's `path_open` so that programs attached to `wasi:path_open`
//! see (and may deny) the guest's opens ([`crate::wasi`]).

use crate::error::{HostError, Result};
use crate::guest;
use crate::host::{
    BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BpfHost,
};
use crate::wasi::{PathOpenCtx, WASI_EACCES};
use std::cell::Cell;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};
use wasmtime::{AsContextMut as _, Caller, Linker, Memory, Table, TypedFunc};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p1::wasi_snapshot_preview1::{self, WasiSnapshotPreview1 as _};

/// Import module name.
pub const MODULE: &str = "wasm_bpf";
/// Longest program name accepted.
const MAX_NAME: usize = 256;
/// Longest attach target accepted.
const MAX_TARGET: usize = 4096;

/// The store data of a guest run.
pub struct State {
    /// WASI preview 1.
    pub wasi: WasiP1Ctx,
    /// BPF state.
    pub bpf: BpfHost,
    /// The status line.
    pub status: Status,
    /// The guest's exported `memory`, looked up once at instantiation.
    pub memory: Option<Memory>,
    /// The guest's exported `__indirect_function_table`.
    pub table: Option<Table>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("bpf", &self.bpf)
            .finish_non_exhaustive()
    }
}

/// A one-line status on stderr while a guest waits for events (only on a terminal).
#[derive(Debug)]
pub struct Status {
    enabled: bool,
    last: Cell<Option<Instant>>,
    shown: Cell<bool>,
}

impl Status {
    /// Shown only if `want` and stderr is a terminal.
    pub fn new(want: bool) -> Status {
        Status {
            enabled: want && std::io::stderr().is_terminal(),
            last: Cell::new(None),
            shown: Cell::new(false),
        }
    }

    /// Redraws the line at most once a second.
    pub fn tick(&self, bpf: &BpfHost) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self
            .last
            .get()
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.last.set(Some(now));
        let (probes, procs) = bpf.probe_counts();
        let mut e = std::io::stderr().lock();
        let _ = write!(
            e,
            "\r\x1b[K[bpftime-wasm] waiting for events: {probes} probe(s), attached in \
             {procs} process(es), {} event(s) delivered",
            bpf.stats.delivered
        );
        let _ = e.flush();
        self.shown.set(true);
    }

    /// Erases the line (before the guest prints).
    pub fn clear(&self) {
        if self.shown.replace(false) {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[K");
            let _ = e.flush();
        }
    }
}

fn memory(caller: &mut Caller<'_, State>) -> Option<Memory> {
    caller.data().memory
}

/// Runs `f` with the guest's memory and the host state.
fn with_mem<R>(
    caller: &mut Caller<'_, State>,
    f: impl FnOnce(&mut [u8], &mut State) -> Result<R>,
) -> Result<R> {
    let Some(mem) = memory(caller) else {
        return Err(HostError::Fault {
            what: "guest exports no memory",
        });
    };
    let (data, st) = mem.data_and_store_mut(caller);
    f(data, st)
}

fn ret(call: &str, r: Result<i32>) -> i32 {
    r.unwrap_or_else(|e| {
        tracing::debug!("{call}: {e}");
        e.ret()
    })
}

/// Adds the `wasm_bpf` functions to `linker`.
pub fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    linker.func_wrap(
        MODULE,
        "wasm_load_bpf_object",
        |mut caller: Caller<'_, State>, buf: i32, size: i32| -> i64 {
            caller.data_mut().bpf.stats.calls += 1;
            let r = with_mem(&mut caller, |mem, st| {
                let n = guest::len(size, "object size")?;
                let bytes = guest::bytes(mem, buf, n, "object buffer")?;
                st.bpf.load(bytes)
            });
            match r {
                Ok(h) => h as i64,
                Err(e) => {
                    tracing::warn!("wasm_load_bpf_object: {e}");
                    0
                }
            }
        },
    )?;
    linker.func_wrap(
        MODULE,
        "wasm_attach_bpf_program",
        |mut caller: Caller<'_, State>, obj: i64, name: i32, target: i32| -> i32 {
            caller.data_mut().bpf.stats.calls += 1;
            let r = with_mem(&mut caller, |mem, st| {
                let name = guest::cstr(mem, name, MAX_NAME, "program name")?;
                let target = match target {
                    0 => None,
                    t => Some(guest::cstr(mem, t, MAX_TARGET, "attach target")?)
                        .filter(|t| !t.is_empty()),
                };
                st.bpf.attach(obj as u64, name, target).map(|()| 0)
            });
            r.unwrap_or_else(|e| {
                tracing::warn!("wasm_attach_bpf_program: {e}");
                e.ret()
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "wasm_bpf_map_fd_by_name",
        |mut caller: Caller<'_, State>, obj: i64, name: i32| -> i32 {
            caller.data_mut().bpf.stats.calls += 1;
            let r = with_mem(&mut caller, |mem, st| {
                let name = guest::cstr(mem, name, MAX_NAME, "map name")?;
                st.bpf.map_fd_by_name(obj as u64, name)
            });
            ret("wasm_bpf_map_fd_by_name", r)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "wasm_bpf_map_operate",
        |mut caller: Caller<'_, State>,
         fd: i32,
         cmd: i32,
         key: i32,
         value: i32,
         next_key: i32,
         flags: i64|
         -> i32 {
            caller.data_mut().bpf.stats.calls += 1;
            let r = with_mem(&mut caller, |mem, st| {
                map_operate(mem, &st.bpf, fd, cmd, key, value, next_key, flags as u64)
            });
            ret("wasm_bpf_map_operate", r.map(|()| 0))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "wasm_close_bpf_object",
        |mut caller: Caller<'_, State>, obj: i64| -> i32 {
            let st = caller.data_mut();
            st.bpf.stats.calls += 1;
            ret(
                "wasm_close_bpf_object",
                st.bpf.close(obj as u64).map(|()| 0),
            )
        },
    )?;
    linker.func_wrap(
        MODULE,
        "wasm_bpf_buffer_poll",
        |mut caller: Caller<'_, State>,
         obj: i64,
         fd: i32,
         sample_func: i32,
         ctx: i32,
         data: i32,
         max_size: i32,
         timeout_ms: i32|
         -> wasmtime::Result<i32> {
            caller.data_mut().bpf.stats.calls += 1;
            buffer_poll(
                &mut caller,
                obj as u64,
                fd,
                sample_func,
                ctx,
                data,
                max_size,
                timeout_ms,
            )
        },
    )?;
    Ok(())
}

/// Checks the guest's buffers for `cmd` and runs it.
#[allow(clippy::too_many_arguments, reason = "the wasm-bpf ABI")]
fn map_operate(
    mem: &mut [u8],
    bpf: &BpfHost,
    fd: i32,
    cmd: i32,
    key: i32,
    value: i32,
    next_key: i32,
    flags: u64,
) -> Result<()> {
    let (ks, vs) = bpf.op_sizes(fd)?;
    if !(BPF_MAP_LOOKUP_ELEM..=BPF_MAP_GET_NEXT_KEY).contains(&cmd) {
        return Err(HostError::invalid(format!("map command {cmd}")));
    }
    // The kernel copies a key only when the map has keys (queues and stacks have none), and
    // a null key for GET_NEXT_KEY asks for the first one.
    let key_copy: Option<Vec<u8>> = if ks == 0 || key == 0 && cmd == BPF_MAP_GET_NEXT_KEY {
        None
    } else if key == 0 {
        return Err(HostError::Fault { what: "key" });
    } else {
        Some(guest::bytes(mem, key, ks, "key")?.to_vec())
    };
    let key_ref = key_copy.as_deref();
    match cmd {
        BPF_MAP_LOOKUP_ELEM => {
            let v = nonnull(value, "value").and_then(|v| guest::bytes_mut(mem, v, vs, "value"))?;
            bpf.map_operate(fd, cmd, key_ref, Some(v), None, flags)
        }
        BPF_MAP_UPDATE_ELEM => {
            let mut v = nonnull(value, "value")
                .and_then(|v| guest::bytes(mem, v, vs, "value"))?
                .to_vec();
            bpf.map_operate(fd, cmd, key_ref, Some(&mut v), None, flags)
        }
        BPF_MAP_DELETE_ELEM => bpf.map_operate(fd, cmd, key_ref, None, None, flags),
        _ => {
            let n = nonnull(next_key, "next_key")
                .and_then(|p| guest::bytes_mut(mem, p, ks, "next_key"))?;
            bpf.map_operate(fd, cmd, key_ref, None, Some(n), flags)
        }
    }
}

fn nonnull(p: i32, what: &'static str) -> Result<i32> {
    if p == 0 {
        Err(HostError::Fault { what })
    } else {
        Ok(p)
    }
}

/// The guest's callback at `index` of its function table.
fn callback(caller: &mut Caller<'_, State>, index: i32) -> Result<TypedFunc<(i32, i32, i32), i32>> {
    let table = caller
        .data()
        .table
        .ok_or_else(|| HostError::invalid("guest exports no __indirect_function_table"))?;
    let f = table
        .get(&mut *caller, u64::from(index as u32))
        .and_then(|r| r.as_func().flatten().copied())
        .ok_or_else(|| HostError::invalid(format!("no function at table index {index}")))?;
    f.typed::<(i32, i32, i32), i32>(&*caller)
        .map_err(|_| HostError::invalid(format!("callback {index} is not (i32, i32, i32) -> i32")))
}

#[allow(clippy::too_many_arguments, reason = "the wasm-bpf ABI")]
fn buffer_poll(
    caller: &mut Caller<'_, State>,
    obj: u64,
    fd: i32,
    sample_func: i32,
    ctx: i32,
    data: i32,
    max_size: i32,
    timeout_ms: i32,
) -> wasmtime::Result<i32> {
    let prepared = (|| -> Result<_> {
        let max = guest::len(max_size, "max_size")?;
        if max == 0 {
            return Err(HostError::invalid("max_size 0"));
        }
        with_mem(caller, |mem, _| {
            guest::bytes(mem, data, max, "data").map(drop)
        })?;
        let cb = callback(caller, sample_func)?;
        let buf = caller.data_mut().bpf.take_buffer(obj, fd)?;
        Ok((max, cb, buf))
    })();
    let (max, cb, mut buf) = match prepared {
        Ok(p) => p,
        Err(e) => return Ok(ret("wasm_bpf_buffer_poll", Err(e))),
    };
    // Wait for records.
    let st = caller.data_mut();
    let waited = st.bpf.wake_socket().map(drop);
    if let Err(e) = waited {
        st.bpf.put_buffer(fd, buf);
        return Ok(e.ret());
    }
    {
        let st = caller.data();
        if let Ok(sock) = st.bpf.wake_socket_ref() {
            buf.fill(sock, timeout_ms, || {
                st.status.tick(&st.bpf);
                !st.bpf.is_interrupted()
            });
        }
        st.status.clear();
    }
    // Deliver them.
    let mut delivered: i32 = 0;
    let mut result = None;
    while let Some(rec) = buf.pop() {
        if caller.data().bpf.is_interrupted() {
            buf.unpop(rec);
            break;
        }
        let n = rec.len().min(max);
        let copied = with_mem(caller, |mem, _| {
            guest::bytes_mut(mem, data, n, "data")?.copy_from_slice(&rec[..n]);
            Ok(())
        });
        if let Err(e) = copied {
            buf.unpop(rec);
            result = Some(e.ret());
            break;
        }
        buf.recycle(rec);
        caller.data_mut().bpf.stats.delivered += 1;
        delivered = delivered.saturating_add(1);
        match cb.call(&mut *caller, (ctx, data, n as i32)) {
            Ok(0) => {}
            Ok(v) => {
                result = Some(v);
                break;
            }
            Err(trap) => {
                caller.data_mut().bpf.put_buffer(fd, buf);
                return Err(trap);
            }
        }
    }
    let st = caller.data_mut();
    st.bpf.put_buffer(fd, buf);
    if st.bpf.is_interrupted() {
        return Err(wasmtime::Error::msg("interrupted"));
    }
    Ok(result.unwrap_or(delivered))
}

/// Replaces WASI's `path_open` in `linker` (which must hold WASI already) with a wrapper
/// that runs the programs attached to `wasi:path_open` first, then WASI's own implementation
/// (called the way wasmtime-wasi's generated glue calls it, with the guest's memory).
pub fn hook_wasi(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    linker.func_wrap(
        "wasi_snapshot_preview1",
        "path_open",
        |mut caller: Caller<'_, State>,
         fd: i32,
         dirflags: i32,
         path: i32,
         path_len: i32,
         oflags: i32,
         rights_base: i64,
         rights_inheriting: i64,
         fdflags: i32,
         opened: i32|
         -> wasmtime::Result<i32> {
            let fuel = caller.as_context_mut().hostcall_fuel();
            let Some(mem) = memory(&mut caller) else {
                return Err(wasmtime::Error::msg("missing required memory export"));
            };
            let (data, st) = mem.data_and_store_mut(&mut caller);
            if st.bpf.wasi.watches_path_open() {
                // A bad pointer is left to WASI itself to report.
                if let Ok(p) = guest::bytes(data, path, path_len as u32 as usize, "path") {
                    let ctx = PathOpenCtx::new(
                        [
                            fd as u32 as u64,
                            dirflags as u32 as u64,
                            oflags as u32 as u64,
                            fdflags as u32 as u64,
                            rights_base as u64,
                            rights_inheriting as u64,
                        ],
                        p,
                    );
                    if st.bpf.wasi.deny_path_open(&ctx) {
                        tracing::info!(
                            "wasi:path_open {:?} denied by a BPF program",
                            String::from_utf8_lossy(p)
                        );
                        return Ok(WASI_EACCES);
                    }
                }
            }
            st.wasi.set_hostcall_fuel(fuel);
            let mut gm = wiggle::GuestMemory::Unshared(data);
            let r = wasmtime_wasi::runtime::in_tokio(wasi_snapshot_preview1::path_open(
                &mut st.wasi,
                &mut gm,
                fd,
                dirflags,
                path,
                path_len,
                oflags,
                rights_base,
                rights_inheriting,
                fdflags,
                opened,
            ))?;
            Ok(r)
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}
