//! Push triggers: new manifests announced over iroh-gossip, so a change reaches followers in
//! about the time of one pull instead of at their next poll (which stays as the fallback).
//!
//! - The origin's leader checks its exported documents and blob prefixes every
//!   [`CHANGE_CHECK`]; when one changed, it signs the next manifest (as a request for it
//!   would) and broadcasts it on the resource's topic
//!   ([`aspen_federation::announce::gossip_topic`]). It joins each topic with no bootstrap:
//!   followers join through it.
//! - A follower's leader joins the topic of each followed document or blob prefix through
//!   the origin node its pulls last reached. Each message must be the origin's manifest of
//!   that resource, newer than the one accepted ([`check_announcement`]); only then does the
//!   per-origin rate limit count it, and the follow is pulled at once. The pull verifies
//!   everything as any pull does. Joining (or rejoining) a topic also pulls once, for what
//!   was announced while the follower was not listening.
//!
//! Namespaces are left out: their entries already travel live over iroh-docs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aspen_federation::announce::{check_announcement, gossip_topic, AnnouncementLimiter};
use aspen_federation::{resource_of_key, EXPORT_PREFIX, MAX_EXPORTS};
use aspen_sync::{Resource, ResourceKind};
use aspen_trust::ClusterKey;
use futures::StreamExt;
use iroh::EndpointId;
use iroh_gossip::api::{Event, GossipSender};
use iroh_gossip::net::Gossip;
use iroh_gossip::proto::TopicId;
use tokio::task::JoinHandle;

use super::follower::{accepted_manifest, list_follows, FollowId, Pulls};
use crate::config::TestFault;
use crate::server::NodeState;

/// How often the origin's leader looks for changed exports.
pub const CHANGE_CHECK: Duration = Duration::from_millis(200);
/// How often a follower's leader re-reads its follows (and joins new topics).
const FOLLOW_CHECK: Duration = Duration::from_secs(1);
/// A topic joined this long ago with no neighbor is joined again: the origin may have
/// joined it only after us (a new export), or restarted.
pub const REJOIN_AFTER: Duration = Duration::from_secs(5);

/// One topic the origin announces on.
struct Announcing {
    sender: GossipSender,
    /// The hash of the manifest announced last.
    last: Option<[u8; 32]>,
    /// The manifest announced last (test fault: replayed).
    previous: Option<Vec<u8>>,
    /// Drains the topic's events (a receiver that is not read lags and is dropped).
    _drain: DropAbort,
}

/// Aborts its task when dropped.
struct DropAbort(JoinHandle<()>);

impl Drop for DropAbort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn join(
    gossip: &Gossip,
    origin: &ClusterKey,
    resource: &Resource,
    bootstrap: Vec<EndpointId>,
) -> Option<iroh_gossip::api::GossipTopic> {
    let topic = TopicId::from_bytes(gossip_topic(origin, resource));
    match gossip.subscribe(topic, bootstrap).await {
        Ok(topic) => Some(topic),
        Err(e) => {
            tracing::info!(%resource, "cannot join the announcement topic: {e}");
            None
        }
    }
}

/// The origin side (every member runs it; the leader announces).
pub async fn run_origin(state: Arc<NodeState>, gossip: Gossip) {
    let mut topics: HashMap<Resource, Announcing> = HashMap::new();
    let mut own: Option<ClusterKey> = None;
    loop {
        tokio::time::sleep(CHANGE_CHECK).await;
        if !state.cluster.is_leader() {
            topics.clear();
            continue;
        }
        let secret = match state.cluster_secret().await {
            Ok(Some(secret)) => secret,
            _ => continue,
        };
        let origin = *own.get_or_insert(secret.public());
        let Ok(exports) = state
            .cluster
            .sm
            .system_scan(EXPORT_PREFIX.to_vec(), MAX_EXPORTS + 1)
            .await
        else {
            continue;
        };
        let exported: Vec<Resource> = exports
            .iter()
            .filter_map(|(key, _)| resource_of_key(key).ok())
            .filter(|r| r.kind != ResourceKind::Ns)
            .collect();
        topics.retain(|r, _| exported.contains(r));
        for resource in exported {
            let signed = match super::origin::signed_now(&state, &resource).await {
                Ok(signed) => signed,
                Err(aspen_federation::FedError::NotFound(_)) => continue,
                Err(e) => {
                    tracing::debug!(%resource, "cannot sign a manifest to announce: {e}");
                    continue;
                }
            };
            if !topics.contains_key(&resource) {
                let Some(topic) = join(&gossip, &origin, &resource, Vec::new()).await else {
                    continue;
                };
                let (sender, mut receiver) = topic.split();
                let drain = tokio::spawn(async move { while receiver.next().await.is_some() {} });
                topics.insert(
                    resource.clone(),
                    Announcing {
                        sender,
                        last: None,
                        previous: None,
                        _drain: DropAbort(drain),
                    },
                );
            }
            let topic = topics.get_mut(&resource).expect("inserted above");
            if state.cluster.test_fault == Some(TestFault::FedForgedAnnouncements) {
                // Every check, changed or not: a forgery and a replay.
                for message in forgeries(&signed, topic.previous.clone()) {
                    let _ = topic.sender.broadcast(message.into()).await;
                }
            }
            let hash = signed.hash();
            if topic.last == Some(hash) {
                continue;
            }
            if let Err(e) = topic.sender.broadcast(signed.encode().into()).await {
                tracing::debug!(%resource, "cannot announce: {e}");
            }
            tracing::debug!(%resource, "new manifest announced");
            topic.last = Some(hash);
            topic.previous = Some(signed.encode());
        }
    }
}

