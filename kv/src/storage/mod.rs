//! Durable storage for one node: the Raft log and the state machine, in two redb files.
//!
//! - `log.redb`: the Raft log and vote. Every change commits with `Durability::Immediate`;
//!   appends are grouped so one fsync covers many entries (see `log_store`).
//! - `state.redb`: the state machine. Applies commit with `Durability::None` (no fsync), every
//!   `SM_DURABLE_EVERY`-th apply durably. After a crash the state machine is at some older
//!   applied index and openraft re-applies the rest from the durable log.
//!
//! The one rule that makes this safe: **the log is never purged past state that is not
//! durable.** `LogStore::purge` first commits the state machine durably (a durable redb commit
//! persists every commit before it), and openraft only purges up to a snapshot, which is
//! built from applied state. Installing a snapshot commits durably.
//!
//! Two files instead of one: a durable commit of a shared file must also write every page the
//! non-durable applies dirtied, and log appends and applies would take turns on one write lock.
//! Split, a log commit writes only log pages (measured in the node under 64 writers: p50
//! 1.2 ms shared, 0.63 ms split; BENCHMARKS.md has the end-to-end effect).
//!
//! redb is synchronous: transactions run on tokio's blocking pool or the log writer thread,
//! never on an executor thread.

mod log_store;
mod snapshot;
mod state_machine;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::{AnyError, StorageIOError};
use redb::{Database, TableDefinition};

pub use log_store::LogStore;
pub use snapshot::SnapshotFile;
pub use state_machine::{StateDigest, StateMachineStore, StoreStatus};

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
/// Per client: leader time (ms) of the last batch that carried one of its requests.
pub(crate) const SESSION_SEEN: TableDefinition<u64, u64> = TableDefinition::new("session_seen");
/// `SESSION_SEEN` ordered by time, to forget idle clients oldest first.
pub(crate) const SESSION_IDLE: TableDefinition<(u64, u64), ()> =
    TableDefinition::new("session_idle");

/// Opens (or creates) the node's store under `dir`: `log.redb`, `state.redb`, `snapshots/`.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), OpenError> {
    std::fs::create_dir_all(dir).map_err(|e| OpenError::Io(dir.to_path_buf(), e))?;
    let snapshots = dir.join("snapshots");
    std::fs::create_dir_all(&snapshots).map_err(|e| OpenError::Io(snapshots.clone(), e))?;
    let log_db = create(&dir.join("log.redb"), |txn| {
        txn.open_table(LOG)?;
        txn.open_table(RAFT_STATE)?;
        Ok(())
    })?;
    let sm_db = create(&dir.join("state.redb"), create_sm_tables)?;
    Ok((
        LogStore::new(log_db, Arc::downgrade(&sm_db)),
        StateMachineStore::new(sm_db, snapshots),
    ))
}

/// Creates every state-machine table (a no-op for existing ones).
pub(crate) fn create_sm_tables(txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(SM_META)?;
    txn.open_table(KV)?;
    txn.open_table(HISTORY)?;
    txn.open_table(SESSIONS)?;
    txn.open_table(SESSION_FLOORS)?;
    txn.open_table(SESSION_SEEN)?;
    txn.open_table(SESSION_IDLE)?;
    Ok(())
}

/// Opens or creates a database and its tables (so read transactions never meet a missing
/// table).
fn create(
    path: &Path,
    tables: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
) -> Result<Arc<Database>, OpenError> {
    let err = |e: redb::Error| OpenError::Db(path.to_path_buf(), e);
    let db = Database::create(path).map_err(|e| err(e.into()))?;
    let txn = db.begin_write().map_err(|e| err(e.into()))?;
    tables(&txn).map_err(err)?;
    txn.commit().map_err(|e| err(e.into()))?;
    Ok(Arc::new(db))
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
