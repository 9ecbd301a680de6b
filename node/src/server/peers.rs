//! Connections between members: one QUIC connection per peer, used in both directions.
//!
//! Whoever dials first, the connection is kept in the pool and both sides open request
//! streams on it. That is what lets a member that restarted on a new address rejoin: it dials
//! its peers (`Hello`), and the leader reaches it over that connection before the membership
//! even records the new address.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use aspen_client::ticket::node_id_of;
use aspen_client::wire::{read_frame, write_frame};
use aspen_client::NetFaults;
use aspen_kv::raft_types::{Snapshot, Vote};
use aspen_kv::storage::SnapshotFile;
use aspen_kv::{Member, NodeId, TypeConfig};
use iroh::endpoint::Connection;
use iroh::{Endpoint, EndpointAddr, EndpointId};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::RaftNetworkV2;

use super::raft_protocol::{
    RaftRequest, RaftResponse, MAX_INTRODUCE_FRAME, MAX_RAFT_FRAME, RAFT_ALPN,
};
use super::NodeState;

/// QUIC application close code for a connection from a key that is not a member.
const NOT_A_MEMBER: iroh::endpoint::VarInt = iroh::endpoint::VarInt::from_u32(403);

/// Longest a dial may take before the peer counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest any node-to-node call may take when openraft gives no deadline.
const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// A pooled connection that has answered nothing for this long and then times out is
/// replaced (a member that restarted elsewhere can leave one stuck on a dead path; a merely
/// slow connection keeps answering heartbeats and is kept).
const STUCK_AFTER: Duration = Duration::from_secs(5);
/// QUIC close code for a pooled connection replaced because it stopped answering.
const STUCK: u32 = 504;

/// The pool of member connections.
pub struct Peers {
    endpoint: Endpoint,
    /// Keyed by the member's key as bytes: a call finds its connection without turning
    /// the bytes into an [`EndpointId`] (a curve point decompression each time: 1.8% of a
    /// leader's CPU under sequential puts, BENCHMARKS.md).
    conns: Mutex<HashMap<[u8; 32], Connection>>,
    /// Per peer: the pooled connection (stable id) and when it last answered a call (or was
    /// pooled). A pooled connection that times out after answering nothing for
    /// [`STUCK_AFTER`] is dropped from the pool, so the next call dials the member's
    /// current addresses.
    answered: Mutex<HashMap<EndpointId, (usize, std::time::Instant)>>,
    dials: Mutex<HashMap<EndpointId, Arc<tokio::sync::Mutex<()>>>>,
    node: std::sync::OnceLock<Weak<NodeState>>,
    /// Injected by fault tests (`ClientRequest::SetNetFaults`); none by default.
    faults: Mutex<NetFaults>,
    /// Whether `faults` injects anything: the member-traffic hot path checks only this.
    faults_active: std::sync::atomic::AtomicBool,
    /// Members whose calls are failing, for logging: one line when a member goes, one when
    /// it returns, a summary every [`UNREACHABLE_SUMMARY_EVERY`] while it stays away
    /// (openraft's own per-retry replication errors are filtered out of the default log).
    unreachable: Mutex<HashMap<[u8; 32], Unreachability>>,
}

/// How often a member that stays unreachable is mentioned again in the log.
const UNREACHABLE_SUMMARY_EVERY: Duration = Duration::from_secs(60);

struct Unreachability {
    since: std::time::Instant,
    failures: u64,
    last_logged: std::time::Instant,
}

/// What an injected fault does to one outgoing request.
enum Fate {
    Deliver {
        delay: Duration,
    },
    /// Never answered: the caller waits out its timeout, as across a real partition.
    BlackHole,
}

/// A failed node-to-node call.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot reach {0}: {1}")]
    Unreachable(String, String),
    #[error("call to {0} failed: {1}")]
    Failed(String, String),
    /// The member answered, refusing the request (not worth repeating).
    #[error("{0} refused: {1}")]
    Refused(String, String),
}

