//! Durable storage for one node: the Raft log and the state machine in ONE redb file.
//!
//! Why one file: redb commits are totally ordered and a durable commit persists every commit
//! before it. Log appends, truncations, purges and vote saves commit with
//! `Durability::Immediate` (one fsync per appended batch of entries); state-machine applies
//! commit with `Durability::None`. After a crash the state machine is therefore at some applied
//! index no later than the durable log, and openraft re-applies the rest from the log. A log
//! purge (durable) can never outrun the state it relies on, because the purge's fsync also
//! persists every apply committed before it.
//!
//! redb is synchronous: every transaction runs on tokio's blocking pool, never on an executor
//! thread.

mod log_store;
mod snapshot;
mod state_machine;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::{AnyError, StorageIOError};
use redb::{Database, TableDefinition};

pub use log_store::LogStore;
pub use snapshot::SnapshotFile;
pub use state_machine::{StateMachineStore, StoreStatus};

use crate::raft_types::StorageError;

/// Raft log: index -> postcard(Entry).
pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Raft hard state: "vote", "last_purged" -> postcard.
pub(crate) const RAFT_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_state");
/// State-machine metadata: "last_applied", "membership", "revision", "compacted" -> postcard.
pub(crate) const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
/// Current key space: key -> postcard(StoredKv).
pub(crate) const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
/// MVCC history: (key, revision) -> postcard(Option<StoredKv>), `None` being a delete.
pub(crate) const HISTORY: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("kv_history");
/// Idempotency results: (client id, seq) -> postcard(CommandResult).
pub(crate) const SESSIONS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("sessions");
/// Per client: every seq below this is acknowledged and forgotten.
pub(crate) const SESSION_FLOORS: TableDefinition<u64, u64> = TableDefinition::new("session_floors");

/// Opens (or creates) the node's store under `dir`: `dir/aspen.redb` and `dir/snapshots/`.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), OpenError> {
    std::fs::create_dir_all(dir).map_err(|e| OpenError::Io(dir.to_path_buf(), e))?;
    let snapshots = dir.join("snapshots");
    std::fs::create_dir_all(&snapshots).map_err(|e| OpenError::Io(snapshots.clone(), e))?;
    let path = dir.join("aspen.redb");
    let db = Database::create(&path).map_err(|e| OpenError::Db(path.clone(), e.into()))?;
    let db = Arc::new(db);
    // Create every table up front so read transactions never meet a missing table.
    let txn = db
        .begin_write()
        .map_err(|e| OpenError::Db(path.clone(), e.into()))?;
    {
        let r: Result<(), redb::Error> = (|| {
            txn.open_table(LOG)?;
            txn.open_table(RAFT_STATE)?;
            txn.open_table(SM_META)?;
            txn.open_table(KV)?;
            txn.open_table(HISTORY)?;
            txn.open_table(SESSIONS)?;
            txn.open_table(SESSION_FLOORS)?;
            Ok(())
        })();
        r.map_err(|e| OpenError::Db(path.clone(), e))?;
    }
    txn.commit()
        .map_err(|e| OpenError::Db(path.clone(), e.into()))?;
    Ok((
        LogStore::new(db.clone()),
        StateMachineStore::new(db, snapshots),
    ))
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("cannot open database {0}: {1}")]
    Db(PathBuf, redb::Error),
}

/// Runs redb work on the blocking pool.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, StorageError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StorageError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        StorageError::from(StorageIOError::write(AnyError::error(format!(
            "storage task failed: {e}"
        ))))
    })?
}

pub(crate) fn any(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard encoding to a Vec cannot fail for our types")
}
