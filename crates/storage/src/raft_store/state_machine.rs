//! The applied state of one group: rows, client sessions, the placement map.

use std::fmt::Debug;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::{Stream, TryStreamExt};
use openraft::alias::SnapshotOf;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use ringkv_wire::{ClusterMap, GroupId};
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use serde::{Deserialize, Serialize};

use crate::db::{io_err, Db};
use crate::keys::*;
use crate::log_cache::LogCache;
use crate::types::*;

use super::{dec, enc};

use super::snapshot::*;

/// What a replica's state machine holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaKind {
    /// The placement group: the cluster map.
    Placement,
    /// A shard: user data whose hash is in `[start, end)`.
    Shard { start: u64, end: u64 },
}

impl ReplicaKind {
    pub fn contains(&self, hash: u64) -> bool {
        match *self {
            ReplicaKind::Placement => false,
            ReplicaKind::Shard { start, end } => hash >= start && (hash < end || end == u64::MAX),
        }
    }
}

/// The applied state of one group.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Db>,
    group: GroupId,
    kind: ReplicaKind,
    current: Arc<Mutex<Option<Arc<StoredSnapshot>>>>,
    /// Set while a snapshot replaces this replica's rows: reads of its applied state would see
    /// the range empty or half filled.
    installing: Arc<std::sync::atomic::AtomicBool>,
    /// Size at which a snapshot's SST file is closed and the next key range starts.
    pub file_bytes: u64,
    /// The group's in-memory log tail: applied entries leave it.
    log_cache: Option<LogCache>,
    /// Session rows as this replica last stored them.
    rows: Arc<Mutex<RowCache>>,
}

/// Most clients whose session rows a replica keeps in memory; past it, rows written later are
/// read from RocksDB again.
const ROW_CACHE_CLIENTS_MAX: usize = 1024;
/// Rows keeping more answers than this are not kept in memory (a client far behind on its
/// acknowledgements: such a row is large, and copying it costs more than reading it).
const ROW_CACHE_LIVE_MAX: usize = 64;
/// Most answers all of a replica's cached rows keep together: each is at most
/// `ANSWER_INLINE_BYTES_MAX` encoded, so a replica's cache stays within a few hundred KiB
/// however many clients lag behind on their acknowledgements.
const ROW_CACHE_ANSWERS_MAX: usize = 4096;

/// The session rows a replica last wrote, exactly as stored, so a client's next write finds
/// its row without a RocksDB lookup (a memtable search on every write of a session, a
/// twentieth of the box's CPU under writes). Only [`StateMachine::apply`] writes rows, so it
/// keeps this true: a row leaves the cache when a write takes it, and comes back with what the
/// batch stored once the batch is written; a snapshot install clears it.
#[derive(Default)]
struct RowCache {
    rows: std::collections::HashMap<u64, SessionRow>,
    /// Answers the cached rows keep, together.
    answers: usize,
    /// Rows looked up in RocksDB (not found here), for tests.
    misses: u64,
}

impl RowCache {
    fn take(&mut self, client: u64) -> Option<SessionRow> {
        let row = self.rows.remove(&client)?;
        self.answers -= row.live.len();
        Some(row)
    }

    /// What a successful batch stored: its rows, and the clients whose sessions expired.
    fn stored(&mut self, rows: std::collections::HashMap<u64, SessionRow>, expired: &std::collections::HashSet<u64>) {
        for client in expired.iter().chain(rows.keys()) {
            self.take(*client);
        }
        for (client, row) in rows {
            let fits = row.live.len() <= ROW_CACHE_LIVE_MAX
                && self.rows.len() < ROW_CACHE_CLIENTS_MAX
                && self.answers + row.live.len() <= ROW_CACHE_ANSWERS_MAX;
            if fits {
                self.answers += row.live.len();
                self.rows.insert(client, row);
            }
        }
    }

    fn clear(&mut self) {
        self.rows.clear();
        self.answers = 0;
    }
}

impl StateMachine {
    pub fn new(db: Arc<Db>, group: GroupId, kind: ReplicaKind) -> Self {
        StateMachine {
            db,
            group,
            kind,
            current: Arc::new(Mutex::new(None)),
            installing: Default::default(),
            file_bytes: SNAPSHOT_FILE_BYTES,
            log_cache: None,
            rows: Default::default(),
        }
    }

    /// Lets applied entries leave the group's in-memory log tail (`LogStore::cache`).
    pub fn with_log_cache(mut self, cache: LogCache) -> Self {
        self.log_cache = Some(cache);
        self
    }

    /// Whether a snapshot is being installed (its applied state must not be read).
    pub fn is_installing(&self) -> bool {
        self.installing.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn kind(&self) -> ReplicaKind {
        self.kind
    }

    /// The stored row of `client`, which the caller is about to replace (so it leaves the cache).
    fn take_row(&self, client: u64) -> Result<SessionRow, io::Error> {
        if let Ok(mut c) = self.rows.lock() {
            if let Some(row) = c.take(client) {
                return Ok(row);
            }
            c.misses += 1;
        }
        session_row(self, client)
    }

    /// Forgets every cached session row (their stored state was replaced wholesale).
    fn forget_rows(&self) {
        if let Ok(mut c) = self.rows.lock() {
            c.clear();
        }
    }

    fn apply_key(&self, tag: u8) -> [u8; 9] {
        group_tag_key(self.group, tag)
    }

    /// Reads a user key from this node's applied state.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, io::Error> {
        self.db.get_cf(CF_DATA, &data_key(key))
    }

    /// Reads keys from one RocksDB snapshot, so a batch never sees part of a write batch. Stops
    /// after the first key that takes the values read past `bytes_max`: the answer is a prefix
    /// of `keys` (at least one value), and the caller asks again for the rest.
    pub fn get_many(&self, keys: &[Vec<u8>], bytes_max: usize) -> Result<Vec<Option<Vec<u8>>>, io::Error> {
        let db = self.db.raw();
        let snap = db.snapshot();
        let cf = self.db.cf(CF_DATA);
        let mut out = Vec::with_capacity(keys.len().min(1024));
        let mut bytes = 0usize;
        for k in keys {
            let v = snap.get_cf(cf, data_key(k)).map_err(io_err)?;
            bytes += k.len() + v.as_ref().map_or(0, |v| v.len()) + 8;
            out.push(v);
            if bytes >= bytes_max {
                break;
            }
        }
        Ok(out)
    }

    /// Approximate bytes of this shard's data in SST files; rows still in the memtable are not
    /// counted (0 for the placement group).
    pub fn approximate_bytes(&self) -> u64 {
        let ReplicaKind::Shard { start, end } = self.kind else { return 0 };
        let (lower, upper) = data_range(start, end);
        let upper = upper.unwrap_or_else(|| vec![0xff; 9]);
        let range = rocksdb::Range::new(&lower, &upper);
        self.db.raw().get_approximate_sizes_cf(self.db.cf(CF_DATA), &[range]).first().copied().unwrap_or(0)
    }

    /// The cluster map, if this is the placement group and it has been bootstrapped.
    pub fn placement_map(&self) -> Result<Option<ClusterMap>, io::Error> {
        self.db.get_cf(CF_APPLY_STATE, &self.apply_key(TAG_PLACEMENT_MAP))?.map(|b| dec(&b)).transpose()
    }

    fn build(&self) -> Result<StoredSnapshot, io::Error> {
        let db = self.db.raw();
        let snap = db.snapshot();
        let read = |tag: u8| -> Result<Option<Vec<u8>>, io::Error> {
            snap.get_cf(self.db.cf(CF_APPLY_STATE), self.apply_key(tag)).map_err(io_err)
        };
        let last_log_id: Option<LogId> = read(TAG_APPLIED)?.map(|b| dec(&b)).transpose()?.flatten();
        let last_membership: StoredMembership = read(TAG_MEMBERSHIP)?.map(|b| dec(&b)).transpose()?.unwrap_or_default();
        let data = match self.kind {
            ReplicaKind::Placement => {
                let map = read(TAG_PLACEMENT_MAP)?.map(|b| dec(&b)).transpose()?;
                SnapshotData::Memory(Arc::new(enc(&SnapshotPayload::Placement(map))?))
            }
            ReplicaKind::Shard { start, end } => {
                let mut sessions = Vec::new();
                let mut ro = ReadOptions::default();
                ro.set_iterate_upper_bound(group_tag_key(self.group, TAG_SESSION + 1).to_vec());
                ro.set_snapshot(&snap);
                let from = group_tag_key(self.group, TAG_SESSION);
                for kv in db.iterator_cf_opt(self.db.cf(CF_APPLY_STATE), ro, IteratorMode::From(&from, Direction::Forward)) {
                    let (k, v) = kv.map_err(io_err)?;
                    sessions.push((k.get(9..).unwrap_or_default().to_vec(), v.to_vec()));
                }
                let seq = SNAPSHOT_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let dir = self.db.snapshot_dir("out").join(format!("g{}-{}", self.group, seq));
                let files = write_sst_files(&self.db, &snap, &dir, start, end, self.file_bytes)?;
                fail::fail_point!("snapshot::build");
                SnapshotData::Files(Arc::new(SnapshotFiles::new(dir, files, sessions)))
            }
        };
        metrics::counter!("ringkv_raft_snapshots_built_total").increment(1);
        Ok(StoredSnapshot { meta: SnapshotMeta { last_log_id, last_membership }, data })
    }

