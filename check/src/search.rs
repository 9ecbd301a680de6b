//! The Wing & Gong / Lowe search, one key at a time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use crate::history::{History, Operation};
use crate::model::{step, IOp, IOutcome, Op, Outcome, State, ValueId};

/// Search steps allowed per key before the answer is "inconclusive" rather than a hang.
pub const DEFAULT_STEP_BUDGET: u64 = 20_000_000;

/// The result of checking a history.
#[derive(Debug, Default)]
pub struct Report {
    /// Operations checked (unknown reads are left out: they cannot affect anything).
    pub operations: usize,
    pub keys: usize,
    /// Keys whose history no order explains.
    pub anomalies: Vec<Anomaly>,
    /// Keys whose search ran out of budget (neither proven nor refuted).
    pub inconclusive: Vec<Vec<u8>>,
}

impl Report {
    /// True only if every key was proven linearizable.
    pub fn is_linearizable(&self) -> bool {
        self.anomalies.is_empty() && self.inconclusive.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} operations on {} keys: {} anomalies, {} inconclusive",
            self.operations,
            self.keys,
            self.anomalies.len(),
            self.inconclusive.len()
        )?;
        for a in &self.anomalies {
            write!(f, "\n{a}")?;
        }
        for k in &self.inconclusive {
            write!(f, "\nkey {}: search budget exhausted", show(k))?;
        }
        Ok(())
    }
}

/// A key whose operations cannot be linearized.
#[derive(Debug, Clone)]
pub struct Anomaly {
    pub key: Vec<u8>,
    /// Every operation on the key, by invocation time.
    pub operations: Vec<Operation>,
    /// The longest order found that explains a prefix: indices into `operations`.
    pub longest_linearization: Vec<usize>,
}

/// How many operations an anomaly report prints at most.
const MAX_REPORTED_OPS: usize = 40;

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "key {}: not linearizable ({} operations; at most {} can be ordered)",
            show(&self.key),
            self.operations.len(),
            self.longest_linearization.len()
        )?;
        let order: HashMap<usize, usize> = self
            .longest_linearization
            .iter()
            .enumerate()
            .map(|(pos, &i)| (i, pos))
            .collect();
        for (i, o) in self.operations.iter().enumerate().take(MAX_REPORTED_OPS) {
            let ret = match &o.returned {
                Some((t, out)) => format!("{t} -> {}", show_outcome(out)),
                None => "? (unknown)".to_string(),
            };
            let pos = order
                .get(&i)
                .map_or("  -".to_string(), |p| format!("{p:3}"));
            write!(
                f,
                "\n  [{pos}] client {} {} @{} .. {ret}",
                o.client,
                show_op(&o.op),
                o.invoked_at
            )?;
        }
        if self.operations.len() > MAX_REPORTED_OPS {
            write!(
                f,
                "\n  ... {} more",
                self.operations.len() - MAX_REPORTED_OPS
            )?;
        }
        Ok(())
    }
}