impl Peers {
    pub fn new(endpoint: Endpoint) -> Arc<Self> {
        Arc::new(Peers {
            endpoint,
            conns: Mutex::new(HashMap::new()),
            answered: Mutex::new(HashMap::new()),
            dials: Mutex::new(HashMap::new()),
            node: std::sync::OnceLock::new(),
            faults: Mutex::new(NetFaults::default()),
            faults_active: std::sync::atomic::AtomicBool::new(false),
            unreachable: Mutex::new(HashMap::new()),
        })
    }

    /// Logs a member's calls starting to fail, and then only a periodic summary.
    fn note_failure(&self, peer: &[u8; 32], why: &str) {
        let now = std::time::Instant::now();
        let mut map = self.unreachable.lock().expect("lock");
        let name = hex::encode(&peer[..8]);
        match map.get_mut(peer) {
            None => {
                tracing::warn!(peer = %name, "member unreachable: {why}");
                map.insert(
                    *peer,
                    Unreachability {
                        since: now,
                        failures: 1,
                        last_logged: now,
                    },
                );
            }
            Some(u) => {
                u.failures += 1;
                if u.last_logged.elapsed() >= UNREACHABLE_SUMMARY_EVERY {
                    tracing::warn!(
                        peer = %name,
                        "member still unreachable after {:?} ({} failed calls): {why}",
                        u.since.elapsed(),
                        u.failures
                    );
                    u.last_logged = now;
                }
            }
        }
    }

    fn note_success(&self, peer: &[u8; 32]) {
        let mut map = self.unreachable.lock().expect("lock");
        if map.is_empty() {
            return;
        }
        if let Some(u) = map.remove(peer) {
            tracing::info!(
                peer = %hex::encode(&peer[..8]),
                "member reachable again after {:?} ({} failed calls)",
                u.since.elapsed(),
                u.failures
            );
        }
    }

    /// Replaces the injected network faults (fault tests only).
    pub fn set_faults(&self, faults: NetFaults) {
        let active = faults != NetFaults::default();
        *self.faults.lock().expect("lock") = faults;
        self.faults_active
            .store(active, std::sync::atomic::Ordering::Release);
    }

