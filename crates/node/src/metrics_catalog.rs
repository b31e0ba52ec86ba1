//! Every metric a node exports, with its help text (Prometheus `# HELP`). A metric recorded
//! anywhere in ringkv must be listed here: a test reads the sources and fails otherwise.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// `(name, kind, help)` of every `ringkv_*` metric.
pub const METRICS: &[(&str, &str, &str)] = &[
    ("ringkv_build_info", "gauge", "Always 1; the version of this ringkv binary is its label."),
    (
        "ringkv_client_requests_total",
        "counter",
        "Client requests answered, by kind and result (ok, not_leader, misrouted, bad_request, ...).",
    ),
    ("ringkv_client_request_seconds", "histogram", "Time from receiving a client request to answering it, by kind."),
    (
        "ringkv_gateway_connections_refused_total",
        "counter",
        "Gateway connections closed at once because the gateways were at their connection limit, by gateway.",
    ),
    ("ringkv_gateway_handshake_failures_total", "counter", "Gateway TLS handshakes that failed or timed out, by gateway."),
    ("ringkv_http_requests_total", "counter", "HTTP gateway requests answered, by status code."),
    ("ringkv_resp_commands_total", "counter", "Redis gateway commands answered, by command (other: unknown) and result (ok, error)."),
    ("ringkv_leaderships_yielded_total", "counter", "Shard leaderships handed away for want of contact with the placement leader."),
    (
        "ringkv_peer_identity_mismatches_total",
        "counter",
        "Peer messages claiming another node than their connection's certificate (refused).",
    ),
    ("ringkv_placement_heartbeat_failures_total", "counter", "Heartbeats to the placement leader that failed."),
    (
        "ringkv_placement_is_leader",
        "gauge",
        "1 on the placement leader, 0 on other placement members: the ringkv_placement_* gauges count only where it is 1.",
    ),
    ("ringkv_placement_shards", "gauge", "Shards in the cluster map (on the placement leader)."),
    ("ringkv_placement_shards_without_leader", "gauge", "Shards no node reported leading in its last heartbeat (on the placement leader)."),
    ("ringkv_placement_moves_running", "gauge", "Replica moves in flight (on the placement leader)."),
    ("ringkv_placement_leader_transfers_total", "counter", "Shard leader transfers ordered by the placement leader."),
    ("ringkv_placement_member_replacements_total", "counter", "Placement group members replaced."),
    ("ringkv_placement_moves_abandoned_total", "counter", "Replica moves the placement leader gave up."),
    ("ringkv_placement_moves_finished_total", "counter", "Replica moves finished."),
    ("ringkv_placement_moves_started_total", "counter", "Replica moves started."),
    ("ringkv_raft_applied_entries_total", "counter", "Raft log entries applied to the state machines of this node."),
    ("ringkv_raft_apply_batches_total", "counter", "Batches of entries applied (one state machine write each)."),
    ("ringkv_raft_batches_sent_total", "counter", "Frames carrying Raft messages of several groups to one peer."),
    ("ringkv_raft_batched_messages_total", "counter", "Raft messages sent in such frames."),
    ("ringkv_raft_batches_received_total", "counter", "Frames of batched Raft messages this node served."),
    ("ringkv_raft_appends_received_total", "counter", "Raft appends carrying entries this node received as a follower."),
    ("ringkv_raft_commits_carried_total", "counter", "Appends carrying only a commit index that rode in the group's next append instead."),
    ("ringkv_raft_commits_total", "counter", "Client writes committed by groups this node leads."),
    ("ringkv_raft_duplicate_writes_total", "counter", "Retried writes answered from their session instead of applied again."),
    (
        "ringkv_raft_empty_appends_received_total",
        "counter",
        "Raft appends without entries (heartbeats, commit index only) this node received.",
    ),
    ("ringkv_raft_expired_writes_total", "counter", "Writes refused because their client session had moved past them."),
    (
        "ringkv_raft_session_answers_evicted_total",
        "counter",
        "Writes that found their client's session row full of unacknowledged answers and forgot the oldest.",
    ),
    (
        "ringkv_raft_followers_resting",
        "gauge",
        "Followers on this node resting (their election timer stopped while their leader is heard).",
    ),
    ("ringkv_raft_group_failures_total", "counter", "Groups whose Raft stopped on a storage error; the node then stops."),
    ("ringkv_raft_group_liveness_wakes_total", "counter", "Quiet groups woken because their leader's node went silent."),
    ("ringkv_raft_group_quiesces_total", "counter", "Times a group went quiet (stopped ticking while idle)."),
    ("ringkv_raft_group_wakes_total", "counter", "Times a quiet group woke up."),
    ("ringkv_raft_leader_transfer_resends_total", "counter", "Leader transfer requests sent again because the transfer had not completed."),
    ("ringkv_raft_groups_quiet", "gauge", "Replicas on this node whose group is quiet."),
    ("ringkv_raft_leaders", "gauge", "Groups this node leads."),
    (
        "ringkv_raft_leaders_resting",
        "gauge",
        "Leaders on this node resting (their timer stopped while every follower acknowledges appends).",
    ),
    ("ringkv_raft_lease_read_fallbacks_total", "counter", "Linearizable reads that fell back from the leader lease to a ReadIndex round."),
    ("ringkv_raft_lease_reads_local_total", "counter", "Linearizable reads served by the leader lease checked on the request's own task, without a round trip through the group's Raft task."),
    ("ringkv_raft_log_appended_entries_total", "counter", "Raft log entries appended on this node."),
    ("ringkv_raft_log_appends_total", "counter", "Log appends (one RocksDB write each) on this node."),
    ("ringkv_raft_log_cache_misses_total", "counter", "Raft log reads the in-memory log cache could not serve (read from RocksDB)."),
    ("ringkv_raft_log_reads_total", "counter", "Raft log reads (replication and apply)."),
    ("ringkv_raft_pre_votes_refused_total", "counter", "Pre-votes a quiet follower refused because its leader's node is alive."),
    ("ringkv_raft_proposals_total", "counter", "Client writes proposed by groups this node leads."),
    ("ringkv_raft_replicas", "gauge", "Replicas hosted on this node."),
    ("ringkv_raft_sessions_expired_total", "counter", "Client sessions expired through the log."),
    ("ringkv_raft_snapshot_received_bytes_total", "counter", "Snapshot bytes received."),
    ("ringkv_raft_snapshot_sent_bytes_total", "counter", "Snapshot bytes sent."),
    ("ringkv_raft_snapshot_slot_waits_total", "counter", "Snapshot transfers that waited for a free transfer slot."),
    ("ringkv_raft_snapshot_throttled_seconds_total", "counter", "Time snapshot transfers waited on the byte-rate limit."),
    ("ringkv_raft_snapshots_built_total", "counter", "Snapshots built."),
    ("ringkv_raft_snapshots_installed_total", "counter", "Snapshots installed."),
    ("ringkv_replicas_quarantined", "gauge", "Replicas this node could not start (left on disk, rebuilt elsewhere)."),
    ("ringkv_replicas_removed_total", "counter", "Replicas removed from this node after they moved away."),
    ("ringkv_rocksdb_block_cache_bytes", "gauge", "Bytes in RocksDB's block caches, over every column family."),
    ("ringkv_rocksdb_memtable_bytes", "gauge", "Bytes of RocksDB memtables (active, immutable and pinned), over every column family."),
    ("ringkv_rocksdb_table_readers_bytes", "gauge", "Bytes of index and filter blocks of RocksDB's open tables, over every column family."),
    ("ringkv_storage_disk_full", "gauge", "1 while free space is below storage.reserve_bytes and client writes are refused."),
    ("ringkv_storage_free_bytes", "gauge", "Free bytes on the data directory's filesystem."),
    ("ringkv_storage_group_commit_writes", "histogram", "Writes made durable by one WAL sync (group commit size)."),
    ("ringkv_storage_sync_seconds", "histogram", "Time one WAL sync (fsync) takes."),
    ("ringkv_storage_syncs_total", "counter", "WAL syncs."),
    ("ringkv_storage_writes_total", "counter", "RocksDB write batches."),
    ("ringkv_transport_connections_refused_total", "counter", "Client connections refused over the connection limit."),
    ("ringkv_transport_connects_total", "counter", "Peer connections dialed."),
    ("ringkv_transport_handshake_failures_total", "counter", "Connections whose TLS handshake or certificate was refused."),
    ("ringkv_transport_malformed_frames_total", "counter", "Frames that could not be decoded."),
    ("ringkv_transport_oversize_frames_total", "counter", "Frames over the size limit (answered TooLarge)."),
    ("ringkv_transport_peer_connections", "gauge", "Live connections to peer nodes (one per peer)."),
    (
        "ringkv_transport_peer_endpoint_connections",
        "gauge",
        "QUIC connections open on the peer endpoint, duplicates and handshakes included.",
    ),
    ("ringkv_transport_received_bytes_total", "counter", "Bytes of frames received."),
    ("ringkv_transport_sent_bytes_total", "counter", "Bytes of frames sent."),
    ("ringkv_transport_write_batches_total", "counter", "Writes handed to QUIC (each may carry many frames)."),
];

