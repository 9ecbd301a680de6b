//! The store's request and response types: what a client can ask for and what it gets back.
//!
//! Writes are [`Command`]s; the leader groups concurrent commands into one [`Batch`], which is
//! one Raft entry and therefore one fsync. Reads never go through the log.
//!
//! These types are encoded with postcard on the wire and in the log: enum variants may only be
//! added at the end, never reordered (golden-bytes tests in `tests/golden.rs`).

use serde::{Deserialize, Serialize};

use crate::limits::*;

/// A key, as raw bytes (not UTF-8).
pub type Key = Vec<u8>;
/// A store revision: increases by one with every committed write that changes state.
pub type Revision = u64;
/// A lease's id: 1 to [`MAX_LEASE_ID`] (0 means "no lease" on a key).
pub type LeaseId = u64;

/// One Raft log entry's worth of client commands, stamped by the leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Batch {
    /// Wall-clock time at the leader when it proposed the batch (ms since the Unix epoch).
    /// Apply uses this, never a local clock, so every replica computes the same state.
    pub proposed_at_ms: u64,
    /// Identifies the batch on the node that proposed it (a per-boot random nonce and a
    /// counter), so that node can answer its clients the moment the batch is applied (see
    /// [`crate::StateMachineStore::watch_proposal`]). 0: nobody waits. Apply ignores it.
    pub proposal: u128,
    pub commands: Vec<Command>,
}

/// openraft logs entries by their `Display` form: a batch shows its size, never its keys or
/// values (which may be secrets).
impl std::fmt::Display for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "batch of {} command(s)", self.commands.len())
    }
}

/// One client write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Idempotency session; `None` for writes that need no retry protection.
    pub session: Option<Session>,
    pub op: WriteOp,
}

/// Identifies a client request so that a retried write is applied at most once.
///
/// `acked_below` is the client's promise that it will never retry a sequence number below it,
/// which lets the state machine forget those results (bounded memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub client_id: u64,
    pub seq: u64,
    pub acked_below: u64,
}

/// A mutation of the key space.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteOp {
    /// Set `key` to `value`.
    Put {
        key: Key,
        value: Vec<u8>,
        prev_kv: bool,
    },
    /// Delete the keys in `[start, end)`; `end == None` deletes just `start`.
    Delete {
        start: Key,
        end: Option<Key>,
        prev_kv: bool,
    },
    /// Forget history below `revision` (reads at older revisions then fail with `Compacted`).
    Compact { revision: Revision },
    /// If every comparison holds, apply `success`, else `failure`: atomically, at one revision.
    Txn(Txn),
    /// A write to the system key space (cluster identity, invitations). Nodes propose these
    /// themselves and refuse them from clients; the system key space is invisible to reads.
    System(SystemWrite),
    /// An atomic, conditional write of several system keys (Automerge documents use it).
    /// Like [`WriteOp::System`], only nodes propose it.
    SystemTxn(SystemTxn),
    /// Creates lease `id` with a time to live of `ttl_secs` (the node picks `id` when the
    /// client leaves it 0). Leaves the revision unchanged.
    LeaseGrant { id: LeaseId, ttl_secs: u64 },
    /// Deletes lease `id` and every key attached to it (at one new revision, if any).
    LeaseRevoke { id: LeaseId },
    /// The leader's verdict that lease `id` ran out: a revoke that applies only to the grant
    /// numbered `grant` (a lease revoked and granted again under the same id is not the one
    /// that expired). Only nodes propose it.
    LeaseExpire { id: LeaseId, grant: u64 },
    /// Set `key` to `value`, with etcd's put options (a lease, or keeping the current value
    /// or lease). A plain [`WriteOp::Put`] is this with default options.
    PutWith {
        key: Key,
        value: Vec<u8>,
        prev_kv: bool,
        options: PutOptions,
    },
    /// A transaction with nested transactions, as etcd allows (see [`TxnTree`]).
    TxnTree(TxnTree),
}

/// etcd's put options.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutOptions {
    /// Attach the key to this lease (0: none; a key put without a lease leaves its old one).
    pub lease: LeaseId,
    /// Keep the key's current value (`value` must be empty; the key must exist).
    pub ignore_value: bool,
    /// Keep the key's current lease (`lease` must be 0; the key must exist).
    pub ignore_lease: bool,
}

impl PutOptions {
    pub fn validate(&self, value: &[u8]) -> Result<(), LimitError> {
        if self.ignore_value && !value.is_empty() {
            return Err(LimitError::InvalidPutOptions(
                "a put that keeps the current value must carry an empty value".into(),
            ));
        }
        if self.ignore_lease && self.lease != 0 {
            return Err(LimitError::InvalidPutOptions(
                "a put that keeps the current lease cannot name a lease".into(),
            ));
        }
        check_lease_id(self.lease, true)
    }
}

/// Checks a lease id: 1 to [`MAX_LEASE_ID`], or 0 where "none" is allowed.
pub fn check_lease_id(id: LeaseId, zero_ok: bool) -> Result<(), LimitError> {
    if (id == 0 && !zero_ok) || id > MAX_LEASE_ID {
        return Err(LimitError::LeaseIdOutOfRange {
            id,
            max: MAX_LEASE_ID,
        });
    }
    Ok(())
}

/// Checks a lease's time to live against [`MIN_LEASE_TTL_SECS`] and [`MAX_LEASE_TTL_SECS`].
pub fn check_lease_ttl(ttl_secs: u64) -> Result<(), LimitError> {
    if !(MIN_LEASE_TTL_SECS..=MAX_LEASE_TTL_SECS).contains(&ttl_secs) {
        return Err(LimitError::LeaseTtlOutOfRange {
            ttl_secs,
            min: MIN_LEASE_TTL_SECS,
            max: MAX_LEASE_TTL_SECS,
        });
    }
    Ok(())
}

