//! The follower side: the leader pulls every follow on a schedule, verifies what it gets
//! against the origin's signed manifest, and commits it through this cluster's Raft.
//!
//! Every member runs [`run`]; only the leader pulls (a member that loses leadership stops
//! its pulls; the next leader starts from the follows and last accepted manifests in Raft,
//! with fresh timing). One pull of a document:
//!
//! 1. dial the origin (the follow's hints, then the origin's DHT record or its cached
//!    copy), prove our cluster with a hello and check the origin node's certificate;
//! 2. ask for the changes we lack (`have`: our heads and the last accepted manifest's),
//!    page by page; verify each page's manifest (signature, resource, never older than the
//!    last accepted one) and apply the page to a copy of our document;
//! 3. check the copy covers the last manifest's heads and holds nothing the origin did not
//!    sign for; commit the new changes through Raft, then record the manifest (conditional
//!    on the follow still being there).
//!
//! Any failure leaves the committed copy as it was and is kept in the follow's status; the
//! next attempt backs off ([`aspen_federation::PullSchedule`]).
//!
//! When the origin cannot be reached, the same pull runs against its mirrors (the follow's
//! `--via` list, then the clusters the DHT directory of the resource names), each call
//! wrapped in [`FedCall::Mirrored`]. Nothing else changes: every answer is verified against
//! the origin's key and the last accepted manifest, so a mirror that is stale (older than
//! what we hold), forges data or signs with its own key is refused, reported in the follow's
//! status, and the next one tried. Mirrors that failed last time are tried last.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aspen_client::protocol::{FollowSummary, MirrorReport};
use aspen_client::wire::{read_frame, write_frame};
use aspen_crdt::DocName;
use aspen_discovery::{ClusterDht, Resolver};
use aspen_federation::{
    check_welcome, directory_topic, follow_state_key, follow_tags_key, parse_follow_key, FedCall,
    FedError, FedReply, Follow, Hello, HelloReply, Hint, PullSchedule, FEDERATION_ALPN,
    FOLLOW_PREFIX, MAX_CALL_FRAME, MAX_FED_TAGS, MAX_FOLLOWS, MAX_MIRRORS_TRIED, MAX_REPLY_FRAME,
};
use aspen_kv::api::{SystemOp, SystemTxn};
use aspen_sync::doc_exchange::{DocPull, ExchangeError};
use aspen_sync::{
    check_successor, BlobTagList, Manifest, ManifestError, Resource, ResourceKind, SignedManifest,
};
use aspen_trust::ClusterKey;
use iroh::endpoint::Connection;
use iroh::{Endpoint, EndpointAddr};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::server::identity::{unix_now, unix_now_ms};
use crate::server::{ClusterHandle, NodeState};

