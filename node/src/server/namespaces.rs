//! iroh-docs namespaces hosted by the cluster (`aspen docs ...`).
//!
//! Every node runs an iroh-docs engine (with iroh-gossip) over its own blob store. Which
//! namespaces the cluster hosts is strongly consistent: a registry in the replicated system
//! key space, one record per namespace holding its iroh-docs ticket (the capability, write or
//! read, and the peers it came from). Each node's sync loop opens a local replica of every
//! registered namespace and syncs it live with the other members (and a ticket's peers), so
//! the replicas converge as iroh-docs converges them: eventually, entry by entry, signed by
//! their authors. Every few seconds each replica is reconciled with its peers again, so an
//! entry gossip missed still arrives.
//!
//! iroh-docs downloads an entry's content once, when the entry arrives, and retries only
//! when a gossip neighbour announces it has the content. An entry that arrived from a peer
//! that did not yet hold the content (or whose download failed) would otherwise stay
//! without a value for good, so a repair loop fetches content that has been missing for a
//! whole pass from the namespace's peers itself.
//!
//! The registry holds write capabilities (namespace secrets) in the clear, like every other
//! replicated state: members are trusted with them.
//!
//! ```text
//! ns/<namespace id, 32 bytes>   NamespaceRecord { ticket, created_at_ms }
//! ```

use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aspen_client::protocol::{
    check_ns_key, NamespaceError, NamespaceSummary, NsEntry, NsRequest, NsResponse, RpcError,
    MAX_NS_LIST, MAX_NS_VALUE_BYTES,
};
use aspen_kv::api::{SystemOp, SystemTxn};
use futures::StreamExt;
use iroh::{Endpoint, EndpointAddr, EndpointId};
use iroh_docs::api::protocol::{AddrInfoOptions, ShareMode};
use iroh_docs::api::Doc;
use iroh_docs::protocol::Docs;
use iroh_docs::store::Query;
use iroh_docs::{AuthorId, Capability, DocTicket, NamespaceId};
use iroh_gossip::net::Gossip;
use serde::{Deserialize, Serialize};

use super::blobs::BlobService;
use super::ClusterHandle;

/// Prefix of the namespace registry in the system key space.
pub const REGISTRY_PREFIX: &[u8] = b"ns/";
/// Version of [`NamespaceRecord`]'s encoding.
const RECORD_VERSION: u8 = 1;
/// How often the sync loop compares the registry with the local replicas (and at once when
/// the registry changes).
const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// How often every replica is reconciled with its peers again, whatever gossip delivered.
/// Gossip alone can miss entries (a peer that joined before the others opened the
/// namespace), so this is the anti-entropy that makes replicas converge.
const RESYNC_INTERVAL: Duration = Duration::from_secs(5);
/// How often the content repair loop looks for entries whose content never arrived.
const REPAIR_INTERVAL: Duration = Duration::from_secs(5);
/// Most missing contents one repair pass fetches per namespace (the rest wait a pass).
const MAX_REPAIRS_PER_PASS: usize = 64;
/// How long one repair fetch from one peer may take.
const REPAIR_FETCH_TIMEOUT: Duration = Duration::from_secs(60);

fn registry_key(id: &[u8; 32]) -> Vec<u8> {
    [REGISTRY_PREFIX, id.as_slice()].concat()
}

/// One hosted namespace, as the registry holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceRecord {
    /// An iroh-docs ticket (`doc...`): the capability, and peers outside the cluster to sync
    /// with (for imported namespaces).
    pub ticket: String,
    pub created_at_ms: u64,
}

impl NamespaceRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![RECORD_VERSION];
        out.extend(postcard::to_allocvec(self).expect("records always encode"));
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, NamespaceError> {
        match bytes.split_first() {
            Some((&RECORD_VERSION, body)) => match postcard::take_from_bytes(body) {
                Ok((record, [])) => Ok(record),
                _ => Err(NamespaceError::Store("corrupt namespace record".into())),
            },
            _ => Err(NamespaceError::Store(
                "namespace record of an unknown version".into(),
            )),
        }
    }

    fn parsed(&self) -> Result<DocTicket, NamespaceError> {
        DocTicket::from_str(&self.ticket).map_err(|e| NamespaceError::BadTicket(e.to_string()))
    }
}

