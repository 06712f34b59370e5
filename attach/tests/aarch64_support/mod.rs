//! Shared by the aarch64 hook tests: small hand-assembled (dynasm) functions with pc-relative
//! instructions, a handler written in aarch64 that counts hits and records the registers it
//! gets, the address layout, and a Unicorn machine (AArch64 "max" CPU, as the JIT's tests use)
//! that runs them and reports the complete register state.
//!
//! Layout (all fixed, low addresses no x86_64 process needs for the emulator):
//!
//! | what | address |
//! |---|---|
//! | image: data page, then the functions | `IMAGE` = 0x400000 |
//! | near stub + trampoline (16 KiB from the functions) | `IMAGE + 0x6000` |
//! | mid stub (8 MiB: `b` reaches, `b.cond`/`ldr`/`adr` do not) | `IMAGE + 0x800000` |
//! | far stub (> 4 GiB: nothing reaches, not even `adrp`) | `0x12_3456_0000` |
//! | handler code / user area / stack / exit | `0x1000_0000` / `0x2000_0000` / `0x3000_0000` / `0x5000_0000` |

#![allow(dead_code)]

use bpftime_attach::aarch64::{HookCode, HookOptions, build_hook};
use dynasmrt::aarch64::Aarch64Relocation;
use dynasmrt::{DynamicLabel, DynasmApi, DynasmLabelApi, VecAssembler, dynasm};
use unicorn_engine::{Arch, Arm64CpuModel, Mode, Prot, RegisterARM64, Unicorn};

macro_rules! a64 {
    ($ops:expr; $($t:tt)*) => {
        dynasm!($ops ; .arch aarch64 ; $($t)*)
    };
}

pub const IMAGE: u64 = 0x40_0000;
pub const IMAGE_LEN: u64 = 0x10_0000;
pub const NEAR: u64 = IMAGE + 0x6000;
pub const MID: u64 = IMAGE + 0x80_0000;
pub const FAR: u64 = 0x12_3456_0000;
pub const STUB_LEN: u64 = 0x1_0000;
pub const HANDLER: u64 = 0x1000_0000;
pub const USER: u64 = 0x2000_0000;
pub const STACK: u64 = 0x3000_0000;
pub const STACK_LEN: u64 = 0x1_0000;
pub const EXIT: u64 = 0x5000_0000;
pub const PAGE: u64 = 0x1000;

/// User area: hits (u64), the last `user_pt_regs` seen (34 u64), then what the handler adds
/// to x0 and XORs into pstate.
pub const USER_HITS: u64 = 0;
pub const USER_REGS: u64 = 8;
pub const USER_DELTA: u64 = 8 + 34 * 8;
pub const USER_FLIP: u64 = USER_DELTA + 8;

/// Where stubs go, and whether to force the 16-byte patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub name: &'static str,
    pub stub: u64,
    pub absolute: bool,
}

pub const PLACEMENTS: [Placement; 5] = [
    Placement {
        name: "near, b patch",
        stub: NEAR,
        absolute: false,
    },
    Placement {
        name: "near, 16-byte patch",
        stub: NEAR,
        absolute: true,
    },
    Placement {
        name: "mid, b patch",
        stub: MID,
        absolute: false,
    },
    Placement {
        name: "mid, 16-byte patch",
        stub: MID,
        absolute: true,
    },
    Placement {
        name: "far, 16-byte patch",
        stub: FAR,
        absolute: false,
    },
];

/// A function in the image and where it is hooked.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: &'static str,
    pub entry: u64,
    /// `(address, whether the 16 bytes from there can be patched)`: where they cannot (control
    /// leaves, a call is not last), the 16-byte patch must be refused.
    pub hooks: Vec<(u64, bool)>,
    /// (x0, x1) of each call.
    pub inputs: Vec<[u64; 2]>,
}

/// The image (at [`IMAGE`]) and the cases in it.
pub struct Image {
    pub bytes: Vec<u8>,
    pub cases: Vec<Case>,
}

fn addr(ops: &VecAssembler<Aarch64Relocation>, l: DynamicLabel) -> u64 {
    IMAGE + ops.labels().resolve_dynamic(l).expect("label").0 as u64
}