    /// Finishes a shard install whose old state is already replaced by the marker's batch:
    /// ingests the files (atomically; again after a crash, which is harmless since nothing was
    /// applied since) and records the new applied state.
    fn finish_install(&self, marker: &InstallMarker) -> Result<(), io::Error> {
        if !marker.files.is_empty() {
            let mut opts = rocksdb::IngestExternalFileOptions::default();
            opts.set_move_files(false);
            self.db
                .raw()
                .ingest_external_file_cf_opts(self.db.cf(CF_DATA), &opts, marker.paths(self.db.snapshot_root()))
                .map_err(io_err)?;
        }
        let apply_cf = self.db.cf(CF_APPLY_STATE);
        let mut b = WriteBatch::default();
        b.put_cf(apply_cf, self.apply_key(TAG_APPLIED), enc(&marker.meta.last_log_id)?);
        b.put_cf(apply_cf, self.apply_key(TAG_MEMBERSHIP), enc(&marker.meta.last_membership)?);
        b.delete_cf(apply_cf, self.apply_key(TAG_INSTALLING));
        self.db.write_sync(b)
    }

    fn set_current(&self, s: Arc<StoredSnapshot>) {
        if let Ok(mut c) = self.current.lock() {
            *c = Some(s);
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, SnapshotData>, io::Error> {
        let s = Arc::new(self.build()?);
        self.set_current(s.clone());
        Ok(openraft::Snapshot { meta: s.meta.clone(), snapshot: s.data.clone() })
    }
}

/// What one apply batch has written so far, for reads later in the same batch.
#[derive(Default)]
struct Overlay {
    data: std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Session rows and answers written earlier in the batch (`None`: deleted).
    rows: std::collections::HashMap<u64, SessionRow>,
    answers: std::collections::HashMap<(u64, u64), Option<CommandResult>>,
    /// Clients whose sessions expired earlier in the batch (their rows are deleted).
    expired: std::collections::HashSet<u64>,
}

/// A client's session in one group: which answers are kept, and below which sequence number
/// the client retries nothing any more.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct SessionRow {
    floor: u64,
    /// The kept answers by sequence number, in the order the writes applied.
    live: Vec<(u64, Kept)>,
    /// Log index of the client's last write in this group: sessions silent for long expire.
    last_index: u64,
    /// Read from a row of the earlier format (under [`session_key`]), which the next write of
    /// this row deletes.
    #[serde(skip)]
    legacy: bool,
}

/// Where a kept answer is: in the row (most answers are a byte or two, so a write costs one
/// session key, not three), or under its own [`session_answer_key`] when larger than
/// [`ANSWER_INLINE_BYTES_MAX`] (a compare-and-swap that did not swap carries the value it
/// found, and the row is rewritten by every write of the client).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Kept {
    Inline(CommandResult),
    Apart,
}

/// Most answers a client's session row keeps in one group; the next write forgets the oldest.
/// A client acknowledges answers below its oldest write in flight (`acked_below`, over all
/// groups), so a client reaches this bound only while one of its writes stays unanswered as
/// this many others to the same group complete (a busy client, such as a gateway's, with a
/// write lost and waiting for its retry), or when it never acknowledges. If that stuck write
/// arrives after the bound passed it, it is refused (`Expired`), not applied: an error for it,
/// never a second application. The row, rewritten by each write of its client, stays under
/// about 100 KiB.
pub const SESSION_ANSWERS_KEPT_MAX: usize = 16_384;

/// Forgets the answers of `client` below `below` (deleting those kept apart) and moves the
/// row's floor there: a write below the floor is never applied again.
fn forget_below(sm: &StateMachine, client: u64, row: &mut SessionRow, below: u64, overlay: &mut Overlay, batch: &mut WriteBatch) {
    for (old, kept) in row.live.iter().filter(|(s, _)| *s < below) {
        if *kept == Kept::Apart {
            batch.delete_cf(sm.db.cf(CF_APPLY_STATE), session_answer_key(sm.group, client, *old));
            overlay.answers.insert((client, *old), None);
        }
    }
    row.live.retain(|(s, _)| *s >= below);
    row.floor = below;
}

/// Largest encoded answer kept in the row itself.
const ANSWER_INLINE_BYTES_MAX: usize = 64;

/// A row of the earlier format: every answer under its own key.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct LegacyRow {
    floor: u64,
    live: Vec<u64>,
    last_index: u64,
}

impl From<LegacyRow> for SessionRow {
    fn from(l: LegacyRow) -> Self {
        SessionRow { floor: l.floor, live: l.live.into_iter().map(|s| (s, Kept::Apart)).collect(), last_index: l.last_index, legacy: true }
    }
}

/// The client's row; a client without one (new, or from a data dir written before rows
/// existed) gets one listing whatever answers it already has.
fn session_row(sm: &StateMachine, client: u64) -> Result<SessionRow, io::Error> {
    if let Some(b) = sm.db.get_cf(CF_APPLY_STATE, &session_row_key(sm.group, client))? {
        return dec(&b);
    }
    if let Some(b) = sm.db.get_cf(CF_APPLY_STATE, &session_key(sm.group, client))? {
        return Ok(dec::<LegacyRow>(&b)?.into());
    }
    let prefix = session_key(sm.group, client);
    let mut live = Vec::new();
    for kv in sm.db.raw().iterator_cf(sm.db.cf(CF_APPLY_STATE), IteratorMode::From(&prefix, Direction::Forward)) {
        let (k, _) = kv.map_err(io_err)?;
        if !k.starts_with(&prefix) {
            break;
        }
        if let Some(seq) = k.get(17..25).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            live.push((u64::from_be_bytes(seq), Kept::Apart));
        }
    }
    Ok(SessionRow { floor: 0, live, last_index: 0, legacy: false })
}

/// Forgets every session of `sm`'s group whose last write is below `below_index`: its row and
/// the answers it keeps. Returns how many.
fn expire_sessions(sm: &StateMachine, below_index: u64, overlay: &mut Overlay, batch: &mut WriteBatch) -> Result<u64, io::Error> {
    let apply_cf = sm.db.cf(CF_APPLY_STATE);
    let prefix = group_tag_key(sm.group, TAG_SESSION);
    // Each stored row by client: a row of this format wins over one of the earlier format.
    let mut stored: std::collections::BTreeMap<u64, SessionRow> = std::collections::BTreeMap::new();
    for kv in sm.db.raw().iterator_cf(apply_cf, IteratorMode::From(&prefix, Direction::Forward)) {
        let (k, v) = kv.map_err(io_err)?;
        if !k.starts_with(&prefix) {
            break;
        }
        // Rows are `group ++ tag ++ client` (++ 1); answers have the sequence number after that.
        let Some(client) = k.get(9..17).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes) else {
            continue;
        };
        match k.len() {
            18 if k[17] == 1 => {
                stored.insert(client, dec(&v)?);
            }
            17 => {
                let legacy: SessionRow = dec::<LegacyRow>(&v)?.into();
                stored.entry(client).or_insert(legacy);
            }
            _ => {}
        }
    }
    // A write earlier in this batch may have renewed a row, or an expiry deleted it. Rows
    // written earlier in this batch and not stored yet count too: a replica that applied those
    // entries in an earlier batch has them stored, and must come to the same result.
    let mut silent: Vec<(u64, SessionRow)> = Vec::new();
    for (client, row) in stored {
        match overlay.rows.get(&client) {
            Some(r) => silent.push((client, r.clone())),
            None if overlay.expired.contains(&client) => {}
            None => silent.push((client, row)),
        }
    }
    let listed: std::collections::HashSet<u64> = silent.iter().map(|(c, _)| *c).collect();
    silent.extend(overlay.rows.iter().filter(|(c, _)| !listed.contains(*c)).map(|(c, r)| (*c, r.clone())));
    silent.retain(|(_, row)| row.last_index < below_index);
    for (client, row) in &silent {
        for (seq, kept) in &row.live {
            if *kept == Kept::Apart {
                batch.delete_cf(apply_cf, session_answer_key(sm.group, *client, *seq));
                overlay.answers.insert((*client, *seq), None);
            }
        }
        batch.delete_cf(apply_cf, session_row_key(sm.group, *client));
        batch.delete_cf(apply_cf, session_key(sm.group, *client));
        overlay.rows.remove(client);
        overlay.expired.insert(*client);
    }
    Ok(silent.len() as u64)
}

/// What a session keeps of an answer: only what the client cannot know. A compare-and-swap
/// that swapped found exactly the value the client expected, so that value is not stored.
fn stored_answer(r: &CommandResult) -> CommandResult {
    match r {
        CommandResult::Cas { swapped: true, .. } => CommandResult::Cas { swapped: true, current: None },
        other => other.clone(),
    }
}

/// A stored answer as the client gets it (the inverse of [`stored_answer`]).
fn replayed_answer(stored: CommandResult, cmd: &Command) -> CommandResult {
    match (stored, cmd) {
        (CommandResult::Cas { swapped: true, .. }, Command::Cas { expect, .. }) => {
            CommandResult::Cas { swapped: true, current: expect.clone() }
        }
        (other, _) => other,
    }
}

/// What a [`KeyOp`] makes of a key's value: the new value (`None`: deleted) and the answer, or
/// why it does not apply. Deterministic: every replica decides the same.
pub fn apply_key_op(current: Option<Vec<u8>>, op: ringkv_wire::KeyOp, value_bytes_max: u64) -> Result<(Option<Vec<u8>>, i64), String> {
    use ringkv_wire::KeyOp;
    match op {
        KeyOp::Incr(delta) => {
            let now = match &current {
                None => 0,
                Some(v) => parse_counter(v).ok_or("value is not an integer or out of range")?,
            };
            let new = now.checked_add(delta).ok_or("increment or decrement would overflow")?;
            Ok((Some(new.to_string().into_bytes()), new))
        }
        KeyOp::Append(suffix) => {
            let mut v = current.unwrap_or_default();
            let len = v.len() as u64 + suffix.len() as u64;
            if len > value_bytes_max {
                return Err(format!("the value would be {len} bytes, more than the limit of {value_bytes_max}"));
            }
            v.extend_from_slice(&suffix);
            Ok((Some(v), len as i64))
        }
        KeyOp::DeleteCount => Ok((None, current.is_some() as i64)),
    }
}

