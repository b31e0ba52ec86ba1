//! The typed errors a node returns to a request. Routing errors carry the hint to recover.

use serde::{Deserialize, Serialize};

use crate::{GroupId, NodeId, ShardDesc};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum RequestError {
    /// This replica is not the shard's leader; retry at `leader` (if known) at `leader_addr`.
    #[error("shard {shard}: not leader (leader: {leader:?})")]
    NotLeader { shard: GroupId, leader: Option<NodeId>, leader_addr: Option<String> },
    /// The request routed with an old epoch; `descriptor` is the fresh one.
    #[error("shard {}: stale epoch, current is {:?}", descriptor.id, descriptor.epoch)]
    StaleEpoch { descriptor: ShardDesc },
    /// The key does not hash into the shard the request named.
    #[error("key does not belong to shard {shard}")]
    WrongShard { shard: GroupId, descriptor: Option<ShardDesc> },
    /// This node holds no replica of the shard.
    #[error("shard {shard} has no replica on node {node}")]
    ShardNotFound { shard: GroupId, node: NodeId },
    #[error("key is {len} bytes, more than the limit of {max}")]
    KeyTooLarge { len: usize, max: usize },
    #[error("value is {len} bytes, more than the limit of {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("cluster is not bootstrapped yet")]
    NotBootstrapped,
    /// The request reached the node but could not be served now (no quorum, shutting down).
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("not permitted: {0}")]
    NotPermitted(String),
    /// The caller's certificate does not carry the role this request needs.
    #[error("permission denied: {request} needs the {needed} role, the caller has {has}")]
    PermissionDenied { request: String, needed: crate::Role, has: String },
    /// The request (or its answer) is over a size limit; nothing was done.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The node is at its limit of connections or requests in flight; retry later.
    #[error("busy: {0}")]
    Busy(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The node's data disk has less free space than its reserve: writes are refused (reads
    /// are served) until space is freed. Nothing was done.
    #[error("disk full: node {node} has {free_bytes} bytes free on its data disk, below its reserve of {reserve_bytes}; free space or add nodes")]
    DiskFull { node: NodeId, free_bytes: u64, reserve_bytes: u64 },
    /// The operation does not fit the key's stored value (an increment of a value that is not
    /// an integer, or one that would overflow; an append past the value size limit). Nothing
    /// was done.
    #[error("invalid: {0}")]
    Invalid(String),
}

impl RequestError {
    /// Whether the same request may succeed if sent again (possibly elsewhere, after a refresh).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            RequestError::NotLeader { .. }
                | RequestError::StaleEpoch { .. }
                | RequestError::WrongShard { .. }
                | RequestError::ShardNotFound { .. }
                | RequestError::NotBootstrapped
                | RequestError::Unavailable(_)
                | RequestError::Busy(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the client retries (elsewhere, after a refresh, or later) and what it reports at
    /// once: a refusal that retrying cannot fix must not be retried until the deadline.
    #[test]
    fn only_errors_a_retry_can_fix_are_retryable() {
        let desc = ShardDesc { id: 1, start: 0, end: 1, replicas: vec![], epoch: Default::default() };
        let retry = [
            RequestError::NotLeader { shard: 1, leader: None, leader_addr: None },
            RequestError::StaleEpoch { descriptor: desc.clone() },
            RequestError::WrongShard { shard: 1, descriptor: Some(desc) },
            RequestError::ShardNotFound { shard: 1, node: 2 },
            RequestError::NotBootstrapped,
            RequestError::Unavailable("no quorum".into()),
            RequestError::Busy("too many".into()),
        ];
        let final_ = [
            RequestError::KeyTooLarge { len: 5, max: 4 },
            RequestError::ValueTooLarge { len: 5, max: 4 },
            RequestError::Malformed("bad".into()),
            RequestError::NotPermitted("no".into()),
            RequestError::PermissionDenied { request: "put".into(), needed: crate::Role::Write, has: "read".into() },
            RequestError::TooLarge("big".into()),
            RequestError::Internal("bug".into()),
            RequestError::DiskFull { node: 1, free_bytes: 1, reserve_bytes: 2 },
            RequestError::Invalid("not an integer".into()),
        ];
        assert!(retry.iter().all(|e| e.retryable()), "{retry:?}");
        assert!(final_.iter().all(|e| !e.retryable()), "{final_:?}");
    }
}
