//! The sequential specification: a map from keys to values, read and written by single-key
//! operations, range reads and compare-then-write transactions.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// A write inside a [`Op::Txn`] branch: `Some(value)` puts, `None` deletes.
pub type TxnWrite = (Vec<u8>, Option<Vec<u8>>);

/// One operation a client invoked.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    Get {
        key: Vec<u8>,
    },
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    /// Sets `key` to `new` if its value is `expect` (`None`: the key is absent).
    Cas {
        key: Vec<u8>,
        expect: Option<Vec<u8>>,
        new: Vec<u8>,
    },
    /// Reads every key in `[start, end)` (`end == None`: to the end of the key space).
    Range {
        start: Vec<u8>,
        end: Option<Vec<u8>>,
    },
    /// If every compared key has the given value (`None`: absent), applies `success`, else
    /// `failure`; atomically.
    Txn {
        compare: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        success: Vec<TxnWrite>,
        failure: Vec<TxnWrite>,
    },
}

impl Op {
    /// Whether the operation can change state (reads with unknown outcomes can be dropped).
    pub fn is_write(&self) -> bool {
        !matches!(self, Op::Get { .. } | Op::Range { .. })
    }

    /// The keys the operation reads or writes, among `universe` for a range.
    pub fn keys(&self, universe: &BTreeSet<Vec<u8>>) -> BTreeSet<Vec<u8>> {
        match self {
            Op::Get { key } | Op::Put { key, .. } | Op::Delete { key } | Op::Cas { key, .. } => {
                BTreeSet::from([key.clone()])
            }
            Op::Range { start, end } => universe
                .iter()
                .filter(|k| in_range(k, start, end.as_deref()))
                .cloned()
                .collect(),
            Op::Txn {
                compare,
                success,
                failure,
            } => compare
                .iter()
                .chain(success)
                .chain(failure)
                .map(|(k, _)| k.clone())
                .collect(),
        }
    }

    /// Keys named explicitly (everything but ranges).
    pub(crate) fn named_keys(&self) -> Vec<Vec<u8>> {
        match self {
            Op::Range { .. } => vec![],
            other => other.keys(&BTreeSet::new()).into_iter().collect(),
        }
    }
}

pub(crate) fn in_range(key: &[u8], start: &[u8], end: Option<&[u8]>) -> bool {
    key >= start && end.is_none_or(|e| key < e)
}

/// What a client observed when an operation returned.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// The value read (`None`: absent).
    Get(Option<Vec<u8>>),
    Put,
    /// Whether the key existed (and so was deleted).
    Delete {
        existed: bool,
    },
    Cas {
        swapped: bool,
    },
    /// The keys present in the range and their values, in key order.
    Range(Vec<(Vec<u8>, Vec<u8>)>),
    /// Whether the comparisons held.
    Txn {
        succeeded: bool,
    },
}

/// Values are interned per partition, so the search state is a few small integers.
pub(crate) type ValueId = u32;
/// The state of a partition: per key (by index), absent or the interned value.
pub(crate) type State = Vec<Option<ValueId>>;

/// [`Op`] with keys as indices into the partition and values interned.
#[derive(Clone, Debug)]
pub(crate) enum IOp {
    Get(usize),
    Put(usize, ValueId),
    Delete(usize),
    Cas {
        key: usize,
        expect: Option<ValueId>,
        new: ValueId,
    },
    Range(Vec<usize>),
    Txn {
        compare: Vec<(usize, Option<ValueId>)>,
        success: Vec<(usize, Option<ValueId>)>,
        failure: Vec<(usize, Option<ValueId>)>,
    },
}

/// [`Outcome`] interned; a range's values are aligned with its key indices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum IOutcome {
    Get(Option<ValueId>),
    Put,
    Delete { existed: bool },
    Cas { swapped: bool },
    Range(Vec<Option<ValueId>>),
    Txn { succeeded: bool },
}

/// Applies `op` to `state`. Returns the next state if the observed outcome (`None`: not
/// observed) is what the sequential specification gives, `None` if it is not.
pub(crate) fn step(state: &State, op: &IOp, seen: Option<&IOutcome>) -> Option<State> {
    let mut next = state.clone();
    let expected = match op {
        IOp::Get(k) => IOutcome::Get(state[*k]),
        IOp::Put(k, v) => {
            next[*k] = Some(*v);
            IOutcome::Put
        }
        IOp::Delete(k) => {
            next[*k] = None;
            IOutcome::Delete {
                existed: state[*k].is_some(),
            }
        }
        IOp::Cas { key, expect, new } => {
            let swapped = state[*key] == *expect;
            if swapped {
                next[*key] = Some(*new);
            }
            IOutcome::Cas { swapped }
        }
        IOp::Range(keys) => IOutcome::Range(keys.iter().map(|k| state[*k]).collect()),
        IOp::Txn {
            compare,
            success,
            failure,
        } => {
            let succeeded = compare.iter().all(|(k, v)| state[*k] == *v);
            for (k, v) in if succeeded { success } else { failure } {
                next[*k] = *v;
            }
            IOutcome::Txn { succeeded }
        }
    };
    match seen {
        None => Some(next),
        Some(seen) if *seen == expected => Some(next),
        Some(_) => None,
    }
}
