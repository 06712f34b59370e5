//! Ring buffer maps and `BPF_OUTPUT` perf events through the emulation: the errnos and mmap
//! rules measured on kernel 6.18, the kernel's memory layouts as a loader maps them, epoll/poll
//! readiness through the placeholder fds, and object lifetimes.

use bpftime_maps::perf_array::{self, PERF_RECORD_SAMPLE};
use bpftime_maps::ringbuf::{BPF_RB_CONS_POS, RingBuf};
use bpftime_maps::{Map, Store};
use bpftime_syscall_server::uapi::*;
use bpftime_syscall_server::{Emulator, Errno};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use zerocopy::IntoBytes;

const PAGE: u64 = 4096;
const ENOTSUPP: Errno = Errno(524);
const EINVAL: Errno = Errno(libc::EINVAL);
const EPERM: Errno = Errno(libc::EPERM);
const EBADF: Errno = Errno(libc::EBADF);
const E2BIG: Errno = Errno(libc::E2BIG);
const ENOENT: Errno = Errno(libc::ENOENT);

struct Fixture {
    emu: Option<Emulator>,
    path: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "bpftime-ssrb-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let store = Arc::new(Store::open(&path).unwrap());
        Fixture {
            emu: Some(Emulator::new(store)),
            path,
        }
    }

    fn emu(&self) -> &Emulator {
        self.emu.as_ref().unwrap()
    }

    fn bpf<T: IntoBytes + zerocopy::Immutable>(&self, cmd: i32, attr: &T) -> Result<i64, Errno> {
        let b = attr.as_bytes();
        self.emu()
            .bpf(i64::from(cmd), b.as_ptr() as u64, b.len() as u64)
    }

    fn map(&self, map_type: u32, key: u32, value: u32, max: u32) -> Result<i32, Errno> {
        let a = bpf_attr_map_create {
            map_type,
            key_size: key,
            value_size: value,
            max_entries: max,
            ..Default::default()
        };
        self.bpf(BPF_MAP_CREATE, &a).map(|fd| fd as i32)
    }

    fn elem(&self, cmd: i32, fd: i32, key: u64, value: u64, flags: u64) -> Result<i64, Errno> {
        let a = bpf_attr_map_elem {
            map_fd: fd as u32,
            key,
            value,
            flags,
            ..Default::default()
        };
        self.bpf(cmd, &a)
    }

    /// The store-side handle of our map fd (as a producer in another process would open it).
    fn open(&self, fd: i32) -> Map {
        Map::open(self.emu().store(), self.emu().entry(fd).unwrap().id).unwrap()
    }

    fn mmap(&self, len: u64, prot: i32, flags: i32, fd: i32, off: u64) -> Result<u64, Errno> {
        self.emu()
            .mmap(0, len, prot, flags, fd, off)
            .expect("one of our fds")
    }

    fn bpf_output_event(&self, cpu: i64) -> i32 {
        let mut attr = perf_event_attr {
            type_: PERF_TYPE_SOFTWARE,
            size: 136,
            config: 10,           // PERF_COUNT_SW_BPF_OUTPUT
            sample_type: 1 << 10, // PERF_SAMPLE_RAW
            ..Default::default()
        };
        let p = attr.as_mut_bytes().as_mut_ptr() as u64;
        self.emu()
            .perf_event_open(p, -1, cpu, -1, PERF_FLAG_FD_CLOEXEC)
            .unwrap() as i32
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.emu.take());
        let _ = std::fs::remove_file(&self.path);
    }
}

const RO: i32 = libc::PROT_READ;
const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;
const SHARED: i32 = libc::MAP_SHARED;

/// An `AtomicU64` view of a mapping we made (the loader's view).
fn word(addr: u64) -> &'static AtomicU64 {
    // SAFETY: `addr` is 8-byte aligned inside a live shared mapping made by the test, which is
    // never unmapped while the reference is used; other writers only use atomics.
    unsafe { AtomicU64::from_ptr(addr as *mut u64) }
}

fn read_bytes(addr: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    // SAFETY: the range lies inside a live mapping made by the test.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, v.as_mut_ptr(), n) };
    v
}

fn mprotect(addr: u64, len: u64, prot: i32) -> i32 {
    // SAFETY: changes the protection of a mapping the test made.
    if unsafe { libc::mprotect(addr as *mut libc::c_void, len as usize, prot) } == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap()
    }
}