/// Most namespaces a cluster hosts (created or imported).
pub const MAX_NAMESPACES: usize = 1024;
/// Most records (latest entry per author and key) a namespace may have to be exported: a
/// manifest's digest covers all of them, computed on every pull.
pub const MAX_FED_NS_RECORDS: usize = 100_000;
/// Most peers a hosted namespace's ticket may name.
pub const MAX_TICKET_PEERS: usize = 16;

fn store_error(e: impl std::fmt::Display) -> RpcError {
    NamespaceError::Store(e.to_string()).into()
}

/// A node's iroh-docs engine and what its sync loop has started.
pub struct NamespaceService {
    cluster: ClusterHandle,
    /// Where entry contents live (and are fetched into when a replica lacks them).
    blobs: Arc<BlobService>,
    pub docs: Docs,
    /// The replica actor behind `docs` (syncs served outside the engine's live sync).
    pub sync: iroh_docs::actor::SyncHandle,
    pub gossip: Gossip,
    author: AuthorId,
    /// Per namespace: the peers live sync was last started with, and when.
    syncing: Mutex<HashMap<NamespaceId, (BTreeSet<EndpointId>, Instant)>>,
    /// Every peer named in a hosted namespace's ticket (the access gate admits them to
    /// iroh-docs and iroh-gossip), as of the sync loop's last pass.
    ticket_peers: Mutex<std::collections::HashSet<[u8; 32]>>,
}

impl NamespaceService {
    pub async fn start(
        dir: &std::path::Path,
        cluster: ClusterHandle,
        endpoint: Endpoint,
        blobs: Arc<BlobService>,
        protect: iroh_docs::engine::ProtectCallbackHandler,
    ) -> Result<NamespaceService, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let gossip = Gossip::builder().spawn(endpoint.clone());
        // What `Docs::persistent(dir).spawn(..)` does (same files), keeping a handle to the
        // replica actor: the access gate serves non-members' syncs through it, deciding
        // each namespace they ask for (`gate::GatedDocs`).
        let cannot = |e: anyhow::Error| format!("cannot start iroh-docs in {}: {e}", dir.display());
        let replica_store =
            iroh_docs::store::Store::persistent(dir.join("docs.redb")).map_err(cannot)?;
        let store: iroh_blobs::api::Store = (*blobs.store).clone();
        let downloader = store.downloader(&endpoint);
        let engine = iroh_docs::engine::Engine::spawn(
            endpoint,
            gossip.clone(),
            replica_store,
            store,
            downloader,
            iroh_docs::engine::DefaultAuthorStorage::Persistent(dir.join("default-author")),
            Some(protect),
        )
        .await
        .map_err(cannot)?;
        let sync = engine.sync.clone();
        let docs = Docs::new(engine);
        let author = docs
            .author_default()
            .await
            .map_err(|e| format!("iroh-docs has no default author: {e}"))?;
        Ok(NamespaceService {
            cluster,
            blobs,
            docs,
            sync,
            gossip,
            author,
            syncing: Mutex::new(HashMap::new()),
            ticket_peers: Mutex::new(Default::default()),
        })
    }

    /// Peers named in the tickets of the namespaces the cluster hosts.
    pub fn ticket_peers(&self) -> std::collections::HashSet<[u8; 32]> {
        self.ticket_peers.lock().expect("lock").clone()
    }
}

fn entry_of(e: &iroh_docs::Entry) -> NsEntry {
    NsEntry {
        key: e.key().to_vec(),
        author: *e.author().as_bytes(),
        hash: *e.content_hash().as_bytes(),
        size: e.content_len(),
        timestamp_us: e.timestamp(),
    }
}