    fn isolated_from(&self, endpoint_id: &[u8; 32]) -> bool {
        if !self
            .faults_active
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return false;
        }
        let faults = self.faults.lock().expect("lock");
        !faults.isolate_from.is_empty() && faults.isolate_from.contains(&node_id_of(endpoint_id))
    }

    fn fate(&self, endpoint_id: &[u8; 32]) -> Fate {
        if !self
            .faults_active
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Fate::Deliver {
                delay: Duration::ZERO,
            };
        }
        if self.isolated_from(endpoint_id) {
            return Fate::BlackHole;
        }
        let faults = self.faults.lock().expect("lock");
        if faults.drop_per_mille > 0 && rand::random_range(0..1000) < faults.drop_per_mille {
            return Fate::BlackHole;
        }
        let delay = match faults.max_delay_ms {
            0 => Duration::ZERO,
            max => Duration::from_millis(rand::random_range(0..=u64::from(max))),
        };
        Fate::Deliver { delay }
    }

    pub fn set_node(&self, node: Weak<NodeState>) {
        let _ = self.node.set(node);
    }

    /// Adopts an accepted connection and serves the requests the peer sends on it. A
    /// member's connection joins the pool; a stranger's is closed at once, unless this node
    /// belongs to no cluster yet (then the stranger may only introduce itself).
    pub fn adopt(self: &Arc<Self>, conn: Connection) {
        let remote = conn.remote_id();
        let Some(node) = self.node.get().and_then(Weak::upgrade) else {
            return;
        };
        if node.is_raft_peer(&remote) {
            self.pool(remote, &conn);
        } else if node.is_initialized() {
            tracing::debug!(peer = %remote.fmt_short(), "raft connection from a non-member refused");
            conn.close(NOT_A_MEMBER, b"not a member of this cluster");
            return;
        }
        let peers = self.clone();
        tokio::spawn(async move { peers.serve(conn).await });
    }

    /// Serves requests arriving on `conn` until it closes.
    pub async fn serve(self: Arc<Self>, conn: Connection) {
        loop {
            let (mut send, mut recv) = match conn.accept_bi().await {
                Ok(streams) => streams,
                Err(_) => break,
            };
            let Some(node) = self.node.get().and_then(Weak::upgrade) else {
                break;
            };
            let remote = conn.remote_id();
            // Decided before a byte of the request is read: members get the full frame size,
            // strangers to a node without a cluster only an introduction, others nothing.
            let max_frame = if node.is_raft_peer(&remote) {
                MAX_RAFT_FRAME
            } else if !node.is_initialized() {
                MAX_INTRODUCE_FRAME
            } else {
                conn.close(NOT_A_MEMBER, b"not a member of this cluster");
                break;
            };
            drop(node);
            let Some(node) = self.node.get().and_then(Weak::upgrade) else {
                break;
            };
            if self.isolated_from(remote.as_bytes()) {
                // Partitioned from this peer: its request goes unanswered.
                tokio::spawn(async move {
                    tokio::time::sleep(DEFAULT_RPC_TIMEOUT).await;
                    drop((send, recv));
                });
                continue;
            }
            tokio::spawn(async move {
                let read = tokio::time::timeout(
                    super::REQUEST_READ_TIMEOUT,
                    read_frame(&mut recv, max_frame),
                );
                let request: RaftRequest = match read.await {
                    Ok(Ok(r)) => r,
                    Err(_) => {
                        tracing::debug!(peer = %remote.fmt_short(), "raft request not received in time");
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %remote.fmt_short(), "bad raft frame: {e}");
                        let _ = write_frame(
                            &mut send,
                            &RaftResponse::Refused(format!("bad frame: {e}")),
                            MAX_RAFT_FRAME,
                        )
                        .await;
                        let _ = send.finish();
                        return;
                    }
                };
                let busy = max_frame == MAX_RAFT_FRAME && request.is_busy_work();
                if busy {
                    crate::busy_poll::touch();
                }
                let response = match request {
                    RaftRequest::InstallSnapshot { vote, meta, bytes } => {
                        // The snapshot's bytes follow on this stream, as fast as the leader
                        // sends them; each read waits at most the request timeout.
                        let mut body = ReadTimeout::new(&mut recv, super::REQUEST_READ_TIMEOUT);
                        node.receive_snapshot(remote, vote, meta, bytes, &mut body)
                            .await
                    }
                    request => node.handle_raft(remote, request).await,
                };
                if let Err(e) = write_frame(&mut send, &response, MAX_RAFT_FRAME).await {
                    tracing::debug!(peer = %remote.fmt_short(), "cannot answer raft request: {e}");
                }
                if busy {
                    // The member's next message (the next entries) is likely on its way.
                    crate::busy_poll::touch();
                }
                let _ = send.finish();
            });
        }
        let remote = *conn.remote_id().as_bytes();
        let mut conns = self.conns.lock().expect("lock");
        if conns
            .get(&remote)
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            conns.remove(&remote);
        }
    }

    /// Makes `conn` the connection calls to `peer` use.
    fn pool(&self, peer: EndpointId, conn: &Connection) {
        self.conns
            .lock()
            .expect("lock")
            .insert(*peer.as_bytes(), conn.clone());
        self.answered
            .lock()
            .expect("lock")
            .insert(peer, (conn.stable_id(), std::time::Instant::now()));
    }

    /// A call on `conn` failed or timed out: if it is the pooled connection and has answered
    /// nothing for [`STUCK_AFTER`], drop it (closed) so the next call dials afresh.
    fn failed(&self, conn: &Connection) {
        let peer = conn.remote_id();
        let stuck = self
            .answered
            .lock()
            .expect("lock")
            .get(&peer)
            .is_some_and(|(id, at)| *id == conn.stable_id() && at.elapsed() >= STUCK_AFTER);
        if !stuck {
            return;
        }
        let mut conns = self.conns.lock().expect("lock");
        if conns
            .get(peer.as_bytes())
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            conns.remove(peer.as_bytes());
            drop(conns);
            tracing::info!(peer = %peer.fmt_short(), "connection answered nothing for {STUCK_AFTER:?}; dialing afresh");
            conn.close(STUCK.into(), b"stopped answering");
        }
    }

    async fn connection(self: &Arc<Self>, member: &Member) -> Result<Connection, PeerError> {
        let live = |peers: &Peers| {
            peers
                .conns
                .lock()
                .expect("lock")
                .get(&member.endpoint_id)
                .filter(|c| c.close_reason().is_none())
                .cloned()
        };
        if let Some(c) = live(self) {
            return Ok(c);
        }
        let id = EndpointId::from_bytes(&member.endpoint_id).map_err(|e| {
            PeerError::Unreachable(hex::encode(&member.endpoint_id[..8]), e.to_string())
        })?;
        let gate = self
            .dials
            .lock()
            .expect("lock")
            .entry(id)
            .or_default()
            .clone();
        let _dialling = gate.lock().await;
        if let Some(c) = live(self) {
            return Ok(c);
        }
        let mut addr = EndpointAddr::new(id);
        for a in &member.addrs {
            addr = addr.with_ip_addr(*a);
        }
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, self.endpoint.connect(addr, RAFT_ALPN))
            .await
            .map_err(|_| {
                PeerError::Unreachable(id.fmt_short().to_string(), "connect timed out".into())
            })?
            .map_err(|e| PeerError::Unreachable(id.fmt_short().to_string(), e.to_string()))?;
        self.pool(id, &conn);
        let peers = self.clone();
        let served = conn.clone();
        tokio::spawn(async move { peers.serve(served).await });
        Ok(conn)
    }

    /// One request/response with a member. A node that belongs to no cluster yet answers
    /// `NotIntroduced` until this node shows it a certificate from the cluster key; that is
    /// done here, once, and the request sent again.
    pub async fn call(
        self: &Arc<Self>,
        member: &Member,
        request: &RaftRequest,
        timeout: Duration,
    ) -> Result<RaftResponse, PeerError> {
        match self.call_once(member, request, timeout).await? {
            RaftResponse::NotIntroduced => {
                let name = hex::encode(&member.endpoint_id[..8]);
                let Some(node) = self.node.get().and_then(Weak::upgrade) else {
                    return Err(PeerError::Failed(name, "node stopped".into()));
                };
                let certificate = node
                    .own_certificate()
                    .await
                    .map_err(|e| PeerError::Failed(name.clone(), e.to_string()))?;
                let introduce = RaftRequest::Introduce {
                    certificate,
                    secret: None,
                };
                match self.call_once(member, &introduce, timeout).await? {
                    RaftResponse::Introduced => self.call_once(member, request, timeout).await,
                    other => Err(PeerError::Failed(
                        name,
                        format!("introduction not accepted: {other:?}"),
                    )),
                }
            }
            other => Ok(other),
        }
    }

    async fn call_once(
        self: &Arc<Self>,
        member: &Member,
        request: &RaftRequest,
        timeout: Duration,
    ) -> Result<RaftResponse, PeerError> {
        let result = self.call_unlogged(member, request, timeout).await;
        match &result {
            Ok(_) => self.note_success(&member.endpoint_id),
            Err(e) => self.note_failure(&member.endpoint_id, &e.to_string()),
        }
        result
    }

    async fn call_unlogged(
        self: &Arc<Self>,
        member: &Member,
        request: &RaftRequest,
        timeout: Duration,
    ) -> Result<RaftResponse, PeerError> {
        match self.fate(&member.endpoint_id) {
            Fate::BlackHole => {
                tokio::time::sleep(timeout).await;
                return Err(PeerError::Failed(
                    hex::encode(&member.endpoint_id[..8]),
                    format!("no answer within {timeout:?} (injected fault)"),
                ));
            }
            Fate::Deliver { delay } if !delay.is_zero() => tokio::time::sleep(delay).await,
            Fate::Deliver { .. } => {}
        }
        let conn = self.connection(member).await?;
        // Only errors name the member: no string made per call.
        let name = || conn.remote_id().fmt_short().to_string();
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            write_frame(&mut send, request, MAX_RAFT_FRAME)
                .await
                .map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            // A member's answer is on its way: stay awake for it.
            let busy = request.is_busy_work();
            if busy {
                crate::busy_poll::touch();
            }
            let answer = read_frame::<RaftResponse>(&mut recv, MAX_RAFT_FRAME)
                .await
                .map_err(|e| e.to_string());
            if busy {
                crate::busy_poll::touch();
            }
            answer
        };
        match tokio::time::timeout(timeout, exchange).await {
            Err(_) => {
                self.failed(&conn);
                Err(PeerError::Failed(
                    name(),
                    format!("no answer within {timeout:?}"),
                ))
            }
            Ok(Err(e)) => {
                // A broken connection is dropped so the next call dials afresh.
                if conn.close_reason().is_some() {
                    self.conns
                        .lock()
                        .expect("lock")
                        .remove(conn.remote_id().as_bytes());
                } else {
                    self.failed(&conn);
                }
                Err(PeerError::Failed(name(), e))
            }
            Ok(Ok(RaftResponse::Refused(why))) => Err(PeerError::Refused(name(), why)),
            Ok(Ok(r)) => {
                let mut answered = self.answered.lock().expect("lock");
                answered.insert(
                    conn.remote_id(),
                    (conn.stable_id(), std::time::Instant::now()),
                );
                Ok(r)
            }
        }
    }
}

