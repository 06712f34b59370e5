//! `BPF_MAP_TYPE_PERF_EVENT_ARRAY` and the perf ring buffers of `PERF_COUNT_SW_BPF_OUTPUT`
//! events that `bpf_perf_event_output` writes into, in the kernel's perf mmap layout so
//! unmodified libbpf `perf_buffer__poll` (and bcc's/bpftrace's perf readers) consume them.
//!
//! Semantics follow `kernel/bpf/arraymap.c` (fd arrays), `kernel/trace/bpf_trace.c`
//! (`bpf_perf_event_output`) and `kernel/events/ring_buffer.c` / `core.c` (`perf_output_begin`,
//! `perf_prepare_sample`, `perf_event_init_userpage`, `perf_mmap`):
//!
//! - The array holds perf event **object ids** (the syscall side translates the loader's fds),
//!   4 bytes per entry; a syscall lookup is `ENOTSUPP`, updates take only `BPF_ANY`.
//! - A perf event's ring is a separate store block made when the loader first mmaps the event:
//!   `[private page | user page (struct perf_event_mmap_page) | 2^n data pages]`. The loader maps
//!   the user page and data straight from the store file; the user page has `data_offset` =
//!   4096, `data_size`, `data_head` at 1024 and `data_tail` at 1032.
//! - A sample is `{ u32 type = PERF_RECORD_SAMPLE; u16 misc = PERF_RECORD_MISC_USER; u16 size }`,
//!   `u32 raw_size`, the raw bytes and zero padding, with `raw_size = round_up(n + 4, 8) - 4`
//!   (so the size a reader sees includes the padding, as on the kernel). When a sample does not
//!   fit (`CIRC_SPACE(head, tail, size) < size`) it is lost and counted; the next sample that
//!   fits is preceded by `PERF_RECORD_LOST { u64 id; u64 lost; }`.
//! - Unlike the kernel's per-CPU rings, any thread may write any ring here (a thread can migrate
//!   between reading its CPU number and writing), so writers serialise on a robust lock in the
//!   private page and publish `data_head` in order; consumers never see a partial record.
//! - Wake-ups as for ring buffers ([`crate::wake`]): the wake slot is in the private page.

use crate::lock;
use crate::map::{Map, MapDef, MapError, MapType};
use crate::shm::Segment;
use crate::store::{ObjectKind, Store, StoreError};
use crate::wake;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

/// `BPF_F_INDEX_MASK`.
pub const BPF_F_INDEX_MASK: u64 = 0xffff_ffff;
/// `BPF_F_CURRENT_CPU`.
pub const BPF_F_CURRENT_CPU: u64 = BPF_F_INDEX_MASK;
/// `PERF_RECORD_LOST`.
pub const PERF_RECORD_LOST: u32 = 2;
/// `PERF_RECORD_SAMPLE`.
pub const PERF_RECORD_SAMPLE: u32 = 9;
/// `PERF_RECORD_MISC_USER`.
pub const PERF_RECORD_MISC_USER: u16 = 2;

/// Fields of a perf event object's payload that this module reads (the record layout belongs
/// to `bpftime-runtime`'s object module, which asserts these offsets): the kind (u32) …
pub const EVENT_KIND: u64 = 0;
/// … the enabled flag (u32) …
pub const EVENT_ENABLED: u64 = 4;
/// … and the store offset of its ring block (u64, 0 until the loader mmaps the event).
pub const EVENT_RING: u64 = 40;
/// The kind value of `PERF_COUNT_SW_BPF_OUTPUT` events.
pub const KIND_BPF_OUTPUT: u32 = 4;

const PAGE: u64 = 4096;
// Private page.
const R_MAGIC: u64 = 0;
const R_DATA_SIZE: u64 = 8;
const R_LOCK: u64 = 16;
const R_HEAD: u64 = 24;
const R_LOST: u64 = 32;
const R_LOST_TOTAL: u64 = 40;
const R_EVENT_ID: u64 = 48;
const R_WAKE: u64 = 64;
const RING_MAGIC: u64 = u64::from_le_bytes(*b"PERFRNG\x01");
// User page (struct perf_event_mmap_page).
const U_CAPABILITIES: u64 = 40;
const U_SIZE: u64 = 72;
const U_DATA_HEAD: u64 = 1024;
const U_DATA_TAIL: u64 = 1032;
const U_DATA_OFFSET: u64 = 1040;
const U_DATA_SIZE: u64 = 1048;
/// `offsetof(struct perf_event_mmap_page, __reserved)`.
const USER_PAGE_SIZE_FIELD: u32 = 96;
/// `cap_bit0_is_deprecated`.
const CAP_BIT0_IS_DEPRECATED: u64 = 1 << 1;
/// Largest data area accepted (2^20 pages = 4 GiB).
const MAX_DATA_PAGES: u64 = 1 << 20;

