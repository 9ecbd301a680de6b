//! The blob service: each node's iroh-blobs store, uploads, tags, replication and garbage
//! collection.
//!
//! What the cluster agrees on (tags, which members hold which blob) is decided by
//! `aspen_blobs` and goes through Raft as system transactions. This module moves bytes:
//!
//! - an upload (`BlobAdd`) streams into the local store under a temporary tag, and the
//!   replica record (plus the tag, if any) is committed before the temporary tag is dropped;
//! - the replication loop compares what the index says with the local store: members chosen
//!   by [`aspen_blobs::placement`] fetch referenced blobs from holders with iroh-blobs'
//!   verified streaming (every chunk checked against the BLAKE3 hash; a holder that sends
//!   anything else is abandoned and the next one tried), then record themselves as holders;
//! - garbage collection is iroh-blobs' own mark-and-sweep, with every referenced blob
//!   protected, and every unreferenced one protected until it has been seen unreferenced for
//!   the grace period. Content referenced by iroh-docs replicas is protected by iroh-docs'
//!   own callback, chained in.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use aspen_blobs::layout::{
    delete_replica, put_replica, put_tag, replica_prefix, tag_key, TagRecord, TAG_PREFIX,
};
use aspen_blobs::limits::{MAX_BLOB_BYTES, MAX_LIST_LIMIT};
use aspen_blobs::placement::{fetchers, sources};
use aspen_blobs::{hash_hex, read_index, BlobError, BlobHash, BlobIndex, ReplicaRecord, TagName};
use aspen_client::protocol::{
    BlobInfo, BlobRequest, BlobResponse, BlobStoreStats, BlobTagSummary, Consistency, RpcError,
};
use aspen_kv::api::{SystemOp, SystemTxn};
use aspen_kv::{Member, NodeId};
use futures::{SinkExt, StreamExt};
use iroh::endpoint::{Connection, RecvStream};
use iroh::{Endpoint, EndpointAddr, EndpointId};
use iroh_blobs::api::proto::BlobStatus;
use iroh_blobs::api::remote::GetProgressItem;
use iroh_blobs::store::fs::FsStore;
use iroh_blobs::store::{GcConfig, ProtectCb, ProtectOutcome};
use iroh_blobs::Hash;

use super::auth::{Access, Need};
use super::ClusterHandle;
use crate::config::BlobSettings;
use aspen_trust::{Action, Kind};

/// How often the replication loop compares the index with the local store.
const REPLICATION_INTERVAL: Duration = Duration::from_millis(500);
/// Longest wait for a connection to a holder.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A fetch whose peer sends nothing for this long is abandoned (what it verified so far is
/// kept, and the next attempt asks only for the rest).
const FETCH_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// First and longest pause before fetching a blob again after every holder failed.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// After a blob has been under-replicated this long (its chosen fetcher may be down), one
/// more member joins the fetchers, and one more after each further period.
const WIDEN_AFTER: Duration = Duration::from_secs(30);
/// Most bytes read from an upload stream at once.
const UPLOAD_CHUNK: usize = 1 << 20;

/// Counters reported by `aspen blob stats`.
#[derive(Default)]
struct Counters {
    fetched: AtomicU64,
    fetched_bytes: AtomicU64,
    fetch_failures: AtomicU64,
    verify_failures: AtomicU64,
    gc_deleted: AtomicU64,
}

/// When this node first saw each unreferenced blob in its store (or started writing it).
/// A blob is deleted only once it has been unreferenced for the whole grace period.
struct GcTracker {
    grace: Duration,
    first_seen: Mutex<HashMap<Hash, Instant>>,
}

impl GcTracker {
    /// Protects `hash` for a grace period from now (an upload or fetch is about to write it).
    fn touch(&self, hash: Hash) {
        self.first_seen
            .lock()
            .expect("lock")
            .insert(hash, Instant::now());
    }