/// A conditional write of one system key: if the key's current value is `expect` (when given),
/// set it to `new` (`None` deletes). System keys have no revisions or history: they are not
/// part of the client-visible MVCC key space, so writing them leaves the revision unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemWrite {
    pub key: Key,
    /// `None`: unconditional. `Some(None)`: the key must be absent. `Some(Some(v))`: its value
    /// must be `v`.
    pub expect: Option<Option<Vec<u8>>>,
    pub new: Option<Vec<u8>>,
}

impl SystemWrite {
    /// Sets `key` to `value` unless it already exists.
    pub fn put_if_absent(key: impl Into<Key>, value: Vec<u8>) -> Self {
        SystemWrite {
            key: key.into(),
            expect: Some(None),
            new: Some(value),
        }
    }
}

/// An atomic, conditional write of several system keys: if every key in `require` currently
/// holds the given value (`None`: the key is absent), apply `writes` in order; otherwise change
/// nothing. Like [`SystemWrite`], it leaves the store revision unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SystemTxn {
    pub require: Vec<(Key, Option<Vec<u8>>)>,
    pub writes: Vec<SystemOp>,
}

/// One write of a [`SystemTxn`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SystemOp {
    Put {
        key: Key,
        value: Vec<u8>,
    },
    Delete {
        key: Key,
    },
    /// Deletes every system key that starts with `prefix` (which may not be empty).
    DeletePrefix {
        prefix: Key,
    },
}

impl SystemOp {
    fn payload_bytes(&self) -> usize {
        match self {
            SystemOp::Put { key, value } => key.len() + value.len(),
            SystemOp::Delete { key } => key.len(),
            SystemOp::DeletePrefix { prefix } => prefix.len(),
        }
    }
}

impl SystemTxn {
    /// Key and value bytes it carries.
    pub fn payload_bytes(&self) -> usize {
        let require: usize = self
            .require
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum();
        require
            + self
                .writes
                .iter()
                .map(SystemOp::payload_bytes)
                .sum::<usize>()
    }

    /// Checks the transaction against the store's limits.
    pub fn validate(&self) -> Result<(), LimitError> {
        let ops = self.require.len() + self.writes.len();
        if ops > MAX_SYSTEM_TXN_OPS {
            return Err(LimitError::TooManyTxnOps {
                len: ops,
                max: MAX_SYSTEM_TXN_OPS,
            });
        }
        let bytes = self.payload_bytes();
        if bytes > MAX_SYSTEM_TXN_BYTES {
            return Err(LimitError::SystemTxnTooLarge {
                len: bytes,
                max: MAX_SYSTEM_TXN_BYTES,
            });
        }
        for (key, value) in &self.require {
            check_key(key)?;
            if let Some(v) = value {
                check_value(v)?;
            }
        }
        for op in &self.writes {
            match op {
                SystemOp::Put { key, value } => check_put(key, value)?,
                SystemOp::Delete { key } | SystemOp::DeletePrefix { prefix: key } => {
                    check_key(key)?
                }
            }
        }
        Ok(())
    }
}

/// An etcd-style transaction: compare, then one branch of writes, all at one store revision.
///
/// A write of a branch may not put a key that another write of the branch puts or deletes
/// (that would need two revisions); such a transaction is refused with
/// [`LimitError::TxnWritesOverlap`]. Two deletes may overlap, as in etcd: the later one
/// deletes only what is left.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

/// One comparison of a key's current state with a constant. An absent key has version,
/// create and mod revision 0, and no value (a `Value` comparison with it is false, as in etcd).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub key: Key,
    pub target: CompareTarget,
    pub op: CompareOp,
}

/// What a [`Compare`] looks at, and the constant it compares with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    Version(u64),
    CreateRevision(Revision),
    ModRevision(Revision),
    Value(Vec<u8>),
    /// The lease the key is attached to (0: none, or absent).
    Lease(LeaseId),
}

/// How the key's side relates to the constant: `key_side op constant`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

/// A write inside a [`Txn`] branch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    Put {
        key: Key,
        value: Vec<u8>,
        prev_kv: bool,
    },
    Delete {
        start: Key,
        end: Option<Key>,
        prev_kv: bool,
    },
    /// A put with etcd's options (see [`WriteOp::PutWith`]).
    PutWith {
        key: Key,
        value: Vec<u8>,
        prev_kv: bool,
        options: PutOptions,
    },
    /// Runs node `i` of the enclosing [`TxnTree`] here (only inside a tree).
    Nested(u32),
}

/// A transaction whose branches may hold transactions, flattened so that decoding it never
/// recurses: `nodes[0]` is the outer transaction, and [`TxnOp::Nested`]`(i)` in a branch of
/// node `j` runs node `i` there. Every node but the first is named exactly once, by a node
/// before it (`j < i`), so the nodes form a tree.
///
/// As in etcd, every comparison on the path taken is evaluated against the state before the
/// transaction, and all the writes of that path happen at one revision. No two writes that
/// could run together may put a key another one puts or deletes
/// ([`LimitError::TxnWritesOverlap`]; two deletes may overlap).
///
/// A comparison named in `ranges` holds for a range of keys rather than its one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TxnTree {
    pub nodes: Vec<Txn>,
    pub ranges: Vec<CompareRange>,
}

/// Widens comparison `compare` of node `node` of a [`TxnTree`] to the keys `[key, end)`
/// (`end` empty: every key from `key` on), as etcd's comparisons with a range end: it holds
/// when it holds for every key of the range that exists, or, if none does, for an absent key.
/// At most [`MAX_COMPARE_RANGE_KEYS`] keys may exist in the range when it is evaluated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompareRange {
    pub node: u32,
    pub compare: u32,
    pub end: Key,
}

