//! The origin side of `aspen/federation/1`: other clusters' nodes call here to pull what
//! this cluster exports.
//!
//! A connection must open with a hello proving a cluster (its node certificate, for the key
//! QUIC proved); anything else is refused and closed. Every request is then checked against
//! the exports after a read barrier, so an export removed on any member stops serving at
//! once. Answers carry a manifest signed by the cluster key for exactly the state served:
//! if the document moved since the last manifest, the next one in the chain is signed and
//! committed through Raft (a conditional write on the previous one, so the chain never
//! forks, whichever member signs).
//!
//! Bounds: [`MAX_CONNECTIONS_PER_CLUSTER_NODE`] connections per calling key,
//! [`MAX_PENDING_HELLOS`] connections waiting to prove themselves (more are closed at once),
//! [`HELLO_TIMEOUT`] to prove, [`MAX_CONCURRENT_CALLS`] requests served at a time.

use std::sync::Arc;
use std::time::Duration;

use aspen_client::protocol::{NamespaceError, RpcError};
use aspen_client::wire::{read_frame, write_frame};
use aspen_crdt::DocName;
use aspen_federation::{
    caller_cluster, export_key, origin_manifest_key, Export, FedCall, FedError, FedReply, Hello,
    HelloReply, MAX_CALL_FRAME, MAX_CHANGES_PAGE_BYTES, MAX_FED_TAGS, MAX_REPLY_FRAME,
    MAX_SNAPSHOT_BYTES,
};
use aspen_kv::api::{SystemOp, SystemTxn};
use aspen_sync::doc_exchange::{changes_since, MAX_HAVE};
use aspen_sync::{BlobTagList, ContentDigest, Manifest, Resource, SignedManifest};
use aspen_trust::ClusterKey;
use iroh::endpoint::Connection;
use iroh::protocol::{AcceptError, ProtocolHandler};
use tokio::sync::Semaphore;

use crate::config::TestFault;
use crate::server::identity::unix_now;
use crate::server::{NodeState, REQUEST_READ_TIMEOUT};

/// Most federation connections one key may hold open on a node.
pub const MAX_CONNECTIONS_PER_CLUSTER_NODE: usize = 8;
/// Most connections that have not proven a cluster yet; more are closed at once.
pub const MAX_PENDING_HELLOS: usize = 64;
/// How long a new connection has to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most federation requests served at once (a page of changes costs CPU and memory).
pub const MAX_CONCURRENT_CALLS: usize = 16;
/// QUIC close code of a connection whose hello proved nothing (or never came).
pub const CLOSE_UNPROVEN: u32 = 0x11;
/// QUIC close code when the node is at one of its bounds.
pub const CLOSE_BUSY: u32 = 0x12;
/// How often a manifest is re-signed when another member signed concurrently.
const SIGN_ATTEMPTS: usize = 8;

/// The `aspen/federation/1` protocol handler.
pub struct FederationOrigin {
    state: Arc<NodeState>,
    open: Arc<super::super::ConnectionCounts>,
    hellos: Arc<Semaphore>,
    calls: Arc<Semaphore>,
}

impl std::fmt::Debug for FederationOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FederationOrigin")
    }
}

impl FederationOrigin {
    pub fn new(state: Arc<NodeState>) -> Self {
        FederationOrigin {
            state,
            open: Arc::new(super::super::ConnectionCounts::with_limit(
                MAX_CONNECTIONS_PER_CLUSTER_NODE,
            )),
            hellos: Arc::new(Semaphore::new(MAX_PENDING_HELLOS)),
            calls: Arc::new(Semaphore::new(MAX_CONCURRENT_CALLS)),
        }
    }

