//! The storage threads call the activity hook as a write makes progress: once when its log
//! flush completes and once when its apply starts (the node keeps its async worker awake on
//! it). Its own test binary: the hook is process-wide, and no other test may count.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use aspen_kv::api::{Batch, Command, WriteOp};
use aspen_kv::testing::{member, MemRouter};
use aspen_kv::Raft;

static CALLS: AtomicUsize = AtomicUsize::new(0);

fn count() {
    CALLS.fetch_add(1, Ordering::SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_calls_the_hook_at_its_flush_and_at_its_apply() {
    aspen_kv::set_activity_hook(count);
    let dir = tempfile::tempdir().unwrap();
    let (log, sm) = aspen_kv::open(dir.path()).unwrap();
    let router = MemRouter::new();
    let raft = Raft::new(
        1,
        aspen_kv::raft_config(10_000, 1000),
        router.network(1),
        log,
        sm.clone(),
    )
    .await
    .unwrap();
    router.register(1, raft.clone(), sm);
    raft.initialize(BTreeMap::from([(1, member(1))]))
        .await
        .unwrap();
    raft.wait(Some(std::time::Duration::from_secs(30)))
        .current_leader(1, "node 1 to lead")
        .await
        .unwrap();
    let write = |key: &str| Batch {
        proposed_at_ms: 1,
        proposal: 0,
        commands: vec![Command {
            session: None,
            op: WriteOp::Put {
                key: key.into(),
                value: b"v".to_vec(),
                prev_kv: false,
            },
        }],
    };
    raft.client_write(write("first")).await.unwrap();
    for i in 0..10 {
        let before = CALLS.load(Ordering::SeqCst);
        raft.client_write(write(&format!("k{i}"))).await.unwrap();
        // Answered by the apply, which ran after the entry's flush: both calls are in.
        let calls = CALLS.load(Ordering::SeqCst) - before;
        assert!(
            calls >= 2,
            "write {i}: {calls} hook calls, want one per flush and apply"
        );
    }
    raft.shutdown().await.unwrap();
}
