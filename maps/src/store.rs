//! The store: a header, an allocator and an object table inside one [`Segment`].
//!
//! Layout (all offsets from the start of the file):
//!
//! | offset | size | what |
//! |---|---|---|
//! | 0 | 512 | [`Header`]: magic, layout version, owner uid, generation counter, allocator state |
//! | 4096 | `OBJECT_SLOTS` × 64 | object table: one [`ObjectSlot`] per object id (id = index + 1) |
//! | after | grows | allocations: object payloads (map metadata, program bytecode, …) and map data |
//!
//! The allocator hands out power-of-two blocks (64 B and up) from per-size free lists, else from
//! a bump pointer, growing the file when it runs out: there is no cap but memory and the address
//! space reserved per process ([`crate::shm::DEFAULT_RESERVE`]). Its state is guarded by a
//! [`crate::lock`] that survives a killed holder; a holder dying mid-allocation leaks at most
//! one block.
//!
//! Object slots go FREE → RESERVED (payload being written by its creator) → LIVE; readers only
//! trust LIVE slots and validate every offset they read. Each publish or removal bumps the
//! generation counter and wakes its futex waiters, so agents notice new and removed objects.

use crate::lock;
use crate::shm::{DEFAULT_RESERVE, Segment, euid, flock, futex_wait, futex_wake_all};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// "BPFTIME\x01" little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"BPFTIME\x01");
/// Layout version; bump on any change to the shared layout.
pub const LAYOUT_VERSION: u32 = 2;
/// Bytes reserved for the header.
pub const HEADER_LEN: u64 = 512;
/// Offset of the object table.
pub const OBJECTS_OFF: u64 = 4096;
/// Object table capacity (object ids are 1..=OBJECT_SLOTS).
pub const OBJECT_SLOTS: u32 = 16384;
/// Size of one object slot.
pub const SLOT_LEN: u64 = 64;
/// How long a freed block stays unused before it can be handed out again.
pub const FREE_GRACE_NS: u64 = 2_000_000_000;
const MIN_CLASS: u32 = 6;
const MAX_CLASS: u32 = 40;
const N_CLASSES: usize = (MAX_CLASS - MIN_CLASS + 1) as usize;

// Header field offsets.
const H_MAGIC: u64 = 0;
const H_VERSION: u64 = 8;
const H_UID: u64 = 16;
const H_GENERATION: u64 = 24;
const H_ALLOC_LOCK: u64 = 32;
const H_BUMP: u64 = 40;
const H_FREE: u64 = 64;
const _: () = assert!(H_FREE + 8 * N_CLASSES as u64 <= HEADER_LEN);
const DATA_START: u64 = OBJECTS_OFF + OBJECT_SLOTS as u64 * SLOT_LEN;

// Object slot field offsets.
const S_STATE: u64 = 0;
const S_KIND: u64 = 4;
const S_REFS: u64 = 8;
const S_OWNER: u64 = 12;
const S_PAYLOAD_OFF: u64 = 16;
const S_PAYLOAD_LEN: u64 = 24;
const S_NAME: u64 = 32;
const S_OWNER_START: u64 = 52;
const _: () = assert!(S_OWNER_START + 4 <= SLOT_LEN);

const FREE: u32 = 0;
const RESERVED: u32 = 1;
const LIVE: u32 = 2;

/// Errors of the store itself.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An OS call failed.
    #[error("store {path}: {source}")]
    Io {
        /// Store path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The file is not a store of this layout.
    #[error("store {path} has an unknown layout (magic {magic:#x}, version {version})")]
    BadLayout {
        /// Store path.
        path: PathBuf,
        /// Magic found.
        magic: u64,
        /// Version found.
        version: u32,
    },
    /// No memory left for an allocation.
    #[error("store is out of memory ({requested} bytes requested)")]
    OutOfMemory {
        /// Bytes.
        requested: u64,
    },
    /// All object slots are used.
    #[error("object table is full ({OBJECT_SLOTS} objects)")]
    TableFull,
    /// An offset or id from the store failed validation.
    #[error("corrupt store: {what}")]
    Corrupt {
        /// What.
        what: &'static str,
    },
}

impl StoreError {
    /// The errno the kernel would report for this condition.
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            StoreError::BadLayout { .. } => libc::EINVAL,
            StoreError::OutOfMemory { .. } | StoreError::TableFull => libc::ENOMEM,
            StoreError::Corrupt { .. } => libc::EFAULT,
        }
    }
}

