//! Recording what concurrent clients did, in real-time order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::model::{Op, Outcome};

/// One operation of a history. Times are ticks of the recorder's logical clock: every event
/// takes a fresh tick, so "returned before invoked" is exactly real-time precedence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// Which client ran it (a client runs one operation at a time).
    pub client: u64,
    pub op: Op,
    pub invoked_at: u64,
    /// `None`: the outcome is unknown (timeout, connection lost); the operation may or may
    /// not have taken effect, at any time after it was invoked.
    pub returned: Option<(u64, Outcome)>,
}

/// A complete history, ready to [`crate::check`]; serialisable to keep failing runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub operations: Vec<Operation>,
}

impl History {
    /// Builds a history by hand (tests of the checker): `(client, op, invoked, returned)`.
    pub fn from_ops(ops: impl IntoIterator<Item = Operation>) -> Self {
        History {
            operations: ops.into_iter().collect(),
        }
    }

    /// Number of operations whose outcome is unknown.
    pub fn unknown(&self) -> usize {
        self.operations
            .iter()
            .filter(|o| o.returned.is_none())
            .count()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a history always serialises")
    }

    pub fn from_json(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }
}

/// An operation that was invoked and has not returned yet. Dropping it without calling one
/// of [`Recorder::ok`], [`Recorder::failed`] or [`Recorder::unknown`] records it as unknown.
#[must_use = "record how the operation ended"]
#[derive(Debug)]
pub struct Pending {
    index: usize,
}

/// Thread-safe history recorder shared by the clients of a test.
#[derive(Debug, Default)]
pub struct Recorder {
    clock: AtomicU64,
    ops: Mutex<Vec<Option<Operation>>>,
}

impl Recorder {
    pub fn new() -> Self {
        Self::default()
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    /// Records the invocation; call it just before sending the request.
    pub fn invoke(&self, client: u64, op: Op) -> Pending {
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let invoked_at = self.tick();
        ops.push(Some(Operation {
            client,
            op,
            invoked_at,
            returned: None,
        }));
        Pending {
            index: ops.len() - 1,
        }
    }

    /// Records a successful return with what the client observed.
    pub fn ok(&self, pending: Pending, outcome: Outcome) {
        let at = self.tick();
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(op) = ops[pending.index].as_mut() {
            op.returned = Some((at, outcome));
        }
    }

    /// Records that the operation certainly did not take effect (refused before it could be
    /// applied); it is left out of the history.
    pub fn failed(&self, pending: Pending) {
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        ops[pending.index] = None;
    }

    /// Records that the outcome is unknown.
    pub fn unknown(&self, pending: Pending) {
        drop(pending);
    }

    /// The history so far (operations still pending count as unknown).
    pub fn history(&self) -> History {
        let ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        History {
            operations: ops.iter().flatten().cloned().collect(),
        }
    }
}
