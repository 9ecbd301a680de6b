//! Leases on a node: the leader's lease clock loop, and the lease requests clients make.
//!
//! Leases are granted and revoked with ordinary writes (idempotent across retries); what is
//! here is what only the leader's clock ([`aspen_kv::Lessor`]) can do: run deadlines from the
//! moment this node leads, and propose the expiry of each lease whose deadline passed.
//! Keep-alives and time-left queries go to the leader ([`ClusterHandle::lease_keep_alive`]).

use aspen_client::protocol::{
    LeaseRequest, LeaseResponse, LeaseStatus, RpcError, MAX_LEASES_PER_LIST,
};
use aspen_kv::api::{ApplyError, Command, LeaseId, WriteOp};
use aspen_kv::limits::{MAX_EXPIRIES_PER_BATCH, MAX_LEASE_ID};
use aspen_trust::{Action, Kind};
use openraft::async_runtime::WatchReceiver;
use tokio::time::Instant;

use super::auth::{Access, Need};
use super::ClusterHandle;

/// Runs this node's lease clock: promoted whenever the node becomes leader (in each term),
/// stopped when it is not, and while leading, proposes an expiry for every lease whose
/// deadline passed (a batch at a time).
pub async fn run_clock(cluster: ClusterHandle) {
    let lessor = cluster.sm.lessor();
    // Server metrics change only with the vote, role, leader or membership (not on every
    // apply); a lease granted meanwhile that is due first wakes the clock through the lessor.
    let mut metrics = cluster.raft.server_metrics();
    // The term this node leads in, as far as the clock knows.
    let mut leading: Option<u64> = None;
    loop {
        let (leader, term) = {
            let m = metrics.borrow_and_update();
            (
                m.current_leader == Some(cluster.id) && m.state.is_leader(),
                m.vote.leader_id().term,
            )
        };
        match (leader, leading) {
            (true, Some(t)) if t == term => {}
            (true, _) => {
                lessor.promote(Instant::now());
                leading = Some(term);
                tracing::debug!(term, leases = lessor.len(), "lease clock running");
            }
            (false, Some(_)) => {
                lessor.demote();
                leading = None;
                tracing::debug!("lease clock stopped");
            }
            (false, None) => {}
        }
        let next = leading.and(lessor.next_check());
        tokio::select! {
            changed = metrics.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = lessor.due_sooner() => {}
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let due = lessor.expired(Instant::now(), MAX_EXPIRIES_PER_BATCH);
                if !due.is_empty() {
                    propose_expiries(&cluster, due);
                }
            }
        }
    }
}

/// Proposes the expiry of `due` leases, in the background (a lost proposal is retried by
/// the clock after [`aspen_kv::lessor::EXPIRY_RETRY`]).
fn propose_expiries(cluster: &ClusterHandle, due: Vec<(LeaseId, u64)>) {
    tracing::debug!(leases = due.len(), "proposing lease expiries");
    let commands = due
        .into_iter()
        .map(|(id, grant)| Command {
            session: None,
            op: WriteOp::LeaseExpire { id, grant },
        })
        .collect();
    let cluster = cluster.clone();
    tokio::spawn(async move {
        if let Err(e) = cluster.propose_here(commands).await {
            tracing::debug!("lease expiries not proposed: {e}");
        }
    });
}

/// A random lease id for a grant that left it to the node.
pub fn pick_lease_id() -> LeaseId {
    loop {
        let id = rand::random::<u64>() & MAX_LEASE_ID;
        if id != 0 {
            return id;
        }
    }
}

/// Serves one lease request (its permission already checked).
pub async fn handle(
    cluster: &ClusterHandle,
    request: LeaseRequest,
    access: &Access<'_>,
) -> Result<LeaseResponse, RpcError> {
    match request {
        LeaseRequest::KeepAlive { id } => {
            aspen_kv::api::check_lease_id(id, false)?;
            let ttl_secs = cluster.lease_keep_alive(id).await?;
            Ok(LeaseResponse::KeptAlive { id, ttl_secs })
        }
        LeaseRequest::TimeToLive { id, keys } => {
            aspen_kv::api::check_lease_id(id, false)?;
            let remaining_ms = cluster.lease_remaining_ms(id).await?;
            // The leader knew the lease when it answered: read it no older than that.
            cluster.read_barrier().await?;
            let record = cluster
                .sm
                .lease(id, keys)
                .await?
                .ok_or(ApplyError::LeaseNotFound { id })?;
            let keys = record
                .keys
                .into_iter()
                .filter(|k| access.may(Kind::Kv, Action::Read, k))
                .collect();
            Ok(LeaseResponse::TimeToLive(LeaseStatus {
                id,
                ttl_secs: record.ttl_secs,
                remaining_ms,
                key_count: record.key_count,
                keys,
            }))
        }
        LeaseRequest::List { after } => {
            cluster.read_barrier().await?;
            let (ids, more) = cluster.sm.leases(after, MAX_LEASES_PER_LIST).await?;
            Ok(LeaseResponse::List { ids, more })
        }
    }
}

/// Revoking a lease deletes its keys: the caller needs write access to each key attached
/// now (as etcd checks). Keys attached after this check go with the lease too.
pub async fn check_revokes(
    cluster: &ClusterHandle,
    commands: &[Command],
    access: &Access<'_>,
) -> Result<(), RpcError> {
    for c in commands {
        let WriteOp::LeaseRevoke { id } = &c.op else {
            continue;
        };
        let Some(record) = cluster.sm.lease(*id, true).await? else {
            continue; // Apply answers "not found".
        };
        for key in &record.keys {
            if !access.may(Kind::Kv, Action::Write, key) {
                return Err(access.denied(&Need::One(Kind::Kv, Action::Write, key.clone())));
            }
        }
    }
    Ok(())
}

/// Gives each grant that left its lease id to the node (0) a random one.
pub fn assign_lease_ids(commands: &mut [Command]) {
    for c in commands {
        if let WriteOp::LeaseGrant { id, .. } = &mut c.op {
            if *id == 0 {
                *id = pick_lease_id();
            }
        }
    }
}