fn munmap(f: &Fixture, addr: u64, len: u64) {
    // SAFETY: unmapping a mapping the test made and no longer uses.
    let r = unsafe { libc::munmap(addr as *mut libc::c_void, len as usize) };
    assert_eq!(r, 0);
    f.emu().munmapped(addr, len);
}

#[test]
fn ringbuf_maps_have_the_kernels_errnos_and_mmap_rules() {
    let f = Fixture::new();
    assert_eq!(f.map(27, 0, 0, 3 * 4096), Err(EINVAL));
    assert_eq!(f.map(27, 4, 0, 4096), Err(EINVAL));
    let fd = f.map(27, 0, 0, 16384).unwrap();
    assert_ne!(f.emu().entry(fd).unwrap().wake, 0, "a pollable placeholder");
    let mut v = [0u8; 8];
    let vp = v.as_mut_ptr() as u64;
    let k = 0u32;
    let kp = &k as *const u32 as u64;
    // key_size 0: a NULL key reaches the map (ENOTSUPP), another key is EINVAL.
    assert_eq!(f.elem(BPF_MAP_LOOKUP_ELEM, fd, 0, vp, 0), Err(ENOTSUPP));
    assert_eq!(f.elem(BPF_MAP_LOOKUP_ELEM, fd, kp, vp, 0), Err(EINVAL));
    assert_eq!(f.elem(BPF_MAP_UPDATE_ELEM, fd, 0, vp, 0), Err(ENOTSUPP));
    assert_eq!(f.elem(BPF_MAP_DELETE_ELEM, fd, 0, 0, 0), Err(ENOTSUPP));
    let size = 16384;
    // The consumer page is the only writable mapping.
    let cons = f.mmap(PAGE, RW, SHARED, fd, 0).unwrap();
    assert_eq!(f.mmap(2 * PAGE, RW, SHARED, fd, 0), Err(EPERM));
    assert_eq!(f.mmap(PAGE, RW, SHARED, fd, PAGE), Err(EPERM));
    assert_eq!(f.mmap(PAGE, RO, libc::MAP_PRIVATE, fd, 0), Err(EINVAL));
    assert_eq!(
        f.mmap(PAGE + 2 * size + PAGE, RO, SHARED, fd, PAGE),
        Err(EINVAL)
    );
    let all = f.mmap(2 * PAGE + 2 * size, RO, SHARED, fd, 0).unwrap();
    // libbpf's producer mapping: producer page + the data twice.
    let prod = f.mmap(PAGE + 2 * size, RO, SHARED, fd, PAGE).unwrap();
    assert_eq!(
        mprotect(prod, PAGE, RW),
        libc::EACCES,
        "VM_MAYWRITE cleared"
    );

    // A producer elsewhere writes records, one of them wrapping around the end.
    let m = f.open(fd);
    let rb = RingBuf::new(&m).unwrap();
    let sample = |i: u64| -> Vec<u8> { (0..3000).map(|b| (b as u64 * 7 + i) as u8).collect() };
    let data = prod + PAGE;
    let mut seen = 0u64;
    for i in 0..20u64 {
        rb.output(&sample(i), 0).unwrap();
        // Consume as libbpf does, through the loader's mappings.
        let p = word(prod).load(Ordering::Acquire);
        let mut c = word(cons).load(Ordering::Acquire);
        while c < p {
            let hdr = data + (c & (size - 1));
            let len = word(hdr).load(Ordering::Acquire) as u32;
            assert_eq!(len & (3 << 30), 0, "committed, not discarded");
            assert_eq!(
                read_bytes(hdr + 8, len as usize),
                sample(seen),
                "record {seen}"
            );
            // pg_off: the kernel's page offset of the header in struct bpf_ringbuf.
            let pg = (word(hdr).load(Ordering::Relaxed) >> 32) as u32;
            assert_eq!(u64::from(pg), 3 + (c & (size - 1)) / PAGE);
            c += (u64::from(len) + 8).div_ceil(8) * 8;
            seen += 1;
            word(cons).store(c, Ordering::Release);
        }
        assert_eq!(
            rb.query(BPF_RB_CONS_POS),
            c,
            "the producer sees our consumer_pos"
        );
    }
    assert_eq!(seen, 20);
    // The all-pages view shows the same consumer and producer pages.
    assert_eq!(
        word(all).load(Ordering::Relaxed),
        word(cons).load(Ordering::Relaxed)
    );
    assert_eq!(
        word(all + PAGE).load(Ordering::Relaxed),
        word(prod).load(Ordering::Relaxed)
    );
    for (a, l) in [
        (cons, PAGE),
        (all, 2 * PAGE + 2 * size),
        (prod, PAGE + 2 * size),
    ] {
        munmap(&f, a, l);
    }
    f.emu().close(fd).unwrap();
    assert!(f.emu().store().live_ids().is_empty(), "map freed");
}