    /// The blobs the next sweep must keep: referenced ones, and unreferenced ones still
    /// within their grace period.
    fn protect(
        &self,
        referenced: &HashSet<Hash>,
        stored: &[Hash],
        counters: &Counters,
    ) -> HashSet<Hash> {
        let now = Instant::now();
        let mut first_seen = self.first_seen.lock().expect("lock");
        let mut live = referenced.clone();
        let mut doomed = 0;
        for hash in stored {
            if referenced.contains(hash) {
                first_seen.remove(hash);
                continue;
            }
            let since = *first_seen.entry(*hash).or_insert(now);
            if now.duration_since(since) < self.grace {
                live.insert(*hash);
            } else {
                doomed += 1;
            }
        }
        // Forget blobs that are gone, but keep fresh entries for blobs still being written.
        let stored: HashSet<&Hash> = stored.iter().collect();
        first_seen.retain(|h, t| stored.contains(h) || now.duration_since(*t) < self.grace);
        counters.gc_deleted.fetch_add(doomed, Ordering::Relaxed);
        live
    }
}

/// A node's blobs: its store and what it does with it.
pub struct BlobService {
    cluster: ClusterHandle,
    pub store: FsStore,
    endpoint: Endpoint,
    replicas: usize,
    gc: Arc<GcTracker>,
    counters: Arc<Counters>,
    /// Wakes the replication loop (after an upload or a tag on this node).
    wake: tokio::sync::Notify,
    /// Per blob: when to try fetching again, and how long the last pause was.
    retry: Mutex<HashMap<BlobHash, (Instant, Duration)>>,
    /// Per blob: since when this node has seen it under-replicated.
    under_replicated: Mutex<HashMap<BlobHash, Instant>>,
}

impl BlobService {
    /// Opens (or creates) the store in `dir`, with garbage collection protecting what the
    /// replicated index references.
    pub async fn open(
        dir: &std::path::Path,
        cluster: ClusterHandle,
        endpoint: Endpoint,
        settings: &BlobSettings,
        also_protect: Option<ProtectCb>,
    ) -> Result<BlobService, String> {
        let sm = cluster.sm.clone();
        let gc = Arc::new(GcTracker {
            grace: Duration::from_secs(settings.gc_grace_secs),
            first_seen: Mutex::new(HashMap::new()),
        });
        let counters = Arc::new(Counters::default());
        let store_cell: Arc<OnceLock<iroh_blobs::api::Store>> = Arc::new(OnceLock::new());
        let protect: ProtectCb = {
            let gc = gc.clone();
            let counters = counters.clone();
            let store_cell = store_cell.clone();
            Arc::new(move |live: &mut HashSet<Hash>| {
                let also = also_protect.clone();
                let gc = gc.clone();
                let counters = counters.clone();
                let sm = sm.clone();
                let store = store_cell.get().cloned();
                // The work runs in a task: the callback's future must be Sync.
                let task = tokio::spawn(async move {
                    let store = store.ok_or("store not open yet")?;
                    let index = sm
                        .system_view(read_index)
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                    let referenced: HashSet<Hash> =
                        index.referenced().keys().map(|h| Hash::from(*h)).collect();
                    let stored = store
                        .blobs()
                        .list()
                        .hashes()
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>(gc.protect(&referenced, &stored, &counters))
                });
                Box::pin(async move {
                    // Content of the iroh-docs replicas is protected by iroh-docs itself.
                    if let Some(also) = also {
                        if let ProtectOutcome::Abort = also(live).await {
                            return ProtectOutcome::Abort;
                        }
                    }
                    match task.await {
                        Ok(Ok(keep)) => {
                            live.extend(keep);
                            ProtectOutcome::Continue
                        }
                        Ok(Err(e)) => {
                            tracing::warn!("blob gc skipped: {e}");
                            ProtectOutcome::Abort
                        }
                        Err(e) => {
                            tracing::warn!("blob gc skipped: {e}");
                            ProtectOutcome::Abort
                        }
                    }
                })
            })
        };
        let mut options = iroh_blobs::store::fs::options::Options::new(dir);
        options.gc = Some(GcConfig {
            interval: Duration::from_secs(settings.gc_interval_secs),
            add_protected: Some(protect),
        });
        let store = FsStore::load_with_opts(dir.join("blobs.db"), options)
            .await
            .map_err(|e| format!("cannot open the blob store in {}: {e}", dir.display()))?;
        let _ = store_cell.set((*store).clone());
        Ok(BlobService {
            cluster,
            store,
            endpoint,
            replicas: settings.replicas,
            gc,
            counters,
            wake: tokio::sync::Notify::new(),
            retry: Mutex::new(HashMap::new()),
            under_replicated: Mutex::new(HashMap::new()),
        })
    }