    /// Reads and checks the hello; answers it. `None`: refused (the connection is closed).
    async fn greet(&self, conn: &Connection) -> Option<ClusterKey> {
        let Ok(_pending) = self.hellos.clone().try_acquire_owned() else {
            conn.close(
                CLOSE_BUSY.into(),
                b"too many connections proving themselves",
            );
            return None;
        };
        let remote = *conn.remote_id().as_bytes();
        let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
            let (send, mut recv) = conn.accept_bi().await.ok()?;
            let hello = read_frame::<Hello>(&mut recv, MAX_CALL_FRAME).await.ok()?;
            Some((send, hello))
        })
        .await;
        let Ok(Some((mut send, hello))) = hello else {
            conn.close(CLOSE_UNPROVEN.into(), b"no hello");
            return None;
        };
        let reply = match caller_cluster(&hello, &remote, unix_now()) {
            Ok(cluster) => match self.state.own_certificate().await {
                Ok(certificate) => Ok((cluster, HelloReply::Welcome { certificate })),
                Err(e) => Err(HelloReply::Refused(FedError::Unavailable(e.to_string()))),
            },
            Err(e) => Err(HelloReply::Refused(e)),
        };
        match reply {
            Ok((cluster, welcome)) => {
                if let Ok(cert) = aspen_trust::NodeCertificate::decode(&hello.certificate) {
                    self.state
                        .fed
                        .peers
                        .remember(remote, cluster, cert.expires_at, unix_now());
                }
                if write_frame(&mut send, &welcome, MAX_REPLY_FRAME)
                    .await
                    .is_err()
                {
                    return None;
                }
                let _ = send.finish();
                tracing::debug!(%cluster, node = %conn.remote_id().fmt_short(), "federation peer proved its cluster");
                Some(cluster)
            }
            Err(refused) => {
                tracing::debug!(node = %conn.remote_id().fmt_short(), ?refused, "federation hello refused");
                let _ = write_frame(&mut send, &refused, MAX_REPLY_FRAME).await;
                let _ = send.finish();
                // Let the refusal reach the caller before the close does.
                let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
                conn.close(CLOSE_UNPROVEN.into(), b"hello refused");
                None
            }
        }
    }
}

impl ProtocolHandler for FederationOrigin {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let key = *conn.remote_id().as_bytes();
        let Some(_slot) = self.open.take(key) else {
            conn.close(CLOSE_BUSY.into(), b"too many connections from this key");
            return Ok(());
        };
        let Some(caller) = self.greet(&conn).await else {
            return Ok(());
        };
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let state = self.state.clone();
            let calls = self.calls.clone();
            tokio::spawn(async move {
                let read = tokio::time::timeout(
                    REQUEST_READ_TIMEOUT,
                    read_frame::<FedCall>(&mut recv, MAX_CALL_FRAME),
                );
                let reply = match read.await {
                    Ok(Ok(call)) => match calls.acquire_owned().await {
                        Ok(_permit) => serve(&state, &caller, call).await,
                        Err(_) => FedReply::Error(FedError::Unavailable("shutting down".into())),
                    },
                    Ok(Err(e)) => FedReply::Error(FedError::BadRequest(format!("bad frame: {e}"))),
                    Err(_) => FedReply::Error(FedError::BadRequest(format!(
                        "no complete request within {REQUEST_READ_TIMEOUT:?}"
                    ))),
                };
                if let Err(e) = write_frame(&mut send, &reply, MAX_REPLY_FRAME).await {
                    tracing::debug!("cannot answer federation peer: {e}");
                }
                let _ = send.finish();
            });
        }
        Ok(())
    }
}

async fn serve(state: &NodeState, caller: &ClusterKey, call: FedCall) -> FedReply {
    let started = std::time::Instant::now();
    let what = call.to_string();
    let served = match call {
        FedCall::Manifest { resource } => manifest(state, caller, resource).await,
        FedCall::DocChanges { name, have } => doc_changes(state, caller, name, have).await,
        FedCall::BlobTags { prefix } => blob_tags(state, caller, prefix).await,
        FedCall::DocSnapshot { name } => doc_snapshot(state, caller, name).await,
        FedCall::Mirrored { origin, call } => {
            super::mirror::serve(state, caller, &origin, &call).await
        }
    };
    tracing::debug!(%caller, call = what, ms = started.elapsed().as_millis() as u64, ok = served.is_ok(), "federation request served");
    served.unwrap_or_else(FedReply::Error)
}

