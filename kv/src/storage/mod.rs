//! Durable storage for one node: the Raft log in files of its own, the state machine in redb.
//!
//! - `log-0.wal`, `log-1.wal`: the Raft log and vote, an append-only stream of checksummed
//!   records (see `wal`). Appends are grouped so one `fdatasync` covers many entries (see
//!   `log_store`).
//! - `state.redb`: the state machine. Applies commit with `Durability::None` (no fsync), every
//!   `SM_DURABLE_EVERY`-th apply durably. After a crash the state machine is at some older
//!   applied index and openraft re-applies the rest from the durable log.
//!
//! The one rule that makes this safe: **the log is never purged past state that is not
//! durable.** `LogStore::purge` first commits the state machine durably (a durable redb commit
//! persists every commit before it), and openraft only purges up to a snapshot, which is
//! built from applied state. Installing a snapshot commits durably.
//!
//! The log left redb for its own files because a durable redb commit of one small entry
//! writes B-tree pages and a header: 0.20-0.25 ms here, against about 0.1 ms for an append
//! and `fdatasync` (BENCHMARKS.md). A store written by an older Aspen (`log.redb`) is moved
//! into the new files when opened.
//!
//! redb and the log files are synchronous: their work runs on tokio's blocking pool or the
//! log writer thread, never on an executor thread.

mod activity;
mod log_store;
mod snapshot;
mod state_db;
mod state_machine;
mod wal;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{
    Database, ReadableDatabase, ReadableTable, StorageBackend, TableDefinition, TableHandle,
};

mod changes;
mod key_index;
mod leases;
mod recent;
pub use activity::set_activity_hook;
pub use log_store::LogStore;
pub use snapshot::SnapshotFile;
pub use state_machine::{StateDigest, StateMachineStore, StoreStatus, SystemView};
pub use wal::WalError;

use crate::raft_types::{LogId, Vote};

/// The Raft log of stores written before the log had files of its own: index ->
/// postcard(Entry), in `log.redb` (read once, to move it).
const LEGACY_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Their Raft hard state: "vote", "last_purged" -> postcard.
const LEGACY_RAFT_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_state");
/// State-machine metadata: "last_applied", "membership", "revision", "compacted" -> postcard.
pub(crate) const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
/// The key space by revision: (revision, key) -> postcard(Option<StoredKv>), `None` being a
/// delete. Only ever grows at its end (and shrinks by compaction); `key_index` finds a key's
/// records.
pub(crate) const REVISIONS: TableDefinition<(u64, &[u8]), &[u8]> =
    TableDefinition::new("kv_revisions");
/// Stores written before `kv_revisions`: the current key space, key -> postcard(StoredKv)
/// (dropped when such a store is opened).
const LEGACY_KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
/// Theirs too: the history, (key, revision) -> what `kv_revisions` holds (moved there when
/// such a store is opened).
pub(crate) const LEGACY_HISTORY: TableDefinition<(&[u8], u64), &[u8]> =
    TableDefinition::new("kv_history");
/// Theirs too: (revision, key) -> (), the watch index (dropped when such a store is opened).
const LEGACY_CHANGES: TableDefinition<(u64, &[u8]), ()> = TableDefinition::new("kv_changes");
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

/// The state machine's redb file, in the store's directory.
pub const STATE_FILE: &str = "state.redb";
/// The log files' names under the store directory.
const LOG_FILES: [&str; 2] = ["log-0.wal", "log-1.wal"];
/// The log database of older stores.
const LEGACY_LOG_FILE: &str = "log.redb";