    /// The size of `hash` if the local store has every chunk of it.
    pub(super) async fn complete_size(&self, hash: &BlobHash) -> Result<Option<u64>, BlobError> {
        match self.store.blobs().status(Hash::from(*hash)).await {
            Ok(BlobStatus::Complete { size }) => Ok(Some(size)),
            Ok(_) => Ok(None),
            Err(e) => Err(BlobError::Store(e.to_string())),
        }
    }
}

fn store_error(e: impl std::fmt::Display) -> RpcError {
    BlobError::Store(e.to_string()).into()
}

pub(super) fn endpoint_addr(member: &Member) -> Option<EndpointAddr> {
    let id = EndpointId::from_bytes(&member.endpoint_id).ok()?;
    let mut addr = EndpointAddr::new(id);
    for a in &member.addrs {
        addr = addr.with_ip_addr(*a);
    }
    Some(addr)
}

/// Whether a failed fetch failed because the holder sent data that does not match the hash.
fn is_verification_failure(e: &iroh_blobs::get::GetError) -> bool {
    use iroh_blobs::get::fsm::DecodeError;
    match e {
        iroh_blobs::get::GetError::Decode { source, .. } => matches!(
            source,
            DecodeError::LeafHashMismatch { .. } | DecodeError::ParentHashMismatch { .. }
        ),
        _ => false,
    }
}

impl BlobService {
    /// Serves one blob request (access already checked; listings are filtered by the
    /// caller). An upload's bytes follow its request on `recv`.
    pub async fn handle(
        &self,
        request: BlobRequest,
        recv: iroh::endpoint::RecvStream,
    ) -> Result<BlobResponse, RpcError> {
        match request {
            BlobRequest::Add { size, tag } => self.add(size, tag, recv).await,
            BlobRequest::Stat { hash, consistency } => self.stat(hash, consistency).await,
            BlobRequest::List {
                start_after,
                limit,
                consistency,
            } => self.list(start_after, limit, consistency).await,
            BlobRequest::Tag { tag, hash } => self.tag(tag, hash).await,
            BlobRequest::Untag { tag } => self.untag(tag).await,
            BlobRequest::Stats => self.stats().await,
        }
    }

    /// Checks `BlobHash` needs: the caller may read some tag that names each hash.
    pub async fn check_readable(
        &self,
        access: &Access<'_>,
        hashes: &[[u8; 32]],
    ) -> Result<(), RpcError> {
        if hashes.is_empty() {
            return Ok(());
        }
        let index = self.blob_index().await?;
        for hash in hashes {
            let readable = index
                .tags_of(hash)
                .iter()
                .any(|t| access.may(Kind::Blob, Action::Read, t.as_str().as_bytes()));
            if !readable {
                return Err(access.denied(&Need::BlobHash(*hash)));
            }
        }
        Ok(())
    }

    pub(super) async fn blob_index(&self) -> Result<BlobIndex, RpcError> {
        Ok(self.cluster.sm.system_view(read_index).await??)
    }

