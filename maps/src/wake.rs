//! Cross-process wake-ups for ring buffers and perf buffers: a producer in any process wakes a
//! consumer that sleeps in `epoll_wait`/`poll` on a real file descriptor.
//!
//! # Design
//!
//! The consumer's fd is an `AF_UNIX` datagram socket bound to an *abstract* address named after
//! a random 64-bit nonce (`bpftime-wake-<uid>-<nonce>`), so any process of the user can reach it
//! by name with one `sendto`, no file system entry is left behind by a killed process, and the
//! kernel's epoll sees a readable fd as soon as a datagram is queued (one hop: the producer's
//! `sendto` wakes the consumer's `epoll_wait` directly).
//!
//! Every buffer has a 16-byte *wake slot* in the store: `armed: u32` at 0 and `nonce: u64` at 8.
//! The protocol is an eventcount, so a producer pays one load per record and a system call only
//! when a consumer is actually asleep:
//!
//! - consumer, before sleeping ([`arm`]): store its nonce, store `armed = 1` (SeqCst), then check
//!   for data; if there is some, make its own socket readable ([`signal`]) so the wait returns at
//!   once, else drain stale datagrams ([`drain`]) and sleep. After waking: [`disarm`].
//! - producer, after publishing a record with a SeqCst store or RMW ([`notify`]): if
//!   `armed != 0`, swap it to 0 and send one datagram to the nonce's socket.
//!
//! SeqCst on both sides orders "publish, then read `armed`" against "set `armed`, then read the
//! data": either the consumer sees the record, or the producer sees the consumer armed. A
//! spurious datagram (another user's process can send to an abstract name) only causes a
//! spurious wake-up, never a lost or wrong record.
//!
//! The syscall-server arms on behalf of unmodified loaders inside its `epoll_wait` and `poll`
//! interposers; in-process consumers (tests, the Wasm host) use [`WakeSocket::wait`].

use crate::shm::{self, Segment};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Offset of `armed` (u32) in a wake slot.
pub const SLOT_ARMED: u64 = 0;
/// Offset of the sleeping consumer's nonce (u64) in a wake slot.
pub const SLOT_NONCE: u64 = 8;
/// Bytes of a wake slot.
pub const SLOT_LEN: u64 = 16;

/// Longest abstract name we build.
const NAME_MAX: usize = 48;

/// The abstract socket name of `nonce` for this user, and its length.
fn name(nonce: u64) -> ([u8; NAME_MAX], usize) {
    let s = format!("bpftime-wake-{}-{nonce:016x}", shm::euid());
    let mut b = [0u8; NAME_MAX];
    let n = s.len().min(NAME_MAX);
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
    (b, n)
}

fn random_nonce() -> u64 {
    // RandomState is seeded from the OS's randomness; mix in time and pid so two sockets made
    // by one thread differ too.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(shm::monotonic_raw_ns());
    h.write_u32(std::process::id());
    h.finish() | 1
}

/// The consumer end of a wake-up channel: a bound, non-blocking datagram socket.
#[derive(Debug)]
pub struct WakeSocket {
    fd: OwnedFd,
    nonce: u64,
}

