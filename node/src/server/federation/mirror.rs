//! A mirror's side of `aspen/federation/1`: serving this cluster's verified copy of a
//! resource it follows to other clusters, while the origin may be offline.
//!
//! A [`FedCall::Mirrored`] call names the origin. It is answered only when this cluster
//! mirrors that resource to the caller's cluster (`aspen fed mirror`, a policy shaped like
//! an export, checked after a read barrier; "not mirrored" and "not mirrored to you" get the
//! same answer) and has accepted a manifest for it. The answer is that manifest, exactly as
//! the origin signed it, and exactly the data it names: a document forked at the signed
//! heads (local edits merged into the followed document are never served as the origin's),
//! the tag list the manifest pins. A mirrored namespace is synced from the read-only
//! replica over iroh-docs, which the gate opens to the caller for it (`gate.rs`). The
//! reader verifies all of it against the origin's key,
//! so a mirror can serve old data or nothing, but never data the origin did not sign.
//! Because a mirror serves what it accepted, whatever it pulled from (the origin, or
//! another mirror), mirrors chain.

use aspen_crdt::DocName;
use aspen_federation::{
    follow_key, follow_state_key, follow_tags_key, mirror_key, Export, FedCall, FedError, FedReply,
    Follow, MAX_CHANGES_PAGE_BYTES,
};
use aspen_sync::doc_exchange::{changes_since, MAX_HAVE};
use aspen_sync::{BlobTagList, ContentDigest, Manifest, Resource, SignedManifest};
use aspen_trust::ClusterKey;

use crate::config::TestFault;
use crate::server::NodeState;

/// What a mirror holds of one resource: the follow (where the copy is) and the manifest it
/// accepted last.
struct Copy {
    follow: Follow,
    signed: SignedManifest,
    manifest: Manifest,
}

/// Serves one mirrored call.
pub(super) async fn serve(
    state: &NodeState,
    caller: &ClusterKey,
    origin: &[u8; 32],
    call: &[u8],
) -> Result<FedReply, FedError> {
    let (origin, call) = FedCall::open_mirrored(origin, call)?;
    let resource = match &call {
        FedCall::Manifest { resource } => resource.clone(),
        FedCall::DocChanges { name, .. } | FedCall::DocSnapshot { name } => {
            Resource::doc(name.clone())
        }
        FedCall::BlobTags { prefix } => Resource::blob(prefix.clone()),
        FedCall::Mirrored { .. } => {
            return Err(FedError::BadRequest("nested mirrored call".into()))
        }
    };
    let copy = mirrored_copy(state, caller, &origin, &resource).await?;
    let manifest = served_manifest(state, &copy).await?;
    match call {
        FedCall::Manifest { .. } => Ok(FedReply::Manifest(manifest)),
        FedCall::DocChanges { have, .. } => {
            if have.len() > MAX_HAVE {
                return Err(FedError::BadRequest(format!(
                    "{} heads in `have`, the limit is {MAX_HAVE}",
                    have.len()
                )));
            }
            let mut page = at_signed_heads(state, &copy, move |doc| {
                changes_since(doc, &have, MAX_CHANGES_PAGE_BYTES)
                    .map_err(|e| FedError::BadRequest(e.to_string()))
            })
            .await??;
            if state.cluster.test_fault == Some(TestFault::FedFlipByte) {
                for change in &mut page.changes {
                    if let Some(last) = change.last_mut() {
                        *last ^= 1;
                    }
                }
            }
            Ok(FedReply::DocChanges {
                manifest,
                changes: page.changes,
                more: page.more,
            })
        }
        FedCall::DocSnapshot { .. } => {
            let document = at_signed_heads(state, &copy, |doc| doc.save()).await?;
            let document = super::origin::snapshot_to_serve(state, &resource, document)?;
            Ok(FedReply::DocSnapshot { manifest, document })
        }
        FedCall::BlobTags { .. } => {
            let list = accepted_tags(state, &origin, &resource, &copy).await?;
            let mut tags = list.entries().to_vec();
            if state.cluster.test_fault == Some(TestFault::FedFlipByte) {
                if let Some((_, hash)) = tags.first_mut() {
                    hash[0] ^= 0x5a;
                }
            }
            Ok(FedReply::BlobTags { manifest, tags })
        }
        FedCall::Mirrored { .. } => unreachable!("refused above"),
    }
}