    /// `BlobAdd`: stores the bytes that follow on `recv`, then records this node as a holder
    /// (and sets the tag) through Raft.
    async fn add(
        &self,
        size: u64,
        tag: Option<String>,
        recv: RecvStream,
    ) -> Result<BlobResponse, RpcError> {
        let tag = tag.map(TagName::new).transpose()?;
        if size > MAX_BLOB_BYTES {
            return Err(BlobError::TooLarge {
                size,
                max: MAX_BLOB_BYTES,
            }
            .into());
        }
        if !self.cluster.is_member() {
            return Err(RpcError::NotInitialized);
        }
        let blobs = self;
        let (tx, rx) = futures::channel::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
        let mut reader = tokio::spawn(read_upload(recv, size, tx));
        let import = blobs.store.blobs().add_stream(rx).await.temp_tag();
        tokio::pin!(import);
        // A failed upload ends the stream early; its error wins over whatever was imported
        // (dropping the import, or its temporary tag, leaves nothing referenced).
        let (added, read) = tokio::select! {
            added = &mut import => (Some(added), (&mut reader).await),
            read = &mut reader => (None, read),
        };
        read.map_err(|e| RpcError::Internal(format!("upload task failed: {e}")))??;
        let added = match added {
            Some(added) => added,
            None => import.await,
        };
        let temp = added.map_err(store_error)?;
        let hash = temp.hash();
        blobs.gc.touch(hash);
        let hash: BlobHash = *hash.as_bytes();
        let stored = blobs.complete_size(&hash).await?;
        if stored != Some(size) {
            return Err(BlobError::Store(format!(
                "stored {stored:?} bytes of an upload of {size}"
            ))
            .into());
        }
        self.cluster.metrics.blob_bytes_in.inc_by(size);
        // Committed in the store before the cluster is told this node holds it.
        self.persist().await?;
        let previous = match &tag {
            Some(tag) => self.tag_target(tag).await?,
            None => None,
        };
        let now_ms = super::identity::unix_now() * 1000;
        let mut writes = vec![put_replica(
            &hash,
            self.cluster.id,
            &ReplicaRecord {
                size,
                since_ms: now_ms,
            },
        )];
        if let Some(tag) = &tag {
            writes.push(put_tag(
                tag,
                &TagRecord {
                    hash,
                    size,
                    created_at_ms: now_ms,
                },
            ));
        }
        self.cluster
            .propose_system_txn(SystemTxn {
                require: vec![],
                writes,
            })
            .await?;
        drop(temp);
        blobs.wake.notify_one();
        tracing::info!(hash = %hash_hex(&hash), size, "blob added");
        Ok(BlobResponse::Added {
            hash,
            size,
            previous,
        })
    }

    /// Waits until everything the store has done so far is committed to its database.
    /// iroh-blobs batches its metadata writes; a blob imported or fetched just before a crash
    /// would otherwise be gone after it, while the cluster records this node as holding it.
    pub(super) async fn persist(&self) -> Result<(), RpcError> {
        self.store.sync_db().await.map_err(store_error)
    }

    /// The hash `tag` names in this node's state, if any.
    pub(super) async fn tag_target(&self, tag: &TagName) -> Result<Option<BlobHash>, RpcError> {
        let key = tag_key(tag);
        let value = self.cluster.sm.system_view(move |v| v.get(&key)).await?;
        value
            .map(|v| TagRecord::decode(&v).map(|r| r.hash))
            .transpose()
            .map_err(RpcError::from)
    }

    async fn stat(
        &self,
        hash: BlobHash,
        consistency: Consistency,
    ) -> Result<BlobResponse, RpcError> {
        if consistency == Consistency::Linearizable {
            self.cluster.read_barrier().await?;
        }
        let index = self.blob_index().await?;
        let local = self.complete_size(&hash).await?;
        Ok(BlobResponse::Info(BlobInfo {
            hash,
            size: index.size_of(&hash).or(local),
            tags: index
                .tags_of(&hash)
                .into_iter()
                .map(|t| t.to_string())
                .collect(),
            holders: index.holders(&hash).into_iter().collect(),
            local: local.is_some(),
        }))
    }