/// Runs `epoll_wait(epfd, timeout)` the way the interposer does (armed before, disarmed after).
fn armed_epoll_wait(emu: &Emulator, epfd: i32, timeout_ms: i32) -> i32 {
    let armed = emu.before_epoll_wait(epfd);
    let mut ev = [libc::epoll_event { events: 0, u64: 0 }; 4];
    // SAFETY: `ev` is a writable array of 4 events.
    let n = unsafe { libc::epoll_wait(epfd, ev.as_mut_ptr(), 4, timeout_ms) };
    emu.after_wait(armed);
    n
}

fn epoll_add(emu: &Emulator, epfd: i32, fd: i32) {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: fd as u64,
    };
    // SAFETY: plain epoll_ctl on fds we own, with a valid event.
    let r = unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    assert_eq!(r, 0);
    emu.epoll_ctl_done(epfd, libc::EPOLL_CTL_ADD, fd);
}

#[test]
fn epoll_on_a_ringbuf_fd_wakes_on_commit_and_sleeps_otherwise() {
    let f = Fixture::new();
    let fd = f.map(27, 0, 0, 4096).unwrap();
    // SAFETY: plain epoll_create1.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    epoll_add(f.emu(), epfd, fd);
    let m = f.open(fd);
    // Nothing there: the wait times out (no readiness without data).
    assert_eq!(armed_epoll_wait(f.emu(), epfd, 100), 0);
    // A commit from another thread (as from another process) ends a long wait early.
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let m2 = m.clone();
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            RingBuf::new(&m2).unwrap().output(&[1; 8], 0).unwrap();
        });
        assert_eq!(armed_epoll_wait(f.emu(), epfd, 20_000), 1);
    });
    assert!(t0.elapsed() < Duration::from_secs(10));
    // Level-triggered while unread: ready at once, again and again.
    assert_eq!(armed_epoll_wait(f.emu(), epfd, 0), 1);
    assert_eq!(armed_epoll_wait(f.emu(), epfd, 5000), 1);
    // Consumed: asleep again (stale wake-ups were drained).
    let rb = RingBuf::new(&m).unwrap();
    assert_eq!(rb.consume(|_| {}), 1);
    assert_eq!(armed_epoll_wait(f.emu(), epfd, 100), 0);
    // A record being written (busy) is not readable yet; its commit wakes the waiter.
    let r = rb.reserve(8).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            rb.write(&r, &[2; 8]).unwrap();
            rb.submit(&r, 0);
        });
        assert_eq!(armed_epoll_wait(f.emu(), epfd, 20_000), 1);
    });
    // poll() on the fd works the same way.
    let armed = f.emu().before_poll(&[fd]);
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    assert_eq!(unsafe { libc::poll(&mut p, 1, 1000) }, 1);
    f.emu().after_wait(armed);
    // Closing the epoll fd forgets it.
    f.emu().close(epfd).unwrap();
    assert!(!f.emu().is_tracked_epoll(epfd));
}

