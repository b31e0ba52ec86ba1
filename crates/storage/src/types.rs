//! The one openraft type configuration every group uses, and the commands its log carries.
//!
//! **API boundary:** this module and `raft_store` are the only places that name openraft's
//! storage types, so an openraft upgrade touches them and the node's network adapter.

use ringkv_placement::PlacementCommand;
use serde::{Deserialize, Serialize};

/// A group's view of another node: where to reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    pub peer_addr: String,
}

impl std::fmt::Display for PeerNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.peer_addr)
    }
}

/// A state machine command, replicated through a group's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    Cas {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        expect: Option<Vec<u8>>,
        #[serde(with = "serde_bytes")]
        new: Vec<u8>,
    },
    /// Several puts applied together.
    PutMany {
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// Only in the placement group.
    Placement(PlacementCommand),
    /// `cmd` on behalf of a client session: applied at most once per `(client, seq)`; a retry
    /// gets the first application's answer.
    Session {
        session: ringkv_wire::Session,
        cmd: Box<Command>,
    },
    /// Forgets the sessions of clients whose last write in this group has a log index below
    /// `below_index` (silent for longer than the session expiry, as the leader that proposed it
    /// measured; deterministic on every replica because the cut is in the log).
    ExpireSessions {
        below_index: u64,
    },
    /// A read-modify-write of one key ([`KeyOp`]), decided by the state machine so it is
    /// atomic. `value_bytes_max` (the proposer's limit, carried so every replica decides the
    /// same) bounds what an append may grow the value to.
    Apply {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        op: ringkv_wire::KeyOp,
        value_bytes_max: u64,
    },
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Put { key, value } => write!(f, "put({} bytes, {} bytes)", key.len(), value.len()),
            Command::Delete { key } => write!(f, "delete({} bytes)", key.len()),
            Command::Cas { key, .. } => write!(f, "cas({} bytes)", key.len()),
            Command::PutMany { pairs } => write!(f, "put_many({})", pairs.len()),
            Command::Placement(p) => write!(f, "placement({p:?})"),
            Command::Session { session, cmd } => write!(f, "{cmd} for client {:x} seq {}", session.client, session.seq),
            Command::ExpireSessions { below_index } => write!(f, "expire sessions silent since before index {below_index}"),
            Command::Apply { key, op, .. } => match op {
                ringkv_wire::KeyOp::Incr(d) => write!(f, "incr({} bytes, {d})", key.len()),
                ringkv_wire::KeyOp::Append(v) => write!(f, "append({} bytes, {} bytes)", key.len(), v.len()),
                ringkv_wire::KeyOp::DeleteCount => write!(f, "delete_count({} bytes)", key.len()),
            },
        }
    }
}

/// What applying a [`Command`] returned.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    #[default]
    Done,
    Cas {
        swapped: bool,
        current: Option<Vec<u8>>,
    },
    Placement(Result<(), ringkv_placement::PlacementError>),
    /// The command does not fit this group (a bug in the proposer, never a client's fault).
    Refused(String),
    /// A session write below the session's floor whose answer is not kept (a late copy of a
    /// write the client gave up on, or a retry of one whose answer was forgotten because the
    /// client's row was full): not applied now.
    Expired {
        client: u64,
        seq: u64,
        floor: u64,
    },
    /// The answer of an `Apply`: the new value of a counter, the new length after an append,
    /// or how many keys a counted delete removed.
    Int(i64),
    /// An `Apply` that does not fit the stored value; nothing was changed.
    Invalid(String),
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = PeerNode,
);

pub type Raft = openraft::Raft<TypeConfig, crate::raft_store::StateMachine>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