/// Kinds of objects in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ObjectKind {
    /// A map (payload: map metadata).
    Map = 1,
    /// A program.
    Prog = 2,
    /// BTF data.
    Btf = 3,
    /// A link (program attached to a perf event / target).
    Link = 4,
    /// A perf event (uprobe, tracepoint, software event).
    PerfEvent = 5,
    /// An agent attached to a process (for `bpftime list`).
    Agent = 6,
}

impl ObjectKind {
    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Map,
            2 => Self::Prog,
            3 => Self::Btf,
            4 => Self::Link,
            5 => Self::PerfEvent,
            6 => Self::Agent,
            _ => return None,
        })
    }
}

/// A snapshot of a live object slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Object id.
    pub id: u32,
    /// Kind.
    pub kind: ObjectKind,
    /// Creator's pid.
    pub owner_pid: u32,
    /// Payload offset.
    pub payload_off: u64,
    /// Payload length.
    pub payload_len: u64,
    /// Name (up to 16 bytes, NUL-trimmed).
    pub name: String,
    /// Reference count.
    pub refs: u32,
}

/// An open store.
#[derive(Debug)]
pub struct Store {
    seg: Segment,
    path: PathBuf,
}

/// Default store path for this user and `name`: `/dev/shm/bpftime-<uid>-<name>`.
pub fn default_path(name: &str) -> PathBuf {
    let uid = euid();
    PathBuf::from(format!("/dev/shm/bpftime-{uid}-{name}"))
}

