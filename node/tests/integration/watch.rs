//! Watches over the client protocol: the SDK's stream and `aspen kv watch`, against real
//! processes; resumed across the loss of the member serving them with no gap and no
//! duplicate; compacted starts refused; a key without a grant refused.

use aspen_client::{ClientError, RpcError, WatchError, WatchRequest, WatchUpdate};
use aspen_kv::api::{prefix_end, Event, EventKind};
use futures::StreamExt;

use crate::common::*;

fn prefix(p: &str) -> WatchRequest {
    WatchRequest {
        start: p.as_bytes().to_vec(),
        end: Some(prefix_end(p.as_bytes())),
        from: 0,
        after: None,
        prev_kv: true,
        progress_every_ms: 0,
    }
}

/// Puts five new keys `w/NNN` from `*next` on; returns (revision, key, PUT) of each.
async fn five_puts(
    client: &aspen_client::Client,
    next: &mut usize,
) -> Vec<(u64, String, EventKind)> {
    let mut noted = Vec::new();
    for _ in 0..5 {
        let key = format!("w/{:03}", *next);
        let r = client
            .put(key.as_bytes().to_vec(), next.to_string().into_bytes())
            .await
            .unwrap();
        noted.push((r.revision, key, EventKind::Put));
        *next += 1;
    }
    noted
}

/// The next `n` events of `watch` (progress updates skipped).
async fn next_events(watch: &mut aspen_client::Watch, n: usize) -> Vec<Event> {
    let mut out = Vec::new();
    while out.len() < n {
        let update = tokio::time::timeout(DEADLINE, watch.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} events within {DEADLINE:?}", out.len()))
            .expect("the watch ended");
        match update.expect("a watch update") {
            WatchUpdate::Events { events, .. } => out.extend(events),
            WatchUpdate::Progress { .. } => {}
        }
    }
    out
}

/// Every event of a 3-node cluster's writes reaches the watch exactly once and in order,
/// while each member in turn is killed and restarted (one of them was serving the watch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_sees_every_change_once_in_order_across_member_failures() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = form(root.path(), 3, &[]).await;
    let client = client_for(&nodes.iter().collect::<Vec<_>>()).await;
    // From an explicit revision: the watch may open after the first write.
    let marker = client
        .put(b"x/start".to_vec(), b"x".to_vec())
        .await
        .unwrap();
    let mut watch = client.watch(WatchRequest {
        from: marker.revision + 1,
        ..prefix("w/")
    });
    let first = client.put(b"w/000".to_vec(), b"0".to_vec()).await.unwrap();
    let got = next_events(&mut watch, 1).await;
    assert_eq!(got[0].kv.mod_revision, first.revision);
    let mut want = vec![(first.revision, "w/000".to_string(), EventKind::Put)];
    let mut i = 1;
    for victim in nodes.iter_mut() {
        // Some writes, then the member goes, more writes, it comes back.
        want.extend(five_puts(&client, &mut i).await);
        // Outside the range: never seen.
        client
            .put(b"x/other".to_vec(), b"x".to_vec())
            .await
            .unwrap();
        victim.kill9();
        want.extend(five_puts(&client, &mut i).await);
        let gone = format!("w/{:03}", i - 1);
        let r = client.delete(gone.as_bytes().to_vec()).await.unwrap();
        want.push((r.revision, gone, EventKind::Delete));
        victim.restart(None);
    }
    let got = next_events(&mut watch, want.len() - 1).await;
    let got: Vec<(u64, String, EventKind)> =
        std::iter::once((first.revision, "w/000".to_string(), EventKind::Put))
            .chain(got.iter().map(|e| {
                (
                    e.kv.mod_revision,
                    String::from_utf8(e.kv.key.clone()).unwrap(),
                    e.kind,
                )
            }))
            .collect();
    assert_eq!(got, want);
    drop(watch);
    client.close().await;
}

