//! Cluster identity and discovery end to end: real `aspen` processes publishing to a local
//! Mainline testnet (8 DHT nodes on 127.0.0.1; nothing reaches the internet), and the CLI
//! finding clusters by their public key alone.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;

use crate::common::*;
use serde_json::Value;

fn json(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "command failed: {}{}",
        stdout(o),
        stderr(o)
    );
    serde_json::from_str(stdout(o).trim()).expect("json output")
}

/// The JSON output of a command that may not succeed yet.
fn try_json(o: &Output) -> Option<Value> {
    o.status.success().then(|| json(o))
}

/// `aspen discover KEY -o json` against the testnet with `cache` as record cache.
fn discover(key: &str, bootstrap: &str, cache: &Path) -> Output {
    cli(
        &[
            "discover",
            key,
            "-o",
            "json",
            "--dht-bootstrap",
            bootstrap,
            "--dht-timeout-ms",
            "300",
            "--record-cache",
            cache.to_str().unwrap(),
        ],
        None,
    )
}

/// Runs a client command against the cluster named by `key` only.
fn by_key(args: &[&str], key: &str, bootstrap: &str, cache: &Path) -> Output {
    let mut all: Vec<&str> = args.to_vec();
    all.extend([
        "--cluster",
        key,
        "--dht-bootstrap",
        bootstrap,
        "--dht-timeout-ms",
        "300",
        "--record-cache",
        cache.to_str().unwrap(),
    ]);
    cli(&all, None)
}

fn endpoints(v: &Value) -> BTreeSet<String> {
    v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["endpoint_id"].as_str().unwrap().to_string())
        .collect()
}

