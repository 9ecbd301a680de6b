//! End-to-end tests with real `aspen` processes on loopback.

use std::collections::BTreeSet;

use crate::common::*;
use aspen_client::{Client, ClusterTicket, Consistency};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_forms_a_cluster_that_serves_through_any_node() {
    let root = tempfile::tempdir().unwrap();
    let nodes: Vec<NodeProc> = (0..3)
        .map(|i| NodeProc::start(&root.path().join(format!("n{i}")), &[]))
        .collect();
    // By data directory (ticket and bootstrap secret read there), and by ticket + secret file.
    let d0 = nodes[0].dir.to_str().unwrap();
    let init = cli(&["cluster", "init", d0, "-o", "json"], None);
    assert!(init.status.success(), "{}", stderr(&init));
    let cluster = wait_for("cluster.ticket", || nodes[0].cluster_ticket()).to_string();
    let d1 = nodes[1].dir.to_str().unwrap();
    let out = cli(&["cluster", "add", d1], Some(&cluster));
    assert!(out.status.success(), "{}", stderr(&out));
    let secret_file = nodes[2].dir.join("bootstrap.secret");
    let out = cli(
        &[
            "cluster",
            "add",
            &nodes[2].ticket.to_string(),
            "--bootstrap-secret",
            secret_file.to_str().unwrap(),
        ],
        Some(&cluster),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let status = cli(&["cluster", "status", "-o", "json"], Some(&cluster));
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let members = v["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{v}");
    assert!(members.iter().all(|m| m["voter"] == true));
    assert!(v["leader"].is_string());
    // Every node keeps cluster.ticket current with all three members.
    for n in &nodes {
        wait_for("3-member cluster.ticket", || {
            n.cluster_ticket().filter(|t| t.members.len() == 3)
        });
    }

    // Writes through every node (followers forward to the leader).
    for (i, n) in nodes.iter().enumerate() {
        let only = ClusterTicket {
            members: vec![n.ticket.clone()],
        }
        .to_string();
        let out = cli(
            &[
                "kv",
                "put",
                &format!("k{i}"),
                &format!("v{i}"),
                "-o",
                "json",
            ],
            Some(&only),
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v["revision"].as_u64().unwrap() >= 1);
    }
    // Linearizable reads through every node see all of them at once.
    for n in &nodes {
        let only = ClusterTicket {
            members: vec![n.ticket.clone()],
        }
        .to_string();
        for i in 0..3 {
            let out = cli(&["kv", "get", &format!("k{i}")], Some(&only));
            assert_eq!(stdout(&out).trim(), format!("v{i}"), "{}", stderr(&out));
        }
    }
    let scan = cli(&["kv", "scan", "k", "-o", "json"], Some(&cluster));
    let v: serde_json::Value = serde_json::from_slice(&scan.stdout).unwrap();
    assert_eq!(v["kvs"].as_array().unwrap().len(), 3);
    // History: the value before an overwrite stays readable at its revision.
    let first = cli(&["kv", "get", "k0", "-o", "json"], Some(&cluster));
    let rev = serde_json::from_slice::<serde_json::Value>(&first.stdout).unwrap()["mod_revision"]
        .as_u64()
        .unwrap();
    assert!(cli(&["kv", "put", "k0", "changed"], Some(&cluster))
        .status
        .success());
    let old = cli(
        &["kv", "get", "k0", "--rev", &rev.to_string()],
        Some(&cluster),
    );
    assert_eq!(stdout(&old).trim(), "v0");
    // Compare-and-swap: only from the expected value; a failed compare exits 1.
    let cas = cli(
        &["kv", "cas", "k0", "swapped", "--expect", "changed"],
        Some(&cluster),
    );
    assert!(cas.status.success(), "{}", stderr(&cas));
    let stale = cli(
        &[
            "kv", "cas", "k0", "again", "--expect", "changed", "-o", "json",
        ],
        Some(&cluster),
    );
    assert!(!stale.status.success());
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&stale.stdout).unwrap()["swapped"],
        false
    );
    assert!(
        stderr(&stale).contains("expected value"),
        "{}",
        stderr(&stale)
    );
    let fresh = cli(&["kv", "cas", "fresh", "1", "--absent"], Some(&cluster));
    assert!(fresh.status.success(), "{}", stderr(&fresh));
    assert!(
        !cli(&["kv", "cas", "fresh", "2", "--absent"], Some(&cluster))
            .status
            .success()
    );
    assert_eq!(
        stdout(&cli(&["kv", "get", "k0"], Some(&cluster))).trim(),
        "swapped"
    );
    // After compaction that history is gone, with a clear error.
    let out = cli(&["kv", "compact", &(rev + 1).to_string()], Some(&cluster));
    assert!(out.status.success(), "{}", stderr(&out));
    let old = cli(
        &["kv", "get", "k0", "--rev", &rev.to_string()],
        Some(&cluster),
    );
    assert!(!old.status.success());
    assert!(stderr(&old).contains("compacted"), "{}", stderr(&old));
    let del = cli(
        &["kv", "del", "k", "--prefix", "-o", "json"],
        Some(&cluster),
    );
    let v: serde_json::Value = serde_json::from_slice(&del.stdout).unwrap();
    assert_eq!(v["deleted"], 3);
    let gone = cli(&["kv", "get", "k1"], Some(&cluster));
    assert!(!gone.status.success());
    assert!(stderr(&gone).contains("not found"));

    // Remove a member; the rest keep serving.
    let victim = format!("{:016x}", nodes[2].node_id());
    let out = cli(&["cluster", "remove", &victim], Some(&cluster));
    assert!(out.status.success(), "{}", stderr(&out));
    let status = cli(&["cluster", "status", "-o", "json"], Some(&cluster));
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["members"].as_array().unwrap().len(), 2, "{v}");
    assert!(cli(&["kv", "put", "after", "removal"], Some(&cluster))
        .status
        .success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill9_during_concurrent_writes_loses_no_acknowledged_write() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = form(root.path(), 3, &[]).await;
    let client = client_for(&nodes.iter().collect::<Vec<_>>()).await;
    let writers = Writers::start(vec![client.clone(); 8], "w/");
    writers.wait_for_more(100).await;

    let leader = leader_named_by(&client).await;
    let idx = nodes.iter().position(|n| n.node_id() == leader).unwrap();
    nodes[idx].kill9();
    // A new leader serves writes.
    writers.wait_for_more(200).await;
    let new_leader = leader_named_by(&client).await;
    assert_ne!(new_leader, leader);
    let acked = writers.stop().await;

    for (i, n) in nodes.iter().enumerate() {
        if i != idx {
            assert_all_present(n, "w/", &acked).await;
        }
    }
    // The killed node restarts and catches up from its log and the leader.
    nodes[idx].restart(None);
    assert_all_present(&nodes[idx], "w/", &acked).await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_and_new_nodes_catch_up_by_snapshot() {
    let root = tempfile::tempdir().unwrap();
    let args = ["--snapshot-every", "20", "--keep-log-after-snapshot", "0"];
    let mut nodes = form(root.path(), 3, &args).await;
    let client = client_for(&nodes.iter().collect::<Vec<_>>()).await;
    let leader = leader_named_by(&client).await;
    let lagging = nodes.iter().position(|n| n.node_id() != leader).unwrap();
    nodes[lagging].kill9();
    let mut acked = BTreeSet::new();
    for i in 0..150 {
        let key = format!("s/{i:04}");
        client
            .put(key.clone().into_bytes(), vec![b'x'; 100])
            .await
            .unwrap();
        acked.insert(key);
    }
    // The leader has snapshotted and purged the entries the lagging node lacks.
    let purged = wait_until("leader snapshot", || async {
        let s = client.status().await.ok()?;
        s.snapshot_index.filter(|i| *i >= 100)
    })
    .await;
    nodes[lagging].restart(None);
    assert_all_present(&nodes[lagging], "s/", &acked).await;
    let node_view = client_of(&nodes[lagging]).await;
    let s = node_view.status().await.unwrap();
    assert!(
        s.snapshot_index.unwrap_or(0) >= purged.min(100),
        "caught up through a snapshot: {s:?}"
    );
    node_view.close().await;

    // A node added later receives the full state.
    let late = NodeProc::start(&root.path().join("late"), &args);
    client
        .add_member(late.ticket.clone(), bootstrap_secret(&late.dir))
        .await
        .unwrap();
    assert_all_present(&late, "s/", &acked).await;
    client.close().await;
    drop(nodes);
}

/// A node killed after `cluster add` introduced it but before its first log entry reached
/// its disk comes back still expecting its cluster (it was once locked out for good), and
/// `cluster add` finishes once it holds the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_before_its_first_log_entry_rejoins() {
    let root = tempfile::tempdir().unwrap();
    let first = NodeProc::start(&root.path().join("n0"), &[]);
    let mut joining = NodeProc::start(
        &root.path().join("n1"),
        &["--unsafe-test-fault", "crash-before-first-entry"],
    );
    let client = client_of(&first).await;
    client
        .init_cluster(String::new(), bootstrap_secret(&first.dir))
        .await
        .unwrap();
    client.put(b"before".to_vec(), b"1".to_vec()).await.unwrap();
    let add = tokio::spawn({
        let client = client_of(&first).await;
        let ticket = joining.ticket.clone();
        let secret = bootstrap_secret(&joining.dir);
        async move { client.add_member(ticket, secret).await }
    });
    wait_until("the new member to crash before its first entry", || {
        let exited = joining.try_exit();
        async move { exited.map(|_| ()) }
    })
    .await;
    joining.restart(Some(&[]));
    add.await
        .unwrap()
        .expect("cluster add finishes once the restarted member holds the log");
    let status = client.status().await.unwrap();
    assert!(
        status
            .members
            .iter()
            .any(|m| m.node_id == joining.node_id() && m.voter),
        "{status:?}"
    );
    let mut acked = BTreeSet::new();
    acked.insert("before".to_string());
    assert_all_present(&joining, "", &acked).await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_kill9_keeps_every_acknowledged_write() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = form(root.path(), 1, &[]).await;
    let client = client_for(&[&nodes[0]]).await;
    let writers = Writers::start(vec![client.clone(); 8], "c/");
    writers.wait_for_more(300).await;
    nodes[0].kill9();
    let before_crash = writers.count();
    nodes[0].restart(None);
    // The writers' retries reach the restarted node and succeed.
    writers.wait_for_more(100).await;
    let acked = writers.stop().await;
    assert!(acked.len() >= before_crash + 100);
    assert_all_present(&nodes[0], "c/", &acked).await;
    // And it keeps working.
    client
        .put(b"after".to_vec(), b"crash".to_vec())
        .await
        .unwrap();
    client.close().await;
}