/// Opens (or creates) the node's store under `dir`: `log-0.wal` and `log-1.wal`,
/// `state.redb`, `snapshots/`. A `log.redb` left by an older Aspen is moved into the log
/// files first.
///
/// The directory is made private to its owner (mode 0700 on Unix): the state machine and its
/// snapshots hold the cluster's secret key.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), OpenError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e| OpenError::Io(path, e)
    };
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(dir))?;
    }
    let snapshots = dir.join("snapshots");
    std::fs::create_dir_all(&snapshots).map_err(io_err(&snapshots))?;
    let sm_path = dir.join(STATE_FILE);
    let sm_db = Database::create(&sm_path).map_err(|e| OpenError::Db(sm_path.clone(), e.into()))?;
    let mut files = Vec::new();
    for name in LOG_FILES {
        let path = dir.join(name);
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&path).map_err(io_err(&path))?;
        // One process per store: the lock goes when the file is closed (or the process dies).
        file.try_lock().map_err(|e| {
            let why = match e {
                std::fs::TryLockError::WouldBlock => {
                    std::io::Error::new(std::io::ErrorKind::WouldBlock, "in use by another process")
                }
                std::fs::TryLockError::Error(e) => e,
            };
            OpenError::Io(path.clone(), why)
        })?;
        let backend = redb::backends::FileBackend::new(file)
            .map_err(|e| OpenError::Db(path.clone(), e.into()))?;
        files.push(Box::new(backend) as Box<dyn StorageBackend>);
    }
    let files: [Box<dyn StorageBackend>; 2] = files.try_into().expect("two log files");
    let log_path = dir.join(LOG_FILES[0]);
    let legacy = dir.join(LEGACY_LOG_FILE);
    let wal = if legacy.exists() {
        let wal = migrate_legacy_log(&legacy, files)?;
        // Gone for good before anything is appended: a log.redb that came back after a
        // crash would be moved in again over newer entries.
        std::fs::remove_file(&legacy).map_err(io_err(&legacy))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
        tracing::info!(from = %legacy.display(), "moved the Raft log into its own files");
        wal
    } else {
        wal::Wal::open(files, wal::NODE_SIZES).map_err(|e| OpenError::Log(log_path, e))?
    };
    open_parts(wal, sm_db, snapshots, IoMode::Threads, log_store::NODE_TAIL)
}

/// Opens the store on caller-supplied storage (the simulation's crashable in-memory disks):
/// two for the log files, one for the state machine, with snapshot files under `snapshots`.
/// The log files grow and compact in small steps here, so that compactions meet crashes, and
/// only a few written entries stay in memory, so that reads go to the files.
pub fn open_with_backends<L: StorageBackend>(
    log: [L; 2],
    state: impl StorageBackend,
    snapshots: PathBuf,
    io: IoMode,
) -> Result<(LogStore, StateMachineStore), OpenError> {
    std::fs::create_dir_all(&snapshots).map_err(|e| OpenError::Io(snapshots.clone(), e))?;
    let [a, b] = log;
    let wal = wal::Wal::open([Box::new(a), Box::new(b)], wal::SIMULATION_SIZES)
        .map_err(|e| OpenError::Log(PathBuf::from("log (backend)"), e))?;
    let sm_db = redb::Builder::new()
        .create_with_backend(state)
        .map_err(|e| OpenError::Db(PathBuf::from("state (backend)"), e.into()))?;
    open_parts(wal, sm_db, snapshots, io, log_store::SIMULATION_TAIL)
}

