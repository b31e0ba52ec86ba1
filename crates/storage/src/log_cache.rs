//! The tail of one group's Raft log, kept in memory so replication and apply read what was just
//! appended without going back to RocksDB.
//!
//! The cache always holds a contiguous suffix of the log: every append goes into it, a
//! truncation cuts it at the same index as the log, and it only loses entries from the front
//! (purged, over its bounds, or no longer needed). A read it cannot serve whole goes to RocksDB.
//!
//! An entry is no longer needed once it is applied here and, on a leader, every follower's
//! replication stream has it acknowledged ([`FollowerHold`]): a leader commits on the fastest
//! followers and applies before the slowest one was even sent the entries, which would
//! otherwise read them back. A follower that lags more than [`LAGGING_ENTRIES`] behind the
//! applied index (down, or catching up) holds no more than that.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::types::Entry;

/// Most entries a group keeps in memory.
pub const LOG_CACHE_ENTRIES_MAX: usize = 1024;
/// Most bytes (encoded) of entries a group keeps in memory.
pub const LOG_CACHE_BYTES_MAX: usize = 1 << 20;
/// Most applied entries kept for a follower that has not acknowledged them: one further behind
/// reads from RocksDB, so a dead follower pins at most this many entries per group.
pub const LAGGING_ENTRIES: u64 = 256;

#[derive(Default)]
struct Tail {
    /// Entries with their encoded size, in index order without gaps.
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
    /// The last index applied (0: none).
    applied: u64,
    /// The followers' replication streams: (hold id, last index acknowledged, 0 if none yet).
    holds: Vec<(u64, u64)>,
    next_hold: u64,
}

impl Tail {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn pop_front(&mut self) {
        if let Some((_, n)) = self.entries.pop_front() {
            self.bytes -= n;
        }
    }

    fn pop_back(&mut self) {
        if let Some((_, n)) = self.entries.pop_back() {
            self.bytes -= n;
        }
    }

    fn forget_through(&mut self, index: u64) {
        while self.first_index().is_some_and(|first| first <= index) {
            self.pop_front();
        }
    }

    /// Drops what is applied and acknowledged by every follower (or lagging ones aside).
    fn forget_unneeded(&mut self) {
        let slowest = self.holds.iter().map(|(_, m)| *m).min().unwrap_or(u64::MAX);
        self.forget_through(self.applied.min(slowest.max(self.applied.saturating_sub(LAGGING_ENTRIES))));
    }
}

/// One group's cached log tail, shared by its log store, readers and state machine.
#[derive(Clone, Default)]
pub struct LogCache {
    tail: Arc<Mutex<Tail>>,
}

impl LogCache {
    fn lock(&self) -> MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes in entries just appended to the log (with their encoded sizes). Entries at or
    /// after the first one's index are replaced; a gap before it starts the cache afresh.
    pub fn append(&self, entries: impl IntoIterator<Item = (Entry, usize)>) {
        let mut t = self.lock();
        for (e, n) in entries {
            let index = e.log_id.index;
            while t.entries.back().is_some_and(|(last, _)| last.log_id.index >= index) {
                t.pop_back();
            }
            if t.entries.back().is_some_and(|(last, _)| last.log_id.index + 1 != index) {
                *t = Tail::default();
            }
            t.bytes += n;
            t.entries.push_back((e, n));
        }
        while t.entries.len() > LOG_CACHE_ENTRIES_MAX || (t.bytes > LOG_CACHE_BYTES_MAX && t.entries.len() > 1) {
            t.pop_front();
        }
    }

    /// The log lost every entry after `index` (`None`: all of them).
    pub fn truncate_after(&self, index: Option<u64>) {
        let mut t = self.lock();
        while t.entries.back().is_some_and(|(last, _)| Some(last.log_id.index) > index) {
            t.pop_back();
        }
    }

    /// Drops entries up to and including `index` (purged from the log).
    pub fn forget_through(&self, index: u64) {
        self.lock().forget_through(index);
    }

    /// The state machine applied the log through `index`: what no follower still needs goes.
    pub fn applied_through(&self, index: u64) {
        let mut t = self.lock();
        t.applied = t.applied.max(index);
        t.forget_unneeded();
    }

