//! A cross-process lock that survives its holder being killed.
//!
//! The lock word (a `u64` in shared memory) is 0 when free, else the holder's identity:
//! pid in bits 0–31, the low 31 bits of its start time (clock ticks since boot, from
//! `/proc/<pid>/stat`) in bits 32–62, and bit 63 set when someone is waiting. A waiter that has
//! waited past a short timeout checks whether the holder process still exists with the same
//! start time (so a recycled pid is not mistaken for the holder); if not, it takes the lock over
//! and reports the recovery. Data guarded by this lock must therefore be kept consistent at
//! every store a holder makes (publish with one atomic store; at worst leak), because a dead
//! holder's half-done work is not rolled back.
//!
//! The uncontended path is one compare-and-swap to lock and one swap to unlock. A waiter checks
//! the word with exponentially growing pauses in between before it sleeps on the futex, so a
//! holder that releases and retakes the lock (a ring buffer producer) keeps its cache line.

use crate::shm::{futex_wait, futex_wake_all, low_half};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

const WAITERS: u64 = 1 << 63;
/// Checks of a held lock before sleeping; between two checks a waiter pauses for an
/// exponentially growing number of `pause`s, up to [`MAX_BACKOFF`].
const SPINS: u32 = 16;
/// Most `pause`s between two checks of a held lock.
const MAX_BACKOFF: u32 = 128;
const WAIT_NS: u64 = 1_000_000;

/// This process's lock identity.
fn me() -> u64 {
    static ME: OnceLock<u64> = OnceLock::new();
    *ME.get_or_init(|| {
        let pid = std::process::id();
        let start = process_start_time(pid).unwrap_or(0);
        identity(pid, start)
    })
}

fn identity(pid: u32, start: u64) -> u64 {
    u64::from(pid) | ((start & 0x7fff_ffff) << 32)
}

/// Field 22 of `/proc/<pid>/stat`: start time in clock ticks after boot.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip to the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process identified by a lock word (pid + start time) is still running.
pub fn holder_alive(word: u64) -> bool {
    let pid = (word & 0xffff_ffff) as u32;
    if pid == 0 {
        return false;
    }
    match process_start_time(pid) {
        Some(start) => identity(pid, start) == word & !WAITERS,
        // No /proc entry: dead, unless /proc itself is unreadable (then assume alive).
        None => !std::path::Path::new("/proc/self/stat").exists(),
    }
}

/// How a lock was acquired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// Normally.
    Clean,
    /// Taken over from a holder that died.
    Recovered {
        /// The dead holder's pid.
        pid: u32,
    },
}

/// Holds the lock until dropped.
#[derive(Debug)]
pub struct Guard<'a> {
    word: &'a AtomicU64,
    /// How the lock was taken.
    pub acquired: Acquired,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let prev = self.word.swap(0, Ordering::Release);
        if prev & WAITERS != 0 {
            futex_wake_all(low_half(self.word));
        }
    }
}

/// Acquires the lock at `word`.
pub fn lock(word: &AtomicU64) -> Guard<'_> {
    let me = me();
    let mut spins = 0;
    let mut backoff = 1;
    loop {
        let cur = word.load(Ordering::Relaxed);
        if cur == 0 {
            if word
                .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Guard {
                    word,
                    acquired: Acquired::Clean,
                };
            }
            continue;
        }
        if spins < SPINS {
            // Exponential backoff: a waiter that keeps reading the word takes its cache line
            // from the holder on every check, slowing down the very thread it waits for (and
            // a holder that releases and retakes the lock quickly keeps the line).
            spins += 1;
            for _ in 0..backoff {
                std::hint::spin_loop();
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        }
        // Announce a waiter and sleep a little; then check the holder is alive.
        if cur & WAITERS == 0
            && word
                .compare_exchange(cur, cur | WAITERS, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            continue;
        }
        futex_wait(low_half(word), cur as u32, WAIT_NS);
        let now = word.load(Ordering::Relaxed);
        let holder = (cur & 0xffff_ffff) as u32;
        if now == (cur | WAITERS)
            && holder != std::process::id()
            && !holder_alive(cur)
            && word
                .compare_exchange(now, me, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            return Guard {
                word,
                acquired: Acquired::Recovered { pid: holder },
            };
        }
        spins = SPINS / 2;
        backoff = 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_readable() {
        assert!(process_start_time(std::process::id()).is_some());
        assert!(holder_alive(me()));
    }

    #[test]
    fn lock_held_by_dead_process_is_recovered() {
        // A pid that cannot exist (above pid_max) with some start time.
        let word = AtomicU64::new(identity(0x7fff_fff0, 12345));
        let g = lock(&word);
        assert_eq!(g.acquired, Acquired::Recovered { pid: 0x7fff_fff0 });
        drop(g);
        assert_eq!(word.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn threads_exclude_each_other() {
        use std::sync::Arc;
        let word = Arc::new(AtomicU64::new(0));
        let counter = Arc::new(AtomicU64::new(0));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let (w, c) = (word.clone(), counter.clone());
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        let _g = lock(&w);
                        // Non-atomic read-modify-write made safe only by the lock.
                        let v = c.load(Ordering::Relaxed);
                        c.store(v + 1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(counter.load(Ordering::Relaxed), 40_000);
    }
}