/// `fd_array_map_alloc_check` + `array_map_alloc_check`; the data length.
pub(crate) fn check_def(def: &MapDef) -> Result<u64, MapError> {
    if def.key_size != 4 || def.value_size != 4 || def.max_entries == 0 {
        return Err(MapError::BadDefinition {
            what: "perf event arrays need key_size 4, value_size 4 and max_entries > 0",
        });
    }
    Ok((u64::from(def.max_entries) * 4).div_ceil(8) * 8)
}

fn index(key: &[u8]) -> u32 {
    u32::from_ne_bytes([key[0], key[1], key[2], key[3]])
}

fn slot(map: &Map, i: u32) -> Result<&AtomicU32, MapError> {
    if i >= map.def.max_entries {
        return Err(MapError::TooBig);
    }
    map.store
        .segment()
        .atomic_u32(map.data_off + 4 * u64::from(i))
        .ok_or(MapError::Store(StoreError::Corrupt {
            what: "perf event array",
        }))
}

/// The perf event id at index `i` (0: empty).
pub fn get(map: &Map, i: u32) -> Result<u32, MapError> {
    Ok(slot(map, i)?.load(Ordering::Acquire))
}

/// `BPF_MAP_UPDATE_ELEM` with a perf event's object id (the caller translated the fd and holds
/// a reference for the array); returns the id it replaced (0: none), whose reference the caller
/// drops. Flags other than `BPF_ANY` are `EINVAL`, an index past the end `E2BIG`.
pub fn set(map: &Map, i: u32, id: u32, flags: u64) -> Result<u32, MapError> {
    if flags != 0 {
        return Err(MapError::InvalidFlags { flags });
    }
    Ok(slot(map, i)?.swap(id, Ordering::AcqRel))
}

/// `BPF_MAP_DELETE_ELEM`: empties index `i`; returns the id it held (`ENOENT` if empty).
pub fn clear(map: &Map, i: u32) -> Result<u32, MapError> {
    match slot(map, i)?.swap(0, Ordering::AcqRel) {
        0 => Err(MapError::NotFound),
        id => Ok(id),
    }
}

/// The perf event ids the array holds (each with a reference the array owns).
pub fn held(map: &Map) -> Vec<u32> {
    (0..map.def.max_entries)
        .filter_map(|i| get(map, i).ok().filter(|&id| id != 0))
        .collect()
}

pub(crate) fn update(map: &Map, key: &[u8], value: &[u8], flags: u64) -> Result<(), MapError> {
    set(map, index(key), index(value), flags).map(drop)
}

pub(crate) fn delete(map: &Map, key: &[u8]) -> Result<(), MapError> {
    clear(map, index(key)).map(drop)
}

/// `bpf_perf_event_output` to index `i` (the caller resolved `BPF_F_CURRENT_CPU`). `Err` is the
/// kernel's errno: `E2BIG` (index past the end), `ENOENT` (empty slot), `EINVAL` (not a
/// `BPF_OUTPUT` event), `EOPNOTSUPP` (event disabled), `ENOSPC` (no ring yet, or full: lost).
pub fn output(map: &Map, i: u32, data: &[u8]) -> Result<(), i32> {
    if map.def.map_type != MapType::PerfEventArray as u32 {
        return Err(libc::EINVAL);
    }
    let id = get(map, i).map_err(|e| e.errno())?;
    if id == 0 {
        return Err(libc::ENOENT);
    }
    let store = &map.store;
    let ev = event_payload(store, id).ok_or(libc::ENOENT)?;
    let seg = store.segment();
    let r32 = |f: u64| seg.atomic_u32(ev + f).map(|a| a.load(Ordering::Acquire));
    if r32(EVENT_KIND) != Some(KIND_BPF_OUTPUT) {
        return Err(libc::EINVAL);
    }
    if r32(EVENT_ENABLED).unwrap_or(0) == 0 {
        return Err(libc::EOPNOTSUPP);
    }
    let ring = seg
        .atomic_u64(ev + EVENT_RING)
        .map_or(0, |a| a.load(Ordering::Acquire));
    PerfRing::open(store, ring)
        .ok_or(libc::ENOSPC)?
        .output(data)
}

