//! etcd's writes and transactions as the store's commands.
//!
//! Puts, deletes and the writes of a transaction map one to one onto the store's. A
//! transaction's compares map too, with revisions renumbered (see [`crate::revision`]), and
//! nested transactions become the nodes of a [`TxnTree`], which the store runs as etcd does:
//! every comparison on the path sees the state before the transaction, and the path's writes
//! happen at one revision R. A comparison with a range end becomes a [`CompareRange`] of the
//! tree.
//!
//! The reads inside a transaction do not go through the log: the node reads them once the
//! transaction is applied, in the order etcd runs the path's operations. A read before every
//! write of the path sees the state at R - 1 (or R if the writes changed nothing), one after
//! every write sees R. A read between two writes sees R - 1 with what the writes before it
//! made of their keys laid over it: a put key is written by no other write of the path, and
//! deletes are idempotent, so each of those keys is as it is at R, and every other key as at
//! R - 1 ([`overlay`]).

use aspen_kv::api::{
    Compare, CompareOp, CompareRange, CompareTarget, Key, KeyValue, PutOptions, Revision, Txn,
    TxnOp, TxnTree, WriteOp, WriteOutcome,
};
use aspen_kv::limits::MAX_TXN_OPS;

use crate::pb::etcdserverpb::compare::{CompareResult, CompareTarget as PbTarget, TargetUnion};
use crate::pb::etcdserverpb::request_op::Request;
use crate::pb::etcdserverpb::response_op::Response;
use crate::pb::etcdserverpb::{
    Compare as PbCompare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use crate::range::{key_range, to_pb, RangeAnswer, RangePlan};
use crate::revision;
use crate::EtcdError;

/// The store's put for etcd's put request.
pub fn put(req: &PutRequest) -> Result<WriteOp, EtcdError> {
    let (key, value, prev_kv, options) = put_parts(req)?;
    Ok(WriteOp::PutWith {
        key,
        value,
        prev_kv,
        options,
    })
}

fn put_parts(req: &PutRequest) -> Result<(Key, Vec<u8>, bool, PutOptions), EtcdError> {
    if req.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    if req.ignore_value && !req.value.is_empty() {
        return Err(EtcdError::ValueProvided);
    }
    if req.ignore_lease && req.lease != 0 {
        return Err(EtcdError::LeaseProvided);
    }
    let lease = u64::try_from(req.lease).map_err(|_| EtcdError::LeaseNotFound)?;
    Ok((
        req.key.clone(),
        req.value.clone(),
        req.prev_kv,
        PutOptions {
            lease,
            ignore_value: req.ignore_value,
            ignore_lease: req.ignore_lease,
        },
    ))
}

/// The store's delete for etcd's delete-range request.
pub fn delete(req: &DeleteRangeRequest) -> Result<WriteOp, EtcdError> {
    if req.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    let (start, end) = key_range(&req.key, &req.range_end);
    Ok(WriteOp::Delete {
        start,
        end,
        prev_kv: req.prev_kv,
    })
}

/// etcd's answer to a put, from the store's outcome.
pub fn put_response(outcome: WriteOutcome, header: ResponseHeader) -> PutResponse {
    let prev_kv = match outcome {
        WriteOutcome::Put { prev, .. } => prev.map(to_pb),
        _ => None,
    };
    PutResponse {
        header: Some(header),
        prev_kv,
    }
}

/// etcd's answer to a delete, from the store's outcome.
pub fn delete_response(outcome: WriteOutcome, header: ResponseHeader) -> DeleteRangeResponse {
    let (deleted, prev_kvs) = match outcome {
        WriteOutcome::Delete { deleted, prev, .. } => {
            (deleted as i64, prev.into_iter().map(to_pb).collect())
        }
        _ => (0, Vec::new()),
    };
    DeleteRangeResponse {
        header: Some(header),
        deleted,
        prev_kvs,
    }
}

/// One operation of a branch, in etcd's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    /// The store operation at this index of the branch: a write, or a nested transaction.
    Op(usize),
    /// A read, answered after the transaction is applied.
    Range(Box<RangePlan>),
}

/// Where etcd's operations of one transaction (a node of the tree) went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSlots {
    pub success: Vec<Slot>,
    pub failure: Vec<Slot>,
}

/// A transaction as the store runs it, and where each of etcd's operations went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnPlan {
    /// `tree.nodes[0]` is the request itself; nested transactions follow their parents.
    pub tree: TxnTree,
    /// Per node of `tree`.
    pub slots: Vec<NodeSlots>,
}

