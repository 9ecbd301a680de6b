//! The state machine: applies committed batches to the MVCC key space, serves reads, builds and
//! installs snapshots.
//!
//! Apply is deterministic: it reads only the entry (including the leader's timestamp) and the
//! tables, never a clock or an RNG. Applies commit with `Durability::None` (see the module docs
//! of `storage` for why that is safe), and answer just before they commit (see `state_db`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use futures::TryStreamExt;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use redb::{Durability, ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::key_index::KeyIndex;
use super::leases::{self, StoredLease, LEASES, LEASE_KEYS};
use super::snapshot::{self, SnapshotFile};
use super::state_db::StateDb;
use super::{
    blocking, encode, io_error, IoMode, REVISIONS, SESSIONS, SESSION_FLOORS, SESSION_IDLE,
    SESSION_SEEN, SM_META, SYSTEM,
};
use crate::api::*;
use crate::lessor::Lessor;
use crate::limits::{
    MAX_BATCH_COMMANDS, MAX_COMPARE_RANGE_KEYS, MAX_KEYS_PER_LEASE, MAX_LEASES, MAX_RANGE_BYTES,
    MAX_RANGE_LIMIT, MAX_SESSION_EXPIRIES_PER_BATCH, MAX_SESSION_WINDOW, SESSION_IDLE_EXPIRY_MS,
};
use crate::raft_types::{Entry, LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig};

/// A key's value and metadata as stored in `kv_revisions` (as `Some`; `None` is a delete).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredKv {
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub version: u64,
    pub lease: u64,
}

impl StoredKv {
    pub(crate) fn into_kv(self, key: Key) -> KeyValue {
        KeyValue {
            key,
            value: self.value,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        }
    }
}

/// A summary of the state machine, for `cluster status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStatus {
    pub last_applied: Option<LogId>,
    pub revision: Revision,
    pub compacted: Revision,
}

/// The state machine store. Cheap to clone: openraft owns one clone, the node keeps another
/// for reads.
#[derive(Clone)]
pub struct StateMachineStore {
    pub(super) db: Arc<StateDb>,
    /// Each key's revisions (see `key_index` for how readers and apply share it).
    pub(super) index: Arc<RwLock<KeyIndex>>,
    /// Shared, not copied: the store is cloned for every apply.
    snapshot_dir: Arc<std::path::Path>,
    /// Proposals this node waits for, by [`Batch::proposal`].
    waiters: Arc<std::sync::Mutex<HashMap<u128, oneshot::Sender<Vec<CommandResult>>>>>,
    io: IoMode,
    /// Applies so far (each `SM_DURABLE_EVERY`-th commits durably).
    applies: Arc<std::sync::atomic::AtomicU64>,
    /// Watchers of system key prefixes (see [`Self::watch_system_prefix`]).
    system_watches: Arc<std::sync::Mutex<Vec<SystemWatch>>>,
    /// The revision after the last apply (see [`Self::watch_revision`]).
    revision: Arc<tokio::sync::watch::Sender<Revision>>,
    /// Which leases exist, and on the leader when they run out.
    lessor: Arc<Lessor>,
    /// The last revisions' events, for caught-up watchers.
    pub(super) recent: Arc<super::recent::RecentChanges>,
    /// Log flush and apply figures (shared with the log store).
    metrics: Arc<crate::metrics::StorageMetrics>,
}

/// What apply did to leases, told to the [`Lessor`] once the batch committed.
#[derive(Debug)]
enum LeaseChange {
    Granted {
        id: LeaseId,
        ttl_secs: u64,
        grant: u64,
    },
    Removed(LeaseId),
}

/// A plain put's options: no lease (a key put without one leaves its old lease).
const NO_PUT_OPTIONS: PutOptions = PutOptions {
    lease: 0,
    ignore_value: false,
    ignore_lease: false,
};

/// Most system prefix watches one store keeps (each is checked on every apply).
pub const MAX_SYSTEM_WATCHES: usize = 16;

struct SystemWatch {
    prefix: Vec<u8>,
    changes: tokio::sync::watch::Sender<u64>,
}

/// The system keys (and key prefixes) one batch writes, noted before the batch moves into
/// the apply and matched against the watches once it has committed: a watch made while the
/// batch was being applied is matched too (its owner may have read the state just before the
/// batch committed, and must learn of it).
#[derive(Debug, Default)]
struct SystemWrites {
    keys: Vec<Vec<u8>>,
    prefixes: Vec<Vec<u8>>,
}