/// A counter's value as Redis reads one: a decimal i64 with no sign `+`, blanks or leading
/// zeros.
fn parse_counter(v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?;
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty()
        || digits.len() > 20
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// Applies one command against the overlay (writes earlier in the same batch) and the database.
fn exec(
    sm: &StateMachine,
    index: u64,
    cmd: Command,
    overlay: &mut Overlay,
    batch: &mut WriteBatch,
    map: &mut Option<ClusterMap>,
) -> Result<CommandResult, io::Error> {
    let data = sm.db.cf(CF_DATA);
    let key_ok = |key: &[u8]| sm.kind.contains(ringkv_wire::key_hash(key));
    match cmd {
        Command::Session { session, cmd } => {
            let apply_cf = sm.db.cf(CF_APPLY_STATE);
            let (client, seq) = (session.client, session.seq);
            let mut row = match overlay.rows.get(&client) {
                Some(r) => r.clone(),
                None if overlay.expired.contains(&client) => SessionRow::default(),
                None => sm.take_row(client)?,
            };
            // The row lists exactly the answers kept (a missing row was rebuilt from them), so
            // a new write, not in it, costs no lookup.
            let answer = match row.live.iter().find(|(s, _)| *s == seq) {
                None => None,
                Some((_, Kept::Inline(r))) => Some(r.clone()),
                Some((_, Kept::Apart)) => match overlay.answers.get(&(client, seq)) {
                    Some(a) => a.clone(),
                    None => sm.db.get_cf(CF_APPLY_STATE, &session_answer_key(sm.group, client, seq))?.map(|b| dec(&b)).transpose()?,
                },
            };
            if let Some(r) = answer {
                metrics::counter!("ringkv_raft_duplicate_writes_total").increment(1);
                return Ok(replayed_answer(r, &cmd));
            }
            if seq < row.floor {
                // Its answer was forgotten because the client moved past it: never apply it now.
                metrics::counter!("ringkv_raft_expired_writes_total").increment(1);
                return Ok(CommandResult::Expired { client, seq, floor: row.floor });
            }
            let r = exec(sm, index, *cmd, overlay, batch, map)?;
            // The client retries nothing below `acked_below` again: forget those answers.
            if session.acked_below > row.floor {
                forget_below(sm, client, &mut row, session.acked_below, overlay, batch);
            }
            // A client that does not move `acked_below` on (one write stuck, or a client that
            // never acknowledges) would grow its row, rewritten by each of its writes, without
            // end: past the bound its oldest answers are forgotten as if acknowledged. A retry
            // of one of those is refused (`Expired`), never applied twice.
            if row.live.len() >= SESSION_ANSWERS_KEPT_MAX {
                let mut kept: Vec<u64> = row.live.iter().map(|(s, _)| *s).collect();
                let last_forgotten = row.live.len() - SESSION_ANSWERS_KEPT_MAX;
                let below = (*kept.select_nth_unstable(last_forgotten).1 + 1).max(row.floor);
                metrics::counter!("ringkv_raft_session_answers_evicted_total").increment(1);
                forget_below(sm, client, &mut row, below, overlay, batch);
            }
            let stored = stored_answer(&r);
            let bytes = enc(&stored)?;
            if bytes.len() <= ANSWER_INLINE_BYTES_MAX {
                row.live.push((seq, Kept::Inline(stored)));
            } else {
                batch.put_cf(apply_cf, session_answer_key(sm.group, client, seq), &bytes);
                overlay.answers.insert((client, seq), Some(stored));
                row.live.push((seq, Kept::Apart));
            }
            row.last_index = index;
            batch.put_cf(apply_cf, session_row_key(sm.group, client), enc(&row)?);
            if row.legacy {
                batch.delete_cf(apply_cf, session_key(sm.group, client));
                row.legacy = false;
            }
            overlay.rows.insert(client, row);
            overlay.expired.remove(&client);
            Ok(r)
        }
        Command::ExpireSessions { below_index } => {
            let n = expire_sessions(sm, below_index, overlay, batch)?;
            metrics::counter!("ringkv_raft_sessions_expired_total").increment(n);
            Ok(CommandResult::Done)
        }
        Command::PutMany { pairs } if pairs.iter().all(|(k, _)| key_ok(k)) => {
            for (key, value) in pairs {
                batch.put_cf(data, data_key(&key), &value);
                overlay.data.insert(key, Some(value));
            }
            Ok(CommandResult::Done)
        }
        Command::Put { key, value } if key_ok(&key) => {
            batch.put_cf(data, data_key(&key), &value);
            overlay.data.insert(key, Some(value));
            Ok(CommandResult::Done)
        }
        Command::Delete { key } if key_ok(&key) => {
            batch.delete_cf(data, data_key(&key));
            overlay.data.insert(key, None);
            Ok(CommandResult::Done)
        }
        Command::Cas { key, expect, new } if key_ok(&key) => {
            let current = match overlay.data.get(&key) {
                Some(v) => v.clone(),
                None => sm.get(&key)?,
            };
            if current == expect {
                batch.put_cf(data, data_key(&key), &new);
                overlay.data.insert(key, Some(new));
                Ok(CommandResult::Cas { swapped: true, current })
            } else {
                Ok(CommandResult::Cas { swapped: false, current })
            }
        }
        Command::Apply { key, op, value_bytes_max } if key_ok(&key) => {
            let current = match overlay.data.get(&key) {
                Some(v) => v.clone(),
                None => sm.get(&key)?,
            };
            match apply_key_op(current, op, value_bytes_max) {
                Ok((Some(new), answer)) => {
                    batch.put_cf(data, data_key(&key), &new);
                    overlay.data.insert(key, Some(new));
                    Ok(CommandResult::Int(answer))
                }
                Ok((None, answer)) => {
                    batch.delete_cf(data, data_key(&key));
                    overlay.data.insert(key, None);
                    Ok(CommandResult::Int(answer))
                }
                Err(why) => Ok(CommandResult::Invalid(why)),
            }
        }
        Command::Placement(p) if sm.kind == ReplicaKind::Placement => {
            let m = map.get_or_insert_with(ClusterMap::default);
            let r = ringkv_placement::apply(m, &p);
            if r.is_ok() {
                batch.put_cf(sm.db.cf(CF_APPLY_STATE), sm.apply_key(TAG_PLACEMENT_MAP), enc(&*m)?);
            }
            Ok(CommandResult::Placement(r))
        }
        other => Ok(CommandResult::Refused(format!("{other} does not belong to group {}", sm.group))),
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        // A crash in the middle of installing a snapshot: finish it first.
        if let Some(b) = self.db.get_cf(CF_APPLY_STATE, &self.apply_key(TAG_INSTALLING))? {
            let marker: InstallMarker = dec(&b)?;
            let files = marker.paths(self.db.snapshot_root());
            if let Some(missing) = files.iter().find(|f| !f.exists()) {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("group {}: an interrupted snapshot install needs {}, which is gone", self.group, missing.display()),
                ));
            }
            tracing::warn!(group = self.group, "finishing a snapshot install interrupted by a crash");
            self.finish_install(&marker)?;
            // Those files were kept only for this; nothing holds them any more.
            for dir in files.iter().filter_map(|f| f.parent()).collect::<std::collections::BTreeSet<_>>() {
                if dir.starts_with(self.db.snapshot_dir("in")) {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
        }
        let applied: Option<LogId> = self.db.get_cf(CF_APPLY_STATE, &self.apply_key(TAG_APPLIED))?.map(|b| dec(&b)).transpose()?.flatten();
        let membership: StoredMembership =
            self.db.get_cf(CF_APPLY_STATE, &self.apply_key(TAG_MEMBERSHIP))?.map(|b| dec(&b)).transpose()?.unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut batch = WriteBatch::default();
        let mut overlay = Overlay::default();
        let mut map = if self.kind == ReplicaKind::Placement { self.placement_map()? } else { None };
        let mut responders = Vec::new();
        let mut last = None;
        let mut membership = None;
        let mut n = 0u64;
        while let Some((entry, responder)) = entries.try_next().await? {
            last = Some(entry.log_id);
            n += 1;
            let result = match entry.payload {
                EntryPayload::Blank => CommandResult::Done,
                EntryPayload::Normal(cmd) => exec(self, entry.log_id.index, cmd, &mut overlay, &mut batch, &mut map)?,
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    CommandResult::Done
                }
            };
            if let Some(r) = responder {
                responders.push((r, result));
            }
        }
        let apply_cf = self.db.cf(CF_APPLY_STATE);
        if let Some(last) = last {
            batch.put_cf(apply_cf, self.apply_key(TAG_APPLIED), enc(&Some(last))?);
        }
        if let Some(m) = membership {
            batch.put_cf(apply_cf, self.apply_key(TAG_MEMBERSHIP), enc(&m)?);
        }
        fail::fail_point!("raft::apply::before");
        // A storage error at apply (`FAILPOINTS=raft::apply::error=return`): the group's Raft
        // stops, and with it the node.
        fail::fail_point!("raft::apply::error", |_| Err(io::Error::other("failpoint raft::apply::error")));
        // Not synced: the log is durable, and the applied index is written in the same batch as
        // the data, so after a crash the state machine re-applies exactly what it lost.
        self.db.write(batch)?;
        if let Ok(mut c) = self.rows.lock() {
            c.stored(overlay.rows, &overlay.expired);
        }
        fail::fail_point!("raft::apply::after");
        metrics::counter!("ringkv_raft_applied_entries_total").increment(n);
        metrics::counter!("ringkv_raft_apply_batches_total").increment(1);
        if let (Some(cache), Some(last)) = (&self.log_cache, last) {
            cache.applied_through(last.index);
        }
        for (r, result) in responders {
            r.send(result);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotData) -> Result<(), io::Error> {
        // The snapshot's sessions replace this replica's (also when the install fails halfway).
        self.forget_rows();
        let apply_cf = self.db.cf(CF_APPLY_STATE);
        match (&snapshot, self.kind) {
            (SnapshotData::Memory(data), ReplicaKind::Placement) => {
                let SnapshotPayload::Placement(map) = dec(data)?;
                let mut b = WriteBatch::default();
                match map {
                    Some(m) => b.put_cf(apply_cf, self.apply_key(TAG_PLACEMENT_MAP), enc(&m)?),
                    None => b.delete_cf(apply_cf, self.apply_key(TAG_PLACEMENT_MAP)),
                }
                b.put_cf(apply_cf, self.apply_key(TAG_APPLIED), enc(&meta.last_log_id)?);
                b.put_cf(apply_cf, self.apply_key(TAG_MEMBERSHIP), enc(&meta.last_membership)?);
                self.db.write_sync(b)?;
            }
            (SnapshotData::Files(f), ReplicaKind::Shard { start, end }) => {
                struct Installing<'a>(&'a std::sync::atomic::AtomicBool);
                impl Drop for Installing<'_> {
                    fn drop(&mut self) {
                        self.0.store(false, std::sync::atomic::Ordering::Release);
                    }
                }
                self.installing.store(true, std::sync::atomic::Ordering::Release);
                let _installing = Installing(&self.installing);
                let paths: Vec<PathBuf> = f.files.iter().map(|(p, _)| p.clone()).collect();
                check_snapshot_files(&self.db, &paths, start, end)?;
                // One synced batch replaces the old rows and sessions and records what is left
                // to do; the files are then ingested in one atomic step.
                let marker = InstallMarker::new(self.db.snapshot_root(), paths, meta.clone());
                let mut b = WriteBatch::default();
                b.put_cf(apply_cf, self.apply_key(TAG_INSTALLING), enc(&marker)?);
                b.delete_range_cf(apply_cf, group_tag_key(self.group, TAG_SESSION), group_tag_key(self.group, TAG_SESSION + 1));
                for (k, v) in &f.sessions {
                    let mut key = group_tag_key(self.group, TAG_SESSION).to_vec();
                    key.extend_from_slice(k);
                    b.put_cf(apply_cf, key, v);
                }
                delete_data_range(&self.db, &mut b, start, end)?;
                self.db.write_sync(b)?;
                fail::fail_point!("snapshot::install");
                if let Err(e) = self.finish_install(&marker) {
                    // The marker now names these files: keep them for the retry at restart.
                    f.keep.store(true, std::sync::atomic::Ordering::Relaxed);
                    return Err(e);
                }
            }
            _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "snapshot is for another kind of group")),
        }
        self.set_current(Arc::new(StoredSnapshot { meta: meta.clone(), data: snapshot }));
        metrics::counter!("ringkv_raft_snapshots_installed_total").increment(1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<TypeConfig, SnapshotData>>, io::Error> {
        let cur = self.current.lock().ok().and_then(|c| c.clone());
        Ok(cur.map(|s| openraft::Snapshot { meta: s.meta.clone(), snapshot: s.data.clone() }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::entry::RaftEntry;

    use super::*;

    fn entry(index: u64, cmd: Command) -> Entry {
        let leader = openraft::impls::leader_id_adv::LeaderId { term: 1, node_id: 1 };
        Entry::new(openraft::LogId::new(leader, index), EntryPayload::Normal(cmd))
    }

    async fn apply(sm: &mut StateMachine, entries: Vec<Entry>) {
        let items: Vec<Result<EntryResponder<TypeConfig>, io::Error>> = entries.into_iter().map(|e| Ok((e, None))).collect();
        sm.apply(futures::stream::iter(items)).await.expect("apply");
    }

    fn cas(seq: u64, acked_below: u64, expect: &[u8], new: &[u8]) -> Command {
        let session = ringkv_wire::Session { client: 9, seq, acked_below };
        Command::Session { session, cmd: Box::new(Command::Cas { key: b"n".to_vec(), expect: Some(expect.to_vec()), new: new.to_vec() }) }
    }

    #[test]
    fn key_ops_follow_redis_and_refuse_what_does_not_fit() {
        use ringkv_wire::KeyOp::*;
        let op = |cur: Option<&str>, op| apply_key_op(cur.map(|c| c.as_bytes().to_vec()), op, 8);
        assert_eq!(op(None, Incr(5)), Ok((Some(b"5".to_vec()), 5)));
        assert_eq!(op(Some("-3"), Incr(-2)), Ok((Some(b"-5".to_vec()), -5)));
        for bad in ["x", "", "01", "+1", " 1", "1.5", "99999999999999999999"] {
            assert!(op(Some(bad), Incr(1)).is_err(), "{bad:?} counted");
        }
        assert!(op(Some(&i64::MAX.to_string()), Incr(1)).is_err_and(|e| e.contains("overflow")));
        assert_eq!(op(Some("ab"), Append(b"cd".to_vec())), Ok((Some(b"abcd".to_vec()), 4)));
        assert_eq!(op(None, Append(b"x".to_vec())), Ok((Some(b"x".to_vec()), 1)));
        assert!(op(Some("abcdef"), Append(b"xyz".to_vec())).is_err(), "grew past the limit of 8");
        assert_eq!(op(Some("v"), DeleteCount), Ok((None, 1)));
        assert_eq!(op(None, DeleteCount), Ok((None, 0)));
    }

    /// Increments under sessions: a replayed one answers the first result and adds nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replayed_increment_adds_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("db");
        let mut sm = StateMachine::new(db, 1, ReplicaKind::Shard { start: 0, end: u64::MAX });
        let incr = |seq| Command::Session {
            session: ringkv_wire::Session { client: 7, seq, acked_below: 1 },
            cmd: Box::new(Command::Apply { key: b"c".to_vec(), op: ringkv_wire::KeyOp::Incr(10), value_bytes_max: 64 }),
        };
        apply(&mut sm, vec![entry(1, incr(1)), entry(2, incr(2)), entry(3, incr(1))]).await;
        assert_eq!(sm.get(b"c").expect("get"), Some(b"20".to_vec()));
    }

    /// A put under an already used session id: if deduplication failed it would overwrite.
    fn replay_as_put(seq: u64) -> Command {
        let session = ringkv_wire::Session { client: 9, seq, acked_below: 1 };
        Command::Session { session, cmd: Box::new(Command::Put { key: b"n".to_vec(), value: b"replayed".to_vec() }) }
    }

    /// A client's session row is read from RocksDB on its first write only; later writes find
    /// it in memory as the last batch stored it. A snapshot install replaces the rows in memory
    /// too: a retry the snapshot's row has answered is not applied again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn session_rows_come_from_memory_until_a_snapshot_replaces_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let put = |seq, key: &[u8], value: &[u8]| {
            let session = ringkv_wire::Session { client: 9, seq, acked_below: 1 };
            Command::Session { session, cmd: Box::new(Command::Put { key: key.to_vec(), value: value.to_vec() }) }
        };
        let kind = ReplicaKind::Shard { start: 0, end: u64::MAX };
        let mut sm = StateMachine::new(Db::open(&dir.path().join("a")).expect("db"), 1, kind);
        let misses = |sm: &StateMachine| sm.rows.lock().expect("lock").misses;
        for seq in 1..=3u64 {
            apply(&mut sm, vec![entry(seq, put(seq, b"k", format!("v{seq}").as_bytes()))]).await;
        }
        assert_eq!(misses(&sm), 1, "only the first write looked its row up");
        // A retry answered from the row in memory: not applied again.
        apply(&mut sm, vec![entry(4, put(2, b"k", b"again"))]).await;
        assert_eq!(sm.get(b"k").expect("get"), Some(b"v3".to_vec()));
        // (A retry takes its row out of memory and leaves it stored as it was: read again.)
        apply(&mut sm, vec![entry(5, put(4, b"k", b"v4"))]).await;
        assert_eq!(misses(&sm), 2);

        // Another replica's state, where the same client's writes went up to seq 5.
        let mut other = StateMachine::new(Db::open(&dir.path().join("b")).expect("db"), 1, kind);
        let writes = (1..=5u64).map(|seq| entry(seq, put(seq, format!("o{seq}").as_bytes(), b"theirs"))).collect();
        apply(&mut other, writes).await;
        let snap = other.build_snapshot().await.expect("snapshot");
        sm.install_snapshot(&snap.meta, snap.snapshot).await.expect("install");
        // Seq 5 is answered in the snapshot's row, not in the one `sm` had in memory.
        apply(&mut sm, vec![entry(6, put(5, b"o5", b"again"))]).await;
        assert_eq!(sm.get(b"o5").expect("get"), Some(b"theirs".to_vec()), "a retry applied twice");
        assert_eq!(misses(&sm), 3, "the row was read again after the install");
        for seq in 6..=7u64 {
            apply(&mut sm, vec![entry(seq + 1, put(seq, b"o6", format!("new{seq}").as_bytes()))]).await;
        }
        assert_eq!(sm.get(b"o6").expect("get"), Some(b"new7".to_vec()));
        assert_eq!(misses(&sm), 4);
    }

    /// The rows kept in memory stay within their bounds: clients, answers per row, answers
    /// together; a row that does not fit is simply read from RocksDB next time.
    #[test]
    fn the_row_cache_keeps_within_its_bounds() {
        let row = |answers: u64| SessionRow {
            live: (0..answers).map(|s| (s, Kept::Inline(CommandResult::Done))).collect(),
            ..SessionRow::default()
        };
        let mut c = RowCache::default();
        let batch = |first: u64, n: u64, answers: u64| (first..first + n).map(|client| (client, row(answers))).collect();
        c.stored(batch(0, 10, ROW_CACHE_LIVE_MAX as u64 + 1), &Default::default());
        assert!(c.rows.is_empty(), "rows over the per-row bound are not kept");
        c.stored(batch(0, ROW_CACHE_CLIENTS_MAX as u64 * 2, 1), &Default::default());
        assert_eq!((c.rows.len(), c.answers), (ROW_CACHE_CLIENTS_MAX, ROW_CACHE_CLIENTS_MAX));
        c.clear();
        c.stored(batch(0, 1000, 64), &Default::default());
        assert!(c.answers <= ROW_CACHE_ANSWERS_MAX && c.answers == c.rows.values().map(|r| r.live.len()).sum::<usize>());
        assert_eq!(c.rows.len(), ROW_CACHE_ANSWERS_MAX / 64);
        // A kept client's new row replaces its old one in the count; an expiry removes it.
        let kept = *c.rows.keys().next().expect("a row");
        c.stored([(kept, row(2))].into_iter().collect(), &Default::default());
        assert_eq!(c.answers, ROW_CACHE_ANSWERS_MAX - 62);
        c.stored(Default::default(), &[kept].into_iter().collect());
        assert_eq!((c.answers, c.rows.contains_key(&kept)), (ROW_CACHE_ANSWERS_MAX - 64, false));
        assert!(c.take(kept).is_none());
    }

    /// Groups sharing the node's database, their session writes interleaved: each group's
    /// snapshot carries exactly its own sessions, and an expiry in one group forgets only that
    /// group's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn session_scans_see_exactly_their_own_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("db");
        let kind = ReplicaKind::Shard { start: 0, end: u64::MAX };
        let put = |client, seq| {
            let session = ringkv_wire::Session { client, seq, acked_below: 1 };
            Command::Session { session, cmd: Box::new(Command::Put { key: format!("c{client}").into_bytes(), value: b"v".to_vec() }) }
        };
        let mut groups: Vec<StateMachine> = (1..=3u64).map(|g| StateMachine::new(db.clone(), g, kind)).collect();
        // Group g has clients 10g+1 ..= 10g+g; group 2's clients write late (log index 100).
        for seq in 1..=3u64 {
            for (i, sm) in groups.iter_mut().enumerate() {
                let g = i as u64 + 1;
                let index = if g == 2 { 100 + seq } else { seq };
                let writes = (1..=g).map(|c| entry(index, put(10 * g + c, seq))).collect();
                apply(sm, writes).await;
            }
        }
        for (i, sm) in groups.iter_mut().enumerate() {
            let g = i as u64 + 1;
            let snap = sm.build_snapshot().await.expect("snapshot");
            let SnapshotData::Files(f) = &snap.snapshot else { panic!("a shard snapshot is files") };
            let clients: std::collections::BTreeSet<u64> =
                f.sessions.iter().map(|(k, _)| u64::from_be_bytes(k[..8].try_into().expect("client"))).collect();
            assert_eq!(clients, (1..=g).map(|c| 10 * g + c).collect(), "group {g}");
        }
        // Sessions silent since before index 50: those of groups 1 and 3, not group 2's.
        for sm in groups.iter_mut() {
            apply(sm, vec![entry(200, Command::ExpireSessions { below_index: 50 })]).await;
        }
        let rows = |g: u64| (1..=g).filter(|c| db.get_cf(CF_APPLY_STATE, &session_row_key(g, 10 * g + c)).expect("get").is_some()).count();
        assert_eq!((rows(1), rows(2), rows(3)), (0, 2, 0));
    }

    /// A write retried under the same session applies once, also when both copies land in one
    /// apply batch, after a restart, and on a replica that got the state by snapshot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn session_writes_apply_at_most_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("db");
        let kind = ReplicaKind::Shard { start: 0, end: u64::MAX };
        let mut sm = StateMachine::new(db.clone(), 1, kind);
        apply(&mut sm, vec![entry(1, Command::Put { key: b"n".to_vec(), value: b"0".to_vec() })]).await;
        // The first CAS and its retry in one batch, then another retry in a later batch.
        apply(&mut sm, vec![entry(2, cas(1, 1, b"0", b"1")), entry(3, replay_as_put(1))]).await;
        apply(&mut sm, vec![entry(4, replay_as_put(1))]).await;
        assert_eq!(sm.get(b"n").expect("get"), Some(b"1".to_vec()));
        // A different request that happens to expect the new value does apply.
        apply(&mut sm, vec![entry(5, cas(2, 1, b"1", b"2"))]).await;
        assert_eq!(sm.get(b"n").expect("get"), Some(b"2".to_vec()));
        // Retrying seq 1 again still answers "swapped" and changes nothing.
        // (A swapped CAS keeps no copy of the value it expected.)
        let answer = answer(&db, 9, 1).expect("answer kept");
        assert_eq!(answer, CommandResult::Cas { swapped: true, current: None });
        apply(&mut sm, vec![entry(6, replay_as_put(1))]).await;
        assert_eq!(sm.get(b"n").expect("get"), Some(b"2".to_vec()));

        // A replica filled by snapshot keeps the session answers.
        let snap = sm.build_snapshot().await.expect("snapshot");
        let dir2 = tempfile::tempdir().expect("tempdir");
        let db2 = Db::open(dir2.path()).expect("db");
        let mut sm2 = StateMachine::new(db2.clone(), 1, kind);
        sm2.install_snapshot(&snap.meta, snap.snapshot).await.expect("install");
        assert_eq!(sm2.get(b"n").expect("get"), Some(b"2".to_vec()));
        apply(&mut sm2, vec![entry(7, replay_as_put(2))]).await;
        assert_eq!(sm2.get(b"n").expect("get"), Some(b"2".to_vec()));
        assert_eq!(seqs(&db2, 9), vec![1, 2]);

        // Once the client acknowledges everything below 3, older answers are dropped.
        apply(&mut sm2, vec![entry(8, cas(3, 3, b"2", b"3"))]).await;
        assert_eq!(seqs(&db2, 9), vec![3]);
    }

    /// Group 1 on a new database under `dir/a`, replica of the whole ring, with rows `k1..=kN`
    /// holding `value`; its snapshot files close at `file_bytes`.
    async fn whole_ring_replica_with_rows(dir: &std::path::Path, file_bytes: u64, n: u64, value: &[u8]) -> StateMachine {
        let db = Db::open(&dir.join("a")).expect("db");
        let mut sm = StateMachine::new(db, 1, ReplicaKind::Shard { start: 0, end: u64::MAX });
        sm.file_bytes = file_bytes;
        let puts = (1..=n).map(|i| entry(i, Command::Put { key: format!("k{i}").into_bytes(), value: value.to_vec() })).collect();
        apply(&mut sm, puts).await;
        sm
    }

    /// A shard snapshot is SST files, one per key range, built without holding the shard in
    /// memory; installing replaces the old rows atomically, and an install interrupted after the
    /// old state was cleared finishes when the replica starts again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shard_snapshots_are_sst_files_by_key_range_and_an_interrupted_install_finishes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kind = ReplicaKind::Shard { start: 0, end: u64::MAX };
        let mut sm = whole_ring_replica_with_rows(dir.path(), 4096, 200, &[b'v'; 100]).await;
        let snap = sm.build_snapshot().await.expect("snapshot");
        let SnapshotData::Files(files) = &snap.snapshot else { panic!("a shard snapshot is files") };
        assert!(files.files.len() >= 4, "about 4 KiB per key range: {} files", files.files.len());
        assert_eq!(snap.snapshot.len(), files.files.iter().map(|(p, _)| std::fs::metadata(p).expect("file").len()).sum::<u64>());

        let db2 = Db::open(&dir.path().join("b")).expect("db");
        let mut sm2 = StateMachine::new(db2.clone(), 1, kind);
        apply(&mut sm2, vec![entry(1, Command::Put { key: b"stale".to_vec(), value: b"x".to_vec() })]).await;
        // The first half of an install, then a crash: the marker is written and the old rows
        // are gone, but nothing is ingested and the applied index is the old one.
        let marker = InstallMarker { files: files.files.iter().map(|(p, _)| p.clone()).collect(), meta: snap.meta.clone() };
        let mut b = WriteBatch::default();
        b.put_cf(db2.cf(CF_APPLY_STATE), group_tag_key(1, TAG_INSTALLING), enc(&marker).expect("enc"));
        delete_data_range(&db2, &mut b, 0, u64::MAX).expect("range");
        db2.write_sync(b).expect("write");
        let mut restarted = StateMachine::new(db2.clone(), 1, kind);
        let (applied, _) = restarted.applied_state().await.expect("recovers");
        assert_eq!(applied, snap.meta.last_log_id);
        assert_eq!(restarted.get(b"stale").expect("get"), None);
        for i in [1u64, 100, 200] {
            assert_eq!(restarted.get(format!("k{i}").as_bytes()).expect("get"), Some(vec![b'v'; 100]));
        }
        assert!(db2.get_cf(CF_APPLY_STATE, &group_tag_key(1, TAG_INSTALLING)).expect("get").is_none(), "marker cleared");

        // The same crash with the files under the node's own snapshot root, then a restart
        // that spells the data dir differently: the install still finishes.
        let spelled = dir.path().join("d");
        let db4 = Db::open(&spelled).expect("db");
        let held = db4.snapshot_dir("in").join("transfer-1");
        std::fs::create_dir_all(&held).expect("dir");
        let mut copies = Vec::new();
        for (i, (p, _)) in files.files.iter().enumerate() {
            let to = held.join(format!("{i}.sst"));
            std::fs::copy(p, &to).expect("copy");
            copies.push(to);
        }
        let marker = InstallMarker::new(db4.snapshot_root(), copies, snap.meta.clone());
        assert!(marker.files.iter().all(|f| f.is_relative()), "{:?}", marker.files);
        let mut b = WriteBatch::default();
        b.put_cf(db4.cf(CF_APPLY_STATE), group_tag_key(1, TAG_INSTALLING), enc(&marker).expect("enc"));
        db4.write_sync(b).expect("write");
        db4.shutdown();
        drop(db4);
        std::fs::create_dir_all(dir.path().join("x")).expect("dir");
        let respelled = dir.path().join(".").join("x").join("..").join("d");
        let db4 = Db::open(&respelled).expect("reopen with another spelling");
        let mut restarted = StateMachine::new(db4.clone(), 1, kind);
        let (applied, _) = restarted.applied_state().await.expect("finishes the install");
        assert_eq!(applied, snap.meta.last_log_id);
        assert_eq!(restarted.get(b"k100").expect("get"), Some(vec![b'v'; 100]));

        // A normal install over existing rows leaves exactly the snapshot's rows.
        let db3 = Db::open(&dir.path().join("c")).expect("db");
        let mut sm3 = StateMachine::new(db3.clone(), 1, kind);
        apply(&mut sm3, vec![entry(1, Command::Put { key: b"stale".to_vec(), value: b"x".to_vec() })]).await;
        sm3.install_snapshot(&snap.meta, snap.snapshot.clone()).await.expect("install");
        assert_eq!(sm3.get(b"stale").expect("get"), None);
        assert_eq!(sm3.get(b"k7").expect("get"), Some(vec![b'v'; 100]));
    }

    /// A receiver installs only files whose rows lie in its own shard's range: a snapshot of
    /// another range, or a file that deletes rows, is refused before anything is replaced.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshot_files_outside_the_shard_range_are_refused_and_nothing_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let whole = ReplicaKind::Shard { start: 0, end: u64::MAX };
        let mut sm = whole_ring_replica_with_rows(dir.path(), SNAPSHOT_FILE_BYTES, 100, b"v").await;
        let snap = sm.build_snapshot().await.expect("snapshot");

        // The receiver owns only the upper half of the ring; some of the 100 keys hash below it.
        let half = u64::MAX / 2;
        let upper = ReplicaKind::Shard { start: half, end: u64::MAX };
        let low_key = (1..=100u64).map(|i| format!("k{i}")).find(|k| ringkv_wire::key_hash(k.as_bytes()) < half).expect("a key below half");
        let high_key =
            (1..=100u64).map(|i| format!("k{i}")).find(|k| ringkv_wire::key_hash(k.as_bytes()) >= half).expect("a key above half");
        let db2 = Db::open(&dir.path().join("b")).expect("db");
        let mut sm2 = StateMachine::new(db2.clone(), 7, upper);
        apply(&mut sm2, vec![entry(1, Command::Put { key: high_key.clone().into_bytes(), value: b"mine".to_vec() })]).await;
        let err = sm2.install_snapshot(&snap.meta, snap.snapshot.clone()).await.expect_err("a foreign range is refused");
        assert!(err.to_string().contains("outside the shard's hash range"), "{err}");
        assert_eq!(sm2.get(high_key.as_bytes()).expect("get"), Some(b"mine".to_vec()), "nothing replaced");
        assert_eq!(sm2.get(low_key.as_bytes()).expect("get"), None, "nothing ingested");
        assert!(db2.get_cf(CF_APPLY_STATE, &group_tag_key(7, TAG_INSTALLING)).expect("get").is_none(), "no install marker");
        assert!(
            !db2.snapshot_dir("check").exists() || std::fs::read_dir(db2.snapshot_dir("check")).expect("dir").next().is_none(),
            "scratch removed"
        );

        // The same files for a replica of the whole ring are fine, and the check left them intact.
        let db3 = Db::open(&dir.path().join("c")).expect("db");
        let mut sm3 = StateMachine::new(db3.clone(), 1, whole);
        sm3.install_snapshot(&snap.meta, snap.snapshot.clone()).await.expect("install");
        assert_eq!(sm3.get(low_key.as_bytes()).expect("get"), Some(b"v".to_vec()));

        // A file that deletes rows (here inside the range) is not a snapshot.
        let forged = dir.path().join("forged.sst");
        let opts = rocksdb::Options::default();
        let mut w = rocksdb::SstFileWriter::create(&opts);
        w.open(&forged).expect("open");
        w.delete(data_key(high_key.as_bytes())).expect("delete");
        w.finish().expect("finish");
        let err = check_snapshot_files(&db2, &[forged], half, u64::MAX).expect_err("deletions refused");
        assert!(err.to_string().contains("deletions"), "{err}");
    }

    /// A write of `client` that acknowledges nothing, so its answers stay until the session
    /// expires.
    fn put_keeping(client: u64, seq: u64, key: &[u8]) -> Command {
        let session = ringkv_wire::Session { client, seq, acked_below: 0 };
        Command::Session { session, cmd: Box::new(Command::Put { key: key.to_vec(), value: b"v".to_vec() }) }
    }

    /// Apply checks every key against the replica's own range (routing checked it before, this
    /// is the last line): a write of a key outside the shard changes nothing, a batch with one
    /// such key writes none of it, and a placement command does nothing in a shard group.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn apply_writes_only_keys_of_the_replicas_own_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let half = u64::MAX / 2;
        let db = Db::open(dir.path()).expect("db");
        let mut sm = StateMachine::new(db.clone(), 1, ReplicaKind::Shard { start: 0, end: half });
        let keys = |low: bool| (0u32..).map(|i| format!("k{i}").into_bytes()).filter(move |k| (ringkv_wire::key_hash(k) < half) == low);
        let mut inside = keys(true);
        let mut outside = keys(false);
        let (a, b, c) = (inside.next().expect("key"), inside.next().expect("key"), inside.next().expect("key"));
        let d = inside.next().expect("key");
        let (x, y, z) = (outside.next().expect("key"), outside.next().expect("key"), outside.next().expect("key"));
        // A row outside the range, as a neighbour's leftover would be: deletes and swaps of it
        // through this replica must not touch it.
        let mut w = WriteBatch::default();
        w.put_cf(db.cf(CF_DATA), data_key(&y), b"theirs");
        db.write_sync(w).expect("write");
        let put = |k: &[u8]| Command::Put { key: k.to_vec(), value: b"v".to_vec() };
        apply(
            &mut sm,
            vec![
                entry(1, put(&a)),
                entry(2, put(&x)),
                entry(3, Command::Delete { key: y.clone() }),
                entry(4, Command::Cas { key: z.clone(), expect: None, new: b"v".to_vec() }),
                entry(5, Command::PutMany { pairs: vec![(b.clone(), b"v".to_vec()), (z.clone(), b"v".to_vec())] }),
                entry(6, Command::PutMany { pairs: vec![(c.clone(), b"v".to_vec()), (d.clone(), b"many".to_vec())] }),
                entry(7, Command::Cas { key: b.clone(), expect: None, new: b"swapped".to_vec() }),
                entry(8, put(&c)),
                entry(9, Command::Delete { key: c.clone() }),
                entry(10, Command::Placement(ringkv_placement::PlacementCommand::SetSettings(Default::default()))),
            ],
        )
        .await;
        assert_eq!(sm.get(&a).expect("get"), Some(b"v".to_vec()), "in range: written");
        assert_eq!(sm.get(&x).expect("get"), None, "outside: not written");
        assert_eq!(db.get_cf(CF_DATA, &data_key(&y)).expect("get"), Some(b"theirs".to_vec()), "outside: not deleted");
        assert_eq!(sm.get(&z).expect("get"), None, "outside: not swapped in, nor by a batch");
        assert_eq!(sm.get(&b).expect("get"), Some(b"swapped".to_vec()), "a batch with an outside key wrote nothing");
        assert_eq!(sm.get(&c).expect("get"), None, "in range: batch put, put and delete applied");
        assert_eq!(sm.get(&d).expect("get"), Some(b"many".to_vec()), "in range: a whole batch put applied");
        assert_eq!(sm.placement_map().expect("map"), None, "a shard group holds no placement map");
    }

    /// A placement command (here a valid bootstrap) changes the map of the placement group only;
    /// a shard group refuses it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn placement_commands_apply_in_the_placement_group_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("db");
        let nodes = (1..=3)
            .map(|id| ringkv_wire::NodeInfo {
                id,
                peer_addr: format!("127.0.0.1:{}", 7000 + id),
                client_addr: format!("127.0.0.1:{}", 8000 + id),
                metrics_addr: String::new(),
                state: ringkv_wire::NodeState::Joining,
                incarnation: 0,
            })
            .collect();
        let bootstrap = ringkv_placement::PlacementCommand::Bootstrap { cluster_id: "c".into(), nodes, shards: 4, replication: 3 };
        let run = |sm: &StateMachine| {
            let (mut b, mut map) = (WriteBatch::default(), None);
            let r = exec(sm, 1, Command::Placement(bootstrap.clone()), &mut Overlay::default(), &mut b, &mut map).expect("exec");
            db.write(b).expect("write");
            r
        };
        let shard = StateMachine::new(db.clone(), 2, ReplicaKind::Shard { start: 0, end: u64::MAX });
        assert!(matches!(run(&shard), CommandResult::Refused(_)), "a shard group refuses placement commands");
        assert_eq!(shard.placement_map().expect("map"), None);
        let placement = StateMachine::new(db.clone(), 0, ReplicaKind::Placement);
        assert_eq!(run(&placement), CommandResult::Placement(Ok(())));
        let map = placement.placement_map().expect("map").expect("the placement group stored its map");
        assert_eq!((map.cluster_id.as_str(), map.shards.len()), ("c", 4));
        assert_eq!(shard.placement_map().expect("map"), None, "still none in the shard group");
    }

    /// The session floor's boundaries: `acked_below = n` forgets the answers below `n` and keeps
    /// `n`'s (the client may still retry it), and a write with seq `n` that arrives after the
    /// floor moved to `n` still applies, once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_session_floor_keeps_the_sequence_it_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("db");
        let mut sm = StateMachine::new(db.clone(), 1, ReplicaKind::Shard { start: 0, end: u64::MAX });
        let put = |seq, acked_below, key: &[u8], v: &[u8]| {
            let session = ringkv_wire::Session { client: 9, seq, acked_below };
            Command::Session { session, cmd: Box::new(Command::Put { key: key.to_vec(), value: v.to_vec() }) }
        };
        apply(&mut sm, vec![entry(1, put(4, 0, b"a", b"4")), entry(2, put(5, 0, b"b", b"5"))]).await;
        // Seq 7 acknowledges everything below 5: 4 is forgotten, 5 kept.
        apply(&mut sm, vec![entry(3, put(7, 5, b"c", b"7"))]).await;
        assert_eq!(seqs(&db, 9), vec![5, 7]);
        // A retry of 5 is answered from its kept answer and not applied again.
        apply(&mut sm, vec![entry(4, put(5, 5, b"b", b"retried"))]).await;
        assert_eq!(sm.get(b"b").expect("get"), Some(b"5".to_vec()));
        assert_eq!(answer(&db, 9, 4), None);
        // Seq 8 moves the floor to 6; seq 6 was never applied (sent before 8, ordered after it):
        // it is at the floor, not below, so it applies, once.
        apply(&mut sm, vec![entry(5, put(8, 6, b"e", b"8")), entry(6, put(6, 6, b"d", b"6"))]).await;
        assert_eq!(sm.get(b"d").expect("get"), Some(b"6".to_vec()));
        apply(&mut sm, vec![entry(7, put(6, 6, b"d", b"again"))]).await;
        assert_eq!(sm.get(b"d").expect("get"), Some(b"6".to_vec()), "a retry of 6 is answered, not applied");
        assert_eq!(seqs(&db, 9), vec![7, 8, 6]);
    }

    /// A client that never acknowledges keeps at most `SESSION_ANSWERS_KEPT_MAX` answers in a
    /// group: the oldest are forgotten, a retry of one of those is refused and not applied
    /// again, a retry of a kept one is answered, and the row stops growing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_never_acknowledges_keeps_a_bounded_row() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("db");
        let mut sm = StateMachine::new(db.clone(), 1, ReplicaKind::Shard { start: 0, end: u64::MAX });
        let incr = |seq: u64| {
            let session = ringkv_wire::Session { client: 9, seq, acked_below: 1 };
            let cmd = Command::Apply { key: b"n".to_vec(), op: ringkv_wire::KeyOp::Incr(1), value_bytes_max: 64 };
            Command::Session { session, cmd: Box::new(cmd) }
        };
        let max = SESSION_ANSWERS_KEPT_MAX as u64;
        let writes = max + 40;
        let mut index = 0;
        for chunk in (1..=writes).collect::<Vec<_>>().chunks(500) {
            let entries = chunk.iter().map(|&seq| {
                index += 1;
                entry(index, incr(seq))
            });
            apply(&mut sm, entries.collect()).await;
        }
        let counter = |sm: &StateMachine| sm.get(b"n").expect("get").map(|v| String::from_utf8(v).expect("utf-8"));
        assert_eq!(counter(&sm), Some(writes.to_string()));
        let r = row(&db, 9).expect("row");
        assert_eq!(r.live.len(), SESSION_ANSWERS_KEPT_MAX, "answers kept");
        assert_eq!(r.floor, writes - max + 1);
        let bytes = db.get_cf(CF_APPLY_STATE, &session_row_key(1, 9)).expect("get").expect("row").len();
        assert!(bytes < 8 * SESSION_ANSWERS_KEPT_MAX, "a row of {bytes} bytes");
        // A retry of a forgotten write is refused; a retry of a kept one gets its first answer.
        let mut b = WriteBatch::default();
        let forgotten = exec(&sm, index + 1, incr(5), &mut Overlay::default(), &mut b, &mut None).expect("exec");
        assert!(matches!(forgotten, CommandResult::Expired { seq: 5, .. }), "{forgotten:?}");
        let kept = exec(&sm, index + 1, incr(writes), &mut Overlay::default(), &mut b, &mut None).expect("exec");
        assert_eq!(kept, CommandResult::Int(writes as i64));
        apply(&mut sm, vec![entry(index + 1, incr(5)), entry(index + 2, incr(writes)), entry(index + 3, incr(writes + 1))]).await;
        assert_eq!(counter(&sm), Some((writes + 1).to_string()), "only the new write applied");
        assert_eq!(row(&db, 9).expect("row").live.len(), SESSION_ANSWERS_KEPT_MAX);
    }

    /// Sessions silent since before the cut are forgotten, row and answers, whatever the apply
    /// batches were; newer ones (also one renewed earlier in the same batch) stay.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expired_sessions_are_forgotten_the_same_way_on_every_replica() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The clients acknowledge nothing, so only the expiry can forget their answers.
        let entries = || {
            vec![
                entry(1, put_keeping(1, 1, b"a")),
                entry(2, put_keeping(1, 2, b"a")),
                entry(3, put_keeping(2, 1, b"b")),
                entry(4, put_keeping(3, 1, b"c")),
                entry(5, put_keeping(2, 2, b"b")),
                entry(6, put_keeping(3, 2, b"c")),
                entry(7, Command::ExpireSessions { below_index: 5 }),
                entry(8, put_keeping(1, 3, b"a")),
            ]
        };
        let mut states = Vec::new();
        for (name, batch) in [("one", 8usize), ("many", 1), ("pairs", 2), ("three", 3)] {
            let db = Db::open(&dir.path().join(name)).expect("db");
            let mut sm = StateMachine::new(db.clone(), 1, ReplicaKind::Shard { start: 0, end: u64::MAX });
            let all = entries();
            for chunk in all.chunks(batch) {
                apply(&mut sm, chunk.to_vec()).await;
            }
            // Client 1 (last write at 2 before the cut) was forgotten, then wrote again as new.
            assert_eq!(seqs(&db, 1), vec![3], "{name}");
            assert_eq!(answer(&db, 1, 1), None, "{name}");
            assert_eq!(answer(&db, 1, 2), None, "{name}");
            // Client 2 wrote at 5 and client 3 at 6: both are kept, with all their answers.
            assert_eq!(seqs(&db, 2), vec![1, 2], "{name}");
            assert_eq!(seqs(&db, 3), vec![1, 2], "{name}");
            assert!(answer(&db, 2, 1).is_some(), "{name}");
            states.push(session_state(&db));
        }
        assert!(states.windows(2).all(|w| w[0] == w[1]), "replicas with other apply batches differ");
    }

    /// A swapped compare-and-swap stores no copy of the value; a retry still gets it back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_swapped_cas_answer_keeps_no_value_and_replays_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("db");
        let mut sm = StateMachine::new(db.clone(), 1, ReplicaKind::Shard { start: 0, end: u64::MAX });
        let big = vec![b'x'; 10_000];
        apply(&mut sm, vec![entry(1, Command::Put { key: b"n".to_vec(), value: big.clone() })]).await;
        apply(&mut sm, vec![entry(2, cas(1, 1, &big, b"small"))]).await;
        assert_eq!(answer(&db, 9, 1), Some(CommandResult::Cas { swapped: true, current: None }));
        let items: Vec<Result<EntryResponder<TypeConfig>, io::Error>> = vec![Ok((entry(3, cas(1, 1, &big, b"small")), None))];
        sm.apply(futures::stream::iter(items)).await.expect("apply");
        let mut b = WriteBatch::default();
        let r = exec(&sm, 4, cas(1, 1, &big, b"small"), &mut Overlay::default(), &mut b, &mut None).expect("exec");
        assert_eq!(r, CommandResult::Cas { swapped: true, current: Some(big.clone()) }, "the retry's answer");
        assert_eq!(sm.get(b"n").expect("get"), Some(b"small".to_vec()));
    }

    fn row(db: &Db, client: u64) -> Option<SessionRow> {
        db.get_cf(CF_APPLY_STATE, &session_row_key(1, client)).expect("get").map(|b| dec(&b).expect("decode"))
    }

    /// The answer kept for `seq`: in the row, or apart (and then stored).
    fn answer(db: &Db, client: u64, seq: u64) -> Option<CommandResult> {
        let apart = || db.get_cf(CF_APPLY_STATE, &session_answer_key(1, client, seq)).expect("get").map(|b| dec(&b).expect("decode"));
        match row(db, client).and_then(|r| r.live.into_iter().find(|(s, _)| *s == seq)) {
            Some((_, Kept::Inline(a))) => {
                assert_eq!(apart(), None, "an answer kept in the row is not stored apart too");
                Some(a)
            }
            Some((_, Kept::Apart)) => Some(apart().expect("an answer the row keeps apart is stored")),
            None => {
                assert_eq!(apart(), None, "an answer the row does not list is not stored");
                None
            }
        }
    }

    /// The sequence numbers whose answers `client`'s row keeps.
    fn seqs(db: &Db, client: u64) -> Vec<u64> {
        let row = row(db, client).expect("row");
        let live: Vec<u64> = row.live.iter().map(|(s, _)| *s).collect();
        assert!(live.iter().all(|s| answer(db, client, *s).is_some()), "the row lists exactly the answers kept");
        live
    }

    /// Every session key of group 1 with its value, in key order.
    fn session_state(db: &Db) -> Vec<(Vec<u8>, Vec<u8>)> {
        let prefix = group_tag_key(1, TAG_SESSION);
        db.raw()
            .iterator_cf(db.cf(CF_APPLY_STATE), IteratorMode::From(&prefix, Direction::Forward))
            .map(|kv| kv.expect("kv"))
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect()
    }

    /// How many session keys group 1 has, and the deletes in the apply family's memtable.
    fn session_keys_and_deletes(db: &Db) -> (usize, Option<u64>) {
        let keys = session_state(db).len();
        let deletes = db.raw().property_int_value_cf(db.cf(CF_APPLY_STATE), "rocksdb.num-deletes-active-mem-table").expect("property");
        (keys, deletes)
    }

    /// A write under a session costs one session key, its row, which keeps the answer: nothing
    /// is deleted when acknowledged answers are forgotten. An answer too large for the row is
    /// kept apart, and forgetting it deletes exactly its key (a point delete: a range deletion
    /// per write made every later read of the column family re-sort all the range tombstones
    /// in the memtable, which cost 9x write throughput once).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forgetting_session_answers_deletes_exactly_their_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("db");
        let mut sm = StateMachine::new(db.clone(), 1, ReplicaKind::Shard { start: 0, end: u64::MAX });
        for seq in 1..=200u64 {
            let session = ringkv_wire::Session { client: 7, seq, acked_below: seq };
            let put = Command::Put { key: format!("k{seq}").into_bytes(), value: b"v".to_vec() };
            apply(&mut sm, vec![entry(seq, Command::Session { session, cmd: Box::new(put) })]).await;
        }
        assert_eq!(seqs(&db, 7), vec![200]);
        assert_eq!(session_keys_and_deletes(&db), (1, Some(0)), "the row is all that is left of the session");
        // Compare-and-swaps that do not swap answer with the 1 KiB value they found: too large
        // for the row, so each is kept apart until acknowledged.
        let big = vec![b'x'; 1024];
        apply(&mut sm, vec![entry(201, Command::Put { key: b"n".to_vec(), value: big.clone() })]).await;
        for seq in 201..=210u64 {
            apply(&mut sm, vec![entry(seq + 1, cas(seq, 201, b"other", b"new"))]).await;
        }
        assert_eq!(answer(&db, 9, 205), Some(CommandResult::Cas { swapped: false, current: Some(big.clone()) }));
        assert!(row(&db, 9).expect("row").live.iter().all(|(_, k)| *k == Kept::Apart));
        assert_eq!(session_keys_and_deletes(&db), (1 + 1 + 10, Some(0)));
        apply(&mut sm, vec![entry(212, cas(211, 210, b"other", b"new"))]).await;
        assert_eq!(seqs(&db, 9), vec![210, 211]);
        assert_eq!(session_keys_and_deletes(&db), (1 + 1 + 2, Some(9)), "one point delete per forgotten answer kept apart");
    }

    /// Answers kept apart and rows of the earlier format, across any split into apply batches:
    /// a retry right after its write (the answer still only in the batch) or later is answered,
    /// not applied; an earlier-format row is replaced by its client's write and answers from its
    /// answer keys; an expiry forgets what it must. Every split ends in the same stored state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_kept_apart_and_earlier_rows_apply_the_same_in_any_batches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = vec![b'x'; 1024];
        let put = |client, seq, acked_below, key: &[u8]| {
            let session = ringkv_wire::Session { client, seq, acked_below };
            Command::Session { session, cmd: Box::new(Command::Put { key: key.to_vec(), value: b"put".to_vec() }) }
        };
        let entries = || {
            vec![
                entry(1, Command::Put { key: b"n".to_vec(), value: big.clone() }),
                // Does not swap: the answer carries the 1 KiB value, so it is kept apart.
                entry(2, cas(1, 1, b"other", b"new")),
                entry(3, replay_as_put(1)),
                entry(4, put(10, 6, 1, b"m")),
                entry(5, put(10, 5, 1, b"m5")),
                entry(6, replay_as_put(1)),
                entry(7, Command::ExpireSessions { below_index: 3 }),
            ]
        };
        let mut states = Vec::new();
        for (name, batch) in [("one", 7usize), ("many", 1), ("pairs", 2), ("three", 3)] {
            let db = Db::open(&dir.path().join(name)).expect("db");
            let mut b = WriteBatch::default();
            b.put_cf(db.cf(CF_APPLY_STATE), session_key(1, 10), enc(&LegacyRow { floor: 1, live: vec![5], last_index: 0 }).expect("enc"));
            b.put_cf(db.cf(CF_APPLY_STATE), session_answer_key(1, 10, 5), enc(&CommandResult::Done).expect("enc"));
            db.write_sync(b).expect("write");
            let mut sm = StateMachine::new(db.clone(), 1, ReplicaKind::Shard { start: 0, end: u64::MAX });
            for chunk in entries().chunks(batch) {
                apply(&mut sm, chunk.to_vec()).await;
            }
            assert_eq!(sm.get(b"n").expect("get"), Some(big.clone()), "{name}: a retry of the CAS was applied");
            assert_eq!(sm.get(b"m5").expect("get"), None, "{name}: a retry from the earlier row was applied");
            assert_eq!(sm.get(b"m").expect("get"), Some(b"put".to_vec()), "{name}");
            // Client 9 last wrote at 2, before the cut at 3: forgotten with its answer kept apart.
            assert_eq!(row(&db, 9), None, "{name}");
            assert_eq!(db.get_cf(CF_APPLY_STATE, &session_answer_key(1, 9, 1)).expect("get"), None, "{name}");
            // Client 10 wrote at 4: its row of this format keeps 5 (apart) and 6.
            assert_eq!(seqs(&db, 10), vec![5, 6], "{name}");
            assert_eq!(db.get_cf(CF_APPLY_STATE, &session_key(1, 10)).expect("get"), None, "{name}");
            states.push(session_state(&db));
        }
        assert!(states.windows(2).all(|w| w[0] == w[1]), "replicas with other apply batches differ");
    }

    /// A row of the earlier format (every answer under its own key) still answers retries; the
    /// client's next write replaces it with a row of this format, and an expiry forgets either.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_of_the_earlier_format_still_deduplicate_and_are_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("db");
        let mut sm = StateMachine::new(db.clone(), 1, ReplicaKind::Shard { start: 0, end: u64::MAX });
        apply(&mut sm, vec![entry(1, Command::Put { key: b"n".to_vec(), value: b"1".to_vec() })]).await;
        let mut b = WriteBatch::default();
        for client in [9, 10] {
            let legacy = LegacyRow { floor: 1, live: vec![5], last_index: 1 };
            b.put_cf(db.cf(CF_APPLY_STATE), session_key(1, client), enc(&legacy).expect("enc"));
            b.put_cf(db.cf(CF_APPLY_STATE), session_answer_key(1, client, 5), enc(&CommandResult::Done).expect("enc"));
        }
        db.write_sync(b).expect("write");
        apply(&mut sm, vec![entry(2, replay_as_put(5))]).await;
        assert_eq!(sm.get(b"n").expect("get"), Some(b"1".to_vec()), "the retry was answered, not applied");
        apply(&mut sm, vec![entry(3, cas(6, 1, b"1", b"2"))]).await;
        assert_eq!(seqs(&db, 9), vec![5, 6]);
        assert_eq!(db.get_cf(CF_APPLY_STATE, &session_key(1, 9)).expect("get"), None, "the earlier row is replaced");
        assert!(db.get_cf(CF_APPLY_STATE, &session_key(1, 10)).expect("get").is_some(), "client 10 wrote nothing");
        // Client 9 wrote at 3, client 10 last at 1: the cut at 2 forgets client 10, both formats.
        apply(&mut sm, vec![entry(4, Command::ExpireSessions { below_index: 2 })]).await;
        assert_eq!(session_keys_and_deletes(&db).0, 2, "client 9's row and its answer kept apart");
        assert_eq!(seqs(&db, 9), vec![5, 6]);
        assert_eq!(db.get_cf(CF_APPLY_STATE, &session_key(1, 10)).expect("get"), None);
        assert_eq!(db.get_cf(CF_APPLY_STATE, &session_answer_key(1, 10, 5)).expect("get"), None);
    }

    /// A copy of a write that arrives after the client moved past it (its answer already
    /// forgotten) is not applied: it could overwrite a newer value.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_late_copy_of_an_abandoned_write_is_not_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("db");
        let mut sm = StateMachine::new(db.clone(), 1, ReplicaKind::Shard { start: 0, end: u64::MAX });
        let put = |seq, acked_below, v: &str| {
            let session = ringkv_wire::Session { client: 4, seq, acked_below };
            Command::Session { session, cmd: Box::new(Command::Put { key: b"k".to_vec(), value: v.as_bytes().to_vec() }) }
        };
        apply(&mut sm, vec![entry(1, put(10, 10, "old"))]).await;
        apply(&mut sm, vec![entry(2, put(12, 12, "new"))]).await;
        // Seq 10 again: its answer is gone (acked_below moved to 12), so it must not apply.
        apply(&mut sm, vec![entry(3, put(10, 10, "old"))]).await;
        assert_eq!(sm.get(b"k").expect("get"), Some(b"new".to_vec()));
        assert_eq!(seqs(&db, 4), vec![12]);
    }

    /// A data dir written before session rows existed holds bare answers; they still answer
    /// retries, and the first new write of that client adopts them into its row.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_without_a_row_still_deduplicate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("db");
        let mut sm = StateMachine::new(db.clone(), 1, ReplicaKind::Shard { start: 0, end: u64::MAX });
        apply(&mut sm, vec![entry(1, Command::Put { key: b"n".to_vec(), value: b"1".to_vec() })]).await;
        let mut b = WriteBatch::default();
        b.put_cf(db.cf(CF_APPLY_STATE), session_answer_key(1, 9, 5), enc(&CommandResult::Done).expect("enc"));
        db.write_sync(b).expect("write");
        apply(&mut sm, vec![entry(2, replay_as_put(5))]).await;
        assert_eq!(sm.get(b"n").expect("get"), Some(b"1".to_vec()), "the retry was answered, not applied");
        apply(&mut sm, vec![entry(3, cas(6, 1, b"1", b"2"))]).await;
        assert_eq!(seqs(&db, 9), vec![5, 6]);
    }
}