impl TxnOp {
    fn payload_bytes(&self) -> usize {
        match self {
            TxnOp::Put { key, value, .. } | TxnOp::PutWith { key, value, .. } => {
                key.len() + value.len()
            }
            TxnOp::Delete { start, end, .. } => start.len() + end.as_ref().map_or(0, Vec::len),
            TxnOp::Nested(_) => 4,
        }
    }

    fn validate(&self) -> Result<(), LimitError> {
        match self {
            TxnOp::Put { key, value, .. } => check_put(key, value),
            TxnOp::PutWith {
                key,
                value,
                options,
                ..
            } => {
                check_put(key, value)?;
                options.validate(value)
            }
            TxnOp::Delete { start, end, .. } => check_delete(start, end.as_deref()),
            TxnOp::Nested(_) => Ok(()),
        }
    }

    /// The keys written, as `[start, end)` (`None` end: unbounded) and whether it is a put.
    /// Empty ranges give `None`.
    fn span(&self) -> Option<Span<'_>> {
        let just = |k: &[u8]| {
            let mut next = k.to_vec();
            next.push(0);
            Some(next)
        };
        match self {
            TxnOp::Put { key, .. } | TxnOp::PutWith { key, .. } => Some((key, just(key), true)),
            TxnOp::Delete {
                start, end: None, ..
            } => Some((start, just(start), false)),
            TxnOp::Delete {
                start,
                end: Some(e),
                ..
            } if e.is_empty() => Some((start, None, false)),
            TxnOp::Delete {
                start,
                end: Some(e),
                ..
            } => (e.as_slice() > start.as_slice())
                .then(|| (start.as_slice(), Some(e.clone()), false)),
            TxnOp::Nested(_) => None,
        }
    }
}

/// The first key two groups of writes both write, if any. Two deletes may overlap (as in
/// etcd): the later one deletes only what is left, at the same revision.
fn overlap(a: &[Span<'_>], b: &[Span<'_>]) -> Option<Key> {
    let below = |s: &[u8], e: &Option<Vec<u8>>| e.as_ref().is_none_or(|e| s < e.as_slice());
    for (s1, e1, put1) in a {
        for (s2, e2, put2) in b {
            if (*put1 || *put2) && below(s1, e2) && below(s2, e1) {
                return Some((*s1).max(*s2).to_vec());
            }
        }
    }
    None
}

/// Keys written, as `[start, end)` (`None` end: unbounded), and whether by a put.
type Span<'a> = (&'a [u8], Option<Vec<u8>>, bool);

impl Compare {
    /// Whether the comparison holds for the key's current state (`None`: absent).
    pub fn holds(&self, current: Option<&KeyValue>) -> bool {
        use std::cmp::Ordering;
        let ord: Option<Ordering> = match &self.target {
            CompareTarget::Version(v) => Some(current.map_or(0, |c| c.version).cmp(v)),
            CompareTarget::CreateRevision(r) => {
                Some(current.map_or(0, |c| c.create_revision).cmp(r))
            }
            CompareTarget::ModRevision(r) => Some(current.map_or(0, |c| c.mod_revision).cmp(r)),
            CompareTarget::Value(v) => current.map(|c| c.value.as_slice().cmp(v.as_slice())),
            CompareTarget::Lease(l) => Some(current.map_or(0, |c| c.lease).cmp(l)),
        };
        let Some(ord) = ord else {
            return false;
        };
        match self.op {
            CompareOp::Equal => ord == Ordering::Equal,
            CompareOp::NotEqual => ord != Ordering::Equal,
            CompareOp::Less => ord == Ordering::Less,
            CompareOp::Greater => ord == Ordering::Greater,
        }
    }
}

impl Txn {
    fn payload_bytes(&self) -> usize {
        let compares: usize = self
            .compare
            .iter()
            .map(|c| {
                c.key.len()
                    + match &c.target {
                        CompareTarget::Value(v) => v.len(),
                        _ => 8,
                    }
            })
            .sum();
        let ops: usize = self
            .success
            .iter()
            .chain(&self.failure)
            .map(TxnOp::payload_bytes)
            .sum();
        compares + ops
    }

    /// A compare-and-swap: set `key` to `new` if its value is `expect` (`None`: absent).
    pub fn compare_and_swap(key: Key, expect: Option<Vec<u8>>, new: Vec<u8>) -> Txn {
        let target = match expect {
            Some(v) => CompareTarget::Value(v),
            None => CompareTarget::Version(0),
        };
        Txn {
            compare: vec![Compare {
                key: key.clone(),
                target,
                op: CompareOp::Equal,
            }],
            success: vec![TxnOp::Put {
                key,
                value: new,
                prev_kv: false,
            }],
            failure: vec![],
        }
    }

    /// A transaction comparing values only: if every key has the given value (`None`:
    /// absent), apply `success`, else `failure`, where a write `(key, Some(v))` puts and
    /// `(key, None)` deletes.
    pub fn if_values(
        compare: Vec<(Key, Option<Vec<u8>>)>,
        success: Vec<(Key, Option<Vec<u8>>)>,
        failure: Vec<(Key, Option<Vec<u8>>)>,
    ) -> Txn {
        let writes = |ws: Vec<(Key, Option<Vec<u8>>)>| {
            ws.into_iter()
                .map(|(key, v)| match v {
                    Some(value) => TxnOp::Put {
                        key,
                        value,
                        prev_kv: false,
                    },
                    None => TxnOp::Delete {
                        start: key,
                        end: None,
                        prev_kv: false,
                    },
                })
                .collect()
        };
        Txn {
            compare: compare
                .into_iter()
                .map(|(key, v)| Compare {
                    key,
                    target: match v {
                        Some(v) => CompareTarget::Value(v),
                        None => CompareTarget::Version(0),
                    },
                    op: CompareOp::Equal,
                })
                .collect(),
            success: writes(success),
            failure: writes(failure),
        }
    }

