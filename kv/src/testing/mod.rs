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
pub use sim_disk::{CrashMode, SimDisk, SimDiskBackend};
