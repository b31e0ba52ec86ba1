//! Snapshot transfer between nodes, streamed: a shard snapshot is a set of SST files (each a
//! contiguous key range of the shard) that the sender reads and the receiver writes in chunks,
//! never whole in memory; the receiver then ingests them atomically. Sending is paced by a
//! node-wide byte rate and a node-wide limit on concurrent transfers, both from the placement
//! settings, so they change at run time.
//!
//! On the wire a transfer is `Header` (file sizes and the shard's sessions, or the placement
//! map inline), then `Bytes` chunks of each file in order, then `End`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::path::PathBuf;
use std::sync::Arc;

use dashmap::DashMap;
use ringkv_storage::raft_store::{SnapshotData, SnapshotFiles};
use ringkv_wire::{GroupId, NodeId, PlacementSettings};
use serde::{Deserialize, Serialize};

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

/// Session rows `(key after the group tag, value)`.
pub type SessionRows = Vec<(Vec<u8>, Vec<u8>)>;

/// One message of a snapshot transfer, carried by a `RaftMsg::SnapshotChunk`. Byte fields are
/// copied whole (`serde_bytes`), not byte by byte.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Part {
    /// First: the placement map inline, or the sizes of the SST files to follow.
    Header {
        #[serde(with = "serde_bytes")]
        memory: Option<Vec<u8>>,
        sizes: Vec<u64>,
    },
    /// Some of the shard's session rows `(key after the group tag, value)`, at most about
    /// [`SNAPSHOT_CHUNK_BYTES`] per part: a shard with millions of sessions still moves.
    Sessions { rows: SessionRows },
    /// `data` of file `file` at `offset`.
    Bytes {
        file: u32,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Last: everything arrived; install.
    End,
}

/// Bytes an unprivileged writer may still use on the filesystem `s` describes.
// The field types differ between platforms (u64 on Linux x86_64, u32 elsewhere).
#[allow(clippy::unnecessary_cast)]
pub(crate) fn free_bytes(s: &nix::sys::statvfs::Statvfs) -> u64 {
    (s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64)
}