impl Store {
    /// Opens or creates the store at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let io_err = |source| StoreError::Io {
            path: path.to_owned(),
            source,
        };
        let seg = Segment::open(path, DEFAULT_RESERVE).map_err(io_err)?;
        // Initialize under an exclusive file lock so concurrent creators agree.
        flock(seg.fd(), libc::LOCK_EX).map_err(io_err)?;
        let r = Self::init_locked(&seg, path);
        let _ = flock(seg.fd(), libc::LOCK_UN);
        r?;
        Ok(Store {
            seg,
            path: path.to_owned(),
        })
    }

    fn init_locked(seg: &Segment, path: &Path) -> Result<(), StoreError> {
        let io_err = |source| StoreError::Io {
            path: path.to_owned(),
            source,
        };
        if seg.file_len().map_err(io_err)? == 0 {
            seg.grow(DATA_START as usize).map_err(io_err)?;
            let h = |off| seg.atomic_u64(off).expect("header is mapped after grow");
            let uid = euid();
            seg.atomic_u32(H_VERSION)
                .expect("mapped")
                .store(LAYOUT_VERSION, Ordering::Relaxed);
            seg.atomic_u32(H_UID)
                .expect("mapped")
                .store(uid, Ordering::Relaxed);
            h(H_BUMP).store(DATA_START, Ordering::Relaxed);
            h(H_MAGIC).store(MAGIC, Ordering::Release);
        }
        let magic = seg
            .atomic_u64(H_MAGIC)
            .map(|a| a.load(Ordering::Acquire))
            .unwrap_or(0);
        let version = seg
            .atomic_u32(H_VERSION)
            .map(|a| a.load(Ordering::Relaxed))
            .unwrap_or(0);
        if magic != MAGIC || version != LAYOUT_VERSION {
            return Err(StoreError::BadLayout {
                path: path.to_owned(),
                magic,
                version,
            });
        }
        Ok(())
    }

    /// Opens the store `name` at its default path.
    pub fn open_named(name: &str) -> Result<Store, StoreError> {
        Self::open(&default_path(name))
    }

    /// The store's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The mapped segment.
    pub fn segment(&self) -> &Segment {
        &self.seg
    }

    fn hdr64(&self, off: u64) -> &AtomicU64 {
        self.seg.atomic_u64(off).expect("header is always mapped")
    }

    /// The generation counter (bumped whenever objects are published or removed).
    pub fn generation(&self) -> u32 {
        self.generation_word().load(Ordering::Acquire)
    }

    fn generation_word(&self) -> &AtomicU32 {
        self.seg
            .atomic_u32(H_GENERATION)
            .expect("header is always mapped")
    }

    /// Waits until the generation differs from `seen`, or `timeout_ns` passes.
    pub fn wait_generation(&self, seen: u32, timeout_ns: u64) -> u32 {
        let w = self.generation_word();
        if w.load(Ordering::Acquire) == seen {
            futex_wait(w, seen, timeout_ns);
        }
        w.load(Ordering::Acquire)
    }

    /// Bumps the generation so agents re-read the object table (after a mutable field of a
    /// live object changed, e.g. a perf event was enabled).
    pub fn touch(&self) {
        self.bump_generation();
    }

    fn bump_generation(&self) {
        let w = self.generation_word();
        w.fetch_add(1, Ordering::AcqRel);
        futex_wake_all(w);
    }

    fn class_of(len: u64) -> Option<u32> {
        let len = len.max(1 << MIN_CLASS);
        let c = 64 - (len - 1).leading_zeros();
        (c <= MAX_CLASS).then_some(c)
    }

    /// Allocates `len` bytes (zeroed, 64-byte aligned; page-aligned when `len` ≥ 4096).
    ///
    /// A freed block is reused only after [`FREE_GRACE_NS`]: an agent still running a program
    /// over a map that was just removed keeps writing into memory nobody else owns until it
    /// notices (within its rescan interval, far shorter than the grace period).
    pub fn alloc(&self, len: u64) -> Result<u64, StoreError> {
        let class = Self::class_of(len).ok_or(StoreError::OutOfMemory { requested: len })?;
        let size = 1u64 << class;
        let _g = lock::lock(self.hdr64(H_ALLOC_LOCK));
        let head = self.hdr64(H_FREE + 8 * u64::from(class - MIN_CLASS));
        let reusable = match head.load(Ordering::Acquire) {
            0 => None,
            off => {
                if off < DATA_START || !off.is_multiple_of(64) {
                    return Err(StoreError::Corrupt {
                        what: "free list head",
                    });
                }
                let link = |field: u64| {
                    self.seg
                        .atomic_u64(off + field)
                        .map(|a| a.load(Ordering::Acquire))
                        .ok_or(StoreError::Corrupt {
                            what: "free list link",
                        })
                };
                let (next, freed_at) = (link(0)?, link(8)?);
                // The head is the most recently freed block: if it is still in its grace
                // period, bump-allocate instead.
                (monotonic_ns().saturating_sub(freed_at) >= FREE_GRACE_NS).then_some((off, next))
            }
        };
        let off = match reusable {
            Some((off, next)) => {
                head.store(next, Ordering::Release);
                // Reused memory holds old data: clear it.
                self.seg
                    .zero(off, size as usize)
                    .ok_or(StoreError::Corrupt { what: "allocation" })?;
                off
            }
            None => {
                // Fresh space past the bump pointer was never written (the file only grows):
                // it reads as zeroes without touching its pages.
                let bump = self.hdr64(H_BUMP);
                let align = size.min(4096);
                let start = bump.load(Ordering::Acquire).div_ceil(align) * align;
                let end = start
                    .checked_add(size)
                    .ok_or(StoreError::OutOfMemory { requested: len })?;
                if end as usize > self.seg.mapped() {
                    let cur = self.seg.file_len().unwrap_or(0) as u64;
                    let want = end.max(cur.saturating_mul(2));
                    if self.seg.grow(want as usize).is_err() && self.seg.grow(end as usize).is_err()
                    {
                        return Err(StoreError::OutOfMemory { requested: len });
                    }
                }
                bump.store(end, Ordering::Release);
                start
            }
        };
        Ok(off)
    }

    /// Returns a block from [`Store::alloc`] of the same `len`.
    pub fn free(&self, off: u64, len: u64) {
        let Some(class) = Self::class_of(len) else {
            return;
        };
        if off < DATA_START
            || !off.is_multiple_of(64)
            || self.seg.range(off, 1usize << class).is_none()
        {
            return;
        }
        let _g = lock::lock(self.hdr64(H_ALLOC_LOCK));
        let head = self.hdr64(H_FREE + 8 * u64::from(class - MIN_CLASS));
        let (Some(link), Some(stamp)) = (self.seg.atomic_u64(off), self.seg.atomic_u64(off + 8))
        else {
            return;
        };
        stamp.store(monotonic_ns(), Ordering::Release);
        link.store(head.load(Ordering::Acquire), Ordering::Release);
        head.store(off, Ordering::Release);
    }

    fn slot_off(id: u32) -> Option<u64> {
        (1..=OBJECT_SLOTS)
            .contains(&id)
            .then(|| OBJECTS_OFF + u64::from(id - 1) * SLOT_LEN)
    }

    fn slot32(&self, id: u32, field: u64) -> &AtomicU32 {
        let off = Self::slot_off(id).expect("valid id") + field;
        self.seg
            .atomic_u32(off)
            .expect("object table is always mapped")
    }

    fn slot64(&self, id: u32, field: u64) -> &AtomicU64 {
        let off = Self::slot_off(id).expect("valid id") + field;
        self.seg
            .atomic_u64(off)
            .expect("object table is always mapped")
    }

    /// Reserves an object id and allocates its payload. The object is invisible to others
    /// until [`Store::publish`].
    pub fn create(
        &self,
        kind: ObjectKind,
        name: &str,
        payload_len: u64,
    ) -> Result<(u32, u64), StoreError> {
        let payload = self.alloc(payload_len.max(1))?;
        for id in 1..=OBJECT_SLOTS {
            if self
                .slot32(id, S_STATE)
                .compare_exchange(FREE, RESERVED, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                self.slot32(id, S_KIND)
                    .store(kind as u32, Ordering::Relaxed);
                self.slot32(id, S_REFS).store(1, Ordering::Relaxed);
                let pid = std::process::id();
                self.slot32(id, S_OWNER).store(pid, Ordering::Relaxed);
                self.slot32(id, S_OWNER_START).store(
                    lock::process_start_time(pid).unwrap_or(0) as u32,
                    Ordering::Relaxed,
                );
                self.slot64(id, S_PAYLOAD_OFF)
                    .store(payload, Ordering::Relaxed);
                self.slot64(id, S_PAYLOAD_LEN)
                    .store(payload_len, Ordering::Relaxed);
                let mut n = [0u8; 16];
                let b = name.as_bytes();
                let l = b.len().min(15);
                n[..l].copy_from_slice(&b[..l]);
                let slot = Self::slot_off(id).expect("valid id");
                self.seg
                    .write(slot + S_NAME, &n)
                    .ok_or(StoreError::Corrupt {
                        what: "object slot",
                    })?;
                return Ok((id, payload));
            }
        }
        self.free(payload, payload_len.max(1));
        Err(StoreError::TableFull)
    }

    /// Makes a created object visible and bumps the generation.
    pub fn publish(&self, id: u32) {
        if Self::slot_off(id).is_some() {
            self.slot32(id, S_STATE).store(LIVE, Ordering::Release);
            self.bump_generation();
        }
    }

    /// A snapshot of object `id`, if live.
    pub fn object(&self, id: u32) -> Option<ObjectInfo> {
        Self::slot_off(id)?;
        if self.slot32(id, S_STATE).load(Ordering::Acquire) != LIVE {
            return None;
        }
        let kind = ObjectKind::from_u32(self.slot32(id, S_KIND).load(Ordering::Relaxed))?;
        let mut name = [0u8; 16];
        self.seg.read(Self::slot_off(id)? + S_NAME, &mut name)?;
        let nlen = name.iter().position(|&b| b == 0).unwrap_or(16);
        Some(ObjectInfo {
            id,
            kind,
            owner_pid: self.slot32(id, S_OWNER).load(Ordering::Relaxed),
            payload_off: self.slot64(id, S_PAYLOAD_OFF).load(Ordering::Relaxed),
            payload_len: self.slot64(id, S_PAYLOAD_LEN).load(Ordering::Relaxed),
            name: String::from_utf8_lossy(&name[..nlen]).into_owned(),
            refs: self.slot32(id, S_REFS).load(Ordering::Relaxed),
        })
    }

    /// Whether the creator of `id` is still running (its pid exists with the same start time).
    pub fn owner_alive(&self, id: u32) -> bool {
        if Self::slot_off(id).is_none() {
            return false;
        }
        let pid = self.slot32(id, S_OWNER).load(Ordering::Relaxed);
        let start = self.slot32(id, S_OWNER_START).load(Ordering::Relaxed);
        lock::process_start_time(pid).is_some_and(|s| s as u32 == start)
    }

    /// Takes a reference on a live object.
    pub fn acquire(&self, id: u32) -> bool {
        if self.object(id).is_none() {
            return false;
        }
        self.slot32(id, S_REFS).fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Drops a reference; the last one removes the object and frees its payload. Returns the
    /// removed object's info when this call removed it (the caller frees kind-specific data).
    pub fn release(&self, id: u32) -> Option<ObjectInfo> {
        let info = self.object(id)?;
        let refs = self.slot32(id, S_REFS);
        let prev = refs
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1))
            .ok()?;
        if prev != 1 {
            return None;
        }
        // Last reference: unpublish, then recycle.
        if self
            .slot32(id, S_STATE)
            .compare_exchange(LIVE, RESERVED, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        self.bump_generation();
        self.free(info.payload_off, info.payload_len.max(1));
        self.slot32(id, S_STATE).store(FREE, Ordering::Release);
        Some(info)
    }

    /// Removes object `id` whatever its reference count (its creator died: the kernel drops a
    /// dead process's references). Returns its info when this call removed it.
    pub fn force_release(&self, id: u32) -> Option<ObjectInfo> {
        self.object(id)?;
        self.slot32(id, S_REFS).store(1, Ordering::Release);
        self.release(id)
    }

    /// Ids of all live objects.
    pub fn live_ids(&self) -> Vec<u32> {
        (1..=OBJECT_SLOTS)
            .filter(|&id| self.slot32(id, S_STATE).load(Ordering::Acquire) == LIVE)
            .collect()
    }
}

