//! etcd's Lock (`v3lockpb`) and Election (`v3electionpb`) services, for clients that use them
//! rather than the recipe (the Rust etcd-client's `lock` and `campaign` do; etcdctl does not).
//!
//! The node runs etcd's own recipe for the caller: each contender puts `NAME/<lease in hex>`
//! with its lease (once: a retry finds its key), contenders are ordered by the creation
//! revision of their keys, and one waits until no key of the name was created before its
//! own. Waiting re-reads the name's keys whenever the store's revision moves, so a waiter
//! costs one small read per write to the cluster; the lease keeps the key (a client gone for
//! good loses it when its lease ends).

use std::pin::Pin;

use aspen_client::protocol::{ClientRequest, Consistency, KvRequest};
use aspen_etcd_api::pb::mvccpb;
use aspen_etcd_api::pb::v3electionpb::{
    election_server::Election, CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest,
    LeaderResponse, ProclaimRequest, ProclaimResponse, ResignRequest, ResignResponse,
};
use aspen_etcd_api::pb::v3lockpb::{
    lock_server::Lock, LockRequest, LockResponse, UnlockRequest, UnlockResponse,
};
use aspen_etcd_api::range::to_pb;
use aspen_etcd_api::revision::{key_rev_from_etcd, key_rev_to_etcd};
use aspen_etcd_api::EtcdError;
use aspen_kv::api::{
    prefix_end, Compare, CompareOp, CompareTarget, Key, KeyValue, PutOptions,
    RangeRequest as StoreRange, Revision, Txn, TxnOp, WriteOp, WriteOutcome,
};
use aspen_kv::limits::MAX_RANGE_LIMIT;
use futures::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::super::auth::Caller;
use super::super::watch::WATCH_SEND_TIMEOUT;
use super::super::NodeState;
use super::{from_rpc, EtcdApi};

/// The most contenders of one name the node reads to find who is first.
const MAX_CONTENDERS: u64 = MAX_RANGE_LIMIT;

/// A contender's key: `NAME/<lease in hex>`.
fn contender_key(name: &[u8], lease: i64) -> Key {
    let mut key = name.to_vec();
    key.push(b'/');
    key.extend_from_slice(format!("{lease:x}").as_bytes());
    key
}

fn prefix_of(name: &[u8]) -> Key {
    let mut p = name.to_vec();
    p.push(b'/');
    p
}

impl NodeState {
    /// Puts the caller's contender key (with `value`, under `lease`) unless it exists, and
    /// returns it as stored, with the revision of the answer.
    async fn etcd_contend(
        &self,
        caller: &Caller,
        name: &[u8],
        lease: i64,
        value: Vec<u8>,
    ) -> Result<(KeyValue, Revision), EtcdError> {
        if name.is_empty() {
            return Err(EtcdError::EmptyKey);
        }
        let lease_id = u64::try_from(lease).map_err(|_| EtcdError::LeaseNotFound)?;
        let key = contender_key(name, lease);
        let txn = Txn {
            compare: vec![Compare {
                key: key.clone(),
                target: CompareTarget::CreateRevision(0),
                op: CompareOp::Equal,
            }],
            success: vec![TxnOp::PutWith {
                key: key.clone(),
                value,
                prev_kv: false,
                options: PutOptions {
                    lease: lease_id,
                    ..Default::default()
                },
            }],
            failure: vec![],
        };
        let outcome = self.etcd_write(caller, WriteOp::Txn(txn)).await?;
        let at = outcome.revision();
        let mine = self.cluster.sm.get(key, at).await?.ok_or_else(|| {
            EtcdError::Unavailable("the contender's key is gone (its lease ended)".into())
        })?;
        Ok((mine, at))
    }

