//! Push triggers: new manifests announced over iroh-gossip, so a change reaches followers in
//! about the time of one pull instead of at their next poll (which stays as the fallback).
//!
//! - Every member of the origin stays on the topic of each exported document and blob
//!   prefix ([`aspen_federation::announce::gossip_topic`]), joined to the other members:
//!   followers join through whichever member their pulls reached. The leader checks its
//!   exports every [`CHANGE_CHECK`] in which documents, blob tags or exports changed; when
//!   one changed, it signs the next manifest (as a request for it would) and broadcasts it.
//! - A follower's leader joins the topic of each followed document or blob prefix through
//!   the origin node its pulls last reached, and the nodes of the mirrors the follow names
//!   or last pulled from. Each message must be the origin's manifest of that resource,
//!   newer than the one accepted ([`check_announcement`]); only then does the per-origin
//!   rate limit count it, and the follow is pulled at once. The pull verifies everything as
//!   any pull does. Joining (or rejoining) a topic also pulls once, for what was announced
//!   while the follower was not listening.
//! - A follower that mirrors the resource also announces, in a mirror's envelope, each
//!   manifest it accepts: its readers hear the origin's announcement relayed through it,
//!   often before it has pulled, and pull from it too early; the mirror's own announcement
//!   comes once it serves the new state.
//!
//! Namespaces are left out: iroh-docs has its own live sync for them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aspen_federation::announce::{
    check_announcement, gossip_topic, Announcement, AnnouncementLimiter,
};
use aspen_federation::{resource_of_key, EXPORT_PREFIX, FOLLOW_STATE_PREFIX, MAX_EXPORTS};
use aspen_sync::{Resource, ResourceKind};
use aspen_trust::ClusterKey;
use futures::StreamExt;
use iroh::{EndpointAddr, EndpointId};
use iroh_gossip::api::{Event, GossipSender};
use iroh_gossip::net::Gossip;
use iroh_gossip::proto::TopicId;
use tokio_util::task::AbortOnDropHandle;

use super::follower::{accepted_manifest, list_follows, FollowId, Pulls};
use crate::config::TestFault;
use crate::server::NodeState;

/// How often the origin's leader looks for changed exports (when documents, blob tags or
/// exports changed since it last looked).
pub const CHANGE_CHECK: Duration = Duration::from_millis(200);
/// How often it looks even when nothing seemed to change.
const FULL_CHECK: Duration = Duration::from_secs(10);
/// How often a follower's leader re-reads its follows (and joins new topics).
const FOLLOW_CHECK: Duration = Duration::from_secs(1);
/// A topic joined this long ago without one of the nodes joined through as a neighbor is
/// joined again: the origin may have subscribed only after our join (a new export), or
/// restarted. Each further try waits twice as long, up to [`REJOIN_MAX`].
pub const REJOIN_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between tries to join a topic (an origin that stays down).
pub const REJOIN_MAX: Duration = Duration::from_secs(60);