/// `CLOCK_MONOTONIC` in ns: the same clock in every process on the machine.
fn monotonic_ns() -> u64 {
    crate::shm::monotonic_raw_ns()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn temp_store() -> (Store, PathBuf) {
        let p = std::env::temp_dir().join(format!(
            "bpftime-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let s = Store::open(&p).unwrap();
        (s, p)
    }

    #[test]
    fn create_publish_release_cycle() {
        let (s, p) = temp_store();
        let g0 = s.generation();
        let (id, off) = s.create(ObjectKind::Map, "counts", 128).unwrap();
        assert!(s.object(id).is_none(), "invisible before publish");
        s.publish(id);
        assert!(s.generation() > g0);
        let info = s.object(id).unwrap();
        assert_eq!(info.name, "counts");
        assert_eq!(info.payload_off, off);
        assert_eq!(s.live_ids(), vec![id]);
        assert!(s.release(id).is_some());
        assert!(s.object(id).is_none());
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn store_grows_past_its_initial_size() {
        let (s, p) = temp_store();
        let before = s.segment().file_len().unwrap();
        let big = s.alloc(64 << 20).unwrap();
        assert!(s.segment().file_len().unwrap() > before);
        s.segment().write(big + (64 << 20) - 8, &[1; 8]).unwrap();
        // A second process view (a fresh open) sees the grown file and the data.
        let s2 = Store::open(&p).unwrap();
        let mut b = [0u8; 8];
        s2.segment().read(big + (64 << 20) - 8, &mut b).unwrap();
        assert_eq!(b, [1; 8]);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn freed_blocks_are_reused_after_the_grace_period_only() {
        let (s, p) = temp_store();
        let a = s.alloc(100).unwrap();
        s.segment().write(a, &[9; 16]).unwrap();
        s.free(a, 100);
        let b = s.alloc(120).unwrap();
        assert_ne!(b, a, "still in its grace period");
        // Age the freed block past the grace period.
        s.segment()
            .atomic_u64(a + 8)
            .unwrap()
            .store(0, Ordering::Relaxed);
        assert_eq!(s.alloc(120).unwrap(), a);
        let mut buf = [1u8; 16];
        s.segment().read(a, &mut buf).unwrap();
        assert_eq!(buf, [0; 16], "reused blocks are zeroed");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn objects_of_a_dead_creator_can_be_force_released() {
        let (s, p) = temp_store();
        let (id, _) = s.create(ObjectKind::Map, "orphan", 64).unwrap();
        s.publish(id);
        s.acquire(id);
        let (mine, _) = s.create(ObjectKind::Map, "mine", 64).unwrap();
        s.publish(mine);
        // Pretend the creator is a process that no longer exists.
        s.slot32(id, S_OWNER).store(0x7fff_fff0, Ordering::Relaxed);
        assert!(!s.owner_alive(id));
        assert!(s.owner_alive(mine));
        assert_eq!(s.force_release(id).map(|o| o.id), Some(id));
        assert!(s.object(id).is_none());
        assert!(s.object(mine).is_some());
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn foreign_layout_is_refused() {
        let p = std::env::temp_dir().join(format!("bpftime-bad-{}", std::process::id()));
        std::fs::write(&p, vec![7u8; 8192]).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(Store::open(&p), Err(StoreError::BadLayout { .. })));
        std::fs::remove_file(p).unwrap();
    }
}