/// A restarted node runs an election before it leads (it may have lost entries it had
/// already replicated, so it must not resume its old term), and after a whole cluster
/// restarts nobody leads for an election timeout or more. Requests that arrive meanwhile wait
/// for the election instead of being refused: here a blob upload, which the client does not
/// retry (its body is a stream), sent the moment the restarted cluster answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_during_an_election_wait_for_its_leader() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = form(root.path(), 3, &[]).await;
    let client = client_for(&nodes.iter().collect::<Vec<_>>()).await;
    client.put(b"before".to_vec(), b"1".to_vec()).await.unwrap();
    client.close().await;
    for node in nodes.iter_mut() {
        node.kill9();
    }
    for node in nodes.iter_mut() {
        node.restart(None);
    }
    let client = client_for(&nodes.iter().collect::<Vec<_>>()).await;
    let file = root.path().join("blob");
    std::fs::write(&file, b"sent during the election").unwrap();
    let added = client
        .blob_add_file(&file, Some("during/election"), |_| {})
        .await
        .expect("a blob upload sent during the election");
    let got = client.get(b"before".to_vec()).await.unwrap();
    assert_eq!(got.map(|kv| kv.value), Some(b"1".to_vec()));
    let out = root.path().join("out");
    client
        .blob_get_to_file(added.hash, &out, |_, _| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), b"sent during the election");
    client.close().await;
}

