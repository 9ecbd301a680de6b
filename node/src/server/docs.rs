//! The document service: Automerge documents over the client protocol.
//!
//! What may be committed is decided by `aspen_crdt`; this module reads the stored document
//! from the state machine (one consistent view), runs the Automerge work on the blocking pool,
//! and proposes the resulting system transaction through Raft. Loaded documents are kept
//! between requests ([`aspen_crdt::cache`]), so a commit applies only the changes committed
//! since the node last loaded the document.
//!
//! Changes to one document are committed by one task per document on this node (its
//! writer), which takes every request waiting for the document at once: one read barrier,
//! one read of the stored document, each request checked against the document with the
//! requests before it applied ([`aspen_crdt::plan_batch`]), and one transaction through Raft
//! for all of them. Every request passed the read barrier after it arrived, so it is checked
//! against everything committed before it began. The writer also starts compactions, which
//! run in a task of their own: no request waits for one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use aspen_client::protocol::{Consistency, DocRequest, DocResponse, DocSummary, RpcError};
use aspen_crdt::cache::DocCache;
use aspen_crdt::layout::{DocMeta, META_PREFIX};
use aspen_crdt::limits::{
    COMPACT_AFTER_BYTES, COMPACT_AFTER_CHANGES, MAX_BATCH_CHANGES, MAX_LIST_LIMIT,
    MAX_REQUEST_BYTES,
};
use aspen_crdt::{Accepted, DocError, DocName, StoredDoc};
use automerge::Automerge;
use tokio::sync::oneshot;

use super::ClusterHandle;

/// Documents this node is compacting (at most one compaction per document at a time).
#[derive(Default)]
pub struct Compactions(Mutex<HashSet<DocName>>);

/// What waits for one document's writer task.
#[derive(Default)]
struct Writer {
    /// Change requests, oldest first.
    waiting: VecDeque<Waiting>,
    /// Whether to start a compaction (if the document still wants one).
    compact: bool,
}

struct Waiting {
    changes: Vec<Vec<u8>>,
    reply: oneshot::Sender<Result<DocResponse, RpcError>>,
}

type Writers = Arc<Mutex<HashMap<DocName, Writer>>>;

/// Serves Automerge documents; holds the documents it has loaded between requests. Cheap to
/// clone (the writer and compaction tasks hold clones).
#[derive(Clone)]
pub struct DocService {
    cluster: ClusterHandle,
    /// Automerge documents loaded on this node, kept between requests.
    cache: Arc<DocCache>,
    /// Documents being compacted by this node.
    compactions: Arc<Compactions>,
    /// Documents whose writer task runs, with what waits for it.
    writers: Writers,
}

/// Removes a writer that stops without emptying its queue (it panicked): requests still
/// waiting get an error instead of waiting forever, and the next request starts a new writer.
struct WriterGuard {
    writers: Writers,
    name: DocName,
    done: bool,
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        if !self.done {
            self.writers
                .lock()
                .expect("writers lock")
                .remove(&self.name);
        }
    }
}

impl DocService {
    pub fn new(cluster: ClusterHandle) -> Self {
        DocService {
            cluster,
            cache: Default::default(),
            compactions: Default::default(),
            writers: Default::default(),
        }
    }

    /// Serves one document request (access already checked; listings are filtered by the
    /// caller).
    pub async fn handle(&self, request: DocRequest) -> Result<DocResponse, RpcError> {
        match request {
            DocRequest::Create { name, incarnation } => self.create(name, incarnation).await,
            DocRequest::Change { name, changes } => {
                let r = self.change(name, changes).await;
                if let Ok(DocResponse::Changed { added, .. }) = &r {
                    self.cluster.metrics.doc_changes.inc_by(added.len() as u64);
                }
                r
            }
            DocRequest::Get { name, consistency } => self.get(name, consistency).await,
            DocRequest::List {
                start_after,
                limit,
                consistency,
            } => self.list(start_after, limit, consistency).await,
            DocRequest::Delete { name } => self.delete(name).await,
        }
    }

    async fn read_stored(&self, name: &DocName) -> Result<Option<StoredDoc>, RpcError> {
        let name = name.clone();
        Ok(self
            .cluster
            .sm
            .system_view(move |view| aspen_crdt::read_doc(view, &name))
            .await??)
    }

    async fn read_existing(&self, name: &DocName) -> Result<StoredDoc, RpcError> {
        self.read_stored(name)
            .await?
            .ok_or_else(|| DocError::NotFound(name.to_string()).into())
    }