    /// The name's contenders, oldest first, as of the current revision (after a read
    /// barrier), and that revision.
    async fn etcd_contenders(
        &self,
        caller: &Caller,
        name: &[u8],
    ) -> Result<(Vec<KeyValue>, Revision), EtcdError> {
        let prefix = prefix_of(name);
        let request = StoreRange {
            end: Some(prefix_end(&prefix)),
            start: prefix,
            limit: MAX_CONTENDERS,
            revision: 0,
        };
        self.etcd_authorize(
            &ClientRequest::Kv(KvRequest::Range {
                request: request.clone(),
                consistency: Consistency::Linearizable,
            }),
            caller,
        )
        .await?;
        self.cluster.read_barrier().await.map_err(from_rpc)?;
        let read = self.cluster.sm.range(request).await?;
        if read.more {
            // The oldest contender might be among those not read: refuse rather than guess.
            return Err(EtcdError::ResourceExhausted(format!(
                "more than {MAX_CONTENDERS} contenders for this name"
            )));
        }
        let mut kvs = read.kvs;
        kvs.sort_by_key(|kv| kv.create_revision);
        Ok((kvs, read.revision))
    }

    /// Waits until `mine` is the name's oldest contender. Fails if its key goes meanwhile.
    async fn etcd_wait_first(
        &self,
        caller: &Caller,
        name: &[u8],
        mine: &KeyValue,
    ) -> Result<(), EtcdError> {
        let mut revisions = self.cluster.sm.watch_revision();
        loop {
            let (contenders, seen) = self.etcd_contenders(caller, name).await?;
            match contenders.first() {
                Some(first)
                    if first.key == mine.key && first.create_revision == mine.create_revision =>
                {
                    return Ok(())
                }
                Some(_) if contenders.iter().any(|kv| kv.key == mine.key) => {}
                _ => {
                    return Err(EtcdError::Unavailable(
                        "the contender's key is gone (its lease ended)".into(),
                    ))
                }
            }
            revisions
                .wait_for(|r| *r > seen)
                .await
                .map_err(|_| EtcdError::Unavailable("the node is stopping".into()))?;
        }
    }

    /// If `leader` still leads (its key has the creation revision it had), applies `write`
    /// to its key; returns whether it did, and the answer's revision.
    async fn etcd_as_leader(
        &self,
        caller: &Caller,
        leader: &LeaderKey,
        write: TxnOp,
    ) -> Result<(bool, Revision), EtcdError> {
        let txn = Txn {
            compare: vec![Compare {
                key: leader.key.clone(),
                target: CompareTarget::CreateRevision(key_rev_from_etcd(leader.rev)?),
                op: CompareOp::Equal,
            }],
            success: vec![write],
            failure: vec![],
        };
        match self.etcd_write(caller, WriteOp::Txn(txn)).await? {
            WriteOutcome::Txn {
                revision,
                succeeded,
                ..
            } => Ok((succeeded, revision)),
            other => Err(EtcdError::Internal(format!(
                "a transaction was answered {other:?}"
            ))),
        }
    }
}

#[tonic::async_trait]
impl Lock for EtcdApi {
    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        self.call("etcd_lock", request, |node, caller, req| async move {
            let (mine, at) = node
                .etcd_contend(&caller, &req.name, req.lease, Vec::new())
                .await?;
            node.etcd_wait_first(&caller, &req.name, &mine).await?;
            Ok(LockResponse {
                header: Some(node.etcd_header(at).await),
                key: mine.key,
            })
        })
        .await
    }

    async fn unlock(
        &self,
        request: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        self.call("etcd_unlock", request, |node, caller, req| async move {
            if req.key.is_empty() {
                return Err(EtcdError::EmptyKey);
            }
            let outcome = node
                .etcd_write(
                    &caller,
                    WriteOp::Delete {
                        start: req.key,
                        end: None,
                        prev_kv: false,
                    },
                )
                .await?;
            Ok(UnlockResponse {
                header: Some(node.etcd_header(outcome.revision()).await),
            })
        })
        .await
    }
}