/// Moves the log, vote and purge point of an older store's `log.redb` into fresh log files
/// (synced). Safe to repeat: the files are emptied first, and `log.redb` is only removed
/// after this returns.
fn migrate_legacy_log(
    path: &Path,
    files: [Box<dyn StorageBackend>; 2],
) -> Result<wal::Wal, OpenError> {
    let db_err = |e: redb::Error| OpenError::Db(path.to_path_buf(), e);
    let log_err = |e: WalError| OpenError::Log(path.to_path_buf(), e);
    let corrupt = |what: &str, e: postcard::Error| {
        OpenError::Db(
            path.to_path_buf(),
            redb::Error::Corrupted(format!("{what}: {e}")),
        )
    };
    let db = Database::open(path).map_err(|e| db_err(e.into()))?;
    let txn = db.begin_read().map_err(|e| db_err(e.into()))?;
    let (mut vote, mut purged): (Option<Vote>, Option<LogId>) = (None, None);
    // A table that was never created is empty; any other failure stops the move (and
    // leaves `log.redb` in place).
    fn existing<T>(table: Result<T, redb::TableError>) -> Result<Option<T>, redb::Error> {
        match table {
            Ok(t) => Ok(Some(t)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
    if let Some(state) = existing(txn.open_table(LEGACY_RAFT_STATE)).map_err(db_err)? {
        if let Some(v) = state.get("vote").map_err(|e| db_err(e.into()))? {
            vote = Some(postcard::from_bytes(v.value()).map_err(|e| corrupt("vote", e))?);
        }
        if let Some(v) = state.get("last_purged").map_err(|e| db_err(e.into()))? {
            purged = postcard::from_bytes::<Option<LogId>>(v.value())
                .map_err(|e| corrupt("last purged", e))?;
        }
    }
    let mut entries: Vec<(LogId, Vec<u8>)> = Vec::new();
    if let Some(log) = existing(txn.open_table(LEGACY_LOG)).map_err(db_err)? {
        for item in log.iter().map_err(|e| db_err(e.into()))? {
            let (_, v) = item.map_err(|e| db_err(e.into()))?;
            let entry: crate::raft_types::Entry =
                postcard::from_bytes(v.value()).map_err(|e| corrupt("log entry", e))?;
            entries.push((entry.log_id, v.value().to_vec()));
        }
    }
    for file in &files {
        file.set_len(0)
            .and_then(|()| file.sync_data())
            .map_err(|e| log_err(e.into()))?;
    }
    let mut wal = wal::Wal::open(files, wal::NODE_SIZES).map_err(log_err)?;
    if let Some(vote) = &vote {
        wal.save_vote(vote).map_err(log_err)?;
    }
    if let Some(purged) = purged {
        wal.purge(purged).map_err(log_err)?;
    }
    let refs: Vec<(LogId, &[u8])> = entries.iter().map(|(id, b)| (*id, b.as_slice())).collect();
    wal.append(&refs).map_err(log_err)?;
    wal.sync().map_err(log_err)?;
    Ok(wal)
}

fn open_parts(
    wal: wal::Wal,
    sm_db: Database,
    snapshots: PathBuf,
    io: IoMode,
    tail: log_store::TailBudget,
) -> Result<(LogStore, StateMachineStore), OpenError> {
    let state_err = |e: redb::Error| OpenError::Db(PathBuf::from("state"), e);
    move_legacy_history(&sm_db).map_err(state_err)?;
    let sm_db = Arc::new(state_db::StateDb::new(create_tables(
        sm_db,
        "state",
        create_sm_tables,
    )?));
    let sm = StateMachineStore::new(sm_db, snapshots, io).map_err(state_err)?;
    let log = LogStore::new(wal, Arc::downgrade(&sm.db), io, tail, sm.metrics());
    Ok((log, sm))
}

/// Creates every state-machine table (a no-op for existing ones).
pub(crate) fn create_sm_tables(txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(SM_META)?;
    txn.open_table(REVISIONS)?;
    txn.open_table(SESSIONS)?;
    txn.open_table(SESSION_FLOORS)?;
    txn.open_table(SESSION_SEEN)?;
    txn.open_table(SESSION_IDLE)?;
    txn.open_table(SYSTEM)?;
    txn.open_table(leases::LEASES)?;
    txn.open_table(leases::LEASE_KEYS)?;
    Ok(())
}

/// Moves a store written before `kv_revisions` to it, in one durable transaction: each
/// history record keeps its bytes under (revision, key), and the old tables are dropped (the
/// current key space and the watch index are what the new table and the key index give).
fn move_legacy_history(db: &Database) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    let legacy = txn
        .list_tables()?
        .any(|t| t.name() == LEGACY_HISTORY.name());
    if !legacy {
        return Ok(());
    }
    {
        let history = txn.open_table(LEGACY_HISTORY)?;
        let mut revisions = txn.open_table(REVISIONS)?;
        for item in history.iter()? {
            let (k, v) = item?;
            let (key, revision) = k.value();
            revisions.insert((revision, key), v.value())?;
        }
    }
    txn.delete_table(LEGACY_HISTORY)?;
    txn.delete_table(LEGACY_KV)?;
    txn.delete_table(LEGACY_CHANGES)?;
    txn.commit()?;
    Ok(())
}

/// Creates a database's tables (so read transactions never meet a missing table).
fn create_tables(
    db: Database,
    name: &str,
    tables: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
) -> Result<Database, OpenError> {
    let err = |e: redb::Error| OpenError::Db(PathBuf::from(name), e);
    let txn = db.begin_write().map_err(|e| err(e.into()))?;
    tables(&txn).map_err(err)?;
    txn.commit().map_err(|e| err(e.into()))?;
    Ok(db)
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open or create {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("cannot open database {0}: {1}")]
    Db(PathBuf, redb::Error),
    #[error("cannot open the Raft log {0}: {1}")]
    Log(PathBuf, WalError),
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
pub(crate) async fn blocking<T, F>(io: IoMode, f: F) -> std::io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> std::io::Result<T> + Send + 'static,
{
    io.run(f)
        .await
        .map_err(|e| io_error("storage task failed", e))?
}

/// A storage failure as openraft takes it: an `io::Error` that says what was being done.
pub(crate) fn io_error(doing: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{doing}: {e}"))
}

pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard encoding to a Vec cannot fail for our types")
}

#[cfg(test)]
mod tests {
    use openraft::storage::RaftLogStorage;
    use openraft::RaftLogReader;

    use super::*;
    use crate::raft_types::Entry;

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: crate::raft_types::log_id(3, 1, index),
            payload: openraft::EntryPayload::Blank,
        }
    }

    #[tokio::test]
    async fn a_log_redb_of_an_older_store_is_moved_into_the_log_files() {
        let dir = tempfile::tempdir().unwrap();
        let vote = Vote::new(3, 1);
        let purged = Some(entry(4).log_id);
        {
            let db = Database::create(dir.path().join(LEGACY_LOG_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut state = txn.open_table(LEGACY_RAFT_STATE).unwrap();
                state.insert("vote", encode(&vote).as_slice()).unwrap();
                state
                    .insert("last_purged", encode(&purged).as_slice())
                    .unwrap();
                let mut log = txn.open_table(LEGACY_LOG).unwrap();
                for i in 5..=9 {
                    log.insert(i, encode(&entry(i)).as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        for round in 0..2 {
            let (mut log, _sm) = open(dir.path()).unwrap();
            assert!(!dir.path().join(LEGACY_LOG_FILE).exists(), "round {round}");
            let state = log.get_log_state().await.unwrap();
            assert_eq!(state.last_purged_log_id, purged);
            assert_eq!(state.last_log_id, Some(entry(9).log_id));
            assert_eq!(log.read_vote().await.unwrap(), Some(vote));
            let entries = log.try_get_log_entries(0..100).await.unwrap();
            assert_eq!(entries, (5..=9).map(entry).collect::<Vec<_>>());
        }
    }

    #[tokio::test]
    async fn a_store_in_use_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, sm) = open(dir.path()).unwrap();
        // Even with the state machine closed, the log files stay locked while the log is open.
        drop(sm);
        let err = open(dir.path()).err().expect("refused");
        assert!(err.to_string().contains("in use"), "{err}");
    }

    #[tokio::test]
    async fn a_store_that_is_not_a_log_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LEGACY_LOG_FILE), b"not a database").unwrap();
        let err = open(dir.path()).err().expect("refused");
        assert!(err.to_string().contains("log.redb"), "{err}");
        assert!(dir.path().join(LEGACY_LOG_FILE).exists());
    }
}
