//! The document service: Automerge documents over the client protocol.
//!
//! What may be committed is decided by `aspen_crdt`; this module reads the stored document
//! from the state machine (one consistent view), runs the Automerge work on the blocking pool,
//! and proposes the resulting system transaction through Raft. Every write first passes the
//! read barrier, so it is checked against everything committed before it began. Loaded
//! documents are kept between requests ([`aspen_crdt::cache`]), so a commit applies only the
//! changes committed since the node last loaded the document.

use std::collections::HashSet;
use std::sync::Mutex;

use aspen_client::protocol::{ClientResponse, Consistency, DocSummary, RpcError};
use aspen_crdt::layout::{DocMeta, META_PREFIX};
use aspen_crdt::limits::{COMPACT_AFTER_BYTES, COMPACT_AFTER_CHANGES, MAX_LIST_LIMIT};
use aspen_crdt::{DocError, DocName, StoredDoc};
use aspen_kv::api::{Command, SystemTxn, WriteOp, WriteOutcome};

use super::NodeState;

/// Documents this node is compacting (at most one compaction per document at a time).
#[derive(Default)]
pub struct Compactions(Mutex<HashSet<DocName>>);

impl NodeState {
    pub(super) async fn propose_system_txn(&self, txn: SystemTxn) -> Result<bool, RpcError> {
        let results = self
            .propose(vec![Command {
                session: None,
                op: WriteOp::SystemTxn(txn),
            }])
            .await?;
        match results.into_iter().next() {
            Some(Ok(WriteOutcome::SystemTxn { applied, .. })) => Ok(applied),
            Some(Ok(other)) => Err(RpcError::Internal(format!(
                "unexpected outcome of a system transaction: {other:?}"
            ))),
            Some(Err(e)) => Err(RpcError::Internal(format!(
                "system transaction refused: {e}"
            ))),
            None => Err(RpcError::Internal(
                "no result for a system transaction".into(),
            )),
        }
    }

    async fn read_stored(&self, name: &DocName) -> Result<Option<StoredDoc>, RpcError> {
        let name = name.clone();
        Ok(self
            .sm
            .system_view(move |view| aspen_crdt::read_doc(view, &name))
            .await??)
    }

    async fn read_existing(&self, name: &DocName) -> Result<StoredDoc, RpcError> {
        self.read_stored(name)
            .await?
            .ok_or_else(|| DocError::NotFound(name.to_string()).into())
    }

    pub(super) async fn doc_create(
        &self,
        name: String,
        incarnation: [u8; 16],
    ) -> Result<ClientResponse, RpcError> {
        let name = DocName::new(name)?;
        let txn = aspen_crdt::plan_create(&name, incarnation, super::identity::unix_now() * 1000);
        if self.propose_system_txn(txn).await? {
            return Ok(ClientResponse::Done);
        }
        // A retry of a create that was applied finds its own incarnation.
        match self.read_stored(&name).await? {
            Some(stored) if stored.meta.incarnation == incarnation => Ok(ClientResponse::Done),
            _ => Err(DocError::Exists(name.to_string()).into()),
        }
    }

    pub(super) async fn doc_change(
        &self,
        name: String,
        changes: Vec<Vec<u8>>,
    ) -> Result<ClientResponse, RpcError> {
        let name = DocName::new(name)?;
        self.read_barrier().await?;
        let stored = self.read_existing(&name).await?;
        let cache = self.doc_cache.clone();
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
            if !self.propose_system_txn(txn).await? {
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
        Ok(ClientResponse::DocChanged {
            added: plan.added,
            heads: plan.heads,
        })
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
            self.read_barrier().await?;
            let Some(stored) = self.read_stored(name).await? else {
                return Ok(());
            };
            let cache = self.doc_cache.clone();
            let txn = tokio::task::spawn_blocking(move || {
                let doc = cache.load(&stored)?;
                let txn = aspen_crdt::plan_compaction(&stored, &doc);
                cache.keep(&stored, doc);
                Ok::<_, DocError>(txn)
            })
            .await
            .map_err(|e| RpcError::Internal(format!("compaction task failed: {e}")))??;
            if let Some(txn) = txn {
                let applied = self.propose_system_txn(txn).await?;
                tracing::debug!(doc = %name, applied, "compaction");
            }
            Ok(())
        }
        .await;
        self.compactions.0.lock().expect("lock").remove(name);
        result
    }

    pub(super) async fn doc_get(
        &self,
        name: String,
        consistency: Consistency,
    ) -> Result<ClientResponse, RpcError> {
        let name = DocName::new(name)?;
        if consistency == Consistency::Linearizable {
            self.read_barrier().await?;
        }
        let stored = self.read_existing(&name).await?;
        Ok(ClientResponse::Doc {
            snapshot: stored.snapshot()?,
            changes: stored.changes.into_iter().map(|(_, c)| c).collect(),
        })
    }

    pub(super) async fn doc_list(
        &self,
        start_after: Option<String>,
        limit: u32,
        consistency: Consistency,
    ) -> Result<ClientResponse, RpcError> {
        let limit = (limit as usize).min(MAX_LIST_LIMIT);
        if consistency == Consistency::Linearizable {
            self.read_barrier().await?;
        }
        let (docs, more) = self
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
        Ok(ClientResponse::DocList { docs, more })
    }

    pub(super) async fn doc_delete(&self, name: String) -> Result<ClientResponse, RpcError> {
        let name = DocName::new(name)?;
        self.read_barrier().await?;
        let stored = self.read_existing(&name).await?;
        if self
            .propose_system_txn(aspen_crdt::plan_delete(&stored))
            .await?
        {
            self.doc_cache.forget(&name);
            Ok(ClientResponse::Done)
        } else {
            Err(DocError::NotFound(name.to_string()).into())
        }
    }
}
