//! Shard snapshots: SST files by key range, checked before they replace anything.

use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ringkv_wire::ClusterMap;
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use serde::{Deserialize, Serialize};

use crate::db::{io_err, Db};
use crate::keys::*;
use crate::types::*;

/// Writes a shard's rows `[start, end)` as read in `snap` to SST files in `dir`, starting a new
/// file (the next key range) whenever one reaches `file_bytes`. Returns the files and sizes.
pub(crate) fn write_sst_files(
    db: &Db,
    snap: &rocksdb::Snapshot<'_>,
    dir: &std::path::Path,
    start: u64,
    end: u64,
    file_bytes: u64,
) -> Result<Vec<(PathBuf, u64)>, io::Error> {
    std::fs::create_dir_all(dir)?;
    let (lower, upper) = data_range(start, end);
    let mut ro = ReadOptions::default();
    if let Some(u) = upper {
        ro.set_iterate_upper_bound(u);
    }
    // The data family buckets its memtable by hash prefix: a scan across hashes needs order.
    ro.set_total_order_seek(true);
    ro.set_snapshot(snap);
    let opts = rocksdb::Options::default();
    let mut files = Vec::new();
    let mut open: Option<(rocksdb::SstFileWriter<'_>, PathBuf)> = None;
    let mut in_file = 0u64;
    for kv in db.raw().iterator_cf_opt(db.cf(CF_DATA), ro, IteratorMode::From(&lower, Direction::Forward)) {
        let (k, v) = kv.map_err(io_err)?;
        if open.is_none() {
            let path = dir.join(format!("{:05}.sst", files.len()));
            let w = rocksdb::SstFileWriter::create(&opts);
            w.open(&path).map_err(io_err)?;
            open = Some((w, path));
            in_file = 0;
        }
        if let Some((w, _)) = open.as_mut() {
            w.put(&k, &v).map_err(io_err)?;
            // Counted here: the writer's own size lags behind what it buffers.
            in_file += (k.len() + v.len()) as u64;
            if in_file >= file_bytes {
                if let Some((mut w, path)) = open.take() {
                    w.finish().map_err(io_err)?;
                    let len = std::fs::metadata(&path)?.len();
                    files.push((path, len));
                }
            }
        }
    }
    if let Some((mut w, path)) = open.take() {
        w.finish().map_err(io_err)?;
        let len = std::fs::metadata(&path)?.len();
        files.push((path, len));
    }
    Ok(files)
}

/// Checks that received snapshot files hold only plain rows of the shard `[start, end)`, before
/// anything of the replica is replaced: a faulty or foreign sender must not be able to overwrite
/// another shard's rows (or delete them with a range tombstone). The files are hard-linked into a
/// scratch database and ingested there, which gives each file's smallest and largest key
/// (range tombstones included) without reading the rows; the originals stay untouched.
pub fn check_snapshot_files(db: &Db, files: &[PathBuf], start: u64, end: u64) -> Result<(), io::Error> {
    if files.is_empty() {
        return Ok(());
    }
    let seq = SNAPSHOT_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let scratch = db.snapshot_dir("check").join(format!("c{seq}"));
    struct Remove<'a>(&'a Path);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
    let _remove = Remove(&scratch);
    let links = scratch.join("files");
    std::fs::create_dir_all(&links)?;
    let mut linked = Vec::with_capacity(files.len());
    // Filesystems without hard links (e.g. FUSE ones) get copies, and RocksDB must copy too.
    let mut links_work = true;
    for (i, f) in files.iter().enumerate() {
        let to = links.join(format!("{i:05}.sst"));
        if std::fs::hard_link(f, &to).is_err() {
            links_work = false;
            std::fs::copy(f, &to)?;
        }
        linked.push(to);
    }
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    let check = rocksdb::DB::open(&opts, scratch.join("db")).map_err(io_err)?;
    let mut ingest = rocksdb::IngestExternalFileOptions::default();
    ingest.set_move_files(links_work);
    check
        .ingest_external_file_opts(&ingest, linked)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("snapshot files are not valid SST files: {e}")))?;
    let (lower, upper) = data_range(start, end);
    let refuse = |what: String| Err(io::Error::new(io::ErrorKind::InvalidData, format!("snapshot refused: {what}")));
    for f in check.live_files().map_err(io_err)? {
        if f.num_deletions > 0 {
            return refuse(format!("file {} holds {} deletions", f.name, f.num_deletions));
        }
        let (Some(first), Some(last)) = (f.start_key.as_deref(), f.end_key.as_deref()) else {
            return refuse(format!("file {} has no key bounds", f.name));
        };
        let too_low = first < lower.as_slice() || first.len() < 8;
        let too_high = upper.as_deref().is_some_and(|u| last >= u);
        if too_low || too_high {
            return refuse(format!(
                "file {} holds keys {:02x?}..{:02x?} outside the shard's hash range [{start:#x}, {end:#x})",
                f.name,
                &first[..first.len().min(8)],
                &last[..last.len().min(8)]
            ));
        }
    }
    Ok(())
}

