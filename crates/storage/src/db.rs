//! The node's one RocksDB, and the group committer that makes many groups' Raft appends durable
//! with one WAL sync.

use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

use crate::keys::{self, ALL_CFS};
use crate::StorageError;

/// Largest number of appends one sync covers; more wait for the next round.
pub const GROUP_COMMIT_BATCH_MAX: usize = 1024;

type Done = Box<dyn FnOnce(Result<(), std::io::Error>) + Send>;

struct SyncRequest {
    done: Done,
}

/// How the node's database makes Raft appends durable.
#[derive(Clone, Copy, Debug)]
pub struct Durability {
    /// Whether the group committer fsyncs the WAL (off: writes reach the OS only, and a power
    /// failure may lose acknowledged writes; for benchmarks and tests).
    pub fsync: bool,
    /// While appends arrive concurrently (the last sync covered more than one), the committer
    /// waits up to this long after the first append of a round for more to share its sync.
    /// After a round of one, the next round does not wait: one write at a time never waits.
    pub group_commit_wait: Duration,
}

impl Default for Durability {
    fn default() -> Self {
        Durability { fsync: true, group_commit_wait: Duration::ZERO }
    }
}

/// The shared RocksDB of a node.
pub struct Db {
    db: DB,
    /// WAL syncs made by the group committer (for tests and metrics).
    group_syncs: std::sync::atomic::AtomicU64,
    /// Whether the group committer fsyncs the WAL (off: writes reach the OS only, and a power
    /// failure may lose acknowledged writes; for benchmarks and tests).
    fsync: bool,
    committer: std::sync::Mutex<Option<std_mpsc::Sender<SyncRequest>>>,
    /// Snapshot files: `out/` built here, `in/` received from peers.
    snapshots: std::path::PathBuf,
}

/// The directory (inside the database directory) that holds snapshot files.
pub const SNAPSHOT_DIR: &str = "ringkv-snapshots";

