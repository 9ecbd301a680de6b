//! The document service: Automerge documents over the client protocol.
//!
//! What may be committed is decided by `aspen_crdt`; this module reads the stored document
//! from the state machine (one consistent view), runs the Automerge work on the blocking pool,
//! and proposes the resulting system transaction through Raft. Every write first passes the
//! read barrier, so it is checked against everything committed before it began. Loaded
//! documents are kept between requests ([`aspen_crdt::cache`]), so a commit applies only the
//! changes committed since the node last loaded the document.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use aspen_client::protocol::{Consistency, DocRequest, DocResponse, DocSummary, RpcError};
use aspen_crdt::cache::DocCache;
use aspen_crdt::layout::{DocMeta, META_PREFIX};
use aspen_crdt::limits::{COMPACT_AFTER_BYTES, COMPACT_AFTER_CHANGES, MAX_LIST_LIMIT};
use aspen_crdt::{DocError, DocName, StoredDoc};
use automerge::Automerge;

use super::ClusterHandle;

/// Documents this node is compacting (at most one compaction per document at a time).
#[derive(Default)]
pub struct Compactions(Mutex<HashSet<DocName>>);

/// Serves Automerge documents; holds the documents it has loaded between requests.
pub struct DocService {
    cluster: ClusterHandle,
    /// Automerge documents loaded on this node, kept between requests.
    cache: Arc<DocCache>,
    /// Documents being compacted by this node.
    compactions: Compactions,
}

impl DocService {
    pub fn new(cluster: ClusterHandle) -> Self {
        DocService {
            cluster,
            cache: Default::default(),
            compactions: Default::default(),
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

    async fn change(&self, name: String, changes: Vec<Vec<u8>>) -> Result<DocResponse, RpcError> {
        let name = DocName::new(name)?;
        self.cluster.read_barrier().await?;
        let stored = self.read_existing(&name).await?;
        let cache = self.cache.clone();
        let (stored, plan) = tokio::task::spawn_blocking(move || {
            let doc = cache.load(&stored)?;
            let plan = aspen_crdt::plan_changes(&stored, &doc, changes);
            // Still the document `stored` describes (the plan applies to a copy).
            cache.keep(&stored, doc);
            Ok::<_, DocError>((stored, plan?))
        })
        .await
        .map_err(|e| RpcError::Internal(format!("document task failed: {e}")))??;
        if let Some(txn) = plan.txn {
            let added_bytes = txn.payload_bytes();
            if !self.cluster.propose_system_txn(txn).await? {
                // Deleted (or deleted and re-created) since we read it.
                return Err(DocError::NotFound(name.to_string()).into());
            }
            let pending = stored.changes.len() + plan.added.len();
            if pending >= COMPACT_AFTER_CHANGES
                || stored.pending_bytes() + added_bytes >= COMPACT_AFTER_BYTES
            {
                if let Err(e) = self.compact(&name).await {
                    tracing::warn!(doc = %name, "compaction failed: {e}");
                }
            }
        }
        Ok(DocResponse::Changed {
            added: plan.added,
            heads: plan.heads,
        })
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
            cache.keep(&stored, doc);
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
    /// executor, proposes it, and compacts if it left enough pending changes.
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
            cache.keep(&stored, doc);
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
            if let Err(e) = self.compact(name).await {
                tracing::warn!(doc = %name, "compaction failed: {e}");
            }
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

    /// Replaces the document's pending changes with a compacted snapshot (through Raft), unless
    /// another compaction of it runs on this node.
    async fn compact(&self, name: &DocName) -> Result<(), RpcError> {
        if !self
            .compactions
            .0
            .lock()
            .expect("lock")
            .insert(name.clone())
        {
            return Ok(());
        }
        let result = async {
            self.cluster.read_barrier().await?;
            let Some(stored) = self.read_stored(name).await? else {
                return Ok(());
            };
            let cache = self.cache.clone();
            let txn = tokio::task::spawn_blocking(move || {
                let doc = cache.load(&stored)?;
                let txn = aspen_crdt::plan_compaction(&stored, &doc);
                cache.keep(&stored, doc);
                Ok::<_, DocError>(txn)
            })
            .await
            .map_err(|e| RpcError::Internal(format!("compaction task failed: {e}")))??;
            if let Some(txn) = txn {
                let applied = self.cluster.propose_system_txn(txn).await?;
                tracing::debug!(doc = %name, applied, "compaction");
            }
            Ok(())
        }
        .await;
        self.compactions.0.lock().expect("lock").remove(name);
        result
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