    async fn list(
        &self,
        start_after: Option<String>,
        limit: u32,
        consistency: Consistency,
    ) -> Result<BlobResponse, RpcError> {
        let limit = (limit as usize).clamp(1, MAX_LIST_LIMIT);
        if consistency == Consistency::Linearizable {
            self.cluster.read_barrier().await?;
        }
        let (tags, more) = self
            .cluster
            .sm
            .system_view(move |view| {
                let from = match &start_after {
                    Some(after) => {
                        let mut k = [TAG_PREFIX, after.as_bytes()].concat();
                        k.push(0);
                        k
                    }
                    None => TAG_PREFIX.to_vec(),
                };
                let mut found = Vec::new();
                let mut more = false;
                let mut bad = None;
                view.scan_from(TAG_PREFIX, &from, |key, value| {
                    if found.len() == limit {
                        more = true;
                        return false;
                    }
                    let tag = String::from_utf8_lossy(&key[TAG_PREFIX.len()..]).into_owned();
                    match TagRecord::decode(value) {
                        Ok(record) => found.push((tag, record)),
                        Err(e) => {
                            bad = Some(e);
                            return false;
                        }
                    }
                    true
                })?;
                let mut tags = Vec::with_capacity(found.len());
                for (tag, record) in found {
                    let mut replicas = 0u32;
                    view.scan(&replica_prefix(&record.hash), |_, _| {
                        replicas += 1;
                        true
                    })?;
                    tags.push(BlobTagSummary {
                        tag,
                        hash: record.hash,
                        size: record.size,
                        created_at_ms: record.created_at_ms,
                        replicas,
                    });
                }
                Ok(match bad {
                    Some(e) => Err(e),
                    None => Ok((tags, more)),
                })
            })
            .await??;
        Ok(BlobResponse::List { tags, more })
    }

    /// `BlobTag`: makes sure this node holds the blob (fetching it if need be), then points
    /// the tag at it.
    async fn tag(&self, tag: String, hash: BlobHash) -> Result<BlobResponse, RpcError> {
        let tag = TagName::new(tag)?;
        self.cluster.read_barrier().await?;
        let blobs = self;
        blobs.gc.touch(Hash::from(hash));
        let size = match blobs.complete_size(&hash).await? {
            Some(size) => size,
            None => {
                let index = self.blob_index().await?;
                let holders = index.holders(&hash);
                if holders.is_empty() {
                    return Err(BlobError::NotFound(hash_hex(&hash)).into());
                }
                self.fetch_blob(&hash, &holders).await?
            }
        };
        let previous = self.tag_target(&tag).await?;
        self.record_tag(&tag, hash, size).await?;
        Ok(BlobResponse::Tagged { previous })
    }

    /// Points `tag` at `hash`, which this node holds completely (`size` bytes), and records
    /// this node as a holder, through Raft.
    pub(super) async fn record_tag(
        &self,
        tag: &TagName,
        hash: BlobHash,
        size: u64,
    ) -> Result<(), RpcError> {
        let now_ms = super::identity::unix_now() * 1000;
        self.cluster
            .propose_system_txn(SystemTxn {
                require: vec![],
                writes: vec![
                    put_replica(
                        &hash,
                        self.cluster.id,
                        &ReplicaRecord {
                            size,
                            since_ms: now_ms,
                        },
                    ),
                    put_tag(
                        tag,
                        &TagRecord {
                            hash,
                            size,
                            created_at_ms: now_ms,
                        },
                    ),
                ],
            })
            .await?;
        self.wake.notify_one();
        Ok(())
    }

