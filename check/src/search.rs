//! The Wing & Gong / Lowe search, one key at a time.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use crate::history::{History, Operation};
use crate::model::{in_range, step, IOp, IOutcome, Op, Outcome, State, ValueId};

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
    /// Groups of keys whose search ran out of budget (neither proven nor refuted).
    pub inconclusive: Vec<Vec<Vec<u8>>>,
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
            write!(f, "\n{}: search budget exhausted", show_keys(k))?;
        }
        Ok(())
    }
}

/// A group of keys whose operations cannot be linearized. (Keys are checked together when
/// some operation touches several of them: a range read or a multi-key transaction.)
#[derive(Debug, Clone)]
pub struct Anomaly {
    pub keys: Vec<Vec<u8>>,
    /// Every operation on these keys, by invocation time.
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
            "{}: not linearizable ({} operations; at most {} can be ordered)",
            show_keys(&self.keys),
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

fn show_keys(keys: &[Vec<u8>]) -> String {
    let shown: Vec<String> = keys.iter().take(8).map(|k| show(k)).collect();
    let more = if keys.len() > 8 { ", ..." } else { "" };
    format!(
        "key{} {}{more}",
        if keys.len() == 1 { "" } else { "s" },
        shown.join(", ")
    )
}

fn show_writes(writes: &[(Vec<u8>, Option<Vec<u8>>)]) -> String {
    let w: Vec<String> = writes
        .iter()
        .map(|(k, v)| match v {
            Some(v) => format!("{}={}", show(k), show(v)),
            None => format!("del {}", show(k)),
        })
        .collect();
    w.join(" ")
}

fn show_opt(v: &Option<Vec<u8>>) -> String {
    v.as_ref().map_or("<absent>".to_string(), |v| show(v))
}

fn show_op(op: &Op) -> String {
    match op {
        Op::Get { key } => format!("get {}", show(key)),
        Op::Put { key, value } => format!("put {}={}", show(key), show(value)),
        Op::Delete { key } => format!("delete {}", show(key)),
        Op::Cas { key, expect, new } => {
            format!("cas {}: {} -> {}", show(key), show_opt(expect), show(new))
        }
        Op::Range { start, end } => format!(
            "range [{}, {})",
            show(start),
            end.as_ref().map_or("end".to_string(), |e| show(e))
        ),
        Op::Txn {
            compare,
            success,
            failure,
        } => {
            let c: Vec<String> = compare
                .iter()
                .map(|(k, v)| format!("{}=={}", show(k), show_opt(v)))
                .collect();
            format!(
                "txn if {} then {} else {}",
                c.join(" && "),
                show_writes(success),
                show_writes(failure)
            )
        }
    }
}

fn show_outcome(o: &Outcome) -> String {
    match o {
        Outcome::Get(v) => show_opt(v),
        Outcome::Put => "ok".to_string(),
        Outcome::Delete { existed } => format!("existed={existed}"),
        Outcome::Cas { swapped } => format!("swapped={swapped}"),
        Outcome::Range(kvs) => {
            let kv: Vec<String> = kvs
                .iter()
                .map(|(k, v)| format!("{}={}", show(k), show(v)))
                .collect();
            format!("[{}]", kv.join(" "))
        }
        Outcome::Txn { succeeded } => format!("succeeded={succeeded}"),
    }
}

/// Checks `history` with the [`DEFAULT_STEP_BUDGET`] per key.
pub fn check(history: &History) -> Report {
    check_with_budget(history, DEFAULT_STEP_BUDGET)
}

/// Checks `history`, allowing at most `budget` search steps per group of keys.
pub fn check_with_budget(history: &History, budget: u64) -> Report {
    let ops: Vec<&Operation> = history
        .operations
        .iter()
        .filter(|o| o.returned.is_some() || o.op.is_write())
        .collect();
    // Every key the history names or observed: what a range read may cover.
    let mut universe: BTreeSet<Vec<u8>> = BTreeSet::new();
    for o in &ops {
        universe.extend(o.op.named_keys());
        if let Some((_, Outcome::Range(kvs))) = &o.returned {
            universe.extend(kvs.iter().map(|(k, _)| k.clone()));
        }
    }
    // Group keys that some operation touches together (union-find), then operations by group.
    let keys: Vec<Vec<u8>> = universe.iter().cloned().collect();
    let index: HashMap<&[u8], usize> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_slice(), i))
        .collect();
    let mut parent: Vec<usize> = (0..keys.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let op_keys: Vec<Vec<usize>> = ops
        .iter()
        .map(|o| {
            o.op.keys(&universe)
                .iter()
                .map(|k| index[k.as_slice()])
                .collect()
        })
        .collect();
    for ks in &op_keys {
        for w in ks.windows(2) {
            let (a, b) = (root(&mut parent, w[0]), root(&mut parent, w[1]));
            parent[a] = b;
        }
    }
    let mut groups: BTreeMap<usize, Vec<Operation>> = BTreeMap::new();
    for (o, ks) in ops.iter().zip(&op_keys) {
        // An operation touching no key (a range over nothing) only has to have seen nothing.
        let Some(&first) = ks.first() else {
            if matches!(&o.returned, Some((_, Outcome::Range(kvs))) if !kvs.is_empty()) {
                unreachable!("keys a range observed are in the universe");
            }
            continue;
        };
        groups
            .entry(root(&mut parent, first))
            .or_default()
            .push((*o).clone());
    }
    let mut report = Report {
        keys: keys.len(),
        ..Report::default()
    };
    for (_, mut group) in groups {
        group.sort_by_key(|o| o.invoked_at);
        report.operations += group.len();
        let group_keys: Vec<Vec<u8>> = group
            .iter()
            .flat_map(|o| o.op.keys(&universe))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        match check_group(&group, &group_keys, budget) {
            KeyResult::Linearizable => {}
            KeyResult::Inconclusive => report.inconclusive.push(group_keys),
            KeyResult::Violation { longest } => report.anomalies.push(Anomaly {
                keys: group_keys,
                operations: group,
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

/// Interns one group's operations: keys as indices into `keys`, values as small integers.
fn intern(ops: &[Operation], keys: &[Vec<u8>]) -> Vec<(IOp, Option<IOutcome>)> {
    let key_index: HashMap<&[u8], usize> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_slice(), i))
        .collect();
    let k = |key: &[u8]| key_index[key];
    let mut ids: HashMap<Vec<u8>, ValueId> = HashMap::new();
    let mut id = |v: &[u8]| -> ValueId {
        let next = ids.len() as ValueId;
        *ids.entry(v.to_vec()).or_insert(next)
    };
    let writes = |ws: &[(Vec<u8>, Option<Vec<u8>>)], id: &mut dyn FnMut(&[u8]) -> ValueId| {
        ws.iter()
            .map(|(key, v)| (k(key), v.as_deref().map(&mut *id)))
            .collect::<Vec<_>>()
    };
    ops.iter()
        .map(|o| {
            let op = match &o.op {
                Op::Get { key } => IOp::Get(k(key)),
                Op::Put { key, value } => IOp::Put(k(key), id(value)),
                Op::Delete { key } => IOp::Delete(k(key)),
                Op::Cas { key, expect, new } => IOp::Cas {
                    key: k(key),
                    expect: expect.as_deref().map(&mut id),
                    new: id(new),
                },
                Op::Range { start, end } => IOp::Range(
                    keys.iter()
                        .enumerate()
                        .filter(|(_, key)| in_range(key, start, end.as_deref()))
                        .map(|(i, _)| i)
                        .collect(),
                ),
                Op::Txn {
                    compare,
                    success,
                    failure,
                } => IOp::Txn {
                    compare: writes(compare, &mut id),
                    success: writes(success, &mut id),
                    failure: writes(failure, &mut id),
                },
            };
            let out = o.returned.as_ref().map(|(_, out)| match out {
                Outcome::Get(v) => IOutcome::Get(v.as_deref().map(&mut id)),
                Outcome::Put => IOutcome::Put,
                Outcome::Delete { existed } => IOutcome::Delete { existed: *existed },
                Outcome::Cas { swapped } => IOutcome::Cas { swapped: *swapped },
                Outcome::Range(kvs) => {
                    let IOp::Range(range_keys) = &op else {
                        // A range outcome for another operation never matches.
                        return IOutcome::Range(vec![]);
                    };
                    let seen: HashMap<usize, ValueId> =
                        kvs.iter().map(|(key, v)| (k(key), id(v))).collect();
                    IOutcome::Range(range_keys.iter().map(|i| seen.get(i).copied()).collect())
                }
                Outcome::Txn { succeeded } => IOutcome::Txn {
                    succeeded: *succeeded,
                },
            });
            (op, out)
        })
        .collect()
}

fn check_group(ops: &[Operation], keys: &[Vec<u8>], budget: u64) -> KeyResult {
    let n = ops.len();
    let spec = intern(ops, keys);

    // Shortcut: a read of a value no operation wrote is never explained; saying so at once
    // avoids an exhaustive search of everything concurrent with it.
    let mut written: HashSet<ValueId> = HashSet::new();
    for (op, _) in &spec {
        match op {
            IOp::Put(_, v) | IOp::Cas { new: v, .. } => {
                written.insert(*v);
            }
            IOp::Txn {
                success, failure, ..
            } => written.extend(success.iter().chain(failure).filter_map(|(_, v)| *v)),
            _ => {}
        }
    }
    let ghost = spec.iter().any(|(_, out)| match out {
        Some(IOutcome::Get(Some(v))) => !written.contains(v),
        Some(IOutcome::Range(vs)) => vs.iter().flatten().any(|v| !written.contains(v)),
        _ => false,
    });
    if ghost {
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
    let mut state: State = vec![None; keys.len()];
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
            let (iop, out) = &spec[op];
            if let Some(next) = step(&state, iop, out.as_ref()) {
                linearized[op / 64] |= 1 << (op % 64);
                if seen.insert((linearized.clone(), next.clone())) {
                    let prev = std::mem::replace(&mut state, next);
                    stack.push((op, prev));
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
