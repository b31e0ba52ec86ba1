//! The Raft log and vote of one group, with its in-memory tail.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::OptionalSend;
use ringkv_wire::GroupId;
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use serde::de::DeserializeOwned;

use crate::db::{io_err, Db};
use crate::keys::*;
use crate::log_cache::LogCache;
use crate::types::*;

use super::{dec, enc};

/// The Raft log and vote of one group.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Db>,
    group: GroupId,
    committed: Arc<Mutex<Committed>>,
    cache: LogCache,
}

/// How often a group writes its commit index on its own; in between, it rides along with the
/// group's next append. A saved commit index only lets a restarted replica re-apply its log
/// before it hears from a leader, so an older one costs nothing but that.
pub const COMMITTED_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The commit index not written yet, and when it was last written.
struct Committed {
    pending: Option<Option<LogId>>,
    saved_at: std::time::Instant,
}

impl LogStore {
    pub fn new(db: Arc<Db>, group: GroupId) -> Self {
        let committed = Committed { pending: None, saved_at: std::time::Instant::now() };
        LogStore { db, group, committed: Arc::new(Mutex::new(committed)), cache: LogCache::default() }
    }

    /// The group's in-memory log tail, for its state machine to drop what it applied.
    pub fn cache(&self) -> LogCache {
        self.cache.clone()
    }

    fn committed_state(&self) -> std::sync::MutexGuard<'_, Committed> {
        self.committed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state<T: DeserializeOwned>(&self, tag: u8) -> Result<Option<T>, io::Error> {
        self.db.get_cf(CF_RAFT_STATE, &group_tag_key(self.group, tag))?.map(|b| dec(&b)).transpose()
    }

    fn last_entry(&self) -> Result<Option<Entry>, io::Error> {
        let db = self.db.raw();
        let upper = log_key(self.group, u64::MAX);
        let mut it = db.iterator_cf(self.db.cf(CF_RAFT_LOG), IteratorMode::From(&upper, Direction::Reverse));
        match it.next() {
            Some(Ok((k, v))) if key_group(&k) == Some(self.group) => Ok(Some(dec(&v)?)),
            Some(Err(e)) => Err(io_err(e)),
            _ => Ok(None),
        }
    }
}

/// Most bytes (encoded entries) one append carries, unless its first entry alone is larger:
/// a follower far behind catches up in appends of bounded size, so one group's large entries
/// hold up neither the peer connection nor its own heartbeats for long.
pub const APPEND_BYTES_MAX: usize = 1 << 20;

impl LogStore {
    /// The entries `[start, end)` (`end` `None`: to the end), only the first ones within
    /// `bytes_max` (at least one).
    fn read_entries(&self, start: u64, end: Option<u64>, bytes_max: usize) -> Result<Vec<Entry>, io::Error> {
        metrics::counter!("ringkv_raft_log_reads_total").increment(1);
        if let Some(entries) = self.cache.get_within(start, end, bytes_max) {
            return Ok(entries);
        }
        metrics::counter!("ringkv_raft_log_cache_misses_total").increment(1);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(match end {
            Some(e) => log_key(self.group, e).to_vec(),
            None => log_key(self.group + 1, 0).to_vec(),
        });
        let from = log_key(self.group, start);
        let it = self.db.raw().iterator_cf_opt(self.db.cf(CF_RAFT_LOG), ro, IteratorMode::From(&from, Direction::Forward));
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for kv in it {
            let (_, v) = kv.map_err(io_err)?;
            bytes = bytes.saturating_add(v.len());
            if !out.is_empty() && bytes > bytes_max {
                break;
            }
            out.push(dec::<Entry>(&v)?);
        }
        Ok(out)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => Some(e.saturating_add(1)),
            Bound::Excluded(&e) => Some(e),
            Bound::Unbounded => None,
        };
        self.read_entries(start, end, usize::MAX)
    }

    /// What replication sends in one append: at most `max_payload_entries` (openraft bounds
    /// `end`) and at most [`APPEND_BYTES_MAX`].
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, io::Error> {
        self.read_entries(start, Some(end), APPEND_BYTES_MAX)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.state(TAG_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogId> = self.state(TAG_PURGED)?;
        let last_log_id = match self.last_entry()? {
            Some(e) => Some(e.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let mut b = WriteBatch::default();
        b.put_cf(self.db.cf(CF_RAFT_STATE), group_tag_key(self.group, TAG_VOTE), enc(vote)?);
        self.db.write_sync(b)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        {
            let mut c = self.committed_state();
            if c.saved_at.elapsed() < COMMITTED_SAVE_INTERVAL {
                c.pending = Some(committed);
                return Ok(());
            }
            c.pending = None;
            c.saved_at = std::time::Instant::now();
        }
        let mut b = WriteBatch::default();
        b.put_cf(self.db.cf(CF_RAFT_STATE), group_tag_key(self.group, TAG_COMMITTED), enc(&committed)?);
        self.db.write(b)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        if let Some(pending) = self.committed_state().pending {
            return Ok(pending);
        }
        Ok(self.state::<Option<LogId>>(TAG_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.db.cf(CF_RAFT_LOG);
        let mut b = WriteBatch::default();
        let mut cached = Vec::new();
        for e in entries {
            let bytes = enc(&e)?;
            b.put_cf(cf, log_key(self.group, e.log_id.index), &bytes);
            cached.push((e, bytes.len()));
        }
        let n = cached.len() as u64;
        // Readable (from memory) as soon as this returns, like the write below.
        self.cache.append(cached);
        if let Some(committed) = self.committed_state().pending.take() {
            b.put_cf(self.db.cf(CF_RAFT_STATE), group_tag_key(self.group, TAG_COMMITTED), enc(&committed)?);
        }
        metrics::counter!("ringkv_raft_log_appended_entries_total").increment(n);
        metrics::counter!("ringkv_raft_log_appends_total").increment(1);
        fail::fail_point!("raft::append");
        // Readable as soon as this returns; durable when the group committer's next sync runs.
        self.db.write_durable(b, move |r| callback.io_completed(r));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
        self.cache.truncate_after(last_log_id.map(|l| l.index));
        let mut b = WriteBatch::default();
        b.delete_range_cf(self.db.cf(CF_RAFT_LOG), log_key(self.group, from), log_key(self.group + 1, 0));
        self.db.write_sync(b)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        fail::fail_point!("raft::purge");
        self.cache.forget_through(log_id.index);
        let mut b = WriteBatch::default();
        b.put_cf(self.db.cf(CF_RAFT_STATE), group_tag_key(self.group, TAG_PURGED), enc(&log_id)?);
        b.delete_range_cf(self.db.cf(CF_RAFT_LOG), log_key(self.group, 0), log_key(self.group, log_id.index + 1));
        self.db.write(b)
    }
}