/// Store offset of perf event `id`'s payload, if it is a live perf event.
fn event_payload(store: &Store, id: u32) -> Option<u64> {
    let o = store.object(id)?;
    (o.kind == ObjectKind::PerfEvent && o.payload_len >= EVENT_RING + 8).then_some(o.payload_off)
}

/// The ring of perf event `id`, if it has one.
pub fn event_ring(store: &Store, id: u32) -> Option<PerfRing<'_>> {
    let ev = event_payload(store, id)?;
    let off = store
        .segment()
        .atomic_u64(ev + EVENT_RING)?
        .load(Ordering::Acquire);
    PerfRing::open(store, off)
}

/// Gives perf event `id` a ring of `data_pages` pages (a power of two, or 0), or returns the
/// one it has (`perf_mmap`: a second mapping must have the same size, else `EINVAL`).
pub fn attach_ring<'a>(
    store: &'a Store,
    id: u32,
    data_pages: u64,
) -> Result<PerfRing<'a>, MapError> {
    let ev = event_payload(store, id).ok_or(MapError::NotFound)?;
    let field = store
        .segment()
        .atomic_u64(ev + EVENT_RING)
        .ok_or(MapError::Store(StoreError::Corrupt { what: "perf event" }))?;
    let check = |r: PerfRing<'a>| {
        if r.data_size() == data_pages * PAGE {
            Ok(r)
        } else {
            Err(MapError::BadDefinition {
                what: "perf ring mapped with another size",
            })
        }
    };
    if let Some(r) = PerfRing::open(store, field.load(Ordering::Acquire)) {
        return check(r);
    }
    let off = PerfRing::create(store, data_pages, id)?;
    match field.compare_exchange(0, off, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => PerfRing::open(store, off)
            .ok_or(MapError::Store(StoreError::Corrupt { what: "perf ring" })),
        Err(other) => {
            // Another thread attached one first.
            store.free(off, PerfRing::block_len(data_pages));
            check(
                PerfRing::open(store, other)
                    .ok_or(MapError::Store(StoreError::Corrupt { what: "perf ring" }))?,
            )
        }
    }
}

/// A perf event's ring buffer in the store.
#[derive(Debug, Clone, Copy)]
pub struct PerfRing<'a> {
    seg: &'a Segment,
    off: u64,
    data_size: u64,
}

impl<'a> PerfRing<'a> {
    /// Bytes of a ring block with `data_pages` data pages.
    pub fn block_len(data_pages: u64) -> u64 {
        (2 + data_pages) * PAGE
    }

    /// Allocates and initialises a ring block; returns its store offset.
    pub fn create(store: &Store, data_pages: u64, event_id: u32) -> Result<u64, MapError> {
        if data_pages > MAX_DATA_PAGES || data_pages != 0 && !data_pages.is_power_of_two() {
            return Err(MapError::BadDefinition {
                what: "perf ring data must be a power-of-two number of pages",
            });
        }
        let off = store.alloc(Self::block_len(data_pages))?;
        let seg = store.segment();
        let bad = || MapError::Store(StoreError::Corrupt { what: "perf ring" });
        let w64 = |f: u64, v: u64| {
            seg.atomic_u64(off + f)
                .map(|a| a.store(v, Ordering::Relaxed))
                .ok_or_else(bad)
        };
        let data_size = data_pages * PAGE;
        // perf_event_init_userpage(): version 0, cap_bit0_is_deprecated, size, data area.
        w64(PAGE + U_CAPABILITIES, CAP_BIT0_IS_DEPRECATED)?;
        seg.atomic_u32(off + PAGE + U_SIZE)
            .ok_or_else(bad)?
            .store(USER_PAGE_SIZE_FIELD, Ordering::Relaxed);
        w64(PAGE + U_DATA_OFFSET, PAGE)?;
        w64(PAGE + U_DATA_SIZE, data_size)?;
        w64(R_DATA_SIZE, data_size)?;
        seg.atomic_u32(off + R_EVENT_ID)
            .ok_or_else(bad)?
            .store(event_id, Ordering::Relaxed);
        seg.atomic_u64(off + R_MAGIC)
            .ok_or_else(bad)?
            .store(RING_MAGIC, Ordering::Release);
        Ok(off)
    }