    async fn untag(&self, tag: String) -> Result<BlobResponse, RpcError> {
        let tag = TagName::new(tag)?;
        self.cluster.read_barrier().await?;
        if self.tag_target(&tag).await?.is_none() {
            return Err(BlobError::TagNotFound(tag.to_string()).into());
        }
        self.cluster
            .propose_system_txn(SystemTxn {
                require: vec![],
                writes: vec![SystemOp::Delete { key: tag_key(&tag) }],
            })
            .await?;
        Ok(BlobResponse::Done)
    }

    async fn stats(&self) -> Result<BlobResponse, RpcError> {
        let blobs = self;
        let hashes = blobs
            .store
            .blobs()
            .list()
            .hashes()
            .await
            .map_err(store_error)?;
        let mut stats = BlobStoreStats {
            node_id: self.cluster.id,
            replicas_target: blobs.replicas as u32,
            ..Default::default()
        };
        for hash in hashes {
            if let Some(size) = blobs.complete_size(hash.as_bytes()).await? {
                stats.blobs += 1;
                stats.bytes += size;
            }
        }
        let c = &blobs.counters;
        stats.fetched = c.fetched.load(Ordering::Relaxed);
        stats.fetched_bytes = c.fetched_bytes.load(Ordering::Relaxed);
        stats.fetch_failures = c.fetch_failures.load(Ordering::Relaxed);
        stats.verify_failures = c.verify_failures.load(Ordering::Relaxed);
        stats.gc_deleted = c.gc_deleted.load(Ordering::Relaxed);
        Ok(BlobResponse::Stats(stats))
    }

    /// Fetches `hash` from one of `holders` (verified streaming), trying them in turn.
    /// Returns its size once the local store has all of it.
    async fn fetch_blob(
        &self,
        hash: &BlobHash,
        holders: &BTreeSet<NodeId>,
    ) -> Result<u64, RpcError> {
        let members = self.cluster.members();
        let mut failures = Vec::new();
        for source in sources(hash, holders, self.cluster.id) {
            let Some(addr) = members.get(&source).and_then(endpoint_addr) else {
                continue;
            };
            match self.fetch_blob_from(hash, addr).await? {
                Ok(size) => {
                    tracing::info!(hash = %hash_hex(hash), from = format!("{source:016x}"), size, "blob fetched");
                    return Ok(size);
                }
                Err(reason) => failures.push(format!("{source:016x}: {reason}")),
            }
        }
        Err(BlobError::Unavailable {
            hash: hash_hex(hash),
            reason: if failures.is_empty() {
                "no reachable holder".into()
            } else {
                failures.join("; ")
            },
        }
        .into())
    }

