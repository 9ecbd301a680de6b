//! The Raft log and vote.
//!
//! All log writes go through one dedicated writer thread, in order. `append` makes the entries
//! readable at once (an in-memory `pending` map), queues them and returns; the writer drains
//! everything queued, commits it in ONE `Durability::Immediate` transaction (one fsync for many
//! appends: group commit), then signals openraft that those entries are durable. openraft's
//! core never waits for a disk.
//!
//! Readers look at `pending` first and redb second: an entry leaves `pending` only after its
//! commit, so it is always in one of them. Truncate, purge and vote saves are rare; they are
//! queued behind earlier appends and awaited.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::{mpsc, Arc, RwLock, Weak};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, RaftLogReader, StorageIOError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable};
use tokio::sync::oneshot;

use super::{any, blocking, encode, IoMode, LOG, RAFT_STATE};
use crate::metrics::StorageMetrics;
use crate::raft_types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// How long a purge waits for the state machine to apply what it purges (see `purge`).
const PURGE_WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);
const PURGE_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// Most queued appends one group commit takes.
const MAX_GROUP_COMMIT: usize = 256;

/// A durable change other than an append, run on the writer thread.
type DurableOp = Box<dyn FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error> + Send>;

enum Job {
    Append {
        entries: Vec<(LogId, Vec<u8>)>,
        done: LogFlushed<TypeConfig>,
    },
    /// Any other durable change, run in order with appends.
    Other {
        op: DurableOp,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// The log store. Cheap to clone; clones share the database, the pending entries and the
/// writer thread.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// The state machine's database, made durable before every purge.
    sm_db: Weak<Database>,
    /// Appended but not yet durable, by index.
    pending: Arc<RwLock<BTreeMap<u64, Entry>>>,
    /// The writer thread's queue; `None` in [`IoMode::Inline`], where jobs run on the caller.
    writer: Option<mpsc::Sender<Job>>,
    io: IoMode,
    /// Log flush figures.
    metrics: Arc<StorageMetrics>,
}

impl LogStore {
    pub(crate) fn new(
        db: Arc<Database>,
        sm_db: Weak<Database>,
        io: IoMode,
        metrics: Arc<StorageMetrics>,
    ) -> Self {
        let pending = Arc::new(RwLock::new(BTreeMap::new()));
        let writer = match io {
            IoMode::Inline => None,
            IoMode::Threads => {
                let (writer, jobs) = mpsc::channel();
                // The thread holds the database weakly: it closes when the last store handle
                // drops, even if the thread has not noticed yet.
                let (db2, pending2, metrics2) =
                    (Arc::downgrade(&db), pending.clone(), metrics.clone());
                std::thread::Builder::new()
                    .name("aspen-log-writer".into())
                    .spawn(move || write_loop(&db2, &pending2, &metrics2, jobs))
                    .expect("spawn the log writer thread");
                Some(writer)
            }
        };
        LogStore {
            db,
            sm_db,
            pending,
            writer,
            io,
            metrics,
        }
    }

    /// Queues `job` for the writer thread, or runs it now in [`IoMode::Inline`].
    fn submit(&self, job: Job) -> Result<(), String> {
        match &self.writer {
            Some(w) => w.send(job).map_err(|_| "log writer stopped".to_string()),
            None => {
                match job {
                    Job::Append { entries, done } => commit_appends(
                        &self.db,
                        &self.pending,
                        &self.metrics,
                        vec![(entries, done)],
                    ),
                    Job::Other { op, done } => run_other(&self.db, op, done),
                }
                Ok(())
            }
        }
    }

    fn read_state<T: serde::de::DeserializeOwned>(
        db: &Database,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let txn = db.begin_read().map_err(|e| StorageIOError::read(any(e)))?;
        let table = txn
            .open_table(RAFT_STATE)
            .map_err(|e| StorageIOError::read(any(e)))?;
        match table.get(key).map_err(|e| StorageIOError::read(any(e)))? {
            None => Ok(None),
            Some(v) => Ok(Some(
                postcard::from_bytes(v.value()).map_err(|e| StorageIOError::read(any(e)))?,
            )),
        }
    }