    fn validate(&self) -> Result<(), LimitError> {
        self.validate_ops()?;
        if self
            .success
            .iter()
            .chain(&self.failure)
            .any(|op| matches!(op, TxnOp::Nested(_)))
        {
            return Err(LimitError::BadTxnTree(
                "a nested transaction outside a transaction tree".into(),
            ));
        }
        for branch in [&self.success, &self.failure] {
            let groups: Vec<Vec<Span<'_>>> = branch
                .iter()
                .filter_map(TxnOp::span)
                .map(|s| vec![s])
                .collect();
            check_disjoint(&groups)?;
        }
        Ok(())
    }

    /// The checks of one transaction on its own: sizes, keys and values.
    fn validate_ops(&self) -> Result<(), LimitError> {
        let len = self.compare.len() + self.success.len().max(self.failure.len());
        if len > MAX_TXN_OPS {
            return Err(LimitError::TooManyTxnOps {
                len,
                max: MAX_TXN_OPS,
            });
        }
        for c in &self.compare {
            check_key(&c.key)?;
            if let CompareTarget::Value(v) = &c.target {
                check_value(v)?;
            }
        }
        for op in self.success.iter().chain(&self.failure) {
            op.validate()?;
        }
        Ok(())
    }
}

/// Refuses groups of writes that could run together when one puts a key another writes.
fn check_disjoint(groups: &[Vec<Span<'_>>]) -> Result<(), LimitError> {
    for (i, a) in groups.iter().enumerate() {
        for b in &groups[i + 1..] {
            if let Some(key) = overlap(a, b) {
                return Err(LimitError::TxnWritesOverlap { key });
            }
        }
    }
    Ok(())
}

impl TxnTree {
    /// Checks every node, the tree's shape, its total size, and that no write puts a key
    /// another write that could run with it puts or deletes.
    pub fn validate(&self) -> Result<(), LimitError> {
        let n = self.nodes.len();
        if n == 0 {
            return Err(LimitError::BadTxnTree(
                "a transaction tree has no nodes".into(),
            ));
        }
        if n > MAX_TXN_OPS {
            return Err(LimitError::TooManyTxnOps {
                len: n,
                max: MAX_TXN_OPS,
            });
        }
        let total: usize = self
            .nodes
            .iter()
            .map(|t| t.compare.len() + t.success.len() + t.failure.len())
            .sum();
        if total > MAX_TXN_TREE_OPS {
            return Err(LimitError::TooManyTxnOps {
                len: total,
                max: MAX_TXN_TREE_OPS,
            });
        }
        let mut named = vec![false; n];
        for (j, node) in self.nodes.iter().enumerate() {
            node.validate_ops()?;
            for op in node.success.iter().chain(&node.failure) {
                if let TxnOp::Nested(i) = op {
                    let i = *i as usize;
                    if i <= j || i >= n {
                        return Err(LimitError::BadTxnTree(format!(
                            "node {j} names node {i}: only a later node of the {n} exists \
                             for it"
                        )));
                    }
                    if std::mem::replace(&mut named[i], true) {
                        return Err(LimitError::BadTxnTree(format!("node {i} is named twice")));
                    }
                }
            }
        }
        if let Some(i) = named.iter().skip(1).position(|x| !x) {
            return Err(LimitError::BadTxnTree(format!(
                "node {} is never named",
                i + 1
            )));
        }
        let mut ranged = std::collections::BTreeSet::new();
        for r in &self.ranges {
            let exists = self
                .nodes
                .get(r.node as usize)
                .is_some_and(|t| (r.compare as usize) < t.compare.len());
            if !exists {
                return Err(LimitError::BadTxnTree(format!(
                    "a key range for comparison {} of node {}, which does not exist",
                    r.compare, r.node
                )));
            }
            if !ranged.insert((r.node, r.compare)) {
                return Err(LimitError::BadTxnTree(format!(
                    "two key ranges for comparison {} of node {}",
                    r.compare, r.node
                )));
            }
            if r.end.len() > MAX_KEY_BYTES {
                return Err(LimitError::KeyTooLarge {
                    len: r.end.len(),
                    max: MAX_KEY_BYTES,
                });
            }
        }
        // Bottom up (children come after their parents): the keys each node could write,
        // whichever branches run, checked branch by branch.
        let mut possible: Vec<Vec<Span<'_>>> = vec![Vec::new(); n];
        for j in (0..n).rev() {
            let node = &self.nodes[j];
            let mut all = Vec::new();
            for branch in [&node.success, &node.failure] {
                let mut groups: Vec<Vec<Span<'_>>> = Vec::with_capacity(branch.len());
                for op in branch {
                    match op {
                        TxnOp::Nested(i) => groups.push(std::mem::take(&mut possible[*i as usize])),
                        op => groups.extend(op.span().map(|s| vec![s])),
                    }
                }
                check_disjoint(&groups)?;
                // Both branches' children were taken above; keep their spans for the parent.
                for g in groups {
                    all.extend(g);
                }
            }
            possible[j] = all;
        }
        Ok(())
    }
}

impl WriteOp {
    /// Key and value bytes this op carries (for batch sizing).
    pub fn payload_bytes(&self) -> usize {
        match self {
            WriteOp::Put { key, value, .. } | WriteOp::PutWith { key, value, .. } => {
                key.len() + value.len()
            }
            WriteOp::Delete { start, end, .. } => start.len() + end.as_ref().map_or(0, Vec::len),
            WriteOp::Compact { .. }
            | WriteOp::LeaseGrant { .. }
            | WriteOp::LeaseRevoke { .. }
            | WriteOp::LeaseExpire { .. } => 8,
            WriteOp::System(w) => {
                w.key.len()
                    + w.new.as_ref().map_or(0, Vec::len)
                    + w.expect
                        .as_ref()
                        .and_then(|e| e.as_ref())
                        .map_or(0, Vec::len)
            }
            WriteOp::Txn(t) => t.payload_bytes(),
            WriteOp::SystemTxn(t) => t.payload_bytes(),
            WriteOp::TxnTree(t) => {
                t.nodes.iter().map(Txn::payload_bytes).sum::<usize>()
                    + t.ranges.iter().map(|r| r.end.len() + 8).sum::<usize>()
            }
        }
    }

    /// Checks the op against the store's limits.
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            WriteOp::Put { key, value, .. } => check_put(key, value),
            WriteOp::PutWith {
                key,
                value,
                options,
                ..
            } => {
                check_put(key, value)?;
                options.validate(value)
            }
            WriteOp::Delete { start, end, .. } => check_delete(start, end.as_deref()),
            WriteOp::Compact { .. } => Ok(()),
            WriteOp::LeaseGrant { id, ttl_secs } => {
                check_lease_id(*id, false)?;
                check_lease_ttl(*ttl_secs)
            }
            WriteOp::LeaseRevoke { id } | WriteOp::LeaseExpire { id, .. } => {
                check_lease_id(*id, false)
            }
            WriteOp::Txn(t) => t.validate(),
            WriteOp::TxnTree(t) => t.validate(),
            WriteOp::SystemTxn(t) => t.validate(),
            WriteOp::System(w) => {
                check_key(&w.key)?;
                for v in [w.new.as_ref(), w.expect.as_ref().and_then(|e| e.as_ref())]
                    .into_iter()
                    .flatten()
                {
                    check_value(v)?;
                }
                Ok(())
            }
        }
    }

    /// Whether only nodes may propose this op: writes of the system key space, and lease
    /// expiry (the leader's verdict).
    pub fn is_system(&self) -> bool {
        matches!(
            self,
            WriteOp::System(_) | WriteOp::SystemTxn(_) | WriteOp::LeaseExpire { .. }
        )
    }
}

