//! Default deny for the protocols iroh's own crates serve (iroh-blobs, iroh-docs,
//! iroh-gossip), which have no notion of Aspen's grants.
//!
//! Two layers:
//!
//! - [`PeerGate`], an iroh endpoint hook, refuses an incoming connection on those ALPNs right
//!   after the QUIC handshake unless the caller's key is a member, a node introduced to this
//!   not-yet-member node, a peer named in a namespace ticket the cluster hosts, a key
//!   whose grant reads blobs or namespaces, or (iroh-blobs and iroh-docs only) a node that
//!   proved its cluster in a federation hello. A stranger costs one handshake and never reaches
//!   a protocol handler. (The client and Raft ALPNs decide per request, see `auth.rs` and
//!   `Peers::serve`.)
//! - [`GatedBlobs`] then decides every iroh-blobs request of a non-member by its hash: the
//!   caller must be allowed to read a tag that names the blob, or the blob must be the content
//!   of an entry of a namespace the caller may read, or the caller is a node of another
//!   cluster that proved it in a federation hello and a tag naming the blob is under a blob
//!   prefix exported to that cluster, or under the local prefix of a followed blob prefix
//!   this cluster mirrors to that cluster. Requests for the children of a hash
//!   sequence and pushes are refused.
//!
//! - [`GatedDocs`] serves members' iroh-docs syncs through the engine (live sync, as iroh-docs
//!   does) and everyone else's through iroh-docs' own sync handler with an accept decision of
//!   ours: each namespace asked for must be one the caller may read (a grant, its ticket
//!   names the caller, or it is exported to the cluster the caller proved in a federation
//!   hello, or it is a followed namespace this cluster mirrors to that cluster); others are
//!   refused as not found.
//!
//! iroh-gossip cannot be gated per topic with the stock crate (the topic is inside messages
//! it reads itself): a peer admitted on its ALPN can join the topic of any namespace whose id
//! it knows and see its live announcements. SECURITY.md lists this gap.

use std::sync::{Arc, OnceLock, Weak};

use iroh::endpoint::{AfterHandshakeOutcome, Connection, EndpointHooks, VarInt};
use iroh::protocol::{AcceptError, ProtocolHandler};
use iroh::EndpointId;
use iroh_blobs::provider::events::{
    AbortReason, ConnectMode, EventMask, EventSender, ObserveMode, ProviderMessage, RequestMode,
    ThrottleMode,
};

use super::NodeState;

/// QUIC close code for a refused connection.
pub const REFUSED: VarInt = VarInt::from_u32(403);

/// The node a gate asks, set once the node state exists (the hook is installed before).
pub type NodeSlot = Arc<OnceLock<Weak<NodeState>>>;

/// The endpoint hook: connection-level default deny for iroh's protocols.
#[derive(Debug, Clone, Default)]
pub struct PeerGate {
    pub node: NodeSlot,
}

impl EndpointHooks for PeerGate {
    async fn after_handshake<'a>(&'a self, conn: &'a Connection) -> AfterHandshakeOutcome {
        if conn.side().is_client() {
            return AfterHandshakeOutcome::Accept; // We dialled: our own choice.
        }
        let alpn = conn.alpn();
        let gated =
            alpn == iroh_blobs::ALPN || alpn == iroh_docs::ALPN || alpn == iroh_gossip::ALPN;
        if !gated {
            return AfterHandshakeOutcome::Accept;
        }
        let allowed = self
            .node
            .get()
            .and_then(Weak::upgrade)
            .is_some_and(|node| node.peer_may_connect(&conn.remote_id(), alpn));
        if allowed {
            AfterHandshakeOutcome::Accept
        } else {
            tracing::debug!(peer = %conn.remote_id().fmt_short(), alpn = %String::from_utf8_lossy(alpn), "connection refused: no grant");
            AfterHandshakeOutcome::Reject {
                error_code: REFUSED,
                reason: b"permission denied: no grant for this protocol".to_vec(),
            }
        }
    }
}

