//! The Raft log and vote, in the log's own files (see `wal`).
//!
//! All log writes go through one dedicated writer thread, in order (in the simulation, a task
//! on its one thread). `append` makes the entries
//! readable at once (the in-memory [`LogTail`]), queues them and returns; the writer drains
//! everything queued, writes it as records and syncs once (one `fdatasync` for many appends:
//! group commit), then signals openraft that those entries are durable. openraft's core never
//! waits for a disk.
//!
//! Readers look at the tail first and the files second: an entry leaves the tail only after it
//! is written, so it is always in one of them. The tail also keeps the newest written entries
//! (up to a [`TailBudget`]): openraft reads back what was just appended to apply and
//! replicate it, and those reads then need neither a file read nor a thread hop. Truncate,
//! purge and vote saves are rare; they are queued behind earlier appends and awaited.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{mpsc, Arc, Mutex, RwLock, Weak};

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::RaftLogReader;
use redb::Durability;
use tokio::sync::oneshot;

use super::state_db::StateDb;
use super::wal::{Wal, WalError, WalReader};
use super::{blocking, encode, io_error, IoMode};
use crate::metrics::StorageMetrics;
use crate::raft_types::{Entry, LogId, TypeConfig, Vote};

/// How long a purge waits for the state machine to apply what it purges (see `purge`).
const PURGE_WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);
const PURGE_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// Benchmarks only: how much longer every group commit of the log writer thread takes
/// (`ASPEN_UNSAFE_SLOW_DISK_MS`), to stand for a disk whose flush is slow (an SD card, a
/// network volume) on a machine whose own disk is fast. Read once; unset, nothing changes.
/// Never applied by the simulation's writer (a task on its one thread, which it would stall).
static SLOW_DISK: std::sync::LazyLock<Option<std::time::Duration>> =
    std::sync::LazyLock::new(|| {
        match slow_disk_from(std::env::var("ASPEN_UNSAFE_SLOW_DISK_MS").ok().as_deref()) {
            Ok(Some(d)) => {
                tracing::warn!("ASPEN_UNSAFE_SLOW_DISK_MS: every log flush takes {d:?} longer");
                Some(d)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!("ASPEN_UNSAFE_SLOW_DISK_MS ignored: {e}");
                None
            }
        }
    });

/// Longest extra flush time `ASPEN_UNSAFE_SLOW_DISK_MS` may ask for.
const MAX_SLOW_DISK_MS: u64 = 10_000;

fn slow_disk_from(value: Option<&str>) -> Result<Option<std::time::Duration>, String> {
    let Some(value) = value else { return Ok(None) };
    let ms: u64 = value
        .trim()
        .parse()
        .map_err(|e| format!("{value:?} is not a number of milliseconds: {e}"))?;
    if ms > MAX_SLOW_DISK_MS {
        return Err(format!(
            "{ms} ms is over the limit of {MAX_SLOW_DISK_MS} ms"
        ));
    }
    Ok((ms > 0).then(|| std::time::Duration::from_millis(ms)))
}

/// Most queued appends one group commit takes.
const MAX_GROUP_COMMIT: usize = 256;

/// How many written entries the [`LogTail`] keeps in memory (entries not yet written are
/// always kept, whatever their size). Beyond it the oldest go, newest kept.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TailBudget {
    /// Encoded bytes.
    pub bytes: usize,
    pub entries: usize,
}

/// A node's: covers what followers a little behind and the state machine read back.
pub(crate) const NODE_TAIL: TailBudget = TailBudget {
    bytes: 8 << 20,
    entries: 8192,
};

/// The simulation's: a few entries, so reads from the files happen all the time there.
pub(crate) const SIMULATION_TAIL: TailBudget = TailBudget {
    bytes: 2048,
    entries: 4,
};

/// A durable change other than an append, run on the writer thread (then synced).
type DurableOp = Box<dyn FnOnce(&mut Wal) -> Result<(), WalError> + Send>;

