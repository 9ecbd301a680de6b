//! Multi-node tests of the store over the in-memory network, with real redb files.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use aspen_kv::api::*;
use aspen_kv::limits;
use aspen_kv::testing::{member, MemRouter};
use aspen_kv::{NodeId, Raft, StateDigest, StateMachineStore};
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, RaftError};

const TIMEOUT: Duration = Duration::from_secs(30);

struct Node {
    raft: Raft,
    sm: StateMachineStore,
}

struct Cluster {
    router: MemRouter,
    dir: tempfile::TempDir,
    nodes: BTreeMap<NodeId, Node>,
    snapshot_every: u64,
}

impl Cluster {
    fn new(snapshot_every: u64) -> Self {
        Cluster {
            router: MemRouter::new(),
            dir: tempfile::tempdir().unwrap(),
            nodes: BTreeMap::new(),
            snapshot_every,
        }
    }

    fn node_dir(&self, id: NodeId) -> PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    async fn start(&mut self, id: NodeId) {
        // After an in-process stop, a task of the old instance may still hold the database for
        // a moment (redb refuses a second open in one process): wait for it to let go.
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let (log, sm) = loop {
            match aspen_kv::open(&self.node_dir(id)) {
                Ok(store) => break store,
                Err(aspen_kv::storage::OpenError::Db(_, redb::Error::DatabaseAlreadyOpen))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => panic!("cannot open node {id}: {e}"),
            }
        };
        let raft = Raft::new(
            id,
            aspen_kv::raft_config(self.snapshot_every, 1000),
            self.router.network(id),
            log,
            sm.clone(),
        )
        .await
        .unwrap();
        self.router.register(id, raft.clone(), sm.clone());
        self.nodes.insert(id, Node { raft, sm });
    }

    /// Stops a node abruptly: its Raft task ends and nothing more is written.
    async fn stop(&mut self, id: NodeId) {
        self.router.unregister(id);
        let node = self.nodes.remove(&id).unwrap();
        node.raft.shutdown().await.unwrap();
    }

    /// The leader, once every running node that knows a leader agrees on it (with `all`:
    /// once every running node knows it).
    async fn leader(&self) -> NodeId {
        self.agreed_leader(false).await
    }

    async fn agreed_leader(&self, all: bool) -> NodeId {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let views: Vec<Option<NodeId>> = self
                .nodes
                .values()
                .map(|n| n.raft.metrics().borrow_watched().current_leader)
                .collect();
            let known: Vec<NodeId> = views.iter().flatten().copied().collect();
            if let Some(l) = known.first() {
                let agreed = known.iter().all(|v| v == l) && (!all || known.len() == views.len());
                let self_view = self
                    .nodes
                    .get(l)
                    .map(|n| n.raft.metrics().borrow_watched().state.is_leader());
                if agreed && self_view == Some(true) {
                    return *l;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no agreed leader: {views:?}"
            );
            // Wake on any metrics change of the first node, or re-check shortly.
            let mut rx = self.nodes.values().next().unwrap().raft.metrics();
            let _ = tokio::time::timeout(std::time::Duration::from_millis(50), rx.changed()).await;
        }
    }

    async fn form(&mut self, ids: &[NodeId]) {
        for id in ids {
            self.start(*id).await;
        }
        let first = ids[0];
        let mut members = BTreeMap::new();
        members.insert(first, member(first));
        self.nodes[&first].raft.initialize(members).await.unwrap();
        self.leader().await;
        for id in &ids[1..] {
            self.add(*id).await;
        }
    }

    async fn add(&mut self, id: NodeId) {
        let leader = self.leader().await;
        let raft = &self.nodes[&leader].raft;
        // openraft refuses a membership change while the last one is uncommitted (a new
        // leader's initial membership included).
        let mut metrics = raft.metrics();
        while {
            let m = metrics.borrow_watched();
            m.committed_membership_config.log_id() != m.membership_config.log_id()
        } {
            metrics.changed().await.unwrap();
        }
        raft.add_learner(id, member(id), true).await.unwrap();
        let voters: std::collections::BTreeSet<NodeId> = raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .chain([id])
            .collect();
        raft.change_membership(voters, false).await.unwrap();
    }

    async fn write(&self, ops: Vec<WriteOp>) -> Vec<CommandResult> {
        let commands = ops
            .into_iter()
            .map(|op| Command { session: None, op })
            .collect();
        let batch = Batch {
            proposed_at_ms: 1,
            proposal: 0,
            commands,
        };
        self.write_batch(batch, &[]).await
    }