/// Every read request of a non-member is decided by its hash; pushes are refused.
const GATED_EVENTS: EventMask = EventMask {
    connected: ConnectMode::None,
    get: RequestMode::Intercept,
    get_many: RequestMode::Intercept,
    push: RequestMode::Disabled,
    observe: ObserveMode::Intercept,
    throttle: ThrottleMode::None,
};

/// How many pending decisions one connection may queue.
const DECISION_QUEUE: usize = 16;

/// The iroh-blobs provider with per-hash authorization for non-members.
#[derive(Debug, Clone)]
pub struct GatedBlobs {
    pub store: iroh_blobs::api::Store,
    pub node: NodeSlot,
}

impl ProtocolHandler for GatedBlobs {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let Some(node) = running_node(&self.node, &conn) else {
            return Ok(());
        };
        let peer = conn.remote_id();
        let metrics = node.cluster.metrics.clone();
        if node.is_member_key(peer.as_bytes()) {
            drop(node);
            let served = iroh_blobs::provider::handle_connection(
                conn.clone(),
                self.store.clone(),
                EventSender::DEFAULT,
            );
            count_sent(&conn, &metrics.blob_bytes_out, served).await;
            return Ok(());
        }
        drop(node);
        let (events, mut decisions) = EventSender::channel(DECISION_QUEUE, GATED_EVENTS);
        let slot = self.node.clone();
        let decider = tokio::spawn(async move {
            while let Some(msg) = decisions.recv().await {
                let Some(node) = slot.get().and_then(Weak::upgrade) else {
                    return; // Dropping the message refuses it.
                };
                decide(&node, peer, msg).await;
            }
        });
        let served =
            iroh_blobs::provider::handle_connection(conn.clone(), self.store.clone(), events);
        count_sent(&conn, &metrics.blob_bytes_out, served).await;
        decider.abort();
        Ok(())
    }

    async fn shutdown(&self) {
        // The router's shutdown also stops the store (as BlobsProtocol does).
        if let Err(e) = self.store.shutdown().await {
            tracing::debug!("blob store shutdown: {e}");
        }
    }
}

/// How long a served (or refused) iroh-docs sync waits for the peer to close.
const DOCS_LINGER: std::time::Duration = std::time::Duration::from_secs(3);

/// iroh-docs with a per-namespace decision for non-members (see the module docs).
#[derive(Debug, Clone)]
pub struct GatedDocs {
    pub docs: iroh_docs::protocol::Docs,
    pub sync: iroh_docs::actor::SyncHandle,
    pub node: NodeSlot,
}

impl ProtocolHandler for GatedDocs {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let Some(node) = running_node(&self.node, &conn) else {
            return Ok(());
        };
        let peer = conn.remote_id();
        if node.is_member_key(peer.as_bytes()) {
            drop(node);
            return self.docs.accept(conn).await;
        }
        let readable = node.namespaces_readable_by(&peer).await;
        drop(node);
        let decide = move |namespace: iroh_docs::NamespaceId, _peer| {
            let allowed = readable.contains(namespace.as_bytes());
            async move {
                if allowed {
                    iroh_docs::net::AcceptOutcome::Allow
                } else {
                    // The same answer as for a namespace this node does not host.
                    iroh_docs::net::AcceptOutcome::Reject(iroh_docs::net::AbortReason::NotFound)
                }
            }
        };
        let held = conn.clone();
        if let Err(e) =
            iroh_docs::net::handle_connection(self.sync.clone(), conn, decide, None).await
        {
            tracing::debug!(peer = %peer.fmt_short(), "iroh-docs sync not served: {e}");
        }
        // Dropping the last handle closes the connection at once, possibly before the peer
        // read our last message (an abort's reason): let the peer close it, briefly.
        let _ = tokio::time::timeout(DOCS_LINGER, held.closed()).await;
        Ok(())
    }

    async fn shutdown(&self) {
        self.docs.shutdown().await;
    }
}