pub fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Bytes of memory RocksDB holds ([`Db::memory_usage`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    pub memtables: u64,
    pub table_readers: u64,
    pub block_cache: u64,
}

impl Db {
    /// Opens (or creates) the database under `path` with every column family ringkv uses; the
    /// WAL is fsynced before a write is acknowledged.
    pub fn open(path: &Path) -> Result<Arc<Db>, StorageError> {
        Self::open_with(path, Durability::default())
    }

    /// As [`Db::open`], choosing how the group committer makes appends durable.
    pub fn open_with(path: &Path, durability: Durability) -> Result<Arc<Db>, StorageError> {
        let fsync = durability.fsync;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        opts.increase_parallelism(2);
        opts.set_paranoid_checks(true);
        // Writes fill RocksDB's WAL buffer; the group committer's `flush_wal` writes it out and
        // syncs once per round, instead of a write(2) per write. A synced write flushes the
        // buffer too. A process crash loses only what was not synced yet: appends not yet
        // acknowledged, and apply and commit-index writes, which the log replays.
        opts.set_manual_wal_flush(true);
        // The data family's hash memtable takes one writer at a time.
        opts.set_allow_concurrent_memtable_write(false);
        let mut cfs = Vec::with_capacity(ALL_CFS.len());
        for name in ALL_CFS {
            let o = cf_options(name).map_err(|e| StorageError::Open(path.to_path_buf(), format!("options of {name}: {e}")))?;
            cfs.push(ColumnFamilyDescriptor::new(name, o));
        }
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| StorageError::Open(path.to_path_buf(), e.to_string()))?;
        let snapshots = path.join(SNAPSHOT_DIR);
        let db = Arc::new(Db { db, group_syncs: Default::default(), fsync, committer: std::sync::Mutex::new(None), snapshots });
        db.clean_snapshot_dirs().map_err(|e| StorageError::Open(path.to_path_buf(), format!("snapshot files: {e}")))?;
        let (tx, rx) = std_mpsc::channel::<SyncRequest>();
        let weak = Arc::downgrade(&db);
        std::thread::Builder::new()
            .name("ringkv-group-commit".into())
            .spawn(move || group_commit_loop(weak, rx, durability.group_commit_wait))
            .map_err(|e| StorageError::Open(path.to_path_buf(), e.to_string()))?;
        if let Ok(mut c) = db.committer.lock() {
            *c = Some(tx);
        }
        Ok(db)
    }

    /// The directory every snapshot file lives under, as this database was opened.
    pub fn snapshot_root(&self) -> &Path {
        &self.snapshots
    }

    /// Where snapshot files live: `out` for snapshots built here, `in` for received ones.
    pub fn snapshot_dir(&self, sub: &str) -> std::path::PathBuf {
        self.snapshots.join(sub)
    }

    /// Removes snapshot files left by an earlier run, except those an unfinished install
    /// still needs.
    fn clean_snapshot_dirs(&self) -> Result<(), std::io::Error> {
        let _ = std::fs::remove_dir_all(self.snapshot_dir("out"));
        let _ = std::fs::remove_dir_all(self.snapshot_dir("check"));
        let mut keep = std::collections::HashSet::new();
        for kv in self.db.iterator_cf(self.cf(crate::keys::CF_APPLY_STATE), rocksdb::IteratorMode::Start) {
            let (k, v) = kv.map_err(io_err)?;
            if k.len() == 9 && k[8] == crate::keys::TAG_INSTALLING {
                let marker: crate::raft_store::InstallMarker =
                    postcard::from_bytes(&v).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
                keep.extend(marker.paths(&self.snapshots).iter().filter_map(|f| f.parent().map(|p| p.to_path_buf())));
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.snapshot_dir("in")) {
            for e in entries.flatten() {
                if !keep.contains(&e.path()) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }

    /// Memory RocksDB holds outside the Rust heap, summed over every column family: memtables
    /// (active, immutable and those pinned by readers), the index and filter blocks of open
    /// tables, and the block caches.
    pub fn memory_usage(&self) -> MemoryUsage {
        let sum = |property: &str| -> u64 {
            ALL_CFS.iter().filter_map(|cf| self.db.property_int_value_cf(self.cf(cf), property).ok().flatten()).sum()
        };
        MemoryUsage {
            memtables: sum("rocksdb.size-all-mem-tables"),
            table_readers: sum("rocksdb.estimate-table-readers-mem"),
            block_cache: sum("rocksdb.block-cache-usage"),
        }
    }

    pub fn raw(&self) -> &DB {
        &self.db
    }

    pub fn cf(&self, name: &str) -> &ColumnFamily {
        // Every column family in ALL_CFS is created at open, so a missing one is a bug here.
        self.db.cf_handle(name).unwrap_or_else(|| panic!("column family {name} was created at open"))
    }

    pub fn get_cf(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, std::io::Error> {
        self.db.get_cf(self.cf(cf), key).map_err(io_err)
    }

    /// Writes without waiting for a sync: the data survives a process crash once the WAL is
    /// synced by a later durable write.
    pub fn write(&self, batch: WriteBatch) -> Result<(), std::io::Error> {
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        metrics::counter!("ringkv_storage_writes_total").increment(1);
        self.db.write_opt(batch, &wo).map_err(io_err)
    }

    /// Writes and syncs before returning.
    pub fn write_sync(&self, batch: WriteBatch) -> Result<(), std::io::Error> {
        let mut wo = WriteOptions::default();
        wo.set_sync(!fsync_removed());
        metrics::counter!("ringkv_storage_writes_total").increment(1);
        metrics::counter!("ringkv_storage_syncs_total").increment(1);
        self.db.write_opt(batch, &wo).map_err(io_err)
    }

    /// Writes `batch` now (readable at once) and runs `done` once a WAL sync covers it. The
    /// group committer syncs once for every write queued meanwhile, whatever group it is from.
    pub fn write_durable(&self, batch: WriteBatch, done: impl FnOnce(Result<(), std::io::Error>) + Send + 'static) {
        if let Err(e) = self.write(batch) {
            done(Err(e));
            return;
        }
        let req = SyncRequest { done: Box::new(done) };
        let sent = match self.committer.lock() {
            Ok(c) => match c.as_ref() {
                Some(tx) => tx.send(req).map_err(|e| e.0),
                None => Err(req),
            },
            Err(_) => Err(req),
        };
        if let Err(req) = sent {
            (req.done)(Err(io_err("storage is shutting down")));
        }
    }

    /// How many WAL syncs the group committer has made.
    pub fn group_syncs(&self) -> u64 {
        self.group_syncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the group committer after it drains what is queued.
    pub fn shutdown(&self) {
        if let Ok(mut c) = self.committer.lock() {
            c.take();
        }
    }

    /// The cluster id this data dir belongs to, once bootstrapped.
    pub fn cluster_id(&self) -> Result<Option<String>, std::io::Error> {
        Ok(self.get_cf(keys::CF_META, keys::META_CLUSTER_ID)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn set_cluster_id(&self, id: &str) -> Result<(), std::io::Error> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(keys::CF_META), keys::META_CLUSTER_ID, id.as_bytes());
        self.write_sync(b)
    }

    /// This data dir's incarnation: `fresh()` (never 0) stored on the first call, the stored one
    /// after. A wiped or replaced data dir gets a new one, which is how the cluster tells it
    /// from the data dir it lost.
    pub fn incarnation(&self, fresh: impl FnOnce() -> u64) -> Result<u64, std::io::Error> {
        if let Some(b) = self.get_meta(keys::META_INCARNATION)? {
            let bytes: [u8; 8] = b.as_slice().try_into().map_err(|_| io_err("the stored incarnation is not 8 bytes"))?;
            return Ok(u64::from_be_bytes(bytes));
        }
        let v = fresh().max(1);
        self.put_meta(keys::META_INCARNATION, &v.to_be_bytes())?;
        Ok(v)
    }

    pub fn put_meta(&self, key: &[u8], value: &[u8]) -> Result<(), std::io::Error> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(keys::CF_META), key, value);
        self.write_sync(b)
    }

    pub fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, std::io::Error> {
        self.get_cf(keys::CF_META, key)
    }
}

/// Hash buckets of a data memtable (8 bytes each, allocated with the memtable).
const DATA_MEMTABLE_BUCKETS: usize = 1 << 18;

/// The option that makes a family's memtable insert each key from where the last insert of the
/// same group left off (RocksDB's insert hints; not in its C API, so set by name).
const GROUP_INSERT_HINT: &str = "memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.8";

/// Options of a column family. The point-read families (rows, session state) get bloom filters
/// in their SST files and memtables: most session-answer and row lookups of a new write miss.
fn cf_options(name: &str) -> Result<Options, rocksdb::Error> {
    let mut o = Options::default();
    if name == keys::CF_RAFT_LOG || name == keys::CF_APPLY_STATE || name == keys::CF_RAFT_STATE {
        // Keys of these families start with the 8-byte group id, and each group writes near
        // its last write: the next log index, new versions of its commit and applied indexes
        // and of its clients' session rows. One memtable skiplist holds every group's keys, so
        // a plain insert searches it from the top (log appends alone were 4 % of a node's CPU
        // under writes at 64 shards); with a hint per group it starts from where the last
        // insert of that group went. Reads and iteration are unchanged. (A skiplist per group,
        // RocksDB's hashed skiplist, measured slower for `apply_state`.)
        o = o.get_options_from_string(GROUP_INSERT_HINT)?;
    }
    // Small, churning families (log entries purged soon after, session answers forgotten,
    // per-group state) get smaller memtables: a skiplist that stays in cache is cheaper to
    // insert into (memtable inserts were a tenth of a node's CPU under writes).
    if name == keys::CF_RAFT_LOG || name == keys::CF_APPLY_STATE || name == keys::CF_RAFT_STATE {
        o.set_write_buffer_size(8 << 20);
    }
    if name == keys::CF_DATA {
        // Point reads of user rows (every get, every compare-and-swap) found their key in the
        // memtable by a skiplist search, a sixth of a node's CPU under reads. A row's key starts
        // with its 8-byte hash, so the memtable hashes that prefix into buckets instead; the
        // few range scans (snapshots, dropping a shard) ask for total order.
        o.set_prefix_extractor(rocksdb::SliceTransform::create_fixed_prefix(keys::DATA_PREFIX_BYTES));
        o.set_memtable_factory(rocksdb::MemtableFactory::HashLinkList { bucket_count: DATA_MEMTABLE_BUCKETS });
    }
    if name == keys::CF_DATA || name == keys::CF_APPLY_STATE {
        let mut t = rocksdb::BlockBasedOptions::default();
        t.set_bloom_filter(10.0, false);
        o.set_block_based_table_factory(&t);
        o.set_memtable_prefix_bloom_ratio(0.05);
        o.set_memtable_whole_key_filtering(true);
    }
    Ok(o)
}

/// Syncs the WAL once for every write queued so far, then tells every writer. While writes
/// arrive concurrently (the last round covered more than one), a round first waits up to
/// `wait` for more: a sync costs the same CPU (two device writes here: the data and the file
/// size) whether it covers one append or ten.
fn group_commit_loop(db: std::sync::Weak<Db>, rx: std_mpsc::Receiver<SyncRequest>, wait: Duration) {
    let mut concurrent = false;
    while let Ok(first) = rx.recv() {
        let mut dones = vec![first.done];
        while dones.len() < GROUP_COMMIT_BATCH_MAX {
            match rx.try_recv() {
                Ok(r) => dones.push(r.done),
                Err(_) => break,
            }
        }
        if concurrent && !wait.is_zero() {
            let deadline = Instant::now() + wait;
            while dones.len() < GROUP_COMMIT_BATCH_MAX {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match rx.recv_timeout(left) {
                    Ok(r) => dones.push(r.done),
                    Err(_) => break,
                }
            }
        }
        concurrent = dones.len() > 1;
        let Some(db) = db.upgrade() else {
            for d in dones {
                d(Err(io_err("storage closed")));
            }
            return;
        };
        let started = Instant::now();
        fail::fail_point!("storage::fsync::before");
        let result = db.db.flush_wal(db.fsync && !fsync_removed()).map_err(io_err);
        fail::fail_point!("storage::fsync::after");
        db.group_syncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!("ringkv_storage_syncs_total").increment(1);
        metrics::histogram!("ringkv_storage_group_commit_writes").record(dones.len() as f64);
        metrics::histogram!("ringkv_storage_sync_seconds").record(started.elapsed().as_secs_f64());
        drop(db);
        for d in dones {
            d(result.as_ref().map(|_| ()).map_err(io_err));
        }
    }
}

/// The power-loss test's proof that it can fail: the failpoint `storage::fsync_removed` (set
/// with `FAILPOINTS=storage::fsync_removed=return`) turns every WAL sync into a flush to the OS
/// only, as a build that lost its fsyncs would do.
fn fsync_removed() -> bool {
    fail::fail_point!("storage::fsync_removed", |_| true);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends from many groups queued together are made durable by far fewer syncs.
    #[test]
    fn one_sync_covers_many_groups() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("open");
        let (tx, rx) = std_mpsc::channel();
        let writes = 200u64;
        for g in 0..writes {
            let mut b = WriteBatch::default();
            b.put_cf(db.cf(keys::CF_RAFT_LOG), keys::log_key(g, 1), b"entry");
            let tx = tx.clone();
            db.write_durable(b, move |r| {
                let _ = tx.send(r.is_ok());
            });
        }
        for _ in 0..writes {
            assert!(rx.recv().expect("callback"));
        }
        let syncs = db.group_syncs();
        assert!(syncs >= 1 && syncs < writes / 4, "{syncs} syncs for {writes} appends");
        for g in 0..writes {
            assert!(db.get_cf(keys::CF_RAFT_LOG, &keys::log_key(g, 1)).expect("read").is_some());
        }
    }

    /// The memory report grows with what the memtables hold, and a flush hands it to tables.
    #[test]
    fn memory_usage_counts_the_memtables() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("open");
        let before = db.memory_usage();
        let mut b = WriteBatch::default();
        for i in 0..2_000u64 {
            b.put_cf(db.cf(keys::CF_RAFT_LOG), keys::log_key(1, i), [7u8; 512]);
        }
        db.write(b).expect("write");
        let after = db.memory_usage();
        assert!(after.memtables >= before.memtables + 1_000 * 512, "{before:?} -> {after:?}");
        db.raw().flush_cf(db.cf(keys::CF_RAFT_LOG)).expect("flush");
        let flushed = db.memory_usage();
        assert!(flushed.memtables < after.memtables, "{after:?} -> {flushed:?}");
    }

    /// The group-keyed families insert with a hint per group, and the option (set by name,
    /// outside RocksDB's C API) reaches the database: RocksDB records it in its options file.
    #[test]
    fn group_keyed_families_insert_with_a_hint_per_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("open");
        let mut b = WriteBatch::default();
        for i in 1..=50u64 {
            for g in [3u64, 1, 2] {
                b.put_cf(db.cf(keys::CF_RAFT_LOG), keys::log_key(g, i), i.to_be_bytes());
            }
        }
        db.write(b).expect("write");
        for g in 1..=3u64 {
            for i in 1..=50u64 {
                let v = db.get_cf(keys::CF_RAFT_LOG, &keys::log_key(g, i)).expect("read");
                assert_eq!(v, Some(i.to_be_bytes().to_vec()), "group {g} index {i}");
            }
        }
        let options = std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("OPTIONS-"))
            .max_by_key(|e| e.file_name())
            .expect("an options file");
        let text = std::fs::read_to_string(options.path()).expect("read options");
        let option = |family: &str, name: &str| -> Option<String> {
            let section = text.split("[CFOptions \"").find(|s| s.starts_with(&format!("{family}\"")))?;
            let line = section.lines().find(|l| l.trim_start().starts_with(&format!("{name}=")))?;
            Some(line.trim().to_string())
        };
        let hint = |family: &str| option(family, "memtable_insert_with_hint_prefix_extractor");
        for family in [keys::CF_RAFT_LOG, keys::CF_RAFT_STATE, keys::CF_APPLY_STATE] {
            assert_eq!(hint(family).as_deref(), Some(GROUP_INSERT_HINT), "{family}");
            // The options set after the hint are kept too.
            assert_eq!(option(family, "write_buffer_size").as_deref(), Some("write_buffer_size=8388608"), "{family}");
        }
        assert_ne!(hint(keys::CF_DATA).as_deref(), Some(GROUP_INSERT_HINT), "data keys start with a key hash, not a group");
    }

    /// Opening a database keeps the received snapshot files an unfinished install still needs,
    /// whichever group's it is (also while its marker is only in the memtable), and removes
    /// the others.
    #[test]
    fn snapshot_files_of_an_unfinished_install_of_any_group_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("open");
        let held = |name: &str| {
            let d = db.snapshot_dir("in").join(name);
            std::fs::create_dir_all(&d).expect("dir");
            std::fs::write(d.join("00000.sst"), b"sst").expect("file");
            d
        };
        let (a, b, stray) = (held("transfer-a"), held("transfer-b"), held("stray"));
        let mut batch = WriteBatch::default();
        for (group, d) in [(3u64, &a), (900, &b)] {
            let meta = crate::SnapshotMeta { last_log_id: None, last_membership: Default::default() };
            let marker = crate::raft_store::InstallMarker::new(db.snapshot_root(), [d.join("00000.sst")], meta);
            let v = postcard::to_allocvec(&marker).expect("encode");
            batch.put_cf(db.cf(keys::CF_APPLY_STATE), keys::group_tag_key(group, keys::TAG_INSTALLING), v);
        }
        db.write(batch).expect("write");
        db.clean_snapshot_dirs().expect("clean");
        assert!(a.exists() && b.exists(), "the files of an unfinished install were removed");
        assert!(!stray.exists(), "files no install needs are removed");
    }

    fn append(db: &Db, g: u64, done: std_mpsc::Sender<Instant>) {
        let mut b = WriteBatch::default();
        b.put_cf(db.cf(keys::CF_RAFT_LOG), keys::log_key(g, 1), b"entry");
        db.write_durable(b, move |r| {
            assert!(r.is_ok());
            let _ = done.send(Instant::now());
        });
    }

    /// Under concurrent appends a round waits for more to share its sync; an append after a
    /// round of one does not wait.
    #[test]
    fn concurrent_appends_wait_to_share_a_sync_and_a_lone_one_does_not() {
        let wait = Duration::from_millis(400);
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open_with(dir.path(), Durability { fsync: true, group_commit_wait: wait }).expect("open");
        let (tx, rx) = std_mpsc::channel();
        // A lone append after an idle spell is synced at once.
        let sent = Instant::now();
        append(&db, 1, tx.clone());
        let took = rx.recv().expect("callback") - sent;
        assert!(took < wait / 2, "a lone append waited {took:?}");
        // A burst, then pairs of appends 20 ms apart, none waited for. The burst queues
        // behind the first round's sync, so a round covers more than one append; from then on
        // each round waits and takes the appends that follow, so the whole run needs a few
        // syncs. Without the wait every pair 20 ms apart would need at least one of its own.
        // (CI once saw the pairs alone never queue two appends behind a sync.)
        let before = db.group_syncs();
        let burst = 32u64;
        for g in 0..burst {
            append(&db, 100 + g, tx.clone());
        }
        let pairs = 8u64;
        for g in 0..pairs {
            append(&db, 10 + 2 * g, tx.clone());
            append(&db, 11 + 2 * g, tx.clone());
            std::thread::sleep(Duration::from_millis(20));
        }
        for _ in 0..burst + 2 * pairs {
            rx.recv().expect("callback");
        }
        let syncs = db.group_syncs() - before;
        assert!(syncs <= pairs / 2, "{syncs} syncs for a burst of {burst} and {pairs} pairs of appends 20 ms apart, with a {wait:?} wait");
    }
}