enum Job {
    Append {
        entries: Vec<(LogId, Vec<u8>)>,
        done: IOFlushed<TypeConfig>,
        /// When it was handed to the writer (for the writer's queue-wait figure).
        queued: std::time::Instant,
    },
    /// Any other durable change, run in order with appends.
    Other {
        op: DurableOp,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// The newest entries of the log, decoded.
///
/// Invariants: the entries are consecutive and, when there are any, end at the log's last
/// entry (appends add at the end, truncation cuts the end off in the files too, purges and
/// evictions only remove from the front); an entry not yet written to the files is always
/// here. So a read starting at or after the first entry here is answered from here alone.
struct LogTail {
    /// By index: the entry, its encoded size, whether it is written to the files.
    entries: BTreeMap<u64, (Entry, usize, bool)>,
    /// Encoded bytes of the entries here.
    bytes: usize,
    budget: TailBudget,
}

impl LogTail {
    fn new(budget: TailBudget) -> Self {
        LogTail {
            entries: BTreeMap::new(),
            bytes: 0,
            budget,
        }
    }

    fn first(&self) -> Option<u64> {
        self.entries.keys().next().copied()
    }

    fn last(&self) -> Option<LogId> {
        self.entries.values().next_back().map(|(e, _, _)| e.log_id)
    }

    fn append(&mut self, entry: Entry, size: usize) {
        let index = entry.log_id.index;
        debug_assert!(
            self.entries
                .keys()
                .next_back()
                .is_none_or(|last| last + 1 == index),
            "log tail: entry {index} does not follow {:?}",
            self.entries.keys().next_back()
        );
        self.bytes += size;
        if let Some((_, old, _)) = self.entries.insert(index, (entry, size, false)) {
            self.bytes -= old;
        }
        self.evict();
    }

    /// Marks `written` as in the files (unless replaced meanwhile by truncate and re-append).
    fn written(&mut self, written: &[LogId]) {
        for log_id in written {
            if let Some((e, _, w)) = self.entries.get_mut(&log_id.index) {
                if e.log_id == *log_id {
                    *w = true;
                }
            }
        }
        self.evict();
    }

    /// Drops the oldest written entries while over the budget, always keeping the newest.
    fn evict(&mut self) {
        while self.entries.len() > 1
            && (self.bytes > self.budget.bytes || self.entries.len() > self.budget.entries)
        {
            match self.entries.first_entry() {
                Some(first) if first.get().2 => {
                    self.bytes -= first.remove().1;
                }
                _ => break,
            }
        }
    }

    /// Keeps only the entries `keep` accepts.
    fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        let bytes = &mut self.bytes;
        self.entries.retain(|i, (_, size, _)| {
            let kept = keep(*i);
            if !kept {
                *bytes -= *size;
            }
            kept
        });
    }

    /// The entries here in `range`.
    fn range(&self, range: (Bound<u64>, Bound<u64>)) -> BTreeMap<u64, Entry> {
        self.entries
            .range(range)
            .map(|(i, (e, _, _))| (*i, e.clone()))
            .collect()
    }

    /// Whether every existing entry in a range starting at `start` is here.
    fn covers(&self, start: Bound<u64>) -> bool {
        let Some(first) = self.first() else {
            return false;
        };
        match start {
            Bound::Included(s) => s >= first,
            Bound::Excluded(s) => s >= first,
            Bound::Unbounded => false,
        }
    }
}

/// The log store. Cheap to clone; clones share the files, the log tail and the writer thread.
#[derive(Clone)]
pub struct LogStore {
    /// The writing side, kept open while any handle lives (the writer holds it weakly and
    /// is the only one that locks it).
    _wal: Arc<Mutex<Wal>>,
    reader: WalReader,
    /// The state machine's database, made durable before every purge.
    sm_db: Weak<StateDb>,
    /// The newest entries, among them every one not yet written.
    tail: Arc<RwLock<LogTail>>,
    /// Where jobs go.
    writer: Writer,
    io: IoMode,
}

impl LogStore {
    pub(crate) fn new(
        wal: Wal,
        sm_db: Weak<StateDb>,
        io: IoMode,
        tail: TailBudget,
        metrics: Arc<StorageMetrics>,
    ) -> Self {
        let reader = wal.reader();
        let wal = Arc::new(Mutex::new(wal));
        let tail = Arc::new(RwLock::new(LogTail::new(tail)));
        // The writer holds the files weakly: they close when the last store handle drops,
        // even if the writer has not noticed yet.
        let (wal2, tail2, metrics2) = (Arc::downgrade(&wal), tail.clone(), metrics.clone());
        let writer = match io {
            IoMode::Inline => {
                let (writer, jobs) = tokio::sync::mpsc::unbounded_channel();
                tokio::spawn(write_task(wal2, tail2, metrics2, jobs));
                Writer::Task(writer)
            }
            IoMode::Threads => {
                let (writer, jobs) = mpsc::channel();
                std::thread::Builder::new()
                    .name("aspen-log-writer".into())
                    .spawn(move || write_loop(&wal2, &tail2, &metrics2, jobs))
                    .expect("spawn the log writer thread");
                Writer::Thread(writer)
            }
        };
        LogStore {
            _wal: wal,
            reader,
            sm_db,
            tail,
            writer,
            io,
        }
    }