impl NamespaceService {
    /// Serves one namespace request (access already checked; listings are filtered by the
    /// caller).
    pub async fn handle(&self, request: NsRequest) -> Result<NsResponse, RpcError> {
        match request {
            NsRequest::Create => self.ns_create().await,
            NsRequest::Set {
                namespace,
                key,
                value,
            } => self.ns_set(namespace, key, value).await,
            NsRequest::Get { namespace, key } => self.ns_get(namespace, key).await,
            NsRequest::List {
                namespace,
                prefix,
                limit,
            } => self.ns_list(namespace, prefix, limit).await,
            NsRequest::Namespaces => self.ns_namespaces().await,
            NsRequest::Share { namespace, write } => self.ns_share(namespace, write).await,
            NsRequest::Import { ticket } => self.ns_import(ticket).await,
        }
    }

    /// Every other member's address.
    fn member_addrs(&self) -> Vec<EndpointAddr> {
        self.cluster
            .members()
            .into_iter()
            .filter(|(id, _)| *id != self.cluster.id)
            .filter_map(|(_, m)| super::blobs::endpoint_addr(&m))
            .collect()
    }

    async fn ns_record(&self, id: &[u8; 32]) -> Result<NamespaceRecord, RpcError> {
        let read = || {
            let key = registry_key(id);
            self.cluster.sm.system_view(move |v| v.get(&key))
        };
        let mut found = read().await?;
        if found.is_none() {
            // Registered through another member just now? Catch up before saying unknown.
            self.cluster.read_barrier().await?;
            found = read().await?;
        }
        match found {
            Some(bytes) => Ok(NamespaceRecord::decode(&bytes)?),
            None => Err(NamespaceError::Unknown(hex::encode(id)).into()),
        }
    }

    /// The local replica of a registered namespace, opened (or imported) now if the sync
    /// loop has not yet done so.
    pub(super) async fn ns_open(&self, id: &[u8; 32]) -> Result<(Doc, DocTicket), RpcError> {
        let record = self.ns_record(id).await?;
        let ticket = record.parsed()?;
        let doc = self.local_replica(&ticket.capability).await?;
        Ok((doc, ticket))
    }

    async fn ns_register(&self, id: &[u8; 32], ticket: &DocTicket) -> Result<(), RpcError> {
        // Ticket peers are admitted to iroh-docs and iroh-gossip: bounded, like the registry.
        if ticket.nodes.len() > MAX_TICKET_PEERS {
            return Err(NamespaceError::BadTicket(format!(
                "it names {} peers; the limit is {MAX_TICKET_PEERS}",
                ticket.nodes.len()
            ))
            .into());
        }
        let registry = self.ns_registry().await?;
        if registry.len() >= MAX_NAMESPACES && !registry.iter().any(|(known, _)| known == id) {
            return Err(NamespaceError::TooMany {
                max: MAX_NAMESPACES,
            }
            .into());
        }
        let record = NamespaceRecord {
            ticket: ticket.to_string(),
            created_at_ms: super::identity::unix_now() * 1000,
        };
        self.cluster
            .propose_system_txn(SystemTxn {
                require: vec![],
                writes: vec![SystemOp::Put {
                    key: registry_key(id),
                    value: record.encode(),
                }],
            })
            .await?;
        Ok(())
    }

    async fn ns_create(&self) -> Result<NsResponse, RpcError> {
        if !self.cluster.is_member() {
            return Err(RpcError::NotInitialized);
        }
        let doc = self.docs.create().await.map_err(store_error)?;
        let ticket = doc
            .share(ShareMode::Write, AddrInfoOptions::Addresses)
            .await
            .map_err(store_error)?;
        let id = *doc.id().as_bytes();
        self.ns_register(&id, &ticket).await?;
        tracing::info!(namespace = %hex::encode(id), "namespace created");
        Ok(NsResponse::Created { id })
    }

