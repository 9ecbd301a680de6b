//! Leases against real processes: kept alive across leader kills they keep their keys; once
//! no longer kept alive they expire, deleting their keys exactly once (seen by a watch); bad
//! lease requests are typed errors; a key without a grant is refused; the CLI.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aspen_client::{ClientError, RpcError, WatchRequest, WatchUpdate};
use aspen_kv::api::{prefix_end, ApplyError, EventKind, LimitError};
use futures::StreamExt;
use tokio::time::Instant;

use crate::common::*;

/// The lease TTL of the fault test. Leader elections take 0.5-1 s (plus the client's
/// retries); a new leader gives every lease its full TTL again.
const TTL: u64 = 10;
/// How long after its deadline an expired lease's keys must be gone: the leader looks at
/// deadlines as they pass, then commits one Raft entry; generous for a loaded 2-core machine.
const EXPIRY_BOUND: Duration = Duration::from_secs(15);

fn watch_prefix(p: &str) -> WatchRequest {
    WatchRequest {
        start: p.as_bytes().to_vec(),
        end: Some(prefix_end(p.as_bytes())),
        from: 0,
        after: None,
        prev_kv: false,
        progress_every_ms: 0,
    }
}

/// (revision, key, kind) of every event a watch delivered so far, collected in the
/// background, with the local time each arrived.
type Seen = Arc<Mutex<Vec<(u64, String, EventKind, Instant)>>>;

fn collect(mut watch: aspen_client::Watch) -> (Seen, tokio::task::JoinHandle<()>) {
    let seen: Seen = Default::default();
    let out = seen.clone();
    let task = tokio::spawn(async move {
        while let Some(update) = watch.next().await {
            if let Ok(WatchUpdate::Events { events, .. }) = update {
                let now = Instant::now();
                let mut out = out.lock().unwrap();
                for e in events {
                    let key = String::from_utf8(e.kv.key.clone()).unwrap();
                    out.push((e.kv.mod_revision, key, e.kind, now));
                }
            }
        }
    });
    (seen, task)
}