/// Test fault: the manifest signed by a stranger's key, and the one before it again.
fn forgeries(signed: &aspen_sync::SignedManifest, previous: Option<Vec<u8>>) -> Vec<Vec<u8>> {
    let Ok(manifest) = signed.manifest() else {
        return Vec::new();
    };
    let liar = aspen_trust::ClusterSecretKey::generate();
    let mut out = Vec::new();
    let by_liar = aspen_sync::Manifest {
        origin: liar.public().to_bytes(),
        seq: manifest.seq + 1_000,
        ..manifest.clone()
    };
    if let Ok(s) = aspen_sync::SignedManifest::sign(&by_liar, &liar) {
        // Claims to come from the liar, so it fails the origin's signature check; the
        // follower is told nothing else.
        out.push(s.encode());
    }
    // The previous announcement, replayed (a follower that pulled it holds it already).
    out.extend(previous);
    out
}

/// The follower side (every member runs it; the leader listens).
pub async fn run_follower(state: Arc<NodeState>, gossip: Gossip, pulls: Arc<Pulls>) {
    let limiter = Arc::new(Mutex::new(AnnouncementLimiter::default()));
    let mut listening: HashMap<FollowId, Listening> = HashMap::new();
    loop {
        tokio::time::sleep(FOLLOW_CHECK).await;
        if !state.cluster.is_leader() {
            listening.clear();
            continue;
        }
        let Ok(follows) = list_follows(&state.cluster).await else {
            continue;
        };
        listening.retain(|(o, r), _| {
            follows
                .iter()
                .any(|(fo, fr, _, _)| fo.to_bytes() == *o && fr == r)
        });
        for (origin, resource, _, _) in follows {
            if resource.kind == ResourceKind::Ns {
                continue;
            }
            let Some(node) = pulls
                .reached
                .lock()
                .expect("lock")
                .get(&origin.to_bytes())
                .map(|a| a.id)
            else {
                // Not reached yet: the first pull will tell us where.
                continue;
            };
            let id = (origin.to_bytes(), resource.clone());
            let keep = listening.get(&id).is_some_and(|l| {
                l.node == node
                    && (l.neighbors.load(std::sync::atomic::Ordering::Relaxed) > 0
                        || l.since.elapsed() < REJOIN_AFTER)
            });
            if keep {
                continue;
            }
            // (Re)join: a new follow, the origin reached at another node, or no neighbor.
            listening.remove(&id);
            let Some(topic) = join(&gossip, &origin, &resource, vec![node]).await else {
                continue;
            };
            let (_sender, receiver) = topic.split();
            let neighbors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let task = tokio::spawn(listen(
                state.clone(),
                pulls.clone(),
                limiter.clone(),
                origin,
                resource,
                receiver,
                neighbors.clone(),
            ));
            listening.insert(
                id,
                Listening {
                    node,
                    since: tokio::time::Instant::now(),
                    neighbors,
                    _task: DropAbort(task),
                },
            );
        }
    }
}

/// One topic a follower listens on.
struct Listening {
    /// The origin node it joined through.
    node: EndpointId,
    since: tokio::time::Instant,
    /// Its current neighbors on the topic.
    neighbors: Arc<std::sync::atomic::AtomicUsize>,
    _task: DropAbort,
}

/// Acts on one topic's announcements: checked, then rate-limited, then a pull now.
async fn listen(
    state: Arc<NodeState>,
    pulls: Arc<Pulls>,
    limiter: Arc<Mutex<AnnouncementLimiter>>,
    origin: ClusterKey,
    resource: Resource,
    mut receiver: iroh_gossip::api::GossipReceiver,
    neighbors: Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::Ordering;
    while let Some(event) = receiver.next().await {
        match &event {
            Ok(Event::NeighborUp(_)) => {
                neighbors.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Event::NeighborDown(_)) => {
                let _ = neighbors.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(1))
                });
            }
            _ => {}
        }
        let message = match event {
            Ok(Event::Received(message)) => message,
            // Joined (or rejoined) the origin: what was announced meanwhile was missed, so
            // pull once now (within the origin's rate).
            Ok(Event::NeighborUp(_)) | Ok(Event::Lagged) => {
                if limiter
                    .lock()
                    .expect("lock")
                    .allow(&origin, std::time::Instant::now())
                {
                    pulls.force(&[(origin.to_bytes(), resource.clone())]);
                }
                continue;
            }
            _ => continue,
        };
        let accepted = match accepted_manifest(&state.cluster, &origin, &resource).await {
            Ok((_, accepted)) => accepted.map(|(m, _)| m),
            Err(e) => {
                tracing::info!(%resource, "cannot read the accepted manifest: {e}");
                continue;
            }
        };
        match check_announcement(&message.content, &origin, &resource, accepted.as_ref()) {
            Ok(manifest) => {
                let allowed = limiter
                    .lock()
                    .expect("lock")
                    .allow(&origin, std::time::Instant::now());
                if allowed {
                    tracing::debug!(%origin, %resource, seq = manifest.seq, "announced; pulling now");
                    pulls.force(&[(origin.to_bytes(), resource.clone())]);
                } else {
                    tracing::info!(%origin, %resource, "announcement over the origin's rate; left to polling");
                }
            }
            Err(e) => {
                tracing::info!(%origin, %resource, from = %message.delivered_from.fmt_short(), "announcement ignored: {e}");
            }
        }
    }
}