    /// One verified-streaming fetch of `hash` from the endpoint at `addr` (a member, or a
    /// peer outside the cluster). The outer error is a local store failure; the inner one says
    /// why this peer could not supply the blob.
    pub(super) async fn fetch_blob_from(
        &self,
        hash: &BlobHash,
        addr: EndpointAddr,
    ) -> Result<Result<u64, String>, RpcError> {
        let blobs = self;
        let peer = addr.id;
        blobs.gc.touch(Hash::from(*hash));
        let conn: Connection = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            blobs.endpoint.connect(addr, iroh_blobs::ALPN),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                blobs
                    .counters
                    .fetch_failures
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(Err(format!("connect: {e}")));
            }
            Err(_) => {
                blobs
                    .counters
                    .fetch_failures
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(Err("connect timed out".into()));
            }
        };
        // Streamed so the bytes count as they arrive (a transfer cut short still shows what
        // it cost) and a peer that stops sending is given up on instead of waited for.
        let progress = blobs
            .store
            .remote()
            .fetch(conn.clone(), Hash::from(*hash))
            .stream();
        tokio::pin!(progress);
        let mut counted = 0u64;
        let result = loop {
            match tokio::time::timeout(FETCH_STALL_TIMEOUT, progress.next()).await {
                Err(_) => {
                    break Err(format!(
                        "sent nothing for {FETCH_STALL_TIMEOUT:?} (stalled)"
                    ))
                }
                Ok(None) => break Err("the transfer ended without a result".to_string()),
                Ok(Some(GetProgressItem::Progress(read))) => {
                    let more = read.saturating_sub(counted);
                    blobs
                        .counters
                        .fetched_bytes
                        .fetch_add(more, Ordering::Relaxed);
                    blobs.cluster.metrics.blob_bytes_in.inc_by(more);
                    counted = counted.max(read);
                }
                Ok(Some(GetProgressItem::Done(stats))) => {
                    let more = stats.payload_bytes_read.saturating_sub(counted);
                    blobs
                        .counters
                        .fetched_bytes
                        .fetch_add(more, Ordering::Relaxed);
                    blobs.cluster.metrics.blob_bytes_in.inc_by(more);
                    break Ok(());
                }
                Ok(Some(GetProgressItem::Error(e))) if is_verification_failure(&e) => {
                    blobs
                        .counters
                        .verify_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        hash = %hash_hex(hash),
                        from = %peer.fmt_short(),
                        "peer sent data that does not match the blob's hash: {e}; trying another"
                    );
                    conn.close(0u32.into(), b"corrupt");
                    return Ok(Err(format!("sent corrupt data ({e})")));
                }
                Ok(Some(GetProgressItem::Error(e))) => break Err(e.to_string()),
            }
        };
        conn.close(0u32.into(), b"done");
        match result {
            Ok(()) => {
                if let Some(size) = blobs.complete_size(hash).await? {
                    blobs.counters.fetched.fetch_add(1, Ordering::Relaxed);
                    // Callers record the copy through Raft next: it must survive a crash.
                    blobs.persist().await?;
                    return Ok(Ok(size));
                }
                blobs
                    .counters
                    .fetch_failures
                    .fetch_add(1, Ordering::Relaxed);
                Ok(Err("incomplete after the transfer".into()))
            }
            Err(why) => {
                blobs
                    .counters
                    .fetch_failures
                    .fetch_add(1, Ordering::Relaxed);
                Ok(Err(why))
            }
        }
    }

    /// One pass of the replication loop: fetch what this node should hold, and keep its own
    /// replica records true.
    async fn replicate_once(&self) -> Result<(), RpcError> {
        let blobs = self;
        let index = self.blob_index().await?;
        let members: BTreeSet<NodeId> = self.cluster.members().keys().copied().collect();
        if !members.contains(&self.cluster.id) {
            return Ok(());
        }
        let referenced = index.referenced();
        let now_ms = super::identity::unix_now() * 1000;
        let mut records = Vec::new();
        for hash in referenced.keys() {
            let holders = index.holders(hash);
            let local = blobs.complete_size(hash).await?;
            match (local, holders.contains(&self.cluster.id)) {
                (Some(size), false) => records.push(put_replica(
                    hash,
                    self.cluster.id,
                    &ReplicaRecord {
                        size,
                        since_ms: now_ms,
                    },
                )),
                (None, true) => records.push(delete_replica(hash, self.cluster.id)),
                (Some(_), true) => {}
                (None, false) => {
                    let current: BTreeSet<NodeId> =
                        holders.intersection(&members).copied().collect();
                    if current.len() >= blobs.replicas.min(members.len()) {
                        blobs.under_replicated.lock().expect("lock").remove(hash);
                        continue;
                    }
                    let since = *blobs
                        .under_replicated
                        .lock()
                        .expect("lock")
                        .entry(*hash)
                        .or_insert_with(Instant::now);
                    let extra = (since.elapsed().as_secs() / WIDEN_AFTER.as_secs()) as usize;
                    if !fetchers(hash, &members, &holders, blobs.replicas, extra)
                        .contains(&self.cluster.id)
                    {
                        continue;
                    }
                    if let Some((at, _)) = blobs.retry.lock().expect("lock").get(hash) {
                        if Instant::now() < *at {
                            continue;
                        }
                    }
                    match self.fetch_blob(hash, &current).await {
                        Ok(size) => {
                            blobs.retry.lock().expect("lock").remove(hash);
                            self.cluster
                                .propose_system_txn(SystemTxn {
                                    require: vec![],
                                    writes: vec![put_replica(
                                        hash,
                                        self.cluster.id,
                                        &ReplicaRecord {
                                            size,
                                            since_ms: now_ms,
                                        },
                                    )],
                                })
                                .await?;
                        }
                        Err(e) => {
                            let mut retry = blobs.retry.lock().expect("lock");
                            let pause = retry
                                .get(hash)
                                .map_or(RETRY_FIRST, |(_, p)| (*p * 2).min(RETRY_MAX));
                            retry.insert(*hash, (Instant::now() + pause, pause));
                            tracing::info!("blob fetch failed, next try in {pause:?}: {e}");
                        }
                    }
                }
            }
        }
        // Records of blobs nothing references any more, once garbage collection took them.
        for (hash, nodes) in &index.replicas {
            if nodes.contains_key(&self.cluster.id)
                && !referenced.contains_key(hash)
                && blobs.complete_size(hash).await?.is_none()
            {
                records.push(delete_replica(hash, self.cluster.id));
            }
        }
        if !records.is_empty() {
            self.cluster
                .propose_system_txn(SystemTxn {
                    require: vec![],
                    writes: records,
                })
                .await?;
        }
        Ok(())
    }
}