    /// The ring block at `off`, validated.
    pub fn open(store: &'a Store, off: u64) -> Option<PerfRing<'a>> {
        if off == 0 || !off.is_multiple_of(PAGE) {
            return None;
        }
        let seg = store.segment();
        if seg.atomic_u64(off + R_MAGIC)?.load(Ordering::Acquire) != RING_MAGIC {
            return None;
        }
        let data_size = seg.atomic_u64(off + R_DATA_SIZE)?.load(Ordering::Relaxed);
        let pages = data_size / PAGE;
        if !data_size.is_multiple_of(PAGE)
            || pages > MAX_DATA_PAGES
            || pages != 0 && !pages.is_power_of_two()
        {
            return None;
        }
        seg.range(off, Self::block_len(pages) as usize)?;
        Some(PerfRing {
            seg,
            off,
            data_size,
        })
    }

    /// Store offset of the block (to free it).
    pub fn offset(&self) -> u64 {
        self.off
    }

    /// Bytes of the block.
    pub fn len(&self) -> u64 {
        Self::block_len(self.data_size / PAGE)
    }

    /// Always false (a block has its two header pages); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Store offset of the user page; the loader maps `[user page | data]` from here.
    pub fn user_page(&self) -> u64 {
        self.off + PAGE
    }

    /// Data bytes.
    pub fn data_size(&self) -> u64 {
        self.data_size
    }

    /// Store offset of the wake slot.
    pub fn wake_slot(&self) -> u64 {
        self.off + R_WAKE
    }

    fn w64(&self, f: u64) -> Option<&'a AtomicU64> {
        self.seg.atomic_u64(self.off + f)
    }

