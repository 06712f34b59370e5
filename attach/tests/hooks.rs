//! Hooks on functions with specific prologues, written in assembly so the bytes are known.
//! Each test hooks its own functions: tests run in parallel threads of one process.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use core::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};

use bpftime_attach::{AttachError, Hook, PtRegs, install};

core::arch::global_asm!(
    ".pushsection .text.bpftime_attach_tests,\"ax\",@progbits",
    // nop5 entry: a + b
    ".p2align 4",
    ".globl t_nop5",
    ".type t_nop5,@function",
    "t_nop5:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size t_nop5, .-t_nop5",
    // same, for the argument-override test
    ".p2align 4",
    ".globl t_nop5_override",
    ".type t_nop5_override,@function",
    "t_nop5_override:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size t_nop5_override, .-t_nop5_override",
    // push rbp; mov rbp, rsp: a + 2b
    ".p2align 4",
    ".globl t_push_rbp",
    ".type t_push_rbp,@function",
    "t_push_rbp:",
    "push rbp",
    "mov rbp, rsp",
    "lea rax, [rdi + 2*rsi]",
    "pop rbp",
    "ret",
    ".size t_push_rbp, .-t_push_rbp",
    // lea first: a + b + 7
    ".p2align 4",
    ".globl t_lea_first",
    ".type t_lea_first,@function",
    "t_lea_first:",
    "lea rax, [rdi + 7]",
    "add rax, rsi",
    "ret",
    ".size t_lea_first, .-t_lea_first",
    // RIP-relative load first: DATA + a + b
    ".p2align 4",
    ".globl t_rip_rel",
    ".type t_rip_rel,@function",
    "t_rip_rel:",
    "mov rax, qword ptr [rip + t_rip_data]",
    "add rax, rdi",
    "add rax, rsi",
    "ret",
    ".size t_rip_rel, .-t_rip_rel",
    // shorter than 5 bytes: ret at byte 1
    ".p2align 4",
    ".globl t_short",
    ".type t_short,@function",
    "t_short:",
    "nop",
    "ret",
    ".size t_short, .-t_short",
    // jmp rel8 over three bytes of the function: a + b - 3
    ".p2align 4",
    ".globl t_jmp8",
    ".type t_jmp8,@function",
    "t_jmp8:",
    ".byte 0xeb, 0x03",
    "ud2",
    "int3",
    "lea rax, [rdi + rsi]",
    "sub rax, 3",
    "ret",
    ".size t_jmp8, .-t_jmp8",
    // jmp rel8 into the bytes the patch needs: a + b
    ".p2align 4",
    ".globl t_jmp_into",
    ".type t_jmp_into,@function",
    "t_jmp_into:",
    ".byte 0xeb, 0x01",
    "nop",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size t_jmp_into, .-t_jmp_into",
    // a loop whose head is inside the first 5 bytes: a * b (b >= 1)
    ".p2align 4",
    ".globl t_loop_into",
    ".type t_loop_into,@function",
    "t_loop_into:",
    "xor eax, eax",
    ".Lt_loop_into_head:",
    "add rax, rdi",
    "dec rsi",
    "jnz .Lt_loop_into_head",
    "ret",
    ".size t_loop_into, .-t_loop_into",
    // invalid opcode first (never called)
    ".p2align 4",
    ".globl t_bad",
    ".type t_bad,@function",
    "t_bad:",
    ".byte 0x06, 0x90, 0x90, 0x90, 0x90, 0xc3",
    ".size t_bad, .-t_bad",
    // all six integer arguments: a + 2b + 3c + 4d + 5e + 6f
    ".p2align 4",
    ".globl t_sum6",
    ".type t_sum6,@function",
    "t_sum6:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + 2*rsi]",
    "lea r10, [rdx + 2*rdx]",
    "add rax, r10",
    "lea rax, [rax + 4*rcx]",
    "lea r10, [r8 + 4*r8]",
    "add rax, r10",
    "lea r10, [r9 + 2*r9]",
    "lea rax, [rax + 2*r10]",
    "ret",
    ".size t_sum6, .-t_sum6",
    // floats: (x + y) * z
    ".p2align 4",
    ".globl t_fmul",
    ".type t_fmul,@function",
    "t_fmul:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "addsd xmm0, xmm1",
    "mulsd xmm0, xmm2",
    "ret",
    ".size t_fmul, .-t_fmul",
    // for the pt_regs fields: a + b
    ".p2align 4",
    ".globl t_regs",
    ".type t_regs,@function",
    "t_regs:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size t_regs, .-t_regs",
    // nop5 at 13 mod 16: neither an 8- nor a 16-byte block holds it (int3 protocol)
    ".p2align 4",
    ".skip 13, 0xcc",
    ".globl t_unaligned",
    ".type t_unaligned,@function",
    "t_unaligned:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size t_unaligned, .-t_unaligned",
    // nop5 at 4 mod 16: only a 16-byte block holds it (cmpxchg16b)
    ".p2align 4",
    ".skip 4, 0xcc",
    ".globl t_block16",
    ".type t_block16,@function",
    "t_block16:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size t_block16, .-t_block16",
    // three functions hooked at once: a + b + 1, + 2, + 3
    ".p2align 4",
    ".globl t_multi1",
    ".type t_multi1,@function",
    "t_multi1:",
    "push rbp",
    "mov rbp, rsp",
    "lea rax, [rdi + rsi + 1]",
    "pop rbp",
    "ret",
    ".size t_multi1, .-t_multi1",
    ".p2align 4",
    ".globl t_multi2",
    ".type t_multi2,@function",
    "t_multi2:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + rsi + 2]",
    "ret",
    ".size t_multi2, .-t_multi2",
    ".p2align 4",
    ".globl t_multi3",
    ".type t_multi3,@function",
    "t_multi3:",
    "lea rax, [rdi + 3]",
    "add rax, rsi",
    "ret",
    ".size t_multi3, .-t_multi3",
    ".p2align 4",
    ".globl t_multi4",
    ".type t_multi4,@function",
    "t_multi4:",
    "push rbp",
    "mov rbp, rsp",
    "lea rax, [rdi + rsi + 4]",
    "pop rbp",
    "ret",
    ".size t_multi4, .-t_multi4",
    ".popsection",
    ".pushsection .rodata.bpftime_attach_tests,\"a\",@progbits",
    ".p2align 3",
    "t_rip_data:",
    ".quad 0x12340000",
    ".popsection",
);