/// Adds to `b` the deletion of every user row with a hash in `[start, end)`.
pub fn delete_data_range(db: &Db, b: &mut WriteBatch, start: u64, end: u64) -> Result<(), io::Error> {
    let data_cf = db.cf(CF_DATA);
    let (lower, upper) = data_range(start, end);
    match upper {
        Some(u) => b.delete_range_cf(data_cf, lower, u),
        None => {
            // No finite key bounds the last range: delete up to the largest hash, then the keys
            // with that hash one by one.
            let top = u64::MAX.to_be_bytes();
            b.delete_range_cf(data_cf, lower, top.to_vec());
            let mut ro = ReadOptions::default();
            ro.set_total_order_seek(true);
            for kv in db.raw().iterator_cf_opt(data_cf, ro, IteratorMode::From(&top, Direction::Forward)) {
                let (k, _) = kv.map_err(io_err)?;
                b.delete_cf(data_cf, k);
            }
        }
    }
    Ok(())
}

/// The placement group's snapshot: the whole map (small).
#[derive(Serialize, Deserialize)]
pub(crate) enum SnapshotPayload {
    Placement(Option<ClusterMap>),
}

/// A group's state at `meta.last_log_id`, as openraft moves it around.
#[derive(Clone, Debug)]
pub enum SnapshotData {
    /// The placement group: its payload in memory.
    Memory(Arc<Vec<u8>>),
    /// A shard: its rows as SST files on disk, each a contiguous key range, plus its sessions.
    Files(Arc<SnapshotFiles>),
}

/// A shard snapshot on disk. Its directory is deleted when the last holder lets go, unless an
/// unfinished install still needs it.
#[derive(Debug)]
pub struct SnapshotFiles {
    pub dir: PathBuf,
    /// SST files in key order with their sizes.
    pub files: Vec<(PathBuf, u64)>,
    /// Session rows and answers `(key after the group tag, value)`.
    pub sessions: Vec<(Vec<u8>, Vec<u8>)>,
    /// Set when an install failed after recording its marker: the next start retries it.
    pub keep: std::sync::atomic::AtomicBool,
}

impl SnapshotFiles {
    pub fn new(dir: PathBuf, files: Vec<(PathBuf, u64)>, sessions: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        SnapshotFiles { dir, files, sessions, keep: Default::default() }
    }
}

impl Drop for SnapshotFiles {
    fn drop(&mut self) {
        if !self.keep.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl SnapshotData {
    /// Bytes on the wire: the payload or every file.
    pub fn len(&self) -> u64 {
        match self {
            SnapshotData::Memory(b) => b.len() as u64,
            SnapshotData::Files(f) => f.files.iter().map(|(_, n)| n).sum(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a shard install still has to do, recorded before its old state is cleared.
#[derive(Debug, Serialize, Deserialize)]
pub struct InstallMarker {
    /// Relative to the snapshot root (`Db::snapshot_root`) when under it, so a restart with a
    /// differently spelled `--data-dir` still finds them.
    pub files: Vec<PathBuf>,
    pub meta: SnapshotMeta,
}

impl InstallMarker {
    pub fn new(root: &Path, files: impl IntoIterator<Item = PathBuf>, meta: SnapshotMeta) -> Self {
        let files = files.into_iter().map(|p| p.strip_prefix(root).map(Path::to_path_buf).unwrap_or(p)).collect();
        InstallMarker { files, meta }
    }

    /// The files as paths under `root` (the snapshot root of the database as opened now).
    pub fn paths(&self, root: &Path) -> Vec<PathBuf> {
        self.files.iter().map(|p| if p.is_relative() { root.join(p) } else { p.clone() }).collect()
    }
}

/// Largest SST file of a shard snapshot: one key range of it.
pub const SNAPSHOT_FILE_BYTES: u64 = 8 << 20;

pub(crate) static SNAPSHOT_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub(crate) struct StoredSnapshot {
    pub(crate) meta: SnapshotMeta,
    pub(crate) data: SnapshotData,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The data family buckets its memtable by hash prefix; a shard's snapshot still holds
    /// every row of its range and no other, read from the memtable in order, and dropping the
    /// last range (which ends at the largest hash) leaves nothing behind.
    #[test]
    fn snapshots_and_drops_of_a_range_see_every_row_in_the_hashed_memtable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(&dir.path().join("a")).expect("open");
        let keys: Vec<Vec<u8>> = (0..3000).map(|i| format!("key-{i}").into_bytes()).collect();
        let mut b = WriteBatch::default();
        for k in &keys {
            b.put_cf(db.cf(CF_DATA), data_key(k), k);
        }
        db.write_sync(b).expect("write");
        let (start, end) = (u64::MAX / 4, u64::MAX / 4 * 3);
        let inside = |k: &[u8]| (start..end).contains(&ringkv_wire::key_hash(k));
        let snap = db.raw().snapshot();
        let files = write_sst_files(&db, &snap, &dir.path().join("sst"), start, end, 16 << 10).expect("snapshot files");
        assert!(files.len() > 1, "small files: the scan goes on across them");
        let other = Db::open(&dir.path().join("b")).expect("open");
        let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
        other.raw().ingest_external_file_cf(other.cf(CF_DATA), paths).expect("ingest");
        for k in &keys {
            let got = other.get_cf(CF_DATA, &data_key(k)).expect("get");
            assert_eq!(got.is_some(), inside(k), "{}", String::from_utf8_lossy(k));
        }
        let mut b = WriteBatch::default();
        delete_data_range(&db, &mut b, 0, u64::MAX).expect("range");
        db.write_sync(b).expect("delete");
        assert!(keys.iter().all(|k| db.get_cf(CF_DATA, &data_key(k)).expect("get").is_none()));
    }
}