    /// Queues `job` for the writer.
    fn submit(&self, job: Job) -> Result<(), String> {
        let sent = match &self.writer {
            Writer::Thread(w) => w.send(job).is_ok(),
            Writer::Task(w) => w.send(job).is_ok(),
        };
        sent.then_some(())
            .ok_or_else(|| "log writer stopped".to_string())
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

/// Where log jobs go: the writer thread ([`IoMode::Threads`]), or a task on the runtime
/// ([`IoMode::Inline`]: the simulation, where no thread may escape its single thread).
#[derive(Clone)]
enum Writer {
    Thread(mpsc::Sender<Job>),
    Task(tokio::sync::mpsc::UnboundedSender<Job>),
}

/// How long after its first append a simulated group commit runs (simulated time): the
/// stand-in for a disk's write and sync. openraft carries on meanwhile (replicating, counting
/// followers' acknowledgements), as on a node, and a crash in this window loses the appends.
const SIMULATED_FLUSH: std::time::Duration = std::time::Duration::from_millis(1);

/// One append in a group commit: its encoded entries, the callback, when it was queued.
type QueuedAppend = (
    Vec<(LogId, Vec<u8>)>,
    IOFlushed<TypeConfig>,
    std::time::Instant,
);

type Group = Vec<QueuedAppend>;

fn write_loop(
    wal: &Weak<Mutex<Wal>>,
    tail: &RwLock<LogTail>,
    metrics: &StorageMetrics,
    jobs: mpsc::Receiver<Job>,
) {
    while let Ok(first) = jobs.recv() {
        let Some(wal) = wal.upgrade() else { return };
        let mut wal = wal.lock().expect("wal lock");
        match first {
            Job::Other { op, done } => run_other(&mut wal, op, done),
            Job::Append {
                entries,
                done,
                queued,
            } => {
                let (group, next_other) =
                    take_group((entries, done, queued), || jobs.try_recv().ok());
                commit_appends(&mut wal, tail, metrics, group, true);
                if let Some(Job::Other { op, done }) = next_other {
                    run_other(&mut wal, op, done);
                }
            }
        }
    }
}

/// A group commit: `first` and the appends queued right behind it (from `next`, which
/// returns `None` once the queue is empty), up to [`MAX_GROUP_COMMIT`]; and the other job
/// that ended it, to run right after.
fn take_group(first: QueuedAppend, mut next: impl FnMut() -> Option<Job>) -> (Group, Option<Job>) {
    let mut group = vec![first];
    while group.len() < MAX_GROUP_COMMIT {
        match next() {
            Some(Job::Append {
                entries,
                done,
                queued,
            }) => group.push((entries, done, queued)),
            other => return (group, other),
        }
    }
    (group, None)
}

/// The simulation's writer: [`write_loop`] as a task, each group commit [`SIMULATED_FLUSH`]
/// after its first append.
async fn write_task(
    wal: Weak<Mutex<Wal>>,
    tail: Arc<RwLock<LogTail>>,
    metrics: Arc<StorageMetrics>,
    mut jobs: tokio::sync::mpsc::UnboundedReceiver<Job>,
) {
    let mut next = None;
    loop {
        let job = match next.take() {
            Some(job) => job,
            None => match jobs.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        match job {
            Job::Other { op, done } => {
                let Some(wal) = wal.upgrade() else { return };
                let mut wal = wal.lock().expect("wal lock");
                run_other(&mut wal, op, done);
            }
            Job::Append {
                entries,
                done,
                queued,
            } => {
                tokio::time::sleep(SIMULATED_FLUSH).await;
                let group;
                (group, next) = take_group((entries, done, queued), || jobs.try_recv().ok());
                let Some(wal) = wal.upgrade() else { return };
                let mut wal = wal.lock().expect("wal lock");
                commit_appends(&mut wal, &tail, &metrics, group, false);
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
    tail: &RwLock<LogTail>,
    metrics: &StorageMetrics,
    group: Group,
    on_writer_thread: bool,
) {
    let started = std::time::Instant::now();
    for (_, _, queued) in &group {
        metrics.log_queued(started.saturating_duration_since(*queued));
    }
    let entries: Vec<(LogId, &[u8])> = group
        .iter()
        .flat_map(|(entries, _, _)| entries.iter().map(|(id, b)| (*id, b.as_slice())))
        .collect();
    let written = wal.append(&entries);
    if written.is_ok() {
        // Written now (durable or not, readers find these in the files).
        let ids: Vec<LogId> = entries.iter().map(|(id, _)| *id).collect();
        tail.write().expect("log tail lock").written(&ids);
    }
    let r = written.and_then(|()| wal.sync());
    if on_writer_thread {
        if let Some(delay) = *SLOW_DISK {
            std::thread::sleep(delay);
        }
    }
    let took = started.elapsed();
    if r.is_ok() {
        // openraft commits and applies these next.
        super::activity::progressed();
    }
    metrics.log_flushed(group.len(), took);
    tracing::trace!(
        appends = group.len(),
        micros = took.as_micros() as u64,
        "log group commit"
    );
    for (_, done, _) in group {
        match &r {
            Ok(()) => done.io_completed(Ok(())),
            Err(e) => done.io_completed(Err(std::io::Error::other(e.to_string()))),
        }
    }
}

/// The state machine's last applied index, as committed (durably or not) in its database.
fn applied_index(sm_db: &StateDb) -> Result<Option<u64>, redb::Error> {
    let txn = sm_db.begin_read()?;
    let meta = txn.open_table(super::SM_META)?;
    let Some(bytes) = meta.get("last_applied")? else {
        return Ok(None);
    };
    let applied: Option<LogId> = postcard::from_bytes(bytes.value())
        .map_err(|e| redb::Error::Corrupted(format!("state machine metadata: {e}")))?;
    Ok(applied.map(|l| l.index))
}

fn write_err(e: String) -> std::io::Error {
    io_error("write the Raft log", e)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> std::io::Result<Vec<Entry>> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        // The tail first (see the module docs for why this order never misses an entry).
        let mut found: BTreeMap<u64, Entry> = {
            let tail = self.tail.read().expect("log tail lock");
            let found = tail.range((start, end));
            if tail.covers(start) {
                return Ok(found.into_values().collect());
            }
            found
        };
        let reader = self.reader.clone();
        let written = blocking(self.io, move || {
            let raw = reader
                .read_range((start, end))
                .map_err(|e| io_error("read the Raft log", e))?;
            raw.into_iter()
                .map(|(_, bytes)| {
                    postcard::from_bytes::<Entry>(&bytes)
                        .map_err(|e| io_error("decode a Raft log entry", e))
                })
                .collect::<std::io::Result<Vec<Entry>>>()
        })
        .await?;
        for entry in written {
            found.entry(entry.log_id.index).or_insert(entry);
        }
        Ok(found.into_values().collect())
    }

    async fn read_vote(&mut self) -> std::io::Result<Option<Vote>> {
        Ok(self.reader.vote())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> std::io::Result<LogState<TypeConfig>> {
        let tail_last = self.tail.read().expect("log tail lock").last();
        let last_purged = self.reader.purged();
        let last_log_id = tail_last.max(self.reader.last()).or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> std::io::Result<()> {
        let vote = *vote;
        self.durable(move |wal| wal.save_vote(&vote))
            .await
            .map_err(|e| io_error("save the vote", e))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> std::io::Result<()>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            callback.io_completed(Ok(()));
            return Ok(());
        }
        let encoded: Vec<(LogId, Vec<u8>)> =
            entries.iter().map(|e| (e.log_id, encode(e))).collect();
        {
            let mut tail = self.tail.write().expect("log tail lock");
            for (e, (_, bytes)) in entries.into_iter().zip(&encoded) {
                tail.append(e, bytes.len());
            }
        }
        self.submit(Job::Append {
            entries: encoded,
            done: callback,
            queued: std::time::Instant::now(),
        })
        .map_err(write_err)
    }

    async fn truncate_after(&mut self, last: Option<LogId>) -> std::io::Result<()> {
        // Everything after `last` goes: from its successor on (all of it when `None`).
        let index = last.map_or(0, |l| l.index + 1);
        self.tail
            .write()
            .expect("log tail lock")
            .retain(|i| i < index);
        self.durable(move |wal| wal.truncate(index))
            .await
            .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> std::io::Result<()> {
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
                    applied_index(&db).map_err(|e| io_error("read the state machine", e))
                })
                .await?;
                if applied.is_some_and(|a| a >= log_id.index) {
                    break;
                }
                if started.elapsed() > PURGE_WAIT_LIMIT {
                    return Err(io_error(
                        "purge the Raft log",
                        format!(
                            "cannot purge up to {}: the state machine applied only {applied:?}",
                            log_id.index
                        ),
                    ));
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
                commit().map_err(|e| io_error("make the state machine durable", e))
            })
            .await?;
        }
        let index = log_id.index;
        self.durable(move |wal| wal.purge(log_id))
            .await
            .map_err(write_err)?;
        self.tail
            .write()
            .expect("log tail lock")
            .retain(|i| i > index);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::EntryPayload;
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_slow_disk_switch_takes_milliseconds_and_refuses_the_rest() {
        use std::time::Duration;
        assert_eq!(slow_disk_from(None), Ok(None));
        assert_eq!(slow_disk_from(Some("0")), Ok(None));
        assert_eq!(
            slow_disk_from(Some(" 2 ")),
            Ok(Some(Duration::from_millis(2)))
        );
        assert!(slow_disk_from(Some("2ms"))
            .unwrap_err()
            .contains("not a number"));
        assert!(slow_disk_from(Some("10001")).unwrap_err().contains("limit"));
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Appends entries of these encoded sizes.
        Append(Vec<usize>),
        /// The writer wrote the oldest this many entries not yet written.
        Write(usize),
        /// A write of entries replaced meanwhile (same index, older term) comes back.
        WriteReplaced(usize),
        Truncate(usize),
        Purge(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => prop::collection::vec(1usize..1500, 1..4).prop_map(Op::Append),
            4 => (0usize..6).prop_map(Op::Write),
            1 => (0usize..6).prop_map(Op::WriteReplaced),
            1 => (0usize..4).prop_map(Op::Truncate),
            1 => (0usize..6).prop_map(Op::Purge),
        ]
    }

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: crate::raft_types::log_id(term, 1, index),
            payload: EntryPayload::Blank,
        }
    }

    proptest! {
        /// Against a model of the log (each entry written or not): the tail always holds every
        /// unwritten entry, is consecutive and ends at the log's last entry, counts its bytes,
        /// keeps to its budget where it may, and answers exactly the log for reads it covers.
        #[test]
        fn the_tail_holds_every_unwritten_entry_and_answers_what_it_covers(
            ops in prop::collection::vec(op(), 1..80),
            start in 0u64..40,
        ) {
            let budget = TailBudget { bytes: 3000, entries: 3 };
            let mut tail = LogTail::new(budget);
            // The log: (log id, written), consecutive from `first`.
            let mut log: Vec<(LogId, bool)> = Vec::new();
            let mut first = 1u64;
            let mut term = 1u64;
            for op in ops {
                match op {
                    Op::Append(sizes) => {
                        for size in sizes {
                            let index = first + log.len() as u64;
                            tail.append(entry(term, index), size);
                            log.push((entry(term, index).log_id, false));
                        }
                    }
                    Op::Write(n) => {
                        let ids: Vec<LogId> = log
                            .iter_mut()
                            .filter(|(_, w)| !*w)
                            .take(n)
                            .map(|(id, w)| {
                                *w = true;
                                *id
                            })
                            .collect();
                        tail.written(&ids);
                    }
                    Op::WriteReplaced(n) => {
                        let ids: Vec<LogId> = log
                            .iter()
                            .filter(|(id, w)| !*w && id.leader_id.term > 1)
                            .take(n)
                            .map(|(id, _)| entry(id.leader_id.term - 1, id.index).log_id)
                            .collect();
                        tail.written(&ids);
                    }
                    Op::Truncate(n) => {
                        let keep = log.len().saturating_sub(n);
                        let from = first + keep as u64;
                        log.truncate(keep);
                        tail.retain(|i| i < from);
                        term += 1;
                    }
                    Op::Purge(n) => {
                        let n = n.min(log.len());
                        let upto = first + n as u64;
                        log.drain(..n);
                        first = upto;
                        tail.retain(|i| i >= upto);
                    }
                }
                let held: Vec<(u64, LogId, bool)> = tail
                    .entries
                    .iter()
                    .map(|(i, (e, _, w))| (*i, e.log_id, *w))
                    .collect();
                for (i, (id, written)) in log.iter().enumerate() {
                    let index = first + i as u64;
                    prop_assert_eq!(id.index, index);
                    let here = held.iter().find(|(i, _, _)| *i == index);
                    if !written {
                        prop_assert!(here.is_some_and(|(_, h, w)| h == id && !w), "unwritten {index} lost");
                    }
                    if let Some((_, h, w)) = here {
                        prop_assert_eq!(h, id);
                        prop_assert!(!w || *written, "{index} marked written but is not");
                    }
                }
                if let (Some(f), Some(l)) = (held.first(), held.last()) {
                    prop_assert_eq!(l.0 - f.0 + 1, held.len() as u64, "not consecutive");
                    prop_assert_eq!(Some(l.1), log.last().map(|(id, _)| *id), "tail does not end at the log's end");
                    prop_assert!(f.0 >= first);
                }
                prop_assert_eq!(tail.bytes, tail.entries.values().map(|(_, s, _)| s).sum::<usize>());
                if tail.entries.len() > 1 && (tail.bytes > budget.bytes || tail.entries.len() > budget.entries) {
                    prop_assert!(!held[0].2, "over budget with a written oldest entry");
                }
                if tail.covers(Bound::Included(start)) {
                    let from_tail: Vec<LogId> = tail
                        .range((Bound::Included(start), Bound::Unbounded))
                        .values()
                        .map(|e| e.log_id)
                        .collect();
                    let from_log: Vec<LogId> = log
                        .iter()
                        .filter(|(id, _)| id.index >= start)
                        .map(|(id, _)| *id)
                        .collect();
                    prop_assert_eq!(from_tail, from_log);
                }
            }
        }
    }
}