    async fn ns_set(
        &self,
        id: [u8; 32],
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<NsResponse, RpcError> {
        check_ns_key(&key)?;
        if value.len() > MAX_NS_VALUE_BYTES {
            return Err(NamespaceError::ValueTooLarge {
                len: value.len(),
                max: MAX_NS_VALUE_BYTES,
            }
            .into());
        }
        let (doc, ticket) = self.ns_open(&id).await?;
        if matches!(ticket.capability, Capability::Read(_)) {
            return Err(NamespaceError::ReadOnly(hex::encode(id)).into());
        }
        let hash = doc
            .set_bytes(self.author, key, value)
            .await
            .map_err(store_error)?;
        Ok(NsResponse::Set {
            hash: *hash.as_bytes(),
        })
    }

    async fn ns_get(&self, id: [u8; 32], key: Vec<u8>) -> Result<NsResponse, RpcError> {
        check_ns_key(&key)?;
        let (doc, _) = self.ns_open(&id).await?;
        let entry = doc
            .get_one(Query::single_latest_per_key().key_exact(&key))
            .await
            .map_err(store_error)?;
        let Some(entry) = entry else {
            return Ok(NsResponse::Value {
                entry: None,
                value: None,
            });
        };
        let value = match self
            .blobs
            .store
            .blobs()
            .status(entry.content_hash())
            .await
            .map_err(store_error)?
        {
            iroh_blobs::api::proto::BlobStatus::Complete { .. } => Some(
                self.blobs
                    .store
                    .blobs()
                    .get_bytes(entry.content_hash())
                    .await
                    .map_err(store_error)?
                    .to_vec(),
            ),
            _ => None,
        };
        Ok(NsResponse::Value {
            entry: Some(entry_of(&entry)),
            value,
        })
    }

    async fn ns_list(
        &self,
        id: [u8; 32],
        prefix: Vec<u8>,
        limit: u32,
    ) -> Result<NsResponse, RpcError> {
        let limit = (limit as usize).clamp(1, MAX_NS_LIST);
        let (doc, _) = self.ns_open(&id).await?;
        let query = Query::single_latest_per_key()
            .key_prefix(&prefix)
            .limit(limit as u64 + 1);
        let mut stream = Box::pin(doc.get_many(query).await.map_err(store_error)?);
        let mut entries = Vec::new();
        while let Some(entry) = stream.next().await {
            entries.push(entry_of(&entry.map_err(store_error)?));
        }
        let more = entries.len() > limit;
        entries.truncate(limit);
        Ok(NsResponse::Entries { entries, more })
    }

    async fn ns_registry(&self) -> Result<Vec<([u8; 32], NamespaceRecord)>, RpcError> {
        let records = self
            .cluster
            .sm
            .system_view(|view| {
                let mut out = Vec::new();
                view.scan(REGISTRY_PREFIX, |key, value| {
                    out.push((key[REGISTRY_PREFIX.len()..].to_vec(), value.to_vec()));
                    true
                })?;
                Ok(out)
            })
            .await?;
        records
            .into_iter()
            .map(|(id, value)| {
                let id: [u8; 32] = id
                    .try_into()
                    .map_err(|_| NamespaceError::Store("malformed registry key".into()))?;
                Ok((id, NamespaceRecord::decode(&value)?))
            })
            .collect()
    }

    async fn ns_namespaces(&self) -> Result<NsResponse, RpcError> {
        self.cluster.read_barrier().await?;
        let mut list = Vec::new();
        for (id, record) in self.ns_registry().await? {
            list.push(NamespaceSummary {
                id,
                writable: matches!(record.parsed()?.capability, Capability::Write(_)),
                created_at_ms: record.created_at_ms,
            });
        }
        Ok(NsResponse::Namespaces(list))
    }

    async fn ns_share(&self, id: [u8; 32], write: bool) -> Result<NsResponse, RpcError> {
        self.cluster.read_barrier().await?;
        let ticket = self.ns_record(&id).await?.parsed()?;
        let capability = match (ticket.capability, write) {
            (Capability::Write(secret), true) => Capability::Write(secret),
            (Capability::Read(_), true) => {
                return Err(NamespaceError::ReadOnly(hex::encode(id)).into())
            }
            (c, false) => Capability::Read(c.id()),
        };
        let mut nodes = vec![super::blobs::endpoint_addr(&self.cluster.me)
            .ok_or_else(|| RpcError::Internal("own address is invalid".into()))?];
        nodes.extend(self.member_addrs());
        Ok(NsResponse::Ticket {
            ticket: DocTicket::new(capability, nodes).to_string(),
        })
    }

    async fn ns_import(&self, ticket: String) -> Result<NsResponse, RpcError> {
        if !self.cluster.is_member() {
            return Err(RpcError::NotInitialized);
        }
        let ticket = DocTicket::from_str(ticket.trim())
            .map_err(|e| NamespaceError::BadTicket(e.to_string()))?;
        let id = *ticket.capability.id().as_bytes();
        self.cluster.read_barrier().await?;
        // A read ticket never downgrades a namespace the cluster can write.
        if let Ok(existing) = self.ns_record(&id).await {
            if matches!(existing.parsed()?.capability, Capability::Write(_))
                || matches!(ticket.capability, Capability::Read(_))
            {
                return Ok(NsResponse::Created { id });
            }
        }
        self.ns_register(&id, &ticket).await?;
        self.wake_sync();
        tracing::info!(namespace = %hex::encode(id), "namespace imported");
        Ok(NsResponse::Created { id })
    }

    /// The registered namespaces whose records parse, with their tickets.
    pub(super) async fn ns_tickets(&self) -> Result<Vec<([u8; 32], DocTicket)>, RpcError> {
        let mut out = Vec::new();
        for (id, record) in self.ns_registry().await? {
            match record.parsed() {
                Ok(t) => out.push((id, t)),
                Err(e) => {
                    tracing::warn!(namespace = %hex::encode(id), "unusable registry record: {e}")
                }
            }
        }
        Ok(out)
    }

    /// The peers a namespace syncs with: the other members, then the ticket's other peers.
    fn ns_peers(&self, ticket: &DocTicket, members: &[EndpointAddr]) -> Vec<EndpointAddr> {
        let my_id = self.cluster.me.endpoint_id;
        let mut peers: Vec<EndpointAddr> = members.to_vec();
        peers.extend(
            ticket
                .nodes
                .iter()
                .filter(|a| a.id.as_bytes() != &my_id && !members.iter().any(|m| m.id == a.id))
                .cloned(),
        );
        peers
    }

    /// One pass of the sync loop: a local replica of every registered namespace, live-synced
    /// with the other members and the peers its ticket names.
    async fn sync_namespaces_once(&self) -> Result<(), RpcError> {
        let ns = self;
        let members = self.member_addrs();
        let tickets = self.ns_tickets().await?;
        *ns.ticket_peers.lock().expect("lock") = tickets
            .iter()
            .flat_map(|(_, t)| t.nodes.iter().map(|n| *n.id.as_bytes()))
            .collect();
        for (id, ticket) in tickets {
            let nid = NamespaceId::from(&id);
            let doc = ns.local_replica(&ticket.capability).await?;
            let peers = self.ns_peers(&ticket, &members);
            let ids: BTreeSet<EndpointId> = peers.iter().map(|p| p.id).collect();
            let current = matches!(
                ns.syncing.lock().expect("lock").get(&nid),
                Some((started, at)) if *started == ids && at.elapsed() < RESYNC_INTERVAL
            );
            if current {
                continue;
            }
            doc.start_sync(peers).await.map_err(store_error)?;
            ns.syncing
                .lock()
                .expect("lock")
                .insert(nid, (ids, Instant::now()));
        }
        Ok(())
    }

    /// One pass of the repair loop: fetches, from the namespace's peers, the content of
    /// entries that was already missing on the previous pass (so content iroh-docs is still
    /// downloading is left to it). `missing_before` carries that set between passes.
    async fn repair_content_once(
        &self,
        missing_before: &mut HashMap<NamespaceId, BTreeSet<iroh_blobs::Hash>>,
    ) -> Result<(), RpcError> {
        let members = self.member_addrs();
        let mut missing_now = HashMap::new();
        for (id, ticket) in self.ns_tickets().await? {
            let nid = NamespaceId::from(&id);
            let doc = self.local_replica(&ticket.capability).await?;
            let missing = self.missing_content(&doc).await?;
            let before = missing_before.remove(&nid).unwrap_or_default();
            let peers = self.ns_peers(&ticket, &members);
            for hash in missing.intersection(&before).take(MAX_REPAIRS_PER_PASS) {
                self.repair_one(&id, hash, &peers).await?;
            }
            missing_now.insert(nid, missing);
        }
        *missing_before = missing_now;
        Ok(())
    }

    /// Whether `hash` is the content of an entry of namespace `id` (scanning at most `max`
    /// entries of the local replica).
    pub(super) async fn namespace_has_content(
        &self,
        id: &[u8; 32],
        hash: &[u8; 32],
        max: usize,
    ) -> bool {
        let Ok(Some(doc)) = self.docs.open(NamespaceId::from(id)).await else {
            return false;
        };
        let Ok(stream) = doc.get_many(Query::all()).await else {
            return false;
        };
        let mut stream = Box::pin(stream.take(max));
        while let Some(entry) = stream.next().await {
            if entry.is_ok_and(|e| e.content_hash().as_bytes() == hash) {
                return true;
            }
        }
        false
    }

    /// The state of namespace `id` as a federation manifest pins it: every record (latest
    /// entry per author and key, deletion markers included) of the local replica.
    pub(super) async fn state_digest(
        &self,
        id: &[u8; 32],
    ) -> Result<aspen_sync::ContentDigest, RpcError> {
        let (doc, _) = self.ns_open(id).await?;
        let mut stream = Box::pin(
            doc.get_many(Query::all().include_empty())
                .await
                .map_err(store_error)?,
        );
        let mut entries = Vec::new();
        while let Some(entry) = stream.next().await {
            if entries.len() == MAX_FED_NS_RECORDS {
                return Err(RpcError::BadRequest(format!(
                    "namespace {} has more than {MAX_FED_NS_RECORDS} records, more than a \
                     manifest may cover",
                    hex::encode(id)
                )));
            }
            let entry = entry.map_err(store_error)?;
            entries.push(aspen_sync::NsEntryState {
                author: *entry.author().as_bytes(),
                key: entry.key().to_vec(),
                hash: *entry.content_hash().as_bytes(),
                len: entry.content_len(),
                timestamp: entry.timestamp(),
            });
        }
        let state = aspen_sync::NamespaceState::new(entries).map_err(store_error)?;
        Ok(state.digest(*id))
    }

    /// Hosts a namespace this cluster follows: registers a read capability for it (unless the
    /// cluster already hosts it) and opens the local replica for syncing. The record names
    /// only this member: the other members sync it from the members, and only the node that
    /// proved this cluster to the origin syncs with the origin.
    pub(super) async fn host_followed(&self, id: &[u8; 32]) -> Result<Doc, RpcError> {
        self.cluster.read_barrier().await?;
        let key = registry_key(id);
        let known = self
            .cluster
            .sm
            .system_view({
                let key = key.clone();
                move |v| v.get(&key)
            })
            .await?;
        if known.is_none() {
            if self.ns_registry().await?.len() >= MAX_NAMESPACES {
                return Err(NamespaceError::TooMany {
                    max: MAX_NAMESPACES,
                }
                .into());
            }
            // A ticket names at least one peer: this member (the others sync from it).
            let me = super::blobs::endpoint_addr(&self.cluster.me)
                .ok_or_else(|| NamespaceError::Store("this node has no address to name".into()))?;
            let ticket = DocTicket::new(Capability::Read(NamespaceId::from(id)), vec![me]);
            let record = NamespaceRecord {
                ticket: ticket.to_string(),
                created_at_ms: super::identity::unix_now() * 1000,
            };
            // Only where nothing is registered: an import of a write ticket meanwhile wins.
            self.cluster
                .propose_system_txn(SystemTxn {
                    require: vec![(key, None)],
                    writes: vec![SystemOp::Put {
                        key: registry_key(id),
                        value: record.encode(),
                    }],
                })
                .await?;
            self.wake_sync();
            tracing::info!(namespace = %hex::encode(id), "hosting a followed namespace");
        }
        let (doc, _) = self.ns_open(id).await?;
        // Open for syncing (a one-off sync needs that), with the other members as peers.
        doc.start_sync(self.member_addrs())
            .await
            .map_err(store_error)?;
        Ok(doc)
    }

    /// Content hashes of the latest entries of `doc` that the local blob store lacks.
    pub(super) async fn missing_content(
        &self,
        doc: &Doc,
    ) -> Result<BTreeSet<iroh_blobs::Hash>, RpcError> {
        let mut stream = Box::pin(
            doc.get_many(Query::single_latest_per_key())
                .await
                .map_err(store_error)?,
        );
        let mut missing = BTreeSet::new();
        while let Some(entry) = stream.next().await {
            let entry = entry.map_err(store_error)?;
            if entry.content_len() == 0 {
                continue;
            }
            let status = self
                .blobs
                .store
                .blobs()
                .status(entry.content_hash())
                .await
                .map_err(store_error)?;
            if !matches!(status, iroh_blobs::api::proto::BlobStatus::Complete { .. }) {
                missing.insert(entry.content_hash());
            }
        }
        Ok(missing)
    }

    /// Fetches one entry's content from the first of `peers` that supplies it.
    async fn repair_one(
        &self,
        namespace: &[u8; 32],
        hash: &iroh_blobs::Hash,
        peers: &[EndpointAddr],
    ) -> Result<(), RpcError> {
        let blob = *hash.as_bytes();
        for peer in peers {
            match tokio::time::timeout(
                REPAIR_FETCH_TIMEOUT,
                self.blobs.fetch_blob_from(&blob, peer.clone()),
            )
            .await
            {
                Ok(Ok(Ok(size))) => {
                    tracing::info!(namespace = %hex::encode(namespace), %hash, size, from = %peer.id.fmt_short(), "missing entry content fetched");
                    return Ok(());
                }
                Ok(Ok(Err(reason))) => {
                    tracing::debug!(%hash, from = %peer.id.fmt_short(), "entry content not fetched: {reason}")
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    tracing::debug!(%hash, from = %peer.id.fmt_short(), "entry content fetch timed out")
                }
            }
        }
        Ok(())
    }
}

impl NamespaceService {
    /// The local replica of a namespace, imported from `capability` if this node has none.
    async fn local_replica(&self, capability: &Capability) -> Result<Doc, RpcError> {
        // `open` fails ("Replica not found") for a namespace the node never imported.
        if let Ok(Some(doc)) = self.docs.open(capability.id()).await {
            return Ok(doc);
        }
        self.docs
            .import_namespace(capability.clone())
            .await
            .map_err(store_error)
    }