const RIP_DATA: u64 = 0x1234_0000;

unsafe extern "C" {
    safe fn t_nop5(a: u64, b: u64) -> u64;
    safe fn t_nop5_override(a: u64, b: u64) -> u64;
    safe fn t_push_rbp(a: u64, b: u64) -> u64;
    safe fn t_lea_first(a: u64, b: u64) -> u64;
    safe fn t_rip_rel(a: u64, b: u64) -> u64;
    safe fn t_short(a: u64, b: u64) -> u64;
    safe fn t_jmp8(a: u64, b: u64) -> u64;
    safe fn t_jmp_into(a: u64, b: u64) -> u64;
    safe fn t_loop_into(a: u64, b: u64) -> u64;
    fn t_bad();
    safe fn t_sum6(a: u64, b: u64, c: u64, d: u64, e: u64, f: u64) -> u64;
    safe fn t_fmul(x: f64, y: f64, z: f64) -> f64;
    safe fn t_regs(a: u64, b: u64) -> u64;
    safe fn t_unaligned(a: u64, b: u64) -> u64;
    safe fn t_block16(a: u64, b: u64) -> u64;
    safe fn t_multi1(a: u64, b: u64) -> u64;
    safe fn t_multi2(a: u64, b: u64) -> u64;
    safe fn t_multi3(a: u64, b: u64) -> u64;
    safe fn t_multi4(a: u64, b: u64) -> u64;
}