impl SystemWrites {
    fn of(entries: &[Entry]) -> SystemWrites {
        let mut writes = SystemWrites::default();
        let ops = entries.iter().flat_map(|e| match &e.payload {
            EntryPayload::Normal(b) => b.commands.as_slice(),
            _ => &[],
        });
        for c in ops {
            match &c.op {
                WriteOp::System(w) => writes.keys.push(w.key.clone()),
                WriteOp::SystemTxn(t) => {
                    for w in &t.writes {
                        match w {
                            SystemOp::Put { key, .. } | SystemOp::Delete { key } => {
                                writes.keys.push(key.clone())
                            }
                            SystemOp::DeletePrefix { prefix } => {
                                writes.prefixes.push(prefix.clone())
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        writes
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.prefixes.is_empty()
    }

    /// Whether a key under `prefix` may have been written.
    fn touch(&self, prefix: &[u8]) -> bool {
        self.keys.iter().any(|k| k.starts_with(prefix))
            || self
                .prefixes
                .iter()
                .any(|p| p.starts_with(prefix) || prefix.starts_with(p))
    }
}

type SmResult<T> = Result<T, redb::Error>;

fn meta_get<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> SmResult<Option<T>> {
    match table.get(key)? {
        None => Ok(None),
        Some(v) => Ok(Some(postcard::from_bytes(v.value()).map_err(corrupt)?)),
    }
}

fn corrupt(e: postcard::Error) -> redb::Error {
    redb::Error::Corrupted(format!("undecodable stored value: {e}"))
}

impl StateMachineStore {
    /// Applies committed entries, in order, in one transaction, and returns each entry's
    /// response. What openraft's `apply` runs; tests and benchmarks call it directly.
    pub async fn apply_committed(
        &mut self,
        entries: Vec<Entry>,
    ) -> std::io::Result<Vec<BatchResponse>> {
        let proposals: Vec<(u128, usize)> = entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match &e.payload {
                EntryPayload::Normal(b) if b.proposal != 0 => Some((b.proposal, i)),
                _ => None,
            })
            .collect();
        let db = self.db.clone();
        let n = self
            .applies
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let writes = SystemWrites::of(&entries);
        let (entry_count, command_count) = (
            entries.len() as u64,
            entries
                .iter()
                .map(|e| match &e.payload {
                    EntryPayload::Normal(b) => b.commands.len() as u64,
                    _ => 0,
                })
                .sum::<u64>(),
        );
        let started = std::time::Instant::now();
        let index = self.index.clone();
        let metrics = self.metrics.clone();
        let store = self.clone();
        // Told before the commit, on the apply's thread (see `StateDb`): proposers hear
        // back, and watchers, the lessor and system-key watches learn what changed.
        let answer = move |applied: &mut Applied| store.publish(applied, &writes, &proposals);
        let applied = blocking(self.io, move || {
            // Its proposers are answered at the end of this.
            super::activity::progressed();
            metrics
                .apply_queue_seconds
                .observe(started.elapsed().as_secs_f64());
            apply_entries(&db, &index, n, entries, answer).map_err(|e| {
                // The index may hold writes that never committed: rebuild it from what did.
                match load_index(&db) {
                    Ok(fresh) => *index.write().expect("key index lock") = fresh,
                    Err(e) => tracing::error!("cannot rebuild the key index: {e}"),
                }
                io_error("apply to the state machine", e)
            })
        })
        .await?;
        self.metrics
            .apply_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.applied_entries.inc_by(entry_count);
        self.metrics.applied_commands.inc_by(command_count);
        Ok(applied.responses)
    }

    /// Makes an apply's effects known, in the order readers rely on: the recent changes
    /// before the revision that wakes watchers; system-key watches and the lessor; then the
    /// local proposers (not waiting for openraft). Runs just before the apply's commit, with
    /// read transactions held off until it has committed (`StateDb::answer_then_commit`).
    fn publish(&self, applied: &mut Applied, writes: &SystemWrites, proposals: &[(u128, usize)]) {
        self.recent.applied(
            applied.revision_before,
            applied.revision,
            applied.compacted,
            std::mem::take(&mut applied.revisions),
        );
        if !writes.is_empty() {
            self.notify_system_watches(Some(writes));
        }
        let lease_changes = std::mem::take(&mut applied.lease_changes);
        if !lease_changes.is_empty() {
            self.tell_lessor(lease_changes);
        }
        self.publish_revision(applied.revision);
        if !proposals.is_empty() {
            self.notify_applied(proposals, &applied.responses);
        }
    }

    /// A new file to receive a snapshot into, in this store's snapshot directory. The network
    /// fills it, then hands it to [`openraft::Raft::install_full_snapshot`].
    pub async fn begin_receiving_snapshot(&self) -> std::io::Result<SnapshotFile> {
        SnapshotFile::create_receiving(&self.snapshot_dir, self.io)
            .await
            .map_err(|e| io_error("create a snapshot file", e))
    }

    pub(crate) fn new(
        db: Arc<StateDb>,
        snapshot_dir: PathBuf,
        io: IoMode,
    ) -> Result<Self, redb::Error> {
        let index = Arc::new(RwLock::new(load_index(&db)?));
        let revision = current_revision(&db).unwrap_or(0);
        let recent = Arc::new(super::recent::RecentChanges::default());
        recent.reset(revision, compaction_point(&db).unwrap_or(0));
        let lessor = Arc::new(Lessor::default());
        match leases::all(&db) {
            Ok(all) => lessor.reset(all, tokio::time::Instant::now()),
            Err(e) => tracing::error!("cannot load leases: {e}"),
        }
        Ok(StateMachineStore {
            db,
            index,
            snapshot_dir: snapshot_dir.into(),
            waiters: Default::default(),
            io,
            applies: Default::default(),
            system_watches: Default::default(),
            revision: Arc::new(tokio::sync::watch::channel(revision).0),
            lessor,
            recent,
            metrics: Default::default(),
        })
    }

    /// The store's metrics (log flushes and applies), for the node to register and serve.
    pub fn metrics(&self) -> Arc<crate::metrics::StorageMetrics> {
        self.metrics.clone()
    }

    /// The lease clock (see [`Lessor`]): the node promotes it when it becomes leader, renews
    /// leases on keep-alives and proposes expiries from it.
    pub fn lessor(&self) -> Arc<Lessor> {
        self.lessor.clone()
    }

    /// One lease, with its attached keys when `keys`. Reads local state, like [`Self::range`].
    pub async fn lease(&self, id: LeaseId, keys: bool) -> Result<Option<LeaseRecord>, ReadError> {
        let db = self.db.clone();
        self.io
            .run(move || leases::read(&db, id, keys))
            .await
            .map_err(|e| ReadError::Storage(e.to_string()))?
    }

    /// Lease ids after `after`, at most `limit`, and whether more remain.
    pub async fn leases(
        &self,
        after: LeaseId,
        limit: usize,
    ) -> Result<(Vec<LeaseId>, bool), ReadError> {
        let db = self.db.clone();
        self.io
            .run(move || leases::list(&db, after, limit))
            .await
            .map_err(|e| ReadError::Storage(e.to_string()))?
    }

    fn tell_lessor(&self, changes: Vec<LeaseChange>) {
        let now = tokio::time::Instant::now();
        for change in changes {
            match change {
                LeaseChange::Granted {
                    id,
                    ttl_secs,
                    grant,
                } => self.lessor.granted(id, ttl_secs, grant, now),
                LeaseChange::Removed(id) => self.lessor.removed(id),
            }
        }
    }

    /// A receiver of the store's revision, updated after every apply and snapshot install
    /// that moved it: a watcher waits on it, then reads what changed ([`Self::changes`]).
    pub fn watch_revision(&self) -> tokio::sync::watch::Receiver<Revision> {
        self.revision.subscribe()
    }

    fn publish_revision(&self, now: Revision) {
        self.revision.send_if_modified(|r| {
            let moved = *r != now;
            *r = now;
            moved
        });
    }

    /// One page of what changed in a key range from a revision on (see
    /// [`ChangesRequest`]). Reads local state, like [`Self::range`].
    pub async fn changes(&self, req: ChangesRequest) -> Result<ChangesPage, ReadError> {
        // A caught-up watcher's page is usually in memory.
        if let Some(page) = self.recent.read(&req) {
            return Ok(page);
        }
        let (db, index) = (self.db.clone(), self.index.clone());
        self.io
            .run(move || super::changes::read(&db, &index, &req))
            .await
            .map_err(|e| ReadError::Storage(e.to_string()))?
    }

    /// A receiver whose value changes after every applied batch (and every installed
    /// snapshot) that may have written a system key under `prefix`, so a node's background
    /// loop can react to replicated state at once instead of polling. Wakes can be spurious
    /// (a conditional write that did not apply). Panics past `MAX_SYSTEM_WATCHES` (16): watches
    /// are made once per node loop, not per request.
    pub fn watch_system_prefix(&self, prefix: &[u8]) -> tokio::sync::watch::Receiver<u64> {
        let mut watches = self.system_watches.lock().expect("watches lock");
        assert!(
            watches.len() < MAX_SYSTEM_WATCHES,
            "at most {MAX_SYSTEM_WATCHES} system prefix watches"
        );
        let (changes, rx) = tokio::sync::watch::channel(0);
        watches.push(SystemWatch {
            prefix: prefix.to_vec(),
            changes,
        });
        rx
    }

    /// Bumps the watches whose prefixes `writes` may have written (every watch with
    /// `None`).
    fn notify_system_watches(&self, writes: Option<&SystemWrites>) {
        let watches = self.system_watches.lock().expect("watches lock");
        for w in watches.iter() {
            if writes.is_none_or(|writes| writes.touch(&w.prefix)) {
                w.changes.send_modify(|n| *n += 1);
            }
        }
    }

    /// Resolves with the results of the batch with this proposal id once it is applied (and
    /// so committed, and visible to every read on this node that begins after). Dropped
    /// unanswered if the batch is never applied; call [`Self::forget_proposal`] when no
    /// longer interested.
    pub fn watch_proposal(&self, proposal: u128) -> oneshot::Receiver<Vec<CommandResult>> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .expect("waiters lock")
            .insert(proposal, tx);
        rx
    }

    pub fn forget_proposal(&self, proposal: u128) {
        self.waiters.lock().expect("waiters lock").remove(&proposal);
    }

    fn notify_applied(&self, entries: &[(u128, usize)], responses: &[BatchResponse]) {
        let mut waiters = self.waiters.lock().expect("waiters lock");
        if waiters.is_empty() {
            return;
        }
        for (proposal, i) in entries {
            if let Some(tx) = waiters.remove(proposal) {
                let _ = tx.send(responses[*i].results.clone());
            }
        }
    }

    /// The state machine's redb file (beside the snapshot directory).
    pub fn db_path(&self) -> PathBuf {
        self.snapshot_dir
            .parent()
            .unwrap_or(&*self.snapshot_dir)
            .join(super::STATE_FILE)
    }

    /// Revision, compaction point and last applied log id.
    pub async fn status(&self) -> Result<StoreStatus, ReadError> {
        let db = self.db.clone();
        self.io
            .run(move || -> SmResult<StoreStatus> {
                let txn = db.begin_read()?;
                let meta = txn.open_table(SM_META)?;
                Ok(StoreStatus {
                    last_applied: meta_get(&meta, "last_applied")?.flatten(),
                    revision: meta_get(&meta, "revision")?.unwrap_or(0),
                    compacted: meta_get(&meta, "compacted")?.unwrap_or(0),
                })
            })
            .await
            .map_err(|e| ReadError::Storage(e.to_string()))?
            .map_err(|e| ReadError::Storage(e.to_string()))
    }

    /// Reads a key or a range of keys, at the current or a past revision.
    ///
    /// This reads local state: linearizability is the caller's job (wait until the applied index
    /// reaches the leader's read index first).
    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse, ReadError> {
        req.validate()?;
        let (db, index) = (self.db.clone(), self.index.clone());
        self.io
            .run(move || range_blocking(&db, &index, &req))
            .await
            .map_err(|e| ReadError::Storage(e.to_string()))?
    }

    /// How many keys of the request's range exist at its revision (0: the current one), and
    /// that revision. Counts from the in-memory key index: no values are read. The request's
    /// limit is ignored.
    pub async fn count(&self, req: RangeRequest) -> Result<(u64, Revision), ReadError> {
        req.validate()?;
        let (db, index) = (self.db.clone(), self.index.clone());
        self.io
            .run(move || -> Result<(u64, Revision), ReadError> {
                let storage = |e: redb::Error| ReadError::Storage(e.to_string());
                let index = index.read().expect("key index lock");
                let txn = db.begin_read().map_err(|e| storage(e.into()))?;
                let revision = read_point(&txn, req.revision)?;
                let count = index.count_live_at(&req.start, req.end.as_deref(), revision);
                Ok((count, revision))
            })
            .await
            .map_err(|e| ReadError::Storage(e.to_string()))?
    }

    /// Reads one key (see [`Self::range`]).
    pub async fn get(&self, key: Key, revision: Revision) -> Result<Option<KeyValue>, ReadError> {
        let mut req = RangeRequest::key(key);
        req.revision = revision;
        Ok(self.range(req).await?.kvs.pop())
    }

    /// The value of a system key (see [`SystemWrite`]), from local state. For the node only:
    /// the system key space is never served to clients.
    pub async fn system_get(&self, key: Key) -> Result<Option<Vec<u8>>, ReadError> {
        let db = self.db.clone();
        self.io
            .run(move || -> SmResult<Option<Vec<u8>>> {
                let txn = db.begin_read()?;
                let table = txn.open_table(SYSTEM)?;
                Ok(table.get(key.as_slice())?.map(|v| v.value().to_vec()))
            })
            .await
            .map_err(|e| ReadError::Storage(e.to_string()))?
            .map_err(|e| ReadError::Storage(e.to_string()))
    }

    /// Every system key starting with `prefix`, with its value (at most `limit`).
    pub async fn system_scan(
        &self,
        prefix: Key,
        limit: usize,
    ) -> Result<Vec<(Key, Vec<u8>)>, ReadError> {
        let db = self.db.clone();
        self.io
            .run(move || -> SmResult<Vec<(Key, Vec<u8>)>> {
                let txn = db.begin_read()?;
                let table = txn.open_table(SYSTEM)?;
                let mut out = Vec::new();
                for item in table.range(prefix.as_slice()..)? {
                    let (k, v) = item?;
                    if !k.value().starts_with(&prefix) || out.len() == limit {
                        break;
                    }
                    out.push((k.value().to_vec(), v.value().to_vec()));
                }
                Ok(out)
            })
            .await
            .map_err(|e| ReadError::Storage(e.to_string()))?
            .map_err(|e| ReadError::Storage(e.to_string()))
    }

    /// Runs `read` on a consistent view of the system key space (one read transaction), on
    /// the storage thread. For the node's own subsystems (documents); never served raw to
    /// clients.
    pub async fn system_view<R: Send + 'static>(
        &self,
        read: impl FnOnce(&SystemView) -> Result<R, ReadError> + Send + 'static,
    ) -> Result<R, ReadError> {
        let db = self.db.clone();
        self.io
            .run(move || -> SmResult<Result<R, ReadError>> {
                let txn = db.begin_read()?;
                let view = SystemView {
                    table: txn.open_table(SYSTEM)?,
                };
                Ok(read(&view))
            })
            .await
            .map_err(|e| ReadError::Storage(e.to_string()))?
            .map_err(|e| ReadError::Storage(e.to_string()))?
    }

    /// A digest of everything the state machine holds (key space, history, idempotency
    /// records, revision, compaction point, last applied log id, membership), read in one
    /// transaction. Replicas that applied the same log prefix have equal digests; tests and
    /// operators compare them across nodes.
    pub async fn state_digest(&self) -> Result<StateDigest, ReadError> {
        let (db, index) = (self.db.clone(), self.index.clone());
        self.io
            .run(move || -> SmResult<StateDigest> {
                let (txn, history) = {
                    let index = index.read().expect("key index lock");
                    let txn = db.begin_read()?;
                    let revision = meta_get(&txn.open_table(SM_META)?, "revision")?.unwrap_or(0);
                    (txn, index.history_at(revision))
                };
                let mut hasher = blake3::Hasher::new();
                let mut feed = |table: &str, k: &[u8], v: &[u8]| {
                    for part in [table.as_bytes(), k, v] {
                        hasher.update(&(part.len() as u64).to_le_bytes());
                        hasher.update(part);
                    }
                };
                let meta = txn.open_table(SM_META)?;
                for item in meta.iter()? {
                    let (k, v) = item?;
                    feed("meta", k.value().as_bytes(), v.value());
                }
                let last_applied: Option<LogId> = meta_get(&meta, "last_applied")?.flatten();
                let revision = meta_get(&meta, "revision")?.unwrap_or(0);
                // The same rows in the same order as the key space and history tables of
                // earlier stores: digests stay comparable across the change of layout.
                let revisions = txn.open_table(REVISIONS)?;
                let mut keys = 0;
                for (key, revs) in &history {
                    let newest = revs.last().expect("history_at lists keys with writes");
                    if newest.live {
                        let record = record_bytes(&revisions, newest.revision, key)?;
                        feed("kv", key, &record[1..]);
                        keys += 1;
                    }
                }
                for (key, revs) in &history {
                    for r in revs {
                        let record = record_bytes(&revisions, r.revision, key)?;
                        feed(
                            "history",
                            &[key.as_slice(), &r.revision.to_be_bytes()].concat(),
                            &record,
                        );
                    }
                }
                for item in txn.open_table(SESSIONS)?.iter()? {
                    let (k, v) = item?;
                    let (client, seq) = k.value();
                    let id = [client.to_be_bytes(), seq.to_be_bytes()].concat();
                    feed("sessions", &id, v.value());
                }
                for (name, table) in [("floors", SESSION_FLOORS), ("seen", SESSION_SEEN)] {
                    for item in txn.open_table(table)?.iter()? {
                        let (k, v) = item?;
                        feed(name, &k.value().to_be_bytes(), &v.value().to_be_bytes());
                    }
                }
                for item in txn.open_table(SYSTEM)?.iter()? {
                    let (k, v) = item?;
                    feed("system", k.value(), v.value());
                }
                for item in txn.open_table(LEASES)?.iter()? {
                    let (k, v) = item?;
                    feed("leases", &k.value().to_be_bytes(), v.value());
                }
                for item in txn.open_table(SESSION_IDLE)?.iter()? {
                    let (k, _) = item?;
                    let (ms, client) = k.value();
                    feed(
                        "idle",
                        &[ms.to_be_bytes(), client.to_be_bytes()].concat(),
                        &[],
                    );
                }
                Ok(StateDigest {
                    applied_index: last_applied.map(|l| l.index),
                    revision,
                    keys,
                    hash: *hasher.finalize().as_bytes(),
                })
            })
            .await
            .map_err(|e| ReadError::Storage(e.to_string()))?
            .map_err(|e| ReadError::Storage(e.to_string()))
    }
}

/// The stored bytes of `key`'s record at `revision`, which the key index names (so it exists:
/// its absence is corruption).
pub(super) fn record_bytes(
    table: &impl ReadableTable<(u64, &'static [u8]), &'static [u8]>,
    revision: Revision,
    key: &[u8],
) -> Result<Vec<u8>, redb::Error> {
    match table.get((revision, key))? {
        Some(v) => Ok(v.value().to_vec()),
        None => Err(redb::Error::Corrupted(format!(
            "the key index names revision {revision} of key {key:?}, which is not stored"
        ))),
    }
}

/// [`record_bytes`], decoded.
pub(super) fn record(
    table: &impl ReadableTable<(u64, &'static [u8]), &'static [u8]>,
    revision: Revision,
    key: &[u8],
) -> Result<Option<StoredKv>, redb::Error> {
    postcard::from_bytes(&record_bytes(table, revision, key)?).map_err(corrupt)
}

/// Builds the key index from the store's records.
pub(super) fn load_index(db: &StateDb) -> Result<KeyIndex, redb::Error> {
    let txn = db.begin_read()?;
    match txn.open_table(REVISIONS) {
        Ok(table) => KeyIndex::load(&table),
        // A store not yet written to.
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(KeyIndex::default()),
        Err(e) => Err(e.into()),
    }
}

/// See [`StateMachineStore::state_digest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDigest {
    pub applied_index: Option<u64>,
    pub revision: Revision,
    /// Live keys.
    pub keys: u64,
    /// BLAKE3 over every table, in key order.
    pub hash: [u8; 32],
}

/// The store's compaction point.
fn compaction_point(db: &StateDb) -> SmResult<Revision> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(SM_META)?;
    Ok(meta_get(&meta, "compacted")?.unwrap_or(0))
}

/// The store's current revision (a small read; redb reads never wait for writers).
fn current_revision(db: &StateDb) -> SmResult<Revision> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(SM_META)?;
    Ok(meta_get(&meta, "revision")?.unwrap_or(0))
}

/// The revision a read asks for (0: the current one) in the read transaction `txn`, if it is
/// readable: not above the current revision, not below the compaction point.
fn read_point(txn: &redb::ReadTransaction, requested: Revision) -> Result<Revision, ReadError> {
    let storage = |e: redb::Error| ReadError::Storage(e.to_string());
    let meta = txn.open_table(SM_META).map_err(|e| storage(e.into()))?;
    let current: Revision = meta_get(&meta, "revision").map_err(storage)?.unwrap_or(0);
    let compacted: Revision = meta_get(&meta, "compacted").map_err(storage)?.unwrap_or(0);
    let revision = if requested == 0 { current } else { requested };
    if revision > current {
        return Err(ReadError::FutureRevision {
            requested: revision,
            current,
        });
    }
    if revision < compacted {
        return Err(ReadError::Compacted {
            requested: revision,
            compacted,
        });
    }
    Ok(revision)
}

fn range_blocking(
    db: &StateDb,
    index: &RwLock<KeyIndex>,
    req: &RangeRequest,
) -> Result<RangeResponse, ReadError> {
    let storage = |e: redb::Error| ReadError::Storage(e.to_string());
    let limit = if req.limit == 0 {
        MAX_RANGE_LIMIT
    } else {
        req.limit
    } as usize;
    // Under the index's read lock: the transaction, and which record holds each key's value
    // (one more than the limit, to tell whether there is more).
    let (txn, revision, found) = {
        let index = index.read().expect("key index lock");
        let txn = db.begin_read().map_err(|e| storage(e.into()))?;
        let revision = read_point(&txn, req.revision)?;
        let found = index.live_at(&req.start, req.end.as_deref(), revision, limit + 1);
        (txn, revision, found)
    };
    let table = txn.open_table(REVISIONS).map_err(|e| storage(e.into()))?;
    let mut kvs = Vec::new();
    let mut more = false;
    // Bytes of the page so far: a page stops at MAX_RANGE_BYTES (never empty).
    let mut bytes = 0usize;
    for (key, at) in found {
        let stored = record(&table, at, &key).map_err(storage)?.ok_or_else(|| {
            storage(redb::Error::Corrupted(format!(
                "the key index says key {key:?} lives at revision {at}, which deleted it"
            )))
        })?;
        let size = key.len() + stored.value.len();
        if kvs.len() == limit || (!kvs.is_empty() && bytes + size > MAX_RANGE_BYTES) {
            more = true;
            break;
        }
        bytes += size;
        kvs.push(stored.into_kv(key));
    }
    Ok(RangeResponse {
        kvs,
        more,
        revision,
    })
}

/// A read-only, consistent view of the system key space (see
/// [`StateMachineStore::system_view`]).
pub struct SystemView {
    table: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
}

impl SystemView {
    /// The value of one system key.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ReadError> {
        Ok(self
            .table
            .get(key)
            .map_err(storage_read)?
            .map(|v| v.value().to_vec()))
    }

    /// Calls `visit` with every key starting with `prefix` and its value, in key order, until
    /// `visit` returns false.
    pub fn scan(
        &self,
        prefix: &[u8],
        visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), ReadError> {
        self.scan_from(prefix, prefix, visit)
    }

    /// Like [`Self::scan`], starting at `from` (keys below it are skipped).
    pub fn scan_from(
        &self,
        prefix: &[u8],
        from: &[u8],
        mut visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), ReadError> {
        let from = from.max(prefix);
        for item in self.table.range(from..).map_err(storage_read)? {
            let (k, v) = item.map_err(storage_read)?;
            if !k.value().starts_with(prefix) || !visit(k.value(), v.value()) {
                break;
            }
        }
        Ok(())
    }
}

fn storage_read(e: redb::StorageError) -> ReadError {
    ReadError::Storage(e.to_string())
}

/// Applies committed batches inside one write transaction. Tables are opened once per
/// transaction, not per command.
struct Applier<'t> {
    revisions: redb::Table<'t, (u64, &'static [u8]), &'static [u8]>,
    /// Gains each write as it is made (before the commit; see `key_index`).
    index: &'t RwLock<KeyIndex>,
    /// What compactions dropped, forgotten by the index as the transaction commits.
    compacted_records: Vec<(Revision, Key)>,
    idle: redb::Table<'t, (u64, u64), ()>,
    /// Opened when a command first needs them (writes without a session, which etcd's API
    /// sends, need none of these).
    sessions: LazyTable<'t, (u64, u64), &'static [u8]>,
    floors: LazyTable<'t, u64, u64>,
    seen: LazyTable<'t, u64, u64>,
    system: LazyTable<'t, &'static [u8], &'static [u8]>,
    leases: LazyTable<'t, u64, &'static [u8]>,
    lease_keys: LazyTable<'t, (u64, &'static [u8]), ()>,
    revision: Revision,
    compacted: Revision,
    /// Leases granted so far (numbers each grant).
    lease_grants: u64,
    /// What this transaction did to leases, for the lessor.
    lease_changes: Vec<LeaseChange>,
    /// Every event this transaction applied (with the previous value), for the in-memory
    /// recent changes.
    events: Vec<(Revision, Event)>,
    /// The leader's timestamp of the batch being applied (never a local clock).
    now_ms: u64,
}

