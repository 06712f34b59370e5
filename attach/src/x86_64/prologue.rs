//! Which instructions the jump overwrites, and whether moving them is safe.
//!
//! Pure functions over a byte slice and the address it came from, so every rule is unit-tested
//! on hand-written bytes.

use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, FlowControl, Instruction, OpKind};

use crate::AttachError;

/// Bytes of `jmp rel32`.
pub(crate) const JMP_REL32_LEN: usize = 5;
/// Bytes of `jmp qword ptr [rip+0]` followed by the 8-byte target.
pub(crate) const JMP_ABS_LEN: usize = 14;
/// How many bytes after the patched ones are scanned for branches into them.
pub(crate) const SCAN_LEN: usize = 4096;
/// An unconditional short jump at the start may jump over at most this many bytes that the
/// patch then overwrites (they belong to the same function: it jumps over them).
const MAX_SKIP: u64 = 128;

/// The instructions a hook moves into its trampoline.
#[derive(Debug, Clone)]
pub(crate) struct Prologue {
    /// The hooked address.
    pub addr: u64,
    /// The instructions to relocate, in order, with their original addresses.
    pub insns: Vec<Instruction>,
    /// Bytes from `addr` that belong to the hook: the relocated instructions, or, after a
    /// leading short jump, the bytes it jumps over. At least the jump's length.
    pub patch_len: usize,
    /// Where the trampoline continues after the relocated instructions (`addr + patch_len`),
    /// or `None` when the last of them never falls through (`jmp`, `ret`).
    pub resume: Option<u64>,
}

impl Prologue {
    /// `(index, offset)` of every relocated instruction that starts inside the patched bytes
    /// rather than at `addr`: a thread suspended there must be moved to the trampoline.
    pub(crate) fn inner_boundaries(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.insns
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, insn)| (i, (insn.ip() - self.addr) as usize))
    }
}

/// Decodes instructions at `addr` (`code` holds the bytes from `addr`, up to the end of its
/// mapping or [`SCAN_LEN`] more) until at least `needed` bytes are covered, and checks that
/// they can be moved.
pub(crate) fn analyze(addr: u64, code: &[u8], needed: usize) -> Result<Prologue, AttachError> {
    let at = |ip: u64| ip as usize;
    let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut insns = Vec::new();
    let mut len = 0usize;
    let mut patch_len = None;
    let mut resume = true;
    while len < needed {
        if !decoder.can_decode() {
            return Err(AttachError::TooShort {
                addr: at(addr),
                len,
                needed,
            });
        }
        let insn = decoder.decode();
        if insn.is_invalid() {
            return Err(match decoder.last_error() {
                DecoderError::NoMoreBytes => AttachError::TooShort {
                    addr: at(addr),
                    len,
                    needed,
                },
                _ => AttachError::Undecodable { at: at(insn.ip()) },
            });
        }
        let end = len + insn.len();
        let last = end >= needed;
        match insn.flow_control() {
            FlowControl::Next | FlowControl::ConditionalBranch => {}
            _ if insn.code() == Code::Syscall => {}
            FlowControl::Call | FlowControl::IndirectCall if !last => {
                // A thread inside the callee would return into the middle of the patch.
                return Err(AttachError::Unrelocatable {
                    at: at(insn.ip()),
                    reason: "call before the end of the patched bytes",
                });
            }
            FlowControl::Call | FlowControl::IndirectCall => {}
            FlowControl::UnconditionalBranch if !last => {
                let target = branch_target(&insn).unwrap_or(0);
                if target > addr && target < addr + needed as u64 {
                    return Err(AttachError::BranchIntoPatch {
                        addr: at(addr),
                        branch: at(insn.ip()),
                        target: at(target),
                    });
                }
                if target >= addr + needed as u64 && target <= insn.next_ip() + MAX_SKIP {
                    insns.push(insn);
                    patch_len = Some(needed);
                    resume = false;
                    break;
                }
                return Err(AttachError::TooShort {
                    addr: at(addr),
                    len: end,
                    needed,
                });
            }
            FlowControl::UnconditionalBranch
            | FlowControl::IndirectBranch
            | FlowControl::Return
                if last =>
            {
                resume = false;
            }
            FlowControl::UnconditionalBranch
            | FlowControl::IndirectBranch
            | FlowControl::Return => {
                return Err(AttachError::TooShort {
                    addr: at(addr),
                    len: end,
                    needed,
                });
            }
            FlowControl::Interrupt | FlowControl::Exception => {
                return Err(AttachError::TooShort {
                    addr: at(addr),
                    len,
                    needed,
                });
            }
            FlowControl::XbeginXabortXend => {
                return Err(AttachError::Unrelocatable {
                    at: at(insn.ip()),
                    reason: "transactional memory instruction",
                });
            }
        }
        insns.push(insn);
        len = end;
    }
    let patch_len = patch_len.unwrap_or(len);
    let inside = |t: u64| t > addr && t < addr + patch_len as u64;

    for insn in &insns {
        if let Some(t) = branch_target(insn).filter(|&t| inside(t)) {
            return Err(AttachError::BranchIntoPatch {
                addr: at(addr),
                branch: at(insn.ip()),
                target: at(t),
            });
        }
    }
    // The rest of the function (and, harmlessly, whatever follows it) must not jump into the
    // patched bytes either; only direct branches can be checked.
    let rest = code.get(patch_len..).unwrap_or_default();
    let rest = &rest[..rest.len().min(SCAN_LEN)];
    let mut scan = Decoder::with_ip(64, rest, addr + patch_len as u64, DecoderOptions::NONE);
    for insn in &mut scan {
        if let Some(t) = branch_target(&insn).filter(|&t| inside(t)) {
            return Err(AttachError::BranchIntoPatch {
                addr: at(addr),
                branch: at(insn.ip()),
                target: at(t),
            });
        }
    }
    let resume = resume.then_some(addr + patch_len as u64);
    Ok(Prologue {
        addr,
        insns,
        patch_len,
        resume,
    })
}

