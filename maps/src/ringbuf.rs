//! `BPF_MAP_TYPE_RINGBUF` in the kernel's memory layout, so an unmodified libbpf
//! `ring_buffer__poll` in the loader consumes what programs in other processes produce.
//!
//! Semantics and layout follow `kernel/bpf/ringbuf.c` (Linux 6.18) and
//! `Documentation/bpf/ringbuf.rst`:
//!
//! - The map's store payload is 4 pages: page 0 holds the map metadata and our private state
//!   (wake slot, drop counter); page 1 is the **consumer page** (`consumer_pos` at 0, mapped RW
//!   by the loader); page 2 the **producer page** (`producer_pos` at 0, `pending_pos` at 8 as in
//!   the kernel, and the reservation lock at 16; mapped RO). The data area (`max_entries` bytes,
//!   a power of two and a page multiple) is the map's data allocation. Loaders map
//!   `[consumer | producer | data | data]` (the data twice, back to back), as the kernel's
//!   `vmap` does; producers map the data twice too ([`crate::shm::Mirror`]), so a record that
//!   wraps around the end is contiguous in every process.
//! - A record is an 8-byte header `{ u32 len; u32 pg_off; }` then the sample, 8-byte aligned.
//!   `len` carries `BPF_RINGBUF_BUSY_BIT` (31) while reserved and `BPF_RINGBUF_DISCARD_BIT` (30)
//!   when discarded. `pg_off` is the kernel's value (pages from the start of `struct
//!   bpf_ringbuf`, whose data starts at page 3) once committed; while a record is busy it holds
//!   the reserving process's pid, so a record whose producer was killed before committing can
//!   be discarded by whoever finds it blocking the ring (the kernel needs no such recovery: its
//!   verifier guarantees every reservation is committed). The header is only ever changed as
//!   one 64-bit word (commit and recovery are compare-and-swaps of `{len, pg_off}`), so an
//!   owner is never read apart from the busy state it belongs to, and a live producer's record
//!   can never be taken for a dead one's.
//! - Reservation runs under a robust cross-process lock ([`crate::lock`], the kernel's
//!   `rb->spinlock`): read `consumer_pos`, advance `pending_pos` over committed records, check
//!   both space conditions, write the busy header, publish `producer_pos` (release). Commit is
//!   lock-free: one `xchg` of the header's `len`. Consumers stop at the first busy record, so
//!   records become visible in reservation order and never torn.
//! - A reservation fails (NULL) only when the ring is full (or the size is impossible); each
//!   failure for lack of space is counted ([`RingBuf::drops`]).
//! - Wake-ups: [`crate::wake`]; a commit wakes a sleeping consumer unless `BPF_RB_NO_WAKEUP`,
//!   and always with `BPF_RB_FORCE_WAKEUP`.
//!
//! Every position and header read from the store is untrusted (the loader can write the
//! consumer page; any process can write the store): positions use wrapping arithmetic, lengths
//! are bounds-checked, and a corrupt ring yields drops or stops a consumer, never a fault.

use crate::lock;
use crate::map::{BPF_F_NUMA_NODE, Map, MapDef, MapError, MapType};
use crate::shm::{Mirror, Segment, cached_pid, pid_alive};
use crate::store::StoreError;
use crate::wake;
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::sync::{Arc, OnceLock};

const PAGE: u64 = 4096;
/// Bytes of a ring buffer map's store payload (metadata + consumer page + producer page).
pub const PAYLOAD_LEN: u64 = 4 * PAGE;

// Page 0, after the 128-byte map metadata.
const P_MAGIC: u64 = 128;
const P_WAKE: u64 = 256;
const P_DROPS: u64 = 320;
const MAGIC: u64 = u64::from_le_bytes(*b"RINGBUF\x01");
// Consumer and producer pages.
const CONSUMER_POS: u64 = PAGE;
const PRODUCER_POS: u64 = 2 * PAGE;
const PENDING_POS: u64 = 2 * PAGE + 8;
const LOCK: u64 = 2 * PAGE + 16;
/// Bytes of ring one unlocked `pending_pos` advance scans at most.
const SCAN_CHUNK: u64 = 8192;
const _: () = assert!(P_DROPS + 8 <= PAGE && crate::map::meta::LEN <= P_MAGIC);