/// The state a read inside a transaction sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadState {
    /// The state the transaction started from.
    Before,
    /// The transaction's revision: every write of the path came before the read.
    After,
    /// The state before, with the keys these writes (`[start, end)`, `None` end: unbounded)
    /// touched as they are at the transaction's revision: see [`overlay`].
    Between(Vec<(Key, Option<Key>)>),
}

/// A read of the path the transaction took, in etcd's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TakenRead<'a> {
    pub plan: &'a RangePlan,
    pub state: ReadState,
    /// Whether a write before it changed the store: etcd's header then names the
    /// transaction's revision, else the one it started from.
    pub after_a_change: bool,
}

impl TxnPlan {
    pub fn new(req: &TxnRequest) -> Result<TxnPlan, EtcdError> {
        let mut plan = TxnPlan {
            tree: TxnTree::default(),
            slots: Vec::new(),
        };
        plan.add(req)?;
        Ok(plan)
    }

    /// Adds `req` and its nested transactions (each after its parent); returns its index.
    /// Recursion is bounded by the decoder's nesting limit and by [`MAX_TXN_OPS`] nodes.
    fn add(&mut self, req: &TxnRequest) -> Result<u32, EtcdError> {
        if [req.compare.len(), req.success.len(), req.failure.len()]
            .iter()
            .any(|n| *n > MAX_TXN_OPS)
            || self.tree.nodes.len() >= MAX_TXN_OPS
        {
            return Err(EtcdError::TooManyOps);
        }
        let index = self.tree.nodes.len();
        let mut compares = Vec::with_capacity(req.compare.len());
        for (i, c) in req.compare.iter().enumerate() {
            let (c, end) = compare(c)?;
            if let Some(end) = end {
                self.tree.ranges.push(CompareRange {
                    node: index as u32,
                    compare: i as u32,
                    end,
                });
            }
            compares.push(c);
        }
        let compare = compares;
        self.tree.nodes.push(Txn {
            compare,
            success: Vec::new(),
            failure: Vec::new(),
        });
        self.slots.push(NodeSlots::default());
        let success = self.branch(&req.success)?;
        let failure = self.branch(&req.failure)?;
        self.tree.nodes[index].success = success.0;
        self.tree.nodes[index].failure = failure.0;
        self.slots[index] = NodeSlots {
            success: success.1,
            failure: failure.1,
        };
        Ok(index as u32)
    }

    fn branch(&mut self, ops: &[RequestOp]) -> Result<(Vec<TxnOp>, Vec<Slot>), EtcdError> {
        let mut store_ops = Vec::new();
        let mut slots = Vec::new();
        for op in ops {
            let store_op = match &op.request {
                Some(Request::RequestPut(p)) => {
                    let (key, value, prev_kv, options) = put_parts(p)?;
                    TxnOp::PutWith {
                        key,
                        value,
                        prev_kv,
                        options,
                    }
                }
                Some(Request::RequestDeleteRange(d)) => {
                    let WriteOp::Delete {
                        start,
                        end,
                        prev_kv,
                    } = delete(d)?
                    else {
                        unreachable!("delete() makes a delete")
                    };
                    TxnOp::Delete {
                        start,
                        end,
                        prev_kv,
                    }
                }
                Some(Request::RequestTxn(t)) => TxnOp::Nested(self.add(t)?),
                Some(Request::RequestRange(r)) => {
                    slots.push(Slot::Range(Box::new(RangePlan::new(r)?)));
                    continue;
                }
                None => {
                    return Err(EtcdError::InvalidArgument(
                        "a transaction operation names no request".into(),
                    ))
                }
            };
            slots.push(Slot::Op(store_ops.len()));
            store_ops.push(store_op);
        }
        Ok((store_ops, slots))
    }

    /// The store's command: a plain transaction unless there are nested ones or
    /// comparisons over key ranges.
    pub fn write_op(&self) -> WriteOp {
        match (self.tree.nodes.as_slice(), self.tree.ranges.is_empty()) {
            ([one], true) => WriteOp::Txn(one.clone()),
            _ => WriteOp::TxnTree(self.tree.clone()),
        }
    }

    /// Whether no node writes (the transaction only compares and reads).
    pub fn read_only(&self) -> bool {
        self.tree.nodes.iter().all(|n| {
            n.success
                .iter()
                .chain(&n.failure)
                .all(|op| matches!(op, TxnOp::Nested(_)))
        })
    }

    /// Whether etcd would serve this transaction from the member's own state, without a read
    /// barrier: every operation of both outer branches is a serializable read (etcd's
    /// `isTxnSerializable`, which does not look into nested transactions).
    pub fn serializable(&self) -> bool {
        let root = &self.slots[0];
        root.success
            .iter()
            .chain(&root.failure)
            .all(|s| matches!(s, Slot::Range(r) if r.serializable))
    }