    /// Keeps entries for a follower's replication stream until it reports them acknowledged
    /// ([`FollowerHold::acknowledged`]), until the hold is dropped.
    pub fn hold_for_follower(&self) -> FollowerHold {
        let mut t = self.lock();
        let id = t.next_hold;
        t.next_hold += 1;
        t.holds.push((id, 0));
        FollowerHold { cache: self.clone(), id }
    }

    /// The entries `[start, end)` (`end` `None`: to the end of the log), if the cache holds
    /// all of them. As the cache is the log's tail, a range past its end is served as far as
    /// the log goes.
    pub fn get(&self, start: u64, end: Option<u64>) -> Option<Vec<Entry>> {
        self.get_within(start, end, usize::MAX)
    }

    /// As [`LogCache::get`], but only the first entries of the range whose encoded sizes add
    /// up to at most `bytes_max` (always at least one).
    pub fn get_within(&self, start: u64, end: Option<u64>, bytes_max: usize) -> Option<Vec<Entry>> {
        let t = self.lock();
        let first = t.first_index()?;
        if start < first {
            return None;
        }
        let skip = usize::try_from(start - first).ok()?;
        let take = match end {
            Some(end) => usize::try_from(end.saturating_sub(start)).ok()?,
            None => usize::MAX,
        };
        let mut bytes = 0usize;
        let within = |(i, (_, n)): &(usize, &(Entry, usize))| {
            bytes = bytes.saturating_add(*n);
            *i == 0 || bytes <= bytes_max
        };
        Some(t.entries.iter().skip(skip).take(take).enumerate().take_while(within).map(|(_, (e, _))| e.clone()).collect())
    }

    /// Entries and encoded bytes held.
    pub fn size(&self) -> (usize, usize) {
        let t = self.lock();
        (t.entries.len(), t.bytes)
    }
}

/// A follower's claim on the entries its replication stream has not had acknowledged yet.
pub struct FollowerHold {
    cache: LogCache,
    id: u64,
}

impl FollowerHold {
    /// The follower's log matches the leader's through `index`.
    pub fn acknowledged(&self, index: u64) {
        let mut t = self.cache.lock();
        let id = self.id;
        if let Some(h) = t.holds.iter_mut().find(|(h, _)| *h == id) {
            h.1 = h.1.max(index);
        }
        t.forget_unneeded();
    }
}

impl Drop for FollowerHold {
    fn drop(&mut self) {
        let mut t = self.cache.lock();
        let id = self.id;
        t.holds.retain(|(h, _)| *h != id);
        t.forget_unneeded();
    }
}

#[cfg(test)]
mod tests {
    use openraft::entry::RaftEntry;
    use openraft::EntryPayload;

    use super::*;

    fn entry(term: u64, index: u64) -> (Entry, usize) {
        let leader = openraft::impls::leader_id_adv::LeaderId { term, node_id: 1 };
        (Entry::new(openraft::LogId::new(leader, index), EntryPayload::Blank), 100)
    }

    fn indexes(v: Option<Vec<Entry>>) -> Option<Vec<(u64, u64)>> {
        v.map(|v| v.iter().map(|e| (e.log_id.leader_id.term, e.log_id.index)).collect())
    }

    #[test]
    fn serves_only_ranges_it_holds_whole_and_follows_truncation_and_purge() {
        let c = LogCache::default();
        assert_eq!(indexes(c.get(1, None)), None, "empty: nothing served");
        c.append((5..=9).map(|i| entry(1, i)));
        assert_eq!(indexes(c.get(4, Some(6))), None, "starts before the cache");
        assert_eq!(indexes(c.get(5, Some(7))), Some(vec![(1, 5), (1, 6)]));
        assert_eq!(indexes(c.get(8, None)), Some(vec![(1, 8), (1, 9)]));
        assert_eq!(indexes(c.get(9, Some(20))), Some(vec![(1, 9)]), "past the end: as far as the log goes");
        assert_eq!(indexes(c.get(10, Some(12))), Some(vec![]));
        // A new leader overwrites from 8 on: after truncation, and also without it.
        c.truncate_after(Some(7));
        c.append([entry(2, 8)]);
        c.append([entry(3, 8), entry(3, 9)]);
        assert_eq!(indexes(c.get(6, None)), Some(vec![(1, 6), (1, 7), (3, 8), (3, 9)]));
        c.forget_through(6);
        assert_eq!(indexes(c.get(6, None)), None);
        assert_eq!(indexes(c.get(7, None)), Some(vec![(1, 7), (3, 8), (3, 9)]));
        // A gap (e.g. after a snapshot) starts the cache afresh.
        c.append([entry(3, 20)]);
        assert_eq!(indexes(c.get(9, None)), None);
        assert_eq!(indexes(c.get(20, None)), Some(vec![(3, 20)]));
        c.truncate_after(None);
        assert_eq!(c.size(), (0, 0));
    }

