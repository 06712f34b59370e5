//! Where a library executes `syscall`, and which bytes around each such instruction can be
//! replaced by a jump (pure: works on the ELF file's bytes, tested on this machine's libc).
//!
//! Every executable section is decoded linearly with iced-x86 (glibc keeps no data in its
//! text; padding decodes as `nop`/`int3`), collecting the target of every direct branch and
//! call. For each `syscall` instruction a *window* of at least 5 bytes is chosen:
//!
//! - forward, `[syscall, following instructions…]` — the syscall instruction itself may be a
//!   branch target, none of the following may be, and control may leave only at the last
//!   one (`syscall; cmp rax, -4095; jae …` — most of glibc);
//! - else backward, `[preceding instructions…, syscall]` — neither the syscall nor any
//!   instruction after the first may be a branch target (`mov eax, N; syscall; ret`).
//!
//! The number is known statically when a `mov eax, imm32` (or `mov rax, imm32`) writes rax in
//! the same basic block before the syscall; else it is only known when the call happens.
//! Sites of calls that must run on the caller's own stack and registers — `rt_sigreturn`
//! (unwinders also recognise `__restore_rt` by its bytes), `clone`, `clone3`, `fork`, `vfork`
//! — are never patched.

use std::collections::HashSet;
use std::path::Path;

use goblin::elf::Elf;
use goblin::elf::section_header::SHF_EXECINSTR;
use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess,
    OpKind, Register,
};

use crate::AttachError;

/// Bytes of the `jmp rel32` that replaces a window.
pub const WINDOW_MIN: usize = 5;
/// Most bytes a window may span.
pub const WINDOW_MAX: usize = 16;

/// System calls whose sites are never patched (see the module doc).
pub const NEVER_PATCHED: [u32; 5] = [
    15,  // rt_sigreturn
    56,  // clone
    57,  // fork
    58,  // vfork
    435, // clone3
];

/// A `syscall` instruction and the bytes that a jump to its stub replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// Virtual address (in the ELF file's address space) of the `syscall` instruction.
    pub syscall: u64,
    /// Virtual address of the first byte of the window.
    pub start: u64,
    /// The window's bytes as in the file (`start..start + bytes.len()`).
    pub bytes: Vec<u8>,
    /// The system call number if a `mov` in the same basic block sets it.
    pub nr: Option<u32>,
}

impl Site {
    /// One past the window.
    pub fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }
}

/// Result of scanning one ELF file.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Sites that can be patched.
    pub sites: Vec<Site>,
    /// Addresses of `syscall` instructions with no usable window (or never patched).
    pub skipped: Vec<u64>,
    /// The static number of each of `skipped`, where known.
    pub skipped_nrs: Vec<Option<u32>>,
    /// `PT_LOAD` segments: (virtual address, file offset, size in the file).
    pub segments: Vec<(u64, u64, u64)>,
}

impl Scan {
    /// The file offset of virtual address `vaddr` (libbpf's `st_value - p_vaddr + p_offset`).
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|&&(va, _, size)| va <= vaddr && vaddr < va + size)
            .map(|&(va, off, _)| vaddr - va + off)
    }
}

/// Scans the ELF file at `path`.
pub fn scan_file(path: &Path) -> Result<Scan, AttachError> {
    let bytes = std::fs::read(path).map_err(|source| AttachError::Io {
        path: path.into(),
        source,
    })?;
    let elf = Elf::parse(&bytes).map_err(|source| AttachError::Elf {
        path: path.into(),
        source,
    })?;
    let mut sections = Vec::new();
    for sh in &elf.section_headers {
        if sh.sh_flags & u64::from(SHF_EXECINSTR) == 0
            || sh.sh_type == goblin::elf::section_header::SHT_NOBITS
        {
            continue;
        }
        let (off, size) = (sh.sh_offset as usize, sh.sh_size as usize);
        if let Some(code) = off.checked_add(size).and_then(|end| bytes.get(off..end)) {
            sections.push((sh.sh_addr, code));
        }
    }
    let mut scan = scan_code(&sections);
    scan.segments = elf
        .program_headers
        .iter()
        .filter(|ph| ph.p_type == goblin::elf::program_header::PT_LOAD)
        .map(|ph| (ph.p_vaddr, ph.p_offset, ph.p_filesz))
        .collect();
    Ok(scan)
}

