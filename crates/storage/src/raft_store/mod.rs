//! openraft's storage for one group, on the node's shared RocksDB: the log and vote
//! (`log`), the state machine with client sessions (`state_machine`), and shard snapshots as SST
//! files (`snapshot`).

use std::io;

use serde::{de::DeserializeOwned, Serialize};

use crate::db::io_err;

mod log;
mod snapshot;
mod state_machine;

pub use log::*;
pub use snapshot::*;
pub use state_machine::*;

pub(crate) fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, io::Error> {
    postcard::to_allocvec(v).map_err(io_err)
}

pub(crate) fn dec<T: DeserializeOwned>(b: &[u8]) -> Result<T, io::Error> {
    postcard::from_bytes(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("corrupt record: {e}")))
}