/// Session rows cut into consecutive slices of at most about [`SNAPSHOT_CHUNK_BYTES`] each.
pub fn session_chunks(rows: &[(Vec<u8>, Vec<u8>)]) -> Vec<&[(Vec<u8>, Vec<u8>)]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0usize, 0usize);
    for (i, (k, v)) in rows.iter().enumerate() {
        if bytes + k.len() + v.len() > SNAPSHOT_CHUNK_BYTES && i > start {
            out.push(&rows[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += k.len() + v.len() + 8;
    }
    if start < rows.len() {
        out.push(&rows[start..]);
    }
    out
}

/// A snapshot being received from `from` for `group`; its directory goes away with it unless
/// the snapshot completes.
struct Incoming {
    id: String,
    /// When its last part arrived: a transfer idle for [`ABANDONED_AFTER`] is dropped.
    touched: Instant,
    dir: PathBuf,
    sizes: Vec<u64>,
    written: Vec<u64>,
    sessions: Vec<(Vec<u8>, Vec<u8>)>,
    memory: Option<Vec<u8>>,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A transfer that got no part for this long was abandoned by its sender.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(300);

fn file_name(i: usize) -> String {
    format!("{i:05}.sst")
}

/// Disk space a snapshot transfer leaves free for the rest of the node (the Raft log, RocksDB's
/// compactions).
pub const SNAPSHOT_DISK_RESERVE_BYTES: u64 = 64 << 20;

/// The receiving side: transfers in progress, per (group, sender), written under `dir`.
pub struct Reassembly {
    dir: PathBuf,
    parts: DashMap<(GroupId, NodeId), Incoming>,
    seq: AtomicU64,
}

impl Reassembly {
    pub fn new(dir: PathBuf) -> Self {
        Reassembly { dir, parts: DashMap::new(), seq: AtomicU64::new(0) }
    }

    /// Takes one part of transfer `id`. Returns the snapshot once `End` arrives with every byte.
    /// A `Header` starts over; a part that does not continue the transfer in progress is
    /// refused and forgets it (the sender starts again).
    pub fn add(&self, group: GroupId, from: NodeId, id: &str, part: Part) -> Result<Option<SnapshotData>, String> {
        let key = (group, from);
        let io = |e: std::io::Error| format!("snapshot of group {group} from node {from}: {e}");
        if let Part::Header { memory, sizes } = part {
            self.parts.retain(|_, inc| inc.touched.elapsed() < ABANDONED_AFTER);
            // Unique per transfer and per process run: a directory left by an earlier run is
            // never written into again.
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let dir =
                self.dir.join(format!("g{group}-n{from}-{}-{seq}", id.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>()));
            // The sender declares the sizes: refuse what the disk cannot hold before writing.
            let declared = sizes.iter().fold(0u64, |a, b| a.saturating_add(*b));
            std::fs::create_dir_all(&self.dir).map_err(io)?;
            let free = nix::sys::statvfs::statvfs(&self.dir).map(|s| free_bytes(&s)).map_err(|e| io(e.into()))?;
            if declared > free.saturating_sub(SNAPSHOT_DISK_RESERVE_BYTES) {
                return Err(format!(
                    "snapshot of group {group} from node {from} declares {declared} bytes; only {free} are free here (keeping {SNAPSHOT_DISK_RESERVE_BYTES})"
                ));
            }
            std::fs::create_dir(&dir).map_err(io)?;
            // The new directory's entry is durable before any file in it is relied on.
            std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io)?;
            let written = vec![0; sizes.len()];
            self.parts.insert(key, Incoming { id: id.to_string(), touched: Instant::now(), dir, sizes, written, sessions: vec![], memory });
            return Ok(None);
        }
        let mut inc = self.parts.get_mut(&key).ok_or_else(|| format!("a snapshot part of group {group} whose header never arrived"))?;
        if inc.id != id {
            drop(inc);
            self.parts.remove(&key);
            return Err(format!("snapshot part of transfer {id} while another was in progress; start over"));
        }
        match part {
            Part::Header { .. } => Ok(None),
            Part::Sessions { rows } => {
                inc.sessions.extend(rows);
                inc.touched = Instant::now();
                Ok(None)
            }
            Part::Bytes { file, offset, data } => {
                let i = file as usize;
                let ok = i < inc.sizes.len() && inc.written[i] == offset && offset + data.len() as u64 <= inc.sizes[i];
                if !ok {
                    drop(inc);
                    self.parts.remove(&key);
                    return Err(format!("snapshot chunk {file}@{offset} does not continue transfer {id}; start over"));
                }
                use std::io::Write;
                let path = inc.dir.join(file_name(i));
                let mut f = if offset == 0 {
                    std::fs::OpenOptions::new().write(true).create_new(true).open(path)
                } else {
                    std::fs::OpenOptions::new().append(true).open(path)
                }
                .map_err(io)?;
                f.write_all(&data).map_err(io)?;
                inc.written[i] += data.len() as u64;
                inc.touched = Instant::now();
                Ok(None)
            }
            Part::End => {
                drop(inc);
                let Some((_, mut inc)) = self.parts.remove(&key) else { return Ok(None) };
                if inc.written != inc.sizes {
                    return Err(format!("snapshot transfer {id} ended with {:?} of {:?} bytes", inc.written, inc.sizes));
                }
                if let Some(m) = inc.memory.take() {
                    return Ok(Some(SnapshotData::Memory(Arc::new(m))));
                }
                // Durable before the install records them as the files to ingest.
                for i in 0..inc.sizes.len() {
                    std::fs::File::open(inc.dir.join(file_name(i))).and_then(|f| f.sync_all()).map_err(io)?;
                }
                std::fs::File::open(&inc.dir).and_then(|d| d.sync_all()).map_err(io)?;
                let files = inc.sizes.iter().enumerate().map(|(i, n)| (inc.dir.join(file_name(i)), *n)).collect();
                let dir = std::mem::take(&mut inc.dir);
                Ok(Some(SnapshotData::Files(Arc::new(SnapshotFiles::new(dir, files, std::mem::take(&mut inc.sessions))))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(file: u32, offset: u64, data: &[u8]) -> Part {
        Part::Bytes { file, offset, data: data.to_vec() }
    }

    #[test]
    fn a_transfer_larger_than_the_free_disk_is_refused_before_writing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Reassembly::new(dir.path().join("in"));
        let header = Part::Header { memory: None, sizes: vec![u64::MAX / 4, u64::MAX / 4] };
        let e = r.add(1, 2, "t1", header).expect_err("an impossible size was accepted");
        assert!(e.contains("free"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path().join("in")).expect("dir").count(), 0, "a transfer dir was made");
    }

    #[test]
    fn a_million_sessions_travel_in_parts_that_each_fit_a_frame() {
        let rows: Vec<(Vec<u8>, Vec<u8>)> = (0..1_000_000u64).map(|i| (i.to_be_bytes().to_vec(), vec![7u8; 280])).collect();
        let total: usize = rows.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(total > crate::peer::PEER_FRAME_BYTES_MAX, "the sessions must not fit one frame for this test to mean anything");
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Reassembly::new(dir.path().to_path_buf());
        assert!(matches!(r.add(1, 2, "t1", Part::Header { memory: None, sizes: vec![] }), Ok(None)));
        let chunks = session_chunks(&rows);
        assert!(chunks.len() > 256, "{} parts", chunks.len());
        for rows in chunks {
            let bytes = postcard::to_allocvec(&Part::Sessions { rows: rows.to_vec() }).expect("encode");
            assert!(bytes.len() <= SNAPSHOT_CHUNK_BYTES + 64 * 1024, "a part of {} bytes", bytes.len());
            let part: Part = postcard::from_bytes(&bytes).expect("decode as the receiver does");
            assert!(matches!(r.add(1, 2, "t1", part), Ok(None)));
        }
        let Ok(Some(SnapshotData::Files(f))) = r.add(1, 2, "t1", Part::End) else { panic!("not complete") };
        assert_eq!(f.sessions.len(), 1_000_000);
        assert_eq!(f.sessions[999_999].0, 999_999u64.to_be_bytes().to_vec());
    }

    #[test]
    fn parts_land_in_files_in_order_and_a_gap_starts_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Reassembly::new(dir.path().to_path_buf());
        let header = || Part::Header { memory: None, sizes: vec![6, 3] };
        assert!(matches!(r.add(1, 2, "t1", header()), Ok(None)));
        assert!(matches!(r.add(1, 2, "t1", Part::Sessions { rows: vec![(b"s".to_vec(), b"v".to_vec())] }), Ok(None)));
        assert!(matches!(r.add(1, 2, "t1", bytes(0, 0, b"abc")), Ok(None)));
        assert!(matches!(r.add(1, 2, "t1", bytes(0, 3, b"def")), Ok(None)));
        assert!(matches!(r.add(1, 2, "t1", bytes(1, 0, b"xyz")), Ok(None)));
        let Ok(Some(SnapshotData::Files(f))) = r.add(1, 2, "t1", Part::End) else { panic!("not complete") };
        assert_eq!(f.files.len(), 2);
        assert_eq!(std::fs::read(&f.files[0].0).expect("file 0"), b"abcdef");
        assert_eq!(std::fs::read(&f.files[1].0).expect("file 1"), b"xyz");
        assert_eq!(f.sessions, vec![(b"s".to_vec(), b"v".to_vec())]);
        let kept = f.dir.clone();
        drop(f);
        assert!(!kept.exists(), "the files go away with the snapshot");

        // A gap, another transfer's part, or an early end: refused, and the partial files go.
        assert!(matches!(r.add(1, 2, "t2", header()), Ok(None)));
        assert!(r.add(1, 2, "t2", bytes(0, 3, b"def")).is_err());
        assert!(r.add(1, 2, "t2", bytes(0, 0, b"abc")).is_err(), "after a gap the sender must start over");
        assert!(matches!(r.add(1, 2, "t3", header()), Ok(None)));
        assert!(r.add(1, 2, "t4", bytes(0, 0, b"abc")).is_err());
        assert!(matches!(r.add(1, 2, "t5", header()), Ok(None)));
        assert!(r.add(1, 2, "t5", bytes(0, 0, b"abcdefg")).is_err(), "more than the file's size");
        assert!(matches!(r.add(1, 2, "t6", header()), Ok(None)));
        assert!(r.add(1, 2, "t6", Part::End).is_err(), "ended before every byte arrived");
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0, "nothing left behind");
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