/// Exported to `caller`? Decided after a read barrier (an unexport on any member counts),
/// whose wait for an election is bounded node-wide: any cluster can call this.
async fn check_export(
    state: &NodeState,
    caller: &ClusterKey,
    resource: &Resource,
) -> Result<(), FedError> {
    resource
        .check()
        .map_err(|e| FedError::BadRequest(e.to_string()))?;
    state
        .cluster
        .read_barrier_for_stranger()
        .await
        .map_err(unavailable)?;
    let stored = state
        .cluster
        .sm
        .system_get(export_key(resource))
        .await
        .map_err(|e| FedError::Internal(e.to_string()))?;
    let export = stored
        .as_deref()
        .map(Export::decode)
        .transpose()
        .map_err(|e| FedError::Internal(e.to_string()))?;
    match export {
        Some(export) if export.allows(&caller.to_bytes()) => Ok(()),
        _ => Err(FedError::not_exported(resource, caller)),
    }
}

async fn manifest(
    state: &NodeState,
    caller: &ClusterKey,
    resource: Resource,
) -> Result<FedReply, FedError> {
    check_export(state, caller, &resource).await?;
    let signed = signed_now(state, &resource).await?;
    Ok(FedReply::Manifest(signed.encode()))
}

/// The signed manifest of this cluster's `resource` as it is now (signed and committed first
/// if it changed since the last one). Exports are the caller's business.
pub(super) async fn signed_now(
    state: &NodeState,
    resource: &Resource,
) -> Result<SignedManifest, FedError> {
    let resource = resource.clone();
    let digest = match resource.kind {
        aspen_sync::ResourceKind::Doc => {
            let name = doc_name(&resource)?;
            let heads = state
                .docs
                .with_doc(&name, |doc| {
                    doc.get_heads().iter().map(|h| h.0).collect::<Vec<_>>()
                })
                .await
                .map_err(internal)?
                .ok_or_else(|| FedError::NotFound(resource.to_string()))?;
            ContentDigest::heads(heads)
        }
        aspen_sync::ResourceKind::Blob => tag_list(state, &resource.name).await?.digest(),
        aspen_sync::ResourceKind::Ns => {
            let id = ns_id(&resource)?;
            match state.namespaces.state_digest(&id).await {
                Ok(digest) => digest,
                Err(RpcError::Namespace(NamespaceError::Unknown(_))) => {
                    return Err(FedError::NotFound(resource.to_string()))
                }
                Err(RpcError::BadRequest(why)) => return Err(FedError::BadRequest(why)),
                Err(e) => return Err(internal(e)),
            }
        }
    };
    current_manifest(state, &resource, digest).await
}

/// A saved document as served (origin or mirror): at most [`MAX_SNAPSHOT_BYTES`], and with
/// its last byte flipped under the `fed-flip-byte` test fault.
pub(super) fn snapshot_to_serve(
    state: &NodeState,
    resource: &Resource,
    mut document: Vec<u8>,
) -> Result<Vec<u8>, FedError> {
    if document.len() > MAX_SNAPSHOT_BYTES {
        return Err(FedError::TooLarge(format!(
            "{resource} saves to {} bytes, more than {MAX_SNAPSHOT_BYTES} in one snapshot",
            document.len()
        )));
    }
    if state.cluster.test_fault == Some(TestFault::FedFlipByte) {
        if let Some(last) = document.last_mut() {
            *last ^= 1;
        }
    }
    Ok(document)
}