fn check_put(key: &[u8], value: &[u8]) -> Result<(), LimitError> {
    check_key(key)?;
    check_value(value)
}

fn check_value(value: &[u8]) -> Result<(), LimitError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(LimitError::ValueTooLarge {
            len: value.len(),
            max: MAX_VALUE_BYTES,
        });
    }
    Ok(())
}

fn check_delete(start: &[u8], end: Option<&[u8]>) -> Result<(), LimitError> {
    check_key(start)?;
    if let Some(end) = end {
        if end.len() > MAX_KEY_BYTES {
            return Err(LimitError::KeyTooLarge {
                len: end.len(),
                max: MAX_KEY_BYTES,
            });
        }
    }
    Ok(())
}

fn check_key(key: &[u8]) -> Result<(), LimitError> {
    if key.is_empty() {
        return Err(LimitError::EmptyKey);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(LimitError::KeyTooLarge {
            len: key.len(),
            max: MAX_KEY_BYTES,
        });
    }
    Ok(())
}

/// A limit violation. Checked by clients, by the node before proposing, and again at apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum LimitError {
    #[error("key is empty")]
    EmptyKey,
    #[error("key is {len} bytes, the limit is {max}")]
    KeyTooLarge { len: usize, max: usize },
    #[error("value is {len} bytes, the limit is {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error("range limit {limit} exceeds the maximum {max}")]
    RangeLimitTooLarge { limit: u64, max: u64 },
    #[error("batch of {len} commands exceeds the limit of {max}")]
    TooManyCommands { len: usize, max: usize },
    #[error(
        "transaction has {len} operations (comparisons plus the larger branch), the limit is {max}"
    )]
    TooManyTxnOps { len: usize, max: usize },
    #[error("a transaction puts key {key:?} and writes it again")]
    TxnWritesOverlap { key: Key },
    #[error("system transaction carries {len} bytes, the limit is {max}")]
    SystemTxnTooLarge { len: usize, max: usize },
    #[error("lease id {id} is out of range: lease ids are 1 to {max}")]
    LeaseIdOutOfRange { id: LeaseId, max: LeaseId },
    #[error("a lease's time to live must be {min} to {max} seconds, not {ttl_secs}")]
    LeaseTtlOutOfRange { ttl_secs: u64, min: u64, max: u64 },
    #[error("{0}")]
    InvalidPutOptions(String),
    #[error("malformed transaction tree: {0}")]
    BadTxnTree(String),
    #[error("a comparison's key range holds more than {max} keys")]
    CompareRangeTooLarge { max: usize },
}

/// A key and its metadata, as stored at some revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: Key,
    pub value: Vec<u8>,
    /// Revision of the write that created the key (since its last delete).
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// Number of writes since the key was created (1 after creation).
    pub version: u64,
    /// Lease the key is attached to (0: none): the key is deleted when the lease ends.
    pub lease: LeaseId,
}

/// What one command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteOutcome {
    Put {
        revision: Revision,
        prev: Option<KeyValue>,
    },
    Delete {
        revision: Revision,
        deleted: u64,
        prev: Vec<KeyValue>,
    },
    Compact {
        revision: Revision,
    },
    /// `succeeded`: whether the comparisons held (and `success` ran, else `failure`).
    /// `results`: one outcome per write of the branch that ran, each `Put` or `Delete`, or
    /// (in a [`WriteOp::TxnTree`]) a nested `Txn`.
    Txn {
        revision: Revision,
        succeeded: bool,
        #[serde(deserialize_with = "outcome_depth::deserialize")]
        results: Vec<WriteOutcome>,
    },
    /// `written`: whether `expect` held (and `new` was written). `current`: the key's value
    /// after the write. `revision`: the (unchanged) store revision.
    System {
        revision: Revision,
        written: bool,
        current: Option<Vec<u8>>,
    },
    /// `applied`: whether every requirement held (and the writes were applied).
    SystemTxn {
        revision: Revision,
        applied: bool,
    },
    /// A lease was granted. `grant`: its grant number (see [`WriteOp::LeaseExpire`]).
    LeaseGrant {
        revision: Revision,
        id: LeaseId,
        ttl_secs: u64,
        grant: u64,
    },
    /// A lease was revoked (or expired): `deleted` keys went with it, at `revision`.
    /// `revoked` is false only for a [`WriteOp::LeaseExpire`] of a lease already gone.
    LeaseRevoke {
        revision: Revision,
        deleted: u64,
        revoked: bool,
    },
}

