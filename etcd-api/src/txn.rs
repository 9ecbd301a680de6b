//! etcd's writes and transactions as the store's commands.
//!
//! Puts, deletes and the writes of a transaction map one to one onto the store's. A
//! transaction's compares map too, with revisions renumbered (see [`crate::revision`]). The
//! reads inside a transaction do not go through the log: the node reads them at the
//! transaction's revision once it is applied. Since a transaction's writes all happen at one
//! revision R, a read placed before every write of its branch sees the state at R - 1 (or R if
//! the writes changed nothing), and one placed after every write sees R. A read between two
//! writes would need the state halfway through the transaction, which the store does not
//! keep: such a transaction is refused before anything is written.

use aspen_kv::api::{
    Compare, CompareOp, CompareTarget, Key, PutOptions, Txn, TxnOp, WriteOp, WriteOutcome,
};
use aspen_kv::limits::MAX_TXN_OPS;

use crate::pb::etcdserverpb::compare::{CompareResult, CompareTarget as PbTarget, TargetUnion};
use crate::pb::etcdserverpb::request_op::Request;
use crate::pb::etcdserverpb::{
    Compare as PbCompare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RequestOp, ResponseHeader, TxnRequest,
};
use crate::range::{key_range, to_pb, RangePlan};
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

/// Where a read inside a transaction branch looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Before every write of the branch: the state the transaction started from.
    Before,
    /// After every write of the branch: the transaction's own revision.
    After,
}

/// One operation of a branch, in etcd's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    /// The store write at this index of the branch.
    Write(usize),
    /// A read, answered after the transaction is applied.
    Range(Box<RangePlan>, Phase),
}

/// A transaction as the store runs it, and where each of etcd's operations went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnPlan {
    pub txn: Txn,
    pub success: Vec<Slot>,
    pub failure: Vec<Slot>,
}

impl TxnPlan {
    pub fn new(req: &TxnRequest) -> Result<TxnPlan, EtcdError> {
        if [req.compare.len(), req.success.len(), req.failure.len()]
            .iter()
            .any(|n| *n > MAX_TXN_OPS)
        {
            return Err(EtcdError::TooManyOps);
        }
        let compare = req
            .compare
            .iter()
            .map(compare)
            .collect::<Result<Vec<_>, _>>()?;
        let (success, success_slots) = branch(&req.success)?;
        let (failure, failure_slots) = branch(&req.failure)?;
        Ok(TxnPlan {
            txn: Txn {
                compare,
                success,
                failure,
            },
            success: success_slots,
            failure: failure_slots,
        })
    }

    /// Whether neither branch writes (the transaction only compares and reads).
    pub fn read_only(&self) -> bool {
        self.txn.success.is_empty() && self.txn.failure.is_empty()
    }
}

fn branch(ops: &[RequestOp]) -> Result<(Vec<TxnOp>, Vec<Slot>), EtcdError> {
    let writes_total = ops
        .iter()
        .filter(|o| {
            matches!(
                o.request,
                Some(Request::RequestPut(_) | Request::RequestDeleteRange(_))
            )
        })
        .count();
    let mut writes = Vec::new();
    let mut slots = Vec::new();
    for op in ops {
        match &op.request {
            Some(Request::RequestPut(p)) => {
                let (key, value, prev_kv, options) = put_parts(p)?;
                slots.push(Slot::Write(writes.len()));
                writes.push(TxnOp::PutWith {
                    key,
                    value,
                    prev_kv,
                    options,
                });
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
                slots.push(Slot::Write(writes.len()));
                writes.push(TxnOp::Delete {
                    start,
                    end,
                    prev_kv,
                });
            }
            Some(Request::RequestRange(r)) => {
                let phase = if writes.is_empty() {
                    Phase::Before
                } else if writes.len() == writes_total {
                    Phase::After
                } else {
                    return Err(EtcdError::Unsupported(
                        "a read between two writes of a transaction is not supported: put the \
                         reads before or after the writes"
                            .into(),
                    ));
                };
                slots.push(Slot::Range(Box::new(RangePlan::new(r)?), phase));
            }
            Some(Request::RequestTxn(_)) => {
                return Err(EtcdError::Unsupported(
                    "nested transactions are not supported".into(),
                ))
            }
            None => {
                return Err(EtcdError::InvalidArgument(
                    "a transaction operation names no request".into(),
                ))
            }
        }
    }
    Ok((writes, slots))
}

/// The store's comparison for etcd's.
pub fn compare(c: &PbCompare) -> Result<Compare, EtcdError> {
    if !c.range_end.is_empty() {
        return Err(EtcdError::Unsupported(
            "a comparison over a key range is not supported: compare single keys".into(),
        ));
    }
    if c.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
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
    Ok(Compare {
        key: c.key.clone(),
        target,
        op,
    })
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

    #[test]
    fn reads_go_before_or_after_the_writes() {
        let plan = TxnPlan::new(&TxnRequest {
            compare: vec![],
            success: vec![range("a"), put("b"), put("c"), range("d")],
            failure: vec![range("a")],
        })
        .unwrap();
        assert!(matches!(plan.success[0], Slot::Range(_, Phase::Before)));
        assert_eq!(plan.success[1], Slot::Write(0));
        assert_eq!(plan.success[2], Slot::Write(1));
        assert!(matches!(plan.success[3], Slot::Range(_, Phase::After)));
        assert!(matches!(plan.failure[0], Slot::Range(_, Phase::Before)));
        assert_eq!(plan.txn.success.len(), 2);
        assert!(!plan.read_only());
        let between = TxnPlan::new(&TxnRequest {
            compare: vec![],
            success: vec![put("b"), range("a"), put("c")],
            failure: vec![],
        });
        assert!(matches!(between, Err(EtcdError::Unsupported(_))));
        let too_many = TxnPlan::new(&TxnRequest {
            compare: vec![],
            success: (0..=MAX_TXN_OPS).map(|i| put(&format!("k{i}"))).collect(),
            failure: vec![],
        });
        assert_eq!(too_many, Err(EtcdError::TooManyOps));
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