/// The copy of `origin`'s `resource` this cluster mirrors to `caller`, after a read barrier
/// (a stranger's, as in `origin::check_export`).
async fn mirrored_copy(
    state: &NodeState,
    caller: &ClusterKey,
    origin: &ClusterKey,
    resource: &Resource,
) -> Result<Copy, FedError> {
    resource
        .check()
        .map_err(|e| FedError::BadRequest(e.to_string()))?;
    state
        .cluster
        .read_barrier_for_stranger()
        .await
        .map_err(|e| FedError::Unavailable(e.to_string()))?;
    let not_mirrored = || FedError::NotExported {
        resource: format!("{resource} of cluster {origin}"),
        cluster: caller.to_string(),
    };
    let get = |key: Vec<u8>| async move {
        state
            .cluster
            .sm
            .system_get(key)
            .await
            .map_err(|e| FedError::Internal(e.to_string()))
    };
    let policy = get(mirror_key(origin, resource))
        .await?
        .map(|b| Export::decode(&b))
        .transpose()
        .map_err(internal)?;
    if !policy.is_some_and(|p| p.allows(&caller.to_bytes())) {
        return Err(not_mirrored());
    }
    let follow = get(follow_key(origin, resource))
        .await?
        .map(|b| Follow::decode(&b))
        .transpose()
        .map_err(internal)?
        .ok_or_else(not_mirrored)?;
    let signed = get(follow_state_key(origin, resource))
        .await?
        .map(|b| SignedManifest::decode(&b))
        .transpose()
        .map_err(internal)?
        .ok_or_else(|| {
            FedError::NotFound(format!("{resource}: this mirror has pulled nothing yet"))
        })?;
    let manifest = signed.verify(origin, resource).map_err(internal)?;
    Ok(Copy {
        follow,
        signed,
        manifest,
    })
}

/// The accepted manifest as served (test fault: re-signed with this cluster's own key, a
/// mirror passing off a manifest as the origin's).
async fn served_manifest(state: &NodeState, copy: &Copy) -> Result<Vec<u8>, FedError> {
    if state.cluster.test_fault != Some(TestFault::FedWrongKey) {
        return Ok(copy.signed.encode());
    }
    let own = state
        .cluster_secret()
        .await
        .map_err(internal)?
        .ok_or_else(|| FedError::Unavailable("no cluster identity".into()))?;
    let forged = Manifest {
        origin: own.public().to_bytes(),
        ..copy.manifest.clone()
    };
    Ok(SignedManifest::sign(&forged, &own)
        .map_err(internal)?
        .encode())
}

/// Runs `f` on the followed document forked at the heads the accepted manifest signs.
async fn at_signed_heads<T: Send + 'static>(
    state: &NodeState,
    copy: &Copy,
    f: impl FnOnce(&automerge::Automerge) -> T + Send + 'static,
) -> Result<T, FedError> {
    let ContentDigest::Heads(heads) = &copy.manifest.digest else {
        return Err(FedError::Internal(
            "a document manifest without heads".into(),
        ));
    };
    let heads: Vec<automerge::ChangeHash> =
        heads.iter().map(|h| automerge::ChangeHash(*h)).collect();
    let name = DocName::new(copy.follow.into.clone()).map_err(internal)?;
    state
        .docs
        .with_doc(&name, move |doc| doc.fork_at(&heads).map(|at| f(&at)))
        .await
        .map_err(internal)?
        .ok_or_else(|| FedError::Unavailable("this mirror's copy is gone".into()))?
        .map_err(|e| {
            FedError::Unavailable(format!(
                "this mirror's copy lacks the state it accepted: {e}"
            ))
        })
}

/// The tag list the accepted manifest pins (kept beside it when the follow was pulled).
async fn accepted_tags(
    state: &NodeState,
    origin: &ClusterKey,
    resource: &Resource,
    copy: &Copy,
) -> Result<BlobTagList, FedError> {
    let stored = state
        .cluster
        .sm
        .system_get(follow_tags_key(origin, resource))
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            FedError::Unavailable(format!(
                "{resource}: this mirror keeps no tag list for it (too large to keep, or \
                 pulled before mirrors existed; it is kept from the next change on)"
            ))
        })?;
    let list: BlobTagList = postcard::from_bytes(&stored).map_err(internal)?;
    if list.digest() != copy.manifest.digest {
        return Err(FedError::Unavailable(
            "this mirror's tag list is not the one its manifest pins".into(),
        ));
    }
    Ok(list)
}

fn internal(e: impl std::fmt::Display) -> FedError {
    FedError::Internal(e.to_string())
}

/// How often a mirror's leader re-announces its mirrors in their DHT directories (entries
/// live [`aspen_discovery::DIRECTORY_ENTRY_TTL_SECS`]).
pub const ANNOUNCE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30 * 60);
/// How often the leader checks that its mirrors are still listed, and announces again those
/// that are not (a directory is a shared item: a writer that found none writes without
/// compare-and-swap and can drop an entry written a moment before).
pub const LISTING_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15);
/// Most listings checked per [`LISTING_CHECK_INTERVAL`] (in turn, when there are more).
pub const LISTING_CHECKS_PER_ROUND: usize = 32;