impl WriteOutcome {
    /// Store revision after this write.
    pub fn revision(&self) -> Revision {
        match self {
            WriteOutcome::Put { revision, .. }
            | WriteOutcome::Delete { revision, .. }
            | WriteOutcome::Compact { revision }
            | WriteOutcome::Txn { revision, .. }
            | WriteOutcome::System { revision, .. }
            | WriteOutcome::SystemTxn { revision, .. }
            | WriteOutcome::LeaseGrant { revision, .. }
            | WriteOutcome::LeaseRevoke { revision, .. } => *revision,
        }
    }
}

/// Why the state machine refused a command. Deterministic: every replica refuses alike.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error(
        "request {seq} of client {client_id:016x} was already acknowledged; it cannot be retried"
    )]
    StaleSequence { client_id: u64, seq: u64 },
    #[error("client {client_id:016x} has more than {max} unacknowledged requests")]
    SessionWindowFull { client_id: u64, max: u64 },
    #[error("revision {requested} is already compacted (compacted up to {compacted})")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    #[error("revision {requested} is in the future (current revision {current})")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    #[error("lease {id} not found")]
    LeaseNotFound { id: LeaseId },
    #[error("lease {id} already exists")]
    LeaseExists { id: LeaseId },
    #[error("{max} leases exist already; revoke some first")]
    TooManyLeases { max: u64 },
    #[error("lease {id} already holds {max} keys")]
    LeaseFull { id: LeaseId, max: u64 },
    #[error("key {key:?} not found (a put that keeps the current value or lease needs it)")]
    KeyNotFound { key: Key },
}

/// The result of one command in a batch.
pub type CommandResult = Result<WriteOutcome, ApplyError>;

/// Bounds how deep a [`WriteOutcome::Txn`] nests while it is decoded (the answer to a
/// transaction tree comes from the network): deeper than [`MAX_OUTCOME_DEPTH`] is a decode
/// error, not a stack overflow. The depth is counted per thread, as decoding never yields.
mod outcome_depth {
    use std::cell::Cell;

    use serde::de::Error;
    use serde::{Deserialize, Deserializer};

    use super::WriteOutcome;
    use crate::limits::MAX_OUTCOME_DEPTH;

    thread_local! {
        static DEPTH: Cell<usize> = const { Cell::new(0) };
    }

    /// One level of nesting being decoded; leaving it (also on an error) counts it off.
    struct Level;

    impl Level {
        fn enter() -> Option<Level> {
            DEPTH.with(|depth| {
                let next = depth.get() + 1;
                (next <= MAX_OUTCOME_DEPTH).then(|| {
                    depth.set(next);
                    Level
                })
            })
        }
    }

    impl Drop for Level {
        fn drop(&mut self) {
            DEPTH.with(|depth| depth.set(depth.get() - 1));
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        decoder: D,
    ) -> Result<Vec<WriteOutcome>, D::Error> {
        let _level = Level::enter().ok_or_else(|| {
            D::Error::custom(format!(
                "a transaction outcome nests deeper than {MAX_OUTCOME_DEPTH} levels"
            ))
        })?;
        Vec::<WriteOutcome>::deserialize(decoder)
    }
}

/// The state machine's response to one batch: one result per command, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BatchResponse {
    pub results: Vec<CommandResult>,
}

/// A range read: keys in `[start, end)`, or the single key `start` when `end` is `None`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    pub start: Key,
    /// Exclusive end. `None`: only `start`. An empty vector means "to the end of the key space".
    pub end: Option<Key>,
    /// Most keys to return (0: [`MAX_RANGE_LIMIT`]).
    pub limit: u64,
    /// Read as of this revision (0: the current revision).
    pub revision: Revision,
}

impl RangeRequest {
    /// A read of one key.
    pub fn key(key: impl Into<Key>) -> Self {
        RangeRequest {
            start: key.into(),
            end: None,
            limit: 0,
            revision: 0,
        }
    }

    /// A read of every key that starts with `prefix`.
    pub fn prefix(prefix: impl Into<Key>) -> Self {
        let start = prefix.into();
        let end = prefix_end(&start);
        RangeRequest {
            start,
            end: Some(end),
            limit: 0,
            revision: 0,
        }
    }

    pub fn validate(&self) -> Result<(), LimitError> {
        if self.start.len() > MAX_KEY_BYTES {
            return Err(LimitError::KeyTooLarge {
                len: self.start.len(),
                max: MAX_KEY_BYTES,
            });
        }
        if let Some(end) = &self.end {
            if end.len() > MAX_KEY_BYTES {
                return Err(LimitError::KeyTooLarge {
                    len: end.len(),
                    max: MAX_KEY_BYTES,
                });
            }
        }
        if self.limit > MAX_RANGE_LIMIT {
            return Err(LimitError::RangeLimitTooLarge {
                limit: self.limit,
                max: MAX_RANGE_LIMIT,
            });
        }
        Ok(())
    }
}

/// The smallest key greater than every key starting with `prefix`; empty means "no end".
pub fn prefix_end(prefix: &[u8]) -> Key {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

/// The answer to a [`RangeRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResponse {
    pub kvs: Vec<KeyValue>,
    /// More keys remain in the range: continue from the last returned key plus a zero byte,
    /// at the same `revision`.
    pub more: bool,
    /// The revision the read was served at (pass it back to continue consistently).
    pub revision: Revision,
}