/// Assembles the test functions.
pub fn image() -> Image {
    let mut ops = VecAssembler::<Aarch64Relocation>::new(IMAGE as usize);
    let data = ops.new_dynamic_label();
    let lit64 = ops.new_dynamic_label();
    let lit32 = ops.new_dynamic_label();
    let lit32neg = ops.new_dynamic_label();
    let litd = ops.new_dynamic_label();
    let litq = ops.new_dynamic_label();
    let lits = ops.new_dynamic_label();
    a64!(ops
        ; =>data
        ; .u64 11 ; .u64 22 ; .u64 33 ; .u64 44 ; .u64 55 ; .u64 66 ; .u64 77 ; .u64 88
        ; =>lit64 ; .u64 0x1234_5678_9abc_def0
        ; =>lit32 ; .u32 0x8000_0005
        ; =>lit32neg ; .u32 0xffff_fff0
        ; =>litd ; .u64 0x4045_0000_0000_0000
        ; =>litq ; .u64 0x0102_0304_0506_0708 ; .u64 0x1112_1314_1516_1718
        ; =>lits ; .u32 0x3f80_0000
    );
    // The functions start two pages in, so adrp/adr reach back across pages.
    let pad = 0x2000 - ops.offset().0;
    a64!(ops ; .bytes vec![0u8; pad]);

    let mut cases = Vec::new();
    let two = vec![[0, 0], [3, 1], [5, 2], [7, 0]];

    // adr backwards into the data page, twice.
    let f = ops.new_dynamic_label();
    a64!(ops
        ; =>f
        ; adr x9, =>data
        ; ldr x0, [x9, x0, lsl 3]
        ; adr x10, =>lit64
        ; ldr x10, [x10]
        ; add x0, x0, x10
        ; ret
    );
    let e = addr(&ops, f);
    cases.push(Case {
        name: "adr",
        entry: e,
        hooks: vec![(e, true), (e + 8, true)],
        inputs: two.clone(),
    });

    // adrp of the data page and of the function's own page.
    let f = ops.new_dynamic_label();
    a64!(ops
        ; =>f
        ; adrp x9, =>data
        ; add x9, x9, 16
        ; ldr x0, [x9, x0, lsl 3]
        ; adrp x10, =>f
        ; add x0, x0, x10
        ; ret
    );
    let e = addr(&ops, f);
    cases.push(Case {
        name: "adrp",
        entry: e,
        hooks: vec![(e, true), (e + 12, false)],
        inputs: two.clone(),
    });

    // b to a body outside the range (4th instruction), hooked at the entry and at the b.
    let f = ops.new_dynamic_label();
    let body = ops.new_dynamic_label();
    a64!(ops
        ; =>f
        ; add x0, x0, 1
        ; add x0, x0, x1
        ; add x0, x0, 3
        ; b =>body
        ; .u32 0xd420_0000 // brk #0: never reached
        ; =>body
        ; add x0, x0, x0, lsl 1
        ; ret
    );
    let e = addr(&ops, f);
    cases.push(Case {
        name: "b",
        entry: e,
        hooks: vec![(e, true), (e + 12, false)],
        inputs: two.clone(),
    });

    // bl as the last moved instruction: the callee records the return address it got (x14).
    let f = ops.new_dynamic_label();
    let callee = ops.new_dynamic_label();
    a64!(ops
        ; =>callee
        ; mov x14, x30
        ; add x0, x0, x1
        ; ret
        ; =>f
        ; mov x15, x30
        ; mov x1, 5
        ; add x0, x0, 1
        ; bl =>callee
        ; mov x30, x15
        ; add x0, x0, 100
        ; ret
    );
    let e = addr(&ops, f);
    cases.push(Case {
        name: "bl",
        entry: e,
        hooks: vec![(e, true), (e + 12, false)],
        inputs: two.clone(),
    });

    // b.cond to outside the range, after a cmp (flags must survive the handler).
    let f = ops.new_dynamic_label();
    let small = ops.new_dynamic_label();
    a64!(ops
        ; =>f
        ; cmp x0, 10
        ; b.lt =>small
        ; mov x0, 1
        ; mov x1, 2
        ; add x0, x0, x1
        ; ret
        ; =>small
        ; add x0, x0, 200
        ; ret
    );
    let e = addr(&ops, f);
    let around = vec![[3, 0], [10, 0], [30, 0], [u64::MAX, 0]];
    cases.push(Case {
        name: "b.cond out",
        entry: e,
        hooks: vec![(e, true), (e + 4, true)],
        inputs: around.clone(),
    });

    // b.cond to an instruction inside the 16-byte range.
    let f = ops.new_dynamic_label();
    let inside = ops.new_dynamic_label();
    a64!(ops
        ; =>f
        ; cmp x0, 10
        ; b.ge =>inside
        ; add x0, x0, 100
        ; =>inside
        ; add x0, x0, 1
        ; add x0, x0, x0
        ; ret
    );
    let e = addr(&ops, f);
    cases.push(Case {
        name: "b.cond in",
        entry: e,
        hooks: vec![(e, true), (e + 4, true)],
        inputs: around.clone(),
    });

    // cbz out of the range, cbnz into it.
    let f = ops.new_dynamic_label();
    let zero = ops.new_dynamic_label();
    let inside = ops.new_dynamic_label();
    a64!(ops
        ; =>f
        ; cbz x0, =>zero
        ; cbnz w1, =>inside
        ; mov x0, 7
        ; =>inside
        ; add x0, x0, 1
        ; ret
        ; =>zero
        ; mov x0, 99
        ; ret
    );
    let e = addr(&ops, f);
    let cb = vec![[0, 0], [5, 0], [5, 1], [5, 1 << 32]];
    cases.push(Case {
        name: "cbz/cbnz",
        entry: e,
        hooks: vec![(e, true), (e + 4, true)],
        inputs: cb,
    });

    // tbz out of the range, tbnz into it.
    let f = ops.new_dynamic_label();
    let skip = ops.new_dynamic_label();
    let inside = ops.new_dynamic_label();
    a64!(ops
        ; =>f
        ; tbz x0, 40, =>skip
        ; tbnz w1, 3, =>inside
        ; mov x0, 7
        ; =>inside
        ; add x0, x0, 1
        ; ret
        ; =>skip
        ; mov x0, 55
        ; ret
    );
    let e = addr(&ops, f);
    let tb = vec![[0, 0], [1 << 40, 0], [1 << 40, 8], [(1 << 40) | 3, 7]];
    cases.push(Case {
        name: "tbz/tbnz",
        entry: e,
        hooks: vec![(e, true), (e + 4, true)],
        inputs: tb,
    });

    // Literal loads into general-purpose registers.
    let f = ops.new_dynamic_label();
    a64!(ops
        ; =>f
        ; ldr x9, =>lit64
        ; ldr w10, =>lit32
        ; ldrsw x11, =>lit32neg
        ; add x0, x0, x9
        ; add x0, x0, x10
        ; add x0, x0, x11
        ; ret
    );
    let e = addr(&ops, f);
    cases.push(Case {
        name: "ldr literal (w, x, sw)",
        entry: e,
        hooks: vec![(e, true), (e + 4, true), (e + 8, true)],
        inputs: two.clone(),
    });

    // Literal loads into SIMD/FP registers, and prfm.
    let f = ops.new_dynamic_label();
    a64!(ops
        ; =>f
        ; ldr d0, =>litd
        ; ldr q1, =>litq
        ; ldr s2, =>lits
        ; prfm 0, =>lit64 // pldl1keep
        ; fmov x9, d0
        ; umov x10, v1.d[1]
        ; fmov w11, s2
        ; add x0, x0, x9
        ; add x0, x0, x10
        ; add x0, x0, x11
        ; ret
    );
    let e = addr(&ops, f);
    cases.push(Case {
        name: "ldr literal (s, d, q), prfm",
        entry: e,
        hooks: vec![(e, true), (e + 4, true), (e + 8, true), (e + 12, true)],
        inputs: two.clone(),
    });

    // A function of two instructions: only the 4-byte patch fits.
    let f = ops.new_dynamic_label();
    a64!(ops
        ; =>f
        ; add x0, x0, x1
        ; ret
    );
    let e = addr(&ops, f);
    cases.push(Case {
        name: "short",
        entry: e,
        hooks: vec![(e, false), (e + 4, false)],
        inputs: two,
    });

    let bytes = ops.finalize().expect("assemble");
    assert!(
        (bytes.len() as u64) < NEAR - IMAGE,
        "image overlaps the near stub"
    );
    Image { bytes, cases }
}