/// Most entry bytes one AppendEntries carries (leaves room below [`MAX_RAFT_FRAME`] for the
/// encoding's overhead).
const APPEND_BUDGET: usize = MAX_RAFT_FRAME / 2;

/// How much of a snapshot is sent per write; each write must make progress within
/// [`DEFAULT_RPC_TIMEOUT`].
const SNAPSHOT_WRITE: usize = 1024 * 1024;

/// Roughly how many bytes an entry takes on the wire.
fn approx_entry_bytes(entry: &aspen_kv::raft_types::Entry) -> usize {
    const OVERHEAD: usize = 64;
    match &entry.payload {
        openraft::EntryPayload::Normal(batch) => {
            OVERHEAD
                + batch
                    .commands
                    .iter()
                    .map(|c| c.op.payload_bytes() + OVERHEAD)
                    .sum::<usize>()
        }
        _ => 4 * 1024,
    }
}

/// How many of `entries`, from the first, fit one AppendEntries (at least one: a single
/// entry always fits a frame).
fn entries_that_fit(entries: &[aspen_kv::raft_types::Entry]) -> usize {
    prefix_within(entries.iter().map(approx_entry_bytes), APPEND_BUDGET)
}

/// How many of the first `sizes` add up to at most `budget`; at least one if there is one.
fn prefix_within(sizes: impl ExactSizeIterator<Item = usize>, budget: usize) -> usize {
    let any = sizes.len().min(1);
    let mut total = 0;
    let fit = sizes
        .take_while(|size| {
            total += size;
            total <= budget
        })
        .count();
    fit.max(any)
}