/// `aspen kv watch`: history from --rev, live events, JSON lines; a compacted start is an
/// error that says so; a key without a grant is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_history_then_live_events_and_refuses_what_it_must() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, &[]).await;
    let ticket = ticket_text(&nodes);
    let client = client_of(&nodes[0]).await;
    let r1 = client.put(b"k".to_vec(), b"one".to_vec()).await.unwrap();
    client.put(b"k".to_vec(), b"two".to_vec()).await.unwrap();
    client.delete(b"k".to_vec()).await.unwrap();
    // History from r1 (three events), then a live write; --count stops it. However late the
    // CLI starts, the fourth event is the live one.
    let watch_args: Vec<String> = [
        "kv",
        "watch",
        "k",
        "--rev",
        &r1.revision.to_string(),
        "--prev-kv",
        "--count",
        "4",
        "-o",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (cluster, args) = (ticket.clone(), watch_args.clone());
    let running = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&args, Some(&cluster))
    });
    let live = client.put(b"k".to_vec(), b"live".to_vec()).await.unwrap();
    let out = tokio::time::timeout(DEADLINE, running)
        .await
        .expect("the CLI watch ends after 4 events")
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[0]["type"], "PUT");
    assert_eq!(lines[0]["kv"]["value"], "one");
    assert_eq!(lines[1]["kv"]["value"], "two");
    assert_eq!(lines[1]["prev_kv"]["value"], "one");
    assert_eq!(lines[2]["type"], "DELETE");
    assert_eq!(lines[2]["prev_kv"]["value"], "two");
    assert_eq!(lines[3]["kv"]["value"], "live");
    assert_eq!(lines[3]["revision"], live.revision);

    // Progress: an idle watch that asked for it hears the current revision.
    let mut idle = client.watch(WatchRequest {
        progress_every_ms: 200,
        ..prefix("idle/")
    });
    match tokio::time::timeout(DEADLINE, idle.next()).await.unwrap() {
        Some(Ok(WatchUpdate::Progress { revision })) => assert_eq!(revision, live.revision),
        other => panic!("expected progress, got {other:?}"),
    }
    drop(idle);

    // Bad input: typed refusals, and the node keeps serving.
    let refusal = |request: WatchRequest| {
        let client = client.clone();
        async move {
            let mut watch = client.watch(request);
            match tokio::time::timeout(DEADLINE, watch.next()).await.unwrap() {
                Some(Err(WatchError::Client(ClientError::Rpc(e)))) => e.to_string(),
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
    };
    let e = refusal(WatchRequest {
        progress_every_ms: u64::MAX,
        ..prefix("k")
    })
    .await;
    assert!(e.contains("progress every"), "{e}");
    let e = refusal(WatchRequest {
        start: vec![b'k'; aspen_kv::limits::MAX_KEY_BYTES + 1],
        end: None,
        ..prefix("")
    })
    .await;
    assert!(e.contains("key"), "{e}");
    let out = cli(&["kv", "watch", "k", "--progress", "1e12"], Some(&ticket));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--progress must be"),
        "{}",
        stderr(&out)
    );
    assert!(
        client.get(b"k".to_vec()).await.is_ok(),
        "the node still serves"
    );

    // Compacted: the watch cannot start there, and says why.
    client.put(b"k".to_vec(), b"three".to_vec()).await.unwrap();
    let last = client.put(b"k".to_vec(), b"four".to_vec()).await.unwrap();
    client.compact(last.revision).await.unwrap();
    let out = cli(
        &["kv", "watch", "k", "--rev", &r1.revision.to_string()],
        Some(&ticket),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("compacted"), "{}", stderr(&out));

    // Default deny: a key without a grant gets no watch.
    let stranger = aspen_client::Client::connect_with(
        aspen_client::ClusterTicket {
            members: vec![nodes[0].ticket.clone()],
        },
        stranger_options(),
    )
    .await
    .unwrap();
    let mut refused = stranger.watch(prefix(""));
    match tokio::time::timeout(DEADLINE, refused.next())
        .await
        .unwrap()
    {
        Some(Err(WatchError::Client(ClientError::Rpc(RpcError::PermissionDenied { .. })))) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
    stranger.close().await;
    client.close().await;
}

/// Negative control: a node that skips a revision when a watch is reopened from one (test
/// fault `watch-skip-on-resume`) is caught by the same comparison as above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_a_watch_that_skips_on_resume_is_caught() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = form(
        root.path(),
        1,
        &["--unsafe-test-fault", "watch-skip-on-resume"],
    )
    .await;
    let client = client_of(&nodes[0]).await;
    // From now (0): the first opening is not a resume, so nothing is skipped yet. A
    // progress update shows the watch runs: writes from then on are in it.
    let mut watch = client.watch(WatchRequest {
        from: 0,
        progress_every_ms: 100,
        ..prefix("w/")
    });
    match tokio::time::timeout(DEADLINE, watch.next()).await.unwrap() {
        Some(Ok(WatchUpdate::Progress { .. })) => {}
        other => panic!("expected progress first, got {other:?}"),
    }
    let first = client.put(b"w/a".to_vec(), b"1".to_vec()).await.unwrap();
    let mut want = vec![first.revision];
    let mut got: Vec<u64> = next_events(&mut watch, 1)
        .await
        .iter()
        .map(|e| e.kv.mod_revision)
        .collect();
    assert_eq!(got, want, "nothing is skipped before a resume");
    // The node restarts: the watch reopens from its cursor.
    nodes[0].kill9();
    nodes[0].restart(None);
    for key in ["w/b", "w/c"] {
        let r = client
            .put(key.as_bytes().to_vec(), b"2".to_vec())
            .await
            .unwrap();
        want.push(r.revision);
    }
    let last = *want.last().unwrap();
    while got.last() != Some(&last) {
        let events = next_events(&mut watch, 1).await;
        got.extend(events.iter().map(|e| e.kv.mod_revision));
    }
    assert_ne!(got, want, "the comparison must catch the skipped revision");
    assert!(!got.contains(&want[1]), "{got:?} vs {want:?}");
    drop(watch);
    client.close().await;
}