/// The handler stub's callee, in aarch64 at [`HANDLER`]: counts the hit, copies the
/// `user_pt_regs` to the user area, adds `USER_DELTA` to x0 and XORs `USER_FLIP` into
/// pstate, then clobbers every register the AAPCS64 lets it clobber (x0–x18, v0–v7,
/// v16–v31, the upper halves of v8–v15, NZCV, FPSR) so that a stub that forgets one shows.
// dynasm converts register numbers with `.into()`, even from the `u8` it wants.
#[allow(clippy::useless_conversion)]
pub fn handler() -> Vec<u8> {
    let mut ops = VecAssembler::<Aarch64Relocation>::new(HANDLER as usize);
    let lp = ops.new_dynamic_label();
    a64!(ops
        ; ldr x9, [x1, USER_HITS as u32]
        ; add x9, x9, 1
        ; str x9, [x1, USER_HITS as u32]
        ; mov x10, 0
        ; add x12, x1, USER_REGS as u32
        ; =>lp
        ; ldr x11, [x0, x10, lsl 3]
        ; str x11, [x12, x10, lsl 3]
        ; add x10, x10, 1
        ; cmp x10, 34
        ; b.ne =>lp
        ; ldr x9, [x1, USER_DELTA as u32]
        ; ldr x10, [x0]
        ; add x10, x10, x9
        ; str x10, [x0]
        ; ldr x9, [x1, USER_FLIP as u32]
        ; ldr x10, [x0, 264]
        ; eor x10, x10, x9
        ; str x10, [x0, 264]
    );
    for r in 0..19u8 {
        a64!(ops ; movz X(r), 0xbad0 + u32::from(r));
    }
    for v in (0..8u8).chain(16..32) {
        a64!(ops ; movi V(v).b16, 0xa5);
    }
    for v in 8..16u8 {
        a64!(ops ; ins V(v).d[1], x2);
    }
    a64!(ops
        ; movz x9, 0xf000, lsl 16
        ; msr 0x5a10, x9 // nzcv
        ; movz x9, 0x9f
        ; msr 0x5a21, x9 // fpsr
        ; ret
    );
    ops.finalize().expect("assemble handler")
}

