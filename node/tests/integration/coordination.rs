//! Locks and elections (etcd's recipes on leases and watches) against real processes: lock
//! holders never overlap, judged by their fencing tokens, while the leader is killed;
//! `aspen lock` runs a command under the lock and passes on its exit status; `aspen elect`
//! campaigns, resigns, and listens.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aspen_kv::api::{Compare, CompareOp, CompareTarget, Txn, TxnOp};
use tokio::time::Instant;

use crate::common::*;

/// The fenced resource: accepts a write only with a token above every one it has seen.
fn fenced_write(token: u64, holder: usize) -> Txn {
    let padded = format!("{token:020}").into_bytes();
    Txn {
        compare: vec![Compare {
            key: b"fenced/last".to_vec(),
            target: CompareTarget::Value(padded.clone()),
            op: CompareOp::Less,
        }],
        success: vec![
            TxnOp::Put {
                key: b"fenced/last".to_vec(),
                value: padded,
                prev_kv: false,
            },
            TxnOp::Put {
                key: format!("fenced/log/{token:020}").into_bytes(),
                value: holder.to_string().into_bytes(),
                prev_kv: false,
            },
        ],
        failure: vec![],
    }
}

/// Four contenders take one lock five times each on a 3-node cluster whose leader is
/// killed midway. Judged by their fencing tokens, no two holders overlap: in token order,
/// each holder entered after the previous one left, every fenced write was accepted, and
/// the tokens grew with every acquisition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_holders_never_overlap_by_their_fencing_tokens() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = form(root.path(), 3, &[]).await;
    let client = client_for(&nodes.iter().collect::<Vec<_>>()).await;
    client
        .put(b"fenced/last".to_vec(), format!("{:020}", 0).into_bytes())
        .await
        .unwrap();
    // (token, entered, left) of every acquisition.
    let held: Arc<Mutex<Vec<(u64, Instant, Instant)>>> = Default::default();
    let mut contenders = Vec::new();
    for holder in 0..4 {
        let client = client.clone();
        let held = held.clone();
        contenders.push(tokio::spawn(async move {
            let session = client.session(5).await.unwrap();
            for _ in 0..5 {
                let lock = client.lock(&session, b"the-lock").await.unwrap();
                let entered = Instant::now();
                let write = client.txn(fenced_write(lock.token, holder)).await.unwrap();
                assert!(
                    write.succeeded,
                    "fenced write of token {} refused",
                    lock.token
                );
                let left = Instant::now();
                client.release(&lock).await.unwrap();
                held.lock().unwrap().push((lock.token, entered, left));
            }
            session.close().await.unwrap();
        }));
    }
    wait_until("some acquisitions", || {
        let held = held.clone();
        async move { (held.lock().unwrap().len() >= 4).then_some(()) }
    })
    .await;
    let leader = leader_named_by(&client).await;
    let victim = nodes.iter_mut().find(|n| n.node_id() == leader).unwrap();
    victim.kill9();
    for c in contenders {
        tokio::time::timeout(DEADLINE * 2, c)
            .await
            .expect("contenders finish")
            .unwrap();
    }
    victim.restart(None);
    let mut held = held.lock().unwrap().clone();
    assert_eq!(held.len(), 20);
    held.sort_by_key(|h| h.0);
    for pair in held.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        assert!(a.0 < b.0, "tokens repeat: {a:?} {b:?}");
        assert!(
            b.1 >= a.2,
            "token {} entered before token {} left",
            b.0,
            a.0
        );
    }
    let log = client
        .range(
            aspen_kv::api::RangeRequest::prefix(b"fenced/log/".to_vec()),
            aspen_client::Consistency::Linearizable,
        )
        .await
        .unwrap();
    assert_eq!(log.kvs.len(), 20, "every fenced write landed");
    client.close().await;
}

/// `aspen lock NAME -- CMD` runs CMD under the lock with the token in ASPEN_LOCK_TOKEN, one
/// process at a time, and exits with CMD's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_runs_commands_under_the_lock_one_at_a_time() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, &[]).await;
    let ticket = ticket_text(&nodes);
    let file = root.path().join("log");
    let script = format!(
        "echo start $ASPEN_LOCK_TOKEN >> {f}; sleep 0.2; echo end $ASPEN_LOCK_TOKEN >> {f}",
        f = file.display()
    );
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let (ticket, script) = (ticket.clone(), script.clone());
            tokio::task::spawn_blocking(move || {
                cli(&["lock", "jobs", "--", "sh", "-c", &script], Some(&ticket))
            })
        })
        .collect();
    for run in runs {
        let out = run.await.unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let log = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<(String, u64)> = log
        .lines()
        .map(|l| {
            let (what, token) = l.split_once(' ').unwrap();
            (what.to_string(), token.parse().unwrap())
        })
        .collect();
    assert_eq!(lines.len(), 6, "{log}");
    for (i, pair) in lines.chunks(2).enumerate() {
        assert_eq!(pair[0].0, "start", "{log}");
        assert_eq!(pair[1], ("end".to_string(), pair[0].1), "{log}");
        if i > 0 {
            assert!(pair[0].1 > lines[2 * i - 1].1, "tokens grow: {log}");
        }
    }
    let out = cli(&["lock", "jobs", "--", "sh", "-c", "exit 3"], Some(&ticket));
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = cli(&["lock", "jobs", "--", "/no/such/program"], Some(&ticket));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot run"), "{}", stderr(&out));
}

/// `aspen elect`: a listener sees each leader in turn; the next candidate leads when the
/// leader resigns (Ctrl-C); a leader that dies is replaced once its lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_elects_resigns_and_listens() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, &[]).await;
    let ticket = ticket_text(&nodes);
    let listener = CliProc::spawn(&["elect", "e", "--listen"], Some(&ticket));
    assert_eq!(listener.next_line().unwrap(), "(no leader)");
    let a = CliProc::spawn(&["elect", "e", "a", "--ttl", "2"], Some(&ticket));
    assert!(a.next_line().unwrap().starts_with("elected: a"));
    assert_eq!(listener.next_line().unwrap(), "a");
    let mut b = CliProc::spawn(&["elect", "e", "b", "--ttl", "2"], Some(&ticket));
    // b waits behind a (once its key exists); a resigns.
    let client = client_of(&nodes[0]).await;
    wait_until("b's campaign key", || {
        let client = client.clone();
        async move {
            let r = client
                .range(
                    aspen_kv::api::RangeRequest::prefix(b"e/".to_vec()),
                    aspen_client::Consistency::Linearizable,
                )
                .await
                .unwrap();
            (r.kvs.len() == 2).then_some(())
        }
    })
    .await;
    let mut a = a;
    a.interrupt();
    assert!(a.wait().success());
    assert!(b.next_line().unwrap().starts_with("elected: b"));
    assert_eq!(listener.next_line().unwrap(), "b");
    // b dies without resigning: its lease runs out and the election is empty again.
    let started = std::time::Instant::now();
    b.kill9();
    assert_eq!(listener.next_line().unwrap(), "(no leader)");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "leadership ended before its lease"
    );
}