/// The leader announces every resource this cluster mirrors in the resource's DHT mirror
/// directory: at once when a mirror policy changes, every [`ANNOUNCE_INTERVAL`], and again
/// when a check finds the entry gone.
pub async fn run_announcer(state: std::sync::Arc<NodeState>, dht: aspen_discovery::ClusterDht) {
    let mut changed = state
        .cluster
        .sm
        .watch_system_prefix(aspen_federation::MIRROR_PREFIX);
    let tick = std::time::Duration::from_secs(1);
    let mut next_full = tokio::time::Instant::now();
    let mut next_check = tokio::time::Instant::now() + LISTING_CHECK_INTERVAL;
    let mut checked_from = 0usize;
    loop {
        if !state.cluster.is_leader() {
            next_full = tokio::time::Instant::now();
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                Ok(()) = changed.changed() => {}
            }
            continue;
        }
        let now = tokio::time::Instant::now();
        if now >= next_full {
            next_full = now
                + match announce(&state, &dht, Round::All).await {
                    Ok(()) => ANNOUNCE_INTERVAL,
                    Err(e) => {
                        tracing::info!("announcing mirrors on the DHT: {e}");
                        LISTING_CHECK_INTERVAL
                    }
                };
            next_check = now + LISTING_CHECK_INTERVAL;
        } else if now >= next_check {
            match announce(&state, &dht, Round::Unlisted(&mut checked_from)).await {
                Ok(()) => {}
                Err(e) => tracing::info!("re-announcing mirrors on the DHT: {e}"),
            }
            next_check = now + LISTING_CHECK_INTERVAL;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next_full.min(next_check)) => {}
            Ok(()) = changed.changed() => next_full = tokio::time::Instant::now(),
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

/// Which mirrors an announcement round covers.
enum Round<'a> {
    /// Every one.
    All,
    /// Those of the next [`LISTING_CHECKS_PER_ROUND`] (from this offset) that the
    /// directory does not list.
    Unlisted(&'a mut usize),
}

/// Every mirror policy: the origin, the resource and who it is mirrored to, in key order
/// (no read barrier).
pub(crate) async fn mirror_policies(
    cluster: &crate::server::ClusterHandle,
) -> Result<Vec<(ClusterKey, Resource, Export)>, String> {
    let entries = cluster
        .sm
        .system_scan(
            aspen_federation::MIRROR_PREFIX.to_vec(),
            aspen_federation::MAX_MIRRORS + 1,
        )
        .await
        .map_err(|e| e.to_string())?;
    entries
        .into_iter()
        .map(|(key, value)| {
            let (origin, resource) =
                aspen_federation::parse_mirror_key(&key).map_err(|e| e.to_string())?;
            let policy = Export::decode(&value).map_err(|e| e.to_string())?;
            Ok((origin, resource, policy))
        })
        .collect()
}

async fn announce(
    state: &NodeState,
    dht: &aspen_discovery::ClusterDht,
    round: Round<'_>,
) -> Result<(), String> {
    let policies = mirror_policies(&state.cluster).await?;
    if policies.is_empty() {
        return Ok(());
    }
    let own = state
        .cluster_secret()
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no cluster identity yet")?
        .public();
    let chosen: Vec<&(ClusterKey, Resource, Export)> = match &round {
        Round::All => policies.iter().collect(),
        Round::Unlisted(from) => {
            let start = **from % policies.len();
            policies
                .iter()
                .cycle()
                .skip(start)
                .take(LISTING_CHECKS_PER_ROUND.min(policies.len()))
                .collect()
        }
    };
    let only_unlisted = matches!(round, Round::Unlisted(_));
    if let Round::Unlisted(from) = round {
        *from = from.wrapping_add(chosen.len());
    }
    let mut failed = Vec::new();
    for (origin, resource, _) in chosen {
        let topic = aspen_federation::directory_topic(origin, resource);
        let now = crate::server::identity::unix_now();
        if only_unlisted {
            match dht.find_mirrors(&topic, origin, now).await {
                Ok(listed) if listed.contains(&own) => continue,
                Ok(_) => tracing::debug!(%origin, %resource, "mirror not listed; announcing again"),
                Err(e) => {
                    failed.push(format!("{resource} of {origin}: {e}"));
                    continue;
                }
            }
        }
        match dht.announce_mirror(&topic, origin, &own, now).await {
            Ok(()) => tracing::debug!(%origin, %resource, "mirror announced on the DHT"),
            Err(e) => failed.push(format!("{resource} of {origin}: {e}")),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}