/// One topic the origin announces on.
struct Announcing {
    sender: GossipSender,
    /// The hash of the manifest announced last.
    last: Option<[u8; 32]>,
    /// The manifest announced last (test fault: replayed).
    previous: Option<Vec<u8>>,
    /// Drains the topic's events (a receiver that is not read lags and is dropped).
    _drain: AbortOnDropHandle<()>,
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

/// The origin side. Every member stays on the topic of each exported document and blob
/// prefix, joined to the other members, because a follower joins through whichever member
/// its pulls reached; only the leader signs and announces.
pub async fn run_origin(
    state: Arc<NodeState>,
    gossip: Gossip,
    addrs: iroh::address_lookup::MemoryLookup,
) {
    let mut topics: HashMap<Resource, Announcing> = HashMap::new();
    let mut members: Vec<EndpointId> = Vec::new();
    let mut was_leader = false;
    // Exports are looked at again only when documents, blob tags or the exports themselves
    // changed (or every FULL_CHECK): signing reads every exported document.
    let sm = &state.cluster.sm;
    let mut changes = [
        sm.watch_system_prefix(aspen_crdt::layout::DATA_PREFIX),
        sm.watch_system_prefix(aspen_blobs::layout::TAG_PREFIX),
        sm.watch_system_prefix(EXPORT_PREFIX),
    ];
    let mut checked_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(CHANGE_CHECK).await;
        let leader = state.cluster.is_leader();
        let mut changed = leader != was_leader;
        was_leader = leader;
        for watch in &mut changes {
            changed |= watch.has_changed().unwrap_or(true);
            watch.borrow_and_update();
        }
        let due = checked_at.is_none_or(|at| at.elapsed() >= FULL_CHECK);
        let forging = leader && state.cluster.test_fault == Some(TestFault::FedForgedAnnouncements);
        if !changed && !due && !forging {
            continue;
        }
        checked_at = Some(tokio::time::Instant::now());
        let Ok(Some(secret)) = state.cluster_secret().await else {
            continue;
        };
        let origin = secret.public();
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
        // The other members, dialled by id on the topics (their addresses from the
        // membership).
        let others: Vec<EndpointAddr> = state
            .cluster
            .members()
            .into_iter()
            .filter(|(id, _)| *id != state.cluster.id)
            .filter_map(|(_, m)| crate::server::blobs::endpoint_addr(&m))
            .collect();
        for addr in &others {
            addrs.add_endpoint_info(addr.clone());
        }
        let now_members: Vec<EndpointId> = others.iter().map(|a| a.id).collect();
        if now_members != members {
            for topic in topics.values() {
                let _ = topic.sender.join_peers(now_members.clone()).await;
            }
            members = now_members;
        }
        for resource in exported {
            if !topics.contains_key(&resource) {
                let Some(topic) = join(&gossip, &origin, &resource, members.clone()).await else {
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
                        _drain: AbortOnDropHandle::new(drain),
                    },
                );
            }
            if !leader {
                continue;
            }
            let signed = match super::origin::signed_now(&state, &resource).await {
                Ok(signed) => signed,
                Err(aspen_federation::FedError::NotFound(_)) => continue,
                Err(e) => {
                    tracing::debug!(%resource, "cannot sign a manifest to announce: {e}");
                    continue;
                }
            };
            let topic = topics.get_mut(&resource).expect("inserted above");
            if forging {
                // Every check, changed or not: a forgery and a replay.
                for message in forgeries(&signed, topic.previous.clone()) {
                    let _ = topic.sender.broadcast(message.into()).await;
                }
            }
            let hash = signed.hash();
            if topic.last == Some(hash) {
                continue;
            }
            let announcement = Announcement::Origin {
                manifest: signed.encode(),
            };
            if let Err(e) = topic.sender.broadcast(announcement.encode().into()).await {
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
    out.into_iter()
        .map(|manifest| Announcement::Origin { manifest }.encode())
        .collect()
}

/// The follower side (every member runs it; the leader listens, and announces what it
/// mirrors).
pub async fn run_follower(state: Arc<NodeState>, gossip: Gossip, pulls: Arc<Pulls>) {
    let limiter = Arc::new(Mutex::new(AnnouncementLimiter::default()));
    let mut listening: HashMap<FollowId, Listening> = HashMap::new();
    // A newly accepted manifest is announced (when mirrored) at once, not at the next check.
    let mut accepted_changed = state.cluster.sm.watch_system_prefix(FOLLOW_STATE_PREFIX);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_CHECK) => {}
            Ok(()) = accepted_changed.changed() => {}
        }
        if !state.cluster.is_leader() {
            listening.clear();
            continue;
        }
        let Ok(follows) = list_follows(&state.cluster).await else {
            continue;
        };
        // What this cluster mirrors (one scan, not a read per follow).
        let mirrored: Vec<(ClusterKey, Resource)> = super::mirror::mirror_policies(&state.cluster)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|(o, r, _)| (o, r))
            .collect();
        listening.retain(|(o, r), _| {
            follows
                .iter()
                .any(|(fo, fr, _, _)| fo.to_bytes() == *o && fr == r)
        });
        for (origin, resource, follow, _) in follows {
            if resource.kind == ResourceKind::Ns {
                continue;
            }
            let id = (origin.to_bytes(), resource.clone());
            let nodes = bootstrap(&pulls, &id, &follow);
            if nodes.is_empty() {
                // Nothing reached yet: the first pull will tell us where.
                continue;
            }
            if let Some(l) = listening.get_mut(&id) {
                // Joined again when other nodes were reached, or when none of those joined
                // through became a neighbor (it may have subscribed only after our join, or
                // restarted). Followers that joined through us do not count: announcements
                // do not start there.
                let connected = {
                    let up = l.neighbors.lock().expect("lock");
                    nodes.iter().any(|n| up.contains(n))
                };
                if connected {
                    l.rejoin_after = REJOIN_FIRST;
                }
                let moved = l.nodes != nodes;
                if moved || (!connected && l.since.elapsed() >= l.rejoin_after) {
                    if let Err(e) = l.sender.join_peers(nodes.clone()).await {
                        tracing::debug!(%resource, "cannot join the topic again: {e}");
                    }
                    l.rejoin_after = if moved {
                        REJOIN_FIRST
                    } else {
                        (l.rejoin_after * 2).min(REJOIN_MAX)
                    };
                    l.nodes = nodes;
                    l.since = tokio::time::Instant::now();
                }
            } else {
                let Some(topic) = join(&gossip, &origin, &resource, nodes.clone()).await else {
                    continue;
                };
                let (sender, receiver) = topic.split();
                let neighbors = Arc::new(Mutex::new(HashSet::new()));
                let task = tokio::spawn(listen(
                    state.clone(),
                    pulls.clone(),
                    limiter.clone(),
                    origin,
                    resource.clone(),
                    receiver,
                    neighbors.clone(),
                ));
                listening.insert(
                    id.clone(),
                    Listening {
                        nodes,
                        since: tokio::time::Instant::now(),
                        rejoin_after: REJOIN_FIRST,
                        neighbors,
                        sender,
                        announced: None,
                        _task: AbortOnDropHandle::new(task),
                    },
                );
            }
            let mirrors = mirrored.iter().any(|(o, r)| *o == origin && *r == resource);
            if let Some(l) = listening.get_mut(&id).filter(|_| mirrors) {
                announce_as_mirror(&state, &origin, &resource, l).await;
            }
        }
    }
}

