//! Readiness of ring buffer maps and perf events for `epoll` and `poll`, without polling.
//!
//! The placeholder fd of a `BPF_MAP_TYPE_RINGBUF` map or a `PERF_COUNT_SW_BPF_OUTPUT` perf event
//! is an abstract `AF_UNIX` datagram socket ([`bpftime_maps::wake::WakeSocket`]): producers in
//! any process wake it with one `sendto` when its consumer is asleep. The loader adds it to its
//! epoll set as it would the kernel's fd (`epoll_ctl` passes through; we note which of our fds
//! are in which set). Before each wait on such a set (`epoll_wait`, `epoll_pwait`,
//! `epoll_pwait2`, `poll`, `ppoll`), the interposer:
//!
//! 1. drains stale wake-ups of each of our fds in the set,
//! 2. arms its buffer (stores the socket's nonce and `armed = 1` in the buffer's wake slot),
//! 3. checks whether a record is readable now, and if so makes the socket readable itself,
//!
//! then runs the real wait and disarms afterwards. A producer that publishes after step 3 sees
//! `armed` (see `bpftime_maps::wake` for the ordering argument) and wakes the socket, so the
//! wait returns within one `sendto` → epoll wake-up, and a consumer with nothing to read sleeps
//! in the kernel: no timer, no busy loop. Level-triggered readiness follows the kernel's
//! (readable while unread records exist), except that a ring buffer whose next record is still
//! being written is not reported readable (the kernel reports it and libbpf then spins until
//! the record is committed).
//!
//! `select`/`pselect` and nested epoll sets are not armed (a waiter there relies on its
//! timeout); libbpf, bcc and bpftrace use `epoll_wait` and `poll`.

use crate::emu::{Emulator, FdEntry};
use bpftime_maps::perf_array;
use bpftime_maps::ringbuf::RingBuf;
use bpftime_maps::store::ObjectKind;
use bpftime_maps::{Map, wake};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// Which of our waking fds each epoll set watches.
#[derive(Debug, Default)]
pub(crate) struct EpollTable {
    sets: Mutex<HashMap<RawFd, Vec<RawFd>>>,
    /// Set once any waking fd was handed out in this process (fast path for everyone else).
    pub(crate) any_waking: AtomicBool,
}

/// One buffer armed for a wait.
#[derive(Debug)]
pub struct Armed {
    target: Target,
}

#[derive(Debug)]
enum Target {
    Ring(Map),
    Perf(u32),
}

/// `EPOLL_CTL_ADD`, `EPOLL_CTL_DEL`.
const ADD: i32 = 1;
const DEL: i32 = 2;

impl Emulator {
    /// Whether anything here needs the wait interposers (a waking fd was ever handed out).
    pub fn has_waking_fds(&self) -> bool {
        self.epolls.any_waking.load(Ordering::Relaxed)
    }

    /// After a successful `epoll_ctl(epfd, op, fd, …)`: remembers which of our waking fds are
    /// in which set.
    pub fn epoll_ctl_done(&self, epfd: RawFd, op: i32, fd: RawFd) {
        if !self.has_waking_fds() {
            return;
        }
        match op {
            ADD if self.entry(fd).is_some_and(|e| e.wake != 0) => {
                let mut sets = self.epolls.sets.lock();
                let v = sets.entry(epfd).or_default();
                if !v.contains(&fd) {
                    v.push(fd);
                }
            }
            DEL => {
                let mut sets = self.epolls.sets.lock();
                if let Some(v) = sets.get_mut(&epfd) {
                    v.retain(|&f| f != fd);
                    if v.is_empty() {
                        sets.remove(&epfd);
                    }
                }
            }
            _ => {}
        }
    }

    /// Whether `fd` is an epoll set we track (so `close` forgets it).
    pub fn is_tracked_epoll(&self, fd: RawFd) -> bool {
        self.has_waking_fds() && self.epolls.sets.lock().contains_key(&fd)
    }

    /// `fd` was closed: forget it as a set and as a member.
    pub fn epoll_fd_closed(&self, fd: RawFd) {
        if !self.has_waking_fds() {
            return;
        }
        let mut sets = self.epolls.sets.lock();
        sets.remove(&fd);
        sets.retain(|_, v| {
            v.retain(|&f| f != fd);
            !v.is_empty()
        });
    }

    /// Before `epoll_wait(epfd, …)`: arms the buffers of our fds in the set.
    pub fn before_epoll_wait(&self, epfd: RawFd) -> Vec<Armed> {
        if !self.has_waking_fds() {
            return Vec::new();
        }
        let fds = match self.epolls.sets.lock().get(&epfd) {
            Some(v) => v.clone(),
            None => return Vec::new(),
        };
        self.arm_fds(&fds)
    }

    /// Before `poll(fds, …)`: arms the buffers of our fds among `fds` that wait for input.
    pub fn before_poll(&self, fds: &[RawFd]) -> Vec<Armed> {
        if !self.has_waking_fds() {
            return Vec::new();
        }
        self.arm_fds(fds)
    }

    fn arm_fds(&self, fds: &[RawFd]) -> Vec<Armed> {
        let mut out = Vec::new();
        for &fd in fds {
            let Some(e) = self.entry(fd).filter(|e| e.wake != 0) else {
                continue;
            };
            if let Some(a) = self.arm_one(fd, &e) {
                out.push(a);
            }
        }
        out
    }

    fn arm_one(&self, fd: RawFd, e: &FdEntry) -> Option<Armed> {
        // Stale wake-ups first: a wake-up sent after arming must survive until the wait.
        wake::drain(fd);
        let (target, ready) = match e.kind {
            ObjectKind::Map => {
                let m = Map::open(&self.store, e.id).ok()?;
                let ready = RingBuf::new(&m).ok()?.arm(e.wake);
                (Target::Ring(m), ready)
            }
            ObjectKind::PerfEvent => {
                let ready = perf_array::event_ring(&self.store, e.id)?.arm(e.wake);
                (Target::Perf(e.id), ready)
            }
            _ => return None,
        };
        if ready {
            wake::signal(e.wake);
        }
        Some(Armed { target })
    }

    /// After the wait: producers stop sending wake-ups.
    pub fn after_wait(&self, armed: Vec<Armed>) {
        for a in armed {
            match a.target {
                Target::Ring(m) => {
                    if let Ok(rb) = RingBuf::new(&m) {
                        rb.disarm();
                    }
                }
                Target::Perf(id) => {
                    if let Some(r) = perf_array::event_ring(&self.store, id) {
                        r.disarm();
                    }
                }
            }
        }
    }
}