/// A reader whose every read must complete within `limit` (a stalled sender fails the read
/// instead of holding the stream forever).
struct ReadTimeout<'a, R> {
    inner: &'a mut R,
    limit: Duration,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<'a, R> ReadTimeout<'a, R> {
    fn new(inner: &'a mut R, limit: Duration) -> Self {
        ReadTimeout {
            inner,
            limit,
            deadline: None,
        }
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ReadTimeout<'_, R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        let this = &mut *self;
        if let std::task::Poll::Ready(r) = std::pin::Pin::new(&mut *this.inner).poll_read(cx, buf) {
            this.deadline = None;
            return std::task::Poll::Ready(r);
        }
        let limit = this.limit;
        let deadline = this
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match deadline.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no data for {limit:?}"),
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

/// openraft's view of the pool.
#[derive(Clone)]
pub struct RaftNetworkOverIroh {
    pub peers: Arc<Peers>,
}

impl RaftNetworkFactory<TypeConfig> for RaftNetworkOverIroh {
    type Network = PeerLink;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerLink {
        PeerLink {
            peers: self.peers.clone(),
            target,
            member: node.clone(),
        }
    }
}

/// Raft RPCs to one member.
pub struct PeerLink {
    peers: Arc<Peers>,
    target: NodeId,
    member: Member,
}

impl PeerLink {
    async fn rpc(
        &self,
        request: RaftRequest,
        option: &RPCOption,
    ) -> Result<RaftResponse, RPCError<TypeConfig>> {
        let timeout = option.hard_ttl().min(DEFAULT_RPC_TIMEOUT);
        self.peers
            .call(&self.member, &request, timeout)
            .await
            .map_err(rpc_error)
    }

    /// Streams `snapshot` to the member: the header frame, then the file's bytes, on one
    /// stream; the member installs it and answers.
    async fn send_snapshot(
        &self,
        vote: Vote,
        snapshot: Snapshot,
    ) -> Result<SnapshotResponse<TypeConfig>, PeerError> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let name = hex::encode(&self.member.endpoint_id[..8]);
        let failed = |e: &dyn std::fmt::Display| PeerError::Failed(name.clone(), e.to_string());
        let Snapshot {
            meta,
            snapshot: mut file,
        } = snapshot;
        let bytes = file
            .seek(std::io::SeekFrom::End(0))
            .await
            .map_err(|e| failed(&e))?;
        file.seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(|e| failed(&e))?;
        let conn = self.peers.connection(&self.member).await?;
        let (mut send, mut recv) =
            within(async { conn.open_bi().await.map_err(|e| e.to_string()) })
                .await
                .map_err(|e| failed(&e))?;
        let header = RaftRequest::InstallSnapshot { vote, meta, bytes };
        within(async {
            write_frame(&mut send, &header, MAX_RAFT_FRAME)
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| failed(&e))?;
        let mut buf = vec![0u8; SNAPSHOT_WRITE];
        let mut sent = 0u64;
        while sent < bytes {
            let n = file.read(&mut buf).await.map_err(|e| failed(&e))?;
            if n == 0 {
                return Err(failed(&format!(
                    "the snapshot file ended after {sent} of {bytes} bytes"
                )));
            }
            let chunk = &buf[..n.min((bytes - sent) as usize)];
            within(async { send.write_all(chunk).await.map_err(|e| e.to_string()) })
                .await
                .map_err(|e| failed(&e))?;
            sent += chunk.len() as u64;
        }
        send.finish().map_err(|e| failed(&e))?;
        // Installing can take a while on the member (a large state machine).
        let answer = tokio::time::timeout(
            DEFAULT_RPC_TIMEOUT * 6,
            read_frame::<RaftResponse>(&mut recv, MAX_RAFT_FRAME),
        )
        .await
        .map_err(|_| failed(&"no answer to the snapshot"))?
        .map_err(|e| failed(&e))?;
        match answer {
            RaftResponse::InstallSnapshot(Ok(r)) => Ok(r),
            RaftResponse::InstallSnapshot(Err(e)) => Err(failed(&e)),
            RaftResponse::Refused(why) => Err(PeerError::Refused(name, why)),
            other => Err(failed(&format!("unexpected response {other:?}"))),
        }
    }
}

/// `step`, failed unless it completes within [`DEFAULT_RPC_TIMEOUT`].
async fn within<T>(
    step: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(DEFAULT_RPC_TIMEOUT, step)
        .await
        .unwrap_or_else(|_| Err(format!("no progress within {DEFAULT_RPC_TIMEOUT:?}")))
}

fn rpc_error(e: PeerError) -> RPCError<TypeConfig> {
    match e {
        PeerError::Unreachable(..) => RPCError::Unreachable(Unreachable::new(&e)),
        PeerError::Failed(..) | PeerError::Refused(..) => RPCError::Network(NetworkError::new(&e)),
    }
}

/// A member that answered but could not take the request (it is shutting down, say): a
/// network failure to openraft, which retries.
fn remote_failure(target: NodeId, why: String) -> RPCError<TypeConfig> {
    let e = std::io::Error::other(format!("member {target}: {why}"));
    RPCError::Network(NetworkError::new(&e))
}

fn unexpected(r: RaftResponse) -> RPCError<TypeConfig> {
    let e = std::io::Error::other(format!("unexpected response {r:?}"));
    RPCError::Network(NetworkError::new(&e))
}

impl RaftNetworkV2<TypeConfig> for PeerLink {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // Entries are bounded one by one, but many at once could exceed a frame: send those
        // that fit and report them as a partial success (openraft sends the rest next).
        let fit = entries_that_fit(&rpc.entries);
        let partial = (fit < rpc.entries.len()).then(|| {
            rpc.entries.truncate(fit);
            rpc.entries.last().map(|e| e.log_id)
        });
        match self.rpc(RaftRequest::AppendEntries(rpc), &option).await? {
            RaftResponse::AppendEntries(Ok(AppendEntriesResponse::Success)) => Ok(match partial {
                Some(last) => AppendEntriesResponse::PartialSuccess(last),
                None => AppendEntriesResponse::Success,
            }),
            RaftResponse::AppendEntries(Ok(r)) => Ok(r),
            RaftResponse::AppendEntries(Err(e)) => Err(remote_failure(self.target, e)),
            other => Err(unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.rpc(RaftRequest::Vote(rpc), &option).await? {
            RaftResponse::Vote(Ok(r)) => Ok(r),
            RaftResponse::Vote(Err(e)) => Err(remote_failure(self.target, e)),
            other => Err(unexpected(other)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            sent = self.send_snapshot(vote, snapshot) => sent.map_err(|e| match e {
                PeerError::Unreachable(..) => StreamingError::Unreachable(Unreachable::new(&e)),
                PeerError::Failed(..) | PeerError::Refused(..) => {
                    StreamingError::Network(NetworkError::new(&e))
                }
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn appends_are_cut_to_what_fits_a_frame() {
        assert_eq!(prefix_within([10, 10, 10].into_iter(), 30), 3);
        assert_eq!(prefix_within([10, 10, 10].into_iter(), 25), 2);
        assert_eq!(
            prefix_within([40, 1].into_iter(), 30),
            1,
            "one entry always goes"
        );
        assert_eq!(prefix_within(std::iter::empty(), 30), 0, "a heartbeat");
    }

    /// Calls to a member reuse one pooled connection (found by the key's bytes), a closed
    /// one is replaced by a fresh dial, and a key that is not a curve point is a typed error.
    #[tokio::test]
    async fn calls_reuse_the_pooled_connection_and_redial_once_it_closes() {
        let local = "127.0.0.1:0".parse().unwrap();
        let member_ep =
            aspen_client::endpoint::offline_builder(local, None, vec![RAFT_ALPN.to_vec()])
                .unwrap()
                .bind()
                .await
                .unwrap();
        // Accepts every connection and keeps it open.
        let accepting = member_ep.clone();
        let acceptor = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(incoming) = accepting.accept().await {
                if let Ok(conn) = incoming.await {
                    held.push(conn);
                }
            }
        });
        let caller = aspen_client::endpoint::offline_builder(local, None, vec![])
            .unwrap()
            .bind()
            .await
            .unwrap();
        let peers = Peers::new(caller.clone());
        let member = Member {
            endpoint_id: *member_ep.id().as_bytes(),
            addrs: member_ep.bound_sockets(),
        };
        let first = peers.connection(&member).await.unwrap();
        let again = peers.connection(&member).await.unwrap();
        assert_eq!(
            first.stable_id(),
            again.stable_id(),
            "the pooled connection"
        );
        assert_eq!(peers.conns.lock().unwrap().len(), 1);

        first.close(0u32.into(), b"test");
        let fresh = peers.connection(&member).await.unwrap();
        assert_ne!(
            first.stable_id(),
            fresh.stable_id(),
            "a closed one is replaced"
        );
        assert_eq!(
            peers.connection(&member).await.unwrap().stable_id(),
            fresh.stable_id()
        );

        // Not every 32 bytes are a public key: such a member is unreachable, not a panic.
        let bad = (0..=u8::MAX)
            .map(|b| [b; 32])
            .find(|k| EndpointId::from_bytes(k).is_err())
            .expect("some byte pattern is not a curve point");
        let stranger = Member {
            endpoint_id: bad,
            addrs: member.addrs.clone(),
        };
        match peers.connection(&stranger).await {
            Err(PeerError::Unreachable(..)) => {}
            other => panic!("expected unreachable, got {other:?}"),
        }
        caller.close().await;
        member_ep.close().await;
        acceptor.abort();
    }

    #[tokio::test]
    async fn a_stalled_snapshot_body_fails_instead_of_waiting_forever() {
        let (mut sender, mut stream) = tokio::io::duplex(64);
        sender.write_all(b"abc").await.unwrap();
        let mut body = ReadTimeout::new(&mut stream, Duration::from_millis(50));
        let mut buf = [0u8; 3];
        body.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"abc");
        // The sender stays connected but sends nothing more.
        let err = body.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        drop(sender);
    }
}