/// The node that answers a write has it in its store for every read that follows, a
/// serializable one too (no read barrier): an apply answers before its redb commit, and
/// reads wait for that commit (`StateDb`). Every 32nd apply commits with an fsync, so without
/// the wait, reads here would miss writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answering_node_reads_its_own_writes_at_once() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, &[]).await;
    let client = client_of(&nodes[0]).await;
    for i in 0..300u32 {
        let key = format!("ryw/{i}").into_bytes();
        let put = client
            .put(key.clone(), i.to_be_bytes().to_vec())
            .await
            .unwrap();
        let read = client
            .get_with(key, 0, Consistency::Serializable)
            .await
            .unwrap()
            .expect("a write the node answered is in its store");
        assert_eq!(read.mod_revision, put.revision, "write {i}");
    }
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_restarted_on_new_addresses_rejoin() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = form(root.path(), 3, &[]).await;
    let client = client_for(&nodes.iter().collect::<Vec<_>>()).await;
    // First a follower moves, then the leader (which loses leadership and must announce
    // itself to the new leader).
    for (round, move_leader) in [(0, false), (1, true)] {
        let before = format!("before-{round}");
        client
            .put(before.clone().into_bytes(), b"move".to_vec())
            .await
            .unwrap();
        let leader = leader_named_by(&client).await;
        let mover = nodes
            .iter()
            .position(|n| (n.node_id() == leader) == move_leader)
            .unwrap();
        let old_addrs = nodes[mover].ticket.addrs.clone();
        // A port the OS says is free right now.
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let bind = format!("127.0.0.1:{port}");
        nodes[mover].restart(Some(&["--bind", &bind]));
        assert_ne!(nodes[mover].ticket.addrs, old_addrs);
        let id = nodes[mover].node_id();
        // The membership learns the new address...
        wait_until_or_dump("membership to record the new address", &nodes, || async {
            let s = client.status().await.ok()?;
            let m = s.members.iter().find(|m| m.node_id == id)?;
            (m.node.addrs == vec![bind.parse().unwrap()]).then_some(())
        })
        .await;
        // ...and the moved node receives new writes.
        let after = format!("after-{round}");
        client
            .put(after.clone().into_bytes(), b"move".to_vec())
            .await
            .unwrap();
        let acked = BTreeSet::from([after, before]);
        wait_until_or_dump("moved node to see new writes", &nodes, || async {
            let keys = local_keys(&nodes[mover], "").await?;
            let have: BTreeSet<String> = keys
                .into_iter()
                .map(|k| String::from_utf8(k).unwrap())
                .collect();
            acked.is_subset(&have).then_some(())
        })
        .await;
    }
    client.close().await;
}

