//! The narrow handle every service holds to the cluster: who the members are and who
//! leads, proposing writes through Raft (batched, or forwarded to the leader), and
//! linearizable read points (ReadIndex). Services reach Raft only through this handle;
//! membership changes are the cluster service's (`membership.rs`).

use openraft::async_runtime::WatchReceiver;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use aspen_client::protocol::{ClusterStatus, MemberStatus, RpcError};
use aspen_client::NodeTicket;
use aspen_kv::api::{
    ApplyError, Command, CommandResult, LeaseId, SystemTxn, WriteOp, WriteOutcome,
};
use aspen_kv::lessor::RenewError;
use aspen_kv::limits::MAX_BATCH_COMMANDS;
use aspen_kv::raft_types::StoredMembership;
use aspen_kv::{Member, NodeId, Raft, StateMachineStore};

use super::peers::Peers;
use super::proposer::{ProposeError, Proposer};
use super::raft_protocol::{LeaderLeaseCall, RaftRequest, RaftResponse};
use super::read_index::ReadIndexBatcher;
use super::{ticket_of, LEADER_CALL_TIMEOUT};

use crate::config::TestFault;

/// How long a request that finds no leader waits for an election to produce one: three of the
/// longest election timeouts (`aspen_kv::raft_config`), enough for a restarted node (which
/// runs an election before it leads) or a cluster whose leader just died, short enough that a
/// client of a cluster without a quorum hears so soon.
const ELECTION_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Most requests from callers not known to be allowed (a denial being confirmed, a federation
/// export check) that wait for an election at once, node-wide; more fail at once with "no
/// leader". Such a wait is what a legitimate caller needs after a full-cluster restart (its
/// grant is not replayed until a leader commits), but anyone can set one off: this bounds
/// what a flood of strangers during an election holds.
pub const MAX_STRANGER_ELECTION_WAITS: usize = 64;

/// See the module docs. Cheap to clone.
#[derive(Clone)]
pub struct ClusterHandle {
    /// This node's id and address, as the membership records them.
    pub id: NodeId,
    pub me: Member,
    pub raft: Raft,
    /// The replicated state machine (reads; writes go through [`ClusterHandle::propose`]).
    pub sm: StateMachineStore,
    pub(super) peers: Arc<Peers>,
    proposer: Proposer,
    reads: ReadIndexBatcher,
    /// A deliberate bug this node runs with (fault tests only).
    pub test_fault: Option<TestFault>,
    /// What the node measures (served by `--metrics`).
    pub metrics: Arc<super::metrics::NodeMetrics>,
    /// Election waits left for callers not known to be allowed
    /// ([`MAX_STRANGER_ELECTION_WAITS`]).
    stranger_waits: Arc<tokio::sync::Semaphore>,
}

/// The leader as this node knows it. openraft reports the node its last committed vote names
/// (`current_leader`), also when that is this node and it does not lead: a restarted leader
/// keeps its committed vote but, with leader restore off (`aspen_kv::raft_config`), leads
/// again only after winning an election. Counting it as the leader then would have it refuse
/// writes and membership changes while naming itself as the leader to ask, and a client
/// would ask it again and again; so this node counts only while it actually leads.
pub fn known_leader(current_leader: Option<NodeId>, leads: bool, me: NodeId) -> Option<NodeId> {
    match current_leader {
        Some(l) if l == me && !leads => None,
        other => other,
    }
}

impl ClusterHandle {
    pub(super) fn new(
        id: NodeId,
        me: Member,
        raft: Raft,
        sm: StateMachineStore,
        peers: Arc<Peers>,
        test_fault: Option<TestFault>,
    ) -> Self {
        let metrics = Arc::new(super::metrics::NodeMetrics::new(id, sm.metrics()));
        let proposer = Proposer::spawn(raft.clone(), sm.clone(), metrics.clone());
        let reads = {
            let reads = Arc::new(aspen_kv::ReadIndex::new(raft.clone()));
            ReadIndexBatcher::spawn(move || {
                let reads = reads.clone();
                async move { super::confirm_read_index(&reads).await }
            })
        };
        ClusterHandle {
            id,
            me,
            raft,
            sm,
            peers,
            proposer,
            reads,
            test_fault,
            metrics,
            stranger_waits: Arc::new(tokio::sync::Semaphore::new(MAX_STRANGER_ELECTION_WAITS)),
        }
    }

    /// The membership as this node last applied it.
    pub fn membership(&self) -> Arc<StoredMembership> {
        self.raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone()
    }

    pub fn node_ticket(&self) -> NodeTicket {
        ticket_of(&self.me)
    }

    pub fn members(&self) -> BTreeMap<NodeId, Member> {
        let m = self.membership();
        m.membership()
            .nodes()
            .map(|(id, n)| (*id, n.clone()))
            .collect()
    }

    /// The node keys of the current members (no copy of their addresses).
    pub fn member_keys(&self) -> Vec<[u8; 32]> {
        let m = self.membership();
        let keys = m.membership().nodes().map(|(_, n)| n.endpoint_id).collect();
        keys
    }

    /// Whether the membership includes this node.
    pub fn is_member(&self) -> bool {
        self.members().contains_key(&self.id)
    }

    pub fn leader(&self) -> Option<(NodeId, Member)> {
        let (id, membership) = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow_watched();
            (
                known_leader(metrics.current_leader, metrics.state.is_leader(), self.id)?,
                metrics.membership_config.clone(),
            )
        };
        let member = membership.membership().get_node(&id)?.clone();
        Some((id, member))
    }

    pub fn not_leader(&self) -> RpcError {
        RpcError::NotLeader {
            leader: self.leader().map(|(_, m)| ticket_of(&m)),
        }
    }

    pub fn is_leader(&self) -> bool {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow_watched();
        metrics.current_leader == Some(self.id) && metrics.state.is_leader()
    }

    /// Waits (at most [`ELECTION_WAIT`]) until this node knows a leader: a request that
    /// arrives during an election (a restarted node runs one before it leads) is served when
    /// the election ends instead of being refused at once. Returns at once when a leader is
    /// known or when this node is in no cluster (nothing will elect one), and after the wait
    /// whatever the outcome (the caller reports "no leader").
    async fn wait_for_leader(&self) {
        // The common case costs one read of the metrics (no membership lookup).
        let knows = |m: &openraft::metrics::RaftServerMetrics<aspen_kv::TypeConfig>| {
            known_leader(m.current_leader, m.state.is_leader(), self.id).is_some()
        };
        if knows(&self.raft.server_metrics().borrow_watched()) || !self.is_member() {
            return;
        }
        self.metrics.election_waits.inc();
        let _waiting = WaitingGauge::enter(&self.metrics.election_waiting);
        let mut metrics = self.raft.server_metrics();
        let known = async {
            loop {
                if knows(&metrics.borrow_watched()) {
                    return;
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(ELECTION_WAIT, known).await;
    }

    /// Proposes writes through the leader: locally if we lead, else forwarded once.
    pub async fn propose(&self, commands: Vec<Command>) -> Result<Vec<CommandResult>, RpcError> {
        self.wait_for_leader().await;
        if self.is_leader() {
            match self.proposer.propose(commands.clone()).await {
                Err(ProposeError::NotLeader(_)) => {} // Lost leadership meanwhile: forward below.
                other => return other.map_err(RpcError::from),
            }
        }
        match self.call_leader(RaftRequest::Forward(commands)).await? {
            RaftResponse::Forward(r) => r,
            other => Err(RpcError::Internal(format!(
                "unexpected forward response {other:?}"
            ))),
        }
    }

    /// One call to the leader (from a follower). Gives up as soon as this node sees the
    /// leadership change (the leader died or was deposed): the client retries against the
    /// new leader instead of waiting out the call's timeout.
    pub async fn call_leader(&self, request: RaftRequest) -> Result<RaftResponse, RpcError> {
        let Some((leader, member)) = self.leader() else {
            return Err(RpcError::Unavailable(
                "no leader (election in progress)".into(),
            ));
        };
        if leader == self.id {
            return Err(RpcError::Unavailable("leadership changing; retry".into()));
        }
        let mut metrics = self.raft.server_metrics();
        let leader_changed = async move {
            loop {
                if metrics.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if metrics.borrow_watched().current_leader != Some(leader) {
                    return;
                }
            }
        };
        tokio::select! {
            r = self.peers.call(&member, &request, LEADER_CALL_TIMEOUT) => {
                r.map_err(|e| RpcError::Unavailable(format!("leader unreachable: {e}")))
            }
            _ = leader_changed => Err(RpcError::Unavailable(format!(
                "leader {leader:016x} was replaced while serving this request; retry"
            ))),
        }
    }

    /// Waits until this node's state machine reflects every write acknowledged before the
    /// call began (ReadIndex through the leader). During an election, waits for it first
    /// (at most [`ELECTION_WAIT`]).
    pub async fn read_barrier(&self) -> Result<(), RpcError> {
        self.wait_for_leader().await;
        self.read_barrier_now().await
    }

    /// [`Self::read_barrier`] for a caller not known to be allowed (a denial being confirmed,
    /// a federation export check): waits for an election only while fewer than
    /// [`MAX_STRANGER_ELECTION_WAITS`] such callers wait, so a flood of strangers during an
    /// election holds a bounded number of tasks; the rest hear "no leader" at once.
    pub async fn read_barrier_for_stranger(&self) -> Result<(), RpcError> {
        if let Ok(_slot) = self.stranger_waits.try_acquire() {
            self.wait_for_leader().await;
        }
        self.read_barrier_now().await
    }

    /// [`Self::read_barrier`] without waiting for an election: with no leader known, fails
    /// at once.
    async fn read_barrier_now(&self) -> Result<(), RpcError> {
        if self.test_fault == Some(TestFault::StaleReads) {
            return Ok(());
        }
        if self.is_leader() {
            return self.leader_barrier().await;
        }
        let index = match self.call_leader(RaftRequest::ReadIndex).await? {
            RaftResponse::ReadIndex(r) => r?,
            other => {
                return Err(RpcError::Internal(format!(
                    "unexpected read-index response {other:?}"
                )))
            }
        };
        self.wait_applied(index).await
    }

    /// [`Self::read_barrier`] on the leader: never calls another node (so node-to-node
    /// handlers can use it).
    async fn leader_barrier(&self) -> Result<(), RpcError> {
        let index = self.read_index().await?;
        self.wait_applied(index).await
    }

    /// Waits until this node applied `index`.
    async fn wait_applied(&self, index: Option<u64>) -> Result<(), RpcError> {
        // Usually applied already: skip openraft's waiter (it clones metrics per check).
        let applied = self
            .raft
            .metrics()
            .borrow_watched()
            .last_applied
            .map(|l| l.index);
        if let Some(index) = index.filter(|i| applied < Some(*i)) {
            self.raft
                .wait(Some(LEADER_CALL_TIMEOUT))
                .applied_index_at_least(Some(index), "read barrier")
                .await
                .map_err(|e| {
                    RpcError::Unavailable(format!("waiting to apply index {index}: {e}"))
                })?;
        }
        Ok(())
    }

    /// Leader only: a read index confirmed with a quorum after this call began (concurrent
    /// callers share confirmation rounds).
    pub async fn read_index(&self) -> Result<Option<u64>, RpcError> {
        match self.reads.read_index().await {
            Err(RpcError::NotLeader { .. }) => Err(self.not_leader()),
            other => other,
        }
    }

    pub async fn status(&self) -> Result<ClusterStatus, RpcError> {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let committed = self
            .raft
            .with_raft_state(|st| st.local_committed().map(|l| l.index))
            .await
            .unwrap_or(None);
        let store = self.sm.status().await?;
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, m)| MemberStatus {
                node_id: *id,
                node: ticket_of(m),
                voter: voters.contains(id),
            })
            .collect::<Vec<_>>();
        Ok(ClusterStatus {
            node_id: self.id,
            initialized: !members.is_empty(),
            leader: known_leader(metrics.current_leader, metrics.state.is_leader(), self.id),
            term: metrics.current_term,
            commit_index: committed,
            applied_index: metrics.last_applied.map(|l| l.index),
            last_log_index: metrics.last_log_index,
            snapshot_index: metrics.snapshot.map(|l| l.index),
            revision: store.revision,
            compacted_revision: store.compacted,
            members,
            figures: self.metrics.figures(),
        })
    }

    /// Checks a batch of writes; `from_client`: refuse system writes (only members may).
    pub fn validate(commands: &[Command], from_client: bool) -> Result<(), RpcError> {
        if from_client && commands.iter().any(|c| c.op.is_system()) {
            return Err(RpcError::BadRequest(
                "the system key space cannot be written by clients".into(),
            ));
        }
        if commands.is_empty() {
            return Err(RpcError::BadRequest("no commands".into()));
        }
        if commands.len() > MAX_BATCH_COMMANDS {
            return Err(RpcError::BadRequest(format!(
                "{} commands exceed the limit of {MAX_BATCH_COMMANDS}",
                commands.len()
            )));
        }
        for c in commands {
            c.op.validate()?;
        }
        Ok(())
    }

    pub fn require_leader(&self) -> Result<(), RpcError> {
        if self.members().is_empty() {
            return Err(RpcError::NotInitialized);
        }
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        Ok(())
    }

    /// Proposes writes on this node, which must lead (a write forwarded by a follower).
    pub async fn propose_here(
        &self,
        commands: Vec<Command>,
    ) -> Result<Vec<CommandResult>, RpcError> {
        self.proposer
            .propose(commands)
            .await
            .map_err(RpcError::from)
    }

    /// A keep-alive of lease `id`, answered by the leader (forwarded there from a
    /// follower): its time to live in seconds. The leader renews the deadline first, then
    /// confirms its leadership with a quorum, and only then answers (see `aspen_kv::lessor`).
    pub async fn lease_keep_alive(&self, id: LeaseId) -> Result<u64, RpcError> {
        self.leader_lease_call(LeaderLeaseCall::KeepAlive(id)).await
    }

    /// Time left on lease `id` by the leader's clock, in milliseconds.
    pub async fn lease_remaining_ms(&self, id: LeaseId) -> Result<u64, RpcError> {
        self.leader_lease_call(LeaderLeaseCall::Remaining(id)).await
    }

    async fn leader_lease_call(&self, call: LeaderLeaseCall) -> Result<u64, RpcError> {
        self.wait_for_leader().await;
        if self.is_leader() {
            return self.lease_call_here(call).await;
        }
        match self.call_leader(RaftRequest::Lease(call)).await? {
            RaftResponse::Lease(r) => r,
            other => Err(RpcError::Internal(format!(
                "unexpected lease response {other:?}"
            ))),
        }
    }

    /// Answers a lease call on this node, which must lead.
    pub async fn lease_call_here(&self, call: LeaderLeaseCall) -> Result<u64, RpcError> {
        let lessor = self.sm.lessor();
        let now = tokio::time::Instant::now;
        let ask = || match call {
            LeaderLeaseCall::KeepAlive(id) => lessor.renew(id, now()).map(|ttl| ttl.as_secs()),
            LeaderLeaseCall::Remaining(id) => {
                if !lessor.is_leader() {
                    Err(RenewError::NotLeader)
                } else {
                    lessor
                        .remaining(id, now())
                        .map(|d| d.as_millis() as u64)
                        .ok_or(RenewError::NotFound(id))
                }
            }
        };
        let answer = match ask() {
            // A lease granted under an earlier leader may not be applied here yet: catch up
            // with what this leader committed, then ask again.
            Err(RenewError::NotFound(_)) => {
                self.leader_barrier().await?;
                ask()
            }
            other => other,
        };
        match answer {
            Ok(value) => {
                if let LeaderLeaseCall::KeepAlive(id) = call {
                    // Confirmed after the renewal, so no later leader was elected before it;
                    // and applied that far, so an expiry committed before it has removed the
                    // lease here (an acknowledged keep-alive of a lease whose keys are gone
                    // would be a lie).
                    self.leader_barrier().await?;
                    if lessor.remaining(id, now()).is_none() {
                        return Err(RpcError::Apply(ApplyError::LeaseNotFound { id }));
                    }
                }
                Ok(value)
            }
            Err(RenewError::NotFound(id)) => Err(RpcError::Apply(ApplyError::LeaseNotFound { id })),
            Err(RenewError::NotLeader) => Err(RpcError::Unavailable(
                "leadership changing (the lease clock is not running here yet); retry".into(),
            )),
        }
    }

    /// Proposes one system transaction; whether its conditions held (it applied).
    pub async fn propose_system_txn(&self, txn: SystemTxn) -> Result<bool, RpcError> {
        let results = self
            .propose(vec![Command {
                session: None,
                op: WriteOp::SystemTxn(txn),
            }])
            .await?;
        match results.into_iter().next() {
            Some(Ok(WriteOutcome::SystemTxn { applied, .. })) => Ok(applied),
            Some(Ok(other)) => Err(RpcError::Internal(format!(
                "unexpected outcome of a system transaction: {other:?}"
            ))),
            Some(Err(e)) => Err(RpcError::Internal(format!(
                "system transaction refused: {e}"
            ))),
            None => Err(RpcError::Internal(
                "no result for a system transaction".into(),
            )),
        }
    }
}

/// Counts a request in a gauge while it waits (also when its future is dropped).
struct WaitingGauge<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> WaitingGauge<'a> {
    fn enter(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        WaitingGauge(gauge)
    }
}

impl Drop for WaitingGauge<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::known_leader;

    /// A node whose last committed vote names itself counts as the leader only while it
    /// leads; any other node named is the leader as far as this node knows.
    #[test]
    fn a_restarted_leader_that_does_not_lead_names_no_leader() {
        assert_eq!(known_leader(Some(1), false, 1), None);
        assert_eq!(known_leader(Some(1), true, 1), Some(1));
        assert_eq!(known_leader(Some(2), false, 1), Some(2));
        assert_eq!(known_leader(None, false, 1), None);
    }
}
