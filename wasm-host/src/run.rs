//! Running a guest: a wasmtime engine with WASI preview 1 and the `wasm_bpf` imports over a
//! store, the guest's `_start`, and cleanup of everything it loaded.
//!
//! A run ends when the guest returns or calls `proc_exit`, when it traps (a fault of its own,
//! or its buffer callback trapping), or when SIGINT/SIGTERM arrives: the epoch ticker makes
//! running Wasm check the flag every 100 ms and host waits check it as often. In every case
//! the guest's objects are detached and removed from the store before the run returns.

use crate::api::{self, State, Status};
use crate::host::BpfHost;
use anyhow::{Context as _, Result};
use bpftime_maps::Store;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use wasmtime::{Config, Engine, Instance, Linker, UpdateDeadline, WasmParams, WasmResults};
use wasmtime_wasi::p1;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

/// How often running Wasm checks for an interrupt.
const EPOCH: Duration = Duration::from_millis(100);

/// What a guest gets besides its module.
#[derive(Debug, Clone, Default)]
pub struct GuestConfig {
    /// `argv` (the first is the program name).
    pub args: Vec<String>,
    /// Host directories preopened for the guest: (host path, guest path).
    pub dirs: Vec<(PathBuf, String)>,
    /// Show the status line on a terminal while waiting for events.
    pub status: bool,
    /// Give the guest this process's stdin/stdout/stderr (else none).
    pub inherit_stdio: bool,
    /// Keep compiled guests here ([`crate::cache`]); `None`: compile every time.
    pub cache_dir: Option<PathBuf>,
}

/// How a guest run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `_start` returned, or `proc_exit(code)`.
    Exited(i32),
    /// The guest trapped (message).
    Trapped(String),
    /// SIGINT or SIGTERM.
    Interrupted,
}

impl Outcome {
    /// Exit status for the command line: the guest's, 3 for a trap (as `bpftime run`), 130
    /// for an interrupt.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Exited(c) => *c,
            Outcome::Trapped(_) => 3,
            Outcome::Interrupted => 130,
        }
    }
}

/// An instantiated guest.
pub struct Guest {
    store: wasmtime::Store<State>,
    instance: Instance,
    ticker_stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest").finish_non_exhaustive()
    }
}

impl Guest {
    /// Compiles and instantiates `wasm` (a binary module) against `store`.
    pub fn new(store: Arc<Store>, wasm: &[u8], cfg: &GuestConfig) -> Result<Guest> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        let engine = wt(Engine::new(&config))?;
        if !wasm.starts_with(b"\0asm") {
            anyhow::bail!(
                "not a Wasm binary module (no `\\0asm` header; Wasm text is not accepted)"
            );
        }
        let module =
            crate::cache::compile(&engine, wasm, cfg.cache_dir.as_deref()).map_err(|e| {
                let msg = format!("{e:#}");
                anyhow::anyhow!(
                    "not a valid Wasm binary module: {}",
                    msg.lines().next().unwrap_or_default()
                )
            })?;