/// Complete architectural state the tests compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub x: [u64; 31],
    pub sp: u64,
    pub pc: u64,
    pub nzcv: u64,
    pub fpsr: u64,
    pub q: [u128; 32],
}

impl State {
    /// The state a call of `f(x0, x1)` starts with: every other register holds a distinct
    /// value, flags Z and C are set, the link register is [`EXIT`].
    pub fn call(args: [u64; 2]) -> Self {
        let mut x = [0u64; 31];
        for (n, v) in x.iter_mut().enumerate() {
            *v = 0x5a5a_0000_0000_0000 | ((n as u64) << 32) | (0x1234 * n as u64);
        }
        x[0] = args[0];
        x[1] = args[1];
        x[30] = EXIT;
        let mut q = [0u128; 32];
        for (n, v) in q.iter_mut().enumerate() {
            *v = 0x0f0f_0000_0000_0000_0000_0000_0000_0000u128 | (n as u128) << 64 | n as u128;
        }
        State {
            x,
            sp: STACK + STACK_LEN - 0x100,
            pc: 0,
            nzcv: 0x6000_0000,
            fpsr: 0,
            q,
        }
    }

    /// Differences from `other`, ignoring x16 and x17 when `scratch` (the far forms' veneer
    /// registers).
    pub fn diff(&self, other: &State, scratch: bool) -> Vec<String> {
        let mut d = Vec::new();
        for n in 0..31 {
            if scratch && (n == 16 || n == 17) {
                continue;
            }
            if self.x[n] != other.x[n] {
                d.push(format!("x{n}: {:#x} vs {:#x}", self.x[n], other.x[n]));
            }
        }
        for n in 0..32 {
            if self.q[n] != other.q[n] {
                d.push(format!("q{n}: {:#x} vs {:#x}", self.q[n], other.q[n]));
            }
        }
        for (what, a, b) in [
            ("sp", self.sp, other.sp),
            ("pc", self.pc, other.pc),
            ("nzcv", self.nzcv, other.nzcv),
            ("fpsr", self.fpsr, other.fpsr),
        ] {
            if a != b {
                d.push(format!("{what}: {a:#x} vs {b:#x}"));
            }
        }
        d
    }
}

fn x_reg(n: usize) -> RegisterARM64 {
    use RegisterARM64::*;
    const REGS: [RegisterARM64; 31] = [
        X0, X1, X2, X3, X4, X5, X6, X7, X8, X9, X10, X11, X12, X13, X14, X15, X16, X17, X18, X19,
        X20, X21, X22, X23, X24, X25, X26, X27, X28, X29, X30,
    ];
    REGS[n]
}

fn q_reg(n: usize) -> i32 {
    RegisterARM64::Q0 as i32 + n as i32
}

/// One emulated CPU with the fixed mappings.
pub struct Machine {
    uc: Unicorn<'static, ()>,
    image: Vec<u8>,
}