/// A read of what changed, for watches: the events of keys in `[start, end)` (or of the key
/// `start` when `end` is `None`; an empty `end` means "to the end of the key space"), from
/// revision `from` on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesRequest {
    pub start: Key,
    pub end: Option<Key>,
    /// The first revision whose events are wanted (0: the next one, "from now").
    pub from: Revision,
    /// Within revision `from`, only keys after this one (resuming a fragment).
    pub after: Option<Key>,
    /// Also return each key's value before the event.
    pub prev_kv: bool,
}

impl ChangesRequest {
    pub fn validate(&self) -> Result<(), LimitError> {
        for key in [Some(&self.start), self.end.as_ref(), self.after.as_ref()]
            .into_iter()
            .flatten()
        {
            if key.len() > MAX_KEY_BYTES {
                return Err(LimitError::KeyTooLarge {
                    len: key.len(),
                    max: MAX_KEY_BYTES,
                });
            }
        }
        Ok(())
    }
}

/// What happened to a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One key's change at one revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    /// A put: the key-value written. A delete: the key, with `mod_revision` the revision of
    /// the delete and every other field empty (as etcd reports it).
    pub kv: KeyValue,
    /// The key-value before the event, when asked for and the key existed.
    pub prev_kv: Option<KeyValue>,
}

/// One page of changes: whole revisions in order (each revision's events in key order),
/// except that a revision over [`crate::limits::MAX_CHANGES_BYTES`] is split after a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesPage {
    pub events: Vec<Event>,
    /// Where the next page starts: revision `next_from`, after key `next_after` (set only
    /// when this page ended inside a revision). Every earlier event of the range was in
    /// this page or before it.
    pub next_from: Revision,
    pub next_after: Option<Key>,
    /// The store's revision when read.
    pub revision: Revision,
    /// Its compaction point.
    pub compacted: Revision,
}

/// A lease as the store holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub id: LeaseId,
    /// The time to live it was granted with (each keep-alive extends it by this much).
    pub ttl_secs: u64,
    /// Its grant number (see [`WriteOp::LeaseExpire`]).
    pub grant: u64,
    /// How many keys are attached.
    pub key_count: u64,
    /// The attached keys, in key order, when asked for.
    pub keys: Vec<Key>,
}