    /// Applied entries stay while a follower's stream has not had them acknowledged, and go
    /// once it has, once it lags too far, or once the stream ends; without followers, at apply.
    #[test]
    fn applied_entries_stay_until_every_follower_acknowledged_them() {
        let c = LogCache::default();
        c.append((1..=10).map(|i| entry(1, i)));
        c.applied_through(3);
        assert_eq!(indexes(c.get(4, Some(5))), Some(vec![(1, 4)]));
        assert_eq!(indexes(c.get(3, Some(4))), None, "no follower: applied entries go");
        let (fast, slow) = (c.hold_for_follower(), c.hold_for_follower());
        fast.acknowledged(10);
        slow.acknowledged(5);
        c.applied_through(10);
        assert_eq!(indexes(c.get(6, Some(7))), Some(vec![(1, 6)]), "the slow follower still needs 6");
        assert_eq!(indexes(c.get(5, Some(6))), None);
        slow.acknowledged(8);
        assert_eq!(indexes(c.get(8, Some(9))), None);
        assert_eq!(indexes(c.get(9, None)).map(|v| v.len()), Some(2));
        drop(slow);
        assert_eq!(c.size().0, 0, "the slow follower's stream ended: all applied, all gone");
        // A follower far behind pins no more than LAGGING_ENTRIES applied entries.
        let down = c.hold_for_follower();
        c.append((11..=1000).map(|i| entry(1, i)));
        c.applied_through(1000);
        assert_eq!(c.size().0, LAGGING_ENTRIES as usize);
        assert_eq!(indexes(c.get(1000 - LAGGING_ENTRIES + 1, Some(1000 - LAGGING_ENTRIES + 2))).map(|v| v.len()), Some(1));
        drop((down, fast));
        assert_eq!(c.size().0, 0);
    }

    #[test]
    fn stays_within_its_bounds_keeping_the_newest() {
        let c = LogCache::default();
        c.append((1..=(LOG_CACHE_ENTRIES_MAX as u64 + 10)).map(|i| entry(1, i)));
        assert_eq!(c.size().0, LOG_CACHE_ENTRIES_MAX);
        assert_eq!(indexes(c.get(11, Some(12))), Some(vec![(1, 11)]));
        assert_eq!(indexes(c.get(10, Some(12))), None);
        let big = |i| (entry(1, i).0, LOG_CACHE_BYTES_MAX / 2 + 1);
        c.append([big(LOG_CACHE_ENTRIES_MAX as u64 + 11), big(LOG_CACHE_ENTRIES_MAX as u64 + 12)]);
        assert_eq!(c.size(), (1, LOG_CACHE_BYTES_MAX / 2 + 1), "bytes bound: only the newest stays");
    }

    #[test]
    fn reads_within_a_byte_budget_take_a_prefix_and_never_nothing() {
        let c = LogCache::default();
        c.append((1..=10).map(|i| entry(1, i)));
        assert_eq!(indexes(c.get_within(2, None, 350)).map(|v| v.len()), Some(3), "100 bytes each");
        assert_eq!(indexes(c.get_within(2, Some(4), 10_000)), Some(vec![(1, 2), (1, 3)]), "the range bounds it too");
        assert_eq!(indexes(c.get_within(2, None, 1)), Some(vec![(1, 2)]), "one entry over the budget still goes");
    }
}