/// Scans code sections given as (virtual address, bytes).
pub fn scan_code(sections: &[(u64, &[u8])]) -> Scan {
    // Pass 1: branch targets and syscall instructions.
    let mut targets: HashSet<u64> = HashSet::new();
    // (section, address, the instructions the sweep decoded just before it)
    let mut syscalls: Vec<(usize, u64, Vec<Instruction>)> = Vec::new();
    for (si, &(addr, code)) in sections.iter().enumerate() {
        let mut d = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
        let mut insn = Instruction::default();
        let mut last: [Instruction; 4] = [Instruction::default(); 4];
        let mut n = 0usize;
        while d.can_decode() {
            d.decode_out(&mut insn);
            if insn.is_invalid() {
                n = 0;
                continue;
            }
            if insn.code() == Code::Syscall {
                let k = n.min(4);
                let pre = (0..k).map(|i| last[(n - k + i) % 4]).collect();
                syscalls.push((si, insn.ip(), pre));
            }
            last[n % 4] = insn;
            n += 1;
            match insn.op0_kind() {
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                    targets.insert(insn.near_branch_target());
                }
                _ => {}
            }
        }
    }
    // Pass 2: a window around each syscall.
    let mut scan = Scan::default();
    let mut info = InstructionInfoFactory::new();
    for (si, at, pre) in syscalls {
        let (addr, code) = sections[si];
        match window(addr, code, at, &pre, &targets, &mut info) {
            Some(site) if site.nr.is_none_or(|n| !NEVER_PATCHED.contains(&n)) => {
                scan.sites.push(site)
            }
            other => {
                scan.skipped.push(at);
                scan.skipped_nrs.push(other.and_then(|s| s.nr));
            }
        }
    }
    scan
}

fn following(addr: u64, code: &[u8], from: u64, n: usize) -> Vec<Instruction> {
    let off = (from - addr) as usize;
    let mut d = Decoder::with_ip(64, &code[off..], from, DecoderOptions::NONE);
    let mut v = Vec::new();
    while v.len() < n && d.can_decode() {
        let insn = d.decode();
        if insn.is_invalid() {
            break;
        }
        v.push(insn);
    }
    v
}

/// Whether `insn` can be moved into a stub.
fn movable(insn: &Instruction) -> bool {
    !matches!(
        insn.flow_control(),
        FlowControl::Interrupt | FlowControl::Exception | FlowControl::XbeginXabortXend
    ) && insn.code() != Code::Syscall
}

fn writes_rax(insn: &Instruction, info: &mut InstructionInfoFactory) -> bool {
    info.info(insn).used_registers().iter().any(|u| {
        u.register().full_register() == Register::RAX
            && matches!(
                u.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            )
    })
}

