//! `mmap` of our map fds: array maps with `BPF_F_MMAPABLE` (libbpf's `.bss`, `.data`,
//! `.rodata`) are mapped straight from the store file, so the loader and every agent share the
//! same pages.
//!
//! Checks follow `bpf_map_mmap` and `array_map_mmap` (`kernel/bpf/syscall.c`,
//! `kernel/bpf/arraymap.c`, and `do_mmap` before them: a writable shared mapping of a
//! `BPF_F_RDONLY` map fd is `EACCES`): a map type without mmap support is `ENOTSUPP`, a non-mmapable
//! array `EINVAL`, a private mapping `EINVAL`, a writable mapping of a frozen map `EPERM` and
//! of a `BPF_F_RDONLY_PROG` map `EACCES`, a range past the data `EINVAL`. Read-only mappings
//! come from a read-only fd of the store file, so `mprotect(PROT_WRITE)` fails later, as the
//! kernel's cleared `VM_MAYWRITE` makes it.

use crate::Errno;
use crate::emu::{Emulator, FdEntry, Mapping};
use crate::sys;
use crate::uapi::{BPF_F_MMAPABLE, BPF_F_RDONLY_PROG, BPF_MAP_TYPE_ARRAY, ENOTSUPP};
use bpftime_maps::ringbuf::RingBuf;
use bpftime_maps::store::ObjectKind;
use bpftime_maps::{Map, MapType, perf_array};
use bpftime_runtime::object::{PerfKind, read_perf_event};

const PAGE: u64 = 4096;

fn e(errno: i32) -> Errno {
    Errno(errno)
}

impl Emulator {
    /// `mmap(addr, len, prot, flags, fd, off)` on one of our fds; `None` if `fd` is not ours.
    pub fn mmap(
        &self,
        addr: u64,
        len: u64,
        prot: i32,
        flags: i32,
        fd: i32,
        off: u64,
    ) -> Option<Result<u64, Errno>> {
        let ent = self.entry(fd)?;
        if ent.kernel {
            // A kernel map fd (--kernel-maps): the kernel's own mmap.
            return None;
        }
        let r = match ent.kind {
            ObjectKind::Map => self.mmap_map(&ent, addr, len, prot, flags, off),
            ObjectKind::PerfEvent => self.mmap_perf(&ent, addr, len, prot, flags, off),
            // Programs, links and BTF have no mmap.
            _ => Err(e(libc::ENODEV)),
        };
        match &r {
            Ok(a) => {
                tracing::debug!("mmap(fd={fd}, len={len}, prot={prot:#x}, off={off:#x}) = {a:#x}")
            }
            Err(err) => {
                tracing::debug!("mmap(fd={fd}, len={len}, prot={prot:#x}, off={off:#x}) = -{err}")
            }
        }
        Some(r)
    }

    fn mmap_map(
        &self,
        ent: &FdEntry,
        addr: u64,
        len: u64,
        prot: i32,
        flags: i32,
        off: u64,
    ) -> Result<u64, Errno> {
        let id = ent.id;
        let map = self.open_map(id)?;
        let def = *map.def();
        let map_type = flags & 0x0f;
        let shared = map_type == libc::MAP_SHARED || map_type == libc::MAP_SHARED_VALIDATE;
        let writable = prot & libc::PROT_WRITE != 0;
        if len == 0 || !off.is_multiple_of(PAGE) {
            return Err(e(libc::EINVAL));
        }
        // do_mmap(): a shared writable mapping of a file opened read-only (a BPF_F_RDONLY map
        // fd) is EACCES before the file's own mmap is asked.
        if shared && writable && !ent.can_write {
            return Err(e(libc::EACCES));
        }
        if def.map_type == MapType::RingBuf as u32 {
            return self.mmap_ringbuf(&map, addr, len, prot, flags, off, shared);
        }
        if def.map_type != BPF_MAP_TYPE_ARRAY {
            return Err(e(ENOTSUPP));
        }
        if !shared {
            return Err(e(libc::EINVAL));
        }
        if writable {
            if map.is_frozen() {
                return Err(e(libc::EPERM));
            }
            if def.flags & BPF_F_RDONLY_PROG != 0 {
                return Err(e(libc::EACCES));
            }
        }
        if def.flags & BPF_F_MMAPABLE == 0 {
            return Err(e(libc::EINVAL));
        }
        let span = len.div_ceil(PAGE) * PAGE;
        if off.checked_add(span).is_none_or(|end| end > map.data_len()) {
            return Err(e(libc::EINVAL));
        }
        if map.data_offset() % PAGE != 0 {
            tracing::warn!("map {id} data is not page-aligned in the store: EINVAL");
            return Err(e(libc::EINVAL));
        }
        let fd = if writable {
            self.store.segment().fd()
        } else {
            self.ro_store_fd().unwrap_or(self.store.segment().fd())
        };
        // The mapping holds the map (as the kernel's vma holds the map's file), so its data is
        // not freed and reused while mapped.
        if !self.acquire(id) {
            return Err(e(libc::EBADF));
        }
        let at = match sys::mmap_raw(addr, len as usize, prot, flags, fd, map.data_offset() + off) {
            Ok(at) => at,
            Err(err) => {
                self.release(id);
                return Err(err);
            }
        };
        self.mmaps.lock().push(Mapping {
            start: at,
            len: span,
            map_id: id,
            writable,
            pid: crate::emu::pid(),
        });
        Ok(at)
    }