impl Machine {
    pub fn new(image: &[u8]) -> Self {
        let mut uc = Unicorn::new(Arch::ARM64, Mode::ARM).expect("unicorn arm64");
        uc.ctl_set_cpu_model(Arm64CpuModel::MAX as i32)
            .expect("cpu model max");
        uc.ctl_exits_enable().expect("multiple exits");
        let rx = Prot::READ | Prot::EXEC;
        for (at, len, prot) in [
            (IMAGE, IMAGE_LEN, rx),
            (MID, STUB_LEN, rx),
            (FAR, STUB_LEN, rx),
            (HANDLER, PAGE, rx),
            (USER, PAGE, Prot::READ | Prot::WRITE),
            (STACK, STACK_LEN, Prot::READ | Prot::WRITE),
            (EXIT, PAGE, rx),
        ] {
            uc.mem_map(at, len, prot).expect("map");
        }
        uc.mem_write(HANDLER, &handler()).expect("handler");
        Machine {
            uc,
            image: image.to_vec(),
        }
    }

    pub fn write(&mut self, at: u64, bytes: &[u8]) {
        self.uc.mem_write(at, bytes).expect("write");
    }

    pub fn read_u64(&self, at: u64) -> u64 {
        let mut b = [0u8; 8];
        self.uc.mem_read(at, &mut b).expect("read");
        u64::from_le_bytes(b)
    }

    pub fn write_u64(&mut self, at: u64, v: u64) {
        self.write(at, &v.to_le_bytes());
    }

    /// Restores the unpatched image and clears the user area.
    pub fn reset(&mut self) {
        let image = self.image.clone();
        self.write(IMAGE, &image);
        self.write(USER, &[0u8; PAGE as usize]);
    }

    /// Installs `hook` (patch at `addr`, code at `stub`).
    pub fn install(&mut self, addr: u64, stub: u64, hook: &HookCode) {
        self.write(addr, &hook.patch);
        self.write(stub, &hook.code);
    }

    /// Loads `s` into the CPU and runs from `pc` until `until`, returning the final state.
    pub fn run(&mut self, s: &State, pc: u64, until: u64) -> Result<State, String> {
        let out = self.run_to(s, pc, &[until])?;
        if out.pc != until {
            return Err(format!("stopped at {:#x}, not {until:#x}", out.pc));
        }
        Ok(out)
    }

    /// Runs from `pc` until the first of `exits`.
    pub fn run_to(&mut self, s: &State, pc: u64, exits: &[u64]) -> Result<State, String> {
        self.uc.ctl_set_exits(exits).expect("set exits");
        // Translated blocks are cached with the stop address they were translated for, and
        // the code changes between runs: start from a clean cache every time.
        self.uc.ctl_flush_tb().expect("flush translation cache");
        for n in 0..31 {
            self.uc.reg_write(x_reg(n), s.x[n]).unwrap();
        }
        for n in 0..32 {
            self.uc
                .reg_write_long(q_reg(n), &s.q[n].to_le_bytes())
                .unwrap();
        }
        self.uc.reg_write(RegisterARM64::SP, s.sp).unwrap();
        self.uc.reg_write(RegisterARM64::NZCV, s.nzcv).unwrap();
        self.uc.reg_write(RegisterARM64::FPSR, s.fpsr).unwrap();
        self.uc.emu_start(pc, 0, 0, 100_000).map_err(|e| {
            format!(
                "emulation failed at {:#x}: {e:?}",
                self.uc.pc_read().unwrap_or(0)
            )
        })?;
        let mut out = s.clone();
        for n in 0..31 {
            out.x[n] = self.uc.reg_read(x_reg(n)).unwrap();
        }
        for n in 0..32 {
            let b = self.uc.reg_read_long(q_reg(n)).unwrap();
            out.q[n] = u128::from_le_bytes(b[..16].try_into().unwrap());
        }
        out.sp = self.uc.reg_read(RegisterARM64::SP).unwrap();
        out.pc = self.uc.pc_read().unwrap();
        out.nzcv = self.uc.reg_read(RegisterARM64::NZCV).unwrap();
        out.fpsr = self.uc.reg_read(RegisterARM64::FPSR).unwrap();
        if !exits.contains(&out.pc) {
            return Err(format!("stopped at {:#x}, not at {exits:#x?}", out.pc));
        }
        Ok(out)
    }
}

/// Builds the hook of `addr` for `place`, with the image's bytes from `addr`.
pub fn hook_for(
    image: &[u8],
    addr: u64,
    place: Placement,
) -> Result<HookCode, bpftime_attach::AttachError> {
    let code = &image[(addr - IMAGE) as usize..];
    build_hook(
        addr,
        code,
        place.stub,
        HANDLER,
        USER,
        HookOptions {
            absolute: place.absolute,
            bti_guarded: false,
        },
    )
}