/// `--auto-compaction-retention`: in revision mode the leader keeps the last N revisions,
/// in periodic mode a time's worth; a watch or read from before the compaction point is
/// refused as compacted; a malformed retention stops the node with a clear message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_compaction_keeps_what_it_is_told() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(
        root.path(),
        1,
        &[
            "--auto-compaction-mode",
            "revision",
            "--auto-compaction-retention",
            "3",
            "--auto-compaction-every",
            "0.1",
        ],
    )
    .await;
    let client = client_of(&nodes[0]).await;
    let mut last = 0;
    for i in 0..10 {
        last = client
            .put(b"c".to_vec(), i.to_string().into_bytes())
            .await
            .unwrap()
            .revision;
    }
    let status = wait_until("compacted to the last 3 revisions", || {
        let client = client.clone();
        async move {
            let s = client.status().await.unwrap();
            (s.compacted_revision == last - 3).then_some(s)
        }
    })
    .await;
    assert_eq!(status.revision, last);
    let mut old = client.watch(WatchRequest {
        from: last - 4,
        ..prefix("c")
    });
    match tokio::time::timeout(DEADLINE, old.next()).await.unwrap() {
        Some(Err(WatchError::Canceled(aspen_client::WatchCanceled::Compacted {
            compacted,
            ..
        }))) => assert_eq!(compacted, last - 3),
        other => panic!("expected compacted, got {other:?}"),
    }
    let kept = client
        .get_with(
            b"c".to_vec(),
            last - 3,
            aspen_client::Consistency::Linearizable,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept.value, b"6");
    client.close().await;
    drop(nodes);

    // Periodic: history older than the retention goes.
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, &["--auto-compaction-retention", "1s"]).await;
    let client = client_of(&nodes[0]).await;
    let first = client.put(b"p".to_vec(), b"1".to_vec()).await.unwrap();
    wait_until("periodic compaction past the first write", || {
        let client = client.clone();
        async move {
            // Writes keep the revision moving; compaction follows a second behind.
            client.put(b"p".to_vec(), b"n".to_vec()).await.unwrap();
            let s = client.status().await.unwrap();
            (s.compacted_revision > first.revision).then_some(())
        }
    })
    .await;
    client.close().await;

    // A malformed retention: the node refuses to start and says why.
    let out = std::process::Command::new(aspen_bin())
        .args(["node", "run", "--data-dir"])
        .arg(root.path().join("bad"))
        .args(["--auto-compaction-retention", "5x"])
        .env("ASPEN_NO_DHT", "true")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auto compaction retention"), "{err}");
}