fn endpoints_of(nodes: &[NodeProc]) -> BTreeSet<String> {
    nodes
        .iter()
        .map(|n| hex::encode(n.ticket.endpoint_id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_are_found_by_key_followed_when_they_move_and_cached_for_offline() {
    let (testnet, bootstrap) = testnet();
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let node_args = ["--dht-bootstrap", &bootstrap, "--dht-timeout-ms", "300"];
    let mut a = form(&root.path().join("a"), 3, &node_args).await;
    let b = form(&root.path().join("b"), 1, &node_args).await;
    let mut outputs = Vec::new();

    // Each cluster has a key; `-o json` gives the exact BEP-44 coordinates.
    let ident_a = json(&cli(
        &["cluster", "identity", "-o", "json"],
        Some(&ticket_text(&a)),
    ));
    let ident_b = json(&cli(
        &["cluster", "identity", "-o", "json"],
        Some(&ticket_text(&b)),
    ));
    outputs.push(ident_a.to_string());
    let key_a = ident_a["cluster_key"].as_str().unwrap().to_string();
    let key_b = ident_b["cluster_key"].as_str().unwrap().to_string();
    assert_ne!(key_a, key_b);
    assert_eq!(ident_a["bep44"]["public_key"], key_a.as_str());
    assert_eq!(ident_a["bep44"]["salt"], "aspen/cluster-record/v1");
    assert_eq!(ident_a["bep44"]["target"].as_str().unwrap().len(), 40);

    // A client knowing only the key finds each cluster, with exactly its members.
    let found_a = wait_until("cluster A's record with 3 members", || async {
        let v = try_json(&discover(&key_a, &bootstrap, &cache))?;
        (endpoints(&v) == endpoints_of(&a)).then_some(v)
    })
    .await;
    assert_eq!(found_a["source"], "dht");
    let found_b = wait_until("cluster B's record", || async {
        try_json(&discover(&key_b, &bootstrap, &cache))
    })
    .await;
    assert_eq!(endpoints(&found_b), endpoints_of(&b));
    outputs.push(found_a.to_string());

    // The published seq is replicated: `cluster identity` reports it.
    let seq_a = found_a["seq"].as_i64().unwrap();
    wait_until("identity to report the published seq", || async {
        let v = json(&cli(
            &["cluster", "identity", "-o", "json"],
            Some(&ticket_text(&a)),
        ));
        (v["bep44"]["seq"].as_i64() >= Some(seq_a)).then_some(())
    })
    .await;

    // kv commands by key; the two clusters are distinct.
    let put = by_key(
        &["kv", "put", "greeting", "hello"],
        &key_a,
        &bootstrap,
        &cache,
    );
    assert!(put.status.success(), "{}", stderr(&put));
    let get = by_key(&["kv", "get", "greeting"], &key_a, &bootstrap, &cache);
    assert!(get.status.success(), "{}", stderr(&get));
    assert_eq!(stdout(&get).trim(), "hello");
    let get_b = by_key(&["kv", "get", "greeting"], &key_b, &bootstrap, &cache);
    assert!(!get_b.status.success());
    assert!(stderr(&get_b).contains("not found"), "{}", stderr(&get_b));
    outputs.extend([&put, &get, &get_b].map(|o| stdout(o) + &stderr(o)));

    // The attacker this protects against: knows only the key, resolves the members from the
    // DHT, connects with a fresh identity, and can neither read, write, change the
    // membership, nor fetch a blob.
    let blob_file = root.path().join("blob.bin");
    std::fs::write(&blob_file, b"private bytes").unwrap();
    let added = by_key(
        &[
            "blob",
            "add",
            blob_file.to_str().unwrap(),
            "--tag",
            "private",
            "-o",
            "json",
        ],
        &key_a,
        &bootstrap,
        &cache,
    );
    let hash = json(&added)["hash"].as_str().unwrap().to_string();
    let stranger = root.path().join("stranger.key");
    let stranger = stranger.to_str().unwrap();
    let out_file = root.path().join("stolen.bin");
    let victim = a[1].ticket.to_string();
    let member_id = format!("{:016x}", a[1].node_id());
    let made_up = root.path().join("made-up.secret");
    aspen_node::keyfile::write_private(
        &made_up,
        &format!("aspen-bootstrap-secret-v1\n{}\n", "ab".repeat(32)),
    )
    .unwrap();
    for args in [
        vec!["kv", "get", "greeting"],
        vec!["kv", "put", "greeting", "owned"],
        vec![
            "cluster",
            "add",
            &victim,
            "--bootstrap-secret",
            made_up.to_str().unwrap(),
        ],
        vec!["cluster", "remove", &member_id],
        vec!["blob", "get", &hash, "-o", out_file.to_str().unwrap()],
    ] {
        let mut args = args.clone();
        args.extend(["--identity", stranger]);
        let out = by_key(&args, &key_a, &bootstrap, &cache);
        assert!(!out.status.success(), "{args:?} succeeded for a stranger");
        assert!(
            stderr(&out).contains("permission denied"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert!(!out_file.exists());
    let get = by_key(&["kv", "get", "greeting"], &key_a, &bootstrap, &cache);
    assert_eq!(stdout(&get).trim(), "hello");

    // Every member of A moves to a new port. The leader republishes; the client follows.
    let client = client_for(&a.iter().collect::<Vec<_>>()).await;
    for node in a.iter_mut() {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let bind = format!("127.0.0.1:{port}");
        let mut args: Vec<&str> = node_args.to_vec();
        args.extend(["--bind", &bind]);
        node.restart(Some(&args));
        let id = node.node_id();
        wait_until("membership to record the new address", || async {
            let s = client.status().await.ok()?;
            let m = s.members.iter().find(|m| m.node_id == id)?;
            (m.node.addrs == vec![bind.parse().unwrap()]).then_some(())
        })
        .await;
    }
    client.close().await;
    let new_addrs: BTreeSet<String> = a.iter().map(|n| n.ticket.addrs[0].to_string()).collect();
    let moved = wait_until("the record to list the new addresses", || async {
        let v = try_json(&discover(&key_a, &bootstrap, &cache))?;
        let addrs: BTreeSet<String> = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["addrs"][0].as_str().unwrap().to_string())
            .collect();
        (addrs == new_addrs).then_some(v)
    })
    .await;
    assert!(moved["seq"].as_i64().unwrap() > seq_a, "seq must increase");
    let get = by_key(&["kv", "get", "greeting"], &key_a, &bootstrap, &cache);
    assert!(get.status.success(), "{}", stderr(&get));
    assert_eq!(stdout(&get).trim(), "hello");

    // A validly signed record of another key that lists A's nodes does not fool the client:
    // the nodes it reaches prove (by certificate) they serve cluster A.
    let impostor = aspen_trust::ClusterSecretKey::generate();
    let dht = aspen_discovery::ClusterDht::start(&aspen_discovery::DhtConfig {
        bootstrap: Some(testnet.bootstrap.clone()),
        request_timeout: std::time::Duration::from_millis(300),
    })
    .unwrap();
    let record = aspen_trust::ClusterRecord {
        name: "impostor".into(),
        relay_url: None,
        members: a
            .iter()
            .map(|n| aspen_trust::RecordMember {
                node: n.ticket.endpoint_id,
                addrs: n.ticket.addrs.clone(),
            })
            .collect(),
        issued_at: aspen_node::server::identity::unix_now(),
        expires_at: aspen_node::server::identity::unix_now() + 3600,
    };
    dht.publish(&impostor, &record, 1).await.unwrap();
    drop(dht);
    let fooled = by_key(
        &["kv", "get", "greeting"],
        &impostor.public().to_string(),
        &bootstrap,
        &cache,
    );
    assert!(!fooled.status.success());
    assert!(
        stderr(&fooled).contains(&format!("serves cluster {key_a}")),
        "{}",
        stderr(&fooled)
    );

    // The DHT goes away: the cached record still works, and says so.
    drop(testnet);
    let offline = discover(&key_a, &bootstrap, &cache);
    let v = json(&offline);
    assert_eq!(v["source"], "cache");
    assert_eq!(endpoints(&v), endpoints_of(&a));
    let get = by_key(&["kv", "get", "greeting"], &key_a, &bootstrap, &cache);
    assert!(get.status.success(), "{}", stderr(&get));
    assert_eq!(stdout(&get).trim(), "hello");
    // Without a cached record, a clear error (not a hang).
    let empty_cache = root.path().join("empty-cache");
    let lost = discover(&key_a, &bootstrap, &empty_cache);
    assert!(!lost.status.success());
    assert!(stderr(&lost).contains(&key_a), "{}", stderr(&lost));
    outputs.extend([&offline, &get, &lost].map(|o| stdout(o) + &stderr(o)));

    // The cluster secret never appears in logs or CLI output, and clients cannot read it.
    let scan = cli(
        &["kv", "scan", "--hex", "-o", "json"],
        Some(&ticket_text(&a)),
    );
    outputs.push(stdout(&scan) + &stderr(&scan));
    // Read the secret as a member holds it: an in-process node joins cluster A.
    let config = aspen_node::config::NodeConfig {
        data_dir: root.path().join("inspector"),
        dht: aspen_node::config::DhtSettings {
            enabled: false,
            ..Default::default()
        },
        ..Default::default()
    };
    let inspector = aspen_node::server::RunningNode::start(&config)
        .await
        .unwrap();
    let client = client_for(&a.iter().collect::<Vec<_>>()).await;
    let added = client
        .add_member(
            inspector.node_ticket(),
            bootstrap_secret(&root.path().join("inspector")),
        )
        .await;
    if let Err(e) = added {
        dump_logs(&format!("adding a member to the moved cluster: {e}"), &a);
        panic!("adding a member to the moved cluster: {e}");
    }
    client.close().await;
    let secret = wait_until("the cluster secret to reach the new member", || async {
        inspector
            .state
            .cluster
            .sm
            .system_get(aspen_node::server::identity::SECRET_KEY.to_vec())
            .await
            .unwrap()
    })
    .await;
    inspector.shutdown().await;
    let logs: Vec<String> = a.iter().chain(&b).map(NodeProc::log).collect();
    let secret_hex = hex::encode(&secret);
    let key = aspen_trust::ClusterSecretKey::from_bytes(secret.as_slice().try_into().unwrap());
    assert_eq!(key.public().to_string(), key_a, "that is the cluster's key");
    for text in outputs.iter().chain(&logs) {
        assert!(!text.contains(&secret_hex), "secret leaked in: {text}");
    }
}

/// Without any membership change, the leader re-signs the record before it expires (new seq,
/// later expiry), so resolvers never see it lapse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_renewed_before_they_expire() {
    let (_testnet, bootstrap) = testnet();
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let args = [
        "--dht-bootstrap",
        &bootstrap,
        "--dht-timeout-ms",
        "300",
        "--dht-republish-secs",
        "1",
        "--record-validity-secs",
        "4",
    ];
    let a = form(&root.path().join("a"), 1, &args).await;
    let key = json(&cli(
        &["cluster", "identity", "-o", "json"],
        Some(&ticket_text(&a)),
    ))["cluster_key"]
        .as_str()
        .unwrap()
        .to_string();
    let first = wait_until("the first record", || async {
        try_json(&discover(&key, &bootstrap, &cache))
    })
    .await;
    let renewed = wait_until("a renewed record", || async {
        let v = try_json(&discover(&key, &bootstrap, &cache))?;
        (v["seq"].as_i64() > first["seq"].as_i64()).then_some(v)
    })
    .await;
    assert!(renewed["expires_at"].as_u64() > first["expires_at"].as_u64());
    assert_eq!(endpoints(&renewed), endpoints_of(&a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_by_key_only_with_a_valid_invitation() {
    let (_testnet, bootstrap) = testnet();
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let node_args = ["--dht-bootstrap", &bootstrap, "--dht-timeout-ms", "300"];
    let a = form(&root.path().join("a"), 1, &node_args).await;
    let ticket = ticket_text(&a);
    let key = json(&cli(&["cluster", "identity", "-o", "json"], Some(&ticket)))["cluster_key"]
        .as_str()
        .unwrap()
        .to_string();
    wait_until("the cluster's record", || async {
        discover(&key, &bootstrap, &cache)
            .status
            .success()
            .then_some(())
    })
    .await;

    let invite = |valid_for: &str| {
        let v = json(&cli(
            &["cluster", "invite", "--valid-for", valid_for, "-o", "json"],
            Some(&ticket),
        ));
        assert_eq!(v["cluster_key"], key.as_str());
        (
            v["token"].as_str().unwrap().to_string(),
            v["expires_at"].as_u64().unwrap(),
        )
    };
    // The token is read from a file (never a command-line value).
    let join_args = |name: &str, token: &str| -> Vec<String> {
        let file = root.path().join(format!("{name}.invite"));
        std::fs::write(&file, format!("{token}\n")).unwrap();
        node_args
            .iter()
            .map(|s| s.to_string())
            .chain([
                "--join".into(),
                key.clone(),
                "--invite-file".into(),
                file.to_str().unwrap().into(),
            ])
            .collect()
    };
    let start = |name: &str, token: &str| {
        let args = join_args(name, token);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        NodeProc::start(&root.path().join(name), &args)
    };

    // A node with a valid invitation joins, knowing only the key.
    let (token, _) = invite("600");
    let d = start("d", &token);
    let client = client_for(&[&a[0]]).await;
    wait_until("the invited node to be a voter", || async {
        let s = client.status().await.ok()?;
        s.members
            .iter()
            .any(|m| m.node_id == d.node_id() && m.voter)
            .then_some(())
    })
    .await;

    // Refused, and the refused node stops with a clear reason: a made-up token, a used one,
    // an expired one.
    let (short, expires_at) = invite("1");
    for (name, token, why) in [
        ("e", "00".repeat(32), "unknown invitation"),
        ("f", token.clone(), "already used"),
        ("g", short, "expired"),
    ] {
        if name == "g" {
            wait_for("the short invitation to expire", || {
                (aspen_node::server::identity::unix_now() > expires_at).then_some(())
            });
        }
        let mut n = start(name, &token);
        let status = wait_for("the refused node to exit", || n.try_exit());
        assert!(!status.success());
        let log = n.log();
        assert!(
            log.contains("refused") && log.contains(why),
            "{name}: {log}"
        );
        let s = client.status().await.unwrap();
        assert!(s.members.iter().all(|m| m.node_id != n.node_id()));
    }
    assert_eq!(client.status().await.unwrap().members.len(), 2);
    client.close().await;
}