/// The nodes a follow's topic is joined through: the origin's node its pulls reached, then
/// those of the mirrors it last pulled from and names.
fn bootstrap(pulls: &Pulls, id: &FollowId, follow: &aspen_federation::Follow) -> Vec<EndpointId> {
    let last_source = pulls.status_of(id).last_source;
    let reached = pulls.reached.lock().expect("lock");
    let mut nodes: Vec<EndpointId> = Vec::new();
    let clusters = std::iter::once(id.0)
        .chain(last_source)
        .chain(follow.via.iter().map(|v| v.cluster));
    for cluster in clusters {
        if let Some(addr) = reached.get(&cluster) {
            if !nodes.contains(&addr.id) {
                nodes.push(addr.id);
            }
        }
    }
    nodes
}

/// Announces the manifest this cluster accepted last for a resource it mirrors (once per
/// manifest), naming itself.
async fn announce_as_mirror(
    state: &NodeState,
    origin: &ClusterKey,
    resource: &Resource,
    listening: &mut Listening,
) {
    let accepted = state
        .cluster
        .sm
        .system_get(aspen_federation::follow_state_key(origin, resource));
    let Ok(Some(stored)) = accepted.await else {
        return;
    };
    let hash = *blake3::hash(&stored).as_bytes();
    if listening.announced == Some(hash) {
        return;
    }
    let Ok(Some(own)) = state.cluster_secret().await else {
        return;
    };
    let announcement = Announcement::Mirror {
        mirror: own.public().to_bytes(),
        manifest: stored,
    };
    match listening
        .sender
        .broadcast(announcement.encode().into())
        .await
    {
        Ok(()) => {
            tracing::debug!(%origin, %resource, "accepted manifest announced as a mirror");
            listening.announced = Some(hash);
        }
        Err(e) => tracing::debug!(%resource, "cannot announce as a mirror: {e}"),
    }
}

/// One topic a follower listens on.
struct Listening {
    /// The nodes it joined through (see [`bootstrap`]).
    nodes: Vec<EndpointId>,
    /// When it last joined, and how long to wait then before joining again.
    since: tokio::time::Instant,
    rejoin_after: Duration,
    /// Its current neighbors on the topic.
    neighbors: Arc<Mutex<HashSet<EndpointId>>>,
    /// Sends this cluster's own announcements as a mirror.
    sender: GossipSender,
    /// The hash of the accepted manifest announced last as a mirror.
    announced: Option<[u8; 32]>,
    _task: AbortOnDropHandle<()>,
}

/// Acts on one topic's announcements: checked, then rate-limited, then a pull now.
async fn listen(
    state: Arc<NodeState>,
    pulls: Arc<Pulls>,
    limiter: Arc<Mutex<AnnouncementLimiter>>,
    origin: ClusterKey,
    resource: Resource,
    mut receiver: iroh_gossip::api::GossipReceiver,
    neighbors: Arc<Mutex<HashSet<EndpointId>>>,
) {
    while let Some(event) = receiver.next().await {
        match &event {
            Ok(Event::NeighborUp(peer)) => {
                neighbors.lock().expect("lock").insert(*peer);
            }
            Ok(Event::NeighborDown(peer)) => {
                neighbors.lock().expect("lock").remove(peer);
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
            Ok((manifest, mirror)) => {
                let allowed = limiter
                    .lock()
                    .expect("lock")
                    .allow(&origin, std::time::Instant::now());
                if allowed {
                    let by = mirror.map_or("origin".to_string(), |m| hex::encode(&m[..8]));
                    tracing::info!(%origin, %resource, seq = manifest.seq, by, "announced; pulling now");
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