/// A lease kept alive keeps its keys while the leader is killed (twice); once the
/// keep-alives stop, its keys are deleted exactly once, at one revision, no earlier than
/// TTL after the last acknowledged keep-alive was sent and no later than
/// [`EXPIRY_BOUND`] after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_lease_survives_leader_kills_then_expires_exactly_once() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = form(root.path(), 3, &[]).await;
    let client = client_for(&nodes.iter().collect::<Vec<_>>()).await;
    let (seen, watcher) = collect(client.watch(WatchRequest {
        progress_every_ms: 100,
        ..watch_prefix("l/")
    }));
    let lease = client.lease_grant(TTL, 0).await.unwrap();
    assert_eq!(lease.ttl_secs, TTL);
    for key in ["l/a", "l/b"] {
        client
            .put_with_lease(key.as_bytes().to_vec(), b"v".to_vec(), lease.id, false)
            .await
            .unwrap();
    }
    client.put(b"l/c".to_vec(), b"kept".to_vec()).await.unwrap();
    let got = client.get(b"l/a".to_vec()).await.unwrap().unwrap();
    assert_eq!(got.lease, lease.id);

    // Keep-alives in the background; each acknowledged one's send time is noted.
    let acked: Arc<Mutex<Vec<Instant>>> = Default::default();
    let mut keep_alive = client.lease_keep_alive(lease.id);
    let noted = acked.clone();
    let keeper = tokio::spawn(async move {
        while let Some(ack) = keep_alive.next().await {
            match ack {
                Ok(k) => noted.lock().unwrap().push(k.sent_at),
                Err(e) if aspen_client::is_lease_gone(&e) => panic!("lease lost: {e}"),
                Err(_) => {}
            }
        }
    });
    for round in 0..2 {
        // Round 1 follows a restart: the member that answers may know no leader yet.
        let leader = leader_named_by(&client).await;
        let victim = nodes.iter_mut().find(|n| n.node_id() == leader).unwrap();
        let acks_before = acked.lock().unwrap().len();
        victim.kill9();
        // Keep-alives resume with the new leader.
        wait_until(&format!("keep-alives after leader kill {round}"), || {
            let acked = acked.clone();
            async move { (acked.lock().unwrap().len() > acks_before + 1).then_some(()) }
        })
        .await;
        victim.restart(None);
        for key in ["l/a", "l/b"] {
            assert!(
                client.get(key.as_bytes().to_vec()).await.unwrap().is_some(),
                "{key} lost while its lease was kept alive"
            );
        }
    }
    keeper.abort();
    let _ = keeper.await;
    let last_ack = *acked.lock().unwrap().last().unwrap();
    let deadline = last_ack + Duration::from_secs(TTL);
    // Every read that completes before the deadline sees the keys.
    loop {
        let present = client.get(b"l/a".to_vec()).await.unwrap().is_some();
        let done = Instant::now();
        if done >= deadline {
            break;
        }
        assert!(present, "l/a deleted before its lease could expire");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_until("l/a deleted", || {
        let client = client.clone();
        async move {
            client
                .get(b"l/a".to_vec())
                .await
                .unwrap()
                .is_none()
                .then_some(())
        }
    })
    .await;
    let late = Instant::now().duration_since(deadline);
    assert!(
        late <= EXPIRY_BOUND,
        "l/a still read {late:?} after its lease ran out"
    );
    // Then the keys go, both at one revision, seen once.
    wait_until("the lease's keys deleted", || {
        let seen = seen.clone();
        async move {
            let deletes = seen
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, _, kind, _)| *kind == EventKind::Delete)
                .count();
            (deletes >= 2).then_some(())
        }
    })
    .await;
    let marker = client.put(b"l/z".to_vec(), b"end".to_vec()).await.unwrap();
    wait_until("the marker seen", || {
        let seen = seen.clone();
        async move {
            let seen = seen.lock().unwrap();
            seen.iter()
                .any(|(rev, _, _, _)| *rev == marker.revision)
                .then_some(())
        }
    })
    .await;
    let events = seen.lock().unwrap().clone();
    let deletes: Vec<_> = events
        .iter()
        .filter(|(_, _, kind, _)| *kind == EventKind::Delete)
        .collect();
    assert_eq!(deletes.len(), 2, "{events:?}");
    assert_eq!(deletes[0].0, deletes[1].0, "one revision deletes both");
    assert_eq!(
        deletes.iter().map(|d| d.1.as_str()).collect::<Vec<_>>(),
        ["l/a", "l/b"]
    );
    for (_, key, _, at) in &deletes {
        assert!(*at >= deadline, "{key} deleted before its lease ran out");
        assert!(
            *at <= deadline + EXPIRY_BOUND,
            "{key} deleted {:?} after its lease ran out",
            at.duration_since(deadline)
        );
    }
    assert_eq!(
        client.get(b"l/c".to_vec()).await.unwrap().unwrap().value,
        b"kept"
    );
    match client.lease_time_to_live(lease.id, false).await {
        Err(ClientError::Rpc(RpcError::Apply(ApplyError::LeaseNotFound { id }))) => {
            assert_eq!(id, lease.id)
        }
        other => panic!("expected the lease gone, got {other:?}"),
    }
    watcher.abort();
    client.close().await;
}