        let mut wasi = WasiCtxBuilder::new();
        if cfg.inherit_stdio {
            wasi.inherit_stdio();
        }
        wasi.args(&cfg.args);
        for (host, guest) in &cfg.dirs {
            wt(wasi
                .preopened_dir(host, guest, FsPerms::ReadWrite)
                .map(drop))
            .with_context(|| format!("cannot preopen {}", host.display()))?;
        }
        let bpf = BpfHost::new(store);
        let interrupted = bpf.interrupted.clone();
        let mut wstore = wasmtime::Store::new(
            &engine,
            State {
                wasi: wasi.build_p1(),
                bpf,
                status: Status::new(cfg.status),
                memory: None,
                table: None,
            },
        );
        wstore.set_epoch_deadline(1);
        wstore.epoch_deadline_callback(|ctx| {
            Ok(if ctx.data().bpf.is_interrupted() {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Continue(1)
            })
        });
        let ticker_stop = Arc::new(AtomicBool::new(false));
        {
            let stop = ticker_stop.clone();
            let engine = engine.clone();
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH);
                        if crate::signals::pending() {
                            interrupted.store(true, Ordering::Relaxed);
                        }
                        engine.increment_epoch();
                    }
                })
                .context("cannot start the epoch thread")?;
        }

        let mut linker: Linker<State> = Linker::new(&engine);
        wt(p1::add_to_linker_sync(&mut linker, |s: &mut State| {
            &mut s.wasi
        }))?;
        wt(api::add_to_linker(&mut linker))?;
        wt(api::hook_wasi(&mut linker))?;
        let instance = wt(linker.instantiate(&mut wstore, &module))
            .context("cannot instantiate the module")?;
        let memory = instance.get_memory(&mut wstore, "memory");
        let table = instance.get_table(&mut wstore, "__indirect_function_table");
        let st = wstore.data_mut();
        st.memory = memory;
        st.table = table;
        Ok(Guest {
            store: wstore,
            instance,
            ticker_stop,
        })
    }

    /// The interrupt flag (set it to stop the run).
    pub fn interrupt_flag(&self) -> Arc<AtomicBool> {
        self.store.data().bpf.interrupted.clone()
    }

    /// The host state.
    pub fn state(&mut self) -> &mut State {
        self.store.data_mut()
    }

    /// Calls the exported function `name`.
    pub fn call<P: WasmParams, R: WasmResults>(
        &mut self,
        name: &str,
        params: P,
    ) -> wasmtime::Result<R> {
        let f = self
            .instance
            .get_typed_func::<P, R>(&mut self.store, name)?;
        f.call(&mut self.store, params)
    }

    /// Copies `bytes` into the guest's memory at `offset` (tests and benchmarks).
    pub fn write_memory(&mut self, offset: usize, bytes: &[u8]) -> Result<()> {
        let mem = self
            .instance
            .get_memory(&mut self.store, "memory")
            .context("the guest exports no memory")?;
        wt(mem
            .write(&mut self.store, offset, bytes)
            .map_err(wasmtime::Error::from))
    }

    /// Reads `len` bytes of the guest's memory at `offset`.
    pub fn read_memory(&mut self, offset: usize, len: usize) -> Result<Vec<u8>> {
        let mem = self
            .instance
            .get_memory(&mut self.store, "memory")
            .context("the guest exports no memory")?;
        let mut out = vec![0u8; len];
        wt(mem
            .read(&self.store, offset, &mut out)
            .map_err(wasmtime::Error::from))?;
        Ok(out)
    }

    /// Whether the guest exports a function `name`.
    pub fn exports_func(&mut self, name: &str) -> bool {
        self.instance.get_func(&mut self.store, name).is_some()
    }

    /// Runs `_start` and closes what the guest left open.
    pub fn run(&mut self) -> Outcome {
        let r = self.call::<(), ()>("_start", ());
        let st = self.store.data_mut();
        st.status.clear();
        let out = match r {
            Ok(()) => Outcome::Exited(0),
            Err(e) => {
                if let Some(exit) = e.downcast_ref::<I32Exit>() {
                    Outcome::Exited(exit.0)
                } else if st.bpf.is_interrupted() {
                    Outcome::Interrupted
                } else {
                    Outcome::Trapped(format!("{e:?}"))
                }
            }
        };
        st.bpf.close_all();
        out
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// wasmtime's error as anyhow's.
fn wt<T>(r: wasmtime::Result<T>) -> Result<T> {
    r.map_err(anyhow::Error::from)
}

/// Opens store `name` and returns it after reclaiming objects of dead loaders.
pub fn open_store(name: &str) -> Result<Arc<Store>> {
    let store =
        Arc::new(Store::open_named(name).with_context(|| format!("cannot open store `{name}`"))?);
    let n = bpftime_maps::map::reclaim_dead_owners(&store);
    if n > 0 {
        tracing::info!("reclaimed {n} objects of exited processes");
    }
    Ok(store)
}
