//! The x86_64 JIT against our interpreter, rbpf 0.4's JIT and native C (`clang -O2`), plus JIT
//! compile time.
//!
//! Programs: `benches/programs/{log2,prime,memcpy,switch,strcmp,map_lookup}.s`. `map_lookup`
//! calls helper 1, a lookup in an in-memory open-addressing hash map: one out-of-line Rust
//! function every engine reaches through a thin wrapper of its own ABI (native C through a
//! function pointer; the checking engines' wrapper also grants the map's values). Native versions are in
//! `benches/native/bench.c`, compiled at start-up with `$CC` (default `clang`, else `cc`)
//! `-O2 -shared -fPIC` into a temporary directory and loaded with `dlopen`. Before measuring,
//! every engine runs every program once and must return the Rust reference result.
//!
//! Output: first a summary table (ns per run: the best of 25 batches of ~4 ms, the engines
//! interleaved batch by batch so that load from other processes hits them alike; ratios to
//! native; compile time per 1,000 instructions, including a 10,000-instruction generated
//! program), then the criterion groups `<program>/<engine>` and `compile/<program>`.
//! `BPFTIME_BENCH_SUMMARY_ONLY=1` skips criterion.
//!
//! Run: `cargo bench --bench jit` (x86_64 hosts only).

#[cfg(target_arch = "x86_64")]
mod x86 {
    use bpftime_jit::{Arch, JitOptions, JitProgram};
    use bpftime_vm::asm::assemble;
    use bpftime_vm::helper::{CallEnv, HelperRegistry, MemRegion};
    use bpftime_vm::interpreter::Interpreter;
    use bpftime_vm::isa::{AluOp, Insn, JmpCond, Op, Size, Src, Width, encode, insns_to_bytes};
    use bpftime_vm::memory::GuestMemory;
    use bpftime_vm::verifier::{Program as Verified, verify};
    use criterion::Criterion;
    use std::ffi::{CString, c_void};
    use std::hint::black_box;
    use std::path::PathBuf;
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    // -----------------------------------------------------------------------------------------
    // The map of `map_lookup`.

    const SLOTS: usize = 1024;

    struct Map {
        keys: [u64; SLOTS],
        values: [u64; SLOTS],
        used: [bool; SLOTS],
    }