/// Checks a whole function for control flow into the patched bytes `(addr, addr + patch_len)`:
/// `func` holds the function's bytes from its first byte `start`. Any direct branch into them
/// is [`AttachError::BranchIntoPatch`]. When `addr` is not the function's entry, an indirect
/// jump through a register or an indexed table (a `switch` jump table; its targets are
/// unknown) is [`AttachError::UnknownBranchTargets`]; indirect jumps through a single memory
/// slot (`jmp [rip + got]`, tail calls) are not.
pub(crate) fn check_function(
    addr: u64,
    patch_len: usize,
    start: u64,
    func: &[u8],
) -> Result<(), AttachError> {
    let inside = |t: u64| t > addr && t < addr + patch_len as u64;
    let mut decoder = Decoder::with_ip(64, func, start, DecoderOptions::NONE);
    for insn in &mut decoder {
        if insn.is_invalid() {
            // Data in the text, or the end of what we were given: nothing more to learn.
            break;
        }
        if let Some(t) = branch_target(&insn).filter(|&t| inside(t)) {
            return Err(AttachError::BranchIntoPatch {
                addr: addr as usize,
                branch: insn.ip() as usize,
                target: t as usize,
            });
        }
        if addr != start
            && insn.flow_control() == FlowControl::IndirectBranch
            && is_table_jump(&insn)
        {
            return Err(AttachError::UnknownBranchTargets {
                addr: addr as usize,
                branch: insn.ip() as usize,
            });
        }
    }
    Ok(())
}

/// `jmp reg` or `jmp [base + index*scale]`: the shapes compilers emit for jump tables.
fn is_table_jump(insn: &Instruction) -> bool {
    match insn.op0_kind() {
        OpKind::Register => true,
        OpKind::Memory => {
            insn.memory_index() != iced_x86::Register::None
                || (insn.memory_base() != iced_x86::Register::RIP
                    && insn.memory_base() != iced_x86::Register::None)
        }
        _ => false,
    }
}