/// What a counting handler saw.
#[derive(Default)]
struct Record {
    hits: AtomicU64,
    parm1: AtomicU64,
    parm2: AtomicU64,
}

extern "C" fn counting(regs: &mut PtRegs, user: *mut c_void) {
    // SAFETY: every hook using this handler passes a `&Record` that outlives the hook.
    let rec = unsafe { &*user.cast::<Record>() };
    rec.parm1.store(regs.rdi, Ordering::Relaxed);
    rec.parm2.store(regs.rsi, Ordering::Relaxed);
    rec.hits.fetch_add(1, Ordering::Relaxed);
}

fn addr(f: *const ()) -> usize {
    f as usize
}

fn code_bytes(at: usize) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: `at` is the start of one of the functions above, each followed by at least
        // 16 bytes of mapped text (other functions or padding).
        *b = unsafe { core::ptr::read_volatile((at + i) as *const u8) };
    }
    out
}

fn hook(target: usize, rec: &Record) -> Result<Hook, AttachError> {
    // SAFETY: `target` is the entry of a function defined above that nothing else modifies;
    // `counting` only reads the registers and the `Record`, which outlives the hook (the tests
    // remove the hook before `rec` goes out of scope).
    unsafe { install(target, counting, core::ptr::from_ref(rec).cast_mut().cast()) }
}

/// Native call, hooked call (result, hit count, arguments), removal, byte-for-byte restore.
fn hook_roundtrip(target: usize, f: extern "C" fn(u64, u64) -> u64, want: fn(u64, u64) -> u64) {
    let before = code_bytes(target);
    assert_eq!(f(10, 20), want(10, 20));
    let rec = Record::default();
    let h = hook(target, &rec).expect("install");
    assert_eq!(h.target(), target);
    assert_eq!(
        code_bytes(target)[0],
        0xe9,
        "patched with a jmp rel32 (stub allocated near)"
    );
    assert_eq!(f(3, 4), want(3, 4));
    assert_eq!(f(5, 6), want(5, 6));
    assert_eq!(rec.hits.load(Ordering::Relaxed), 2);
    assert_eq!(
        (
            rec.parm1.load(Ordering::Relaxed),
            rec.parm2.load(Ordering::Relaxed)
        ),
        (5, 6)
    );
    h.remove().expect("remove");
    assert_eq!(f(7, 8), want(7, 8));
    assert_eq!(rec.hits.load(Ordering::Relaxed), 2, "no hit after remove");
    assert_eq!(code_bytes(target), before, "original bytes restored");
}

#[test]
fn nop5_entry_is_hooked_and_restored() {
    hook_roundtrip(addr(t_nop5 as *const ()), t_nop5, |a, b| a + b);
}

#[test]
fn push_rbp_entry_is_hooked_and_restored() {
    hook_roundtrip(addr(t_push_rbp as *const ()), t_push_rbp, |a, b| a + 2 * b);
}

#[test]
fn lea_first_entry_is_hooked_and_restored() {
    hook_roundtrip(addr(t_lea_first as *const ()), t_lea_first, |a, b| {
        a + b + 7
    });
}

#[test]
fn rip_relative_load_reads_the_same_data_after_relocation() {
    hook_roundtrip(addr(t_rip_rel as *const ()), t_rip_rel, |a, b| {
        RIP_DATA + a + b
    });
}

#[test]
fn short_jump_over_the_patch_is_relocated() {
    hook_roundtrip(addr(t_jmp8 as *const ()), t_jmp8, |a, b| a + b - 3);
}

#[test]
fn unaligned_entry_uses_the_int3_protocol() {
    let target = addr(t_unaligned as *const ());
    assert_eq!(target % 16, 13);
    hook_roundtrip(target, t_unaligned, |a, b| a + b);
}

#[test]
fn entry_in_a_16_byte_block_is_hooked() {
    let target = addr(t_block16 as *const ());
    assert_eq!(target % 16, 4);
    hook_roundtrip(target, t_block16, |a, b| a + b);
}