fn show(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => format!("{s:?}"),
        _ => format!(
            "0x{}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}

fn show_opt(v: &Option<Vec<u8>>) -> String {
    v.as_ref().map_or("<absent>".to_string(), |v| show(v))
}

fn show_op(op: &Op) -> String {
    match op {
        Op::Get { .. } => "get".to_string(),
        Op::Put { value, .. } => format!("put {}", show(value)),
        Op::Delete { .. } => "delete".to_string(),
        Op::Cas { expect, new, .. } => format!("cas {} -> {}", show_opt(expect), show(new)),
    }
}

fn show_outcome(o: &Outcome) -> String {
    match o {
        Outcome::Get(v) => show_opt(v),
        Outcome::Put => "ok".to_string(),
        Outcome::Delete { existed } => format!("existed={existed}"),
        Outcome::Cas { swapped } => format!("swapped={swapped}"),
    }
}

/// Checks `history` with the [`DEFAULT_STEP_BUDGET`] per key.
pub fn check(history: &History) -> Report {
    check_with_budget(history, DEFAULT_STEP_BUDGET)
}

/// Checks `history`, allowing at most `budget` search steps per key.
pub fn check_with_budget(history: &History, budget: u64) -> Report {
    let mut by_key: BTreeMap<&[u8], Vec<Operation>> = BTreeMap::new();
    for o in &history.operations {
        if o.returned.is_none() && !o.op.is_write() {
            continue;
        }
        by_key.entry(o.op.key()).or_default().push(o.clone());
    }
    let mut report = Report {
        keys: by_key.len(),
        ..Report::default()
    };
    for (key, mut ops) in by_key {
        ops.sort_by_key(|o| o.invoked_at);
        report.operations += ops.len();
        match check_key(&ops, budget) {
            KeyResult::Linearizable => {}
            KeyResult::Inconclusive => report.inconclusive.push(key.to_vec()),
            KeyResult::Violation { longest } => report.anomalies.push(Anomaly {
                key: key.to_vec(),
                operations: ops,
                longest_linearization: longest,
            }),
        }
    }
    report
}

enum KeyResult {
    Linearizable,
    Violation { longest: Vec<usize> },
    Inconclusive,
}

const NIL: usize = usize::MAX;

/// A node of the event list: node 0 is the head sentinel; an operation `i` has its call at
/// `2i + 1` and its return at `2i + 2`.
#[derive(Clone, Copy)]
struct Node {
    prev: usize,
    next: usize,
}

struct Events {
    nodes: Vec<Node>,
}

impl Events {
    fn call(op: usize) -> usize {
        2 * op + 1
    }
    fn ret(op: usize) -> usize {
        2 * op + 2
    }
    fn is_call(node: usize) -> bool {
        node % 2 == 1
    }
    fn op(node: usize) -> usize {
        (node - 1) / 2
    }

    fn unlink(&mut self, n: usize) {
        let Node { prev, next } = self.nodes[n];
        self.nodes[prev].next = next;
        if next != NIL {
            self.nodes[next].prev = prev;
        }
    }

    fn relink(&mut self, n: usize) {
        let Node { prev, next } = self.nodes[n];
        self.nodes[prev].next = n;
        if next != NIL {
            self.nodes[next].prev = n;
        }
    }

    /// Removes operation `op` (its call and its return) from the list.
    fn lift(&mut self, op: usize) {
        self.unlink(Self::call(op));
        self.unlink(Self::ret(op));
    }

    /// Undoes the matching [`Events::lift`] (lifts are undone in reverse order).
    fn unlift(&mut self, op: usize) {
        self.relink(Self::ret(op));
        self.relink(Self::call(op));
    }
}

/// Interns the values of one key's operations.
fn intern(ops: &[Operation]) -> Vec<(IOp, Option<IOutcome>)> {
    let mut ids: HashMap<Vec<u8>, ValueId> = HashMap::new();
    let mut id = |v: &[u8]| -> ValueId {
        let next = ids.len() as ValueId;
        *ids.entry(v.to_vec()).or_insert(next)
    };
    ops.iter()
        .map(|o| {
            let op = match &o.op {
                Op::Get { .. } => IOp::Get,
                Op::Put { value, .. } => IOp::Put(id(value)),
                Op::Delete { .. } => IOp::Delete,
                Op::Cas { expect, new, .. } => IOp::Cas {
                    expect: expect.as_deref().map(&mut id),
                    new: id(new),
                },
            };
            let out = o.returned.as_ref().map(|(_, out)| match out {
                Outcome::Get(v) => IOutcome::Get(v.as_deref().map(&mut id)),
                Outcome::Put => IOutcome::Put,
                Outcome::Delete { existed } => IOutcome::Delete { existed: *existed },
                Outcome::Cas { swapped } => IOutcome::Cas { swapped: *swapped },
            });
            (op, out)
        })
        .collect()
}

fn check_key(ops: &[Operation], budget: u64) -> KeyResult {
    let n = ops.len();
    let spec = intern(ops);

    // Shortcut: a read of a value no operation wrote is never explained; saying so at once
    // avoids an exhaustive search of everything concurrent with it.
    let written: HashSet<ValueId> = spec
        .iter()
        .filter_map(|(op, _)| match op {
            IOp::Put(v) | IOp::Cas { new: v, .. } => Some(*v),
            _ => None,
        })
        .collect();
    if spec
        .iter()
        .any(|(_, out)| matches!(out, Some(IOutcome::Get(Some(v)))  if !written.contains(v)))
    {
        return KeyResult::Violation { longest: vec![] };
    }

    // Order every call and return by time; unknown returns go after everything.
    let mut order: Vec<(u64, usize)> = Vec::with_capacity(2 * n);
    for (i, o) in ops.iter().enumerate() {
        order.push((o.invoked_at, Events::call(i)));
        let ret = o.returned.as_ref().map_or(u64::MAX, |(t, _)| *t);
        order.push((ret, Events::ret(i)));
    }
    order.sort_unstable();
    let mut events = Events {
        nodes: vec![
            Node {
                prev: NIL,
                next: NIL
            };
            2 * n + 1
        ],
    };
    let mut last = 0;
    for &(_, node) in &order {
        events.nodes[last].next = node;
        events.nodes[node].prev = last;
        last = node;
    }

    let words = n.div_ceil(64).max(1);
    let mut linearized = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut longest: Vec<usize> = Vec::new();
    let mut state: State = None;
    let mut entry = events.nodes[0].next;
    let mut steps = 0u64;

    while events.nodes[0].next != NIL {
        steps += 1;
        if steps > budget {
            return KeyResult::Inconclusive;
        }
        if entry == NIL {
            // Only reachable if the list ended on a call, which sorting rules out.
            unreachable!("event list ends with a call");
        }
        if Events::is_call(entry) {
            let op = Events::op(entry);
            let (iop, out) = spec[op];
            if let Some(next) = step(state, iop, out) {
                linearized[op / 64] |= 1 << (op % 64);
                if seen.insert((linearized.clone(), next)) {
                    stack.push((op, state));
                    state = next;
                    events.lift(op);
                    if stack.len() > longest.len() {
                        longest = stack.iter().map(|&(o, _)| o).collect();
                    }
                    entry = events.nodes[0].next;
                    continue;
                }
                linearized[op / 64] &= !(1 << (op % 64));
            }
            entry = events.nodes[entry].next;
        } else {
            // A return whose call is still unordered: something before must change.
            let Some((op, prev_state)) = stack.pop() else {
                return KeyResult::Violation { longest };
            };
            state = prev_state;
            linearized[op / 64] &= !(1 << (op % 64));
            events.unlift(op);
            entry = events.nodes[Events::call(op)].next;
        }
    }
    KeyResult::Linearizable
}