/// Offset of the consumer page in the map's payload (the loader maps it RW at file offset 0).
pub const CONSUMER_PAGE: u64 = PAGE;
/// Offset of the producer page in the map's payload (mapped RO at file offset one page).
pub const PRODUCER_PAGE: u64 = 2 * PAGE;

/// `BPF_RINGBUF_BUSY_BIT`.
pub const BPF_RINGBUF_BUSY_BIT: u32 = 1 << 31;
/// `BPF_RINGBUF_DISCARD_BIT`.
pub const BPF_RINGBUF_DISCARD_BIT: u32 = 1 << 30;
/// `BPF_RINGBUF_HDR_SZ`.
pub const BPF_RINGBUF_HDR_SZ: u64 = 8;
/// `RINGBUF_MAX_RECORD_SZ`.
pub const RINGBUF_MAX_RECORD_SZ: u64 = u32::MAX as u64 / 4;
/// `BPF_RB_NO_WAKEUP`.
pub const BPF_RB_NO_WAKEUP: u64 = 1;
/// `BPF_RB_FORCE_WAKEUP`.
pub const BPF_RB_FORCE_WAKEUP: u64 = 2;
/// `BPF_RB_AVAIL_DATA`.
pub const BPF_RB_AVAIL_DATA: u64 = 0;
/// `BPF_RB_RING_SIZE`.
pub const BPF_RB_RING_SIZE: u64 = 1;
/// `BPF_RB_CONS_POS`.
pub const BPF_RB_CONS_POS: u64 = 2;
/// `BPF_RB_PROD_POS`.
pub const BPF_RB_PROD_POS: u64 = 3;
/// Pages of the kernel's `struct bpf_ringbuf` before its data (`RINGBUF_PGOFF` + consumer and
/// producer pages): the base of the kernel's `pg_off`.
const DATA_PGOFF: u64 = 3;

/// This process's double mapping of a ring buffer's data, made on first use and shared by
/// clones of a [`Map`] handle.
pub(crate) type MirrorCell = Arc<OnceLock<Option<Mirror>>>;

/// `ringbuf_map_alloc`'s checks; the data length (`max_entries`).
pub(crate) fn check_def(def: &MapDef) -> Result<u64, MapError> {
    if def.flags & !BPF_F_NUMA_NODE != 0 {
        return Err(MapError::InvalidFlags {
            flags: u64::from(def.flags),
        });
    }
    let max = u64::from(def.max_entries);
    if def.key_size != 0 || def.value_size != 0 || !max.is_power_of_two() || max % PAGE != 0 {
        return Err(MapError::BadDefinition {
            what: "ring buffers need key_size 0, value_size 0 and a power-of-two, \
                   page-aligned max_entries",
        });
    }
    Ok(max)
}

/// A header word: `len` in the low half, `pg_off` in the high half (little-endian layout of
/// `struct bpf_ringbuf_hdr`).
#[inline]
fn header(len: u32, pg_off: u32) -> u64 {
    u64::from(len) | (u64::from(pg_off) << 32)
}

/// The kernel's `pg_off` of a header at data offset `h`.
#[inline]
fn kernel_pg_off(h: u64) -> u32 {
    (DATA_PGOFF + (h >> 12)) as u32
}

/// Initializes a new ring buffer's private state (positions start zeroed).
pub(crate) fn init(map: &Map) -> Result<(), MapError> {
    let a = map
        .store
        .segment()
        .atomic_u64(map.meta_off + P_MAGIC)
        .ok_or(MapError::Store(StoreError::Corrupt { what: "ringbuf" }))?;
    a.store(MAGIC, Ordering::Release);
    Ok(())
}

#[inline]
fn rec_len(hdr_len: u32) -> u64 {
    (u64::from(hdr_len & !BPF_RINGBUF_DISCARD_BIT) + BPF_RINGBUF_HDR_SZ).div_ceil(8) * 8
}

/// A reserved record: commit it with [`RingBuf::submit`] or [`RingBuf::discard`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// Ring position of the record's header (`producer_pos` when it was reserved).
    pub pos: u64,
    /// Sample bytes.
    pub size: u32,
    /// Address of the sample in this process (inside the double mapping).
    pub addr: usize,
}

/// A ring buffer map, seen through one of this process's [`Map`] handles.
#[derive(Debug, Clone, Copy)]
pub struct RingBuf<'a> {
    map: &'a Map,
    seg: &'a Segment,
    meta: u64,
    data: u64,
    size: u64,
}