/// A table of the apply's transaction, opened on first use (opening one costs: redb checks its
/// stored definition).
struct LazyTable<'t, K: redb::Key + 'static, V: redb::Value + 'static> {
    txn: &'t redb::WriteTransaction,
    definition: redb::TableDefinition<'static, K, V>,
    table: Option<redb::Table<'t, K, V>>,
}

impl<'t, K: redb::Key + 'static, V: redb::Value + 'static> LazyTable<'t, K, V> {
    fn new(
        txn: &'t redb::WriteTransaction,
        definition: redb::TableDefinition<'static, K, V>,
    ) -> Self {
        LazyTable {
            txn,
            definition,
            table: None,
        }
    }

    fn open(&mut self) -> SmResult<&mut redb::Table<'t, K, V>> {
        if self.table.is_none() {
            self.table = Some(self.txn.open_table(self.definition)?);
        }
        Ok(self.table.as_mut().expect("opened above"))
    }
}

impl Applier<'_> {
    /// The current value of `key`, if it exists.
    fn current(&self, key: &[u8]) -> SmResult<Option<StoredKv>> {
        let newest = self
            .index
            .read()
            .expect("key index lock")
            .at(key, Revision::MAX);
        match newest {
            Some(r) if r.live => record(&self.revisions, r.revision, key),
            _ => Ok(None),
        }
    }

    /// Stores `key`'s record at `revision` (`None`: deleted) and indexes it.
    fn write(&mut self, key: &[u8], revision: Revision, stored: Option<&StoredKv>) -> SmResult<()> {
        self.revisions
            .insert((revision, key), encode(&stored).as_slice())?;
        self.index
            .write()
            .expect("key index lock")
            .record(key, revision, stored.is_some());
        Ok(())
    }

    fn apply_command(&mut self, cmd: &Command) -> SmResult<CommandResult> {
        let Some(s) = cmd.session else {
            return self.apply_op(&cmd.op);
        };
        self.touch(s.client_id)?;
        let mut floor = self
            .floors
            .open()?
            .get(s.client_id)?
            .map(|v| v.value())
            .unwrap_or(0);
        if s.acked_below > floor {
            self.sessions.open()?.retain_in(
                (s.client_id, floor)..(s.client_id, s.acked_below),
                |_, _| false,
            )?;
            self.floors.open()?.insert(s.client_id, s.acked_below)?;
            floor = s.acked_below;
        }
        if s.seq < floor {
            return Ok(Err(ApplyError::StaleSequence {
                client_id: s.client_id,
                seq: s.seq,
            }));
        }
        if let Some(prev) = self.sessions.open()?.get((s.client_id, s.seq))? {
            // A retry of a request that was already applied: answer as the first time.
            return postcard::from_bytes(prev.value()).map_err(corrupt);
        }
        if s.seq - floor >= MAX_SESSION_WINDOW {
            return Ok(Err(ApplyError::SessionWindowFull {
                client_id: s.client_id,
                max: MAX_SESSION_WINDOW,
            }));
        }
        let result = self.apply_op(&cmd.op)?;
        self.sessions
            .open()?
            .insert((s.client_id, s.seq), encode(&result).as_slice())?;
        Ok(result)
    }

    /// Records that `client` was active at `now_ms` (coarsely: at most one write per second).
    fn touch(&mut self, client: u64) -> SmResult<()> {
        let old = self.seen.open()?.get(client)?.map(|v| v.value());
        if old.is_some_and(|o| self.now_ms < o.saturating_add(1000)) {
            return Ok(());
        }
        if let Some(o) = old {
            self.idle.remove((o, client))?;
        }
        self.idle.insert((self.now_ms, client), ())?;
        self.seen.open()?.insert(client, self.now_ms)?;
        Ok(())
    }

    /// Forgets the idempotency records of clients idle for [`SESSION_IDLE_EXPIRY_MS`].
    fn expire_idle_sessions(&mut self) -> SmResult<()> {
        let cutoff = self.now_ms.saturating_sub(SESSION_IDLE_EXPIRY_MS);
        let mut doomed = Vec::new();
        for item in self.idle.range(..(cutoff, 0))? {
            if doomed.len() == MAX_SESSION_EXPIRIES_PER_BATCH {
                break;
            }
            doomed.push(item?.0.value());
        }
        for (ms, client) in doomed {
            self.idle.remove((ms, client))?;
            self.seen.open()?.remove(client)?;
            self.floors.open()?.remove(client)?;
            self.sessions
                .open()?
                .retain_in((client, 0)..=(client, u64::MAX), |_, _| false)?;
        }
        Ok(())
    }

    fn apply_op(&mut self, op: &WriteOp) -> SmResult<CommandResult> {
        if let Err(e) = op.validate() {
            return Ok(Err(e.into()));
        }
        match op {
            WriteOp::Put {
                key,
                value,
                prev_kv,
            } => {
                let revision = self.revision + 1;
                let prev = self.put(key, value, *prev_kv, &NO_PUT_OPTIONS, revision)?;
                self.revision = revision;
                Ok(Ok(WriteOutcome::Put { revision, prev }))
            }
            WriteOp::PutWith {
                key,
                value,
                prev_kv,
                options,
            } => {
                if let Err(e) = self.check_puts(&[(key, options)])? {
                    return Ok(Err(e));
                }
                let revision = self.revision + 1;
                let prev = self.put(key, value, *prev_kv, options, revision)?;
                self.revision = revision;
                Ok(Ok(WriteOutcome::Put { revision, prev }))
            }
            WriteOp::LeaseGrant { id, ttl_secs } => {
                if self.leases.open()?.get(*id)?.is_some() {
                    return Ok(Err(ApplyError::LeaseExists { id: *id }));
                }
                if self.leases.open()?.len()? >= MAX_LEASES {
                    return Ok(Err(ApplyError::TooManyLeases { max: MAX_LEASES }));
                }
                self.lease_grants += 1;
                let grant = self.lease_grants;
                let lease = StoredLease {
                    ttl_secs: *ttl_secs,
                    grant,
                    keys: 0,
                };
                self.leases.open()?.insert(*id, encode(&lease).as_slice())?;
                self.lease_changes.push(LeaseChange::Granted {
                    id: *id,
                    ttl_secs: *ttl_secs,
                    grant,
                });
                Ok(Ok(WriteOutcome::LeaseGrant {
                    revision: self.revision,
                    id: *id,
                    ttl_secs: *ttl_secs,
                    grant,
                }))
            }
            WriteOp::LeaseRevoke { id } => {
                if self.leases.open()?.get(*id)?.is_none() {
                    return Ok(Err(ApplyError::LeaseNotFound { id: *id }));
                }
                self.end_lease(*id)
            }
            WriteOp::LeaseExpire { id, grant } => {
                let current = match self.leases.open()?.get(*id)? {
                    Some(v) => Some(leases::decode(v.value())?.grant),
                    None => None,
                };
                if current == Some(*grant) {
                    self.end_lease(*id)
                } else {
                    // Revoked already (perhaps granted again): nothing of it is left.
                    Ok(Ok(WriteOutcome::LeaseRevoke {
                        revision: self.revision,
                        deleted: 0,
                        revoked: false,
                    }))
                }
            }
            WriteOp::Delete {
                start,
                end,
                prev_kv,
            } => {
                let revision = self.revision + 1;
                let (deleted, prev) = self.delete(start, end.as_deref(), *prev_kv, revision)?;
                if deleted > 0 {
                    self.revision = revision;
                }
                Ok(Ok(WriteOutcome::Delete {
                    revision: self.revision,
                    deleted,
                    prev,
                }))
            }
            WriteOp::Txn(txn) => self.apply_txn(std::slice::from_ref(txn), &[]),
            WriteOp::TxnTree(tree) => self.apply_txn(&tree.nodes, &tree.ranges),
            WriteOp::System(w) => {
                let current = self
                    .system
                    .open()?
                    .get(w.key.as_slice())?
                    .map(|v| v.value().to_vec());
                let written = w.expect.as_ref().is_none_or(|e| *e == current);
                let current = if written {
                    match &w.new {
                        Some(v) => {
                            self.system.open()?.insert(w.key.as_slice(), v.as_slice())?;
                        }
                        None => {
                            self.system.open()?.remove(w.key.as_slice())?;
                        }
                    }
                    w.new.clone()
                } else {
                    current
                };
                Ok(Ok(WriteOutcome::System {
                    revision: self.revision,
                    written,
                    current,
                }))
            }
            WriteOp::SystemTxn(t) => {
                let mut applied = true;
                for (key, expect) in &t.require {
                    let current = self.system.open()?.get(key.as_slice())?;
                    if current.as_ref().map(|v| v.value()) != expect.as_deref() {
                        applied = false;
                        break;
                    }
                }
                if applied {
                    for op in &t.writes {
                        match op {
                            SystemOp::Put { key, value } => {
                                self.system
                                    .open()?
                                    .insert(key.as_slice(), value.as_slice())?;
                            }
                            SystemOp::Delete { key } => {
                                self.system.open()?.remove(key.as_slice())?;
                            }
                            SystemOp::DeletePrefix { prefix } => {
                                let end = prefix_end(prefix);
                                if end.is_empty() {
                                    self.system
                                        .open()?
                                        .retain_in(prefix.as_slice().., |_, _| false)?;
                                } else {
                                    self.system
                                        .open()?
                                        .retain_in(prefix.as_slice()..end.as_slice(), |_, _| {
                                            false
                                        })?;
                                }
                            }
                        }
                    }
                }
                Ok(Ok(WriteOutcome::SystemTxn {
                    revision: self.revision,
                    applied,
                }))
            }
            WriteOp::Compact { revision } => {
                let revision = *revision;
                if revision <= self.compacted {
                    return Ok(Err(ApplyError::Compacted {
                        requested: revision,
                        compacted: self.compacted,
                    }));
                }
                if revision > self.revision {
                    return Ok(Err(ApplyError::FutureRevision {
                        requested: revision,
                        current: self.revision,
                    }));
                }
                // Keep, per key, every record at or above `revision` plus the newest one below
                // it (unless that one is a delete): reads at >= `revision` stay exact. Watches
                // cannot start below the compaction point, so what remains below it is only
                // ever read through the index.
                let doomed = self
                    .index
                    .read()
                    .expect("key index lock")
                    .compacted_below(revision);
                for (rev, key) in &doomed {
                    self.revisions.remove((*rev, key.as_slice()))?;
                }
                self.compacted_records.extend(doomed);
                self.compacted = revision;
                Ok(Ok(WriteOutcome::Compact {
                    revision: self.revision,
                }))
            }
        }
    }
    /// Checks puts with options before any of them is applied: the keys exist where an
    /// option keeps their value or lease, the leases exist and have room.
    /// Applies a transaction given as the nodes of a [`aspen_kv::api::TxnTree`] (a plain
    /// transaction is a tree of one node). Validated by the caller.
    fn apply_txn(&mut self, nodes: &[Txn], ranges: &[CompareRange]) -> SmResult<CommandResult> {
        let range_end = |node: usize, compare: usize| {
            ranges
                .iter()
                .find(|r| r.node as usize == node && r.compare as usize == compare)
                .map(|r| r.end.as_slice())
        };
        // The path, as etcd takes it: every comparison on it sees the state before the
        // transaction. A child comes after its parent, so one pass finds every node that runs.
        let mut taken: Vec<Option<bool>> = vec![None; nodes.len()];
        taken[0] = Some(true);
        for (j, node) in nodes.iter().enumerate() {
            if taken[j].is_none() {
                continue;
            }
            let mut succeeded = true;
            for (ci, c) in node.compare.iter().enumerate() {
                let holds = match range_end(j, ci) {
                    None => {
                        let current = self.current(&c.key)?.map(|s| s.into_kv(c.key.clone()));
                        c.holds(current.as_ref())
                    }
                    Some(end) => match self.range_holds(c, end)? {
                        Ok(holds) => holds,
                        Err(e) => return Ok(Err(e)),
                    },
                };
                if !holds {
                    succeeded = false;
                    break;
                }
            }
            taken[j] = Some(succeeded);
            for op in branch_of(node, succeeded) {
                if let TxnOp::Nested(i) = op {
                    taken[*i as usize] = Some(true);
                }
            }
        }
        let running = || {
            nodes
                .iter()
                .zip(&taken)
                .filter_map(|(node, t)| t.map(|succeeded| branch_of(node, succeeded)))
        };
        // Leases are checked for the whole path first: it applies entirely or not.
        let puts: Vec<(&Key, &PutOptions)> = running()
            .flatten()
            .filter_map(|op| match op {
                TxnOp::PutWith { key, options, .. } => Some((key, options)),
                _ => None,
            })
            .collect();
        if let Err(e) = self.check_puts(&puts)? {
            return Ok(Err(e));
        }
        // The path's writes touch distinct keys (checked by `validate`), so they all happen
        // at one revision, in any order.
        let revision = self.revision + 1;
        let mut changed = false;
        // Per node that ran, per write of its branch: `Some(deleted)` for a delete, `None`
        // for a put; previous values. Nested transactions get an empty slot.
        let mut done: Vec<Vec<(Option<u64>, Vec<KeyValue>)>> = vec![Vec::new(); nodes.len()];
        for (j, node) in nodes.iter().enumerate() {
            let Some(succeeded) = taken[j] else {
                continue;
            };
            for op in branch_of(node, succeeded) {
                let result = match op {
                    TxnOp::Put {
                        key,
                        value,
                        prev_kv,
                    } => {
                        let prev = self.put(key, value, *prev_kv, &NO_PUT_OPTIONS, revision)?;
                        changed = true;
                        (None, prev.into_iter().collect())
                    }
                    TxnOp::PutWith {
                        key,
                        value,
                        prev_kv,
                        options,
                    } => {
                        let prev = self.put(key, value, *prev_kv, options, revision)?;
                        changed = true;
                        (None, prev.into_iter().collect())
                    }
                    TxnOp::Delete {
                        start,
                        end,
                        prev_kv,
                    } => {
                        let (deleted, prev) =
                            self.delete(start, end.as_deref(), *prev_kv, revision)?;
                        changed |= deleted > 0;
                        (Some(deleted), prev)
                    }
                    TxnOp::Nested(_) => (None, Vec::new()),
                };
                done[j].push(result);
            }
        }
        if changed {
            self.revision = revision;
        }
        let revision = self.revision;
        // Outcomes bottom up: a child's is complete before its parent's takes it.
        let mut outcomes: Vec<Option<WriteOutcome>> = vec![None; nodes.len()];
        for j in (0..nodes.len()).rev() {
            let Some(succeeded) = taken[j] else {
                continue;
            };
            let branch = branch_of(&nodes[j], succeeded);
            let mut results = Vec::with_capacity(branch.len());
            for (op, (deleted, mut prev)) in branch.iter().zip(std::mem::take(&mut done[j])) {
                results.push(match (op, deleted) {
                    (TxnOp::Nested(i), _) => outcomes[*i as usize]
                        .take()
                        .expect("a nested node that ran"),
                    (_, None) => WriteOutcome::Put {
                        revision,
                        prev: prev.pop(),
                    },
                    (_, Some(deleted)) => WriteOutcome::Delete {
                        revision,
                        deleted,
                        prev,
                    },
                });
            }
            outcomes[j] = Some(WriteOutcome::Txn {
                revision,
                succeeded,
                results,
            });
        }
        Ok(Ok(outcomes[0].take().expect("the outer transaction ran")))
    }

    /// Whether `c` holds for every key of `[c.key, end)` that exists now (for an absent key
    /// if none does), as etcd evaluates a comparison with a range end.
    fn range_holds(&self, c: &Compare, end: &[u8]) -> SmResult<Result<bool, ApplyError>> {
        let live = self.index.read().expect("key index lock").live_at(
            &c.key,
            Some(end),
            Revision::MAX,
            MAX_COMPARE_RANGE_KEYS + 1,
        );
        if live.len() > MAX_COMPARE_RANGE_KEYS {
            return Ok(Err(LimitError::CompareRangeTooLarge {
                max: MAX_COMPARE_RANGE_KEYS,
            }
            .into()));
        }
        if live.is_empty() {
            return Ok(Ok(c.holds(None)));
        }
        for (key, at) in live {
            let stored = record(&self.revisions, at, &key)?.ok_or_else(|| {
                redb::Error::Corrupted(format!("key {key:?} indexed live at a comparison ({at})"))
            })?;
            if !c.holds(Some(&stored.into_kv(key))) {
                return Ok(Ok(false));
            }
        }
        Ok(Ok(true))
    }

    fn check_puts(&mut self, puts: &[(&Key, &PutOptions)]) -> SmResult<Result<(), ApplyError>> {
        let mut added: HashMap<LeaseId, u64> = HashMap::new();
        for (key, options) in puts {
            let needs_key = options.ignore_value || options.ignore_lease;
            if !needs_key && options.lease == 0 {
                continue;
            }
            let current = self.current(key)?;
            if needs_key && current.is_none() {
                return Ok(Err(ApplyError::KeyNotFound { key: key.to_vec() }));
            }
            let lease = options.lease;
            if options.ignore_lease || lease == 0 || current.is_some_and(|c| c.lease == lease) {
                continue;
            }
            let Some(stored) = self.leases.open()?.get(lease)? else {
                return Ok(Err(ApplyError::LeaseNotFound { id: lease }));
            };
            let keys = leases::decode(stored.value())?.keys;
            let add = added.entry(lease).or_default();
            *add += 1;
            if keys + *add > MAX_KEYS_PER_LEASE {
                return Ok(Err(ApplyError::LeaseFull {
                    id: lease,
                    max: MAX_KEYS_PER_LEASE,
                }));
            }
        }
        Ok(Ok(()))
    }

    /// Attaches `key` to `lease` (or detaches it): its `lease_keys` row and the lease's key
    /// count. Lease 0 is no lease.
    fn attach(&mut self, lease: LeaseId, key: &[u8], attach: bool) -> SmResult<()> {
        if lease == 0 {
            return Ok(());
        }
        if attach {
            self.lease_keys.open()?.insert((lease, key), ())?;
        } else {
            self.lease_keys.open()?.remove((lease, key))?;
        }
        let stored = match self.leases.open()?.get(lease)? {
            Some(v) => Some(leases::decode(v.value())?),
            None => None,
        };
        // A lease being ended is removed before its keys are deleted.
        if let Some(mut stored) = stored {
            stored.keys = if attach {
                stored.keys + 1
            } else {
                stored.keys.saturating_sub(1)
            };
            self.leases
                .open()?
                .insert(lease, encode(&stored).as_slice())?;
        }
        Ok(())
    }

    /// Revokes (or expires) lease `id`, which exists: removes it, then deletes its keys at
    /// one new revision.
    fn end_lease(&mut self, id: LeaseId) -> SmResult<CommandResult> {
        let mut keys: Vec<Key> = Vec::new();
        for item in self
            .lease_keys
            .open()?
            .range((id, [].as_slice())..(id + 1, [].as_slice()))?
        {
            keys.push(item?.0.value().1.to_vec());
        }
        self.leases.open()?.remove(id)?;
        self.lease_changes.push(LeaseChange::Removed(id));
        let revision = self.revision + 1;
        let mut deleted = 0;
        for key in &keys {
            deleted += self.delete(key, None, false, revision)?.0;
        }
        if deleted > 0 {
            self.revision = revision;
        }
        Ok(Ok(WriteOutcome::LeaseRevoke {
            revision: self.revision,
            deleted,
            revoked: true,
        }))
    }

    /// Sets `key` at `revision` (options already checked by [`Self::check_puts`]); returns
    /// the previous value when `prev_kv`.
    fn put(
        &mut self,
        key: &Key,
        value: &[u8],
        prev_kv: bool,
        options: &PutOptions,
        revision: Revision,
    ) -> SmResult<Option<KeyValue>> {
        let prev = self.current(key)?;
        let (create_revision, version) = match &prev {
            Some(p) => (p.create_revision, p.version + 1),
            None => (revision, 1),
        };
        let old_lease = prev.as_ref().map_or(0, |p| p.lease);
        let lease = if options.ignore_lease {
            old_lease
        } else {
            options.lease
        };
        if lease != old_lease {
            self.attach(old_lease, key, false)?;
            self.attach(lease, key, true)?;
        }
        let value = match &prev {
            Some(p) if options.ignore_value => p.value.clone(),
            _ => value.to_vec(),
        };
        let stored = StoredKv {
            value,
            create_revision,
            mod_revision: revision,
            version,
            lease,
        };
        let before = prev.map(|p| p.into_kv(key.clone()));
        self.events.push((
            revision,
            Event {
                kind: EventKind::Put,
                kv: stored.clone().into_kv(key.clone()),
                prev_kv: before.clone(),
            },
        ));
        self.write(key, revision, Some(&stored))?;
        Ok(if prev_kv { before } else { None })
    }

    /// Deletes `[start, end)` (`None`: just `start`; empty: to the end) at `revision`; returns
    /// how many keys existed, and their values when `prev_kv`.
    fn delete(
        &mut self,
        start: &Key,
        end: Option<&[u8]>,
        prev_kv: bool,
        revision: Revision,
    ) -> SmResult<(u64, Vec<KeyValue>)> {
        let live = self.index.read().expect("key index lock").live_at(
            start,
            end,
            Revision::MAX,
            usize::MAX,
        );
        let mut doomed: Vec<(Key, StoredKv)> = Vec::with_capacity(live.len());
        for (key, at) in live {
            let stored = record(&self.revisions, at, &key)?.ok_or_else(|| {
                redb::Error::Corrupted(format!("key {key:?} indexed live at a delete ({at})"))
            })?;
            doomed.push((key, stored));
        }
        let mut prev = Vec::new();
        let count = doomed.len() as u64;
        for (k, p) in doomed {
            self.write(&k, revision, None)?;
            self.attach(p.lease, &k, false)?;
            let before = p.into_kv(k.clone());
            let gone = KeyValue {
                key: k,
                value: Vec::new(),
                create_revision: 0,
                mod_revision: revision,
                version: 0,
                lease: 0,
            };
            self.events.push((
                revision,
                Event {
                    kind: EventKind::Delete,
                    kv: gone,
                    prev_kv: Some(before.clone()),
                },
            ));
            if prev_kv {
                prev.push(before);
            }
        }
        Ok((count, prev))
    }
}