impl WakeSocket {
    /// Binds a socket under a fresh random name.
    pub fn new() -> io::Result<WakeSocket> {
        for _ in 0..16 {
            let nonce = random_nonce();
            let (n, len) = name(nonce);
            match shm::dgram_socket(Some(&n[..len])) {
                Ok(fd) => return Ok(WakeSocket { fd, nonce }),
                Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::from_raw_os_error(libc::EADDRINUSE))
    }

    /// The nonce producers use to reach this socket.
    pub fn nonce(&self) -> u64 {
        self.nonce
    }

    /// The socket's fd (readable when woken).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Gives up ownership of the socket (the syscall-server hands it to the loader as the
    /// placeholder fd of a ring buffer map or perf event).
    pub fn into_parts(self) -> (OwnedFd, u64) {
        (self.fd, self.nonce)
    }

    /// Waits up to `timeout_ms` (-1: forever) until woken; drains the wake-ups. True if woken.
    pub fn wait(&self, timeout_ms: i32) -> bool {
        let woke = shm::poll_readable(self.fd(), timeout_ms);
        drain(self.fd());
        woke
    }
}

/// The process-wide unbound socket producers send from (made on first use).
fn sender() -> Option<RawFd> {
    static S: OnceLock<Option<OwnedFd>> = OnceLock::new();
    S.get_or_init(|| shm::dgram_socket(None).ok())
        .as_ref()
        .map(|f| f.as_raw_fd())
}

/// Makes the socket of `nonce` readable (one datagram). False if nobody holds it.
pub fn signal(nonce: u64) -> bool {
    let Some(fd) = sender() else {
        return false;
    };
    let (n, len) = name(nonce);
    match shm::dgram_send(fd, &n[..len]) {
        Ok(()) => true,
        // A full queue is readable already.
        Err(e) => e.raw_os_error() == Some(libc::EAGAIN),
    }
}

/// Discards every queued wake-up of socket `fd`.
pub fn drain(fd: RawFd) {
    shm::dgram_drain(fd);
}

fn slot(seg: &Segment, off: u64) -> Option<(&AtomicU32, &AtomicU64)> {
    Some((
        seg.atomic_u32(off + SLOT_ARMED)?,
        seg.atomic_u64(off + SLOT_NONCE)?,
    ))
}

/// Consumer: announces that the socket `nonce` is about to sleep on the buffer whose wake slot
/// is at `off`. The caller then checks for data (and signals itself if there is some).
pub fn arm(seg: &Segment, off: u64, nonce: u64) {
    if let Some((armed, n)) = slot(seg, off) {
        if n.load(Ordering::Relaxed) != nonce {
            n.store(nonce, Ordering::SeqCst);
        }
        armed.store(1, Ordering::SeqCst);
    }
}

/// Consumer: no longer asleep (producers stop sending wake-ups).
pub fn disarm(seg: &Segment, off: u64) {
    if let Some((armed, _)) = slot(seg, off)
        && armed.load(Ordering::Relaxed) != 0
    {
        armed.store(0, Ordering::Relaxed);
    }
}

/// Producer: after publishing data with a SeqCst store or read-modify-write, wakes the
/// consumer if it is asleep (or always when `force`, as `BPF_RB_FORCE_WAKEUP`). True if a
/// wake-up was sent.
#[inline]
pub fn notify(seg: &Segment, off: u64, force: bool) -> bool {
    // Fast path (nobody asleep): one load of a line the consumer rarely writes.
    let Some(armed) = seg.atomic_u32(off + SLOT_ARMED) else {
        return false;
    };
    if !force && armed.load(Ordering::SeqCst) == 0 {
        return false;
    }
    if armed.swap(0, Ordering::SeqCst) == 0 && !force {
        return false; // another producer sent it
    }
    let Some(n) = seg.atomic_u64(off + SLOT_NONCE) else {
        return false;
    };
    match n.load(Ordering::Acquire) {
        0 => false,
        nonce => signal(nonce),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_makes_the_socket_readable_and_drain_clears_it() {
        let s = WakeSocket::new().unwrap();
        assert!(!shm::poll_readable(s.fd(), 0));
        assert!(signal(s.nonce()));
        assert!(shm::poll_readable(s.fd(), 1000));
        drain(s.fd());
        assert!(!shm::poll_readable(s.fd(), 0));
        assert!(!signal(s.nonce() ^ 2), "nobody holds that name");
    }

    #[test]
    fn two_sockets_get_different_names() {
        let a = WakeSocket::new().unwrap();
        let b = WakeSocket::new().unwrap();
        assert_ne!(a.nonce(), b.nonce());
    }
}