/// All watches of a connection share one stream: more watches than a connection has
/// streams (128) run side by side with ordinary requests; a connection holds at most
/// `MAX_WATCHES_PER_CONNECTION` watches, the next one is refused with a typed error, and a
/// cancelled watch makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_share_one_stream_and_a_connection_holds_a_bounded_number() {
    use aspen_client::protocol::MAX_WATCHES_PER_CONNECTION;
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, &[]).await;
    let client = client_of(&nodes[0]).await;
    // Each watch reports progress once it runs.
    let open = |key: String| {
        client.watch(WatchRequest {
            progress_every_ms: 1000,
            ..prefix(&key)
        })
    };
    let mut watches: Vec<aspen_client::Watch> = (0..MAX_WATCHES_PER_CONNECTION)
        .map(|i| open(format!("m/{i:05}")))
        .collect();
    for w in watches.iter_mut() {
        match tokio::time::timeout(DEADLINE, w.next()).await.unwrap() {
            Some(Ok(WatchUpdate::Progress { .. })) => {}
            other => panic!("expected the watch to run, got {other:?}"),
        }
    }
    // Requests still flow on the connection, and events reach their watches.
    let put = client
        .put(b"m/00200".to_vec(), b"x".to_vec())
        .await
        .unwrap();
    let got = loop {
        match tokio::time::timeout(DEADLINE, watches[200].next())
            .await
            .unwrap()
        {
            Some(Ok(WatchUpdate::Events { events, .. })) => break events,
            Some(Ok(WatchUpdate::Progress { .. })) => continue,
            other => panic!("expected the event, got {other:?}"),
        }
    };
    assert_eq!(got[0].kv.mod_revision, put.revision);
    // One more is refused, with the limit.
    let mut extra = open("m/extra".into());
    match tokio::time::timeout(DEADLINE, extra.next()).await.unwrap() {
        Some(Err(WatchError::Client(ClientError::Rpc(RpcError::TooManyWatches { max })))) => {
            assert_eq!(max, MAX_WATCHES_PER_CONNECTION)
        }
        other => panic!("expected too many watches, got {other:?}"),
    }
    // A cancelled watch makes room (its cancel reaches the node soon after the drop).
    drop(watches.pop());
    let started = std::time::Instant::now();
    loop {
        let mut again = open("m/again".into());
        match tokio::time::timeout(DEADLINE, again.next()).await.unwrap() {
            Some(Ok(_)) => break,
            Some(Err(WatchError::Client(ClientError::Rpc(RpcError::TooManyWatches {
                ..
            }))))
                if started.elapsed() < DEADLINE => {}
            other => panic!("expected room for a watch, got {other:?}"),
        }
    }
    drop(watches);
    client.close().await;
}

/// A watch whose reader stops reading is cancelled as too slow (after the events it had
/// taken, with nothing skipped), while another watch on the same connection sees every
/// event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_stops_reading_is_cancelled_as_too_slow_and_others_go_on() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, &[]).await;
    let client = client_of(&nodes[0]).await;
    let start = client.put(b"x".to_vec(), b"0".to_vec()).await.unwrap();
    let from = WatchRequest {
        from: start.revision + 1,
        ..prefix("s/")
    };
    let mut stalled = client.watch(from.clone());
    let mut reader = client.watch(from);
    let mut want = Vec::new();
    for i in 0..100 {
        let r = client
            .put(format!("s/{i:03}").into_bytes(), vec![b'v'; 1024])
            .await
            .unwrap();
        want.push(r.revision);
    }
    let seen: Vec<u64> = next_events(&mut reader, want.len())
        .await
        .iter()
        .map(|e| e.kv.mod_revision)
        .collect();
    assert_eq!(seen, want);
    // The stalled watch: what it had taken, in order from the start, then the reason.
    let mut got = Vec::new();
    let reason = loop {
        match tokio::time::timeout(DEADLINE, stalled.next())
            .await
            .unwrap()
        {
            Some(Ok(WatchUpdate::Events { events, .. })) => {
                got.extend(events.iter().map(|e| e.kv.mod_revision))
            }
            Some(Ok(WatchUpdate::Progress { .. })) => {}
            Some(Err(e)) => break e,
            None => panic!("the watch ended without a reason"),
        }
    };
    assert!(matches!(reason, WatchError::TooSlow), "{reason}");
    assert!(
        got.len() < want.len(),
        "it was cancelled, not fed everything"
    );
    assert_eq!(
        got,
        want[..got.len()],
        "nothing skipped before the cancellation"
    );
    client.close().await;
}