/// A read refused by the state machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("revision {requested} is already compacted (compacted up to {compacted})")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    #[error("revision {requested} is in the future (current revision {current})")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    #[error("storage error: {0}")]
    Storage(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Random small trees: ops are puts or deletes of one of four keys; each node after the
    /// first is placed in a branch of an earlier one. Sometimes one more (malformed) nested
    /// reference is added.
    fn arb_tree() -> impl Strategy<Value = TxnTree> {
        let op = prop_oneof![
            (0u8..4).prop_map(|k| TxnOp::Put {
                key: vec![b'a' + k],
                value: vec![],
                prev_kv: false
            }),
            (0u8..4).prop_map(|k| TxnOp::Delete {
                start: vec![b'a' + k],
                end: None,
                prev_kv: false
            }),
        ];
        let node = (
            proptest::collection::vec(op.clone(), 0..3),
            proptest::collection::vec(op, 0..3),
            any::<prop::sample::Index>(),
            any::<bool>(),
        );
        (
            proptest::collection::vec(node, 0..6),
            proptest::option::weighted(0.2, (0u32..7, any::<prop::sample::Index>())),
        )
            .prop_map(|(specs, extra)| {
                let mut nodes: Vec<Txn> = specs
                    .iter()
                    .map(|(success, failure, _, _)| Txn {
                        compare: vec![],
                        success: success.clone(),
                        failure: failure.clone(),
                    })
                    .collect();
                for (i, (_, _, parent, on_success)) in specs.iter().enumerate().skip(1) {
                    let parent = &mut nodes[parent.index(i)];
                    let branch = if *on_success {
                        &mut parent.success
                    } else {
                        &mut parent.failure
                    };
                    branch.push(TxnOp::Nested(i as u32));
                }
                if let (Some((target, at)), false) = (extra, nodes.is_empty()) {
                    let j = at.index(nodes.len());
                    nodes[j].failure.push(TxnOp::Nested(target));
                }
                TxnTree {
                    nodes,
                    ranges: vec![],
                }
            })
    }

    /// Every path through a well-formed tree (each node that runs picks either branch): the
    /// keys each path writes, in order.
    fn paths(tree: &TxnTree, j: usize) -> Vec<Vec<(Vec<u8>, bool)>> {
        let mut out = Vec::new();
        for branch in [&tree.nodes[j].success, &tree.nodes[j].failure] {
            let mut partial: Vec<Vec<(Vec<u8>, bool)>> = vec![Vec::new()];
            for op in branch {
                let extensions: Vec<Vec<(Vec<u8>, bool)>> = match op {
                    TxnOp::Nested(i) => paths(tree, *i as usize),
                    TxnOp::Put { key, .. } => vec![vec![(key.clone(), true)]],
                    TxnOp::Delete { start, .. } => vec![vec![(start.clone(), false)]],
                    TxnOp::PutWith { key, .. } => vec![vec![(key.clone(), true)]],
                };
                partial = partial
                    .iter()
                    .flat_map(|p| {
                        extensions.iter().map(move |e| {
                            let mut p = p.clone();
                            p.extend(e.iter().cloned());
                            p
                        })
                    })
                    .collect();
            }
            out.extend(partial);
        }
        out
    }

    /// The tree's shape, checked the slow way: node 0 is the root, each other node is named
    /// exactly once by an earlier node.
    fn well_formed(tree: &TxnTree) -> bool {
        let n = tree.nodes.len();
        let mut named = vec![0; n];
        for (j, node) in tree.nodes.iter().enumerate() {
            for op in node.success.iter().chain(&node.failure) {
                if let TxnOp::Nested(i) = op {
                    let i = *i as usize;
                    if i <= j || i >= n {
                        return false;
                    }
                    named[i] += 1;
                }
            }
        }
        n > 0 && named.iter().skip(1).all(|c| *c == 1)
    }

    proptest! {
        /// A tree is refused exactly when it is malformed or some path through it puts a key
        /// and writes it again (found by listing every path).
        #[test]
        fn txn_trees_are_refused_exactly_when_a_path_puts_a_key_it_writes_again(tree in arb_tree()) {
            let verdict = tree.validate();
            if !well_formed(&tree) {
                prop_assert!(matches!(verdict, Err(LimitError::BadTxnTree(_))), "{:?}", verdict);
                return Ok(());
            }
            // A key put, and written again on the same path (two deletes may share a key).
            let twice = paths(&tree, 0).iter().any(|p| {
                p.iter().enumerate().any(|(i, (k1, put1))| {
                    p[i + 1..].iter().any(|(k2, put2)| k1 == k2 && (*put1 || *put2))
                })
            });
            if twice {
                prop_assert!(matches!(verdict, Err(LimitError::TxnWritesOverlap { .. })), "{:?}", verdict);
            } else {
                prop_assert_eq!(verdict, Ok(()));
            }
        }
    }

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"ab"), b"ac".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), Vec::<u8>::new());
        assert_eq!(prefix_end(b""), Vec::<u8>::new());
    }

    #[test]
    fn limits_are_enforced() {
        let big = vec![0u8; MAX_KEY_BYTES + 1];
        let op = WriteOp::Put {
            key: big,
            value: vec![],
            prev_kv: false,
        };
        assert!(matches!(op.validate(), Err(LimitError::KeyTooLarge { .. })));
        let op = WriteOp::Put {
            key: b"k".to_vec(),
            value: vec![0; MAX_VALUE_BYTES + 1],
            prev_kv: false,
        };
        assert!(matches!(
            op.validate(),
            Err(LimitError::ValueTooLarge { .. })
        ));
        let op = WriteOp::Put {
            key: vec![],
            value: vec![],
            prev_kv: false,
        };
        assert_eq!(op.validate(), Err(LimitError::EmptyKey));
    }

    /// The encoding of a transaction outcome nested `depth` deep (each level's one result is
    /// the next level), written directly: building such a value and dropping it would recurse
    /// as deep as decoding it does.
    fn nested_outcome_bytes(depth: usize) -> Vec<u8> {
        let leaf = postcard::to_allocvec(&WriteOutcome::Txn {
            revision: 1,
            succeeded: true,
            results: vec![],
        })
        .unwrap();
        // The last byte is the empty result list's length; one result instead: 1.
        assert_eq!(leaf.last(), Some(&0));
        let mut level = leaf[..leaf.len() - 1].to_vec();
        level.push(1);
        let mut bytes = level.repeat(depth - 1);
        bytes.extend_from_slice(&leaf);
        bytes
    }

    fn nested_outcome(depth: usize) -> WriteOutcome {
        let mut outcome = WriteOutcome::Txn {
            revision: 1,
            succeeded: true,
            results: vec![],
        };
        for _ in 1..depth {
            outcome = WriteOutcome::Txn {
                revision: 1,
                succeeded: true,
                results: vec![outcome],
            };
        }
        outcome
    }

    #[test]
    fn a_transaction_outcome_nested_too_deep_is_a_decode_error_not_a_stack_overflow() {
        let deepest = nested_outcome_bytes(MAX_OUTCOME_DEPTH);
        assert_eq!(
            postcard::from_bytes::<WriteOutcome>(&deepest).unwrap(),
            nested_outcome(MAX_OUTCOME_DEPTH)
        );
        assert!(
            postcard::from_bytes::<WriteOutcome>(&nested_outcome_bytes(MAX_OUTCOME_DEPTH + 1))
                .is_err()
        );
        // A million levels: with no limit this overflows the test thread's stack (an abort).
        let hostile = nested_outcome_bytes(1_000_000);
        let result: CommandResult = Ok(WriteOutcome::Txn {
            revision: 1,
            succeeded: true,
            results: vec![],
        });
        assert!(postcard::from_bytes::<WriteOutcome>(&hostile).is_err());
        // Inside a larger answer too, and the count is back to zero afterwards.
        let mut batch = postcard::to_allocvec(&BatchResponse {
            results: vec![result.clone()],
        })
        .unwrap();
        let at = batch.len() - postcard::to_allocvec(&result).unwrap().len();
        batch.truncate(at);
        batch.push(0); // Ok
        batch.extend_from_slice(&hostile);
        assert!(postcard::from_bytes::<BatchResponse>(&batch).is_err());
        assert_eq!(
            postcard::from_bytes::<WriteOutcome>(&deepest).unwrap(),
            nested_outcome(MAX_OUTCOME_DEPTH)
        );
    }

    proptest! {
        /// Outcomes of any depth up to a little past the limit: those within it come back
        /// exactly, deeper ones are refused; garbage after any prefix never panics.
        #[test]
        fn outcomes_decode_exactly_up_to_the_depth_limit(
            depth in 1usize..MAX_OUTCOME_DEPTH + 8,
            cut in any::<prop::sample::Index>(),
        ) {
            let bytes = nested_outcome_bytes(depth);
            let decoded = postcard::from_bytes::<WriteOutcome>(&bytes);
            if depth <= MAX_OUTCOME_DEPTH {
                prop_assert_eq!(decoded.unwrap(), nested_outcome(depth));
            } else {
                prop_assert!(decoded.is_err());
            }
            let cut = cut.index(bytes.len());
            prop_assert!(postcard::from_bytes::<WriteOutcome>(&bytes[..cut]).is_err());
        }
    }
}
