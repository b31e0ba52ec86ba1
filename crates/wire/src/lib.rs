//! The ringkv wire protocol: plain message structs, the ring, and a pure length-prefixed codec.
//!
//! Everything that crosses a process boundary is defined here, so the node, the client, `ringctl`
//! and the tests agree on one vocabulary. This crate does no I/O.

pub mod auth;
pub mod codec;
pub mod error;
pub mod map;
pub mod msg;
pub mod resp;
pub mod ring;

pub use auth::{Role, TokenRecord, ROLE_DEFAULT};
pub use codec::{decode_frame, encode_frame, CodecError, Decoded};
pub use error::RequestError;
pub use map::{check_addr, ClusterMap, Epoch, MoveRecord, NodeInfo, NodeState, PlacementSettings, ShardDesc};
pub use msg::*;
pub use ring::{key_hash, split_ring};

/// Identifies a node for the lifetime of a cluster. Never reused.
pub type NodeId = u64;
/// Identifies a Raft group. Group 0 is the placement group; shards are 1..=S.
pub type GroupId = u64;
/// The placement driver's Raft group.
pub const PLACEMENT_GROUP: GroupId = 0;

/// ALPN of the client protocol (applications, `ringctl`).
pub const ALPN_CLIENT: &[u8] = b"ringkv-client/1";
/// ALPN of the node-to-node protocol (Raft traffic, placement queries).
/// Version 2: Raft messages travel inline (version 1 carried them as an encoded payload), so a
/// node of either version refuses the other at the TLS handshake.
pub const ALPN_PEER: &[u8] = b"ringkv-peer/2";

/// Default largest user key, in bytes.
pub const KEY_BYTES_MAX_DEFAULT: usize = 4 * 1024;
/// Default largest user value, in bytes.
pub const VALUE_BYTES_MAX_DEFAULT: usize = 1024 * 1024;