    /// `ringbuf_map_mmap`: the loader's view of a ring buffer is `[consumer page | producer page
    /// | data | data]` (the data twice, so wrapped records are contiguous); a writable mapping
    /// may only be the consumer page (`EPERM`). Each piece is mapped from the store file with
    /// `MAP_FIXED` into one reservation made where the caller asked.
    #[allow(clippy::too_many_arguments)]
    fn mmap_ringbuf(
        &self,
        map: &Map,
        addr: u64,
        len: u64,
        prot: i32,
        flags: i32,
        off: u64,
        shared: bool,
    ) -> Result<u64, Errno> {
        let rb = RingBuf::new(map).map_err(|err| e(err.errno()))?;
        let writable = prot & libc::PROT_WRITE != 0;
        if !shared {
            return Err(e(libc::EINVAL));
        }
        let span = len.div_ceil(PAGE) * PAGE;
        if writable && (off != 0 || span != PAGE) {
            return Err(e(libc::EPERM));
        }
        let size = rb.size();
        // remap_vmalloc_range(): the range must lie inside the mmap-able part.
        if off
            .checked_add(span)
            .is_none_or(|end| end > 2 * PAGE + 2 * size)
        {
            return Err(e(libc::EINVAL));
        }
        let pieces = [
            (0, PAGE, rb.consumer_page()),
            (PAGE, PAGE, rb.producer_page()),
            (2 * PAGE, size, rb.data_offset()),
            (2 * PAGE + size, size, rb.data_offset()),
        ];
        let fd = if writable {
            self.store.segment().fd()
        } else {
            self.ro_store_fd().unwrap_or(self.store.segment().fd())
        };
        let id = map.id();
        if !self.acquire(id) {
            return Err(e(libc::EBADF));
        }
        // Reserve the whole range where the caller wants it (MAP_FIXED honoured), then map the
        // pieces over the reservation.
        let keep = flags & (libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE);
        let base = match sys::mmap_raw(
            addr,
            span as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | keep,
            -1,
            0,
        ) {
            Ok(b) => b,
            Err(err) => {
                self.release(id);
                return Err(err);
            }
        };
        for (vstart, plen, file_off) in pieces {
            let (lo, hi) = (vstart.max(off), (vstart + plen).min(off + span));
            if lo >= hi {
                continue;
            }
            let at = base + (lo - off);
            if let Err(err) = sys::mmap_raw(
                at,
                (hi - lo) as usize,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd,
                file_off + (lo - vstart),
            ) {
                let _ = sys::munmap_raw(base, span as usize);
                self.release(id);
                return Err(err);
            }
        }
        self.mmaps.lock().push(Mapping {
            start: base,
            len: span,
            map_id: id,
            writable,
            pid: crate::emu::pid(),
        });
        Ok(base)
    }

    /// `perf_mmap` of a `BPF_OUTPUT` perf event: `1 + 2^n` pages at offset 0, shared; the first
    /// mapping makes the ring (in the store), later ones must have the same size (`EINVAL`).
    /// The user page and data are mapped straight from the store file.
    fn mmap_perf(
        &self,
        ent: &FdEntry,
        addr: u64,
        len: u64,
        prot: i32,
        flags: i32,
        off: u64,
    ) -> Result<u64, Errno> {
        let id = ent.id;
        let ev = read_perf_event(&self.store, id).map_err(|err| e(err.errno()))?;
        if ev.kind != PerfKind::SoftwareBpfOutput {
            tracing::warn!("mmap of a {:?} perf event is not emulated: EINVAL", ev.kind);
            return Err(e(libc::EINVAL));
        }
        let map_type = flags & 0x0f;
        if map_type != libc::MAP_SHARED && map_type != libc::MAP_SHARED_VALIDATE {
            return Err(e(libc::EINVAL));
        }
        // An offset is the AUX area, which BPF output events do not have.
        if off != 0 || len == 0 {
            return Err(e(libc::EINVAL));
        }
        let span = len.div_ceil(PAGE) * PAGE;
        let data_pages = span / PAGE - 1;
        if data_pages != 0 && !data_pages.is_power_of_two() {
            return Err(e(libc::EINVAL));
        }
        let ring = perf_array::attach_ring(&self.store, id, data_pages).map_err(|err| {
            tracing::debug!("perf ring of event {id}: {err}");
            e(libc::EINVAL)
        })?;
        let writable = prot & libc::PROT_WRITE != 0;
        let fd = if writable {
            self.store.segment().fd()
        } else {
            self.ro_store_fd().unwrap_or(self.store.segment().fd())
        };
        // The mapping holds the event (and so its ring).
        if !self.acquire(id) {
            return Err(e(libc::EBADF));
        }
        let at = match sys::mmap_raw(addr, len as usize, prot, flags, fd, ring.user_page()) {
            Ok(at) => at,
            Err(err) => {
                self.release(id);
                return Err(err);
            }
        };
        self.mmaps.lock().push(Mapping {
            start: at,
            len: span,
            map_id: id,
            writable,
            pid: crate::emu::pid(),
        });
        Ok(at)
    }

    /// After a successful `munmap(addr, len)`: our mappings inside the range are gone, and so
    /// are the references they held.
    pub fn munmapped(&self, addr: u64, len: u64) {
        let end = addr.saturating_add(len.div_ceil(PAGE) * PAGE);
        let mut gone = Vec::new();
        let me = crate::emu::pid();
        self.mmaps.lock().retain(|m| {
            let inside = m.pid == me && m.start >= addr && m.start.saturating_add(m.len) <= end;
            if inside {
                gone.push(m.map_id);
            }
            !inside
        });
        for id in gone {
            self.release(id);
        }
    }
}