/// `aspen up` as a child process; on drop it and every node it started are killed.
struct UpProc {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl UpProc {
    fn start(dir: &std::path::Path, extra: &[&str]) -> UpProc {
        let child = std::process::Command::new(aspen_bin())
            .args(["up", "--nodes", "3", "-o", "json", "--data-dir"])
            .arg(dir)
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            // Kept next to the data (and shown if the test fails).
            .stderr(
                std::fs::File::create(dir.with_extension("up.log")).unwrap_or_else(|_| {
                    std::fs::File::create(std::env::temp_dir().join("aspen-up.log")).unwrap()
                }),
            )
            .spawn()
            .unwrap();
        UpProc {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn pids(&self) -> Vec<u32> {
        (1..=3)
            .filter_map(|i| std::fs::read_to_string(self.dir.join(format!("node-{i}/pid"))).ok())
            .filter_map(|p| p.trim().parse().ok())
            .collect()
    }
}

impl Drop for UpProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in self.pids() {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    }
}

fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A zombie has exited; only its parent's bookkeeping is left.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aspen_up_starts_a_usable_cluster_that_comes_back() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("up");
    let ticket_file = dir.join("cluster.ticket");
    let mut up = UpProc::start(&dir, &["--metrics"]);
    let ticket = wait_for("aspen up to write cluster.ticket", || {
        std::fs::read_to_string(&ticket_file).ok()
    });
    let ticket = ticket.trim().to_string();
    // As README says: the identity `aspen up` made its admin; any other key may do nothing.
    let admin = dir.join("admin.key");
    let admin = admin.to_str().unwrap();
    let put = cli(
        &["kv", "put", "hello", "world", "--identity", admin],
        Some(&ticket),
    );
    assert!(put.status.success(), "{}", stderr(&put));
    let other = cli(&["kv", "get", "hello"], Some(&ticket));
    assert!(
        stderr(&other).contains("permission denied"),
        "{}",
        stderr(&other)
    );
    let status = cli(
        &["cluster", "status", "-o", "json", "--identity", admin],
        Some(&ticket),
    );
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["members"].as_array().unwrap().len(), 3, "{v}");
    // `--metrics`: the node serves Prometheus on a loopback port its status names.
    let url = v["figures"]["metrics"].as_str().expect("metrics served");
    let addr = url
        .strip_prefix("http://")
        .and_then(|a| a.strip_suffix("/metrics"))
        .unwrap()
        .parse()
        .unwrap();
    assert!(crate::metrics::scrape(addr, None).contains_key("aspen_raft_term"));

    // Nodes never outlive `aspen up`, even when it is killed with SIGKILL.
    let pids = up.pids();
    assert_eq!(pids.len(), 3);
    let before = std::fs::metadata(&ticket_file).unwrap().modified().unwrap();
    up.child.kill().unwrap();
    up.child.wait().unwrap();
    wait_for("nodes to exit after aspen up died", || {
        pids.iter().all(|p| process_gone(*p)).then_some(())
    });
    drop(up);

