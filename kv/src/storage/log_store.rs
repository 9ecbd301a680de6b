//! The Raft log and vote, in the log's own files (see `wal`).
//!
//! All log writes go through one dedicated writer thread, in order. `append` makes the entries
//! readable at once (an in-memory `pending` map), queues them and returns; the writer drains
//! everything queued, writes it as records and syncs once (one `fdatasync` for many appends:
//! group commit), then signals openraft that those entries are durable. openraft's core never
//! waits for a disk.
//!
//! Readers look at `pending` first and the files second: an entry leaves `pending` only after
//! it is written, so it is always in one of them. Truncate, purge and vote saves are rare; they
//! are queued behind earlier appends and awaited.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::{mpsc, Arc, Mutex, RwLock, Weak};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, RaftLogReader, StorageIOError};
use redb::{Database, Durability, ReadableDatabase};
use tokio::sync::oneshot;

use super::wal::{Wal, WalError, WalReader};
use super::{any, blocking, encode, IoMode};
use crate::metrics::StorageMetrics;
use crate::raft_types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// How long a purge waits for the state machine to apply what it purges (see `purge`).
const PURGE_WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);
const PURGE_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// Most queued appends one group commit takes.
const MAX_GROUP_COMMIT: usize = 256;

/// A durable change other than an append, run on the writer thread (then synced).
type DurableOp = Box<dyn FnOnce(&mut Wal) -> Result<(), WalError> + Send>;

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

/// The log store. Cheap to clone; clones share the files, the pending entries and the
/// writer thread.
#[derive(Clone)]
pub struct LogStore {
    /// The writing side; only the writer thread (or, inline, the caller) locks it.
    wal: Arc<Mutex<Wal>>,
    reader: WalReader,
    /// The state machine's database, made durable before every purge.
    sm_db: Weak<Database>,
    /// Appended but not yet written, by index.
    pending: Arc<RwLock<BTreeMap<u64, Entry>>>,
    /// The writer thread's queue; `None` in [`IoMode::Inline`], where jobs run on the caller.
    writer: Option<mpsc::Sender<Job>>,
    io: IoMode,
    /// Log flush figures.
    metrics: Arc<StorageMetrics>,
}

impl LogStore {
    pub(crate) fn new(
        wal: Wal,
        sm_db: Weak<Database>,
        io: IoMode,
        metrics: Arc<StorageMetrics>,
    ) -> Self {
        let reader = wal.reader();
        let wal = Arc::new(Mutex::new(wal));
        let pending = Arc::new(RwLock::new(BTreeMap::new()));
        let writer = match io {
            IoMode::Inline => None,
            IoMode::Threads => {
                let (writer, jobs) = mpsc::channel();
                // The thread holds the files weakly: they close when the last store handle
                // drops, even if the thread has not noticed yet.
                let (wal2, pending2, metrics2) =
                    (Arc::downgrade(&wal), pending.clone(), metrics.clone());
                std::thread::Builder::new()
                    .name("aspen-log-writer".into())
                    .spawn(move || write_loop(&wal2, &pending2, &metrics2, jobs))
                    .expect("spawn the log writer thread");
                Some(writer)
            }
        };
        LogStore {
            wal,
            reader,
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
                let mut wal = self.wal.lock().expect("wal lock");
                match job {
                    Job::Append { entries, done } => commit_appends(
                        &mut wal,
                        &self.pending,
                        &self.metrics,
                        vec![(entries, done)],
                    ),
                    Job::Other { op, done } => run_other(&mut wal, op, done),
                }
                Ok(())
            }
        }
    }

    /// Runs `op` durably, after every write queued before it.
    async fn durable(
        &self,
        op: impl FnOnce(&mut Wal) -> Result<(), WalError> + Send + 'static,
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
    wal: &Weak<Mutex<Wal>>,
    pending: &RwLock<BTreeMap<u64, Entry>>,
    metrics: &StorageMetrics,
    jobs: mpsc::Receiver<Job>,
) {
    while let Ok(first) = jobs.recv() {
        let Some(wal) = wal.upgrade() else { return };
        let mut wal = wal.lock().expect("wal lock");
        match first {
            Job::Other { op, done } => run_other(&mut wal, op, done),
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
                commit_appends(&mut wal, pending, metrics, group);
                if let Some(Job::Other { op, done }) = next_other {
                    run_other(&mut wal, op, done);
                }
            }
        }
    }
}

fn run_other(wal: &mut Wal, op: DurableOp, done: oneshot::Sender<Result<(), String>>) {
    let r = op(wal).and_then(|()| wal.sync());
    let _ = done.send(r.map_err(|e| e.to_string()));
}

/// Writes a group of appends and syncs once, then tells openraft.
fn commit_appends(
    wal: &mut Wal,
    pending: &RwLock<BTreeMap<u64, Entry>>,
    metrics: &StorageMetrics,
    group: Group,
) {
    let started = std::time::Instant::now();
    let entries: Vec<(LogId, &[u8])> = group
        .iter()
        .flat_map(|(entries, _)| entries.iter().map(|(id, b)| (*id, b.as_slice())))
        .collect();
    let written = wal.append(&entries);
    if written.is_ok() {
        // Written now (durable or not, readers find these in the files).
        let mut p = pending.write().expect("pending lock");
        for (log_id, _) in &entries {
            // Only if not replaced meanwhile (truncate + re-append).
            if p.get(&log_id.index).is_some_and(|e| e.log_id == *log_id) {
                p.remove(&log_id.index);
            }
        }
    }
    let r = written.and_then(|()| wal.sync());
    let took = started.elapsed();
    metrics.log_flushed(group.len(), took);
    tracing::trace!(
        appends = group.len(),
        micros = took.as_micros() as u64,
        "log group commit"
    );
    for (_, done) in group {
        match &r {
            Ok(()) => done.log_io_completed(Ok(())),
            Err(e) => done.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
    }
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
        let reader = self.reader.clone();
        let written = blocking(self.io, move || {
            let raw = reader
                .read_range((start, end))
                .map_err(|e| StorageIOError::read_logs(any(e)))?;
            raw.into_iter()
                .map(|(_, bytes)| {
                    postcard::from_bytes::<Entry>(&bytes)
                        .map_err(|e| StorageIOError::read_logs(any(e)).into())
                })
                .collect::<Result<Vec<Entry>, StorageError>>()
        })
        .await?;
        for entry in written {
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
        let last_purged = self.reader.purged();
        let last_log_id = pending_last.max(self.reader.last()).or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.durable(move |wal| wal.save_vote(&vote))
            .await
            .map_err(|e| StorageIOError::write_vote(AnyError::error(e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.reader.vote())
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
        self.durable(move |wal| wal.truncate(index))
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
                let commit = || -> Result<(), redb::Error> {
                    let mut txn = sm_db.begin_write()?;
                    txn.set_durability(Durability::Immediate)?;
                    txn.commit()?;
                    Ok(())
                };
                commit().map_err(|e| StorageIOError::write_state_machine(any(e)).into())
            })
            .await?;
        }
        let index = log_id.index;
        self.durable(move |wal| wal.purge(log_id))
            .await
            .map_err(write_err)?;
        self.pending
            .write()
            .expect("pending lock")
            .retain(|i, _| *i > index);
        Ok(())
    }
}