    async fn create(&self, name: String, incarnation: [u8; 16]) -> Result<DocResponse, RpcError> {
        let name = DocName::new(name)?;
        let txn = aspen_crdt::plan_create(&name, incarnation, super::identity::unix_now() * 1000);
        if self.cluster.propose_system_txn(txn).await? {
            return Ok(DocResponse::Done);
        }
        // A retry of a create that was applied finds its own incarnation.
        match self.read_stored(&name).await? {
            Some(stored) if stored.meta.incarnation == incarnation => Ok(DocResponse::Done),
            _ => Err(DocError::Exists(name.to_string()).into()),
        }
    }

    /// Queues the changes for the document's writer (started if none runs) and waits for
    /// its answer.
    async fn change(&self, name: String, changes: Vec<Vec<u8>>) -> Result<DocResponse, RpcError> {
        let name = DocName::new(name)?;
        let (reply, answer) = oneshot::channel();
        self.to_writer(&name, |w| w.waiting.push_back(Waiting { changes, reply }));
        answer
            .await
            .map_err(|_| RpcError::Internal("the document writer stopped".into()))?
    }

    /// Updates what waits for document `name`'s writer, starting the writer if none runs.
    fn to_writer(&self, name: &DocName, update: impl FnOnce(&mut Writer)) {
        let start = {
            let mut writers = self.writers.lock().expect("writers lock");
            let start = !writers.contains_key(name);
            update(writers.entry(name.clone()).or_default());
            start
        };
        if start {
            tokio::spawn(self.clone().write(name.clone()));
        }
    }