#[test]
fn bpf_output_perf_events_have_the_kernels_mmap_layout_and_array_semantics() {
    let f = Fixture::new();
    let ev = f.bpf_output_event(0);
    assert_ne!(f.emu().entry(ev).unwrap().wake, 0, "a pollable placeholder");
    assert_eq!(
        f.mmap(4 * PAGE, RW, SHARED, ev, 0),
        Err(EINVAL),
        "1 + 3 pages"
    );
    assert_eq!(f.mmap(3 * PAGE, RW, libc::MAP_PRIVATE, ev, 0), Err(EINVAL));
    assert_eq!(
        f.mmap(3 * PAGE, RW, SHARED, ev, PAGE),
        Err(EINVAL),
        "no AUX area"
    );
    let up = f.mmap(3 * PAGE, RW, SHARED, ev, 0).unwrap();
    assert_eq!(
        f.mmap(5 * PAGE, RW, SHARED, ev, 0),
        Err(EINVAL),
        "another size"
    );
    // struct perf_event_mmap_page as perf_event_init_userpage() fills it.
    assert_eq!(
        word(up + 40).load(Ordering::Relaxed),
        2,
        "cap_bit0_is_deprecated"
    );
    assert_eq!(word(up + 72).load(Ordering::Relaxed) as u32, 96, "size");
    assert_eq!(word(up + 1040).load(Ordering::Relaxed), PAGE, "data_offset");
    assert_eq!(
        word(up + 1048).load(Ordering::Relaxed),
        2 * PAGE,
        "data_size"
    );

    let arr = f.map(4, 4, 4, 2).unwrap();
    let rb = f.map(27, 0, 0, 4096).unwrap();
    let (k0, k2) = (0u32, 2u32);
    let k0p = &k0 as *const u32 as u64;
    let v = |fd: i32| fd.to_ne_bytes();
    let evb = v(ev);
    let rbb = v(rb);
    let upd = |key: u64, val: &[u8; 4], flags| {
        f.elem(BPF_MAP_UPDATE_ELEM, arr, key, val.as_ptr() as u64, flags)
    };
    assert_eq!(upd(k0p, &evb, 1), Err(EINVAL));
    assert_eq!(upd(&k2 as *const u32 as u64, &evb, 0), Err(E2BIG));
    assert_eq!(upd(k0p, &rbb, 0), Err(EBADF), "not a perf event");
    assert_eq!(upd(k0p, &evb, 0), Ok(0));
    let mut out = [0u8; 4];
    assert_eq!(
        f.elem(BPF_MAP_LOOKUP_ELEM, arr, k0p, out.as_mut_ptr() as u64, 0),
        Err(ENOTSUPP)
    );
    // bpf_perf_event_output from a program (in any process) lands in the mapped ring.
    let am = f.open(arr);
    perf_array::output(&am, 0, &[0xab; 20]).unwrap();
    let head = word(up + 1024).load(Ordering::Acquire);
    assert_eq!(head, 32);
    let rec = read_bytes(up + PAGE, 32);
    assert_eq!(
        u32::from_ne_bytes(rec[..4].try_into().unwrap()),
        PERF_RECORD_SAMPLE
    );
    assert_eq!(u16::from_ne_bytes(rec[6..8].try_into().unwrap()), 32);
    assert_eq!(u32::from_ne_bytes(rec[8..12].try_into().unwrap()), 20);
    assert_eq!(&rec[12..32], &[0xab; 20]);
    // poll() sees it; after the consumer moves data_tail, it sleeps.
    let ready = |timeout| {
        let armed = f.emu().before_poll(&[ev]);
        let mut p = libc::pollfd {
            fd: ev,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, timeout) };
        f.emu().after_wait(armed);
        n
    };
    assert_eq!(ready(0), 1);
    word(up + 1032).store(head, Ordering::Release);
    assert_eq!(ready(100), 0);
    // A disabled event refuses output (the kernel's oncpu check fails).
    assert_eq!(f.emu().ioctl(ev, PERF_EVENT_IOC_DISABLE, 0), Some(Ok(0)));
    assert_eq!(perf_array::output(&am, 0, &[1]), Err(libc::EOPNOTSUPP));
    assert_eq!(f.emu().ioctl(ev, PERF_EVENT_IOC_ENABLE, 0), Some(Ok(0)));
    // The array holds the event: closing the fd and unmapping keep it for the array.
    let ev_id = f.emu().entry(ev).unwrap().id;
    f.emu().close(ev).unwrap();
    munmap(&f, up, 3 * PAGE);
    assert!(f.emu().store().object(ev_id).is_some(), "held by the array");
    perf_array::output(&am, 0, &[2; 8]).unwrap();
    assert_eq!(f.elem(BPF_MAP_DELETE_ELEM, arr, k0p, 0, 0), Ok(0));
    assert!(
        f.emu().store().object(ev_id).is_none(),
        "released with the entry"
    );
    assert_eq!(f.elem(BPF_MAP_DELETE_ELEM, arr, k0p, 0, 0), Err(ENOENT));
    drop(am);
    f.emu().close(arr).unwrap();
    f.emu().close(rb).unwrap();
    assert!(f.emu().store().live_ids().is_empty());
}