#[test]
fn function_shorter_than_the_jump_is_too_short() {
    let target = addr(t_short as *const ());
    let before = code_bytes(target);
    let rec = Record::default();
    assert!(
        matches!(hook(target, &rec), Err(AttachError::TooShort { addr, len: 2, needed: 5 }) if addr == target)
    );
    assert_eq!(code_bytes(target), before);
    let _ = t_short(1, 2);
}

#[test]
fn branch_into_the_patched_bytes_is_refused() {
    let rec = Record::default();
    let into = addr(t_jmp_into as *const ());
    assert!(
        matches!(hook(into, &rec), Err(AttachError::BranchIntoPatch { target, .. }) if target == into + 3)
    );
    assert_eq!(t_jmp_into(2, 3), 5);
    let looped = addr(t_loop_into as *const ());
    assert!(
        matches!(hook(looped, &rec), Err(AttachError::BranchIntoPatch { target, .. }) if target == looped + 2)
    );
    assert_eq!(t_loop_into(6, 7), 42);
}

#[test]
fn undecodable_prologue_is_refused() {
    let rec = Record::default();
    let bad = addr(t_bad as *const ());
    assert!(matches!(hook(bad, &rec), Err(AttachError::Undecodable { at }) if at == bad));
}

#[test]
fn unmapped_address_is_refused() {
    let rec = Record::default();
    assert!(matches!(
        hook(0x10, &rec),
        Err(AttachError::NotMapped { .. })
    ));
    let data = core::ptr::from_ref(&RIP_DATA) as usize;
    assert!(matches!(
        hook(data, &rec),
        Err(AttachError::NotMapped { .. })
    ));
}

#[test]
fn second_hook_at_the_same_address_is_refused() {
    let rec = Record::default();
    let target = addr(t_multi1 as *const ());
    let h = hook(target, &rec).unwrap();
    assert!(
        matches!(hook(target, &rec), Err(AttachError::AlreadyHooked { addr }) if addr == target)
    );
    assert!(
        matches!(hook(target + 1, &rec), Err(AttachError::OverlapsHook { existing, .. }) if existing == target)
    );
    assert_eq!(t_multi1(1, 1), 3);
    assert_eq!(rec.hits.load(Ordering::Relaxed), 1);
    drop(h);
    assert_eq!(t_multi1(1, 1), 3);
    assert_eq!(rec.hits.load(Ordering::Relaxed), 1);
}

#[test]
fn several_hooks_at_once_each_count_their_own_calls() {
    let recs = [Record::default(), Record::default(), Record::default()];
    let fns: [extern "C" fn(u64, u64) -> u64; 3] = [t_multi2, t_multi3, t_multi4];
    let targets = [
        addr(t_multi2 as *const ()),
        addr(t_multi3 as *const ()),
        addr(t_multi4 as *const ()),
    ];
    let before = targets.map(code_bytes);
    let mut hooks: Vec<Option<Hook>> = targets
        .iter()
        .zip(&recs)
        .map(|(&t, r)| Some(hook(t, r).unwrap()))
        .collect();
    for (i, f) in fns.iter().enumerate() {
        for _ in 0..=i {
            f(1, 2);
        }
    }
    assert_eq!(
        recs.each_ref().map(|r| r.hits.load(Ordering::Relaxed)),
        [1, 2, 3]
    );
    // Remove the middle one first.
    hooks[1].take().unwrap().remove().unwrap();
    fns.iter().for_each(|f| {
        f(1, 2);
    });
    assert_eq!(
        recs.each_ref().map(|r| r.hits.load(Ordering::Relaxed)),
        [2, 2, 4]
    );
    hooks.clear();
    assert_eq!(targets.map(code_bytes), before);
    assert_eq!((t_multi2(1, 2), t_multi3(1, 2), t_multi4(1, 2)), (5, 6, 7));
}