    /// Document `name`'s writer: commits what waits for it, batch after batch, until nothing
    /// does.
    async fn write(self, name: DocName) {
        let mut guard = WriterGuard {
            writers: self.writers.clone(),
            name: name.clone(),
            done: false,
        };
        loop {
            let (batch, compact) = {
                let mut writers = self.writers.lock().expect("writers lock");
                let w = writers
                    .get_mut(&name)
                    .expect("a writer's entry stays while it runs");
                let (mut changes, mut bytes) = (0, 0);
                let mut batch = Vec::new();
                while let Some(next) = w.waiting.front() {
                    let n = next.changes.len();
                    let b: usize = next.changes.iter().map(Vec::len).sum();
                    if !batch.is_empty()
                        && (changes + n > MAX_BATCH_CHANGES || bytes + b > MAX_REQUEST_BYTES)
                    {
                        break;
                    }
                    (changes, bytes) = (changes + n, bytes + b);
                    batch.extend(w.waiting.pop_front());
                }
                let compact = std::mem::take(&mut w.compact);
                if batch.is_empty() && !compact {
                    writers.remove(&name);
                    guard.done = true;
                    return;
                }
                (batch, compact)
            };
            let (changes, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|w| (w.changes, w.reply)).unzip();
            match self.commit(&name, changes, compact).await {
                Ok(outcomes) => {
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        let _ = reply.send(outcome.map(|a| DocResponse::Changed {
                            added: a.added,
                            heads: a.heads,
                        }));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// Checks and commits one batch of change requests to document `name` (one outcome per
    /// request, in order); with `compact`, also starts a compaction if the document wants one.
    async fn commit(
        &self,
        name: &DocName,
        requests: Vec<Vec<Vec<u8>>>,
        compact: bool,
    ) -> Result<Vec<Result<Accepted, RpcError>>, RpcError> {
        if !requests.is_empty() {
            self.cluster.read_barrier().await?;
        }
        let cache = self.cache.clone();
        let compactions = self.compactions.clone();
        let doc_name = name.clone();
        // One trip to the blocking pool: read the stored document, bring the loaded copy up
        // to it, and check the requests against it.
        let planned = self
            .cluster
            .sm
            .system_view(move |view| {
                let stored = match aspen_crdt::read_doc(view, &doc_name)? {
                    Ok(Some(stored)) => stored,
                    Ok(None) => return Ok(Err(DocError::NotFound(doc_name.to_string()))),
                    Err(e) => return Ok(Err(e)),
                };
                Ok((|| {
                    let mut doc = cache.load(&stored)?;
                    // The document exactly as stored, for a compaction of it.
                    let copy = (compact
                        && stored.wants_compaction()
                        && compactions.0.lock().expect("lock").insert(doc_name.clone()))
                    .then(|| (stored.clone(), doc.clone()));
                    let plan = aspen_crdt::plan_batch(&stored, &mut doc, requests);
                    if plan.is_err() {
                        if let Some((stored, _)) = &copy {
                            compactions.0.lock().expect("lock").remove(&stored.name);
                        }
                    }
                    Ok::<_, DocError>((stored, doc, plan?, copy))
                })())
            })
            .await??;
        let (stored, doc, mut plan, copy) = planned;
        if let Some((stored, doc)) = copy {
            tokio::spawn(self.clone().compact(stored, doc));
        }
        let outcomes = |plan: aspen_crdt::BatchPlan| {
            plan.outcomes
                .into_iter()
                .map(|o| o.map_err(RpcError::from))
                .collect()
        };
        let Some(txn) = plan.txn.take() else {
            self.cache.keep(&stored, doc, &[]);
            return Ok(outcomes(plan));
        };
        let failed = match self.cluster.propose_system_txn(txn).await {
            Ok(true) => None,
            // Deleted (or deleted and re-created) since we read it.
            Ok(false) => Some(DocError::NotFound(name.to_string()).into()),
            Err(e) => Some(e),
        };
        if let Some(e) = failed {
            // `doc` holds changes that were not committed: dropped. Requests refused are
            // still refused; the ones accepted get the failure.
            drop(doc);
            return Ok(plan
                .outcomes
                .into_iter()
                .map(|o| match o {
                    Ok(_) => Err(e.clone()),
                    Err(refused) => Err(refused.into()),
                })
                .collect());
        }
        self.cache.keep(&stored, doc, &plan.added);
        if stored.changes.len() + plan.added.len() >= COMPACT_AFTER_CHANGES
            || stored.pending_bytes() + plan.added_bytes >= COMPACT_AFTER_BYTES
        {
            self.to_writer(name, |w| w.compact = true);
        }
        Ok(outcomes(plan))
    }

    /// Compacts `stored` (whose compaction this node has claimed in `compactions`), `doc`
    /// being the document it describes: saves it and proposes the snapshot through Raft.
    async fn compact(self, stored: StoredDoc, doc: Automerge) {
        let name = stored.name.clone();
        let cache = self.cache.clone();
        let result = async {
            let planned = tokio::task::spawn_blocking(move || {
                let plan = aspen_crdt::plan_compaction(&stored, &doc)?;
                // Told before it is proposed, so a load right after it applies uses it.
                cache.compacting(&stored, plan.snapshot);
                Some(plan.txn)
            })
            .await
            .map_err(|e| RpcError::Internal(format!("compaction task failed: {e}")))?;
            if let Some(txn) = planned {
                let applied = self.cluster.propose_system_txn(txn).await?;
                tracing::debug!(doc = %name, applied, "compaction");
            }
            Ok::<_, RpcError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(doc = %name, "compaction failed: {e}");
        }
        self.compactions.0.lock().expect("lock").remove(&name);
    }

    /// Runs `f` on the blocking pool over document `name` as this node has it (no read
    /// barrier: the caller decides); `None` if there is no such document.
    pub async fn with_doc<T: Send + 'static>(
        &self,
        name: &DocName,
        f: impl FnOnce(&Automerge) -> T + Send + 'static,
    ) -> Result<Option<T>, RpcError> {
        let Some(stored) = self.read_stored(name).await? else {
            return Ok(None);
        };
        let cache = self.cache.clone();
        tokio::task::spawn_blocking(move || {
            let doc = cache.load(&stored)?;
            let out = f(&doc);
            cache.keep(&stored, doc, &[]);
            Ok::<_, DocError>(Some(out))
        })
        .await
        .map_err(|e| RpcError::Internal(format!("document task failed: {e}")))?
        .map_err(Into::into)
    }

    /// Commits changes pulled from another cluster (verified by the caller) into document
    /// `name`, creating it if need be ([`aspen_crdt::plan_import`]). Returns the hashes added.
    pub async fn import(
        &self,
        name: &DocName,
        changes: Vec<Vec<u8>>,
        merged: Option<aspen_crdt::Merged>,
    ) -> Result<Vec<[u8; 32]>, RpcError> {
        self.import_with(name, move |stored, doc| {
            aspen_crdt::plan_import(stored, doc, changes, merged)
        })
        .await
    }

    /// Stores a document pulled whole from another cluster (verified by the caller) as
    /// document `name` (created if need be): one snapshot, which must hold everything the
    /// stored document holds ([`aspen_crdt::plan_replace`]). Returns the hashes added.
    pub async fn import_snapshot(
        &self,
        name: &DocName,
        merged: aspen_crdt::Merged,
    ) -> Result<Vec<[u8; 32]>, RpcError> {
        self.import_with(name, move |stored, doc| {
            aspen_crdt::plan_replace(stored, doc, merged)
        })
        .await
    }

    /// Plans an import against the stored document (created first if need be), off the
    /// executor, proposes it, and has the document's writer compact it if it left enough
    /// pending changes.
    async fn import_with(
        &self,
        name: &DocName,
        plan: impl FnOnce(&aspen_crdt::StoredDoc, &Automerge) -> Result<aspen_crdt::ChangePlan, DocError>
            + Send
            + 'static,
    ) -> Result<Vec<[u8; 32]>, RpcError> {
        let stored = self.stored_or_created(name).await?;
        let cache = self.cache.clone();
        let plan = tokio::task::spawn_blocking(move || {
            let doc = cache.load(&stored)?;
            let plan = plan(&stored, &doc);
            cache.keep(&stored, doc, &[]);
            plan
        })
        .await
        .map_err(|e| RpcError::Internal(format!("document task failed: {e}")))??;
        if let Some(txn) = plan.txn {
            if !self.cluster.propose_system_txn(txn).await? {
                return Err(RpcError::Unavailable(format!(
                    "document {name} was deleted or compacted while importing; retry"
                )));
            }
            self.to_writer(name, |w| w.compact = true);
        }
        Ok(plan.added)
    }

    /// Document `name` as stored (after a read barrier), created empty first if need be.
    async fn stored_or_created(&self, name: &DocName) -> Result<aspen_crdt::StoredDoc, RpcError> {
        self.cluster.read_barrier().await?;
        let stored = match self.read_stored(name).await? {
            Some(stored) => stored,
            None => {
                let txn = aspen_crdt::plan_create(
                    name,
                    rand::random(),
                    super::identity::unix_now() * 1000,
                );
                // Not applied: created meanwhile by someone else, which is as good.
                self.cluster.propose_system_txn(txn).await?;
                self.read_existing(name).await?
            }
        };
        Ok(stored)
    }

    async fn get(&self, name: String, consistency: Consistency) -> Result<DocResponse, RpcError> {
        let name = DocName::new(name)?;
        if consistency == Consistency::Linearizable {
            self.cluster.read_barrier().await?;
        }
        let stored = self.read_existing(&name).await?;
        Ok(DocResponse::Doc {
            snapshot: stored.snapshot()?,
            changes: stored.changes.into_iter().map(|(_, c)| c).collect(),
        })
    }

    async fn list(
        &self,
        start_after: Option<String>,
        limit: u32,
        consistency: Consistency,
    ) -> Result<DocResponse, RpcError> {
        let limit = (limit as usize).min(MAX_LIST_LIMIT);
        if consistency == Consistency::Linearizable {
            self.cluster.read_barrier().await?;
        }
        let (docs, more) = self
            .cluster
            .sm
            .system_view(move |view| {
                // Keys after `start_after`: from the smallest key greater than it.
                let from = match &start_after {
                    Some(after) => {
                        let mut k = [META_PREFIX, after.as_bytes()].concat();
                        k.push(0);
                        k
                    }
                    None => META_PREFIX.to_vec(),
                };
                let mut docs = Vec::new();
                let mut more = false;
                let mut bad = None;
                view.scan_from(META_PREFIX, &from, |key, value| {
                    if docs.len() == limit {
                        more = true;
                        return false;
                    }
                    let name = String::from_utf8_lossy(&key[META_PREFIX.len()..]).into_owned();
                    match DocMeta::decode(&name, value) {
                        Ok(meta) => docs.push(DocSummary {
                            name,
                            created_at_ms: meta.created_at_ms,
                        }),
                        Err(e) => {
                            bad = Some(e);
                            return false;
                        }
                    }
                    true
                })?;
                Ok(match bad {
                    Some(e) => Err(e),
                    None => Ok((docs, more)),
                })
            })
            .await??;
        Ok(DocResponse::List { docs, more })
    }

    async fn delete(&self, name: String) -> Result<DocResponse, RpcError> {
        let name = DocName::new(name)?;
        self.cluster.read_barrier().await?;
        let stored = self.read_existing(&name).await?;
        if self
            .cluster
            .propose_system_txn(aspen_crdt::plan_delete(&stored))
            .await?
        {
            self.cache.forget(&name);
            Ok(DocResponse::Done)
        } else {
            Err(DocError::NotFound(name.to_string()).into())
        }
    }
}
