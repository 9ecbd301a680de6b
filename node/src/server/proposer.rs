//! Groups concurrent client writes into one Raft entry (one fsync for all of them).
//!
//! A single task takes the first waiting proposal, waits for an in-flight slot, then drains
//! whatever else queued up meanwhile (within the batch limits) and submits it as one entry.
//! Under load the queue fills while earlier entries commit, so batches grow on their own; with
//! one client a write is proposed at once, with no timer.

use std::sync::Arc;

use aspen_client::protocol::RpcError;
use aspen_kv::api::{Batch, Command, CommandResult};
use aspen_kv::limits::{MAX_BATCH_BYTES, MAX_BATCH_COMMANDS};
use aspen_kv::{Raft, StateMachineStore};
use openraft::error::ClientWriteError;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::metrics::NodeMetrics;

/// Raft entries proposed but not yet applied, at most.
const MAX_IN_FLIGHT_BATCHES: usize = 2;
/// Proposals waiting to be batched, at most (back-pressure beyond this).
const QUEUE_DEPTH: usize = 16 * 1024;

/// What a proposal can fail with.
#[derive(Debug)]
pub enum ProposeError {
    /// This node is not the leader (any more); the leader's id if known.
    NotLeader(Option<aspen_kv::NodeId>),
    Unavailable(String),
}

impl From<ProposeError> for RpcError {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::NotLeader(_) => RpcError::Unavailable("leadership changed; retry".into()),
            ProposeError::Unavailable(why) => RpcError::Unavailable(why),
        }
    }
}

struct Proposal {
    commands: Vec<Command>,
    bytes: usize,
    reply: oneshot::Sender<Result<Vec<CommandResult>, ProposeError>>,
}

/// Handle to the batching task.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Proposal>,
}

impl Proposer {
    pub fn spawn(raft: Raft, sm: StateMachineStore, metrics: Arc<NodeMetrics>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(run(raft, sm, metrics, rx));
        Proposer { tx }
    }

    /// Proposes `commands` (already validated) and waits for their results.
    pub async fn propose(
        &self,
        commands: Vec<Command>,
    ) -> Result<Vec<CommandResult>, ProposeError> {
        let bytes = commands.iter().map(|c| c.op.payload_bytes()).sum();
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Proposal {
                commands,
                bytes,
                reply,
            })
            .await
            .map_err(|_| ProposeError::Unavailable("node is shutting down".into()))?;
        rx.await
            .map_err(|_| ProposeError::Unavailable("node is shutting down".into()))?
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn run(
    raft: Raft,
    sm: StateMachineStore,
    metrics: Arc<NodeMetrics>,
    mut rx: mpsc::Receiver<Proposal>,
) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BATCHES));
    // Proposal ids: a random per-boot nonce and a counter, so a waiter never matches a batch
    // proposed by another node or by an earlier run of this one.
    let nonce = u128::from(rand::random::<u64>() | 1) << 64;
    let mut counter: u128 = 0;
    let mut carry: Option<Proposal> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (mut count, mut bytes) = (first.commands.len(), first.bytes);
        let mut group = vec![first];
        while let Ok(next) = rx.try_recv() {
            if count + next.commands.len() > MAX_BATCH_COMMANDS
                || bytes + next.bytes > MAX_BATCH_BYTES
            {
                carry = Some(next);
                break;
            }
            count += next.commands.len();
            bytes += next.bytes;
            group.push(next);
        }
        let mut commands = Vec::with_capacity(count);
        let mut replies = Vec::with_capacity(group.len());
        for p in group {
            replies.push((p.commands.len(), p.reply));
            commands.extend(p.commands);
        }
        tracing::trace!(
            commands = count,
            proposals = replies.len(),
            "proposing a batch"
        );
        metrics.proposal_commands.observe(count as f64);
        counter += 1;
        let proposal = nonce | counter;
        // The state machine answers as soon as the batch is applied; openraft's own answer
        // comes later (its core waits for the next append's fsync first) or reports failure.
        let mut applied = sm.watch_proposal(proposal);
        // Submitted in order from this one task; only the wait for the result is spawned.
        let (responder, _committed, rx) = openraft::impls::ProgressResponder::new();
        let submitted = raft
            .client_write_ff(
                Batch {
                    proposed_at_ms: now_ms(),
                    proposal,
                    commands,
                },
                Some(responder),
            )
            .await
            .map(|()| rx);
        let sm = sm.clone();
        tokio::spawn(async move {
            let outcome = match submitted {
                Err(fatal) => Err(format!("raft stopped: {fatal}")),
                Ok(rx) => tokio::select! {
                    biased;
                    Ok(results) = &mut applied => {
                        tracing::trace!(proposal = %proposal, "answered at apply");
                        Ok(results)
                    }
                    r = rx => match r {
                    Err(_) => Err("raft dropped the proposal".to_string()),
                    Ok(Ok(resp)) => Ok(resp.data.results),
                    Ok(Err(ClientWriteError::ForwardToLeader(f))) => {
                        sm.forget_proposal(proposal);
                        for (_, reply) in replies {
                            let _ = reply.send(Err(ProposeError::NotLeader(f.leader_id)));
                        }
                        drop(slot);
                        return;
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    },
                },
            };
            sm.forget_proposal(proposal);
            match outcome {
                Ok(results) => {
                    let mut results = results.into_iter();
                    for (n, reply) in replies {
                        let _ = reply.send(Ok(results.by_ref().take(n).collect()));
                    }
                }
                Err(why) => {
                    for (_, reply) in replies {
                        let _ = reply.send(Err(ProposeError::Unavailable(why.clone())));
                    }
                }
            }
            drop(slot);
        });
    }
}
