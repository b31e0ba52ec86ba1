//! Snapshot transfer between nodes: chunks paced by a node-wide byte rate, a node-wide limit on
//! concurrent transfers (both from the placement settings, so they change at run time), and
//! the receiver's reassembly.
//!
//! Snapshots are still built and installed whole in memory (bounded by the peer frame limit);
//! only the transfer is streamed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ringkv_wire::{GroupId, NodeId, PlacementSettings};

/// Bytes per snapshot chunk: small enough that a chunk never holds a lane for long.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// The sending side's limits, shared by every group of the node.
pub struct SnapshotThrottle {
    bytes_per_sec: AtomicU64,
    concurrency: AtomicUsize,
    active: AtomicUsize,
    /// When the pacer's next byte may go.
    next_free: Mutex<Instant>,
}

impl Default for SnapshotThrottle {
    fn default() -> Self {
        let d = PlacementSettings::default();
        SnapshotThrottle {
            bytes_per_sec: AtomicU64::new(d.snapshot_bytes_per_sec),
            concurrency: AtomicUsize::new(d.snapshot_concurrency as usize),
            active: AtomicUsize::new(0),
            next_free: Mutex::new(Instant::now()),
        }
    }
}

/// One running transfer; dropping it frees its slot.
pub struct Slot<'a>(&'a SnapshotThrottle);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl SnapshotThrottle {
    /// Follows the placement settings of the newest map.
    pub fn set(&self, s: &PlacementSettings) {
        self.bytes_per_sec.store(s.snapshot_bytes_per_sec.max(1), Ordering::Relaxed);
        self.concurrency.store((s.snapshot_concurrency as usize).max(1), Ordering::Relaxed);
    }

    /// How long sending `bytes` takes at the current rate.
    pub fn time_for(&self, bytes: usize) -> Duration {
        Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec.load(Ordering::Relaxed) as f64)
    }

    /// Waits for one of the node's transfer slots.
    pub async fn slot(&self) -> Slot<'_> {
        loop {
            let n = self.active.load(Ordering::Acquire);
            if n < self.concurrency.load(Ordering::Relaxed)
                && self.active.compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire).is_ok()
            {
                return Slot(self);
            }
            metrics::counter!("ringkv_raft_snapshot_slot_waits_total").increment(1);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `bytes` more may go out at the node's rate (shared by all transfers).
    pub async fn pace(&self, bytes: usize) {
        let rate = self.bytes_per_sec.load(Ordering::Relaxed) as f64;
        let start = {
            let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / rate);
            start
        };
        let wait = start.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            metrics::counter!("ringkv_raft_snapshot_throttled_seconds_total").increment(wait.as_millis() as u64 / 1000);
            tokio::time::sleep(wait).await;
        }
    }
}

/// A snapshot being received from `from` for `group`.
struct Assembly {
    /// The snapshot's id, so chunks of two snapshots never mix.
    id: String,
    buf: Vec<u8>,
    total: usize,
}

/// The receiving side: chunks so far, per (group, sender).
pub struct Reassembly {
    parts: DashMap<(GroupId, NodeId), Assembly>,
    /// Largest snapshot accepted.
    max: usize,
}

impl Default for Reassembly {
    fn default() -> Self {
        Reassembly::with_limit(crate::peer::PEER_FRAME_BYTES_MAX)
    }
}

/// What to do after a chunk.
pub enum Received {
    /// More chunks to come.
    Partial,
    /// The whole snapshot.
    Complete(Vec<u8>),
}

impl Reassembly {
    pub fn with_limit(max: usize) -> Self {
        Reassembly { parts: DashMap::new(), max }
    }

    /// Adds one chunk. A chunk at offset 0 starts over; any other chunk must continue exactly
    /// where the last one of the same snapshot ended.
    pub fn add(&self, group: GroupId, from: NodeId, id: &str, offset: usize, total: usize, bytes: &[u8]) -> Result<Received, String> {
        if total > self.max {
            return Err(format!("snapshot of {total} bytes exceeds the {}-byte limit", self.max));
        }
        let key = (group, from);
        if offset == 0 {
            self.parts.insert(key, Assembly { id: id.to_string(), buf: Vec::with_capacity(total), total });
        }
        let mut a = self.parts.get_mut(&key).ok_or_else(|| format!("chunk at {offset} of a snapshot whose start never arrived"))?;
        if a.id != id || a.total != total || a.buf.len() != offset || offset + bytes.len() > total {
            let have = a.buf.len();
            drop(a);
            self.parts.remove(&key);
            return Err(format!("snapshot chunk {offset}+{} does not continue snapshot {id} at {have}; start over", bytes.len()));
        }
        a.buf.extend_from_slice(bytes);
        if a.buf.len() < a.total {
            return Ok(Received::Partial);
        }
        drop(a);
        Ok(self.parts.remove(&key).map(|(_, a)| Received::Complete(a.buf)).unwrap_or(Received::Partial))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_reassemble_in_order_and_a_gap_starts_over() {
        let r = Reassembly::with_limit(100);
        let data: Vec<u8> = (0..10u8).collect();
        assert!(matches!(r.add(1, 2, "s1", 0, 10, &data[..4]), Ok(Received::Partial)));
        assert!(matches!(r.add(1, 2, "s1", 4, 10, &data[4..8]), Ok(Received::Partial)));
        match r.add(1, 2, "s1", 8, 10, &data[8..]) {
            Ok(Received::Complete(all)) => assert_eq!(all, data),
            _ => panic!("not complete"),
        }
        // A chunk of another snapshot, or one that skips ahead, is refused and forgets the rest.
        assert!(matches!(r.add(1, 2, "s2", 0, 10, &data[..4]), Ok(Received::Partial)));
        assert!(r.add(1, 2, "s2", 6, 10, &data[6..]).is_err());
        assert!(r.add(1, 2, "s2", 4, 10, &data[4..8]).is_err(), "after a gap the sender must start over");
        assert!(r.add(1, 3, "s3", 0, 1000, &data).is_err(), "over the size limit");
    }

    /// The pacer never lets bytes out faster than the rate (a lower bound on time: a busy host
    /// only makes it slower, so this cannot flake).
    #[tokio::test]
    async fn the_pacer_holds_the_byte_rate_across_transfers() {
        let t = SnapshotThrottle::default();
        t.set(&PlacementSettings { snapshot_bytes_per_sec: 256 * 1024, snapshot_concurrency: 1, ..Default::default() });
        let started = Instant::now();
        // 4 x 64 KiB after the first: at 256 KiB/s the last may leave no sooner than 1 s in.
        for _ in 0..5 {
            t.pace(64 * 1024).await;
        }
        assert!(started.elapsed() >= Duration::from_millis(990), "{:?}", started.elapsed());
        let first = t.slot().await;
        let second = tokio::time::timeout(Duration::from_millis(200), t.slot()).await;
        assert!(second.is_err(), "a second transfer waits while the only slot is taken");
        drop(first);
        assert!(tokio::time::timeout(Duration::from_secs(2), t.slot()).await.is_ok());
    }
}