/// Buckets of histograms that count things (not seconds).
pub const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// Histograms of counts: they get [`COUNT_BUCKETS`].
pub const COUNT_HISTOGRAMS: &[&str] = &["ringkv_storage_group_commit_writes"];

/// Registers every help text, and `ringkv_build_info`.
pub fn describe() {
    for (name, kind, help) in METRICS {
        let unit = if name.ends_with("_seconds") || name.ends_with("_seconds_total") {
            Some(Unit::Seconds)
        } else if name.ends_with("_bytes") || name.ends_with("_bytes_total") {
            Some(Unit::Bytes)
        } else {
            None
        };
        match (*kind, unit) {
            ("counter", Some(u)) => describe_counter!(*name, u, *help),
            ("counter", None) => describe_counter!(*name, *help),
            ("gauge", Some(u)) => describe_gauge!(*name, u, *help),
            ("gauge", None) => describe_gauge!(*name, *help),
            (_, Some(u)) => describe_histogram!(*name, u, *help),
            (_, None) => describe_histogram!(*name, *help),
        }
    }
    metrics::gauge!("ringkv_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Counters and gauges exist from the start at 0 (a rate over a missing series is no rate
    // at all); the loops that set the gauges do so within a second.
    for (name, kind, _) in METRICS {
        match *kind {
            "counter" if *name != "ringkv_client_requests_total" => metrics::counter!(*name).increment(0),
            "gauge" if *name != "ringkv_build_info" => metrics::gauge!(*name).increment(0.0),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric recorded in the sources is described here (so it gets a HELP text), with
    /// the kind it is recorded as; nothing is described that no code records.
    #[test]
    fn every_recorded_metric_is_described_with_its_kind() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut recorded = std::collections::BTreeSet::new();
        let mut stack = vec![root.join("crates"), root.join("placement")];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).expect("read sources").flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") && p.file_name().is_some_and(|n| n != "metrics_catalog.rs") {
                    let text = std::fs::read_to_string(&p).expect("read");
                    for kind in ["counter", "gauge", "histogram"] {
                        let needle = format!("metrics::{kind}!(\"");
                        for (i, _) in text.match_indices(&needle) {
                            let rest = &text[i + needle.len()..];
                            let name = &rest[..rest.find('"').expect("closing quote")];
                            recorded.insert((name.to_string(), kind.to_string()));
                        }
                    }
                }
            }
        }
        assert!(recorded.len() > 40, "found only {} metrics: is the source walk broken?", recorded.len());
        let described: std::collections::BTreeSet<(String, String)> =
            METRICS.iter().filter(|(n, ..)| *n != "ringkv_build_info").map(|(n, k, _)| (n.to_string(), k.to_string())).collect();
        let missing: Vec<_> = recorded.difference(&described).collect();
        let stale: Vec<_> = described.difference(&recorded).collect();
        assert!(missing.is_empty(), "recorded but not described: {missing:?}");
        assert!(stale.is_empty(), "described but recorded nowhere: {stale:?}");
        for h in COUNT_HISTOGRAMS {
            assert!(METRICS.iter().any(|(n, k, _)| n == h && *k == "histogram"), "{h}");
        }
    }
}