    fn slot_of(key: u64) -> usize {
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 54) as usize
    }

    /// Filled once in `main`, before any engine runs.
    static MAP: OnceLock<Box<Map>> = OnceLock::new();

    fn build_map() -> Box<Map> {
        let mut m = Box::new(Map {
            keys: [0; SLOTS],
            values: [0; SLOTS],
            used: [false; SLOTS],
        });
        for key in (0..1000u64).step_by(2) {
            let mut s = slot_of(key);
            while m.used[s] {
                s = (s + 1) % SLOTS;
            }
            m.used[s] = true;
            m.keys[s] = key;
            m.values[s] = 3 * key;
        }
        m
    }

    /// The lookup itself: one out-of-line function (that cannot panic, so C-ABI wrappers can
    /// tail-call it) shared by every engine's helper, so that all engines run the very same
    /// probe code.
    #[inline(never)]
    fn find(key: u64) -> u64 {
        let Some(m) = MAP.get() else { return 0 };
        let mut s = slot_of(key) & (SLOTS - 1);
        for _ in 0..SLOTS {
            if !m.used[s] {
                return 0;
            }
            if m.keys[s] == key {
                return &m.values[s] as *const u64 as u64;
            }
            s = (s + 1) & (SLOTS - 1);
        }
        0
    }

    /// The helper of the engines that check memory (interpreter, checked JIT): lets the program
    /// read the map's values, then looks up.
    extern "C" fn lookup_helper(
        _map: u64,
        key: u64,
        _: u64,
        _: u64,
        _: u64,
        env: &mut CallEnv,
    ) -> u64 {
        if let Some(m) = MAP.get() {
            let values = m.values.as_ptr() as u64;
            // SAFETY: the map is a process-lifetime static, never written after creation.
            unsafe { env.grant(values, (SLOTS * 8) as u64, false) };
        }
        find(key)
    }

    /// The helper of the unchecked JIT, which trusts the program and needs no grant (a runtime
    /// registers helpers per engine the same way).
    extern "C" fn lookup_helper_unchecked(
        _map: u64,
        key: u64,
        _: u64,
        _: u64,
        _: u64,
        _: &mut CallEnv,
    ) -> u64 {
        find(key)
    }

    fn lookup_rbpf(_map: u64, key: u64, _: u64, _: u64, _: u64) -> u64 {
        find(key)
    }

    extern "C" fn lookup_native(_map: u64, key: u64) -> u64 {
        find(key)
    }

    // -----------------------------------------------------------------------------------------
    // Programs and their reference results (as in benches/vm.rs).

    struct Program {
        name: &'static str,
        source: &'static str,
        mem: Vec<u8>,
        expected: u64,
    }

    const FIB_HASH: u64 = 0x9e37_79b9_7f4a_7c15;

    fn log2_reference() -> u64 {
        (1..=1000u64)
            .map(|i| {
                let x = (i.wrapping_mul(FIB_HASH) >> (i & 63)) | 1;
                u64::from(63 - x.leading_zeros())
            })
            .sum()
    }

    fn prime_reference() -> u64 {
        (2..1000u64)
            .filter(|&n| (2..).take_while(|d| d * d <= n).all(|d| n % d != 0))
            .count() as u64
    }

    fn memcpy_memory() -> Vec<u8> {
        (0..256u32).map(|i| (i * 37 + 11) as u8).collect()
    }

    fn memcpy_reference(mem: &[u8]) -> u64 {
        mem.chunks_exact(8).fold(0u64, |acc, w| {
            let word = u64::from_le_bytes(w.try_into().expect("8-byte chunk"));
            acc.wrapping_mul(31).wrapping_add(word)
        })
    }

    fn switch_reference() -> u64 {
        let (mut acc, mut state) = (0u64, 12345u64);
        for i in 0..1000u64 {
            state = (state.wrapping_mul(1_103_515_245).wrapping_add(12345)) & 0x7fff_ffff;
            let case = (state >> 16) % 10;
            acc = match case {
                0 => acc.wrapping_add(3),
                1 => acc ^ 0x55,
                2 => acc.wrapping_mul(3),
                3 => acc.wrapping_sub(7),
                4 => acc.wrapping_add(case),
                5 => acc >> 1,
                6 => acc | 0x100,
                7 => acc.wrapping_add(i),
                8 => acc << 2,
                _ => acc.wrapping_add(9001),
            };
        }
        acc
    }

    const KEY: &str = "the quick brown fox jumps over the lazy dog, again and again!";

    fn strcmp_memory() -> Vec<u8> {
        let mut strings: Vec<String> = Vec::new();
        for pos in (5..60).step_by(10) {
            let mut s = KEY.as_bytes().to_vec();
            s[pos] = s[pos].wrapping_add((pos % 7) as u8 + 1);
            strings.push(String::from_utf8(s).expect("ascii"));
        }
        strings.push(KEY.to_string());
        strings.push(KEY[..40].to_string());
        let mut mem = vec![0u8; 9 * 64];
        for (slot, s) in strings
            .iter()
            .chain(std::iter::once(&KEY.to_string()))
            .enumerate()
        {
            mem[slot * 64..slot * 64 + s.len()].copy_from_slice(s.as_bytes());
        }
        mem
    }

    fn strcmp_reference(mem: &[u8]) -> u64 {
        let cstr = |at: usize| {
            let s = &mem[at..at + 64];
            &s[..=s.iter().position(|&b| b == 0).expect("NUL-terminated")]
        };
        let key = cstr(512);
        (0..8).fold(0u64, |acc, slot| {
            let s = cstr(slot * 64);
            let d = s
                .iter()
                .zip(key)
                .find(|(a, b)| a != b || **a == 0)
                .map_or(0, |(&a, &b)| i64::from(a) - i64::from(b));
            acc.wrapping_mul(1000).wrapping_add((d + 256) as u64)
        })
    }

    fn programs() -> Vec<Program> {
        let memcpy_mem = memcpy_memory();
        let strcmp_mem = strcmp_memory();
        vec![
            Program {
                name: "log2",
                source: include_str!("programs/log2.s"),
                mem: vec![0; 8],
                expected: log2_reference(),
            },
            Program {
                name: "prime",
                source: include_str!("programs/prime.s"),
                mem: vec![0; 8],
                expected: prime_reference(),
            },
            Program {
                name: "memcpy",
                source: include_str!("programs/memcpy.s"),
                expected: memcpy_reference(&memcpy_mem),
                mem: memcpy_mem,
            },
            Program {
                name: "switch",
                source: include_str!("programs/switch.s"),
                mem: vec![0; 8],
                expected: switch_reference(),
            },
            Program {
                name: "strcmp",
                source: include_str!("programs/strcmp.s"),
                expected: strcmp_reference(&strcmp_mem),
                mem: strcmp_mem,
            },
            Program {
                name: "map_lookup",
                source: include_str!("programs/map_lookup.s"),
                mem: vec![0; 8],
                expected: (0..1000u64).step_by(2).map(|k| 3 * k).sum(),
            },
        ]
    }

    /// A 10,000-instruction straight-line-and-branches program for compile-time figures.
    fn large_program() -> Vec<Insn> {
        let mut insns = Vec::new();
        let mut x = 0x1234_5678u64;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        while insns.len() < 9_999 {
            let r = (rnd(8)) as u8;
            let s = (rnd(8)) as u8;
            let op = match rnd(10) {
                0..=4 => Op::Alu {
                    width: if rnd(2) == 0 { Width::W64 } else { Width::W32 },
                    op: [
                        AluOp::Add,
                        AluOp::Sub,
                        AluOp::Xor,
                        AluOp::Mul,
                        AluOp::Lsh,
                        AluOp::Mov,
                    ][rnd(6) as usize],
                    dst: r,
                    src: if rnd(2) == 0 {
                        Src::Reg(s)
                    } else {
                        Src::Imm(rnd(64) as i32)
                    },
                },
                5 | 6 => Op::Load {
                    size: Size::DW,
                    signed: false,
                    dst: r,
                    src: 10,
                    off: -8 * (1 + rnd(32) as i16),
                },
                7 | 8 => Op::Store {
                    size: Size::W,
                    dst: 10,
                    off: -4 * (1 + rnd(64) as i16),
                    src: Src::Reg(s),
                },
                _ => Op::Jmp {
                    width: Width::W64,
                    cond: JmpCond::Gt,
                    dst: r,
                    src: Src::Reg(s),
                    off: 1,
                },
            };
            insns.extend(encode(&op));
        }
        insns.push(encode(&Op::Exit)[0]);
        insns
    }

    // -----------------------------------------------------------------------------------------
    // Native C.

    type NativeFn = unsafe extern "C" fn(*mut u8, u64) -> u64;
    type NativeLookupFn = unsafe extern "C" fn(*mut u8, u64, extern "C" fn(u64, u64) -> u64) -> u64;

    struct Native {
        handle: *mut c_void,
    }

    impl Native {
        fn build() -> Native {
            let dir =
                std::env::temp_dir().join(format!("bpftime-bench-jit-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            let lib = dir.join("libbench.so");
            let src = PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/benches/native/bench.c"
            ));
            let cc = std::env::var("CC").unwrap_or_else(|_| {
                if std::process::Command::new("clang")
                    .arg("--version")
                    .output()
                    .is_ok()
                {
                    "clang".into()
                } else {
                    "cc".into()
                }
            });
            let status = std::process::Command::new(&cc)
                .args(["-O2", "-shared", "-fPIC", "-o"])
                .arg(&lib)
                .arg(&src)
                .status()
                .unwrap_or_else(|e| panic!("running {cc}: {e}"));
            assert!(status.success(), "{cc} failed to build {}", src.display());
            let path = CString::new(lib.to_str().expect("utf-8 path")).expect("no NUL");
            // SAFETY: a path to a shared library we just built from our own C source.
            let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW) };
            assert!(!handle.is_null(), "dlopen {} failed", lib.display());
            let _ = std::fs::remove_dir_all(&dir);
            eprintln!("native: built with {cc} -O2");
            Native { handle }
        }

        fn symbol(&self, name: &str) -> *mut c_void {
            let c = CString::new(format!("bench_{name}")).expect("no NUL");
            // SAFETY: `handle` is a live dlopen handle (never closed).
            let p = unsafe { libc::dlsym(self.handle, c.as_ptr()) };
            assert!(!p.is_null(), "no symbol bench_{name}");
            p
        }

        fn run(&self, name: &str, mem: &mut [u8]) -> u64 {
            let p = self.symbol(name);
            if name == "map_lookup" {
                // SAFETY: `bench_map_lookup` in bench.c has exactly this signature.
                let f = unsafe { std::mem::transmute::<*mut c_void, NativeLookupFn>(p) };
                // SAFETY: the C function reads at most `len` bytes of `mem`.
                unsafe { f(mem.as_mut_ptr(), mem.len() as u64, lookup_native) }
            } else {
                // SAFETY: every other `bench_*` in bench.c has this signature.
                let f = unsafe { std::mem::transmute::<*mut c_void, NativeFn>(p) };
                // SAFETY: the C function reads at most `len` bytes of `mem`.
                unsafe { f(mem.as_mut_ptr(), mem.len() as u64) }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Engines.

    struct Engines<'a> {
        p: &'a Program,
        prog: &'a Verified,
        helpers: &'a HelperRegistry,
        jit: JitProgram,
        jit_checked: JitProgram,
        rbpf: rbpf::EbpfVmMbuff<'a>,
        gm: GuestMemory,
        mem: Vec<u8>,
    }

    impl<'a> Engines<'a> {
        fn new(
            p: &'a Program,
            prog: &'a Verified,
            helpers: &'a HelperRegistry,
            bytes: &'a [u8],
        ) -> Self {
            let mut unchecked_helpers = HelperRegistry::new();
            unchecked_helpers.register(1, "map_lookup", lookup_helper_unchecked);
            let jit = JitProgram::new(
                prog,
                &unchecked_helpers,
                &JitOptions {
                    checked: false,
                    ..Default::default()
                },
            )
            .expect("compiles");
            let jit_checked = JitProgram::new(
                prog,
                helpers,
                &JitOptions {
                    checked: true,
                    ..Default::default()
                },
            )
            .expect("compiles");
            let mut rbpf = rbpf::EbpfVmMbuff::new(Some(bytes))
                .unwrap_or_else(|e| panic!("rbpf rejects {}: {e}", p.name));
            rbpf.register_helper(1, lookup_rbpf).expect("helper");
            rbpf.jit_compile()
                .unwrap_or_else(|e| panic!("rbpf cannot compile {}: {e}", p.name));
            let mem = p.mem.clone();
            let mut e = Engines {
                p,
                prog,
                helpers,
                jit,
                jit_checked,
                rbpf,
                gm: GuestMemory::new(),
                mem,
            };
            let (start, len) = (e.mem.as_mut_ptr() as u64, e.mem.len() as u64);
            // SAFETY: `e.mem` is owned by `e` next to `e.gm`, never reallocated, and only
            // accessed through runs while `gm` holds the region.
            unsafe {
                e.gm.add_region(MemRegion {
                    start,
                    len,
                    writable: true,
                })
            };
            e
        }

        fn args(&mut self) -> (u64, u64) {
            (self.mem.as_mut_ptr() as u64, self.mem.len() as u64)
        }

        fn interpreter(&mut self) -> u64 {
            let (r1, r2) = self.args();
            Interpreter::new(self.prog, self.helpers)
                .run_in(&mut self.gm, r1, r2, std::ptr::null_mut())
                .expect("runs")
        }

        fn jit(&mut self, checked: bool) -> u64 {
            let (r1, r2) = self.args();
            let j = if checked {
                &self.jit_checked
            } else {
                &self.jit
            };
            j.run_in(&mut self.gm, r1, r2, std::ptr::null_mut())
                .expect("runs")
        }

        fn rbpf_jit(&mut self) -> u64 {
            let (ptr, len) = (self.mem.as_mut_ptr(), self.mem.len());
            // SAFETY: the block is live and exclusively ours for the call; rbpf's program only
            // reads it (as r1, the "mbuff") and writes its own stack.
            let mbuff = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
            // SAFETY: the programs were checked against the reference on the interpreter; rbpf's
            // JIT code only touches the block, its stack and the static map.
            unsafe { self.rbpf.execute_program_jit(&mut [], mbuff) }.expect("runs")
        }
    }

    /// Calls per batch so that one batch takes about `target`.
    fn calibrate(f: &mut dyn FnMut() -> u64, target: Duration) -> u64 {
        let mut n = 1u64;
        loop {
            let t = Instant::now();
            for _ in 0..n {
                black_box(f());
            }
            if t.elapsed() >= target / 4 {
                let per = t.elapsed().as_nanos().max(1) as f64 / n as f64;
                return ((target.as_nanos() as f64 / per) as u64).max(1);
            }
            n *= 2;
        }
    }

    /// Best ns per call of each closure, measured in interleaved rounds (so that load from
    /// other processes hits every engine alike): 25 rounds of one ~4 ms batch each.
    fn time_interleaved(fs: &mut [&mut dyn FnMut() -> u64]) -> Vec<f64> {
        let ns: Vec<u64> = fs
            .iter_mut()
            .map(|f| calibrate(*f, Duration::from_millis(4)))
            .collect();
        let mut best = vec![f64::INFINITY; fs.len()];
        for _ in 0..25 {
            for (i, f) in fs.iter_mut().enumerate() {
                let t = Instant::now();
                for _ in 0..ns[i] {
                    black_box(f());
                }
                best[i] = best[i].min(t.elapsed().as_nanos() as f64 / ns[i] as f64);
            }
        }
        best
    }

    fn time(mut f: impl FnMut() -> u64) -> f64 {
        time_interleaved(&mut [&mut f])[0]
    }

    fn compile_us(prog: &Verified, helpers: &HelperRegistry, checked: bool, map: bool) -> f64 {
        let opts = JitOptions {
            checked,
            ..Default::default()
        };
        time(|| {
            if map {
                JitProgram::new(prog, helpers, &opts)
                    .expect("compiles")
                    .compiled()
                    .code
                    .len() as u64
            } else {
                bpftime_jit::compile(Arch::X86_64, prog, helpers, &opts)
                    .expect("compiles")
                    .code
                    .len() as u64
            }
        }) / 1000.0
    }

    pub fn main() {
        let _ = MAP.set(build_map());
        let mut helpers = HelperRegistry::new();
        helpers.register(1, "map_lookup", lookup_helper);
        let native = Native::build();
        let progs = programs();
        let sources: Vec<_> = progs
            .iter()
            .map(|p| assemble(p.source).unwrap_or_else(|e| panic!("{}.s: {e}", p.name)))
            .collect();
        let verified: Vec<_> = sources
            .iter()
            .zip(&progs)
            .map(|(s, p)| verify(s, &helpers).unwrap_or_else(|e| panic!("{}.s: {e}", p.name)))
            .collect();
        let bytes: Vec<_> = sources.iter().map(|s| insns_to_bytes(s)).collect();
        let mut engines: Vec<Engines<'_>> = progs
            .iter()
            .zip(&verified)
            .zip(&bytes)
            .map(|((p, v), b)| Engines::new(p, v, &helpers, b))
            .collect();

        // Every engine must agree with the Rust reference.
        for e in &mut engines {
            let mut m = e.p.mem.clone();
            let got = [
                ("interpreter", e.interpreter()),
                ("jit", e.jit(false)),
                ("jit_checked", e.jit(true)),
                ("rbpf_jit", e.rbpf_jit()),
                ("native", native.run(e.p.name, &mut m)),
            ];
            for (engine, r) in got {
                assert_eq!(r, e.p.expected, "{} on {engine}", e.p.name);
            }
        }

        let (cpu, load) = machine();
        println!("\n## x86_64 JIT benchmark ({cpu}; load average before: {load})\n");
        println!(
            "| program | native ns | jit ns | jit checked ns | rbpf jit ns | interpreter ns | jit/native | checked/unchecked | rbpf/jit |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        let (mut log_ratio, mut log_checked) = (0.0, 0.0);
        for e in &mut engines {
            let name = e.p.name;
            let mut m = e.p.mem.clone();
            let e = std::cell::RefCell::new(e);
            let t = time_interleaved(&mut [
                &mut || native.run(name, &mut m),
                &mut || e.borrow_mut().jit(false),
                &mut || e.borrow_mut().jit(true),
                &mut || e.borrow_mut().rbpf_jit(),
                &mut || e.borrow_mut().interpreter(),
            ]);
            let [t_native, t_jit, t_checked, t_rbpf, t_interp] = t[..] else {
                unreachable!("five engines")
            };
            log_ratio += (t_jit / t_native).ln();
            log_checked += (t_checked / t_jit).ln();
            println!(
                "| {name} | {t_native:.0} | {t_jit:.0} | {t_checked:.0} | {t_rbpf:.0} | {t_interp:.0} | {:.2}× | {:.2}× | {:.2}× |",
                t_jit / t_native,
                t_checked / t_jit,
                t_rbpf / t_jit
            );
        }
        let n = engines.len() as f64;
        println!(
            "\ngeometric mean: jit/native {:.2}×, checked/unchecked {:.2}×\n",
            (log_ratio / n).exp(),
            (log_checked / n).exp()
        );

        println!(
            "| program | insns | codegen µs | µs / 1,000 insns | + mmap/mprotect µs | checked codegen µs / 1,000 |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        let large = large_program();
        let large_prog = verify(&large, &helpers).expect("large program verifies");
        let rows: Vec<(&str, &Verified)> = progs
            .iter()
            .map(|p| p.name)
            .zip(&verified)
            .chain(std::iter::once(("generated", &large_prog)))
            .collect();
        for (name, prog) in rows {
            let k = prog.len() as f64 / 1000.0;
            let codegen = compile_us(prog, &helpers, false, false);
            let mapped = compile_us(prog, &helpers, false, true);
            let checked = compile_us(prog, &helpers, true, false);
            println!(
                "| {name} | {} | {codegen:.1} | {:.1} | {mapped:.1} | {:.1} |",
                prog.len(),
                codegen / k,
                checked / k
            );
        }

        if std::env::var_os("BPFTIME_BENCH_SUMMARY_ONLY").is_some() {
            return;
        }
        // Short enough that the whole bench takes under 3 minutes (summary included).
        let mut c = Criterion::default()
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            // No plots: they need system fonts, which a bare CI image lacks.
            .without_plots()
            .configure_from_args();
        for e in &mut engines {
            let name = e.p.name;
            let mut g = c.benchmark_group(name);
            let mut m = e.p.mem.clone();
            g.bench_function("native", |b| b.iter(|| native.run(name, black_box(&mut m))));
            g.bench_function("jit", |b| b.iter(|| e.jit(false)));
            g.bench_function("jit_checked", |b| b.iter(|| e.jit(true)));
            g.bench_function("rbpf_jit", |b| b.iter(|| e.rbpf_jit()));
            g.bench_function("interpreter", |b| b.iter(|| e.interpreter()));
            g.finish();
        }
        let mut g = c.benchmark_group("compile");
        for (p, prog) in progs.iter().zip(&verified) {
            g.bench_function(p.name, |b| {
                b.iter(|| {
                    bpftime_jit::compile(Arch::X86_64, prog, &helpers, &JitOptions::default())
                        .expect("compiles")
                })
            });
        }
        g.bench_function("generated_10k", |b| {
            b.iter(|| {
                bpftime_jit::compile(Arch::X86_64, &large_prog, &helpers, &JitOptions::default())
                    .expect("compiles")
            })
        });
        g.finish();
        c.final_summary();
    }

    fn machine() -> (String, String) {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let load = std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        (cpu, load)
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    x86::main();
    #[cfg(not(target_arch = "x86_64"))]
    eprintln!("the JIT benchmark runs on x86_64 hosts only");
}