/// Bad lease requests are typed errors and change nothing; a key without a grant is
/// refused; the CLI grants, attaches, shows, keeps alive, lists and revokes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_requests_bad_input_strangers_and_the_cli() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, &[]).await;
    let ticket = ticket_text(&nodes);
    let client = client_of(&nodes[0]).await;

    // Out of range: refused by the SDK before sending, and by the node.
    for ttl in [0, 1, aspen_kv::limits::MAX_LEASE_TTL_SECS + 1] {
        match client.lease_grant(ttl, 0).await {
            Err(ClientError::Limit(LimitError::LeaseTtlOutOfRange { ttl_secs, .. })) => {
                assert_eq!(ttl_secs, ttl)
            }
            other => panic!("TTL {ttl}: expected out of range, got {other:?}"),
        }
    }
    let out = cli(&["lease", "grant", "1"], Some(&ticket));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("time to live"), "{}", stderr(&out));
    let missing = 424242;
    let gone = |r: Result<(), ClientError>| match r {
        Err(ClientError::Rpc(RpcError::Apply(ApplyError::LeaseNotFound { id })))
        | Err(ClientError::Apply(ApplyError::LeaseNotFound { id })) => assert_eq!(id, missing),
        other => panic!("expected lease not found, got {other:?}"),
    };
    gone(client.lease_keep_alive_once(missing).await.map(|_| ()));
    gone(client.lease_revoke(missing).await.map(|_| ()));
    gone(client.lease_time_to_live(missing, true).await.map(|_| ()));
    gone(
        client
            .put_with_lease(b"k".to_vec(), b"v".to_vec(), missing, false)
            .await
            .map(|_| ()),
    );
    assert!(client.get(b"k".to_vec()).await.unwrap().is_none());
    let lease = client.lease_grant(30, 77).await.unwrap();
    assert_eq!(lease.id, 77);
    match client.lease_grant(30, 77).await {
        Err(ClientError::Apply(ApplyError::LeaseExists { id: 77 })) => {}
        other => panic!("expected lease exists, got {other:?}"),
    }

    // Default deny: a key with no grant can do nothing with leases.
    let stranger = aspen_client::Client::connect_with(
        aspen_client::ClusterTicket {
            members: vec![nodes[0].ticket.clone()],
        },
        stranger_options(),
    )
    .await
    .unwrap();
    let denied = |r: Result<(), ClientError>| match r {
        Err(ClientError::Rpc(RpcError::PermissionDenied { .. })) => {}
        other => panic!("expected permission denied, got {other:?}"),
    };
    denied(stranger.lease_grant(30, 0).await.map(|_| ()));
    denied(stranger.lease_keep_alive_once(77).await.map(|_| ()));
    denied(stranger.lease_revoke(77).await.map(|_| ()));
    denied(stranger.lease_time_to_live(77, true).await.map(|_| ()));
    denied(stranger.lease_list().await.map(|_| ()));
    stranger.close().await;
    assert!(client.lease_time_to_live(77, false).await.is_ok());

    // The CLI.
    let out = cli(&["lease", "grant", "60"], Some(&ticket));
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    let out = cli(&["kv", "put", "svc/a", "up", "--lease", &id], Some(&ticket));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(
        &["lease", "ttl", &id, "--keys", "-o", "json"],
        Some(&ticket),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let ttl: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(ttl["ttl"], 60);
    assert_eq!(ttl["keys"], serde_json::json!(["svc/a"]));
    let remaining = ttl["remaining"].as_f64().unwrap();
    assert!(remaining > 0.0 && remaining <= 60.0, "{remaining}");
    let out = cli(&["lease", "keepalive", &id, "--once"], Some(&ticket));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("kept alive"), "{}", stdout(&out));
    let out = cli(&["lease", "list"], Some(&ticket));
    let listed = stdout(&out);
    let listed: Vec<&str> = listed.lines().collect();
    assert!(
        listed.contains(&id.as_str()) && listed.contains(&"77"),
        "{listed:?}"
    );
    let out = cli(&["kv", "get", "svc/a", "-o", "json"], Some(&ticket));
    let kv: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(kv["lease"].to_string(), id);
    let out = cli(&["lease", "revoke", &id], Some(&ticket));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("deleted 1 keys"), "{}", stdout(&out));
    assert!(client.get(b"svc/a".to_vec()).await.unwrap().is_none());
    let out = cli(&["lease", "keepalive", &id], Some(&ticket));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("gone"), "{}", stderr(&out));
    client.close().await;
}