/// Most pulls running at once on the leader.
pub const MAX_CONCURRENT_PULLS: usize = 4;
/// Longest a whole pull may take.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest one request to the origin may take (a page is at most 8 MiB).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a dial (QUIC handshake and hello) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The same for an origin whose follow was last served by a mirror (the origin was
/// unreachable then): a dead origin would otherwise hold every pull, announced ones too,
/// for [`CONNECT_TIMEOUT`] per address before its mirrors are asked.
pub const SUSPECT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest finding an origin through the DHT may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Most pages of changes one pull takes (each at most 8 MiB; a document is at most 16 MiB,
/// so an honest origin needs a few).
pub const MAX_PAGES: usize = 64;
/// Syncs one namespace pull tries before its replica must match the origin's signed state.
pub const NS_SYNC_ROUNDS: usize = 3;
/// Most entry contents one namespace pull fetches (the rest wait for the next pull).
pub const MAX_NS_FETCHES: usize = 4096;
/// How often a leader re-reads the follows and checks it is still the leader.
const TICK: Duration = Duration::from_secs(1);

/// Identifies a follow: the origin's key and the resource.
pub type FollowId = ([u8; 32], Resource);

/// How a follow's pulls go, on this leader.
#[derive(Clone, Debug, Default)]
pub struct PullStatus {
    pub last_attempt_ms: u64,
    pub last_success_ms: u64,
    pub next_attempt: Option<Instant>,
    pub next_attempt_ms: u64,
    pub failures: u32,
    pub last_error: Option<String>,
    /// The mirror the last success came from (None: the origin).
    pub last_source: Option<[u8; 32]>,
    /// Each mirror's outcome the last time a pull tried it (at most [`MAX_MIRRORS_TRIED`],
    /// the most recently tried).
    pub mirrors: Vec<MirrorReport>,
    running: bool,
    forced: bool,
    /// The stored follow this status describes. Unfollowing and following the same
    /// resource again is a new follow: its status starts afresh, and what a pull of the
    /// old one finds afterwards is dropped.
    follow: Vec<u8>,
}

impl PullStatus {
    /// Records what a pull found at each mirror it tried: a mirror's latest outcome
    /// replaces its earlier one; the most recently tried are kept.
    fn merge_reports(&mut self, reports: Vec<MirrorReport>) {
        for report in reports {
            self.mirrors.retain(|m| m.cluster != report.cluster);
            self.mirrors.push(report);
        }
        let excess = self.mirrors.len().saturating_sub(MAX_MIRRORS_TRIED);
        self.mirrors.drain(..excess);
    }
}

/// The pull state the follower task and the federation service share.
#[derive(Default)]
pub struct Pulls {
    status: Mutex<HashMap<FollowId, PullStatus>>,
    /// Wakes the follower task (a sync request).
    wake: tokio::sync::Notify,
    /// Counts finished pulls (sync requests wait on it).
    finished: tokio::sync::watch::Sender<u64>,
    /// Per cluster (origin or mirror): the address of the node that last answered a hello
    /// with that cluster's certificate. Tried first by the next dial; the announcement
    /// listener joins an origin's topics through its node, and the gate admits these nodes
    /// on the gossip ALPN.
    pub reached: Mutex<HashMap<[u8; 32], EndpointAddr>>,
}

impl Pulls {
    /// Every follow's pull status on this node (empty unless it leads).
    pub fn all(&self) -> Vec<(FollowId, PullStatus)> {
        let status = self.status.lock().expect("lock");
        status.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn status_of(&self, id: &FollowId) -> PullStatus {
        self.status
            .lock()
            .expect("lock")
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    /// Marks the follows `matches` selects to be pulled now; returns how many.
    pub fn force(&self, ids: &[FollowId]) {
        let mut status = self.status.lock().expect("lock");
        for id in ids {
            status.entry(id.clone()).or_default().forced = true;
        }
        drop(status);
        self.wake.notify_one();
    }

    /// Waits until every follow in `ids` has finished an attempt that started at or after
    /// `since_ms`, or `timeout` passed.
    pub async fn wait_attempted(&self, ids: &[FollowId], since_ms: u64, timeout: Duration) {
        let mut finished = self.finished.subscribe();
        let _ = tokio::time::timeout(timeout, async {
            loop {
                let done = {
                    let status = self.status.lock().expect("lock");
                    ids.iter().all(|id| {
                        status.get(id).is_some_and(|s| {
                            !s.running && !s.forced && s.last_attempt_ms >= since_ms
                        })
                    })
                };
                if done || finished.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }
}

/// Why a pull failed (shown in `aspen fed status`).
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("refused: {0}")]
    Refused(FedError),
    #[error("bad answer from the origin: {0}")]
    Protocol(String),
    #[error("manifest rejected: {0}")]
    Manifest(#[from] ManifestError),
    #[error("data rejected: {0}")]
    Data(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("cannot commit locally: {0}")]
    Commit(String),
    #[error("{0}")]
    NoSource(String),
}

/// What a successful pull did.
#[derive(Debug)]
pub struct Pulled {
    pub seq: u64,
    pub added: usize,
    /// The mirror it came from (None: the origin).
    pub via: Option<[u8; 32]>,
}

/// Where a pull's data comes from: the origin, or a mirror of it. Everything it serves is
/// checked against the origin's key either way.
struct Source {
    conn: Connection,
    /// The node answering (blobs are fetched from it, namespaces synced with it).
    addr: EndpointAddr,
    origin: ClusterKey,
    /// The mirror's cluster, when not the origin.
    mirror: Option<ClusterKey>,
    /// Our endpoint (a namespace sync dials the node itself).
    endpoint: Endpoint,
}

impl Source {
    /// One call, addressed to the origin's resource at a mirror when this is one.
    async fn ask(&self, call: FedCall) -> Result<FedReply, PullError> {
        match &self.mirror {
            None => exchange(&self.conn, &call).await,
            Some(_) => exchange(&self.conn, &FedCall::via_mirror(&self.origin, &call)).await,
        }
    }

    /// Names the source in logs and errors.
    fn describe(&self) -> String {
        match &self.mirror {
            None => "origin".into(),
            Some(m) => format!("mirror {}", &m.to_string()[..16]),
        }
    }
}

/// Dials origins. A connection lives for one pull (a connection kept between pulls would
/// hang on an origin that restarted until QUIC's idle timeout noticed); the address that
/// worked last is tried first next time.
struct Dialer {
    endpoint: Endpoint,
    resolver: Resolver,
    dht: Option<ClusterDht>,
    pulls: Arc<Pulls>,
    /// Addresses of nodes reached, for iroh's own dials by id (gossip).
    addrs: iroh::address_lookup::MemoryLookup,
}

impl Dialer {
    /// Reaches a member of `origin` (the cluster to reach: an origin or a mirror): the
    /// address that worked last, the hints, then its DHT record's members, each given
    /// `timeout` to connect and answer the hello.
    async fn connect(
        &self,
        state: &NodeState,
        origin: &ClusterKey,
        hints: &[Hint],
        timeout: Duration,
    ) -> Result<(Connection, EndpointAddr), PullError> {
        let certificate = state
            .own_certificate()
            .await
            .map_err(|e| PullError::Commit(format!("no certificate of our own: {e}")))?;
        let mut problems = Vec::new();
        let mut tried = Vec::new();
        let last_good = self
            .pulls
            .reached
            .lock()
            .expect("lock")
            .get(&origin.to_bytes())
            .cloned();
        let mut candidates: Vec<EndpointAddr> = last_good.into_iter().collect();
        for hint in hints {
            let mut addr = EndpointAddr::new(key_of(&hint.node)?);
            for a in &hint.addrs {
                addr = addr.with_ip_addr(*a);
            }
            candidates.push(addr);
        }
        for addr in candidates {
            if tried.contains(&addr) {
                continue;
            }
            tried.push(addr.clone());
            match self.dial(addr.clone(), origin, &certificate, timeout).await {
                Ok(conn) => return Ok((conn, addr)),
                Err(e @ PullError::Refused(_)) => return Err(e),
                Err(PullError::Unreachable(why)) => problems.push(why),
                Err(e) => problems.push(e.to_string()),
            }
        }
        match tokio::time::timeout(RESOLVE_TIMEOUT, self.resolver.resolve(origin, unix_now())).await
        {
            Ok(Ok(resolved)) => {
                for member in &resolved.record.members {
                    let mut addr = EndpointAddr::new(key_of(&member.node)?);
                    for a in &member.addrs {
                        addr = addr.with_ip_addr(*a);
                    }
                    if tried.contains(&addr) {
                        continue;
                    }
                    tried.push(addr.clone());
                    match self.dial(addr.clone(), origin, &certificate, timeout).await {
                        Ok(conn) => return Ok((conn, addr)),
                        Err(e @ PullError::Refused(_)) => return Err(e),
                        Err(PullError::Unreachable(why)) => problems.push(why),
                        Err(e) => problems.push(e.to_string()),
                    }
                }
                if resolved.record.members.is_empty() {
                    problems.push("its record lists no members".into());
                }
            }
            Ok(Err(e)) => problems.push(e.to_string()),
            Err(_) => problems.push(format!("no DHT answer within {RESOLVE_TIMEOUT:?}")),
        }
        Err(PullError::Unreachable(problems.join("; ")))
    }

    /// The mirrors to try for `origin`'s `resource`, in order: the follow's `via` list, then
    /// those the DHT directory names, except that those in `failed_last` (refused or
    /// unreachable when last tried) go after all the others; never the origin or this
    /// cluster; at most [`MAX_MIRRORS_TRIED`]. `problems` gets why the DHT could not be asked.
    async fn mirrors_of(
        &self,
        origin: &ClusterKey,
        resource: &Resource,
        follow: &Follow,
        own: Option<ClusterKey>,
        failed_last: &[[u8; 32]],
        problems: &mut Vec<String>,
    ) -> Vec<(ClusterKey, Vec<Hint>)> {
        let mut out: Vec<(ClusterKey, Vec<Hint>)> = Vec::new();
        for via in &follow.via {
            if let Ok(key) = ClusterKey::from_bytes(&via.cluster) {
                out.push((key, via.nodes.clone()));
            }
        }
        if let Some(dht) = &self.dht {
            let topic = directory_topic(origin, resource);
            let found = tokio::time::timeout(
                RESOLVE_TIMEOUT,
                dht.find_mirrors(&topic, origin, unix_now()),
            )
            .await;
            match found {
                Ok(Ok(keys)) => {
                    tracing::debug!(%origin, %resource, mirrors = keys.len(), "mirror directory read");
                    for key in keys {
                        if !out.iter().any(|(k, _)| *k == key) {
                            out.push((key, Vec::new()));
                        }
                    }
                }
                Ok(Err(e)) => problems.push(format!("mirror directory: {e}")),
                Err(_) => problems.push(format!(
                    "mirror directory: no DHT answer within {RESOLVE_TIMEOUT:?}"
                )),
            }
        }
        // Those that failed last time go last: a named mirror that served forged data is
        // not asked first again. A stable sort keeps the order within each group.
        out.sort_by_key(|(k, _)| failed_last.contains(&k.to_bytes()));
        out.retain(|(k, _)| k != origin && Some(*k) != own);
        out.truncate(MAX_MIRRORS_TRIED);
        out
    }

    /// Connects, says hello, and checks the node answering is a member of `origin`.
    async fn dial(
        &self,
        addr: EndpointAddr,
        origin: &ClusterKey,
        certificate: &[u8],
        timeout: Duration,
    ) -> Result<Connection, PullError> {
        let node = addr.id;
        let remembered = addr.clone();
        let greet = async {
            let conn = self
                .endpoint
                .connect(addr, FEDERATION_ALPN)
                .await
                .map_err(|e| PullError::Unreachable(format!("{}: {e}", node.fmt_short())))?;
            let reply = exchange::<_, HelloReply>(
                &conn,
                &Hello {
                    certificate: certificate.to_vec(),
                },
            )
            .await?;
            match reply {
                HelloReply::Welcome { certificate } => {
                    check_welcome(
                        &certificate,
                        origin,
                        conn.remote_id().as_bytes(),
                        unix_now(),
                    )
                    .map_err(|e| PullError::Protocol(e.to_string()))?;
                    self.addrs.add_endpoint_info(remembered.clone());
                    self.pulls
                        .reached
                        .lock()
                        .expect("lock")
                        .insert(origin.to_bytes(), remembered);
                    Ok(conn)
                }
                HelloReply::Refused(e) => Err(PullError::Refused(e)),
            }
        };
        tokio::time::timeout(timeout, greet).await.map_err(|_| {
            PullError::Unreachable(format!(
                "{}: no hello answer within {timeout:?}",
                node.fmt_short()
            ))
        })?
    }
}

fn key_of(bytes: &[u8; 32]) -> Result<iroh::EndpointId, PullError> {
    iroh::EndpointId::from_bytes(bytes)
        .map_err(|_| PullError::Protocol("a node id that is not a key".into()))
}

/// One request on its own stream, one answer.
async fn exchange<Q: serde::Serialize, A: serde::de::DeserializeOwned>(
    conn: &Connection,
    request: &Q,
) -> Result<A, PullError> {
    let io = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| PullError::Unreachable(e.to_string()))?;
        write_frame(&mut send, request, MAX_CALL_FRAME)
            .await
            .map_err(|e| PullError::Unreachable(e.to_string()))?;
        let _ = send.finish();
        read_frame::<A>(&mut recv, MAX_REPLY_FRAME)
            .await
            .map_err(|e| PullError::Protocol(e.to_string()))
    };
    tokio::time::timeout(CALL_TIMEOUT, io)
        .await
        .map_err(|_| PullError::Timeout(format!("no answer within {CALL_TIMEOUT:?}")))?
}

/// Every follow, with its key bytes' value, in key order.
pub async fn list_follows(
    cluster: &ClusterHandle,
) -> Result<Vec<(ClusterKey, Resource, Follow, Vec<u8>)>, String> {
    let entries = cluster
        .sm
        .system_scan(FOLLOW_PREFIX.to_vec(), MAX_FOLLOWS + 1)
        .await
        .map_err(|e| e.to_string())?;
    entries
        .into_iter()
        .map(|(key, value)| {
            let (origin, resource) = parse_follow_key(&key).map_err(|e| e.to_string())?;
            let follow = Follow::decode(&value).map_err(|e| e.to_string())?;
            Ok((origin, resource, follow, value))
        })
        .collect()
}

/// The last manifest accepted for a follow (re-checked: it was verified when stored).
pub async fn accepted_manifest(
    cluster: &ClusterHandle,
    origin: &ClusterKey,
    resource: &Resource,
) -> Result<(Option<Vec<u8>>, Option<(Manifest, [u8; 32])>), String> {
    let stored = cluster
        .sm
        .system_get(follow_state_key(origin, resource))
        .await
        .map_err(|e| e.to_string())?;
    let accepted = match &stored {
        None => None,
        Some(bytes) => {
            let signed = SignedManifest::decode(bytes).map_err(|e| e.to_string())?;
            let manifest = signed
                .verify(origin, resource)
                .map_err(|e| format!("stored manifest: {e}"))?;
            Some((manifest, signed.hash()))
        }
    };
    Ok((stored, accepted))
}

/// A follow's summary: what Raft holds and this leader's pull status.
pub fn summary(
    origin: &ClusterKey,
    resource: &Resource,
    follow: &Follow,
    accepted: Option<&Manifest>,
    status: &PullStatus,
) -> FollowSummary {
    FollowSummary {
        origin: origin.to_bytes(),
        resource: resource.clone(),
        into: follow.into.clone(),
        created_at_ms: follow.created_at_ms,
        seq: accepted.map_or(0, |m| m.seq),
        manifest_issued_at_ms: accepted.map_or(0, |m| m.issued_at * 1000),
        last_success_ms: status.last_success_ms,
        last_attempt_ms: status.last_attempt_ms,
        next_attempt_ms: status.next_attempt_ms,
        failures: status.failures,
        last_error: status.last_error.clone(),
        via: follow.via.iter().map(|v| v.cluster).collect(),
        last_source: status.last_source,
        mirrors: status.mirrors.clone(),
    }
}

/// Records `signed` as the last manifest accepted for a follow (unless it already is, and
/// there are no `extra` writes), on the condition that the follow and the previous state
/// are unchanged.
#[allow(clippy::too_many_arguments)]
async fn record_manifest(
    state: &NodeState,
    origin: &ClusterKey,
    resource: &Resource,
    follow_bytes: Vec<u8>,
    stored_state: Option<Vec<u8>>,
    accepted: Option<&(Manifest, [u8; 32])>,
    signed: &SignedManifest,
    extra: Vec<SystemOp>,
) -> Result<(), PullError> {
    if extra.is_empty() && accepted.is_some_and(|(_, h)| *h == signed.hash()) {
        return Ok(());
    }
    let txn = SystemTxn {
        require: vec![
            (
                aspen_federation::follow_key(origin, resource),
                Some(follow_bytes),
            ),
            (follow_state_key(origin, resource), stored_state),
        ],
        writes: [
            vec![SystemOp::Put {
                key: follow_state_key(origin, resource),
                value: signed.encode(),
            }],
            extra,
        ]
        .concat(),
    };
    if !state
        .cluster
        .propose_system_txn(txn)
        .await
        .map_err(|e| PullError::Commit(e.to_string()))?
    {
        return Err(PullError::Commit(
            "the follow changed while pulling; pulled again next time".into(),
        ));
    }
    Ok(())
}

/// What the follow's previous pulls found, for ordering this one's sources.
struct Previously {
    /// The mirrors that failed (tried last this time).
    failed_mirrors: Vec<[u8; 32]>,
    /// A mirror served the last success: the origin was unreachable then.
    origin_down: bool,
}

/// Pulls one follow: from the origin, or, when the origin cannot be reached, from its
/// mirrors in turn until one serves verified data. Returns what each mirror tried did.
async fn pull(
    state: Arc<NodeState>,
    dialer: Arc<Dialer>,
    origin: ClusterKey,
    resource: Resource,
    follow: Follow,
    follow_bytes: Vec<u8>,
    previously: Previously,
) -> (Result<Pulled, PullError>, Vec<MirrorReport>) {
    let mut reports = Vec::new();
    let timeout = if previously.origin_down {
        SUSPECT_CONNECT_TIMEOUT
    } else {
        CONNECT_TIMEOUT
    };
    let unreachable = match dialer
        .connect(&state, &origin, &follow.hints, timeout)
        .await
    {
        Ok((conn, addr)) => {
            let source = Source {
                conn,
                addr,
                origin,
                mirror: None,
                endpoint: dialer.endpoint.clone(),
            };
            let pulled = pull_from(&state, &source, &resource, &follow, follow_bytes).await;
            source.conn.close(0u32.into(), b"pull done");
            return (pulled, reports);
        }
        Err(e @ (PullError::Unreachable(_) | PullError::Timeout(_))) => e,
        Err(e) => return (Err(e), reports),
    };
    let own = state
        .cluster_secret()
        .await
        .ok()
        .flatten()
        .map(|k| k.public());
    let mut problems = vec![format!("origin {unreachable}")];
    let mirrors = dialer
        .mirrors_of(
            &origin,
            &resource,
            &follow,
            own,
            &previously.failed_mirrors,
            &mut problems,
        )
        .await;
    for (mirror, hints) in &mirrors {
        let outcome = match dialer.connect(&state, mirror, hints, CONNECT_TIMEOUT).await {
            Ok((conn, addr)) => {
                let source = Source {
                    conn,
                    addr,
                    origin,
                    mirror: Some(*mirror),
                    endpoint: dialer.endpoint.clone(),
                };
                let pulled =
                    pull_from(&state, &source, &resource, &follow, follow_bytes.clone()).await;
                source.conn.close(0u32.into(), b"pull done");
                pulled
            }
            Err(e) => Err(e),
        };
        let at_ms = unix_now_ms();
        match outcome {
            Ok(mut pulled) => {
                reports.push(MirrorReport {
                    cluster: mirror.to_bytes(),
                    ok: true,
                    detail: String::new(),
                    at_ms,
                });
                pulled.via = Some(mirror.to_bytes());
                return (Ok(pulled), reports);
            }
            Err(e) => {
                tracing::info!(%origin, %resource, %mirror, "mirror refused: {e}");
                reports.push(MirrorReport {
                    cluster: mirror.to_bytes(),
                    ok: false,
                    detail: e.to_string(),
                    at_ms,
                });
            }
        }
    }
    let summary = if mirrors.is_empty() {
        "no mirror known".to_string()
    } else {
        format!(
            "none of {} mirrors served verified data (see the mirrors)",
            mirrors.len()
        )
    };
    problems.push(summary);
    (Err(PullError::NoSource(problems.join("; "))), reports)
}

/// One pull from one source, by the kind of the resource.
async fn pull_from(
    state: &NodeState,
    source: &Source,
    resource: &Resource,
    follow: &Follow,
    follow_bytes: Vec<u8>,
) -> Result<Pulled, PullError> {
    match resource.kind {
        ResourceKind::Doc => pull_doc(state, source, resource, follow, follow_bytes).await,
        ResourceKind::Blob => pull_blobs(state, source, resource, follow, follow_bytes).await,
        ResourceKind::Ns => pull_ns(state, source, resource, follow_bytes).await,
    }
}

/// Asks the origin for its signed manifest of `resource` and checks it (signature, resource,
/// never older than `floor`, which then moves to it).
async fn ask_manifest(
    source: &Source,
    resource: &Resource,
    floor: &mut Option<(Manifest, [u8; 32])>,
) -> Result<(Manifest, SignedManifest), PullError> {
    let origin = &source.origin;
    let reply = source
        .ask(FedCall::Manifest {
            resource: resource.clone(),
        })
        .await?;
    let bytes = match reply {
        FedReply::Manifest(bytes) => bytes,
        FedReply::Error(e) => return Err(PullError::Refused(e)),
        other => {
            return Err(PullError::Protocol(format!(
                "expected a manifest, got {other:?}"
            )))
        }
    };
    let signed = SignedManifest::decode(&bytes)?;
    let manifest = signed.verify(origin, resource)?;
    let hash = signed.hash();
    check_successor(floor.as_ref().map(|(m, h)| (m, *h)), &manifest, hash)?;
    *floor = Some((manifest.clone(), hash));
    Ok((manifest, signed))
}

/// Pulls a followed iroh-docs namespace: the origin's signed manifest first (so a cluster
/// the namespace is not exported to stops there, hosting nothing), then a one-off iroh-docs
/// sync with the origin node into this cluster's read-only replica, until the replica's
/// state is exactly the state a manifest signed right after names (the origin may write
/// meanwhile: a few rounds), then the content of every entry from the origin node over
/// iroh-blobs. iroh-docs checks every entry's signatures as it arrives, so entries land
/// before the state check; the check says the copy is complete and current, and the
/// manifest is recorded only then. The other members sync the replica from this one.
async fn pull_ns(
    state: &NodeState,
    source: &Source,
    resource: &Resource,
    follow_bytes: Vec<u8>,
) -> Result<Pulled, PullError> {
    let (origin, resource) = (source.origin, resource.clone());
    let started = Instant::now();
    let id: [u8; 32] = hex::decode(&resource.name)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| PullError::Commit(format!("{resource} does not name a namespace id")))?;
    let (stored_state, accepted) = accepted_manifest(&state.cluster, &origin, &resource)
        .await
        .map_err(PullError::Commit)?;
    let commit = |e: aspen_client::protocol::RpcError| PullError::Commit(e.to_string());
    let addr = source.addr.clone();
    let result = async {
        let mut floor = accepted.clone();
        ask_manifest(source, &resource, &mut floor).await?;
        state.namespaces.host_followed(&id).await.map_err(commit)?;
        let mut received = 0;
        for _ in 0..NS_SYNC_ROUNDS {
            let synced = tokio::time::timeout(
                CALL_TIMEOUT,
                iroh_docs::net::connect_and_sync(
                    &source.endpoint,
                    &state.namespaces.sync,
                    iroh_docs::NamespaceId::from(&id),
                    addr.clone(),
                    None,
                ),
            )
            .await
            .map_err(|_| {
                PullError::Timeout(format!("namespace sync took over {CALL_TIMEOUT:?}"))
            })?;
            match synced {
                Ok(synced) => received += synced.outcome.num_recv,
                // The exchange ran; only closing the stream failed (the origin hung up
                // first). What arrived is checked against the manifest all the same.
                Err(iroh_docs::net::ConnectError::Close { .. }) => {}
                Err(e) => return Err(PullError::Unreachable(format!("namespace sync: {e}"))),
            }
            let (manifest, signed) = ask_manifest(source, &resource, &mut floor).await?;
            if state.namespaces.state_digest(&id).await.map_err(commit)? != manifest.digest {
                continue;
            }
            let fetched = fetch_ns_content(state, &id, &addr).await?;
            return Ok((manifest, signed, received, fetched));
        }
        Err(PullError::Data(format!(
            "after {NS_SYNC_ROUNDS} syncs the replica still differs from the state the origin \
             signs (the origin is writing fast, or its clock and ours disagree)"
        )))
    }
    .await;
    let (manifest, signed, received, fetched) = result?;
    record_manifest(
        state,
        &origin,
        &resource,
        follow_bytes,
        stored_state,
        accepted.as_ref(),
        &signed,
        Vec::new(),
    )
    .await?;
    tracing::info!(
        %origin,
        %resource,
        seq = manifest.seq,
        entries_received = received,
        contents_fetched = fetched,
        total_ms = started.elapsed().as_millis() as u64,
        "pulled"
    );
    Ok(Pulled {
        seq: manifest.seq,
        added: received,
        via: None,
    })
}

/// Fetches from the origin node the content of every latest entry of namespace `id` that
/// this node lacks (at most [`MAX_NS_FETCHES`] per pull; the rest on the next). Returns how
/// many arrived.
async fn fetch_ns_content(
    state: &NodeState,
    id: &[u8; 32],
    addr: &EndpointAddr,
) -> Result<usize, PullError> {
    let commit = |e: aspen_client::protocol::RpcError| PullError::Commit(e.to_string());
    let (doc, _) = state.namespaces.ns_open(id).await.map_err(commit)?;
    let missing = state
        .namespaces
        .missing_content(&doc)
        .await
        .map_err(commit)?;
    let mut fetched = 0;
    for hash in missing.iter().take(MAX_NS_FETCHES) {
        match state
            .blobs
            .fetch_blob_from(hash.as_bytes(), addr.clone())
            .await
            .map_err(commit)?
        {
            Ok(_) => fetched += 1,
            Err(reason) => {
                return Err(PullError::Data(format!(
                    "content {hash} of namespace {}: {reason}",
                    hex::encode(id)
                )))
            }
        }
    }
    Ok(fetched)
}

/// Pulls a followed blob prefix: the origin's signed tag list, then every blob this cluster
/// lacks over iroh-blobs (verified streaming; an interrupted fetch resumes from the data
/// already verified), each tagged here under the follow's local prefix through Raft. Tags
/// the origin removed stay here.
async fn pull_blobs(
    state: &NodeState,
    source: &Source,
    resource: &Resource,
    follow: &Follow,
    follow_bytes: Vec<u8>,
) -> Result<Pulled, PullError> {
    let origin = source.origin;
    let started = Instant::now();
    let (stored_state, accepted) = accepted_manifest(&state.cluster, &origin, resource)
        .await
        .map_err(PullError::Commit)?;
    let addr = source.addr.clone();
    let reply = source
        .ask(FedCall::BlobTags {
            prefix: resource.name.clone(),
        })
        .await;
    let (manifest_bytes, tags) = match reply? {
        FedReply::BlobTags { manifest, tags } => (manifest, tags),
        FedReply::Error(e) => return Err(PullError::Refused(e)),
        other => {
            return Err(PullError::Protocol(format!(
                "expected a tag list, got {other:?}"
            )))
        }
    };
    let signed = SignedManifest::decode(&manifest_bytes)?;
    let manifest = signed.verify(&origin, resource)?;
    check_successor(
        accepted.as_ref().map(|(m, h)| (m, *h)),
        &manifest,
        signed.hash(),
    )?;
    if tags.len() > MAX_FED_TAGS {
        return Err(PullError::Data(format!(
            "{} tags, the limit is {MAX_FED_TAGS}",
            tags.len()
        )));
    }
    let list = BlobTagList::new(tags).map_err(|e| PullError::Data(e.to_string()))?;
    if list.digest() != manifest.digest {
        return Err(PullError::Data(
            "the tag list does not match the signed manifest".into(),
        ));
    }
    // The list the manifest pins, kept beside it for serving as a mirror (when it fits one
    // value; a longer list is not mirrored).
    let tags_key = follow_tags_key(&origin, resource);
    let encoded = postcard::to_allocvec(&list).expect("a tag list encodes");
    let kept = state
        .cluster
        .sm
        .system_get(tags_key.clone())
        .await
        .map_err(|e| PullError::Commit(e.to_string()))?;
    let extra = if encoded.len() > aspen_kv::limits::MAX_VALUE_BYTES {
        match kept {
            Some(_) => vec![SystemOp::Delete { key: tags_key }],
            None => vec![],
        }
    } else if kept.as_ref() != Some(&encoded) {
        vec![SystemOp::Put {
            key: tags_key,
            value: encoded,
        }]
    } else {
        vec![]
    };
    let mut added = 0;
    let mut bytes = 0u64;
    for (tag, hash) in list.entries() {
        let suffix = tag.strip_prefix(resource.name.as_str()).ok_or_else(|| {
            PullError::Data(format!("tag {tag:?} is not under the followed prefix"))
        })?;
        let local = aspen_blobs::TagName::new(format!("{}{suffix}", follow.into))
            .map_err(|e| PullError::Data(format!("tag {tag:?}: {e}")))?;
        let commit = |e: aspen_client::protocol::RpcError| PullError::Commit(e.to_string());
        if state.blobs.tag_target(&local).await.map_err(commit)? == Some(*hash) {
            continue;
        }
        let size = match state
            .blobs
            .complete_size(hash)
            .await
            .map_err(|e| PullError::Commit(e.to_string()))?
        {
            Some(size) => size,
            None => match state
                .blobs
                .fetch_blob_from(hash, addr.clone())
                .await
                .map_err(commit)?
            {
                Ok(size) => {
                    bytes += size;
                    size
                }
                Err(reason) => {
                    return Err(PullError::Data(format!(
                        "blob {} of tag {tag:?}: {reason}",
                        hex::encode(hash)
                    )))
                }
            },
        };
        state
            .blobs
            .record_tag(&local, *hash, size)
            .await
            .map_err(commit)?;
        added += 1;
    }
    record_manifest(
        state,
        &origin,
        resource,
        follow_bytes,
        stored_state,
        accepted.as_ref(),
        &signed,
        extra,
    )
    .await?;
    tracing::info!(
        %origin,
        %resource,
        source = source.describe(),
        seq = manifest.seq,
        added,
        bytes,
        total_ms = started.elapsed().as_millis() as u64,
        "pulled"
    );
    Ok(Pulled {
        seq: manifest.seq,
        added,
        via: None,
    })
}

/// Pulls one followed document (see the module docs).
async fn pull_doc(
    state: &NodeState,
    source: &Source,
    resource: &Resource,
    follow: &Follow,
    follow_bytes: Vec<u8>,
) -> Result<Pulled, PullError> {
    let (origin, resource) = (source.origin, resource.clone());
    let into = DocName::new(follow.into.clone()).map_err(|e| PullError::Commit(e.to_string()))?;
    let (stored_state, accepted) = accepted_manifest(&state.cluster, &origin, &resource)
        .await
        .map_err(PullError::Commit)?;
    let known: Vec<[u8; 32]> = match &accepted {
        Some((m, _)) => match &m.digest {
            aspen_sync::ContentDigest::Heads(h) => h.clone(),
            _ => Vec::new(),
        },
        None => Vec::new(),
    };
    let local = state
        .docs
        .with_doc(&into, |doc| doc.clone())
        .await
        .map_err(|e| PullError::Commit(e.to_string()))?
        .unwrap_or_default();
    let started = Instant::now();
    let mut fetching = std::time::Duration::ZERO;
    let mut applying = std::time::Duration::ZERO;
    let result = async {
        let mut floor = accepted.clone();
        // Nothing here yet: the whole document in one saved snapshot, if the origin can.
        if local.get_heads().is_empty() {
            let t = Instant::now();
            if let Some((manifest, signed, doc, added)) =
                doc_snapshot(source, &resource, &mut floor).await?
            {
                let fetched = t.elapsed();
                let t = Instant::now();
                let merged = aspen_crdt::Merged { doc, added };
                let added = state
                    .docs
                    .import_snapshot(&into, merged)
                    .await
                    .map_err(|e| PullError::Commit(e.to_string()))?
                    .len();
                record_manifest(
                    state,
                    &origin,
                    &resource,
                    follow_bytes.clone(),
                    stored_state.clone(),
                    accepted.as_ref(),
                    &signed,
                    Vec::new(),
                )
                .await?;
                tracing::info!(
                    %origin,
                    %resource,
                    source = source.describe(),
                    seq = manifest.seq,
                    added,
                    fetch_and_load_ms = fetched.as_millis() as u64,
                    commit_ms = t.elapsed().as_millis() as u64,
                    total_ms = started.elapsed().as_millis() as u64,
                    "pulled (snapshot)"
                );
                return Ok(Pulled {
                    seq: manifest.seq,
                    added,
                    via: None,
                });
            }
        }
        let mut pull = Some(DocPull::new(
            local,
            &known,
            aspen_crdt::limits::MAX_DOC_BYTES,
        ));
        let mut last: Option<(Manifest, SignedManifest)> = None;
        for page in 0.. {
            if page == MAX_PAGES {
                return Err(PullError::Data(format!(
                    "the origin sent more than {MAX_PAGES} pages"
                )));
            }
            let have = pull.as_ref().expect("kept").have();
            let t = Instant::now();
            let reply = source
                .ask(FedCall::DocChanges {
                    name: resource.name.clone(),
                    have,
                })
                .await?;
            let (manifest_bytes, changes, more) = match reply {
                FedReply::DocChanges {
                    manifest,
                    changes,
                    more,
                } => (manifest, changes, more),
                FedReply::Error(e) => return Err(PullError::Refused(e)),
                other => {
                    return Err(PullError::Protocol(format!(
                        "expected changes, got {other:?}"
                    )))
                }
            };
            fetching += t.elapsed();
            let t = Instant::now();
            let signed = SignedManifest::decode(&manifest_bytes)?;
            let manifest = signed.verify(&origin, &resource)?;
            let hash = signed.hash();
            check_successor(floor.as_ref().map(|(m, h)| (m, *h)), &manifest, hash)?;
            floor = Some((manifest.clone(), hash));
            let mut p = pull.take().expect("kept");
            let p = tokio::task::spawn_blocking(move || {
                let mut parsed = Vec::with_capacity(changes.len());
                for (i, bytes) in changes.into_iter().enumerate() {
                    parsed.push(
                        aspen_crdt::parse_change(i, bytes)
                            .map_err(|e| PullError::Data(e.to_string()))?,
                    );
                }
                p.apply(parsed).map_err(data)?;
                Ok::<_, PullError>(p)
            })
            .await
            .map_err(|e| PullError::Commit(format!("pull task failed: {e}")))??;
            applying += t.elapsed();
            pull = Some(p);
            last = Some((manifest, signed));
            if !more {
                break;
            }
        }
        let (manifest, signed) = last.expect("at least one page");
        let p = pull.take().expect("kept");
        let finish_manifest = manifest.clone();
        let t = Instant::now();
        let pulled = tokio::task::spawn_blocking(move || p.finish(&finish_manifest))
            .await
            .map_err(|e| PullError::Commit(format!("pull task failed: {e}")))?
            .map_err(data)?;
        let added = pulled.added.len();
        if added > 0 {
            let hashes = pulled.added.iter().map(|c| c.hash().0).collect();
            let raw = pulled
                .added
                .into_iter()
                .map(|c| c.raw_bytes().to_vec())
                .collect();
            let merged = aspen_crdt::Merged {
                doc: pulled.doc,
                added: hashes,
            };
            state
                .docs
                .import(&into, raw, Some(merged))
                .await
                .map_err(|e| PullError::Commit(e.to_string()))?;
        }
        let verifying = t.elapsed();
        record_manifest(
            state,
            &origin,
            &resource,
            follow_bytes,
            stored_state,
            accepted.as_ref(),
            &signed,
            Vec::new(),
        )
        .await?;
        tracing::info!(
            %origin,
            %resource,
            source = source.describe(),
            seq = manifest.seq,
            added,
            fetch_ms = fetching.as_millis() as u64,
            apply_ms = applying.as_millis() as u64,
            verify_ms = verifying.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "pulled"
        );
        Ok(Pulled {
            seq: manifest.seq,
            added,
            via: None,
        })
    }
    .await;
    result
}

/// A first pull by snapshot: the origin's saved document, loaded under the inflation bound
/// and checked to have exactly the heads its signed manifest names (a saved document holds
/// nothing but the history of its heads, each change named by its hash). `None`: the origin
/// will not send one (too large, or it does not know the call); pull changes instead.
async fn doc_snapshot(
    source: &Source,
    resource: &Resource,
    floor: &mut Option<(Manifest, [u8; 32])>,
) -> Result<
    Option<(
        Manifest,
        SignedManifest,
        automerge::Automerge,
        Vec<[u8; 32]>,
    )>,
    PullError,
> {
    let origin = &source.origin;
    let reply = source
        .ask(FedCall::DocSnapshot {
            name: resource.name.clone(),
        })
        .await;
    let (manifest_bytes, document) = match reply {
        Ok(FedReply::DocSnapshot { manifest, document }) => (manifest, document),
        Ok(FedReply::Error(FedError::TooLarge(_) | FedError::BadRequest(_)))
        | Err(PullError::Protocol(_)) => return Ok(None),
        Ok(FedReply::Error(e)) => return Err(PullError::Refused(e)),
        Ok(other) => {
            return Err(PullError::Protocol(format!(
                "expected a snapshot, got {other:?}"
            )))
        }
        Err(e) => return Err(e),
    };
    let signed = SignedManifest::decode(&manifest_bytes)?;
    let manifest = signed.verify(origin, resource)?;
    let hash = signed.hash();
    check_successor(floor.as_ref().map(|(m, h)| (m, *h)), &manifest, hash)?;
    *floor = Some((manifest.clone(), hash));
    let aspen_sync::ContentDigest::Heads(signed_heads) = manifest.digest.clone() else {
        return Err(PullError::Data("a document manifest without heads".into()));
    };
    let (doc, added) = tokio::task::spawn_blocking(move || {
        let doc = aspen_crdt::load_saved(&document).map_err(|e| PullError::Data(e.to_string()))?;
        let mut heads: Vec<[u8; 32]> = doc.get_heads().iter().map(|h| h.0).collect();
        heads.sort_unstable();
        if heads != signed_heads {
            return Err(PullError::Data(
                "the snapshot's heads are not the ones the origin signed".into(),
            ));
        }
        let added = doc.get_changes_meta(&[]).iter().map(|m| m.hash.0).collect();
        Ok((doc, added))
    })
    .await
    .map_err(|e| PullError::Commit(format!("pull task failed: {e}")))??;
    Ok(Some((manifest, signed, doc, added)))
}

fn data(e: ExchangeError) -> PullError {
    PullError::Data(e.to_string())
}

/// The follower task (every member runs it; the leader pulls).
pub async fn run(
    state: Arc<NodeState>,
    pulls: Arc<Pulls>,
    endpoint: Endpoint,
    resolver: Resolver,
    dht: Option<ClusterDht>,
    addrs: iroh::address_lookup::MemoryLookup,
    schedule: PullSchedule,
) {
    let dialer = Arc::new(Dialer {
        endpoint,
        resolver,
        dht,
        pulls: pulls.clone(),
        addrs,
    });
    let mut follows_changed = state.cluster.sm.watch_system_prefix(FOLLOW_PREFIX);
    // Each pull ends with: which follow (and the stored follow it pulled), its outcome, and
    // what it found at the mirrors it tried.
    type Finished = (
        FollowId,
        Vec<u8>,
        Result<Pulled, PullError>,
        Vec<MirrorReport>,
    );
    let mut running: JoinSet<Finished> = JoinSet::new();
    loop {
        if !state.cluster.is_leader() {
            if !running.is_empty() {
                running.abort_all();
                while running.join_next().await.is_some() {}
            }
            pulls.status.lock().expect("lock").clear();
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = pulls.wake.notified() => {}
            }
            continue;
        }
        let follows = match list_follows(&state.cluster).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("cannot read the follows: {e}");
                tokio::time::sleep(TICK).await;
                continue;
            }
        };
        let now = Instant::now();
        let mut wake_at = now + TICK;
        {
            let mut status = pulls.status.lock().expect("lock");
            status.retain(|(o, r), _| {
                follows
                    .iter()
                    .any(|(fo, fr, _, _)| fo.to_bytes() == *o && fr == r)
            });
            for (origin, resource, follow, bytes) in &follows {
                let id = (origin.to_bytes(), resource.clone());
                let s = status.entry(id.clone()).or_default();
                if s.running {
                    continue;
                }
                if s.follow != *bytes {
                    *s = PullStatus {
                        follow: bytes.clone(),
                        forced: s.forced,
                        ..PullStatus::default()
                    };
                }
                let due = s.forced || s.next_attempt.is_none_or(|t| t <= now);
                if due && running.len() < MAX_CONCURRENT_PULLS {
                    s.running = true;
                    s.forced = false;
                    s.last_attempt_ms = unix_now_ms();
                    let previously = Previously {
                        failed_mirrors: s
                            .mirrors
                            .iter()
                            .filter(|m| !m.ok)
                            .map(|m| m.cluster)
                            .collect(),
                        origin_down: s.last_source.is_some(),
                    };
                    let work = pull(
                        state.clone(),
                        dialer.clone(),
                        *origin,
                        resource.clone(),
                        follow.clone(),
                        bytes.clone(),
                        previously,
                    );
                    let pulled_follow = bytes.clone();
                    running.spawn(async move {
                        let (result, reports) = tokio::time::timeout(PULL_TIMEOUT, work)
                            .await
                            .unwrap_or_else(|_| {
                                (
                                    Err(PullError::Timeout(format!(
                                        "the pull took over {PULL_TIMEOUT:?}"
                                    ))),
                                    Vec::new(),
                                )
                            });
                        (id, pulled_follow, result, reports)
                    });
                } else if let Some(t) = s.next_attempt {
                    wake_at = wake_at.min(t);
                }
            }
        }
        tokio::select! {
            Some(joined) = running.join_next() => {
                if let Ok((id, follow, result, reports)) = joined {
                    record(&pulls, &schedule, id, &follow, result, reports);
                }
            }
            _ = tokio::time::sleep_until(wake_at) => {}
            _ = pulls.wake.notified() => {}
            Ok(()) = follows_changed.changed() => {}
        }
    }
}

