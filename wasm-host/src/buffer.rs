//! Ring buffers and perf buffers consumed by the host on a guest's behalf
//! (`wasm_bpf_buffer_poll`).
//!
//! A ring buffer map is consumed with [`RingBuf::consume`]; a perf event array gets, on its
//! first poll, one `PERF_COUNT_SW_BPF_OUTPUT` perf event per slot with a ring in the store (as
//! libbpf's `perf_buffer__new` does with `perf_event_open` + `mmap` + `BPF_MAP_UPDATE_ELEM`),
//! so `bpf_perf_event_output` in any target process writes there. Waiting uses the store's
//! wake slots and a [`WakeSocket`]: producers send a datagram only while the host sleeps.
//!
//! Records taken from the store wait in a per-buffer queue until the guest's callback has
//! seen them, so a callback that stops a poll early (non-zero return, as libbpf allows) loses
//! nothing: the next poll delivers the rest first.

use crate::error::{HostError, Result};
use crate::object::BpfObject;
use bpftime_maps::perf_array::{self, PerfRing};
use bpftime_maps::ringbuf::RingBuf;
use bpftime_maps::wake::WakeSocket;
use bpftime_maps::{Map, MapType};
use bpftime_runtime::object::{PerfEventRecord, PerfKind, create_perf_event, set_perf_enabled};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Data pages of each perf ring the host creates (256 KiB).
pub const PERF_RING_PAGES: u64 = 64;
/// `PERF_RECORD_LOST`.
const PERF_RECORD_LOST: u32 = 2;
/// `PERF_RECORD_SAMPLE`.
const PERF_RECORD_SAMPLE: u32 = 9;
/// Longest single sleep, so an interrupt or a status update is never far away.
const SLICE: Duration = Duration::from_millis(100);

#[derive(Debug)]
enum Kind {
    Ring,
    /// Perf event ids, one per array slot.
    Perf(Vec<u32>),
}

/// A buffer being polled.
#[derive(Debug)]
pub struct Buffer {
    map: Map,
    kind: Kind,
    pending: VecDeque<Vec<u8>>,
    /// Record buffers for reuse (no allocation per record once warm).
    spare: Vec<Vec<u8>>,
    lost: u64,
}

impl Buffer {
    /// Prepares `map` (a map of `obj`) for polling.
    pub fn open(obj: &mut BpfObject, map: Map) -> Result<Buffer> {
        let kind = match MapType::try_from(map.def().map_type) {
            Ok(MapType::RingBuf) => {
                RingBuf::new(&map)?;
                Kind::Ring
            }
            Ok(MapType::PerfEventArray) => {
                let store = obj.store().clone();
                let mut ids = Vec::new();
                for i in 0..map.def().max_entries {
                    let id = create_perf_event(
                        &store,
                        &PerfEventRecord {
                            kind: PerfKind::SoftwareBpfOutput,
                            pid: -1,
                            cpu: i as i32,
                            offset: 0,
                            ref_ctr_offset: 0,
                            path: String::new(),
                        },
                    )?;
                    obj.extra.push(id);
                    set_perf_enabled(&store, id, true)?;
                    perf_array::attach_ring(&store, id, PERF_RING_PAGES)?;
                    perf_array::set(&map, i, id, 0)?;
                    ids.push(id);
                }
                Kind::Perf(ids)
            }
            _ => {
                return Err(HostError::invalid(format!(
                    "map {} is neither a ring buffer nor a perf event array",
                    map.id()
                )));
            }
        };
        Ok(Buffer {
            map,
            kind,
            pending: VecDeque::new(),
            spare: Vec::new(),
            lost: 0,
        })
    }

    /// Records lost to full perf rings so far (`PERF_RECORD_LOST`).
    pub fn lost(&self) -> u64 {
        self.lost
    }

    fn rings(&self) -> impl Iterator<Item = PerfRing<'_>> {
        let ids: &[u32] = match &self.kind {
            Kind::Perf(ids) => ids,
            Kind::Ring => &[],
        };
        ids.iter()
            .filter_map(|&id| perf_array::event_ring(self.map.store(), id))
    }

    fn available(&self) -> bool {
        if !self.pending.is_empty() {
            return true;
        }
        match &self.kind {
            Kind::Ring => RingBuf::new(&self.map).is_ok_and(|r| r.available()),
            Kind::Perf(_) => self.rings().any(|r| r.available()),
        }
    }

    /// Sleeps until a producer signals or `slice` passes (returns at once if data is there).
    fn sleep(&self, sock: &WakeSocket, slice: Duration) {
        let nonce = sock.nonce();
        let ready = match &self.kind {
            Kind::Ring => RingBuf::new(&self.map).is_ok_and(|r| r.arm(nonce)),
            Kind::Perf(_) => self.rings().fold(false, |any, r| r.arm(nonce) | any),
        };
        if !ready {
            sock.wait(slice.as_millis().min(i32::MAX as u128) as i32);
        }
        match &self.kind {
            Kind::Ring => {
                if let Ok(r) = RingBuf::new(&self.map) {
                    r.disarm();
                }
            }
            Kind::Perf(_) => self.rings().for_each(|r| r.disarm()),
        }
    }

    /// Moves what the store holds into the queue.
    fn drain(&mut self) {
        match &self.kind {
            Kind::Ring => {
                if let Ok(r) = RingBuf::new(&self.map) {
                    r.consume(|rec| {
                        let mut v = self.spare.pop().unwrap_or_default();
                        v.clear();
                        v.extend_from_slice(rec);
                        self.pending.push_back(v);
                    });
                }
            }
            Kind::Perf(ids) => {
                for &id in ids {
                    let Some(ring) = perf_array::event_ring(self.map.store(), id) else {
                        continue;
                    };
                    ring.read(|ty, rec| match ty {
                        PERF_RECORD_SAMPLE if rec.len() >= 12 => {
                            let size =
                                u32::from_ne_bytes([rec[8], rec[9], rec[10], rec[11]]) as usize;
                            let data = &rec[12..];
                            self.pending
                                .push_back(data[..size.min(data.len())].to_vec());
                        }
                        PERF_RECORD_LOST if rec.len() >= 24 => {
                            let mut b = [0u8; 8];
                            b.copy_from_slice(&rec[16..24]);
                            self.lost = self.lost.wrapping_add(u64::from_ne_bytes(b));
                        }
                        _ => {}
                    });
                }
            }
        }
    }

    /// Waits up to `timeout_ms` (negative: no limit) for records and queues them. `tick` runs
    /// at least every 100 ms while waiting; returning `false` ends the wait early.
    pub fn fill(
        &mut self,
        sock: &WakeSocket,
        timeout_ms: i32,
        mut tick: impl FnMut() -> bool,
    ) -> usize {
        let deadline =
            (timeout_ms >= 0).then(|| Instant::now() + Duration::from_millis(timeout_ms as u64));
        loop {
            if self.available() {
                break;
            }
            let slice = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    left.min(SLICE)
                }
                None => SLICE,
            };
            self.sleep(sock, slice);
            if !tick() {
                break;
            }
        }
        self.drain();
        self.pending.len()
    }

    /// The next queued record.
    pub fn pop(&mut self) -> Option<Vec<u8>> {
        self.pending.pop_front()
    }

    /// Gives a delivered record's buffer back for reuse.
    pub fn recycle(&mut self, rec: Vec<u8>) {
        if self.spare.len() < 4096 {
            self.spare.push(rec);
        }
    }

    /// Puts a record back at the front (the guest did not take it).
    pub fn unpop(&mut self, rec: Vec<u8>) {
        self.pending.push_front(rec);
    }
}
