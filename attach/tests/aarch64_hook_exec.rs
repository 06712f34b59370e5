//! The aarch64 hook engine's output, executed: every test function runs under Unicorn first
//! as written, then hooked at each of its hook points with the stub and trampoline at a near,
//! a mid-distance and a far address (with the 4-byte `b` patch and the 16-byte absolute one),
//! and the real stub calls a handler written in aarch64 (see `aarch64_support`).
//!
//! For every call the hooked run must end in exactly the same architectural state as the
//! original — all of x0–x30 (x16/x17 excepted where the far forms may use them), q0–q31, sp,
//! NZCV, FPSR — the handler must have run once, and it must have seen the registers the
//! original code had at the hooked instruction (pc, sp, pstate included). A second hooked run
//! in which the handler changes x0 and flips flags must match the original run with the same
//! change made at the hooked instruction.

mod aarch64_support;

use aarch64_support::*;
use bpftime_attach::AttachError;

/// Z: flipping it turns b.eq/b.ne and friends around.
const FLIP_Z: u64 = 1 << 30;
const DELTA: u64 = 0x1000;

/// Runs the original function to `addr` (the hook point), applies `edit` there, and
/// finishes: the state at the hook point (`None` if this call never gets there) and at the end.
fn original(
    m: &mut Machine,
    entry: u64,
    addr: u64,
    args: [u64; 2],
    edit: bool,
) -> (Option<State>, State) {
    m.reset();
    let start = State::call(args);
    let at = if addr == entry {
        start.clone()
    } else {
        m.run_to(&start, entry, &[addr, EXIT])
            .expect("run to the hook point")
    };
    if at.pc == EXIT {
        return (None, at);
    }
    let mut at = at;
    at.pc = addr;
    let mut resumed = at.clone();
    if edit {
        resumed.x[0] = resumed.x[0].wrapping_add(DELTA);
        resumed.nzcv ^= FLIP_Z;
    }
    let end = m.run(&resumed, addr, EXIT).expect("original run");
    (Some(at), end)
}

#[test]
fn hooked_functions_behave_like_the_originals() {
    let img = image();
    let mut m = Machine::new(&img.bytes);
    let mut runs = 0;
    let mut refused = 0;
    let mut unreached = 0;
    let mut bad = Vec::new();
    for case in &img.cases {
        for &(addr, sixteen) in &case.hooks {
            for place in PLACEMENTS {
                let what = format!(
                    "{} hooked at +{:#x}, {}",
                    case.name,
                    addr - case.entry,
                    place.name
                );
                let needs16 = place.absolute || place.stub == FAR;
                let hook = match hook_for(&img.bytes, addr, place) {
                    Ok(h) if needs16 && !sixteen => {
                        bad.push(format!(
                            "{what}: patched ({} bytes), should be refused",
                            h.patch.len()
                        ));
                        continue;
                    }
                    Ok(h) => h,
                    Err(AttachError::TooShort { .. } | AttachError::Unrelocatable { .. })
                        if needs16 && !sixteen =>
                    {
                        refused += 1;
                        continue;
                    }
                    Err(e) => {
                        bad.push(format!("{what}: {e}"));
                        continue;
                    }
                };
                assert_eq!(hook.patch.len(), if needs16 { 16 } else { 4 }, "{what}");
                // Only the near b-patch relocation is free of x16/x17 veneers.
                let scratch = place != PLACEMENTS[0];
                for &args in &case.inputs {
                    for edit in [false, true] {
                        let (at, want) = original(&mut m, case.entry, addr, args, edit);
                        m.reset();
                        m.install(addr, place.stub, &hook);
                        if edit {
                            m.write_u64(USER + USER_DELTA, DELTA);
                            m.write_u64(USER + USER_FLIP, FLIP_Z);
                        }
                        let got = match m.run(&State::call(args), case.entry, EXIT) {
                            Ok(s) => s,
                            Err(e) => {
                                bad.push(format!("{what} {args:?}: {e}"));
                                continue;
                            }
                        };
                        runs += 1;
                        let mut d = got.diff(&want, scratch);
                        let hits = m.read_u64(USER + USER_HITS);
                        let Some(at) = at else {
                            if hits != 0 {
                                d.push(format!(
                                    "{hits} handler hits for a call that never gets there"
                                ));
                            }
                            unreached += 1;
                            if !d.is_empty() {
                                bad.push(format!("{what} {args:?}: {}", d.join("; ")));
                            }
                            continue;
                        };
                        if hits != 1 {
                            d.push(format!("{hits} handler hits"));
                        }
                        let seen: Vec<u64> = (0..34)
                            .map(|i| m.read_u64(USER + USER_REGS + 8 * i))
                            .collect();
                        for n in 0..31 {
                            // The 16-byte patch loads the stub address into x16 first.
                            if n == 16 && hook.patch.len() == 16 {
                                if seen[16] != place.stub {
                                    d.push(format!(
                                        "handler saw x16 = {:#x}, not the stub",
                                        seen[16]
                                    ));
                                }
                                continue;
                            }
                            if seen[n] != at.x[n] {
                                d.push(format!(
                                    "handler saw x{n} = {:#x}, not {:#x}",
                                    seen[n], at.x[n]
                                ));
                            }
                        }
                        for (i, name, v) in
                            [(31, "sp", at.sp), (32, "pc", addr), (33, "pstate", at.nzcv)]
                        {
                            if seen[i] != v {
                                d.push(format!("handler saw {name} = {:#x}, not {v:#x}", seen[i]));
                            }
                        }
                        if !d.is_empty() {
                            bad.push(format!("{what} {args:?} edit={edit}: {}", d.join("; ")));
                        }
                    }
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} failures in {runs} runs:\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert!(refused > 0);
    println!(
        "{runs} hooked runs matched their originals ({unreached} never reached the hook); \
         {refused} 16-byte patches refused"
    );
}