/// The target of a direct near branch (`jmp`, `jcc`, `call`, `loop`, `jrcxz`, `xbegin`).
fn branch_target(insn: &Instruction) -> Option<u64> {
    match insn.op0_kind() {
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
            Some(insn.near_branch_target())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDR: u64 = 0x40_0000;

    fn analyze5(bytes: &[u8]) -> Result<Prologue, AttachError> {
        analyze(ADDR, bytes, JMP_REL32_LEN)
    }

    fn offsets(p: &Prologue) -> Vec<usize> {
        p.insns.iter().map(|i| (i.ip() - ADDR) as usize).collect()
    }

    #[test]
    fn nop5_is_one_instruction() {
        let p = analyze5(&[0x0f, 0x1f, 0x44, 0x00, 0x00, 0xc3]).unwrap();
        assert_eq!(
            (offsets(&p), p.patch_len, p.resume),
            (vec![0], 5, Some(ADDR + 5))
        );
        assert_eq!(p.inner_boundaries().count(), 0);
    }

    #[test]
    fn push_rbp_prologue_takes_three_instructions() {
        // push rbp; mov rbp,rsp; sub rsp,0x10; ...
        let p = analyze5(&[0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10, 0xc9, 0xc3]).unwrap();
        assert_eq!((offsets(&p), p.patch_len), (vec![0, 1, 4], 8));
        assert_eq!(
            p.inner_boundaries().collect::<Vec<_>>(),
            vec![(1, 1), (2, 4)]
        );
    }

    #[test]
    fn endbr64_then_push_covers_five_bytes() {
        let p = analyze5(&[0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5, 0xc3]).unwrap();
        assert_eq!((offsets(&p), p.patch_len), (vec![0, 4], 5));
    }

    #[test]
    fn ret_or_int3_before_five_bytes_is_too_short() {
        for bytes in [
            &[0x90, 0xc3, 0xcc, 0xcc, 0xcc, 0xcc][..],
            &[0x31, 0xc0, 0xc3, 0xcc, 0xcc, 0xcc],
            &[0xcc; 8],
            &[0x0f, 0x0b, 0, 0, 0, 0],
        ] {
            assert!(
                matches!(analyze5(bytes), Err(AttachError::TooShort { .. })),
                "{bytes:x?}"
            );
        }
    }

    #[test]
    fn ret_ending_exactly_at_five_bytes_is_fine() {
        // xor eax,eax; inc eax (ff c0); ret
        let p = analyze5(&[0x31, 0xc0, 0xff, 0xc0, 0xc3, 0xcc]).unwrap();
        assert_eq!((p.patch_len, p.resume), (5, None));
    }

    #[test]
    fn too_few_bytes_is_too_short() {
        assert!(matches!(
            analyze5(&[0x55, 0x48]),
            Err(AttachError::TooShort { .. })
        ));
    }

    #[test]
    fn invalid_opcode_is_undecodable() {
        // 0x06 (push es) does not exist in 64-bit mode.
        assert!(
            matches!(analyze5(&[0x06, 0x90, 0x90, 0x90, 0x90]), Err(AttachError::Undecodable { at }) if at == ADDR as usize)
        );
    }

    #[test]
    fn short_jmp_over_the_patch_owns_the_skipped_bytes() {
        // jmp +3; ud2; int3; <target>
        let p = analyze5(&[0xeb, 0x03, 0x0f, 0x0b, 0xcc, 0xc3]).unwrap();
        assert_eq!((offsets(&p), p.patch_len, p.resume), (vec![0], 5, None));
    }

    #[test]
    fn short_jmp_into_the_patch_is_refused() {
        // jmp +1; nop; <target at 3>; nop; nop; ret
        assert!(
            matches!(analyze5(&[0xeb, 0x01, 0x90, 0x90, 0x90, 0xc3]), Err(AttachError::BranchIntoPatch { target, .. }) if target == ADDR as usize + 3)
        );
        // A backward jmp at the start leaves the bytes after it unknown.
        assert!(matches!(
            analyze5(&[0xeb, 0xfe, 0x90, 0x90, 0x90, 0xc3]),
            Err(AttachError::TooShort { .. })
        ));
        // jcc into the patch
        let bytes = [0x85, 0xff, 0x74, 0x00, 0x90, 0x90, 0xc3];
        assert!(
            matches!(analyze5(&bytes), Err(AttachError::BranchIntoPatch { target, .. }) if target == ADDR as usize + 4)
        );
    }

    #[test]
    fn later_loop_back_into_the_patch_is_refused() {
        // xor eax,eax; L: add eax,edi (01 f8); dec esi (ff ce); jnz L (75 fa); ret
        let bytes = [0x31, 0xc0, 0x01, 0xf8, 0xff, 0xce, 0x75, 0xfa, 0xc3];
        assert!(
            matches!(analyze5(&bytes), Err(AttachError::BranchIntoPatch { branch, target, .. })
            if branch == ADDR as usize + 6 && target == ADDR as usize + 2)
        );
    }

    #[test]
    fn call_in_the_middle_is_refused_but_last_is_fine() {
        // push rbp; call rel32; ...
        let mid = [0x55, 0xe8, 0, 0, 0, 0, 0xc3];
        // call at offset 1 ends at 6 >= 5: it is the last instruction, allowed.
        assert!(analyze5(&mid).is_ok());
        // nop; call rel32 ends at 6... also last. A call ending before 5: call rax (ff d0) at 0.
        let early = [0xff, 0xd0, 0x90, 0x90, 0x90, 0xc3];
        assert!(matches!(
            analyze5(&early),
            Err(AttachError::Unrelocatable { .. })
        ));
    }

    #[test]
    fn function_scan_finds_branches_from_before_the_probe() {
        // f: test edi,edi; je L; nop; L(+5): mov eax,1; add eax,edi; ret
        let f = [
            0x85, 0xff, 0x74, 0x01, 0x90, 0xb8, 0x01, 0, 0, 0, 0x01, 0xf8, 0xc3,
        ];
        // Probing at +4 (the nop): the je from +2 lands at +5, inside [+4, +9).
        assert!(matches!(
            check_function(ADDR + 4, 5, ADDR, &f),
            Err(AttachError::BranchIntoPatch { branch, target, .. })
                if branch == ADDR as usize + 2 && target == ADDR as usize + 5
        ));
        // Probing at +5: the je targets the probe address itself, which is fine.
        assert!(check_function(ADDR + 5, 5, ADDR, &f).is_ok());
    }

    #[test]
    fn jump_tables_make_mid_function_targets_unknown() {
        // lea rax,[rip+0]; movsxd rdx,[rax+rdi*4]; add rdx,rax; jmp rdx; ret
        let f = [
            0x48, 0x8d, 0x05, 0, 0, 0, 0, 0x48, 0x63, 0x14, 0xb8, 0x48, 0x01, 0xc2, 0xff, 0xe2,
            0xc3,
        ];
        assert!(matches!(
            check_function(ADDR + 7, 5, ADDR, &f),
            Err(AttachError::UnknownBranchTargets { branch, .. }) if branch == ADDR as usize + 14
        ));
        // At the entry a jump table cannot target the prologue.
        assert!(check_function(ADDR, 7, ADDR, &f).is_ok());
        // jmp [rip+x] (a tail call through the GOT) is not a table.
        let g = [0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0xff, 0x25, 0, 0, 0, 0];
        assert!(check_function(ADDR + 1, 5, ADDR, &g).is_ok());
    }

    #[test]
    fn fourteen_byte_patch_needs_fourteen_bytes() {
        let bytes = [
            0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10, 0x89, 0x7d, 0xfc, 0x89, 0x75, 0xf8,
            0x8b, 0x45, 0xfc, 0xc9, 0xc3,
        ];
        let p = analyze(ADDR, &bytes, JMP_ABS_LEN).unwrap();
        assert_eq!(p.patch_len, 14);
        assert!(matches!(
            analyze(ADDR, &bytes[..10], JMP_ABS_LEN),
            Err(AttachError::TooShort { .. })
        ));
    }
}
