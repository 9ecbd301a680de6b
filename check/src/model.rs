//! The sequential specification: one key holding an optional value.

use serde::{Deserialize, Serialize};

/// One single-key operation a client invoked.
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
}

impl Op {
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Get { key } | Op::Put { key, .. } | Op::Delete { key } | Op::Cas { key, .. } => key,
        }
    }

    /// Whether the operation can change state (reads with unknown outcomes can be dropped).
    pub fn is_write(&self) -> bool {
        !matches!(self, Op::Get { .. })
    }
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
}

/// Values are interned per key, so the search state is a small integer.
pub(crate) type ValueId = u32;
/// The state of one key: absent, or holding the interned value.
pub(crate) type State = Option<ValueId>;

/// [`Op`] with values interned.
#[derive(Clone, Copy, Debug)]
pub(crate) enum IOp {
    Get,
    Put(ValueId),
    Delete,
    Cas { expect: State, new: ValueId },
}

/// [`Outcome`] with values interned; `None` on the whole: unknown outcome.
#[derive(Clone, Copy, Debug)]
pub(crate) enum IOutcome {
    Get(State),
    Put,
    Delete { existed: bool },
    Cas { swapped: bool },
}

/// Applies `op` to `state`. Returns the next state if the observed outcome (`None`: not
/// observed) is what the sequential specification gives, `None` if it is not.
pub(crate) fn step(state: State, op: IOp, seen: Option<IOutcome>) -> Option<State> {
    let (next, expected) = match op {
        IOp::Get => (state, IOutcome::Get(state)),
        IOp::Put(v) => (Some(v), IOutcome::Put),
        IOp::Delete => (
            None,
            IOutcome::Delete {
                existed: state.is_some(),
            },
        ),
        IOp::Cas { expect, new } => {
            let swapped = state == expect;
            (
                if swapped { Some(new) } else { state },
                IOutcome::Cas { swapped },
            )
        }
    };
    let Some(seen) = seen else {
        return Some(next);
    };
    let matches = match (seen, expected) {
        (IOutcome::Get(a), IOutcome::Get(b)) => a == b,
        (IOutcome::Put, IOutcome::Put) => true,
        (IOutcome::Delete { existed: a }, IOutcome::Delete { existed: b }) => a == b,
        (IOutcome::Cas { swapped: a }, IOutcome::Cas { swapped: b }) => a == b,
        _ => false,
    };
    matches.then_some(next)
}