    /// Samples lost because the ring was full (all time).
    pub fn lost_total(&self) -> u64 {
        self.w64(R_LOST_TOTAL)
            .map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// Writes `bytes` at ring position `pos`, wrapping around the end of the data area.
    fn put(&self, pos: u64, bytes: &[u8]) -> Option<()> {
        let data = self.off + 2 * PAGE;
        let at = pos & (self.data_size - 1);
        let first = (self.data_size - at).min(bytes.len() as u64) as usize;
        self.seg.write(data + at, &bytes[..first])?;
        if first < bytes.len() {
            self.seg.write(data, &bytes[first..])?;
        }
        Some(())
    }

    fn get(&self, pos: u64, buf: &mut [u8]) -> Option<()> {
        let data = self.off + 2 * PAGE;
        let at = pos & (self.data_size - 1);
        let first = (self.data_size - at).min(buf.len() as u64) as usize;
        self.seg.read(data + at, &mut buf[..first])?;
        if first < buf.len() {
            self.seg.read(data, &mut buf[first..])?;
        }
        Some(())
    }

    /// Appends a `PERF_RECORD_SAMPLE` with `PERF_SAMPLE_RAW` data `raw` (preceded by a
    /// `PERF_RECORD_LOST` if samples were lost since the last one), publishes it and wakes a
    /// sleeping consumer. `Err(ENOSPC)` when it does not fit (counted as lost), `E2BIG` for a
    /// record past the 16-bit size limit.
    pub fn output(&self, raw: &[u8]) -> Result<(), i32> {
        let raw_padded = (raw.len() as u64 + 4).div_ceil(8) * 8;
        let rec = 8 + raw_padded;
        if rec > u64::from(u16::MAX) {
            return Err(libc::E2BIG);
        }
        let corrupt = libc::EFAULT;
        let (head_a, lost_a, user_head, user_tail) = (
            self.w64(R_HEAD).ok_or(corrupt)?,
            self.w64(R_LOST).ok_or(corrupt)?,
            self.seg
                .atomic_u64(self.user_page() + U_DATA_HEAD)
                .ok_or(corrupt)?,
            self.seg
                .atomic_u64(self.user_page() + U_DATA_TAIL)
                .ok_or(corrupt)?,
        );
        let guard = lock::lock(self.w64(R_LOCK).ok_or(corrupt)?);
        let head = head_a.load(Ordering::Relaxed);
        let tail = user_tail.load(Ordering::Acquire);
        let lost = lost_a.load(Ordering::Relaxed);
        let need = rec + if lost > 0 { 24 } else { 0 };
        // CIRC_SPACE(head, tail, size): the ring keeps one byte free.
        let space = if self.data_size == 0 {
            0
        } else {
            tail.wrapping_sub(head.wrapping_add(1)) & (self.data_size - 1)
        };
        if space < need {
            lost_a.store(lost + 1, Ordering::Relaxed);
            drop(guard);
            if let Some(t) = self.w64(R_LOST_TOTAL) {
                t.fetch_add(1, Ordering::Relaxed);
            }
            return Err(libc::ENOSPC);
        }
        let mut pos = head;
        if lost > 0 {
            let id = self
                .seg
                .atomic_u32(self.off + R_EVENT_ID)
                .map_or(0, |a| a.load(Ordering::Relaxed));
            let mut r = [0u8; 24];
            r[..4].copy_from_slice(&PERF_RECORD_LOST.to_ne_bytes());
            r[6..8].copy_from_slice(&24u16.to_ne_bytes());
            r[8..16].copy_from_slice(&u64::from(id).to_ne_bytes());
            r[16..24].copy_from_slice(&lost.to_ne_bytes());
            self.put(pos, &r).ok_or(corrupt)?;
            pos += 24;
            lost_a.store(0, Ordering::Relaxed);
        }
        let mut h = [0u8; 12];
        h[..4].copy_from_slice(&PERF_RECORD_SAMPLE.to_ne_bytes());
        h[4..6].copy_from_slice(&PERF_RECORD_MISC_USER.to_ne_bytes());
        h[6..8].copy_from_slice(&(rec as u16).to_ne_bytes());
        h[8..12].copy_from_slice(&((raw_padded - 4) as u32).to_ne_bytes());
        self.put(pos, &h).ok_or(corrupt)?;
        self.put(pos + 12, raw).ok_or(corrupt)?;
        let pad = (raw_padded - 4) as usize - raw.len();
        self.put(pos + 12 + raw.len() as u64, &[0u8; 8][..pad])
            .ok_or(corrupt)?;
        pos += rec;
        head_a.store(pos, Ordering::Relaxed);
        // SeqCst: publishes the records and orders them before the read of the wake slot.
        user_head.store(pos, Ordering::SeqCst);
        drop(guard);
        wake::notify(self.seg, self.wake_slot(), false);
        Ok(())
    }

    /// Whether unread records are there (`data_head != data_tail`).
    pub fn available(&self) -> bool {
        let up = self.user_page();
        let (Some(h), Some(t)) = (
            self.seg.atomic_u64(up + U_DATA_HEAD),
            self.seg.atomic_u64(up + U_DATA_TAIL),
        ) else {
            return false;
        };
        h.load(Ordering::Acquire) != t.load(Ordering::Acquire)
    }

    /// Consumer: the socket `nonce` is about to sleep; true if records are available already.
    pub fn arm(&self, nonce: u64) -> bool {
        wake::arm(self.seg, self.wake_slot(), nonce);
        fence(Ordering::SeqCst);
        self.available()
    }

    /// Consumer: awake again.
    pub fn disarm(&self) {
        wake::disarm(self.seg, self.wake_slot());
    }

    /// Consumer (as libbpf's `perf_event_read_simple`): calls `f(type, record)` for each record
    /// (the whole record, header included) from `data_tail` to `data_head`, then advances
    /// `data_tail`. Stops at a corrupt header. Returns the number of records.
    pub fn read(&self, mut f: impl FnMut(u32, &[u8])) -> usize {
        let up = self.user_page();
        let (Some(h), Some(t)) = (
            self.seg.atomic_u64(up + U_DATA_HEAD),
            self.seg.atomic_u64(up + U_DATA_TAIL),
        ) else {
            return 0;
        };
        let head = h.load(Ordering::Acquire);
        let mut tail = t.load(Ordering::Relaxed);
        let mut n = 0;
        let mut buf = Vec::new();
        while tail < head {
            let mut hdr = [0u8; 8];
            if self.get(tail, &mut hdr).is_none() {
                break;
            }
            let ty = u32::from_ne_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
            let size = u16::from_ne_bytes([hdr[6], hdr[7]]) as u64;
            if size < 8 || tail + size > head {
                break;
            }
            buf.resize(size as usize, 0);
            if self.get(tail, &mut buf).is_none() {
                break;
            }
            f(ty, &buf);
            n += 1;
            tail += size;
        }
        t.store(tail, Ordering::Release);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::Arc;

    fn store() -> (Arc<Store>, PathBuf) {
        let p = std::env::temp_dir().join(format!(
            "bpftime-perf-unit-{}-{}",
            std::process::id(),
            crate::shm::monotonic_raw_ns()
        ));
        (Arc::new(Store::open(&p).unwrap()), p)
    }

    /// A fake perf event object (the runtime's record layout, the fields we read).
    fn event(s: &Store) -> u32 {
        let (id, off) = s.create(ObjectKind::PerfEvent, "perf_event", 64).unwrap();
        let seg = s.segment();
        seg.atomic_u32(off + EVENT_KIND)
            .unwrap()
            .store(KIND_BPF_OUTPUT, Ordering::Relaxed);
        seg.atomic_u32(off + EVENT_ENABLED)
            .unwrap()
            .store(1, Ordering::Relaxed);
        s.publish(id);
        id
    }

    #[test]
    fn samples_have_the_kernels_raw_layout_and_losses_are_reported() {
        let (s, p) = store();
        let id = event(&s);
        let ring = attach_ring(&s, id, 1).unwrap();
        assert_eq!(ring.data_size(), 4096);
        assert!(attach_ring(&s, id, 2).is_err(), "another size");
        // 20-byte samples: raw size 20 (24 - 4), record 32 bytes.
        let mut sent = 0;
        while ring.output(&[sent as u8; 20]).is_ok() {
            sent += 1;
        }
        assert_eq!(
            sent, 127,
            "4096 bytes hold 127 32-byte records (one byte stays free)"
        );
        assert_eq!(ring.output(&[0; 20]), Err(libc::ENOSPC));
        assert_eq!(ring.lost_total(), 2);
        let mut n = 0;
        ring.read(|ty, rec| {
            assert_eq!(ty, PERF_RECORD_SAMPLE);
            assert_eq!(u16::from_ne_bytes([rec[4], rec[5]]), PERF_RECORD_MISC_USER);
            assert_eq!(rec.len(), 32);
            assert_eq!(u32::from_ne_bytes(rec[8..12].try_into().unwrap()), 20);
            assert_eq!(&rec[12..32], &[n as u8; 20][..]);
            n += 1;
        });
        assert_eq!(n, 127);
        // The next sample is preceded by the loss report.
        ring.output(&[9; 5]).unwrap();
        let mut recs = Vec::new();
        ring.read(|ty, rec| recs.push((ty, rec.to_vec())));
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].0, PERF_RECORD_LOST);
        assert_eq!(
            u64::from_ne_bytes(recs[0].1[8..16].try_into().unwrap()),
            u64::from(id)
        );
        assert_eq!(u64::from_ne_bytes(recs[0].1[16..24].try_into().unwrap()), 2);
        // 5 bytes: raw size round_up(9, 8) - 4 = 12, zero padding.
        assert_eq!(recs[1].1.len(), 24);
        assert_eq!(u32::from_ne_bytes(recs[1].1[8..12].try_into().unwrap()), 12);
        assert_eq!(&recs[1].1[12..24], &[9, 9, 9, 9, 9, 0, 0, 0, 0, 0, 0, 0]);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn the_array_routes_output_by_index_with_kernel_errnos() {
        let (s, p) = store();
        let def = MapDef {
            map_type: MapType::PerfEventArray as u32,
            key_size: 4,
            value_size: 4,
            max_entries: 2,
            flags: 0,
        };
        let m = Map::create(&s, def, "events").unwrap();
        let id = event(&s);
        assert_eq!(output(&m, 0, &[1]), Err(libc::ENOENT));
        assert_eq!(output(&m, 2, &[1]), Err(libc::E2BIG));
        assert_eq!(set(&m, 0, id, 0).unwrap(), 0);
        assert_eq!(set(&m, 0, id, 1).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(output(&m, 0, &[1]), Err(libc::ENOSPC), "not mmapped yet");
        let ring = attach_ring(&s, id, 2).unwrap();
        output(&m, 0, &[1, 2, 3]).unwrap();
        assert_eq!(ring.read(|_, _| {}), 1);
        assert_eq!(held(&m), vec![id]);
        assert_eq!(clear(&m, 0).unwrap(), id);
        assert_eq!(clear(&m, 0).unwrap_err().errno(), libc::ENOENT);
        let mut v = [0u8; 4];
        assert_eq!(
            m.lookup(&0u32.to_ne_bytes(), &mut v).unwrap_err().errno(),
            524
        );
        std::fs::remove_file(p).unwrap();
    }
}