async fn doc_changes(
    state: &NodeState,
    caller: &ClusterKey,
    name: String,
    have: Vec<[u8; 32]>,
) -> Result<FedReply, FedError> {
    let resource = Resource::doc(name);
    if have.len() > MAX_HAVE {
        return Err(FedError::BadRequest(format!(
            "{} heads in `have`, the limit is {MAX_HAVE}",
            have.len()
        )));
    }
    check_export(state, caller, &resource).await?;
    let doc = doc_name(&resource)?;
    let fault = state.cluster.test_fault;
    let (heads, page) = state
        .docs
        .with_doc(&doc, move |doc| {
            let heads: Vec<[u8; 32]> = doc.get_heads().iter().map(|h| h.0).collect();
            let page = changes_since(doc, &have, MAX_CHANGES_PAGE_BYTES);
            let page = page.map(|mut page| {
                if fault == Some(TestFault::FedExtraChange) && !page.more {
                    page.changes.push(unsigned_change(doc));
                }
                page
            });
            (heads, page)
        })
        .await
        .map_err(internal)?
        .ok_or_else(|| FedError::NotFound(resource.to_string()))?;
    let mut page = page.map_err(|e| FedError::BadRequest(e.to_string()))?;
    if fault == Some(TestFault::FedFlipByte) {
        for change in &mut page.changes {
            if let Some(last) = change.last_mut() {
                *last ^= 1;
            }
        }
    }
    let signed = current_manifest(state, &resource, ContentDigest::heads(heads)).await?;
    Ok(FedReply::DocChanges {
        manifest: signed.encode(),
        changes: page.changes,
        more: page.more,
    })
}

async fn doc_snapshot(
    state: &NodeState,
    caller: &ClusterKey,
    name: String,
) -> Result<FedReply, FedError> {
    let resource = Resource::doc(name);
    check_export(state, caller, &resource).await?;
    let doc = doc_name(&resource)?;
    let (heads, document) = state
        .docs
        .with_doc(&doc, |doc| {
            let heads: Vec<[u8; 32]> = doc.get_heads().iter().map(|h| h.0).collect();
            (heads, doc.save())
        })
        .await
        .map_err(internal)?
        .ok_or_else(|| FedError::NotFound(resource.to_string()))?;
    let document = snapshot_to_serve(state, &resource, document)?;
    let signed = current_manifest(state, &resource, ContentDigest::heads(heads)).await?;
    Ok(FedReply::DocSnapshot {
        manifest: signed.encode(),
        document,
    })
}

/// The tags under `prefix` and the blobs they name (at most [`MAX_FED_TAGS`]).
async fn tag_list(state: &NodeState, prefix: &str) -> Result<BlobTagList, FedError> {
    let index = state.blobs.blob_index().await.map_err(internal)?;
    let entries: Vec<(String, [u8; 32])> = index
        .tags
        .iter()
        .filter(|(tag, _)| tag.as_str().starts_with(prefix))
        .take(MAX_FED_TAGS + 1)
        .map(|(tag, record)| (tag.as_str().to_string(), record.hash))
        .collect();
    if entries.len() > MAX_FED_TAGS {
        return Err(FedError::BadRequest(format!(
            "more than {MAX_FED_TAGS} tags under blob:{}; export narrower prefixes",
            prefix.escape_default()
        )));
    }
    BlobTagList::new(entries).map_err(internal)
}

async fn blob_tags(
    state: &NodeState,
    caller: &ClusterKey,
    prefix: String,
) -> Result<FedReply, FedError> {
    let resource = Resource::blob(prefix);
    check_export(state, caller, &resource).await?;
    let list = tag_list(state, &resource.name).await?;
    let signed = current_manifest(state, &resource, list.digest()).await?;
    let mut tags = list.entries().to_vec();
    // Test faults: a tag list other than the one signed for.
    match state.cluster.test_fault {
        Some(TestFault::FedFlipByte) => {
            if let Some((_, hash)) = tags.first_mut() {
                hash[0] ^= 0x5a;
            }
        }
        Some(TestFault::FedExtraChange) => {
            tags.push((format!("{}unsigned", resource.name), [7; 32]));
        }
        _ => {}
    }
    Ok(FedReply::BlobTags {
        manifest: signed.encode(),
        tags,
    })
}