    /// Runs `op` durably, after every write queued before it.
    async fn durable(
        &self,
        op: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error> + Send + 'static,
    ) -> Result<(), String> {
        let (done, rx) = oneshot::channel();
        self.submit(Job::Other {
            op: Box::new(op),
            done,
        })?;
        rx.await.map_err(|_| "log writer stopped".to_string())?
    }
}

type Group = Vec<(Vec<(LogId, Vec<u8>)>, LogFlushed<TypeConfig>)>;

fn write_loop(
    db: &std::sync::Weak<Database>,
    pending: &RwLock<BTreeMap<u64, Entry>>,
    metrics: &StorageMetrics,
    jobs: mpsc::Receiver<Job>,
) {
    while let Ok(first) = jobs.recv() {
        let Some(db) = db.upgrade() else { return };
        let db = &*db;
        match first {
            Job::Other { op, done } => run_other(db, op, done),
            Job::Append { entries, done } => {
                let mut group = vec![(entries, done)];
                let mut next_other = None;
                while group.len() < MAX_GROUP_COMMIT {
                    match jobs.try_recv() {
                        Ok(Job::Append { entries, done }) => group.push((entries, done)),
                        Ok(other) => {
                            next_other = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                commit_appends(db, pending, metrics, group);
                if let Some(Job::Other { op, done }) = next_other {
                    run_other(db, op, done);
                }
            }
        }
    }
}

fn run_other(db: &Database, op: DurableOp, done: oneshot::Sender<Result<(), String>>) {
    let r = commit(db, |txn| op(txn));
    let _ = done.send(r.map_err(|e| e.to_string()));
}

/// Commits a group of appends in one durable transaction, then tells openraft.
fn commit_appends(
    db: &Database,
    pending: &RwLock<BTreeMap<u64, Entry>>,
    metrics: &StorageMetrics,
    group: Group,
) {
    let started = std::time::Instant::now();
    let r = commit(db, |txn| {
        let mut table = txn.open_table(LOG)?;
        for (entries, _) in &group {
            for (log_id, bytes) in entries {
                table.insert(log_id.index, bytes.as_slice())?;
            }
        }
        Ok(())
    });
    let took = started.elapsed();
    metrics.log_flushed(group.len(), took);
    tracing::trace!(
        appends = group.len(),
        micros = took.as_micros() as u64,
        "log group commit"
    );
    if r.is_ok() {
        // Durable now: readers find these in redb.
        let mut p = pending.write().expect("pending lock");
        for (entries, _) in &group {
            for (log_id, _) in entries {
                // Only if not replaced meanwhile (truncate + re-append).
                if p.get(&log_id.index).is_some_and(|e| e.log_id == *log_id) {
                    p.remove(&log_id.index);
                }
            }
        }
    }
    for (_, done) in group {
        match &r {
            Ok(()) => done.log_io_completed(Ok(())),
            Err(e) => done.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
    }
}

fn commit(
    db: &Database,
    f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
) -> Result<(), redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    f(&txn)?;
    txn.commit()?;
    Ok(())
}

/// The state machine's last applied index, as committed (durably or not) in its database.
fn applied_index(sm_db: &Database) -> Result<Option<u64>, redb::Error> {
    let txn = sm_db.begin_read()?;
    let meta = txn.open_table(super::SM_META)?;
    let Some(bytes) = meta.get("last_applied")? else {
        return Ok(None);
    };
    let applied: Option<LogId> = postcard::from_bytes(bytes.value())
        .map_err(|e| redb::Error::Corrupted(format!("state machine metadata: {e}")))?;
    Ok(applied.map(|l| l.index))
}

fn write_err(e: String) -> StorageError {
    StorageIOError::write_logs(AnyError::error(e)).into()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        // Pending first (see the module docs for why this order never misses an entry).
        let mut found: BTreeMap<u64, Entry> = {
            let p = self.pending.read().expect("pending lock");
            p.range((start, end))
                .map(|(i, e)| (*i, e.clone()))
                .collect()
        };
        let db = self.db.clone();
        let durable = blocking(self.io, move || {
            let txn = db
                .begin_read()
                .map_err(|e| StorageIOError::read_logs(any(e)))?;
            let table = txn
                .open_table(LOG)
                .map_err(|e| StorageIOError::read_logs(any(e)))?;
            let mut out = Vec::new();
            let iter = table
                .range::<u64>((start, end))
                .map_err(|e| StorageIOError::read_logs(any(e)))?;
            for item in iter {
                let (_, v) = item.map_err(|e| StorageIOError::read_logs(any(e)))?;
                let entry: Entry = postcard::from_bytes(v.value())
                    .map_err(|e| StorageIOError::read_logs(any(e)))?;
                out.push(entry);
            }
            Ok(out)
        })
        .await?;
        for entry in durable {
            found.entry(entry.log_id.index).or_insert(entry);
        }
        Ok(found.into_values().collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let pending_last = self
            .pending
            .read()
            .expect("pending lock")
            .values()
            .next_back()
            .map(|e| e.log_id);
        let db = self.db.clone();
        let (last_purged, durable_last) = blocking(self.io, move || {
            let last_purged: Option<LogId> = Self::read_state(&db, "last_purged")?.flatten();
            let txn = db
                .begin_read()
                .map_err(|e| StorageIOError::read_logs(any(e)))?;
            let table = txn
                .open_table(LOG)
                .map_err(|e| StorageIOError::read_logs(any(e)))?;
            let last = match table
                .last()
                .map_err(|e| StorageIOError::read_logs(any(e)))?
            {
                Some((_, v)) => {
                    let entry: Entry = postcard::from_bytes(v.value())
                        .map_err(|e| StorageIOError::read_logs(any(e)))?;
                    Some(entry.log_id)
                }
                None => None,
            };
            Ok((last_purged, last))
        })
        .await?;
        let last_log_id = pending_last.max(durable_last).or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let bytes = encode(vote);
        self.durable(move |txn| {
            txn.open_table(RAFT_STATE)?
                .insert("vote", bytes.as_slice())?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_vote(AnyError::error(e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        let db = self.db.clone();
        blocking(self.io, move || Self::read_state(&db, "vote")).await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        let encoded: Vec<(LogId, Vec<u8>)> =
            entries.iter().map(|e| (e.log_id, encode(e))).collect();
        {
            let mut p = self.pending.write().expect("pending lock");
            for e in entries {
                p.insert(e.log_id.index, e);
            }
        }
        self.submit(Job::Append {
            entries: encoded,
            done: callback,
        })
        .map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let index = log_id.index;
        self.pending
            .write()
            .expect("pending lock")
            .retain(|i, _| *i < index);
        self.durable(move |txn| {
            txn.open_table(LOG)?
                .retain_in::<u64, _>(index.., |_, _| false)?;
            Ok(())
        })
        .await
        .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Never purge past state that is not durable. openraft asks to purge up to a
        // snapshot, and right after it *receives* one it does so while the state machine task
        // may still be installing it: purging then, and crashing before the install is
        // durable, would leave a log that starts after the state machine ends (the node
        // could never restart). So wait until the state machine has applied that far, make
        // it durable, then purge. (Skipping the purge instead would leave a hole in the log.)
        if let Some(sm_db) = self.sm_db.upgrade() {
            let started = tokio::time::Instant::now();
            loop {
                let db = sm_db.clone();
                let applied = blocking(self.io, move || {
                    applied_index(&db)
                        .map_err(|e| StorageIOError::read_state_machine(any(e)).into())
                })
                .await?;
                if applied.is_some_and(|a| a >= log_id.index) {
                    break;
                }
                if started.elapsed() > PURGE_WAIT_LIMIT {
                    return Err(StorageIOError::write_logs(AnyError::error(format!(
                        "cannot purge the log up to {}: the state machine applied only {applied:?}",
                        log_id.index
                    )))
                    .into());
                }
                tokio::time::sleep(PURGE_POLL).await;
            }
            // A durable commit persists every earlier commit: the applied state is on disk.
            blocking(self.io, move || {
                commit(&sm_db, |_| Ok(()))
                    .map_err(|e| StorageIOError::write_state_machine(any(e)).into())
            })
            .await?;
        }
        let bytes = encode(&Some(log_id));
        let index = log_id.index;
        self.durable(move |txn| {
            txn.open_table(RAFT_STATE)?
                .insert("last_purged", bytes.as_slice())?;
            txn.open_table(LOG)?
                .retain_in::<u64, _>(..=index, |_, _| false)?;
            Ok(())
        })
        .await
        .map_err(write_err)?;
        self.pending
            .write()
            .expect("pending lock")
            .retain(|i, _| *i > index);
        Ok(())
    }
}