/// Reads exactly `size` bytes of an upload into `tx`. On error it stops, which ends the
/// stream (iroh-blobs' `add_stream` does not stop on an error item).
async fn read_upload(
    mut recv: RecvStream,
    size: u64,
    mut tx: futures::channel::mpsc::Sender<std::io::Result<bytes::Bytes>>,
) -> Result<(), BlobError> {
    // QUIC hands out about one packet per chunk; the store writes (and reports progress
    // for) every item it gets, so items are coalesced to UPLOAD_CHUNK bytes (256 MiB adds:
    // ~100 MiB/s before, ~160 after; BENCHMARKS.md).
    let mut got = 0u64;
    let mut pending = bytes::BytesMut::with_capacity(UPLOAD_CHUNK);
    loop {
        match recv.read_chunk(UPLOAD_CHUNK).await {
            Ok(Some(chunk)) => {
                got += chunk.len() as u64;
                if got > size {
                    return Err(BlobError::TooLong { expected: size });
                }
                pending.extend_from_slice(&chunk);
                if pending.len() >= UPLOAD_CHUNK {
                    let item = pending.split().freeze();
                    pending.reserve(UPLOAD_CHUNK);
                    if tx.send(Ok(item)).await.is_err() {
                        return Err(BlobError::Store("the store stopped the import".into()));
                    }
                }
            }
            Ok(None) if got == size => {
                if !pending.is_empty() && tx.send(Ok(pending.freeze())).await.is_err() {
                    return Err(BlobError::Store("the store stopped the import".into()));
                }
                return Ok(());
            }
            Ok(None) => {
                return Err(BlobError::Truncated {
                    expected: size,
                    got,
                })
            }
            Err(e) => {
                tracing::debug!("upload stream broke after {got} bytes: {e}");
                return Err(BlobError::Truncated {
                    expected: size,
                    got,
                });
            }
        }
    }
}

/// The replication loop of one node (runs for the node's lifetime).
pub async fn run_replication(state: Arc<BlobService>) {
    // Tags and replica records applied on this node (from whichever member) start a pass at
    // once; the interval retries what failed.
    let mut changes = state
        .cluster
        .sm
        .watch_system_prefix(aspen_blobs::layout::BLOB_PREFIX);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REPLICATION_INTERVAL) => {}
            _ = state.wake.notified() => {}
            Ok(()) = changes.changed() => {}
        }
        if !state.cluster.is_member() {
            continue;
        }
        if let Err(e) = state.replicate_once().await {
            tracing::debug!("blob replication pass failed: {e}");
        }
    }
}