    fn wake_sync(&self) {
        // Forget what was started so the next pass (re)starts every namespace's sync.
        self.syncing.lock().expect("lock").clear();
    }
}

/// The namespace sync loop of one node (runs for the node's lifetime).
pub async fn run_sync(state: Arc<NamespaceService>) {
    // A namespace registered (created or imported through any member) starts syncing here
    // as soon as the registry entry applies on this node.
    let mut registry = state.cluster.sm.watch_system_prefix(REGISTRY_PREFIX);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SYNC_INTERVAL) => {}
            Ok(()) = registry.changed() => {}
        }
        if !state.cluster.is_member() {
            continue;
        }
        if let Err(e) = state.sync_namespaces_once().await {
            tracing::debug!("namespace sync pass failed: {e}");
        }
    }
}

/// The content repair loop of one node (runs for the node's lifetime).
pub async fn run_content_repair(state: Arc<NamespaceService>) {
    let mut missing_before = HashMap::new();
    loop {
        tokio::time::sleep(REPAIR_INTERVAL).await;
        if !state.cluster.is_member() {
            continue;
        }
        if let Err(e) = state.repair_content_once(&mut missing_before).await {
            tracing::debug!("namespace content repair pass failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn golden_bytes() {
        let record = NamespaceRecord {
            ticket: "doc".into(),
            created_at_ms: 2,
        };
        assert_eq!(record.encode(), [1, 3, b'd', b'o', b'c', 2]);
        assert_eq!(NamespaceRecord::decode(&record.encode()).unwrap(), record);
        assert_eq!(registry_key(&[1; 32])[..3], *b"ns/");
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = NamespaceRecord::decode(&bytes);
        }
    }
}
