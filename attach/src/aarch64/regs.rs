//! The register context aarch64 hook handlers get: the kernel's arm64 `struct user_pt_regs`
//! (`arch/arm64/include/uapi/asm/ptrace.h`), which is what `bpf_tracing.h` casts a uprobe's
//! context to on arm64 (`__PT_REGS_CAST`), so `PT_REGS_PARM1` … read the same offsets here as
//! in the kernel.

use core::mem::{offset_of, size_of};

/// The kernel's arm64 `struct user_pt_regs`: `regs[31]`, `sp`, `pc`, `pstate`.
///
/// A handler may change `regs` and the NZCV bits of `pstate` (31:28); the hooked code
/// continues with them. Writes to `sp` and `pc` are ignored.
#[doc(alias = "user_pt_regs")]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PtRegsArm64 {
    /// x0–x30 (x29 is the frame pointer, x30 the link register).
    pub regs: [u64; 31],
    /// The stack pointer at the hooked address.
    pub sp: u64,
    /// The hooked address.
    pub pc: u64,
    /// NZCV in bits 31:28; the other bits are zero (EL0t).
    pub pstate: u64,
}

const _: () = assert!(size_of::<PtRegsArm64>() == 272);
const _: () = assert!(offset_of!(PtRegsArm64, sp) == 248);
const _: () = assert!(offset_of!(PtRegsArm64, pc) == 256);
const _: () = assert!(offset_of!(PtRegsArm64, pstate) == 264);

impl PtRegsArm64 {
    /// The `n`th integer argument of the AAPCS64 (`PT_REGS_PARM1` is `n = 1`): x0–x7.
    /// `None` for other `n`.
    #[doc(alias = "PT_REGS_PARM1")]
    pub fn parm(&self, n: usize) -> Option<u64> {
        (1..=8).contains(&n).then(|| self.regs[n - 1])
    }

    /// The return value register x0 (`PT_REGS_RC`).
    #[doc(alias = "PT_REGS_RC")]
    pub fn rc(&self) -> u64 {
        self.regs[0]
    }

    /// The link register x30 (`PT_REGS_RET`): the return address at a function entry.
    #[doc(alias = "PT_REGS_RET")]
    pub fn lr(&self) -> u64 {
        self.regs[30]
    }

    /// The frame pointer x29 (`PT_REGS_FP`).
    #[doc(alias = "PT_REGS_FP")]
    pub fn fp(&self) -> u64 {
        self.regs[29]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors_follow_the_aapcs64() {
        let mut r = PtRegsArm64::default();
        for (i, v) in r.regs.iter_mut().enumerate() {
            *v = 100 + i as u64;
        }
        assert_eq!(r.parm(1), Some(100));
        assert_eq!(r.parm(8), Some(107));
        assert_eq!(r.parm(0), None);
        assert_eq!(r.parm(9), None);
        assert_eq!((r.rc(), r.fp(), r.lr()), (100, 129, 130));
    }
}