fn window(
    addr: u64,
    code: &[u8],
    at: u64,
    pre: &[Instruction],
    targets: &HashSet<u64>,
    info: &mut InstructionInfoFactory,
) -> Option<Site> {
    let post = following(addr, code, at + 2, 4);
    // The number, if set in this basic block.
    let mut nr = None;
    if !targets.contains(&at) {
        for insn in pre.iter().rev() {
            if insn.flow_control() != FlowControl::Next {
                break;
            }
            if writes_rax(insn, info) {
                let imm = match insn.code() {
                    Code::Mov_r32_imm32 => Some(insn.immediate32()),
                    Code::Mov_rm64_imm32 if insn.op0_kind() == OpKind::Register => {
                        u32::try_from(insn.immediate32to64()).ok()
                    }
                    _ => None,
                };
                nr = imm;
                break;
            }
            // Control may arrive here from elsewhere, with another rax.
            if targets.contains(&insn.ip()) {
                break;
            }
        }
    }
    let make = |start: u64, end: u64| -> Option<Site> {
        let off = (start - addr) as usize;
        let bytes = code.get(off..off + (end - start) as usize)?.to_vec();
        Some(Site {
            syscall: at,
            start,
            bytes,
            nr,
        })
    };
    // Forward.
    let mut end = at + 2;
    for insn in &post {
        if end - at >= WINDOW_MIN as u64 {
            break;
        }
        if targets.contains(&insn.ip()) || !movable(insn) {
            break;
        }
        end = insn.next_ip();
        if !matches!(
            insn.flow_control(),
            FlowControl::Next | FlowControl::ConditionalBranch
        ) {
            break;
        }
    }
    if end - at >= WINDOW_MIN as u64 && end - at <= WINDOW_MAX as u64 {
        return make(at, end);
    }
    // Backward (then forward again if still short).
    if targets.contains(&at) {
        return None;
    }
    let mut start = at;
    for insn in pre.iter().rev() {
        if insn.flow_control() != FlowControl::Next || !movable(insn) {
            break;
        }
        start = insn.ip();
        if end - start >= WINDOW_MIN as u64 {
            break;
        }
        if targets.contains(&start) {
            // Control may arrive here: the window cannot start any earlier.
            break;
        }
    }
    // Prefer no instructions after the syscall when the ones before suffice.
    if at + 2 - start >= WINDOW_MIN as u64 {
        end = at + 2;
    }
    if end - start < WINDOW_MIN as u64 || end - start > WINDOW_MAX as u64 {
        return None;
    }
    // Every boundary strictly inside the window must not be a branch target.
    if pre
        .iter()
        .map(Instruction::ip)
        .chain([at])
        .chain(post.iter().map(Instruction::ip))
        .any(|b| b > start && b < end && targets.contains(&b))
    {
        return None;
    }
    make(start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(bytes: &[u8]) -> Scan {
        scan_code(&[(0x1000, bytes)])
    }

    #[test]
    fn forward_window_covers_syscall_and_the_compare_after_it() {
        // mov eax, 39; syscall; cmp rax, -4095; jae +0; ret
        let code = [
            0xb8, 0x27, 0, 0, 0, 0x0f, 0x05, 0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, 0x73, 0x00, 0xc3,
        ];
        let s = scan(&code);
        assert_eq!(s.sites.len(), 1, "{s:?}");
        let site = &s.sites[0];
        assert_eq!(
            (site.syscall, site.start, site.end()),
            (0x1005, 0x1005, 0x100d)
        );
        assert_eq!(site.nr, Some(39));
    }

    #[test]
    fn backward_window_when_syscall_is_followed_by_ret() {
        // mov eax, 39; syscall; ret
        let code = [0xb8, 0x27, 0, 0, 0, 0x0f, 0x05, 0xc3];
        let s = scan(&code);
        let site = &s.sites[0];
        assert_eq!((site.start, site.end()), (0x1000, 0x1007));
        assert_eq!(site.nr, Some(39));
    }

    #[test]
    fn a_branch_into_the_window_forbids_it_and_hides_the_number() {
        // 0: mov eax, 39; 5: syscall; 7: ret; 8: jmp 5 (branch to the syscall)
        let code = [0xb8, 0x27, 0, 0, 0, 0x0f, 0x05, 0xc3, 0xeb, 0xfb];
        let s = scan(&code);
        assert!(s.sites.is_empty(), "{s:?}");
        assert_eq!(s.skipped, vec![0x1005]);
    }

    #[test]
    fn unknown_number_when_rax_comes_from_a_register() {
        // mov rax, rdi; syscall; cmp rax, -4095; ret
        let code = [
            0x48, 0x89, 0xf8, 0x0f, 0x05, 0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, 0xc3,
        ];
        let s = scan(&code);
        assert_eq!(s.sites[0].nr, None);
        assert_eq!(s.sites[0].start, 0x1003);
    }

    #[test]
    fn clone_sites_are_never_patched() {
        // mov eax, 56; syscall; cmp rax, -4095; ret
        let code = [
            0xb8, 56, 0, 0, 0, 0x0f, 0x05, 0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, 0xc3,
        ];
        let s = scan(&code);
        assert!(s.sites.is_empty());
        assert_eq!(s.skipped, vec![0x1005]);
    }
}