    // Run again on the same data: the same cluster, with its data.
    let _up = UpProc::start(&dir, &[]);
    let fresh = || {
        let m = std::fs::metadata(&ticket_file).ok()?.modified().ok()?;
        (m != before)
            .then(|| std::fs::read_to_string(&ticket_file).ok())
            .flatten()
    };
    let start = std::time::Instant::now();
    let ticket = loop {
        if let Some(t) = fresh() {
            break t;
        }
        if start.elapsed() > DEADLINE {
            // Say why: what `aspen up` printed, and the nodes' logs.
            let mut why = std::fs::read_to_string(dir.with_extension("up.log")).unwrap_or_default();
            for i in 1..=3 {
                let log = std::fs::read_to_string(dir.join(format!("node-{i}/node.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                why.push_str(&format!("\n--- node-{i}:\n"));
                for line in tail.iter().rev() {
                    why.push_str(line);
                    why.push('\n');
                }
            }
            panic!("timed out waiting for a fresh cluster.ticket; aspen up said: {why}");
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    };
    let get = cli(
        &["kv", "get", "hello", "--identity", admin],
        Some(ticket.trim()),
    );
    assert_eq!(stdout(&get).trim(), "world", "{}", stderr(&get));
}

/// The log is purged behind frequent snapshots while the state machine commits without fsync:
/// a crash must never leave the state machine behind a purged log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_after_log_purges_keeps_every_acknowledged_write() {
    let root = tempfile::tempdir().unwrap();
    let args = ["--snapshot-every", "10", "--keep-log-after-snapshot", "0"];
    let mut nodes = form(root.path(), 1, &args).await;
    let client = client_for(&[&nodes[0]]).await;
    let writers = Writers::start(vec![client.clone(); 8], "p/");
    writers.wait_for_more(400).await;
    let status = client.status().await.unwrap();
    assert!(
        status.snapshot_index.unwrap_or(0) > 0,
        "snapshots were taken: {status:?}"
    );
    nodes[0].kill9();
    nodes[0].restart(None);
    writers.wait_for_more(100).await;
    let acked = writers.stop().await;
    assert_all_present(&nodes[0], "p/", &acked).await;
    client.close().await;
}

/// A client given one member learns the others, and keeps working when that one dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_learns_the_membership_from_one_member() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = form(root.path(), 3, &[]).await;
    let options = aspen_client::ClientOptions {
        attempt_timeout: std::time::Duration::from_secs(2),
        deadline: std::time::Duration::from_secs(60),
        ..options()
    };
    let only = ClusterTicket {
        members: vec![nodes[0].ticket.clone()],
    };
    let client = Client::connect_with(only, options).await.unwrap();
    assert_eq!(client.members().len(), 1);
    client.refresh_members().await.unwrap();
    assert_eq!(client.members().len(), 3);
    client.put(b"k".to_vec(), b"1".to_vec()).await.unwrap();
    nodes[0].kill9();
    // Served by the remaining two (one of them becomes leader if node 0 led).
    client.put(b"k".to_vec(), b"2".to_vec()).await.unwrap();
    assert_eq!(
        client.get(b"k".to_vec()).await.unwrap().unwrap().value,
        b"2"
    );
    client.close().await;
}

/// The CLI rides out a member that never answers (stopped with SIGSTOP, listed first in the
/// ticket) and a leader killed with kill -9 (how long it takes is measured by
/// scripts/failover.sh, see BENCHMARKS.md; tests never assert timings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_rides_out_a_stopped_member_and_a_killed_leader() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = form(root.path(), 3, &[]).await;
    let ticket = ClusterTicket {
        members: nodes.iter().map(|n| n.ticket.clone()).collect(),
    }
    .to_string();
    let put = cli(&["kv", "put", "a", "1"], Some(&ticket));
    assert!(put.status.success(), "{}", stderr(&put));
    nodes[0].pause();
    for i in 0..3 {
        let put = cli(&["kv", "put", "a", &i.to_string()], Some(&ticket));
        assert!(put.status.success(), "{}", stderr(&put));
    }
    let get = cli(&["kv", "get", "a"], Some(&ticket));
    assert_eq!(stdout(&get).trim(), "2", "{}", stderr(&get));
    nodes[0].resume();
    let client = client_for(&nodes.iter().collect::<Vec<_>>()).await;
    let leader = wait_until("a leader", || async { client.status().await.ok()?.leader }).await;
    client.close().await;
    let victim = nodes.iter().position(|n| n.node_id() == leader).unwrap();
    nodes[victim].kill9();
    let put = cli(&["kv", "put", "b", "after"], Some(&ticket));
    assert!(put.status.success(), "{}", stderr(&put));
    let get = cli(&["kv", "get", "b"], Some(&ticket));
    assert_eq!(stdout(&get).trim(), "after", "{}", stderr(&get));
}