/// The answers of one Observe call.
type LeaderAnswers = Pin<Box<dyn Stream<Item = Result<LeaderResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Election for EtcdApi {
    async fn campaign(
        &self,
        request: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        self.call("etcd_campaign", request, |node, caller, req| async move {
            let (mut mine, mut at) = node
                .etcd_contend(&caller, &req.name, req.lease, req.value.clone())
                .await?;
            if mine.value != req.value {
                // Campaigning again with another value proclaims it (as etcd does).
                let leader = leader_key(&req.name, &mine);
                let (_, moved) = node
                    .etcd_as_leader(&caller, &leader, proclaim(&mine.key, req.value.clone()))
                    .await?;
                at = moved;
                mine.value = req.value;
            }
            node.etcd_wait_first(&caller, &req.name, &mine).await?;
            Ok(CampaignResponse {
                header: Some(node.etcd_header(at).await),
                leader: Some(leader_key(&req.name, &mine)),
            })
        })
        .await
    }

    async fn proclaim(
        &self,
        request: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        self.call("etcd_proclaim", request, |node, caller, req| async move {
            let leader = req.leader.ok_or(EtcdError::ElectionNotLeader)?;
            let (led, at) = node
                .etcd_as_leader(&caller, &leader, proclaim(&leader.key, req.value))
                .await?;
            if !led {
                return Err(EtcdError::ElectionNotLeader);
            }
            Ok(ProclaimResponse {
                header: Some(node.etcd_header(at).await),
            })
        })
        .await
    }

    async fn leader(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        self.call("etcd_leader", request, |node, caller, req| async move {
            let (contenders, at) = node.etcd_contenders(&caller, &req.name).await?;
            let first = contenders
                .into_iter()
                .next()
                .ok_or(EtcdError::ElectionNoLeader)?;
            Ok(LeaderResponse {
                header: Some(node.etcd_header(at).await),
                kv: Some(to_pb(first)),
            })
        })
        .await
    }

    async fn observe(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<LeaderAnswers>, Status> {
        let node = self.node()?;
        let caller = match self.caller(&node, request.metadata()) {
            Ok(c) => c,
            Err(e) => {
                node.cluster.metrics.etcd_refused.inc();
                return Err(e.status());
            }
        };
        let name = request.into_inner().name;
        // Checked once before the stream starts, so a refusal is the call's status.
        node.etcd_contenders(&caller, &name).await?;
        let (tx, mut rx) = mpsc::channel::<Result<LeaderResponse, Status>>(16);
        tokio::spawn(async move {
            let mut revisions = node.cluster.sm.watch_revision();
            let mut shown: Option<mvccpb::KeyValue> = None;
            loop {
                let (contenders, seen) = match node.etcd_contenders(&caller, &name).await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e.status())).await;
                        return;
                    }
                };
                if let Some(first) = contenders.into_iter().next() {
                    let kv = to_pb(first);
                    if shown.as_ref() != Some(&kv) {
                        let answer = LeaderResponse {
                            header: Some(node.etcd_header(seen).await),
                            kv: Some(kv.clone()),
                        };
                        match tokio::time::timeout(WATCH_SEND_TIMEOUT, tx.send(Ok(answer))).await {
                            Ok(Ok(())) => shown = Some(kv),
                            _ => return, // Gone, or not reading.
                        }
                    }
                }
                if revisions.wait_for(|r| *r > seen).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(futures::stream::poll_fn(
            move |cx| rx.poll_recv(cx),
        ))))
    }

    async fn resign(
        &self,
        request: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        self.call("etcd_resign", request, |node, caller, req| async move {
            let leader = req.leader.ok_or(EtcdError::ElectionNotLeader)?;
            let delete = TxnOp::Delete {
                start: leader.key.clone(),
                end: None,
                prev_kv: false,
            };
            let (_, at) = node.etcd_as_leader(&caller, &leader, delete).await?;
            Ok(ResignResponse {
                header: Some(node.etcd_header(at).await),
            })
        })
        .await
    }
}

fn leader_key(name: &[u8], kv: &KeyValue) -> LeaderKey {
    LeaderKey {
        name: name.to_vec(),
        key: kv.key.clone(),
        rev: key_rev_to_etcd(kv.create_revision),
        lease: kv.lease as i64,
    }
}

/// The leader's new value, its lease kept.
fn proclaim(key: &[u8], value: Vec<u8>) -> TxnOp {
    TxnOp::PutWith {
        key: key.to_vec(),
        value,
        prev_kv: false,
        options: PutOptions {
            ignore_lease: true,
            ..Default::default()
        },
    }
}