    /// The comparisons of node `node`, each with the end of its key range if it has one.
    pub fn compares(&self, node: usize) -> impl Iterator<Item = (&Compare, Option<&[u8]>)> {
        self.tree.nodes[node]
            .compare
            .iter()
            .enumerate()
            .map(move |(i, c)| {
                let end = self
                    .tree
                    .ranges
                    .iter()
                    .find(|r| r.node as usize == node && r.compare as usize == i)
                    .map(|r| r.end.as_slice());
                (c, end)
            })
    }

    /// The nested transactions (node indexes) that node `node`'s branch runs.
    pub fn nested_in(&self, node: usize, succeeded: bool) -> impl Iterator<Item = usize> + '_ {
        self.branch_taken(node, succeeded)
            .0
            .iter()
            .filter_map(|op| match op {
                TxnOp::Nested(i) => Some(*i as usize),
                _ => None,
            })
    }

    /// The store's outcome of a transaction that writes nothing ([`Self::read_only`]), from
    /// the branch each node took (`None`: it did not run), as the store would answer it.
    pub fn read_only_outcome(
        &self,
        revision: Revision,
        taken: &[Option<bool>],
    ) -> Result<WriteOutcome, EtcdError> {
        let n = self.tree.nodes.len();
        if taken.len() != n || !self.read_only() {
            return Err(EtcdError::Internal(
                "a read-only outcome for another transaction".into(),
            ));
        }
        // Bottom up: children come after their parents.
        let mut outcomes: Vec<Option<WriteOutcome>> = vec![None; n];
        for j in (0..n).rev() {
            let Some(succeeded) = taken[j] else {
                continue;
            };
            let mut results = Vec::new();
            for i in self.nested_in(j, succeeded) {
                results.push(outcomes[i].take().ok_or_else(|| {
                    EtcdError::Internal(format!("nested transaction {i} did not run"))
                })?);
            }
            outcomes[j] = Some(WriteOutcome::Txn {
                revision,
                succeeded,
                results,
            });
        }
        outcomes[0]
            .take()
            .ok_or_else(|| EtcdError::Internal("the outer transaction did not run".into()))
    }

    /// Every read of every branch (for the access check, before anything is written).
    pub fn all_reads(&self) -> impl Iterator<Item = &RangePlan> {
        self.slots
            .iter()
            .flat_map(|n| n.success.iter().chain(&n.failure))
            .filter_map(|s| match s {
                Slot::Range(r) => Some(&**r),
                Slot::Op(_) => None,
            })
    }

    /// The reads of the path the store took (its `outcome`), in etcd's order, and the
    /// state each one sees.
    pub fn taken_reads(&self, outcome: &WriteOutcome) -> Result<Vec<TakenRead<'_>>, EtcdError> {
        let mut walk = Walk::default();
        self.walk(0, outcome, &mut walk)?;
        let total = walk.writes.len();
        Ok(walk
            .reads
            .into_iter()
            .map(|(plan, writes_before, after_a_change)| TakenRead {
                plan,
                state: if writes_before == 0 {
                    ReadState::Before
                } else if writes_before == total {
                    ReadState::After
                } else {
                    ReadState::Between(walk.writes[..writes_before].to_vec())
                },
                after_a_change,
            })
            .collect())
    }

    fn walk<'a>(
        &'a self,
        node: usize,
        outcome: &WriteOutcome,
        walk: &mut Walk<'a>,
    ) -> Result<(), EtcdError> {
        let (succeeded, results) = txn_outcome(outcome)?;
        let (ops, slots) = self.branch_taken(node, succeeded);
        for slot in slots {
            match slot {
                Slot::Range(plan) => walk.reads.push((plan, walk.writes.len(), walk.changed)),
                Slot::Op(k) => {
                    let result = results.get(*k).ok_or_else(|| missing(*k))?;
                    match &ops[*k] {
                        TxnOp::Nested(i) => self.walk(*i as usize, result, walk)?,
                        TxnOp::Put { key, .. } | TxnOp::PutWith { key, .. } => {
                            walk.writes.push((key.clone(), Some(next_key(key))));
                            walk.changed = true;
                        }
                        TxnOp::Delete { start, end, .. } => {
                            let end = match end {
                                None => Some(next_key(start)),
                                Some(e) if e.is_empty() => None,
                                Some(e) => Some(e.clone()),
                            };
                            walk.writes.push((start.clone(), end));
                            walk.changed |= matches!(result, WriteOutcome::Delete { deleted, .. } if *deleted > 0);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn branch_taken(&self, node: usize, succeeded: bool) -> (&[TxnOp], &[Slot]) {
        let (txn, slots) = (&self.tree.nodes[node], &self.slots[node]);
        if succeeded {
            (&txn.success, &slots.success)
        } else {
            (&txn.failure, &slots.failure)
        }
    }

    /// etcd's answer (without its outer header) from the store's `outcome` and the answers
    /// to [`Self::taken_reads`], in that order. `before` is the revision the transaction
    /// started from.
    pub fn response(
        &self,
        outcome: &WriteOutcome,
        before: Revision,
        answers: Vec<RangeAnswer>,
    ) -> Result<TxnResponse, EtcdError> {
        let at = outcome.revision();
        let mut answers = answers.into_iter();
        let mut changed = false;
        let response = self.respond(0, outcome, before, at, &mut answers, &mut changed)?;
        if answers.next().is_some() {
            return Err(EtcdError::Internal(
                "more read answers than the transaction's reads".into(),
            ));
        }
        Ok(response)
    }

    fn respond(
        &self,
        node: usize,
        outcome: &WriteOutcome,
        before: Revision,
        at: Revision,
        answers: &mut std::vec::IntoIter<RangeAnswer>,
        changed: &mut bool,
    ) -> Result<TxnResponse, EtcdError> {
        // etcd's operations inside a transaction carry only the revision they saw or wrote.
        let inner = |revision: Revision| ResponseHeader {
            revision: revision::to_etcd(revision),
            ..Default::default()
        };
        let (succeeded, results) = txn_outcome(outcome)?;
        let (ops, slots) = self.branch_taken(node, succeeded);
        let mut responses = Vec::with_capacity(slots.len());
        for slot in slots {
            let response = match slot {
                Slot::Range(_) => {
                    let answer = answers.next().ok_or_else(|| {
                        EtcdError::Internal("fewer read answers than reads".into())
                    })?;
                    Response::ResponseRange(RangeResponse {
                        header: Some(inner(if *changed { at } else { before })),
                        kvs: answer.kvs,
                        more: answer.more,
                        count: answer.count,
                    })
                }
                Slot::Op(k) => {
                    let result = results.get(*k).ok_or_else(|| missing(*k))?;
                    match (&ops[*k], result) {
                        (TxnOp::Nested(i), r) => Response::ResponseTxn(self.respond(
                            *i as usize,
                            r,
                            before,
                            at,
                            answers,
                            changed,
                        )?),
                        (_, r @ WriteOutcome::Put { .. }) => {
                            *changed = true;
                            Response::ResponsePut(put_response(r.clone(), inner(at)))
                        }
                        (_, r @ WriteOutcome::Delete { deleted, .. }) => {
                            // etcd names the new revision once this or an earlier write
                            // changed something.
                            *changed |= *deleted > 0;
                            let seen = if *changed { at } else { before };
                            Response::ResponseDeleteRange(delete_response(r.clone(), inner(seen)))
                        }
                        (op, r) => {
                            return Err(EtcdError::Internal(format!(
                                "{op:?} was answered with {r:?}"
                            )))
                        }
                    }
                }
            };
            responses.push(ResponseOp {
                response: Some(response),
            });
        }
        Ok(TxnResponse {
            header: (node > 0).then(ResponseHeader::default),
            succeeded,
            responses,
        })
    }
}

/// What a walk of the path taken found: the writes in order, and per read the number of
/// writes before it and whether one of them changed the store.
#[derive(Default)]
struct Walk<'a> {
    writes: Vec<(Key, Option<Key>)>,
    reads: Vec<(&'a RangePlan, usize, bool)>,
    changed: bool,
}

fn txn_outcome(outcome: &WriteOutcome) -> Result<(bool, &[WriteOutcome]), EtcdError> {
    match outcome {
        WriteOutcome::Txn {
            succeeded, results, ..
        } => Ok((*succeeded, results)),
        other => Err(EtcdError::Internal(format!(
            "a transaction was answered with {other:?}"
        ))),
    }
}

fn missing(k: usize) -> EtcdError {
    EtcdError::Internal(format!("transaction operation {k} has no result"))
}

/// The smallest key after `key`.
fn next_key(key: &[u8]) -> Key {
    let mut next = key.to_vec();
    next.push(0);
    next
}

/// The state halfway through a transaction, from the state before it (`pre`) and at its
/// revision (`post`), both in key order over the range read: keys inside `written` as in
/// `post`, every other key as in `pre`. Exact because a put key is written by no other write
/// of the path and deletes are idempotent.
pub fn overlay(
    pre: Vec<KeyValue>,
    post: Vec<KeyValue>,
    written: &[(Key, Option<Key>)],
) -> Vec<KeyValue> {
    let covered = |key: &[u8]| {
        written.iter().any(|(start, end)| {
            key >= start.as_slice() && end.as_ref().is_none_or(|e| key < e.as_slice())
        })
    };
    let mut out: Vec<KeyValue> = pre
        .into_iter()
        .filter(|kv| !covered(&kv.key))
        .chain(post.into_iter().filter(|kv| covered(&kv.key)))
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// The store's comparison for etcd's, and the end of its key range if it has one (empty:
/// every key from its key on).
pub fn compare(c: &PbCompare) -> Result<(Compare, Option<Key>), EtcdError> {
    if c.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    let end = match key_range(&c.key, &c.range_end) {
        (_, None) => None,
        (_, Some(end)) => Some(end),
    };
    let result = CompareResult::try_from(c.result)
        .map_err(|_| EtcdError::InvalidArgument(format!("unknown compare result {}", c.result)))?;
    let op = match result {
        CompareResult::Equal => CompareOp::Equal,
        CompareResult::NotEqual => CompareOp::NotEqual,
        CompareResult::Less => CompareOp::Less,
        CompareResult::Greater => CompareOp::Greater,
    };
    let target = PbTarget::try_from(c.target)
        .map_err(|_| EtcdError::InvalidArgument(format!("unknown compare target {}", c.target)))?;
    let number =
        |want: fn(&TargetUnion) -> Option<i64>| c.target_union.as_ref().and_then(want).unwrap_or(0);
    let (op, target) = match target {
        PbTarget::Value => {
            let value = match &c.target_union {
                Some(TargetUnion::Value(v)) => v.clone(),
                _ => Vec::new(),
            };
            (op, CompareTarget::Value(value))
        }
        PbTarget::Version => {
            let (op, n) = int_compare(
                op,
                number(|u| match u {
                    TargetUnion::Version(v) => Some(*v),
                    _ => None,
                }),
                false,
            );
            (op, CompareTarget::Version(n))
        }
        PbTarget::Create => {
            let (op, n) = int_compare(
                op,
                number(|u| match u {
                    TargetUnion::CreateRevision(v) => Some(*v),
                    _ => None,
                }),
                true,
            );
            (op, CompareTarget::CreateRevision(n))
        }
        PbTarget::Mod => {
            let (op, n) = int_compare(
                op,
                number(|u| match u {
                    TargetUnion::ModRevision(v) => Some(*v),
                    _ => None,
                }),
                true,
            );
            (op, CompareTarget::ModRevision(n))
        }
        PbTarget::Lease => {
            let (op, n) = int_compare(
                op,
                number(|u| match u {
                    TargetUnion::Lease(v) => Some(*v),
                    _ => None,
                }),
                false,
            );
            (op, CompareTarget::Lease(n))
        }
    };
    Ok((
        Compare {
            key: c.key.clone(),
            target,
            op,
        },
        end,
    ))
}

/// A store value no key ever reaches: `x == NEVER` is never true, `x != NEVER` always.
const NEVER: u64 = u64::MAX;

/// The store's comparison `x op' c'` that holds exactly when etcd's `e(x) op c` does, where
/// `x` is the store's number for a key and `e(x)` etcd's: `x` itself, or, for revisions
/// (`renumbered`), 0 for an absent key and `x + 1` otherwise.
fn int_compare(op: CompareOp, c: i64, renumbered: bool) -> (CompareOp, u64) {
    use CompareOp::*;
    let always = (NotEqual, NEVER);
    let never = (Equal, NEVER);
    match (c, op) {
        (i64::MIN..=-1, Equal | Less) => never,
        (i64::MIN..=-1, NotEqual | Greater) => always,
        (0, _) => (op, 0),
        (1, _) if renumbered => match op {
            // No key has etcd revision 1 (the empty store's).
            Equal => never,
            NotEqual => always,
            Greater => (Greater, 0),
            Less => (Less, 1),
        },
        (c, _) if renumbered => (op, c as u64 - 1),
        (c, _) => (op, c as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::etcdserverpb::RangeRequest;
    use aspen_kv::api::KeyValue;
    use proptest::prelude::*;

    fn etcd_holds(x: u64, op: CompareOp, c: i64, renumbered: bool) -> bool {
        let e: i64 = if renumbered && x > 0 {
            x as i64 + 1
        } else {
            x as i64
        };
        match op {
            CompareOp::Equal => e == c,
            CompareOp::NotEqual => e != c,
            CompareOp::Less => e < c,
            CompareOp::Greater => e > c,
        }
    }

    proptest! {
        /// The renumbered comparison agrees with etcd's for every key state.
        #[test]
        fn comparisons_agree_with_etcds(
            x in 0u64..50, c in -3i64..52, op in 0usize..4, renumbered: bool,
        ) {
            let op = [CompareOp::Equal, CompareOp::NotEqual, CompareOp::Less, CompareOp::Greater][op];
            let (op2, c2) = int_compare(op, c, renumbered);
            let cmp = Compare { key: b"k".to_vec(), target: CompareTarget::Version(c2), op: op2 };
            let current = (x > 0).then(|| KeyValue {
                key: b"k".to_vec(), value: vec![], create_revision: x, mod_revision: x,
                version: x, lease: 0,
            });
            // An absent key has version 0 as well, so Version stands in for every target.
            prop_assert_eq!(cmp.holds(current.as_ref()), etcd_holds(x, op, c, renumbered));
        }
    }

    fn range(key: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                key: key.into(),
                ..Default::default()
            })),
        }
    }

    fn put(key: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: key.into(),
                value: b"v".to_vec(),
                ..Default::default()
            })),
        }
    }

    fn txn(compare: Vec<PbCompare>, success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestTxn(TxnRequest {
                compare,
                success,
                failure,
            })),
        }
    }

    fn put_out(revision: Revision) -> WriteOutcome {
        WriteOutcome::Put {
            revision,
            prev: None,
        }
    }

    #[test]
    fn nested_transactions_become_nodes_after_their_parents() {
        let plan = TxnPlan::new(&TxnRequest {
            compare: vec![],
            success: vec![
                range("a"),
                put("b"),
                txn(vec![], vec![put("c"), range("d")], vec![range("e")]),
                range("f"),
                put("g"),
            ],
            failure: vec![txn(vec![], vec![], vec![])],
        })
        .unwrap();
        assert_eq!(plan.tree.nodes.len(), 3);
        let root = &plan.tree.nodes[0];
        assert!(matches!(root.success[1], TxnOp::Nested(1)));
        assert!(matches!(root.failure[0], TxnOp::Nested(2)));
        assert_eq!(
            plan.slots[0].success[3],
            Slot::Range(Box::new(
                RangePlan::new(&RangeRequest {
                    key: b"f".to_vec(),
                    ..Default::default()
                })
                .unwrap()
            ))
        );
        assert_eq!(plan.slots[0].success[4], Slot::Op(2));
        assert!(matches!(plan.write_op(), WriteOp::TxnTree(_)));
        assert!(!plan.read_only());
        assert_eq!(plan.all_reads().count(), 4);
        assert_eq!(plan.write_op().validate(), Ok(()));

        // Success path: read a, put b, [put c, read d], read f, put g.
        let outcome = WriteOutcome::Txn {
            revision: 9,
            succeeded: true,
            results: vec![
                put_out(9),
                WriteOutcome::Txn {
                    revision: 9,
                    succeeded: true,
                    results: vec![put_out(9)],
                },
                put_out(9),
            ],
        };
        let reads = plan.taken_reads(&outcome).unwrap();
        let states: Vec<&ReadState> = reads.iter().map(|r| &r.state).collect();
        let k = |s: &str| (s.as_bytes().to_vec(), Some(next_key(s.as_bytes())));
        assert_eq!(
            states,
            [
                &ReadState::Before,
                &ReadState::Between(vec![k("b"), k("c")]),
                &ReadState::Between(vec![k("b"), k("c")]),
            ]
        );
        assert!(!reads[0].after_a_change && reads[1].after_a_change);
        let answer = |n: i64| RangeAnswer {
            count: n,
            ..Default::default()
        };
        let response = plan
            .response(&outcome, 8, vec![answer(1), answer(2), answer(3)])
            .unwrap();
        assert!(response.succeeded && response.header.is_none());
        let Some(Response::ResponseTxn(nested)) = &response.responses[2].response else {
            panic!("{response:?}")
        };
        assert!(nested.header.is_some());
        let Some(Response::ResponseRange(d)) = &nested.responses[1].response else {
            panic!("{nested:?}")
        };
        assert_eq!((d.count, d.header.as_ref().unwrap().revision), (2, 10));
        assert!(plan.response(&outcome, 8, vec![answer(1)]).is_err());

        // Failure path: an empty nested transaction, no reads.
        let failed = WriteOutcome::Txn {
            revision: 8,
            succeeded: false,
            results: vec![WriteOutcome::Txn {
                revision: 8,
                succeeded: true,
                results: vec![],
            }],
        };
        assert!(plan.taken_reads(&failed).unwrap().is_empty());
        let too_deep = (0..=MAX_TXN_OPS).fold(TxnRequest::default(), |inner, _| TxnRequest {
            success: vec![RequestOp {
                request: Some(Request::RequestTxn(inner)),
            }],
            ..Default::default()
        });
        assert_eq!(TxnPlan::new(&too_deep), Err(EtcdError::TooManyOps));
    }

    #[test]
    fn reads_before_and_after_every_write() {
        let plan = TxnPlan::new(&TxnRequest {
            compare: vec![],
            success: vec![range("a"), put("b"), range("d")],
            failure: vec![range("a")],
        })
        .unwrap();
        assert!(matches!(plan.write_op(), WriteOp::Txn(_)));
        let outcome = WriteOutcome::Txn {
            revision: 4,
            succeeded: true,
            results: vec![put_out(4)],
        };
        let states: Vec<ReadState> = plan
            .taken_reads(&outcome)
            .unwrap()
            .into_iter()
            .map(|r| r.state)
            .collect();
        assert_eq!(states, [ReadState::Before, ReadState::After]);
        let too_many = TxnPlan::new(&TxnRequest {
            compare: vec![],
            success: (0..=MAX_TXN_OPS).map(|i| put(&format!("k{i}"))).collect(),
            failure: vec![],
        });
        assert_eq!(too_many, Err(EtcdError::TooManyOps));
    }

    /// Random transaction requests, nested up to three deep, with puts, deletes and reads of
    /// a few keys (some empty, some with range ends), and compares with and without ranges.
    fn arb_request() -> impl Strategy<Value = TxnRequest> {
        let key = prop_oneof![1 => Just(Vec::new()), 19 => (0u8..4).prop_map(|k| vec![b'a' + k])];
        let end = prop_oneof![Just(Vec::new()), Just(vec![0]), Just(b"c".to_vec())];
        let leaf = prop_oneof![
            (key.clone(), any::<bool>()).prop_map(|(key, prev_kv)| RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key,
                    value: b"v".to_vec(),
                    prev_kv,
                    ..Default::default()
                }))
            }),
            (key.clone(), end.clone()).prop_map(|(key, range_end)| RequestOp {
                request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                    key,
                    range_end,
                    ..Default::default()
                }))
            }),
            (key.clone(), end.clone(), 0i64..3).prop_map(|(key, range_end, limit)| RequestOp {
                request: Some(Request::RequestRange(RangeRequest {
                    key,
                    range_end,
                    limit,
                    ..Default::default()
                }))
            }),
        ];
        let leaf = prop_oneof![30 => leaf, 1 => Just(RequestOp { request: None })];
        let target = prop_oneof![19 => 0i32..5, 1 => -1i32..7];
        let result = prop_oneof![19 => 0i32..4, 1 => -1i32..6];
        let compare =
            (key, end, target, result).prop_map(|(key, range_end, target, result)| PbCompare {
                key,
                range_end,
                target,
                result,
                target_union: Some(TargetUnion::Version(1)),
            });
        let txn = |ops: BoxedStrategy<RequestOp>| {
            (
                proptest::collection::vec(compare.clone(), 0..3),
                proptest::collection::vec(ops.clone(), 0..4),
                proptest::collection::vec(ops, 0..3),
            )
                .prop_map(|(compare, success, failure)| TxnRequest {
                    compare,
                    success,
                    failure,
                })
        };
        let nested = |inner: BoxedStrategy<TxnRequest>| {
            prop_oneof![
                3 => leaf.clone(),
                1 => inner.prop_map(|t| RequestOp {
                    request: Some(Request::RequestTxn(t))
                }),
            ]
            .boxed()
        };
        let depth1 = txn(leaf.clone().boxed()).boxed();
        let depth2 = txn(nested(depth1)).boxed();
        txn(nested(depth2))
    }

    /// What the store would answer for `plan` if node `j`'s comparisons came out `flags[j]`.
    fn outcome_of(plan: &TxnPlan, node: usize, flags: &[bool], revision: Revision) -> WriteOutcome {
        let succeeded = flags[node];
        let (ops, _) = plan.branch_taken(node, succeeded);
        let results = ops
            .iter()
            .map(|op| match op {
                TxnOp::Nested(i) => outcome_of(plan, *i as usize, flags, revision),
                TxnOp::Delete { .. } => WriteOutcome::Delete {
                    revision,
                    deleted: 1,
                    prev: vec![],
                },
                _ => WriteOutcome::Put {
                    revision,
                    prev: None,
                },
            })
            .collect();
        WriteOutcome::Txn {
            revision,
            succeeded,
            results,
        }
    }

    proptest! {
        /// Any request is planned or refused with a typed error; a plan's command validates
        /// or is refused by the store's limits; for every path the store could take, the
        /// reads are listed and the answer has one response per operation of each branch
        /// taken; an answer that does not fit the plan is an error, not a panic.
        #[test]
        fn any_request_is_planned_and_answered_without_panicking(
            req in arb_request(),
            flags in proptest::collection::vec(any::<bool>(), 16),
            junk in 0u64..3,
        ) {
            let Ok(plan) = TxnPlan::new(&req) else {
                return Ok(());
            };
            prop_assert!(plan.tree.nodes.len() <= flags.len());
            let _ = plan.write_op().validate();
            let outcome = outcome_of(&plan, 0, &flags, 7);
            let reads = plan.taken_reads(&outcome).unwrap();
            let answers = vec![RangeAnswer::default(); reads.len()];
            let response = plan.response(&outcome, 6, answers).unwrap();
            let root = if flags[0] { &req.success } else { &req.failure };
            prop_assert_eq!(response.responses.len(), root.len());
            prop_assert_eq!(response.succeeded, flags[0]);
            // Answers from another transaction, or too few reads: errors.
            let wrong = match junk {
                0 => WriteOutcome::Compact { revision: 7 },
                1 => WriteOutcome::Txn { revision: 7, succeeded: flags[0], results: vec![] },
                _ => outcome.clone(),
            };
            let _ = plan.taken_reads(&wrong);
            let _ = plan.response(&wrong, 6, vec![]);
            if plan.read_only() {
                let taken: Vec<Option<bool>> = flags[..plan.tree.nodes.len()].iter().map(|f| Some(*f)).collect();
                let _ = plan.read_only_outcome(7, &taken);
            }
        }
    }

    /// Keys `a`..`f` as the store holds them: value and revisions per key.
    fn arb_state() -> impl Strategy<Value = std::collections::BTreeMap<u8, u8>> {
        proptest::collection::btree_map(0u8..6, any::<u8>(), 0..6)
    }

    fn kv_of(k: u8, v: u8, revision: u64) -> KeyValue {
        KeyValue {
            key: vec![b'a' + k],
            value: vec![v],
            create_revision: 1,
            mod_revision: revision,
            version: 1,
            lease: 0,
        }
    }

    proptest! {
        /// Halfway through a transaction, the overlay of the states before and after it is
        /// exactly the state the writes so far made (writes touch distinct keys).
        #[test]
        fn the_overlay_is_the_state_halfway(
            pre in arb_state(),
            writes in proptest::collection::vec((0u8..6, proptest::option::of(any::<u8>())), 0..6),
            cut in 0usize..7,
        ) {
            let mut seen = std::collections::BTreeSet::new();
            let writes: Vec<_> = writes.into_iter().filter(|(k, _)| seen.insert(*k)).collect();
            let cut = cut.min(writes.len());
            let apply = |upto: usize| {
                let mut state: std::collections::BTreeMap<u8, (u8, u64)> =
                    pre.iter().map(|(k, v)| (*k, (*v, 1))).collect();
                for (k, v) in &writes[..upto] {
                    match v {
                        Some(v) => state.insert(*k, (*v, 2)),
                        None => state.remove(k),
                    };
                }
                state.into_iter().map(|(k, (v, r))| kv_of(k, v, r)).collect::<Vec<_>>()
            };
            let spans: Vec<(Key, Option<Key>)> = writes[..cut]
                .iter()
                .map(|(k, _)| (vec![b'a' + k], Some(next_key(&[b'a' + k]))))
                .collect();
            prop_assert_eq!(overlay(apply(0), apply(writes.len()), &spans), apply(cut));
        }
    }

    #[test]
    fn put_options_are_checked_as_etcd_checks_them() {
        let p = |value: &[u8], lease, iv, il| PutRequest {
            key: b"k".to_vec(),
            value: value.to_vec(),
            lease,
            ignore_value: iv,
            ignore_lease: il,
            prev_kv: false,
        };
        assert_eq!(
            super::put(&p(b"x", 0, true, false)),
            Err(EtcdError::ValueProvided)
        );
        assert_eq!(
            super::put(&p(b"", 5, false, true)),
            Err(EtcdError::LeaseProvided)
        );
        assert_eq!(
            super::put(&p(b"", -1, false, false)),
            Err(EtcdError::LeaseNotFound)
        );
        assert!(super::put(&p(b"", 0, true, true)).is_ok());
        let mut empty = p(b"x", 0, false, false);
        empty.key.clear();
        assert_eq!(super::put(&empty), Err(EtcdError::EmptyKey));
    }
}
