//! etcd's KV service: Range, Put, DeleteRange, Txn and Compact.

use aspen_client::protocol::{ClientRequest, Consistency, KvRequest, KvResponse};
use aspen_etcd_api::pb::etcdserverpb::{
    kv_server::Kv, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    PutRequest, PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use aspen_etcd_api::range::{RangeAnswer, RangePlan};
use aspen_etcd_api::revision::{self, ReadAt};
use aspen_etcd_api::txn::{self, ReadState, TxnPlan};
use aspen_etcd_api::EtcdError;
use aspen_kv::api::{
    Command, Compare, KeyValue, LimitError, RangeRequest as StoreRange, Revision, WriteOp,
    WriteOutcome,
};
use aspen_kv::limits::{MAX_COMPARE_RANGE_KEYS, MAX_RANGE_LIMIT};

use super::super::auth::Caller;
use super::super::NodeState;
use super::{from_rpc, EtcdApi};

/// The most key and value bytes one range answer carries (etcd has no limit of its own but
/// gRPC's message size); a larger answer is refused: ask with a limit and page.
pub const MAX_RANGE_ANSWER_BYTES: usize = 64 * 1024 * 1024;

#[tonic::async_trait]
impl Kv for EtcdApi {
    async fn range(
        &self,
        request: tonic::Request<RangeRequest>,
    ) -> Result<tonic::Response<RangeResponse>, tonic::Status> {
        self.call("etcd_range", request, |node, caller, req| async move {
            let plan = RangePlan::new(&req)?;
            let consistency = if plan.serializable {
                Consistency::Serializable
            } else {
                Consistency::Linearizable
            };
            node.etcd_authorize(&range_probe(&plan, consistency), &caller)
                .await?;
            if !plan.serializable {
                node.cluster.read_barrier().await.map_err(from_rpc)?;
            }
            let answer = node.etcd_range(&plan, plan.at).await?;
            let header = node.etcd_header(node.applied_revision()).await;
            Ok(RangeResponse {
                header: Some(header),
                kvs: answer.kvs,
                more: answer.more,
                count: answer.count,
            })
        })
        .await
    }

    async fn put(
        &self,
        request: tonic::Request<PutRequest>,
    ) -> Result<tonic::Response<PutResponse>, tonic::Status> {
        self.call("etcd_put", request, |node, caller, req| async move {
            let outcome = node.etcd_write(&caller, txn::put(&req)?).await?;
            let header = node.etcd_header(outcome.revision()).await;
            Ok(txn::put_response(outcome, header))
        })
        .await
    }

    async fn delete_range(
        &self,
        request: tonic::Request<DeleteRangeRequest>,
    ) -> Result<tonic::Response<DeleteRangeResponse>, tonic::Status> {
        self.call(
            "etcd_delete_range",
            request,
            |node, caller, req| async move {
                let outcome = node.etcd_write(&caller, txn::delete(&req)?).await?;
                let header = node.etcd_header(outcome.revision()).await;
                Ok(txn::delete_response(outcome, header))
            },
        )
        .await
    }

    async fn txn(
        &self,
        request: tonic::Request<TxnRequest>,
    ) -> Result<tonic::Response<TxnResponse>, tonic::Status> {
        self.call("etcd_txn", request, |node, caller, req| async move {
            node.etcd_txn(&caller, &req).await
        })
        .await
    }

    async fn compact(
        &self,
        request: tonic::Request<CompactionRequest>,
    ) -> Result<tonic::Response<CompactionResponse>, tonic::Status> {
        self.call("etcd_compact", request, |node, caller, req| async move {
            let revision = revision::compact_from_etcd(req.revision)?;
            let outcome = node
                .etcd_write(&caller, WriteOp::Compact { revision })
                .await?;
            let header = node.etcd_header(outcome.revision()).await;
            Ok(CompactionResponse {
                header: Some(header),
            })
        })
        .await
    }
}

/// The Aspen read a range amounts to, for the access check.
fn range_probe(plan: &RangePlan, consistency: Consistency) -> ClientRequest {
    ClientRequest::Kv(KvRequest::Range {
        request: StoreRange {
            start: plan.start.clone(),
            end: plan.end.clone(),
            limit: 0,
            revision: 0,
        },
        consistency,
    })
}

impl NodeState {
    /// Commits one write for `caller` (checked as the Aspen request would be) and returns
    /// what it did.
    pub(super) async fn etcd_write(
        &self,
        caller: &Caller,
        op: WriteOp,
    ) -> Result<WriteOutcome, EtcdError> {
        let request = KvRequest::Write {
            commands: vec![Command { session: None, op }],
        };
        match self.etcd_kv(caller, request).await? {
            KvResponse::Write { mut results } if results.len() == 1 => {
                Ok(results.pop().expect("one result")?)
            }
            other => Err(EtcdError::Internal(format!(
                "a write was answered with {other:?}"
            ))),
        }
    }

    /// Serves one key-value request for `caller`, checked as on the Aspen protocol.
    pub(super) async fn etcd_kv(
        &self,
        caller: &Caller,
        request: KvRequest,
    ) -> Result<KvResponse, EtcdError> {
        let request = ClientRequest::Kv(request);
        self.etcd_authorize(&request, caller).await?;
        let ClientRequest::Kv(request) = request else {
            unreachable!("built above")
        };
        let access = self.auth.access(
            caller,
            self.cluster.member_keys(),
            super::super::identity::unix_now(),
        );
        self.kv.handle(request, &access).await.map_err(from_rpc)
    }

    /// Reads what `plan` asks for at `at`, as etcd answers it. Access is the caller's job.
    async fn etcd_range(&self, plan: &RangePlan, at: ReadAt) -> Result<RangeAnswer, EtcdError> {
        let sm = &self.cluster.sm;
        let revision = match at {
            ReadAt::Current => 0,
            ReadAt::Store(r) => r,
            ReadAt::Empty => {
                // Nothing exists in the empty store, unless it was compacted away.
                if sm.status().await?.compacted > 0 {
                    return Err(EtcdError::Compacted);
                }
                return Ok(plan.finish(Vec::new(), 0));
            }
        };
        let whole = |revision| StoreRange {
            start: plan.start.clone(),
            end: plan.end.clone(),
            limit: 0,
            revision,
        };
        if plan.count_only {
            let (count, _) = sm.count(whole(revision)).await?;
            return Ok(plan.finish(Vec::new(), count));
        }
        let wanted = plan.keys_to_read();
        let (kvs, complete, read_at) = self.etcd_read_keys(&whole(revision), wanted).await?;
        let count = if complete {
            kvs.len() as u64
        } else {
            sm.count(whole(read_at)).await?.0
        };
        Ok(plan.finish(kvs, count))
    }

    /// The first `wanted` keys (all: `None`) of `plan`'s range at `revision` (0: current),
    /// in key order, bounded like any range answer; whether that is the whole range, and the
    /// revision read.
    async fn etcd_read_keys(
        &self,
        range: &StoreRange,
        wanted: Option<u64>,
    ) -> Result<(Vec<KeyValue>, bool, Revision), EtcdError> {
        let mut kvs = Vec::new();
        let mut bytes = 0usize;
        let mut page = range.clone();
        let complete = loop {
            let left = wanted.map_or(MAX_RANGE_LIMIT, |w| {
                (w - kvs.len() as u64).min(MAX_RANGE_LIMIT)
            });
            page.limit = left;
            let read = self.cluster.sm.range(page.clone()).await?;
            // Every later page reads at the first page's revision.
            page.revision = read.revision;
            for kv in read.kvs {
                bytes += kv.key.len() + kv.value.len();
                if bytes > MAX_RANGE_ANSWER_BYTES {
                    return Err(EtcdError::ResourceExhausted(format!(
                        "the range holds more than {MAX_RANGE_ANSWER_BYTES} bytes: read it in \
                         pages (a limit, then the next key on)"
                    )));
                }
                kvs.push(kv);
            }
            if !read.more {
                break true;
            }
            if wanted.is_some_and(|w| kvs.len() as u64 >= w) {
                break false;
            }
            let Some(last) = kvs.last() else {
                break true;
            };
            let mut next = last.key.clone();
            next.push(0);
            page.start = next;
        };
        Ok((kvs, complete, page.revision))
    }

    async fn etcd_txn(&self, caller: &Caller, req: &TxnRequest) -> Result<TxnResponse, EtcdError> {
        let plan = TxnPlan::new(req)?;
        // Every read of every branch is checked before anything is written.
        for range in plan.all_reads() {
            self.etcd_authorize(&range_probe(range, Consistency::Linearizable), caller)
                .await?;
        }
        if plan.read_only() {
            return self.etcd_read_only_txn(caller, &plan).await;
        }
        let outcome = self.etcd_write(caller, plan.write_op()).await?;
        let at = outcome.revision();
        let mut changed = false;
        changed_anything(&outcome, &mut changed);
        let before: Revision = if changed { at - 1 } else { at };
        self.etcd_txn_answer(&plan, &outcome, before).await
    }

    /// etcd's answer to a transaction the store ran (`outcome`; `before`: the revision it
    /// started from): the reads of the path taken, each at the state it sees.
    async fn etcd_txn_answer(
        &self,
        plan: &TxnPlan,
        outcome: &WriteOutcome,
        before: Revision,
    ) -> Result<TxnResponse, EtcdError> {
        let at = outcome.revision();
        let read_at = |r: Revision| {
            if r == 0 {
                ReadAt::Empty
            } else {
                ReadAt::Store(r)
            }
        };
        let reads = plan.taken_reads(outcome)?;
        let mut answers = Vec::with_capacity(reads.len());
        for read in &reads {
            let range = read.plan;
            let answer = match (&range.at, &read.state) {
                (ReadAt::Current, ReadState::Before) => {
                    self.etcd_range(range, read_at(before)).await?
                }
                (ReadAt::Current, ReadState::After) => self.etcd_range(range, read_at(at)).await?,
                (ReadAt::Current, ReadState::Between(written)) => {
                    let pre = self.etcd_read_all(range, read_at(before)).await?;
                    let post = self.etcd_read_all(range, read_at(at)).await?;
                    let halfway = txn::overlay(pre, post, written);
                    let count = halfway.len() as u64;
                    range.finish(halfway, count)
                }
                (explicit, _) => self.etcd_range(range, *explicit).await?,
            };
            answers.push(answer);
        }
        let mut response = plan.response(outcome, before, answers)?;
        response.header = Some(self.etcd_header(at).await);
        Ok(response)
    }

    /// A transaction that only compares and reads, served as etcd serves one: after a read
    /// barrier (none if etcd would serve it serializably), every comparison and read at one
    /// revision, and nothing through the log.
    async fn etcd_read_only_txn(
        &self,
        caller: &Caller,
        plan: &TxnPlan,
    ) -> Result<TxnResponse, EtcdError> {
        // The comparisons need the access they need through the log.
        let as_write = ClientRequest::Kv(KvRequest::Write {
            commands: vec![Command {
                session: None,
                op: plan.write_op(),
            }],
        });
        self.etcd_authorize(&as_write, caller).await?;
        if !plan.serializable() {
            self.cluster.read_barrier().await.map_err(from_rpc)?;
        }
        let at = self.applied_revision();
        // The path, as the store would take it: a child comes after its parent.
        let mut taken: Vec<Option<bool>> = vec![None; plan.tree.nodes.len()];
        taken[0] = Some(true);
        for j in 0..taken.len() {
            if taken[j].is_none() {
                continue;
            }
            let mut succeeded = true;
            for (c, end) in plan.compares(j) {
                if !self.etcd_compare_holds(c, end, at).await? {
                    succeeded = false;
                    break;
                }
            }
            taken[j] = Some(succeeded);
            for i in plan.nested_in(j, succeeded) {
                taken[i] = Some(true);
            }
        }
        let outcome = plan.read_only_outcome(at, &taken)?;
        self.etcd_txn_answer(plan, &outcome, at).await
    }

    /// Whether comparison `c` holds at `revision`: for its key, or, with a range `end`, for
    /// every key of `[key, end)` then (an absent key if none), as the store evaluates it.
    async fn etcd_compare_holds(
        &self,
        c: &Compare,
        end: Option<&[u8]>,
        revision: Revision,
    ) -> Result<bool, EtcdError> {
        if revision == 0 {
            return Ok(c.holds(None));
        }
        let range = StoreRange {
            start: c.key.clone(),
            end: end.map(<[u8]>::to_vec),
            limit: 0,
            revision,
        };
        let (kvs, _, _) = self
            .etcd_read_keys(&range, Some(MAX_COMPARE_RANGE_KEYS as u64 + 1))
            .await?;
        if kvs.len() > MAX_COMPARE_RANGE_KEYS {
            return Err(LimitError::CompareRangeTooLarge {
                max: MAX_COMPARE_RANGE_KEYS,
            }
            .into());
        }
        if kvs.is_empty() {
            return Ok(c.holds(None));
        }
        Ok(kvs.iter().all(|kv| c.holds(Some(kv))))
    }

    /// Every key of `plan`'s range at `at`, in key order (bounded like any range answer).
    async fn etcd_read_all(
        &self,
        plan: &RangePlan,
        at: ReadAt,
    ) -> Result<Vec<KeyValue>, EtcdError> {
        let revision = match at {
            ReadAt::Empty => return Ok(Vec::new()),
            ReadAt::Current => 0,
            ReadAt::Store(r) => r,
        };
        let range = StoreRange {
            start: plan.start.clone(),
            end: plan.end.clone(),
            limit: 0,
            revision,
        };
        Ok(self.etcd_read_keys(&range, None).await?.0)
    }
}

/// Whether any write of a transaction's outcome changed the store.
fn changed_anything(outcome: &WriteOutcome, any: &mut bool) {
    match outcome {
        WriteOutcome::Put { .. } => *any = true,
        WriteOutcome::Delete { deleted, .. } => *any |= *deleted > 0,
        WriteOutcome::Txn { results, .. } => {
            for r in results {
                changed_anything(r, any);
            }
        }
        _ => {}
    }
}
