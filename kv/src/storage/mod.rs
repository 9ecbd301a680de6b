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

mod changes;
mod leases;
mod recent;
pub use log_store::LogStore;
pub use snapshot::SnapshotFile;
pub use state_machine::{StateDigest, StateMachineStore, StoreStatus, SystemView};

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
/// The system key space (cluster identity, invitations): key -> value. Not MVCC, never
/// served to clients; replicated, snapshotted and digested like every other table.
pub(crate) const SYSTEM: TableDefinition<&[u8], &[u8]> = TableDefinition::new("system");

/// Opens (or creates) the node's store under `dir`: `log.redb`, `state.redb`, `snapshots/`.
///
/// The directory is made private to its owner (mode 0700 on Unix): the state machine and its
/// snapshots hold the cluster's secret key.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), OpenError> {
    std::fs::create_dir_all(dir).map_err(|e| OpenError::Io(dir.to_path_buf(), e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| OpenError::Io(dir.to_path_buf(), e))?;
    }
    let snapshots = dir.join("snapshots");
    std::fs::create_dir_all(&snapshots).map_err(|e| OpenError::Io(snapshots.clone(), e))?;
    let log_path = dir.join("log.redb");
    let log_db =
        Database::create(&log_path).map_err(|e| OpenError::Db(log_path.clone(), e.into()))?;
    let sm_path = dir.join("state.redb");
    let sm_db = Database::create(&sm_path).map_err(|e| OpenError::Db(sm_path.clone(), e.into()))?;
    open_databases(log_db, sm_db, snapshots, IoMode::Threads)
}

/// Opens the store on caller-supplied redb storage backends (the simulation's crashable
/// in-memory disk), with snapshot files under `snapshots`.
pub fn open_with_backends(
    log: impl redb::StorageBackend,
    state: impl redb::StorageBackend,
    snapshots: PathBuf,
    io: IoMode,
) -> Result<(LogStore, StateMachineStore), OpenError> {
    std::fs::create_dir_all(&snapshots).map_err(|e| OpenError::Io(snapshots.clone(), e))?;
    let err = |name: &str| {
        let name = PathBuf::from(name);
        move |e: redb::DatabaseError| OpenError::Db(name, e.into())
    };
    let log_db = redb::Builder::new()
        .create_with_backend(log)
        .map_err(err("log (backend)"))?;
    let sm_db = redb::Builder::new()
        .create_with_backend(state)
        .map_err(err("state (backend)"))?;
    open_databases(log_db, sm_db, snapshots, io)
}

fn open_databases(
    log_db: Database,
    sm_db: Database,
    snapshots: PathBuf,
    io: IoMode,
) -> Result<(LogStore, StateMachineStore), OpenError> {
    let log_db = create_tables(log_db, "log", |txn| {
        txn.open_table(LOG)?;
        txn.open_table(RAFT_STATE)?;
        Ok(())
    })?;
    let sm_db = create_tables(sm_db, "state", create_sm_tables)?;
    changes::rebuild_if_missing(&sm_db).map_err(|e| OpenError::Db(PathBuf::from("state"), e))?;
    let sm = StateMachineStore::new(sm_db, snapshots, io);
    let log = LogStore::new(log_db, Arc::downgrade(&sm.db), io, sm.metrics());
    Ok((log, sm))
}

/// Creates every state-machine table (a no-op for existing ones).
pub(crate) fn create_sm_tables(txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(SM_META)?;
    txn.open_table(KV)?;
    txn.open_table(HISTORY)?;
    txn.open_table(changes::CHANGES)?;
    txn.open_table(SESSIONS)?;
    txn.open_table(SESSION_FLOORS)?;
    txn.open_table(SESSION_SEEN)?;
    txn.open_table(SESSION_IDLE)?;
    txn.open_table(SYSTEM)?;
    txn.open_table(leases::LEASES)?;
    txn.open_table(leases::LEASE_KEYS)?;
    Ok(())
}

/// Creates a database's tables (so read transactions never meet a missing table).
fn create_tables(
    db: Database,
    name: &str,
    tables: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
) -> Result<Arc<Database>, OpenError> {
    let err = |e: redb::Error| OpenError::Db(PathBuf::from(name), e);
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

/// Where the store runs its synchronous redb work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoMode {
    /// On tokio's blocking pool and a dedicated log writer thread: executor threads never
    /// wait for a disk. What a node uses.
    #[default]
    Threads,
    /// On the calling task. Only for deterministic simulation, where everything runs on one
    /// thread in simulated time and the disk is memory.
    Inline,
}

impl IoMode {
    /// Runs synchronous storage work `f` according to the mode.
    pub(crate) async fn run<T, F>(self, f: F) -> Result<T, tokio::task::JoinError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        match self {
            IoMode::Threads => tokio::task::spawn_blocking(f).await,
            IoMode::Inline => Ok(f()),
        }
    }
}

/// Runs redb work on the blocking pool (or inline, see [`IoMode`]).
pub(crate) async fn blocking<T, F>(io: IoMode, f: F) -> Result<T, StorageError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StorageError> + Send + 'static,
{
    io.run(f).await.map_err(|e| {
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
