//! The leader's duties for the cluster identity: create it if missing, and keep the cluster
//! record on the Mainline DHT current.
//!
//! Every node runs this task; only the leader acts. It publishes a new record (new seq) when
//! the members or their addresses change, or when the last record is past half its validity;
//! otherwise it puts the same signed item again every republish interval so DHT nodes keep it.
//! Each record published is also written to the system key space through Raft, so a new
//! leader continues from the last seq and any member can report it.

use openraft::async_runtime::WatchReceiver;
use std::sync::Arc;
use std::time::Duration;

use aspen_discovery::ClusterDht;
use aspen_kv::api::{Command, SystemWrite, WriteOp};
use aspen_trust::{
    ClusterRecord, RecordMember, SignedRecord, MAX_RECORD_ADDRS_PER_MEMBER, MAX_RECORD_MEMBERS,
};

use super::identity::{unix_now, RECORD_KEY};
use super::NodeState;

/// Timing of the publisher (from the node's `[dht]` settings).
#[derive(Clone, Copy, Debug)]
pub struct PublishTiming {
    pub republish_interval: Duration,
    pub record_validity: Duration,
}

/// Longest wait between retries after failures.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// Runs until the node stops.
pub async fn run(state: Arc<NodeState>, dht: Option<ClusterDht>, timing: PublishTiming) {
    // Leader and membership only: server metrics (not woken by every apply).
    let mut metrics = state.cluster.raft.server_metrics();
    let mut tick = tokio::time::interval(timing.republish_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(SignedRecord, ClusterRecord)> = None;
    let mut seen_membership = None;
    let mut was_leader = false;
    let mut failures = 0u32;
    let mut retry = None::<tokio::time::Instant>;
    loop {
        let periodic = tokio::select! {
            changed = metrics.changed() => {
                if changed.is_err() {
                    return;
                }
                false
            }
            _ = tick.tick() => true,
            _ = state.identity_changed.notified() => true,
            _ = async { tokio::time::sleep_until(retry.expect("guarded")).await }, if retry.is_some() => true,
        };
        let (membership, leader) = {
            let m = metrics.borrow_watched();
            (
                m.membership_config.log_id().map(|l| l.index),
                m.current_leader == Some(state.cluster.id) && m.state.is_leader(),
            )
        };
        if !leader {
            was_leader = false;
            failures = 0;
            retry = None;
            continue;
        }
        if was_leader && !periodic && membership == seen_membership {
            continue; // Nothing that matters changed.
        }
        if !was_leader {
            // A new leader continues from the record the cluster last published.
            last = None;
        }
        was_leader = true;
        seen_membership = membership;
        match step(&state, dht.as_ref(), timing, &mut last, periodic).await {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!("cluster record published after {failures} failed attempts");
                }
                failures = 0;
                retry = None;
            }
            Err(e) => {
                failures += 1;
                // Once at warn, then quietly: an offline site must not fill its log.
                if failures == 1 {
                    tracing::warn!("cannot publish the cluster record (will retry): {e}");
                } else {
                    tracing::debug!("cannot publish the cluster record (attempt {failures}): {e}");
                }
                let delay = Duration::from_secs(1 << failures.min(6)).min(MAX_RETRY_DELAY);
                retry = Some(tokio::time::Instant::now() + delay);
            }
        }
    }
}

/// One round as leader: identity, then the record.
async fn step(
    state: &NodeState,
    dht: Option<&ClusterDht>,
    timing: PublishTiming,
    last: &mut Option<(SignedRecord, ClusterRecord)>,
    periodic: bool,
) -> Result<(), String> {
    let secret = state
        .ensure_identity()
        .await
        .map_err(|e| format!("creating the cluster identity: {e}"))?;
    let Some(dht) = dht else {
        return Ok(());
    };
    if last.is_none() {
        *last = state
            .published_record()
            .await
            .map_err(|e| e.to_string())?
            .and_then(|s| Some((s.clone(), ClusterRecord::decode(&s.value).ok()?)));
    }
    let members = record_members(state);
    let name = state.cluster_name().await.map_err(|e| e.to_string())?;
    let now = unix_now();
    let validity = timing.record_validity.as_secs();
    if let Some((signed, record)) = last.as_ref() {
        let fresh = now < record.issued_at.saturating_add(validity / 2);
        if fresh && record.members == members && record.name == name {
            if periodic {
                dht.republish(signed).await.map_err(|e| e.to_string())?;
                tracing::debug!(seq = signed.seq, "cluster record republished");
            }
            return Ok(());
        }
    }
    let record = ClusterRecord {
        name,
        relay_url: None,
        members,
        issued_at: now,
        expires_at: now.saturating_add(validity),
    };
    let floor = last
        .as_ref()
        .map_or(0, |(s, _)| s.seq.saturating_add(1))
        .max(now as i64);
    let signed = dht
        .publish(&secret, &record, floor)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(
        seq = signed.seq,
        members = record.members.len(),
        "cluster record published"
    );
    // Replicate it, so the next leader continues from this seq.
    state
        .cluster
        .propose(vec![Command {
            session: None,
            op: WriteOp::System(SystemWrite {
                key: RECORD_KEY.to_vec(),
                expect: None,
                new: Some(signed.encode()),
            }),
        }])
        .await
        .map_err(|e| format!("recording the published record: {e}"))?;
    *last = Some((signed, record));
    Ok(())
}

/// The members as the record lists them: voters first (by id), then learners, at most
/// [`MAX_RECORD_MEMBERS`], each with its first [`MAX_RECORD_ADDRS_PER_MEMBER`] addresses.
fn record_members(state: &NodeState) -> Vec<RecordMember> {
    let membership = state.cluster.membership();
    let m = membership.membership();
    let mut ids: Vec<_> = m.voter_ids().collect();
    ids.extend(m.learner_ids());
    ids.into_iter()
        .filter_map(|id| m.get_node(&id))
        .take(MAX_RECORD_MEMBERS)
        .map(|n| RecordMember {
            node: n.endpoint_id,
            addrs: n
                .addrs
                .iter()
                .take(MAX_RECORD_ADDRS_PER_MEMBER)
                .copied()
                .collect(),
        })
        .collect()
}