/// The node behind a gate, or `None` (and `conn` closed) while it stops.
/// Runs `serve` (one iroh-blobs connection) and adds what the connection sends to `sent`:
/// every second while it runs, and the rest when it ends.
async fn count_sent(
    conn: &Connection,
    sent: &prometheus_client::metrics::counter::Counter,
    serve: impl std::future::Future<Output = ()>,
) {
    let mut counted = 0u64;
    let mut add = || {
        let now = conn.stats().udp_tx.bytes;
        sent.inc_by(now.saturating_sub(counted));
        counted = counted.max(now);
    };
    tokio::pin!(serve);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut serve => break,
            _ = tick.tick() => add(),
        }
    }
    add();
}

fn running_node(slot: &NodeSlot, conn: &Connection) -> Option<Arc<NodeState>> {
    let node = slot.get().and_then(Weak::upgrade);
    if node.is_none() {
        conn.close(REFUSED, b"node stopping");
    }
    node
}

fn verdict(ok: bool) -> Result<(), AbortReason> {
    if ok {
        Ok(())
    } else {
        Err(AbortReason::Permission)
    }
}

async fn decide(node: &NodeState, peer: EndpointId, msg: ProviderMessage) {
    match msg {
        ProviderMessage::GetRequestReceived(m) => {
            let r = &m.inner.request;
            // Offsets past 0 are children of a hash sequence, served without further events.
            let children = r
                .ranges
                .iter_non_empty_infinite()
                .any(|(offset, _)| offset > 0);
            let ok = !children && node.peer_may_read_blob(&peer, r.hash.as_bytes()).await;
            m.tx.send(verdict(ok)).await.ok();
        }
        ProviderMessage::GetManyRequestReceived(m) => {
            let mut ok = true;
            for h in &m.inner.request.hashes {
                ok &= node.peer_may_read_blob(&peer, h.as_bytes()).await;
            }
            m.tx.send(verdict(ok)).await.ok();
        }
        ProviderMessage::ObserveRequestReceived(m) => {
            let ok = node
                .peer_may_read_blob(&peer, m.inner.request.hash.as_bytes())
                .await;
            m.tx.send(verdict(ok)).await.ok();
        }
        ProviderMessage::PushRequestReceived(m) => {
            m.tx.send(Err(AbortReason::Permission)).await.ok();
        }
        ProviderMessage::ClientConnected(m) => {
            m.tx.send(Ok(())).await.ok();
        }
        ProviderMessage::Throttle(m) => {
            m.tx.send(Ok(())).await.ok();
        }
        // Notifications need no answer; anything else that carries a reply channel is
        // refused by dropping it.
        _ => {}
    }
}

/// Most entries of one namespace scanned to find whether a blob is its content.
const MAX_CONTENT_SCAN: usize = 100_000;

impl NodeState {
    /// Whether `key` is the node key of a current member.
    pub fn is_member_key(&self, key: &[u8; 32]) -> bool {
        self.cluster.member_keys().contains(key)
    }