/// A change on top of `doc` that the origin never signed for (test fault).
fn unsigned_change(doc: &automerge::Automerge) -> Vec<u8> {
    use automerge::transaction::Transactable;
    let mut fork = doc.fork();
    let mut tx = fork.transaction();
    let _ = tx.put(automerge::ROOT, "injected", "by a lying server");
    tx.commit();
    fork.get_last_local_change()
        .map(|c| c.raw_bytes().to_vec())
        .unwrap_or_default()
}

/// The signed manifest of `resource` with `digest`: the last one signed if it says the
/// same, else its successor, signed now and committed through Raft before it is served.
async fn current_manifest(
    state: &NodeState,
    resource: &Resource,
    digest: ContentDigest,
) -> Result<SignedManifest, FedError> {
    let secret = state
        .cluster_secret()
        .await
        .map_err(unavailable)?
        .ok_or_else(|| FedError::Unavailable("the cluster identity is not created yet".into()))?;
    let fault = state.cluster.test_fault;
    let key = origin_manifest_key(resource);
    for _ in 0..SIGN_ATTEMPTS {
        let stored = state
            .cluster
            .sm
            .system_get(key.clone())
            .await
            .map_err(|e| FedError::Internal(e.to_string()))?;
        let previous = stored
            .as_deref()
            .map(SignedManifest::decode)
            .transpose()
            .map_err(internal)?;
        let previous_manifest = previous
            .as_ref()
            .map(SignedManifest::manifest)
            .transpose()
            .map_err(internal)?;
        let next = |seq: u64, parent: Option<[u8; 32]>| Manifest {
            version: aspen_sync::manifest::MANIFEST_VERSION,
            origin: secret.public().to_bytes(),
            resource: resource.clone(),
            seq,
            digest: digest.clone(),
            parent,
            issued_at: unix_now(),
        };
        match fault {
            Some(TestFault::FedWrongKey) => {
                let m = next(1, None);
                let liar = aspen_trust::ClusterSecretKey::generate();
                let m = Manifest {
                    origin: liar.public().to_bytes(),
                    ..m
                };
                return SignedManifest::sign(&m, &liar).map_err(internal);
            }
            Some(TestFault::FedOldManifest) => {
                return SignedManifest::sign(&next(1, None), &secret).map_err(internal);
            }
            _ => {}
        }
        if let (Some(signed), Some(m)) = (&previous, &previous_manifest) {
            if m.digest == digest {
                return Ok(signed.clone());
            }
        }
        let manifest = match (&previous, &previous_manifest) {
            (Some(signed), Some(m)) => next(m.seq + 1, Some(signed.hash())),
            _ => next(1, None),
        };
        let signed = SignedManifest::sign(&manifest, &secret).map_err(internal)?;
        let txn = SystemTxn {
            require: vec![(key.clone(), stored)],
            writes: vec![SystemOp::Put {
                key: key.clone(),
                value: signed.encode(),
            }],
        };
        if state
            .cluster
            .propose_system_txn(txn)
            .await
            .map_err(unavailable)?
        {
            tracing::debug!(%resource, seq = manifest.seq, "manifest signed");
            return Ok(signed);
        }
    }
    Err(FedError::Unavailable(
        "the manifest kept changing concurrently; retry".into(),
    ))
}

fn doc_name(resource: &Resource) -> Result<DocName, FedError> {
    DocName::new(resource.name.clone()).map_err(|e| FedError::BadRequest(e.to_string()))
}

/// The namespace id an `ns` resource names (its name is the id in hex, checked when the
/// manifest is signed; checked here before anything is looked up).
fn ns_id(resource: &Resource) -> Result<[u8; 32], FedError> {
    hex::decode(&resource.name)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| FedError::BadRequest(format!("{resource} does not name a namespace id")))
}

fn internal(e: impl std::fmt::Display) -> FedError {
    FedError::Internal(e.to_string())
}

fn unavailable(e: impl std::fmt::Display) -> FedError {
    FedError::Unavailable(e.to_string())
}