extern "C" fn set_first_arg(regs: &mut PtRegs, _user: *mut c_void) {
    regs.rdi = 100;
}

#[test]
fn handler_changing_rdi_changes_the_argument() {
    let target = addr(t_nop5_override as *const ());
    // SAFETY: entry of a function defined above; the handler only writes rdi.
    let h = unsafe { install(target, set_first_arg, core::ptr::null_mut()) }.unwrap();
    assert_eq!(t_nop5_override(1, 2), 102);
    h.remove().unwrap();
    assert_eq!(t_nop5_override(1, 2), 3);
}

extern "C" fn clobber_everything(regs: &mut PtRegs, user: *mut c_void) {
    // Use caller-saved integer and vector registers the way ordinary code does.
    let v: Vec<f64> = (0..64)
        .map(|i| std::hint::black_box(i as f64 * 1.5))
        .collect();
    let s: f64 = v.iter().map(|x| x.sqrt()).sum();
    let text = format!("{s:.3} {}", regs.rdi);
    std::hint::black_box(text);
    counting(regs, user);
}

#[test]
fn integer_and_float_arguments_survive_a_clobbering_handler() {
    let rec = Record::default();
    let sum6 = addr(t_sum6 as *const ());
    let fmul = addr(t_fmul as *const ());
    // SAFETY: entries of functions defined above; the handler reads registers and `rec`, which
    // outlives both hooks.
    let (h1, h2) = unsafe {
        let user = core::ptr::from_ref(&rec).cast_mut().cast();
        (
            install(sum6, clobber_everything, user).unwrap(),
            install(fmul, clobber_everything, user).unwrap(),
        )
    };
    assert_eq!(t_sum6(1, 2, 3, 4, 5, 6), 1 + 4 + 9 + 16 + 25 + 36);
    assert_eq!(t_fmul(1.5, 2.25, -4.0), (1.5 + 2.25) * -4.0);
    assert_eq!(rec.hits.load(Ordering::Relaxed), 2);
    h1.remove().unwrap();
    h2.remove().unwrap();
}

/// What `record_regs` saw.
#[derive(Default)]
struct Seen {
    regs: std::sync::Mutex<PtRegs>,
    ret_addr: AtomicU64,
}

extern "C" fn record_regs(regs: &mut PtRegs, user: *mut c_void) {
    // SAFETY: the test passes a `&Seen` that outlives the hook.
    let seen = unsafe { &*user.cast::<Seen>() };
    // SAFETY: at function entry rsp points at the return address pushed by the call.
    let ret = unsafe { core::ptr::read(regs.rsp as *const u64) };
    seen.ret_addr.store(ret, Ordering::Relaxed);
    *seen.regs.lock().unwrap() = *regs;
}

#[test]
fn pt_regs_fields_describe_the_hook_site() {
    let target = addr(t_regs as *const ());
    let seen = Seen::default();
    // SAFETY: entry of a function defined above; `seen` outlives the hook.
    let h = unsafe {
        install(
            target,
            record_regs,
            core::ptr::from_ref(&seen).cast_mut().cast(),
        )
    }
    .unwrap();
    assert_eq!(t_regs(0x1111, 0x2222), 0x3333);
    h.remove().unwrap();
    let r = *seen.regs.lock().unwrap();
    assert_eq!(r.rip, target as u64);
    assert_eq!((r.rdi, r.rsi), (0x1111, 0x2222));
    assert_eq!((r.cs, r.ss, r.orig_rax), (0x33, 0x2b, u64::MAX));
    assert_eq!(r.rsp % 16, 8, "at entry rsp is 8 off 16-alignment");
    assert_ne!(r.eflags & 0x2, 0, "reserved flag bit 1 is always set");
    let ret = seen.ret_addr.load(Ordering::Relaxed);
    let maps = bpftime_attach::procmaps::read_self_maps().unwrap();
    let m = bpftime_attach::procmaps::find(&maps, ret as usize).expect("return address is mapped");
    assert!(m.exec, "return address points into code");
}