/// Records a finished pull of the stored follow `follow` and schedules the next one.
fn record(
    pulls: &Pulls,
    schedule: &PullSchedule,
    id: FollowId,
    follow: &[u8],
    result: Result<Pulled, PullError>,
    reports: Vec<MirrorReport>,
) {
    let mut status = pulls.status.lock().expect("lock");
    // A status that describes another follow: this one was removed while its pull ran,
    // and the status (and any pull running for it) is the new follow's.
    if let Some(s) = status.get_mut(&id).filter(|s| s.follow == follow) {
        s.running = false;
        s.merge_reports(reports);
        match result {
            Ok(pulled) => {
                tracing::debug!(
                    seq = pulled.seq,
                    added = pulled.added,
                    "pull verified and committed"
                );
                s.failures = 0;
                s.last_error = None;
                s.last_success_ms = unix_now_ms();
                s.last_source = pulled.via;
            }
            Err(e) => {
                tracing::info!(origin = %hex::encode(&id.0[..8]), resource = %id.1, "pull failed: {e}");
                s.failures = s.failures.saturating_add(1);
                s.last_error = Some(e.to_string());
            }
        }
        let delay = schedule.next_delay(s.failures, rand::random::<f64>());
        s.next_attempt = Some(Instant::now() + delay);
        s.next_attempt_ms = unix_now_ms() + delay.as_millis() as u64;
    }
    drop(status);
    pulls.finished.send_modify(|n| *n += 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(cluster: u8, ok: bool, at_ms: u64) -> MirrorReport {
        MirrorReport {
            cluster: [cluster; 32],
            ok,
            detail: String::new(),
            at_ms,
        }
    }

    fn ok(via: u8) -> Result<Pulled, PullError> {
        Ok(Pulled {
            seq: 1,
            added: 0,
            via: Some([via; 32]),
        })
    }

    #[test]
    fn a_mirrors_latest_outcome_replaces_its_earlier_one_and_the_list_is_bounded() {
        let mut s = PullStatus::default();
        s.merge_reports(vec![report(1, false, 1), report(2, true, 1)]);
        // A later pull that succeeded at mirror 2 first keeps mirror 1's refusal.
        s.merge_reports(vec![report(2, true, 2)]);
        assert_eq!(s.mirrors, vec![report(1, false, 1), report(2, true, 2)]);
        s.merge_reports((10..30).map(|c| report(c, true, 3)).collect());
        assert_eq!(s.mirrors.len(), MAX_MIRRORS_TRIED);
        assert_eq!(
            s.mirrors[0].cluster, [22; 32],
            "the most recently tried are kept"
        );
    }

    #[test]
    fn a_pull_of_a_replaced_follow_is_not_recorded_as_the_new_ones() {
        let pulls = Pulls::default();
        let id: FollowId = ([9; 32], Resource::doc("plans"));
        let schedule = PullSchedule::default();
        pulls.status.lock().unwrap().insert(
            id.clone(),
            PullStatus {
                follow: b"new".to_vec(),
                running: true,
                ..PullStatus::default()
            },
        );
        let finish = |follow: &[u8]| {
            record(
                &pulls,
                &schedule,
                id.clone(),
                follow,
                ok(4),
                vec![report(4, true, 5)],
            );
            pulls.status_of(&id)
        };
        let s = finish(b"old");
        assert!(s.running, "the new follow's pull is still running");
        assert_eq!((s.last_success_ms, s.last_source), (0, None));
        assert!(s.mirrors.is_empty() && s.next_attempt.is_none());

        let s = finish(b"new");
        assert!(s.last_success_ms > 0);
        assert_eq!(s.last_source, Some([4; 32]));
        assert_eq!(s.mirrors, vec![report(4, true, 5)]);
    }
}