    /// What a key's grant allows (no token: iroh's protocols cannot carry one).
    fn grant_access<'a>(&self, caller: &'a super::auth::Caller) -> super::auth::Access<'a> {
        let members = self.cluster.member_keys();
        self.auth
            .access(caller, members, super::identity::unix_now())
    }

    /// The namespaces `peer` may read: granted `ns:read` on them, named in their ticket
    /// (the peers an imported namespace syncs with), or exported to the cluster the peer
    /// proved in a federation hello.
    async fn namespaces_readable_by(&self, peer: &EndpointId) -> Vec<[u8; 32]> {
        let caller = super::auth::Caller::new(*peer.as_bytes());
        let access = self.grant_access(&caller);
        let Ok(tickets) = self.namespaces.ns_tickets().await else {
            return Vec::new();
        };
        let exported = match self
            .fed
            .peers
            .cluster_of(peer.as_bytes(), super::identity::unix_now())
        {
            Some(cluster) => self.namespaces_exported_to(&cluster).await,
            None => Vec::new(),
        };
        tickets
            .into_iter()
            .filter(|(id, ticket)| {
                access.may(
                    aspen_trust::Kind::Ns,
                    aspen_trust::Action::Read,
                    hex::encode(id).as_bytes(),
                ) || ticket.nodes.iter().any(|n| n.id == *peer)
                    || exported.contains(id)
            })
            .map(|(id, _)| id)
            .collect()
    }

    /// The namespaces exported or mirrored to `cluster`.
    async fn namespaces_exported_to(&self, cluster: &aspen_trust::ClusterKey) -> Vec<[u8; 32]> {
        let mut out = self.own_namespaces_exported_to(cluster).await;
        for (_, resource) in self
            .mirrored_to(cluster, aspen_sync::ResourceKind::Ns)
            .await
        {
            if let Some(id) = hex::decode(&resource.name)
                .ok()
                .and_then(|b| b.try_into().ok())
            {
                out.push(id);
            }
        }
        out
    }

    /// The namespaces this cluster exports to `cluster` (its own).
    async fn own_namespaces_exported_to(&self, cluster: &aspen_trust::ClusterKey) -> Vec<[u8; 32]> {
        let prefix = aspen_federation::export_key(&aspen_sync::Resource {
            kind: aspen_sync::ResourceKind::Ns,
            name: String::new(),
        });
        let Ok(exports) = self
            .cluster
            .sm
            .system_scan(prefix, aspen_federation::MAX_EXPORTS + 1)
            .await
        else {
            return Vec::new();
        };
        exports
            .iter()
            .filter_map(|(key, value)| {
                let export = aspen_federation::Export::decode(value).ok()?;
                let resource = aspen_federation::resource_of_key(key).ok()?;
                if !export.allows(&cluster.to_bytes()) {
                    return None;
                }
                hex::decode(&resource.name).ok()?.try_into().ok()
            })
            .collect()
    }

    /// Connection-level check for iroh's protocols (see `PeerGate`).
    pub fn peer_may_connect(&self, peer: &EndpointId, alpn: &[u8]) -> bool {
        if self.is_raft_peer(peer) {
            return true;
        }
        let caller = super::auth::Caller::new(*peer.as_bytes());
        let access = self.grant_access(&caller);
        use aspen_trust::{Action, Kind};
        if access.may_any(Kind::Ns, Action::Read)
            || (alpn == iroh_blobs::ALPN && access.may_any(Kind::Blob, Action::Read))
        {
            return true;
        }
        // Nodes of another cluster that proved it over the federation protocol fetch the
        // blobs and sync the namespaces exported to that cluster (each blob decided by its
        // tags or namespace, each namespace by the exports). Never gossip.
        if (alpn == iroh_blobs::ALPN || alpn == iroh_docs::ALPN)
            && self
                .fed
                .peers
                .cluster_of(peer.as_bytes(), super::identity::unix_now())
                .is_some()
        {
            return true;
        }
        // Announcements of new manifests (iroh-gossip): nodes of other clusters that proved
        // their cluster to us, and the nodes of origins and mirrors our pulls reached (their
        // certificates checked in the hello).
        if alpn == iroh_gossip::ALPN
            && (self
                .fed
                .peers
                .cluster_of(peer.as_bytes(), super::identity::unix_now())
                .is_some()
                || self
                    .fed
                    .pulls
                    .reached
                    .lock()
                    .expect("lock")
                    .values()
                    .any(|a| a.id == *peer))
        {
            return true;
        }
        // Peers named in a hosted namespace's ticket (its origin, for an imported one).
        self.namespaces.ticket_peers().contains(peer.as_bytes())
    }

    /// Whether some tag naming `hash` is under a blob prefix exported to `cluster`, or under
    /// the local prefix of a followed blob prefix mirrored to `cluster`.
    async fn blob_exported_to(&self, cluster: &aspen_trust::ClusterKey, hash: &[u8; 32]) -> bool {
        let prefix = aspen_federation::export_key(&aspen_sync::Resource::blob(""));
        let Ok(exports) = self
            .cluster
            .sm
            .system_scan(prefix.clone(), aspen_federation::MAX_EXPORTS + 1)
            .await
        else {
            return false;
        };
        let mut allowed: Vec<String> = exports
            .iter()
            .filter_map(|(key, value)| {
                let export = aspen_federation::Export::decode(value).ok()?;
                let resource = aspen_federation::resource_of_key(key).ok()?;
                export.allows(&cluster.to_bytes()).then_some(resource.name)
            })
            .collect();
        allowed.extend(self.mirrored_blob_prefixes(cluster).await);
        if allowed.is_empty() {
            return false;
        }
        let Ok(index) = self.blobs.blob_index().await else {
            return false;
        };
        index
            .tags_of(hash)
            .iter()
            .any(|t| allowed.iter().any(|p| t.as_str().starts_with(p.as_str())))
    }

    /// The followed resources of `kind` this cluster mirrors to `cluster`.
    async fn mirrored_to(
        &self,
        cluster: &aspen_trust::ClusterKey,
        kind: aspen_sync::ResourceKind,
    ) -> Vec<(aspen_trust::ClusterKey, aspen_sync::Resource)> {
        let policies = super::federation::mirror::mirror_policies(&self.cluster)
            .await
            .unwrap_or_default();
        policies
            .into_iter()
            .filter(|(_, resource, policy)| {
                resource.kind == kind && policy.allows(&cluster.to_bytes())
            })
            .map(|(origin, resource, _)| (origin, resource))
            .collect()
    }

    /// The local tag prefixes of the followed blob prefixes mirrored to `cluster`.
    async fn mirrored_blob_prefixes(&self, cluster: &aspen_trust::ClusterKey) -> Vec<String> {
        let mut out = Vec::new();
        for (origin, resource) in self
            .mirrored_to(cluster, aspen_sync::ResourceKind::Blob)
            .await
        {
            let follow = self
                .cluster
                .sm
                .system_get(aspen_federation::follow_key(&origin, &resource))
                .await;
            if let Ok(Some(bytes)) = follow {
                if let Ok(follow) = aspen_federation::Follow::decode(&bytes) {
                    out.push(follow.into);
                }
            }
        }
        out
    }

    /// Whether non-member `peer` may fetch the blob `hash`: it may read a tag naming it, or
    /// the blob is the content of an entry in a namespace it may read.
    pub async fn peer_may_read_blob(&self, peer: &EndpointId, hash: &[u8; 32]) -> bool {
        if self.is_member_key(peer.as_bytes()) {
            return true;
        }
        let proved = self
            .fed
            .peers
            .cluster_of(peer.as_bytes(), super::identity::unix_now());
        if let Some(cluster) = proved {
            if self.blob_exported_to(&cluster, hash).await {
                return true;
            }
        }
        let caller = super::auth::Caller::new(*peer.as_bytes());
        let access = self.grant_access(&caller);
        use aspen_trust::{Action, Kind};
        if let Ok(index) = self.blobs.blob_index().await {
            let by_tag = index
                .tags_of(hash)
                .iter()
                .any(|t| access.may(Kind::Blob, Action::Read, t.as_str().as_bytes()));
            if by_tag {
                return true;
            }
        }
        drop(access);
        for id in self.namespaces_readable_by(peer).await {
            if self
                .namespaces
                .namespace_has_content(&id, hash, MAX_CONTENT_SCAN)
                .await
            {
                return true;
            }
        }
        false
    }
}