    /// Writes `batch` through the leader (never one of `avoid`), as a client does: a leader
    /// that refuses it (openraft refuses writes on a leader that has not heard from a quorum
    /// within its lease, which a loaded machine can cause) is asked again.
    async fn write_batch(&self, batch: Batch, avoid: &[NodeId]) -> Vec<CommandResult> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let leader = self
                .nodes
                .iter()
                .filter(|(id, _)| !avoid.contains(id))
                .find_map(|(_, n)| n.raft.metrics().borrow_watched().current_leader)
                .filter(|l| !avoid.contains(l) && self.nodes.contains_key(l));
            if let Some(leader) = leader {
                match self.nodes[&leader].raft.client_write(batch.clone()).await {
                    Ok(r) => return r.data.results,
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {}
                    Err(e) => panic!("write failed: {e}"),
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no leader took the write within {TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn put(&self, k: &str, v: &str) -> Revision {
        let r = self
            .write(vec![WriteOp::Put {
                key: k.into(),
                value: v.into(),
                prev_kv: false,
            }])
            .await;
        r[0].as_ref().unwrap().revision()
    }

    /// Waits until every running node has applied everything the leader has.
    async fn converge(&self) {
        let leader = self.agreed_leader(true).await;
        let target = self.nodes[&leader]
            .raft
            .metrics()
            .borrow_watched()
            .last_log_index
            .unwrap();
        for node in self.nodes.values() {
            node.raft
                .wait(Some(TIMEOUT))
                .applied_index_at_least(Some(target), "converge")
                .await
                .unwrap();
        }
    }
}

fn put(k: &str, v: &str) -> WriteOp {
    WriteOp::Put {
        key: k.into(),
        value: v.into(),
        prev_kv: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_and_agree() {
    let mut c = Cluster::new(10_000);
    c.form(&[1, 2, 3]).await;
    for i in 0..50 {
        c.put(&format!("k{i:03}"), &format!("v{i}")).await;
    }
    c.converge().await;
    let digests: Vec<_> = futures_digests(&c).await;
    assert!(
        digests.windows(2).all(|w| w[0] == w[1]),
        "replicas differ: {digests:?}"
    );
    assert_eq!(digests[0].keys, 50);
    for node in c.nodes.values() {
        let kv = node.sm.get(b"k007".to_vec(), 0).await.unwrap().unwrap();
        assert_eq!(kv.value, b"v7");
    }
}

async fn futures_digests(c: &Cluster) -> Vec<StateDigest> {
    let mut out = Vec::new();
    for node in c.nodes.values() {
        out.push(node.sm.state_digest().await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mvcc_revisions_history_and_compaction() {
    let mut c = Cluster::new(10_000);
    c.form(&[1]).await;
    let r1 = c.put("a", "1").await;
    let r2 = c.put("a", "2").await;
    let r3 = c.put("b", "x").await;
    assert_eq!((r2, r3), (r1 + 1, r1 + 2));
    let sm = &c.nodes[&1].sm;
    let now = sm.get(b"a".to_vec(), 0).await.unwrap().unwrap();
    assert_eq!(
        (now.create_revision, now.mod_revision, now.version),
        (r1, r2, 2)
    );
    assert_eq!(
        sm.get(b"a".to_vec(), r1).await.unwrap().unwrap().value,
        b"1"
    );
    assert_eq!(
        sm.get(b"b".to_vec(), r1).await.unwrap(),
        None,
        "b did not exist at r1"
    );

    // Delete leaves a tombstone in history: gone now, present before.
    let del = c
        .write(vec![WriteOp::Delete {
            start: b"a".to_vec(),
            end: None,
            prev_kv: true,
        }])
        .await;
    let WriteOutcome::Delete {
        revision: r4,
        deleted: 1,
        prev,
    } = del[0].clone().unwrap()
    else {
        panic!("{del:?}")
    };
    assert_eq!(prev[0].value, b"2");
    assert_eq!(sm.get(b"a".to_vec(), 0).await.unwrap(), None);
    assert_eq!(
        sm.get(b"a".to_vec(), r4 - 1).await.unwrap().unwrap().value,
        b"2"
    );
    // Re-created key starts a new life.
    let r5 = c.put("a", "3").await;
    let again = sm.get(b"a".to_vec(), 0).await.unwrap().unwrap();
    assert_eq!((again.create_revision, again.version), (r5, 1));
    // Deleting a missing key does not bump the revision.
    let none = c
        .write(vec![WriteOp::Delete {
            start: b"zz".to_vec(),
            end: None,
            prev_kv: false,
        }])
        .await;
    assert_eq!(none[0].as_ref().unwrap().revision(), r5);

    // Historical range scans see the state as of that revision.
    let old = sm
        .range(RangeRequest {
            start: vec![],
            end: Some(vec![]),
            limit: 0,
            revision: r3,
        })
        .await
        .unwrap();
    let keys: Vec<_> = old
        .kvs
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone()))
        .collect();
    assert_eq!(
        keys,
        vec![
            (b"a".to_vec(), b"2".to_vec()),
            (b"b".to_vec(), b"x".to_vec())
        ]
    );

    // Compaction: older revisions become unreadable, newer ones stay exact.
    let out = c.write(vec![WriteOp::Compact { revision: r4 }]).await;
    assert!(out[0].is_ok(), "{out:?}");
    assert!(matches!(
        sm.get(b"a".to_vec(), r3).await,
        Err(ReadError::Compacted { .. })
    ));
    assert_eq!(
        sm.get(b"b".to_vec(), r4).await.unwrap().unwrap().value,
        b"x"
    );
    assert_eq!(sm.get(b"a".to_vec(), r4).await.unwrap(), None);
    assert_eq!(
        sm.get(b"a".to_vec(), r5).await.unwrap().unwrap().value,
        b"3"
    );
    let again = c.write(vec![WriteOp::Compact { revision: r4 }]).await;
    assert!(matches!(again[0], Err(ApplyError::Compacted { .. })));
    assert!(matches!(
        sm.get(b"a".to_vec(), r5 + 10).await,
        Err(ReadError::FutureRevision { .. })
    ));
}

/// A page stops at MAX_RANGE_BYTES (current and past revisions alike), and continuing from
/// its last key returns every key exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_pages_are_bounded_in_bytes() {
    use aspen_kv::limits::{MAX_RANGE_BYTES, MAX_VALUE_BYTES};
    let mut c = Cluster::new(10_000);
    c.form(&[1]).await;
    let n = MAX_RANGE_BYTES / MAX_VALUE_BYTES + 4;
    for i in 0..n {
        c.write(vec![WriteOp::Put {
            key: format!("big/{i:03}").into_bytes(),
            value: vec![i as u8; MAX_VALUE_BYTES],
            prev_kv: false,
        }])
        .await;
    }
    let sm = &c.nodes[&1].sm;
    let now = sm.status().await.unwrap().revision;
    // One more write, so reading at `now` takes the history path.
    c.write(vec![put("other", "v")]).await;
    for revision in [0, now] {
        let mut req = RangeRequest::prefix(b"big/".to_vec());
        req.revision = revision;
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let page = sm.range(req.clone()).await.unwrap();
            pages += 1;
            let bytes: usize = page
                .kvs
                .iter()
                .map(|kv| kv.key.len() + kv.value.len())
                .sum();
            assert!(bytes <= MAX_RANGE_BYTES, "a page of {bytes} bytes");
            assert!(!page.kvs.is_empty());
            seen.extend(page.kvs.iter().map(|kv| kv.key.clone()));
            if !page.more {
                break;
            }
            let mut next = page.kvs.last().unwrap().key.clone();
            next.push(0);
            req.start = next;
            req.revision = page.revision;
        }
        assert!(pages >= 2, "revision {revision}: one page held everything");
        let expected: Vec<Vec<u8>> = (0..n).map(|i| format!("big/{i:03}").into_bytes()).collect();
        assert_eq!(seen, expected, "revision {revision}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_scans_with_limit_and_continuation() {
    let mut c = Cluster::new(10_000);
    c.form(&[1]).await;
    let ops: Vec<_> = (0..25u8)
        .map(|i| put(&format!("p/{i:02}"), "v"))
        .chain([put("q", "v"), put("p", "v")])
        .collect();
    c.write(ops).await;
    let sm = &c.nodes[&1].sm;
    let mut req = RangeRequest::prefix(b"p/".to_vec());
    req.limit = 10;
    let mut seen = Vec::new();
    loop {
        let page = sm.range(req.clone()).await.unwrap();
        seen.extend(page.kvs.iter().map(|kv| kv.key.clone()));
        if !page.more {
            break;
        }
        let mut next = page.kvs.last().unwrap().key.clone();
        next.push(0);
        req.start = next;
        req.revision = page.revision;
    }
    let expected: Vec<Vec<u8>> = (0..25u8)
        .map(|i| format!("p/{i:02}").into_bytes())
        .collect();
    assert_eq!(seen, expected);
    // Binary keys work, including 0xff bytes.
    c.write(vec![
        put("\u{0}", "zero"),
        WriteOp::Put {
            key: vec![0xff, 0xff],
            value: vec![1],
            prev_kv: false,
        },
    ])
    .await;
    let all = sm
        .range(RangeRequest {
            start: vec![0xff],
            end: Some(vec![]),
            limit: 0,
            revision: 0,
        })
        .await
        .unwrap();
    assert_eq!(all.kvs.len(), 1);
    // Delete a range.
    let del = c
        .write(vec![WriteOp::Delete {
            start: b"p/".to_vec(),
            end: Some(prefix_end(b"p/")),
            prev_kv: false,
        }])
        .await;
    assert!(matches!(
        del[0],
        Ok(WriteOutcome::Delete { deleted: 25, .. })
    ));
    assert!(sm
        .range(RangeRequest::prefix(b"p/".to_vec()))
        .await
        .unwrap()
        .kvs
        .is_empty());
    assert!(sm.get(b"p".to_vec(), 0).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_commands_apply_once() {
    let mut c = Cluster::new(10_000);
    c.form(&[1]).await;
    let leader = &c.nodes[&1].raft;
    let cmd = |seq, acked_below, v: &str| Command {
        session: Some(Session {
            client_id: 42,
            seq,
            acked_below,
        }),
        op: WriteOp::Put {
            key: b"k".to_vec(),
            value: v.into(),
            prev_kv: false,
        },
    };
    let first = leader
        .client_write(Batch {
            proposed_at_ms: 1,
            proposal: 0,
            commands: vec![cmd(1, 1, "a")],
        })
        .await
        .unwrap();
    // The same request again (a retry after a lost reply) returns the first answer.
    let retry = leader
        .client_write(Batch {
            proposed_at_ms: 2,
            proposal: 0,
            commands: vec![cmd(1, 1, "a")],
        })
        .await
        .unwrap();
    assert_eq!(first.data, retry.data);
    let kv = c.nodes[&1].sm.get(b"k".to_vec(), 0).await.unwrap().unwrap();
    assert_eq!(kv.version, 1, "retry must not apply twice");
    // Out of order within the window is fine; below the acked floor is refused.
    let r = leader
        .client_write(Batch {
            proposed_at_ms: 3,
            proposal: 0,
            commands: vec![cmd(3, 1, "c"), cmd(2, 1, "b")],
        })
        .await;
    assert!(r.unwrap().data.results.iter().all(Result::is_ok));
    let r = leader
        .client_write(Batch {
            proposed_at_ms: 4,
            proposal: 0,
            commands: vec![cmd(4, 4, "d"), cmd(2, 4, "b")],
        })
        .await;
    let results = r.unwrap().data.results;
    assert!(results[0].is_ok());
    assert!(matches!(
        results[1],
        Err(ApplyError::StaleSequence { seq: 2, .. })
    ));
    assert_eq!(
        c.nodes[&1]
            .sm
            .get(b"k".to_vec(), 0)
            .await
            .unwrap()
            .unwrap()
            .version,
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_replays_the_durable_log() {
    let mut c = Cluster::new(10_000);
    c.form(&[1, 2, 3]).await;
    for i in 0..30 {
        c.put(&format!("k{i}"), "v").await;
    }
    c.converge().await;
    let before = c.nodes[&2].sm.state_digest().await.unwrap();
    c.stop(2).await;
    for i in 30..60 {
        c.put(&format!("k{i}"), "v").await;
    }
    c.start(2).await;
    c.converge().await;
    let after = c.nodes[&2].sm.state_digest().await.unwrap();
    assert_eq!(
        after.keys, 60,
        "restarted node caught up (before: {before:?})"
    );
    assert_eq!(after, c.nodes[&1].sm.state_digest().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_and_new_nodes_get_a_snapshot_after_log_compaction() {
    // Snapshot every 20 entries; 1000 entries are kept after a snapshot by default, so purge
    // the log explicitly to force snapshot installation.
    let mut c = Cluster::new(20);
    c.form(&[1, 2, 3]).await;
    c.stop(3).await;
    let secret = WriteOp::System(SystemWrite::put_if_absent(
        b"cluster/secret".to_vec(),
        vec![7; 32],
    ));
    let r = c.write(vec![secret]).await;
    assert!(matches!(
        r[0],
        Ok(WriteOutcome::System { written: true, .. })
    ));
    for i in 0..200 {
        c.put(&format!("k{i:03}"), &format!("v{i}")).await;
    }
    let leader = c.leader().await;
    let raft = c.nodes[&leader].raft.clone();
    raft.trigger().snapshot().await.unwrap();
    let m = raft
        .wait(Some(TIMEOUT))
        .metrics(|m| m.snapshot.is_some_and(|s| s.index >= 200), "snapshot")
        .await
        .unwrap();
    let snap_index = m.snapshot.unwrap().index;
    // Only the leader's log matters for catching up node 3.
    raft.trigger().purge_log(snap_index).await.unwrap();
    raft.wait(Some(TIMEOUT))
        .metrics(
            |m| m.purged.is_some_and(|p| p.index >= snap_index),
            "purged",
        )
        .await
        .unwrap();
    // Node 3 lags behind the purged log: it can only catch up by installing the snapshot.
    c.start(3).await;
    // Node 4 is brand new.
    c.start(4).await;
    c.add(4).await;
    c.put("after", "snapshot").await;
    c.converge().await;
    let reference = c.nodes[&leader].sm.state_digest().await.unwrap();
    for id in [3, 4] {
        assert_eq!(
            c.nodes[&id].sm.state_digest().await.unwrap(),
            reference,
            "node {id}"
        );
        let kv = c.nodes[&id]
            .sm
            .get(b"k123".to_vec(), 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(kv.value, b"v123");
        // History came along with the snapshot.
        let old = c.nodes[&id]
            .sm
            .get(b"k123".to_vec(), kv.mod_revision)
            .await
            .unwrap();
        assert!(old.is_some());
        // So did the system key space.
        assert_eq!(
            c.nodes[&id]
                .sm
                .system_get(b"cluster/secret".to_vec())
                .await
                .unwrap(),
            Some(vec![7; 32])
        );
    }
    // A node restarted after installing a snapshot comes back from it.
    c.stop(4).await;
    c.start(4).await;
    c.put("after2", "x").await;
    c.converge().await;
    assert_eq!(
        c.nodes[&4].sm.state_digest().await.unwrap().keys,
        reference.keys + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_isolation_elects_a_new_leader_without_losing_writes() {
    let mut c = Cluster::new(10_000);
    c.form(&[1, 2, 3]).await;
    for i in 0..10 {
        c.put(&format!("k{i}"), "v").await;
    }
    let old = c.leader().await;
    c.router.isolate(old);
    let others: Vec<NodeId> = c.nodes.keys().copied().filter(|id| *id != old).collect();
    c.nodes[&others[0]]
        .raft
        .wait(Some(TIMEOUT))
        .metrics(|m| m.current_leader.is_some_and(|l| l != old), "new leader")
        .await
        .unwrap();
    let batch = Batch {
        proposed_at_ms: 1,
        proposal: 0,
        commands: vec![Command {
            session: None,
            op: put("k10", "v"),
        }],
    };
    // Through the new leader: the isolated one must not take it.
    c.write_batch(batch, &[old]).await;
    c.router.heal(old);
    c.converge().await;
    for node in c.nodes.values() {
        assert_eq!(node.sm.state_digest().await.unwrap().keys, 11);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_sessions_expire_by_leader_time() {
    let mut c = Cluster::new(10_000);
    c.form(&[1]).await;
    let raft = c.nodes[&1].raft.clone();
    let day = aspen_kv::limits::SESSION_IDLE_EXPIRY_MS;
    let cmd = |client: u64, seq: u64| Command {
        session: Some(Session {
            client_id: client,
            seq,
            acked_below: seq,
        }),
        op: WriteOp::Put {
            key: format!("k{client}").into_bytes(),
            value: b"v".to_vec(),
            prev_kv: false,
        },
    };
    let write = |at: u64, commands: Vec<Command>| {
        let raft = raft.clone();
        async move {
            raft.client_write(Batch {
                proposed_at_ms: at,
                proposal: 0,
                commands,
            })
            .await
            .unwrap()
        }
    };
    let version = |client: u64| {
        let sm = c.nodes[&1].sm.clone();
        async move {
            sm.get(format!("k{client}").into_bytes(), 0)
                .await
                .unwrap()
                .unwrap()
                .version
        }
    };
    let t0 = 1_000;
    write(t0, vec![cmd(7, 1)]).await;
    // Within the expiry a retry is answered from the record, not applied again.
    write(t0 + day - 1, vec![cmd(7, 1)]).await;
    assert_eq!(version(7).await, 1);
    // A day after client 7's last request (client 8 keeps the clock moving), its records go:
    // memory stays bounded when clients vanish, and a retry that late applies again.
    let later = t0 + day - 1 + day + 1;
    write(later, vec![cmd(8, 1)]).await;
    write(later, vec![cmd(7, 1)]).await;
    assert_eq!(version(7).await, 2);
    // Client 8 is fresh: still deduplicated.
    write(later + 1, vec![cmd(8, 1)]).await;
    assert_eq!(version(8).await, 1);
}

/// System keys: conditional writes, invisible to client reads, no revision change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_keys_are_conditional_and_invisible_to_reads() {
    let mut c = Cluster::new(1000);
    c.form(&[1, 2, 3]).await;
    let rev = c.put("visible", "x").await;
    let sys = |expect: Option<Option<&[u8]>>, new: Option<&[u8]>| {
        WriteOp::System(SystemWrite {
            key: b"cluster/secret".to_vec(),
            expect: expect.map(|e| e.map(<[u8]>::to_vec)),
            new: new.map(<[u8]>::to_vec),
        })
    };
    let r = c
        .write(vec![
            sys(Some(None), Some(b"one")),
            sys(Some(None), Some(b"two")),
            sys(Some(Some(b"nope")), None),
            sys(Some(Some(b"one")), Some(b"three")),
        ])
        .await;
    let outcomes: Vec<(bool, Option<Vec<u8>>, Revision)> = r
        .into_iter()
        .map(|r| match r.unwrap() {
            WriteOutcome::System {
                written,
                current,
                revision,
            } => (written, current, revision),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (true, Some(b"one".to_vec()), rev),
            (false, Some(b"one".to_vec()), rev),
            (false, Some(b"one".to_vec()), rev),
            (true, Some(b"three".to_vec()), rev),
        ]
    );
    c.converge().await;
    for node in c.nodes.values() {
        assert_eq!(
            node.sm
                .system_get(b"cluster/secret".to_vec())
                .await
                .unwrap(),
            Some(b"three".to_vec())
        );
        let all = node
            .sm
            .range(RangeRequest {
                start: vec![],
                end: Some(vec![]),
                limit: 0,
                revision: 0,
            })
            .await
            .unwrap();
        assert_eq!(all.kvs.len(), 1, "only the client key is visible");
        assert_eq!(all.revision, rev, "system writes do not move the revision");
        assert_eq!(
            node.sm.system_scan(b"cluster/".to_vec(), 10).await.unwrap(),
            vec![(b"cluster/secret".to_vec(), b"three".to_vec())]
        );
    }
    let digests = futures_digests(&c).await;
    assert!(digests.windows(2).all(|w| w[0] == w[1]));
    let r = c.write(vec![sys(None, None)]).await;
    assert!(matches!(
        r[0],
        Ok(WriteOutcome::System {
            written: true,
            current: None,
            ..
        })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_compare_then_apply_one_branch_at_one_revision() {
    let mut c = Cluster::new(10_000);
    c.form(&[1]).await;
    let r1 = c.put("a", "1").await;
    c.put("gone", "x").await;
    let txn = |compare: Vec<Compare>, success: Vec<TxnOp>, failure: Vec<TxnOp>| {
        WriteOp::Txn(Txn {
            compare,
            success,
            failure,
        })
    };
    let cmp = |key: &str, target: CompareTarget, op: CompareOp| Compare {
        key: key.into(),
        target,
        op,
    };
    let tput = |k: &str, v: &str| TxnOp::Put {
        key: k.into(),
        value: v.into(),
        prev_kv: true,
    };

    // Success branch: two writes and a delete share one revision.
    let out = c
        .write(vec![txn(
            vec![
                cmp("a", CompareTarget::Value(b"1".to_vec()), CompareOp::Equal),
                cmp("a", CompareTarget::ModRevision(r1), CompareOp::Equal),
                cmp("nope", CompareTarget::Version(0), CompareOp::Equal),
            ],
            vec![
                tput("a", "2"),
                tput("b", "new"),
                TxnOp::Delete {
                    start: b"gone".to_vec(),
                    end: None,
                    prev_kv: false,
                },
            ],
            vec![tput("failed", "yes")],
        )])
        .await;
    let Ok(WriteOutcome::Txn {
        revision,
        succeeded,
        results,
    }) = &out[0]
    else {
        panic!("{out:?}")
    };
    assert!(succeeded);
    assert_eq!(*revision, r1 + 2);
    assert_eq!(results.len(), 3);
    assert!(
        matches!(&results[0], WriteOutcome::Put { revision: r, prev: Some(p) } if *r == *revision && p.value == b"1")
    );
    assert!(matches!(
        &results[2],
        WriteOutcome::Delete { deleted: 1, .. }
    ));
    let sm = &c.nodes[&1].sm;
    for key in ["a", "b"] {
        let kv = sm.get(key.into(), 0).await.unwrap().unwrap();
        assert_eq!(kv.mod_revision, *revision, "{key}");
    }
    assert_eq!(sm.get(b"gone".to_vec(), 0).await.unwrap(), None);

    // Failure branch: a stale compare-and-swap changes nothing else.
    let cas = Txn::compare_and_swap(b"a".to_vec(), Some(b"1".to_vec()), b"3".to_vec());
    let out = c.write(vec![WriteOp::Txn(cas)]).await;
    assert!(matches!(
        &out[0],
        Ok(WriteOutcome::Txn { succeeded: false, results, revision: r }) if results.is_empty() && r == revision
    ));
    assert_eq!(sm.get(b"a".to_vec(), 0).await.unwrap().unwrap().value, b"2");
    // Compare with an absent key: a value comparison is false, version 0 holds.
    let absent = Txn::compare_and_swap(b"fresh".to_vec(), None, b"v".to_vec());
    let out = c.write(vec![WriteOp::Txn(absent.clone())]).await;
    assert!(matches!(
        &out[0],
        Ok(WriteOutcome::Txn {
            succeeded: true,
            ..
        })
    ));
    let out = c.write(vec![WriteOp::Txn(absent)]).await;
    assert!(matches!(
        &out[0],
        Ok(WriteOutcome::Txn {
            succeeded: false,
            ..
        })
    ));

    // Writes to one key twice in a branch are refused before anything happens.
    let out = c
        .write(vec![txn(
            vec![],
            vec![
                tput("x", "1"),
                TxnOp::Delete {
                    start: b"a".to_vec(),
                    end: Some(b"z".to_vec()),
                    prev_kv: false,
                },
            ],
            vec![],
        )])
        .await;
    assert_eq!(
        out[0],
        Err(ApplyError::Limit(LimitError::TxnWritesOverlap {
            key: b"x".to_vec()
        }))
    );
    let too_many = txn(
        (0..=limits::MAX_TXN_OPS)
            .map(|i| {
                cmp(
                    &format!("k{i}"),
                    CompareTarget::Version(0),
                    CompareOp::Equal,
                )
            })
            .collect(),
        vec![],
        vec![],
    );
    assert!(matches!(
        c.write(vec![too_many]).await[0],
        Err(ApplyError::Limit(LimitError::TooManyTxnOps { .. }))
    ));
}

/// Nested transactions, as etcd runs them: every comparison on the path sees the state
/// before the transaction, the path's writes share one revision, and writes that could run
/// together may not touch one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_transactions_take_one_path_at_one_revision() {
    let mut c = Cluster::new(10_000);
    c.form(&[1, 2, 3]).await;
    let r1 = c.put("a", "1").await;
    let is = |key: &str, v: &str| Compare {
        key: key.into(),
        target: CompareTarget::Value(v.into()),
        op: CompareOp::Equal,
    };
    let put = |k: &str, v: &str| TxnOp::Put {
        key: k.into(),
        value: v.into(),
        prev_kv: true,
    };
    let node = |compare: Vec<Compare>, success: Vec<TxnOp>, failure: Vec<TxnOp>| Txn {
        compare,
        success,
        failure,
    };
    // Outer: a == 1, so put a = 2 and run node 1, whose own a == 1 still holds (it sees the
    // state before the transaction): b is put, c is not; node 2 (the failure side) never runs.
    let tree = |nodes| {
        WriteOp::TxnTree(TxnTree {
            nodes,
            ranges: vec![],
        })
    };
    let out = c
        .write(vec![tree(vec![
            node(
                vec![is("a", "1")],
                vec![put("a", "2"), TxnOp::Nested(1)],
                vec![TxnOp::Nested(2)],
            ),
            node(
                vec![is("a", "1")],
                vec![put("b", "x"), TxnOp::Nested(3)],
                vec![put("c", "y")],
            ),
            node(vec![], vec![put("f", "1")], vec![]),
            node(
                vec![is("b", "x")],
                vec![put("d", "no")],
                vec![put("d", "yes")],
            ),
        ])])
        .await;
    let Ok(WriteOutcome::Txn {
        revision,
        succeeded: true,
        results,
    }) = &out[0]
    else {
        panic!("{out:?}")
    };
    assert_eq!(*revision, r1 + 1, "one revision for the whole path");
    let [WriteOutcome::Put {
        prev: Some(prev), ..
    }, WriteOutcome::Txn {
        succeeded: true,
        results: inner,
        ..
    }] = results.as_slice()
    else {
        panic!("{results:?}")
    };
    assert_eq!(prev.value, b"1");
    // Node 3 compared b before the transaction wrote it: absent, so its failure ran.
    assert!(
        matches!(inner.as_slice(), [WriteOutcome::Put { prev: None, .. }, WriteOutcome::Txn { succeeded: false, results: deepest, .. }] if deepest.len() == 1),
        "{inner:?}"
    );
    c.converge().await;
    for n in c.nodes.values() {
        let get = |k: &str| {
            let sm = n.sm.clone();
            let k = k.as_bytes().to_vec();
            async move {
                sm.get(k, 0)
                    .await
                    .unwrap()
                    .map(|kv| (kv.value, kv.mod_revision))
            }
        };
        assert_eq!(get("a").await, Some((b"2".to_vec(), *revision)));
        assert_eq!(get("b").await, Some((b"x".to_vec(), *revision)));
        assert_eq!(get("d").await, Some((b"yes".to_vec(), *revision)));
        assert_eq!(get("c").await, None);
        assert_eq!(get("f").await, None);
    }

    // The same key in both branches of one nested transaction is fine (only one runs); in a
    // branch and in a nested transaction that could run with it, it is refused.
    let both_sides = tree(vec![
        node(vec![], vec![TxnOp::Nested(1)], vec![]),
        node(vec![is("a", "2")], vec![put("k", "1")], vec![put("k", "2")]),
    ]);
    assert!(matches!(
        c.write(vec![both_sides]).await[0],
        Ok(WriteOutcome::Txn {
            succeeded: true,
            ..
        })
    ));
    let clash = tree(vec![
        node(vec![], vec![put("k", "0"), TxnOp::Nested(1)], vec![]),
        node(vec![], vec![], vec![put("k", "2")]),
    ]);
    assert_eq!(
        c.write(vec![clash]).await[0],
        Err(ApplyError::Limit(LimitError::TxnWritesOverlap {
            key: b"k".to_vec()
        }))
    );
    for bad in [
        vec![],
        vec![node(vec![], vec![TxnOp::Nested(0)], vec![])],
        vec![node(vec![], vec![], vec![]), node(vec![], vec![], vec![])],
        vec![
            node(vec![], vec![TxnOp::Nested(1)], vec![TxnOp::Nested(1)]),
            node(vec![], vec![], vec![]),
        ],
    ] {
        assert!(
            matches!(
                c.write(vec![tree(bad.clone())]).await[0],
                Err(ApplyError::Limit(LimitError::BadTxnTree(_)))
            ),
            "{bad:?}"
        );
    }
    // Comparisons over key ranges: every existing key must match; none existing compares
    // as an absent key (so a value comparison fails, a version 0 one holds).
    for (k, v) in [("r/1", "x"), ("r/2", "x"), ("r/3", "y")] {
        c.put(k, v).await;
    }
    let ranged = |key: &str, end: &str, target: CompareTarget| {
        WriteOp::TxnTree(TxnTree {
            nodes: vec![node(
                vec![Compare {
                    key: key.into(),
                    target,
                    op: CompareOp::Equal,
                }],
                vec![],
                vec![],
            )],
            ranges: vec![CompareRange {
                node: 0,
                compare: 0,
                end: end.into(),
            }],
        })
    };
    let value = |v: &str| CompareTarget::Value(v.into());
    for (key, end, target, expected) in [
        ("r/", "r/3", value("x"), true),
        ("r/", "r0", value("x"), false),
        ("r/", "", value("x"), false),
        ("s/", "s0", value("x"), false),
        ("s/", "s0", CompareTarget::Version(0), true),
        ("r/", "r0", CompareTarget::Version(1), true),
    ] {
        let out = c.write(vec![ranged(key, end, target.clone())]).await;
        assert!(
            matches!(&out[0], Ok(WriteOutcome::Txn { succeeded, .. }) if *succeeded == expected),
            "[{key}, {end}) {target:?}: {out:?}"
        );
    }
    // A range holding more keys than a comparison may read is refused, on every replica.
    for chunk in (0..=limits::MAX_COMPARE_RANGE_KEYS)
        .collect::<Vec<_>>()
        .chunks(1000)
    {
        let puts = chunk
            .iter()
            .map(|i| WriteOp::Put {
                key: format!("big/{i:05}").into_bytes(),
                value: vec![],
                prev_kv: false,
            })
            .collect();
        assert!(c.write(puts).await.iter().all(Result::is_ok));
    }
    let big = || ranged("big/", "big0", CompareTarget::Version(1));
    assert_eq!(
        c.write(vec![big()]).await[0],
        Err(ApplyError::Limit(LimitError::CompareRangeTooLarge {
            max: limits::MAX_COMPARE_RANGE_KEYS
        }))
    );
    c.write(vec![WriteOp::Delete {
        start: b"big/00000".to_vec(),
        end: None,
        prev_kv: false,
    }])
    .await;
    assert!(matches!(
        c.write(vec![big()]).await[0],
        Ok(WriteOutcome::Txn {
            succeeded: true,
            ..
        })
    ));
    let dangling = WriteOp::TxnTree(TxnTree {
        nodes: vec![node(vec![], vec![], vec![])],
        ranges: vec![CompareRange {
            node: 0,
            compare: 0,
            end: vec![],
        }],
    });
    assert!(matches!(
        c.write(vec![dangling]).await[0],
        Err(ApplyError::Limit(LimitError::BadTxnTree(_)))
    ));

    // A nested transaction outside a tree names nothing.
    let plain = WriteOp::Txn(node(vec![], vec![TxnOp::Nested(1)], vec![]));
    assert!(matches!(
        c.write(vec![plain]).await[0],
        Err(ApplyError::Limit(LimitError::BadTxnTree(_)))
    ));
}

/// System transactions: all-or-nothing on their requirements; prefix deletes stay inside the
/// prefix; every replica ends with the same system keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_transactions_are_all_or_nothing() {
    let mut c = Cluster::new(1000);
    c.form(&[1, 2, 3]).await;
    let put = |k: &str, v: &str| SystemOp::Put {
        key: k.as_bytes().to_vec(),
        value: v.as_bytes().to_vec(),
    };
    let txn = |require: Vec<(&str, Option<&str>)>, writes: Vec<SystemOp>| {
        WriteOp::SystemTxn(SystemTxn {
            require: require
                .into_iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec())))
                .collect(),
            writes,
        })
    };
    let r = c
        .write(vec![
            txn(
                vec![("d/a/meta", None)],
                vec![put("d/a/meta", "1"), put("d/a/x", "x"), put("d/ab/y", "y")],
            ),
            // The meta key exists now: nothing of this one is applied.
            txn(
                vec![("d/a/meta", None)],
                vec![put("d/a/meta", "2"), put("d/a/z", "z")],
            ),
            // Two requirements, the second fails.
            txn(
                vec![("d/a/meta", Some("1")), ("d/ab/y", Some("nope"))],
                vec![put("d/a/w", "w")],
            ),
            txn(
                vec![("d/a/meta", Some("1"))],
                vec![
                    SystemOp::DeletePrefix {
                        prefix: b"d/a/".to_vec(),
                    },
                    put("d/a/meta", "3"),
                ],
            ),
        ])
        .await;
    let applied: Vec<bool> = r
        .into_iter()
        .map(|r| match r.unwrap() {
            WriteOutcome::SystemTxn { applied, .. } => applied,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(applied, [true, false, false, true]);
    c.converge().await;
    for node in c.nodes.values() {
        let keys = node
            .sm
            .system_view(|view| {
                let mut keys = Vec::new();
                view.scan(b"d/", |k, v| {
                    keys.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
                    true
                })?;
                Ok(keys)
            })
            .await
            .unwrap();
        assert_eq!(
            keys,
            vec![
                ("d/a/meta".to_string(), b"3".to_vec()),
                ("d/ab/y".to_string(), b"y".to_vec()),
            ]
        );
    }
    // An empty prefix would wipe the system key space: refused before proposing.
    let wipe = txn(vec![], vec![SystemOp::DeletePrefix { prefix: vec![] }]);
    assert!(matches!(wipe.validate(), Err(LimitError::EmptyKey)));
}

/// A system prefix watch fires on every replica once a write under its prefix applies there,
/// and not for writes elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_prefix_watches_fire_on_every_replica() {
    let mut c = Cluster::new(1000);
    c.form(&[1, 2, 3]).await;
    let mut watched: Vec<_> = c
        .nodes
        .values()
        .map(|n| {
            (
                n.sm.watch_system_prefix(b"w/"),
                n.sm.watch_system_prefix(b"other/"),
            )
        })
        .collect();
    let put = |k: &str| {
        WriteOp::SystemTxn(SystemTxn {
            require: vec![],
            writes: vec![SystemOp::Put {
                key: k.as_bytes().to_vec(),
                value: b"v".to_vec(),
            }],
        })
    };
    c.write(vec![put("elsewhere/a")]).await[0].as_ref().unwrap();
    c.write(vec![put("w/a")]).await[0].as_ref().unwrap();
    for (w, other) in &mut watched {
        tokio::time::timeout(std::time::Duration::from_secs(60), w.wait_for(|n| *n >= 1))
            .await
            .expect("the watch fires")
            .unwrap();
        // Both writes applied here before the second one bumped the watch, which the first
        // one did not.
        assert_eq!(*w.borrow(), 1, "a write outside the prefix fired a watch");
        assert_eq!(
            *other.borrow(),
            0,
            "a write outside the prefix fired a watch"
        );
    }
}

/// Watches read what changed: every replica reports the same events, in revision order, a
/// transaction's writes at one revision, deletes with the previous value; the revision
/// receiver moves with each apply; a compacted start is refused; a node that caught up by
/// snapshot reports the same events from the compaction point on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_the_same_state_diffs_on_every_replica() {
    let mut c = Cluster::new(20);
    c.form(&[1, 2, 3]).await;
    let mut revisions: Vec<_> = c.nodes.values().map(|n| n.sm.watch_revision()).collect();
    let r1 = c.put("a", "1").await;
    c.put("b", "1").await;
    let txn = WriteOp::Txn(Txn {
        compare: vec![],
        success: vec![
            TxnOp::Put {
                key: b"c".to_vec(),
                value: b"1".to_vec(),
                prev_kv: false,
            },
            TxnOp::Delete {
                start: b"b".to_vec(),
                end: None,
                prev_kv: false,
            },
        ],
        failure: vec![],
    });
    c.write(vec![txn]).await[0].as_ref().unwrap();
    c.write(vec![WriteOp::Delete {
        start: b"a".to_vec(),
        end: Some(b"z".to_vec()),
        prev_kv: false,
    }])
    .await[0]
        .as_ref()
        .unwrap();
    let last = c.put("z", "1").await;
    assert_eq!(last, r1 + 4);
    c.converge().await;
    for rx in &mut revisions {
        tokio::time::timeout(TIMEOUT, rx.wait_for(|r| *r == last))
            .await
            .expect("the revision moves")
            .unwrap();
    }
    let everything = |from: Revision| ChangesRequest {
        start: Vec::new(),
        end: Some(Vec::new()),
        from,
        after: None,
        prev_kv: true,
    };
    let shape = |page: &ChangesPage| -> Vec<(Revision, String, EventKind, Option<String>)> {
        page.events
            .iter()
            .map(|e| {
                (
                    e.kv.mod_revision,
                    String::from_utf8(e.kv.key.clone()).unwrap(),
                    e.kind,
                    e.prev_kv
                        .as_ref()
                        .map(|p| String::from_utf8(p.value.clone()).unwrap()),
                )
            })
            .collect()
    };
    let want = vec![
        (r1, "a".into(), EventKind::Put, None),
        (r1 + 1, "b".into(), EventKind::Put, None),
        (r1 + 2, "b".into(), EventKind::Delete, Some("1".into())),
        (r1 + 2, "c".into(), EventKind::Put, None),
        (r1 + 3, "a".into(), EventKind::Delete, Some("1".into())),
        (r1 + 3, "c".into(), EventKind::Delete, Some("1".into())),
        (r1 + 4, "z".into(), EventKind::Put, None),
    ];
    for node in c.nodes.values() {
        let page = node.sm.changes(everything(r1)).await.unwrap();
        assert_eq!(shape(&page), want);
        assert_eq!(page.next_from, last + 1);
    }

    // Compaction: a watch cannot start below the compaction point; from it, it is exact.
    c.write(vec![WriteOp::Compact { revision: r1 + 2 }]).await[0]
        .as_ref()
        .unwrap();
    c.converge().await;
    let leader = c.leader().await;
    let sm = c.nodes[&leader].sm.clone();
    assert!(matches!(
        sm.changes(everything(r1 + 1)).await,
        Err(ReadError::Compacted { .. })
    ));
    let compacted = sm.changes(everything(r1 + 2)).await.unwrap();
    assert_eq!(shape(&compacted), want[2..]);

    // A node that catches up by snapshot reports the same.
    c.stop(3).await;
    for i in 0..30 {
        c.put(&format!("k{i:02}"), "v").await;
    }
    let raft = c.nodes[&leader].raft.clone();
    raft.trigger().snapshot().await.unwrap();
    let m = raft
        .wait(Some(TIMEOUT))
        .metrics(|m| m.snapshot.is_some_and(|s| s.index >= 30), "snapshot")
        .await
        .unwrap();
    let index = m.snapshot.unwrap().index;
    raft.trigger().purge_log(index).await.unwrap();
    raft.wait(Some(TIMEOUT))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= index), "purged")
        .await
        .unwrap();
    c.start(3).await;
    c.converge().await;
    let reference = sm.changes(everything(r1 + 2)).await.unwrap();
    assert_eq!(reference.events.len(), want.len() - 2 + 30);
    assert_eq!(
        c.nodes[&3].sm.changes(everything(r1 + 2)).await.unwrap(),
        reference
    );
}