impl<'a> RingBuf<'a> {
    /// The ring buffer behind `map` (`InvalidOp` if it is another map type).
    pub fn new(map: &'a Map) -> Result<RingBuf<'a>, MapError> {
        if map.def.map_type != MapType::RingBuf as u32 {
            return Err(MapError::InvalidOp);
        }
        Ok(RingBuf {
            map,
            seg: map.store.segment(),
            meta: map.meta_off,
            data: map.data_off,
            size: map.data_len,
        })
    }

    /// Data bytes (`max_entries`).
    pub fn size(&self) -> u64 {
        self.size
    }

    #[inline]
    fn mask(&self) -> u64 {
        self.size - 1
    }

    #[inline]
    fn word(&self, off: u64) -> Option<&'a AtomicU64> {
        self.seg.atomic_u64(self.meta + off)
    }

    /// This process's double mapping of the data (made on first use).
    pub fn mirror(&self) -> Option<&'a Mirror> {
        self.map
            .mirror
            .get_or_init(|| match self.seg.mirror(self.data, self.size as usize) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing_like_warn(&format!("cannot map ring buffer data twice: {e}"));
                    None
                }
            })
            .as_ref()
    }

    /// Store offset of the wake slot (for [`crate::wake`]).
    pub fn wake_slot(&self) -> u64 {
        self.meta + P_WAKE
    }

    /// Store offset of the consumer page (page-aligned).
    pub fn consumer_page(&self) -> u64 {
        self.meta + CONSUMER_PAGE
    }

    /// Store offset of the producer page (page-aligned).
    pub fn producer_page(&self) -> u64 {
        self.meta + PRODUCER_PAGE
    }

    /// Store offset of the data area (page-aligned).
    pub fn data_offset(&self) -> u64 {
        self.data
    }

    /// Reservations refused because the ring was full.
    pub fn drops(&self) -> u64 {
        self.word(P_DROPS).map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// `consumer_pos`.
    pub fn consumer_pos(&self) -> u64 {
        self.word(CONSUMER_POS)
            .map_or(0, |a| a.load(Ordering::Acquire))
    }

    /// `producer_pos`.
    pub fn producer_pos(&self) -> u64 {
        self.word(PRODUCER_POS)
            .map_or(0, |a| a.load(Ordering::Acquire))
    }

    /// Advances `pend` over committed records up to `prod` (the kernel's `pending_pos` scan).
    fn scan_pending(&self, m: &Mirror, mut pend: u64, prod: u64) -> u64 {
        let mask = self.mask();
        while pend < prod {
            let Some(h) = m.atomic_u32((pend & mask) as usize) else {
                break;
            };
            let len = h.load(Ordering::Acquire);
            if len & BPF_RINGBUF_BUSY_BIT != 0 {
                break;
            }
            pend = pend.wrapping_add(rec_len(len));
        }
        pend.min(prod)
    }

    /// Advances `pending_pos` from `pend` over at most [`SCAN_CHUNK`] committed records below
    /// `prod`, without the reservation lock. Safe because nothing overwrites the records at or
    /// after `pending_pos` while it keeps a value (a reservation must end within one ring size
    /// of it): the scan reads this lap's headers for as long as `pending_pos` is still `pend`,
    /// and the compare-and-swap that publishes the result fails otherwise.
    fn advance_pending(&self, m: &Mirror, pend_a: &AtomicU64, pend: u64, prod: u64) {
        let end = prod.min(pend.saturating_add(SCAN_CHUNK));
        let mask = self.mask();
        let mut new = pend;
        // Stops on a record boundary: at the first busy record, or the first at or past `end`.
        while new < end {
            let Some(h) = m.atomic_u32((new & mask) as usize) else {
                break;
            };
            let len = h.load(Ordering::Acquire);
            let next = new.wrapping_add(rec_len(len));
            if len & BPF_RINGBUF_BUSY_BIT != 0 || next > prod {
                break;
            }
            new = next;
        }
        if new != pend {
            let _ = pend_a.compare_exchange(pend, new, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// If the busy record at `pos` belongs to a process that no longer exists, discards it (so
    /// it stops blocking the ring). True if it did.
    fn recover(&self, pos: u64) -> bool {
        let h = pos & self.mask();
        // Headers are 8-byte aligned, so they never straddle the end: the store's single
        // mapping of the data is enough (no mirror needed by the consumer side).
        let Some(w) = self.seg.atomic_u64(self.data + h) else {
            return false;
        };
        let cur = w.load(Ordering::Acquire);
        let (len, owner) = (cur as u32, (cur >> 32) as u32);
        if len & BPF_RINGBUF_BUSY_BIT == 0 || pid_alive(owner) {
            return false;
        }
        let discarded = (len & !BPF_RINGBUF_BUSY_BIT) | BPF_RINGBUF_DISCARD_BIT;
        // Fails if the owner committed meanwhile (the word changed).
        w.compare_exchange(
            cur,
            header(discarded, kernel_pg_off(h)),
            Ordering::SeqCst,
            Ordering::Relaxed,
        )
        .is_ok()
    }

    /// `bpf_ringbuf_reserve`: room for a `size`-byte sample, or `None` when the ring is full
    /// (counted as a drop) or `size` is impossible.
    pub fn reserve(&self, size: u64) -> Option<Reservation> {
        if size > RINGBUF_MAX_RECORD_SZ {
            return None;
        }
        let len = (size + BPF_RINGBUF_HDR_SZ).div_ceil(8) * 8;
        if len > self.size {
            return None;
        }
        let m = self.mirror()?;
        let mask = self.mask();
        let (cons_a, prod_a, pend_a) = (
            self.word(CONSUMER_POS)?,
            self.word(PRODUCER_POS)?,
            self.word(PENDING_POS)?,
        );
        let cons = cons_a.load(Ordering::Acquire);
        // Keep `pending_pos` close behind outside the lock, so the locked path need not scan.
        let (prod_seen, pend_seen) = (
            prod_a.load(Ordering::Relaxed),
            pend_a.load(Ordering::Relaxed),
        );
        if prod_seen.wrapping_sub(pend_seen) > self.size / 4 {
            self.advance_pending(m, pend_a, pend_seen, prod_seen);
        }
        let guard = lock::lock(self.word(LOCK)?);
        let prod = prod_a.load(Ordering::Relaxed);
        let new_prod = prod.wrapping_add(len);
        let fits =
            |pend: u64| new_prod.wrapping_sub(cons) <= mask && new_prod.wrapping_sub(pend) <= mask;
        // `pending_pos` only grows, so a reservation that fits behind its stored value fits
        // behind the true one: the scan over committed records (which also finds a dead
        // producer's record blocking the consumer) is needed only when it does not.
        let mut pend = pend_a.load(Ordering::Relaxed);
        if !fits(pend) {
            pend = self.scan_pending(m, pend, prod);
            if !fits(pend) {
                // A record whose producer died before committing blocks the ring forever.
                let blocked = pend < prod && self.recover(pend);
                if blocked {
                    pend = self.scan_pending(m, pend, prod);
                }
                if !blocked || !fits(pend) {
                    pend_a.fetch_max(pend, Ordering::Relaxed);
                    drop(guard);
                    if let Some(d) = self.word(P_DROPS) {
                        d.fetch_add(1, Ordering::Relaxed);
                    }
                    return None;
                }
            }
            pend_a.fetch_max(pend, Ordering::Relaxed);
        }
        let h = (prod & mask) as usize;
        m.atomic_u64(h)?.store(
            header(size as u32 | BPF_RINGBUF_BUSY_BIT, cached_pid()),
            Ordering::Relaxed,
        );
        // Pairs with the consumer's acquire load of producer_pos.
        prod_a.store(new_prod, Ordering::Release);
        drop(guard);
        Some(Reservation {
            pos: prod,
            size: size as u32,
            addr: m.base() + h + BPF_RINGBUF_HDR_SZ as usize,
        })
    }

    /// Commits the record at ring position `pos` (`bpf_ringbuf_commit`): clears the busy bit
    /// (setting the discard bit if `discard`) and wakes the consumer per `flags`. False, doing
    /// nothing, if no busy record is there.
    pub fn commit(&self, pos: u64, discard: bool, flags: u64) -> bool {
        let Some(m) = self.mirror() else {
            return false;
        };
        let h = (pos & self.mask()) as usize;
        let Some(w) = m.atomic_u64(h) else {
            return false;
        };
        let cur = w.load(Ordering::Relaxed);
        if cur as u32 & BPF_RINGBUF_BUSY_BIT == 0 {
            return false;
        }
        let mut len = cur as u32 ^ BPF_RINGBUF_BUSY_BIT;
        if discard {
            len |= BPF_RINGBUF_DISCARD_BIT;
        }
        // One CAS of `{len, pg_off}` (the kernel's `xchg(&hdr->len)`, plus the pg_off that held
        // our pid); it fails only if the record was discarded as a dead producer's. SeqCst:
        // orders the commit before the read of the wake slot (see `wake`).
        if w.compare_exchange(
            cur,
            header(len, kernel_pg_off(h as u64)),
            Ordering::SeqCst,
            Ordering::Relaxed,
        )
        .is_err()
        {
            return false;
        }
        let force = flags & BPF_RB_FORCE_WAKEUP != 0;
        if force || flags & BPF_RB_NO_WAKEUP == 0 {
            wake::notify(self.seg, self.wake_slot(), force);
        }
        true
    }

    /// `bpf_ringbuf_submit`.
    pub fn submit(&self, r: &Reservation, flags: u64) -> bool {
        self.commit(r.pos, false, flags)
    }

    /// `bpf_ringbuf_discard`.
    pub fn discard(&self, r: &Reservation, flags: u64) -> bool {
        self.commit(r.pos, true, flags)
    }

    /// Copies `data` into a reserved record.
    pub fn write(&self, r: &Reservation, data: &[u8]) -> Option<()> {
        if data.len() > r.size as usize {
            return None;
        }
        let m = self.mirror()?;
        let pos = m.position_of(r.addr, data.len())?;
        m.write(pos, data)
    }

    /// `bpf_ringbuf_output`: reserve, copy, submit. `Err` is the kernel's errno (`EINVAL` for
    /// bad flags, `EAGAIN` when full).
    pub fn output(&self, data: &[u8], flags: u64) -> Result<(), i32> {
        if flags & !(BPF_RB_NO_WAKEUP | BPF_RB_FORCE_WAKEUP) != 0 {
            return Err(libc::EINVAL);
        }
        let r = self.reserve(data.len() as u64).ok_or(libc::EAGAIN)?;
        if self.write(&r, data).is_none() {
            self.commit(r.pos, true, BPF_RB_NO_WAKEUP);
            return Err(libc::EFAULT);
        }
        self.commit(r.pos, false, flags);
        Ok(())
    }

    /// `bpf_ringbuf_query`.
    pub fn query(&self, flags: u64) -> u64 {
        match flags {
            BPF_RB_AVAIL_DATA => self.producer_pos().wrapping_sub(self.consumer_pos()),
            BPF_RB_RING_SIZE => self.size,
            BPF_RB_CONS_POS => self.consumer_pos(),
            BPF_RB_PROD_POS => self.producer_pos(),
            _ => 0,
        }
    }

    /// Whether a consumer would find a record to read now (the record at `consumer_pos` is
    /// committed; a busy one left by a dead producer is discarded first).
    pub fn available(&self) -> bool {
        let (cons, prod) = (self.consumer_pos(), self.producer_pos());
        if prod.wrapping_sub(cons).wrapping_sub(1) >= self.size {
            return false; // empty (or a corrupt consumer_pos)
        }
        let h = cons & self.mask();
        let Some(len) = self.seg.atomic_u32(self.data + h) else {
            return false;
        };
        if len.load(Ordering::Acquire) & BPF_RINGBUF_BUSY_BIT == 0 {
            return true;
        }
        self.recover(cons)
    }

    /// Consumer: the socket `nonce` is about to sleep; true if a record is available already
    /// (then the caller must not sleep, or must signal itself).
    pub fn arm(&self, nonce: u64) -> bool {
        wake::arm(self.seg, self.wake_slot(), nonce);
        fence(Ordering::SeqCst);
        self.available()
    }

    /// Consumer: awake again.
    pub fn disarm(&self) {
        wake::disarm(self.seg, self.wake_slot());
    }

    /// Consumer (as libbpf's `ringbuf_process_ring`): calls `f` with each committed sample in
    /// order, skipping discarded ones, advancing `consumer_pos` (once per batch, so producers,
    /// which read it on every reservation, see its cache line change less often); stops at the
    /// first busy record. Returns the number of samples seen. A corrupt header stops
    /// consumption.
    pub fn consume(&self, mut f: impl FnMut(&[u8])) -> usize {
        let (Some(m), Some(cons_a), Some(prod_a)) = (
            self.mirror(),
            self.word(CONSUMER_POS),
            self.word(PRODUCER_POS),
        ) else {
            return 0;
        };
        let mask = self.mask();
        let mut cons = cons_a.load(Ordering::Acquire);
        let mut n = 0;
        let mut buf = Vec::new();
        loop {
            let prod = prod_a.load(Ordering::Acquire);
            let start = cons;
            while cons < prod {
                let h = (cons & mask) as usize;
                let len = match m.atomic_u32(h) {
                    Some(hl) => hl.load(Ordering::Acquire),
                    None => break,
                };
                let sample = (len & !BPF_RINGBUF_DISCARD_BIT) as usize;
                if len & BPF_RINGBUF_BUSY_BIT != 0 || sample as u64 > self.size - BPF_RINGBUF_HDR_SZ
                {
                    break;
                }
                if len & BPF_RINGBUF_DISCARD_BIT == 0 {
                    buf.resize(sample, 0);
                    if m.read(h + BPF_RINGBUF_HDR_SZ as usize, &mut buf).is_none() {
                        break;
                    }
                    f(&buf);
                    n += 1;
                }
                cons = cons.wrapping_add(rec_len(len));
            }
            if cons == start {
                return n;
            }
            cons_a.store(cons, Ordering::Release);
        }
    }
}

/// The warning sink of this crate (it has no logger): stderr only when `BPFTIME_LOG` is set.
fn tracing_like_warn(msg: &str) {
    if std::env::var_os("BPFTIME_LOG").is_some() {
        eprintln!("bpftime: {msg}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;
    use std::path::PathBuf;

    fn ring(size: u32) -> (Map, PathBuf) {
        let p = std::env::temp_dir().join(format!(
            "bpftime-rb-unit-{}-{}",
            std::process::id(),
            crate::shm::monotonic_raw_ns()
        ));
        let s = Arc::new(Store::open(&p).unwrap());
        let def = MapDef {
            map_type: MapType::RingBuf as u32,
            key_size: 0,
            value_size: 0,
            max_entries: size,
            flags: 0,
        };
        (Map::create(&s, def, "rb").unwrap(), p)
    }

    #[test]
    fn definitions_are_checked_like_the_kernel() {
        let d = |k, v, max, flags| MapDef {
            map_type: MapType::RingBuf as u32,
            key_size: k,
            value_size: v,
            max_entries: max,
            flags,
        };
        assert!(check_def(&d(0, 0, 4096, 0)).is_ok());
        assert!(check_def(&d(0, 0, 1 << 31, BPF_F_NUMA_NODE)).is_ok());
        for bad in [
            d(4, 0, 4096, 0),
            d(0, 4, 4096, 0),
            d(0, 0, 2048, 0),
            d(0, 0, 3 * 4096, 0),
            d(0, 0, 4096, 1),
        ] {
            assert_eq!(check_def(&bad).unwrap_err().errno(), libc::EINVAL);
        }
    }

    #[test]
    fn records_round_trip_and_wrap_contiguously() {
        let (m, p) = ring(4096);
        let rb = RingBuf::new(&m).unwrap();
        let mut got = Vec::new();
        // 100-byte samples are 112-byte records: 36 fill 4032 bytes, the next wraps.
        for round in 0..5u8 {
            for i in 0..30u8 {
                rb.output(&[round ^ i; 100], 0).unwrap();
            }
            rb.consume(|s| got.push(s.to_vec()));
        }
        assert_eq!(got.len(), 150);
        for (k, s) in got.iter().enumerate() {
            let (round, i) = ((k / 30) as u8, (k % 30) as u8);
            assert_eq!(s, &vec![round ^ i; 100], "sample {k}");
        }
        assert_eq!(rb.drops(), 0);
        assert_eq!(rb.query(BPF_RB_AVAIL_DATA), 0);
        assert_eq!(rb.query(BPF_RB_PROD_POS), 150 * 112);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_full_ring_refuses_and_counts_drops() {
        let (m, p) = ring(4096);
        let rb = RingBuf::new(&m).unwrap();
        // 504-byte samples are 512-byte records: 7 fit (the ring keeps one byte free).
        let mut ok = 0;
        for _ in 0..10 {
            if rb.output(&[7; 504], 0).is_ok() {
                ok += 1;
            }
        }
        assert_eq!(ok, 7);
        assert_eq!(rb.drops(), 3);
        assert_eq!(rb.output(&[0; 8], 8).unwrap_err(), libc::EINVAL);
        assert!(rb.reserve(4096).is_none(), "larger than the ring");
        assert_eq!(rb.consume(|s| assert_eq!(s, &[7; 504][..])), 7);
        assert!(rb.output(&[7; 504], 0).is_ok());
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn consumer_stops_at_a_busy_record_and_skips_discarded_ones() {
        let (m, p) = ring(4096);
        let rb = RingBuf::new(&m).unwrap();
        let a = rb.reserve(8).unwrap();
        let b = rb.reserve(8).unwrap();
        let c = rb.reserve(8).unwrap();
        rb.write(&a, &1u64.to_ne_bytes()).unwrap();
        rb.write(&c, &3u64.to_ne_bytes()).unwrap();
        assert!(rb.submit(&c, 0));
        assert!(!rb.available(), "a is still busy");
        assert_eq!(rb.consume(|_| panic!("nothing is ready")), 0);
        assert!(rb.submit(&a, 0));
        assert!(rb.discard(&b, 0));
        assert!(!rb.submit(&b, 0), "already committed");
        let mut got = Vec::new();
        rb.consume(|s| got.push(u64::from_ne_bytes(s.try_into().unwrap())));
        assert_eq!(got, vec![1, 3]);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_dead_producers_reservation_is_discarded() {
        let (m, p) = ring(4096);
        let rb = RingBuf::new(&m).unwrap();
        let r = rb.reserve(16).unwrap();
        // Pretend a process that cannot exist reserved it.
        let mirror = rb.mirror().unwrap();
        mirror
            .atomic_u32((r.pos & 4095) as usize + 4)
            .unwrap()
            .store(0x7fff_fff0, Ordering::Relaxed);
        assert!(rb.available(), "the dead record is discarded");
        rb.output(&[5; 8], 0).unwrap();
        let mut got = Vec::new();
        rb.consume(|s| got.push(s.to_vec()));
        assert_eq!(got, vec![vec![5; 8]]);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn pending_pos_moves_only_over_committed_records() {
        let (m, p) = ring(16384);
        let rb = RingBuf::new(&m).unwrap();
        let pend = || rb.word(PENDING_POS).unwrap().load(Ordering::Relaxed);
        // 24-byte samples are 32-byte records. 200 committed, one busy, 100 committed: more
        // than a quarter ring behind the producer, so reservations advance pending_pos.
        for _ in 0..200 {
            rb.output(&[1; 24], 0).unwrap();
        }
        let busy = rb.reserve(24).unwrap();
        for _ in 0..100 {
            rb.output(&[2; 24], 0).unwrap();
        }
        assert!(pend() > 0, "pending_pos advanced");
        assert!(pend() <= busy.pos, "never past a busy record");
        // The consumer stops at the busy record; after it, the ring fills up to pending_pos
        // (one ring behind), so producers are refused until the record is committed.
        assert_eq!(rb.consume(|_| {}), 200);
        let mut more = 0;
        while rb.output(&[3; 24], 0).is_ok() {
            more += 1;
        }
        assert!(more > 0 && rb.drops() > 0);
        assert!(pend() <= busy.pos);
        rb.write(&busy, &[9; 24]).unwrap();
        assert!(rb.submit(&busy, 0));
        let mut seen = Vec::new();
        rb.consume(|s| seen.push(s[0]));
        assert_eq!(seen[0], 9);
        assert_eq!(seen.len(), 1 + 100 + more);
        // With the record committed, reservations go on (pending_pos catches up).
        for _ in 0..1000 {
            rb.output(&[4; 24], 0).unwrap();
            rb.consume(|_| {});
        }
        assert!(pend() > busy.pos);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn headers_carry_the_kernels_page_offset_once_committed() {
        let (m, p) = ring(8192);
        let rb = RingBuf::new(&m).unwrap();
        let mirror = rb.mirror().unwrap();
        for _ in 0..6 {
            rb.output(&[0; 1000], 0).unwrap();
        }
        // Record 4 starts at 4 × 1008 = 4032 (page 0), record 5 at 5040 (page 1).
        let pg = |pos: usize| mirror.atomic_u32(pos + 4).unwrap().load(Ordering::Relaxed);
        assert_eq!(pg(4032), 3);
        assert_eq!(pg(4032 + 1008), 4);
        std::fs::remove_file(p).unwrap();
    }
}