/// Every this many applies, one commits durably (bounds what a crash replays, and lets redb
/// reuse pages freed by non-durable commits). A durable commit writes everything dirtied since
/// the last one, so this trades tail latency for throughput: measured at 64 clients, every 128
/// gave ~11.7k puts/s with p99 ~40 ms, every 16 ~10-11k with p99 ~15-20 ms.
const SM_DURABLE_EVERY: u64 = 32;

/// What one apply transaction produced.
struct Applied {
    responses: Vec<BatchResponse>,
    /// The store revision before and after it, and the compaction point after it.
    revision_before: Revision,
    revision: Revision,
    compacted: Revision,
    lease_changes: Vec<LeaseChange>,
    /// Each revision's events, in key order.
    revisions: Vec<(Revision, Vec<Event>)>,
}

/// Applies `entries` in one transaction; calls `answer` with what they did just before the
/// commit (see [`StateDb::answer_then_commit`]).
fn apply_entries(
    db: &StateDb,
    index: &RwLock<KeyIndex>,
    n: u64,
    entries: Vec<Entry>,
    answer: impl FnOnce(&mut Applied),
) -> SmResult<Applied> {
    let started = std::time::Instant::now();
    let count = entries.len();
    let mut txn = db.begin_write()?;
    txn.set_durability(if n % SM_DURABLE_EVERY == SM_DURABLE_EVERY - 1 {
        Durability::Immediate
    } else {
        Durability::None
    })?;
    let mut responses = Vec::with_capacity(entries.len());
    let revision_after;
    let (revision_before, compacted_after);
    let lease_changes;
    let mut events;
    let compacted_records;
    {
        let (revision, compacted, lease_grants) = {
            let meta = txn.open_table(SM_META)?;
            (
                meta_get(&meta, "revision")?.unwrap_or(0),
                meta_get(&meta, "compacted")?.unwrap_or(0),
                meta_get(&meta, "lease_grants")?.unwrap_or(0u64),
            )
        };
        let mut applier = Applier {
            revisions: txn.open_table(REVISIONS)?,
            index,
            compacted_records: Vec::new(),
            idle: txn.open_table(SESSION_IDLE)?,
            sessions: LazyTable::new(&txn, SESSIONS),
            floors: LazyTable::new(&txn, SESSION_FLOORS),
            seen: LazyTable::new(&txn, SESSION_SEEN),
            system: LazyTable::new(&txn, SYSTEM),
            leases: LazyTable::new(&txn, LEASES),
            lease_keys: LazyTable::new(&txn, LEASE_KEYS),
            revision,
            compacted,
            lease_grants,
            lease_changes: Vec::new(),
            events: Vec::new(),
            now_ms: 0,
        };
        revision_before = revision;
        let mut last_applied = None;
        let mut membership = None;
        for entry in &entries {
            last_applied = Some(entry.log_id);
            match &entry.payload {
                EntryPayload::Blank => responses.push(BatchResponse::default()),
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m.clone()));
                    responses.push(BatchResponse::default());
                }
                EntryPayload::Normal(batch) => {
                    applier.now_ms = batch.proposed_at_ms;
                    applier.expire_idle_sessions()?;
                    let mut results = Vec::with_capacity(batch.commands.len());
                    for (i, cmd) in batch.commands.iter().enumerate() {
                        // A batch over the limit is refused command by command, deterministically.
                        if i >= MAX_BATCH_COMMANDS {
                            results.push(Err(ApplyError::Limit(LimitError::TooManyCommands {
                                len: batch.commands.len(),
                                max: MAX_BATCH_COMMANDS,
                            })));
                            continue;
                        }
                        results.push(applier.apply_command(cmd)?);
                    }
                    responses.push(BatchResponse { results });
                }
            }
        }
        let (revision, compacted) = (applier.revision, applier.compacted);
        let grants_after = applier.lease_grants;
        revision_after = revision;
        compacted_after = compacted;
        lease_changes = std::mem::take(&mut applier.lease_changes);
        events = std::mem::take(&mut applier.events);
        compacted_records = std::mem::take(&mut applier.compacted_records);
        drop(applier);
        let mut meta = txn.open_table(SM_META)?;
        meta.insert("last_applied", encode(&last_applied).as_slice())?;
        meta.insert("revision", encode(&revision).as_slice())?;
        meta.insert("compacted", encode(&compacted).as_slice())?;
        if grants_after != lease_grants {
            meta.insert("lease_grants", encode(&grants_after).as_slice())?;
        }
        if let Some(m) = membership {
            meta.insert("membership", encode(&m).as_slice())?;
        }
    }
    // Group by revision, each revision's events in key order (as the store pages them).
    events.sort_by(|a, b| (a.0, &a.1.kv.key).cmp(&(b.0, &b.1.kv.key)));
    let mut revisions: Vec<(Revision, Vec<Event>)> = Vec::new();
    for (revision, event) in events {
        match revisions.last_mut() {
            Some((r, list)) if *r == revision => list.push(event),
            _ => revisions.push((revision, vec![event])),
        }
    }
    let mut applied = Applied {
        responses,
        revision_before,
        revision: revision_after,
        compacted: compacted_after,
        lease_changes,
        revisions,
    };
    if compacted_records.is_empty() {
        db.answer_then_commit(txn, || answer(&mut applied))?;
    } else {
        // Readers take the index's read lock before their transaction: none sees the
        // compacted records gone from the table but still in the index (or the reverse).
        let mut index = index.write().expect("key index lock");
        db.answer_then_commit(txn, || answer(&mut applied))?;
        index.remove(&compacted_records);
    }
    tracing::trace!(
        entries = count,
        micros = started.elapsed().as_micros() as u64,
        "applied"
    );
    Ok(applied)
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> std::io::Result<(Option<LogId>, StoredMembership)> {
        let db = self.db.clone();
        blocking(self.io, move || {
            let r: SmResult<_> = (|| {
                let txn = db.begin_read()?;
                let meta = txn.open_table(SM_META)?;
                let applied: Option<LogId> = meta_get(&meta, "last_applied")?.flatten();
                let membership: StoredMembership =
                    meta_get(&meta, "membership")?.unwrap_or_default();
                Ok((applied, membership))
            })();
            r.map_err(|e| io_error("read the state machine", e))
        })
        .await
    }

    async fn apply<Strm>(&mut self, entries: Strm) -> std::io::Result<()>
    where
        Strm: futures::Stream<Item = std::io::Result<EntryResponder<TypeConfig>>>
            + Unpin
            + OptionalSend,
    {
        // openraft hands over the committed range as a stream read from the log (ready at
        // once: the newest entries are in the log tail); apply it as one transaction.
        let (entries, responders): (Vec<Entry>, Vec<_>) =
            entries.try_collect::<Vec<_>>().await?.into_iter().unzip();
        let responses = self.apply_committed(entries).await?;
        debug_assert_eq!(responses.len(), responders.len());
        for (response, responder) in responses.into_iter().zip(responders) {
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> std::io::Result<()> {
        let db = self.db.clone();
        let dir = self.snapshot_dir.clone();
        let meta = meta.clone();
        let sig = meta.signature();
        let mut snapshot = snapshot;
        snapshot
            .finish()
            .await
            .map_err(|e| io_error(&format!("install snapshot {sig:?}"), e))?;
        let path = snapshot.path().to_path_buf();
        drop(snapshot);
        let index = self.index.clone();
        let (revision, compacted, all_leases) = blocking(self.io, move || {
            let failed =
                |e: &dyn std::fmt::Display| io_error(&format!("install snapshot {sig:?}"), e);
            snapshot::install(&db, &index, &path, &meta).map_err(|e| failed(&e))?;
            snapshot::make_current(&dir, &path).map_err(|e| failed(&e))?;
            let read = || {
                Ok::<_, redb::Error>((
                    current_revision(&db)?,
                    compaction_point(&db)?,
                    leases::all(&db)?,
                ))
            };
            read().map_err(|e| failed(&e))
        })
        .await?;
        self.recent.reset(revision, compacted);
        // A snapshot replaces the whole system key space, and every lease.
        self.notify_system_watches(None);
        self.lessor.reset(all_leases, tokio::time::Instant::now());
        self.publish_revision(revision);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> std::io::Result<Option<Snapshot>> {
        let dir = self.snapshot_dir.clone();
        let found = blocking(self.io, move || {
            snapshot::read_current_meta(&dir).map_err(|e| io_error("read the current snapshot", e))
        })
        .await?;
        match found {
            None => Ok(None),
            Some((meta, path, file)) => Ok(Some(Snapshot {
                meta,
                snapshot: SnapshotFile::opened(path, file, self.io),
            })),
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> std::io::Result<Snapshot> {
        let (db, index) = (self.db.clone(), self.index.clone());
        let dir = self.snapshot_dir.clone();
        let (meta, path, file) = blocking(self.io, move || {
            snapshot::build(&db, &index, &dir).map_err(|e| io_error("build a snapshot", e))
        })
        .await?;
        // The file as built: the path may already hold a newer build.
        Ok(Snapshot {
            meta,
            snapshot: SnapshotFile::opened(path, file, self.io),
        })
    }
}

/// The branch of `txn` that runs when its comparisons `succeeded` (or not).
fn branch_of(txn: &Txn, succeeded: bool) -> &[TxnOp] {
    if succeeded {
        &txn.success
    } else {
        &txn.failure
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn system_put(key: &str) -> Entry {
        Entry {
            log_id: crate::raft_types::log_id(1, 1, 1),
            payload: EntryPayload::Normal(Batch {
                proposed_at_ms: 0,
                proposal: 0,
                commands: vec![Command {
                    session: None,
                    op: WriteOp::SystemTxn(SystemTxn {
                        require: vec![],
                        writes: vec![SystemOp::Put {
                            key: key.as_bytes().to_vec(),
                            value: b"v".to_vec(),
                        }],
                    }),
                }],
            }),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

        /// A range read at any past revision, paged by any limit, sees exactly the state a
        /// model had at that revision (the historical read seeks each key's newest version).
        #[test]
        fn historical_ranges_match_a_model(
            writes in proptest::collection::vec((0u8..6, proptest::option::of(0u8..4)), 1..40),
            limit in 0u64..4,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let db = StateDb::new(redb::Database::create(dir.path().join("sm.redb")).unwrap());
                let txn = db.begin_write().unwrap();
                super::super::create_sm_tables(&txn).unwrap();
                txn.commit().unwrap();
                let mut sm =
                    StateMachineStore::new(Arc::new(db), dir.path().join("snap"), IoMode::Inline)
                        .unwrap();
                // The model: the whole state after each revision.
                let mut states: Vec<std::collections::BTreeMap<Vec<u8>, Vec<u8>>> =
                    vec![Default::default()];
                for (i, (k, v)) in writes.iter().enumerate() {
                    let key = vec![b'a' + k];
                    let op = match v {
                        Some(v) => WriteOp::Put {
                            key: key.clone(),
                            value: vec![*v],
                            prev_kv: false,
                        },
                        None => WriteOp::Delete {
                            start: key.clone(),
                            end: None,
                            prev_kv: false,
                        },
                    };
                    let entry = Entry {
                        log_id: crate::raft_types::log_id(1, 1, i as u64 + 1),
                        payload: EntryPayload::Normal(Batch {
                            proposed_at_ms: 0,
                            proposal: 0,
                            commands: vec![Command { session: None, op }],
                        }),
                    };
                    sm.apply_committed(vec![entry]).await.unwrap();
                    let mut next = states.last().unwrap().clone();
                    let changed = match v {
                        Some(v) => {
                            next.insert(key, vec![*v]);
                            true
                        }
                        None => next.remove(&key).is_some(),
                    };
                    if changed {
                        states.push(next);
                    }
                }
                let current = states.len() as u64 - 1;
                for revision in 1..=current {
                    let mut got = Vec::new();
                    let mut start = b"a".to_vec();
                    loop {
                        let request = RangeRequest {
                            start: start.clone(),
                            end: Some(b"z".to_vec()),
                            limit,
                            revision,
                        };
                        let page = sm.range(request).await.unwrap();
                        assert_eq!(page.revision, revision);
                        if let Some(last) = page.kvs.last() {
                            start = last.key.iter().copied().chain([0]).collect();
                        }
                        got.extend(page.kvs.into_iter().map(|kv| (kv.key, kv.value)));
                        if !page.more {
                            break;
                        }
                    }
                    let want: Vec<(Vec<u8>, Vec<u8>)> =
                        states[revision as usize].clone().into_iter().collect();
                    assert_eq!(got, want, "at revision {revision} of {current}");
                    for k in 0u8..6 {
                        let one = sm.get(vec![b'a' + k], revision).await.unwrap();
                        let want = states[revision as usize].get(&vec![b'a' + k]).cloned();
                        assert_eq!(one.map(|kv| kv.value), want);
                    }
                }
            });
        }
    }

    /// A watch made while a batch is being applied fires when that batch lands: its owner may
    /// have read the state just before the batch committed (a restarted leader replaying its
    /// log while the node loads its access policy), and would otherwise never learn of it.
    #[test]
    fn a_watch_made_during_an_apply_fires_when_it_lands() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(StateDb::new(
            redb::Database::create(dir.path().join("sm.redb")).unwrap(),
        ));
        let sm = StateMachineStore::new(db, dir.path().join("snap"), IoMode::Inline).unwrap();
        let early = sm.watch_system_prefix(b"other/");
        // The batch is inspected, then a watch is made, then the batch commits.
        let writes = SystemWrites::of(&[system_put("auth/x")]);
        let late = sm.watch_system_prefix(b"auth/");
        sm.notify_system_watches(Some(&writes));
        assert_eq!(
            *late.borrow(),
            1,
            "the watch made mid-apply missed the batch"
        );
        assert_eq!(
            *early.borrow(),
            0,
            "a write outside the prefix fired a watch"
        );
        sm.notify_system_watches(Some(&SystemWrites::of(&[system_put("elsewhere/y")])));
        assert_eq!(*late.borrow(), 1);
        sm.notify_system_watches(Some(&SystemWrites::of(&[system_put("auth/z")])));
        assert_eq!(*late.borrow(), 2);
    }
}
