//! Test support, used by this crate's tests and by anything that wants a multi-node cluster
//! without sockets:
//!
//! - [`MemRouter`]: an in-memory Raft network with partitions and, for deterministic
//!   simulation, seeded message faults ([`NetFaults`]: delay, drop, duplicate).
//! - [`SimDisk`]: an in-memory redb storage backend that knows which writes were synced, so a
//!   simulated power loss can drop (or tear) exactly the unsynced ones.
//!
//! Nothing here is used by a running node.

mod mem_network;
mod sim_disk;

pub use mem_network::{MemConnection, MemNetwork, MemRouter, NetFaults};

use crate::raft_types::{Member, NodeId};

/// A member record for an in-process node: the id in the first 8 bytes of the key, as a real
/// node's id is derived, and no addresses (the in-memory network needs none).
pub fn member(id: NodeId) -> Member {
    let mut endpoint_id = [0u8; 32];
    endpoint_id[..8].copy_from_slice(&id.to_be_bytes());
    Member {
        endpoint_id,
        addrs: vec![],
    }
}
pub use sim_disk::{CrashMode, SimDisk, SimDiskBackend};
