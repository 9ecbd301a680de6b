//! Federation: exports are replicated policy that only admins change (the CLI, the SDK from
//! another member, and a stranger).

use aspen_client::protocol::{Resource, ResourceKind, RpcError};
use aspen_client::{Client, ClientError, ClientOptions, Consistency};
use aspen_trust::{ClusterSecretKey, NodeKey};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_are_replicated_policy_that_only_admins_change() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 3, &[]).await;
    let cluster = aspen_client::ClusterTicket {
        members: vec![nodes[0].ticket.clone()],
    }
    .to_string();
    let b = ClusterSecretKey::generate().public().to_string();
    let c = ClusterSecretKey::generate().public().to_string();
    let ns = "ab".repeat(32);
    let run = |args: &[&str]| cli(args, Some(&cluster));

    // Nothing is exported by default.
    let none = run(&["fed", "exports"]);
    assert!(none.status.success(), "{}", stderr(&none));
    assert!(
        stdout(&none).contains("nothing is exported"),
        "{}",
        stdout(&none)
    );

    for args in [
        vec!["fed", "export", "doc", "plans", "--to", &b],
        vec!["fed", "export", "blob", "site/", "--public"],
        vec!["fed", "export", "ns", &ns, "--to", &c, "--to", &b],
        // Adding to an existing export.
        vec!["fed", "export", "doc", "plans", "--to", &c],
    ] {
        let out = run(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let listed = run(&["fed", "exports", "-o", "json"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    let json: serde_json::Value = serde_json::from_str(&stdout(&listed)).unwrap();
    let exports = json["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 3, "{json}");
    let find = |kind: &str, name: &str| {
        exports
            .iter()
            .find(|e| e["kind"] == kind && e["name"] == name)
            .unwrap_or_else(|| panic!("{kind} {name} missing from {json}"))
            .clone()
    };
    let mut both = vec![b.clone(), c.clone()];
    both.sort();
    let plans = find("doc", "plans");
    assert_eq!(plans["public"], false);
    assert_eq!(plans["to"], serde_json::json!(both));
    assert_eq!(find("blob", "site/")["public"], true);
    assert_eq!(find("ns", &ns)["to"], serde_json::json!(both));

    // Every member enforces the same policy: another member lists the same exports.
    let other = Client::connect_node(nodes[2].ticket.clone(), options())
        .await
        .unwrap();
    let seen = other.fed_exports().await.unwrap();
    assert_eq!(seen.len(), 3);
    // Narrowing, then removing.
    other
        .fed_unexport(
            Resource::doc("plans"),
            vec![b.parse::<aspen_trust::ClusterKey>().unwrap().to_bytes()],
            false,
            false,
        )
        .await
        .unwrap();
    let plans = other
        .fed_exports()
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.resource == Resource::doc("plans"))
        .unwrap();
    assert_eq!(
        plans.to.iter().map(hex::encode).collect::<Vec<_>>(),
        vec![c.clone()]
    );
    let gone = run(&["fed", "unexport", "doc", "plans"]);
    assert!(gone.status.success(), "{}", stderr(&gone));
    let again = run(&["fed", "unexport", "doc", "plans"]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("is not exported"),
        "{}",
        stderr(&again)
    );
    assert_eq!(other.fed_exports().await.unwrap().len(), 2);

    // Clear errors for bad input, before or at the node.
    let whom = run(&["fed", "export", "doc", "plans"]);
    assert!(!whom.status.success());
    assert!(stderr(&whom).contains("to whom"), "{}", stderr(&whom));
    let bad_key = run(&["fed", "export", "doc", "plans", "--to", "nothex"]);
    assert!(!bad_key.status.success());
    assert!(
        stderr(&bad_key).contains("not a cluster key"),
        "{}",
        stderr(&bad_key)
    );
    let bad_ns = run(&["fed", "export", "ns", "zz", "--public"]);
    assert!(!bad_ns.status.success());
    assert!(
        stderr(&bad_ns).contains("is not a valid ns name"),
        "{}",
        stderr(&bad_ns)
    );
    let bad_kind = run(&["fed", "export", "table", "x", "--public"]);
    assert!(!bad_kind.status.success());

    // A key without a grant can neither read nor change the exports, nor follow.
    let stranger = Client::connect_with(
        aspen_client::ClusterTicket {
            members: vec![nodes[0].ticket.clone()],
        },
        ClientOptions {
            identity: Some(iroh::SecretKey::from_bytes(
                &NodeKey::generate().secret_bytes(),
            )),
            ..options()
        },
    )
    .await
    .unwrap();
    for result in [
        stranger.fed_exports().await.map(|_| ()),
        stranger
            .fed_export(Resource::doc("plans"), vec![], true)
            .await,
        stranger
            .fed_unexport(
                Resource {
                    kind: ResourceKind::Blob,
                    name: "site/".into(),
                },
                vec![],
                false,
                true,
            )
            .await,
        stranger
            .fed_follow([3; 32], Resource::doc("plans"), None, vec![])
            .await,
        stranger.fed_unfollow([3; 32], Resource::doc("plans")).await,
        stranger.fed_follows().await.map(|_| ()),
        stranger.fed_sync(None, None).await.map(|_| ()),
        // Mirrors: neither the policy nor the mirror list of a follow.
        stranger
            .fed_mirror([3; 32], Resource::doc("plans"), vec![], true)
            .await,
        stranger
            .fed_unmirror([3; 32], Resource::doc("plans"), vec![], false, true)
            .await,
        stranger.fed_mirrors().await.map(|_| ()),
        stranger
            .fed_via([3; 32], Resource::doc("plans"), vec![])
            .await,
        stranger
            .fed_follow_via([3; 32], Resource::doc("plans"), None, vec![], vec![])
            .await,
    ] {
        match result {
            Err(ClientError::Rpc(RpcError::PermissionDenied { needed, .. })) => {
                assert_eq!(needed, "cluster:admin:*")
            }
            other => panic!("expected permission denied, got {other:?}"),
        }
    }
    assert_eq!(other.fed_exports().await.unwrap().len(), 2);
    stranger.close().await;
    other.close().await;
}

/// Federation arguments for a node: the local DHT, and a short pull interval.
pub(crate) fn fed_args(bootstrap: &str) -> Vec<String> {
    fed_args_every(bootstrap, 300)
}

/// Federation arguments with a pull interval of `ms` milliseconds.
pub(crate) fn fed_args_every(bootstrap: &str, ms: u64) -> Vec<String> {
    [
        "--dht-bootstrap",
        bootstrap,
        "--dht-timeout-ms",
        "300",
        "--fed-pull-interval-ms",
        &ms.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub(crate) fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

pub(crate) async fn cluster_key(client: &Client) -> [u8; 32] {
    client.identity().await.unwrap().1.cluster_key
}

pub(crate) fn sorted_heads(doc: &automerge::Automerge) -> Vec<automerge::ChangeHash> {
    let mut heads = doc.get_heads();
    heads.sort();
    heads
}

/// Puts `count` keys `{prefix}{i}` into document `name` through `client`.
pub(crate) async fn edit(client: &Client, name: &str, prefix: &str, count: usize) {
    for i in 0..count {
        let key = format!("{prefix}{i}");
        client
            .doc_change(name, None, move |tx| {
                use automerge::transaction::Transactable;
                tx.put(automerge::ROOT, key, i as i64).map(|_| ())
            })
            .await
            .unwrap();
    }
}

/// Waits until `node` alone (serializable) holds document `name` with exactly `heads`.
pub(crate) async fn wait_for_heads(
    node: &NodeProc,
    others: &[NodeProc],
    name: &str,
    heads: &[automerge::ChangeHash],
) {
    let client = client_of(node).await;
    wait_until_or_dump(
        &format!(
            "{name} on {:016x} to reach the origin's heads",
            node.node_id()
        ),
        others,
        || async {
            let doc = client.doc_get(name, Consistency::Serializable).await.ok()?;
            (sorted_heads(&doc) == heads).then_some(())
        },
    )
    .await;
    client.close().await;
}

/// `aspen fed status -o json` of a cluster: its follows.
/// Follows `resource` of `origin` from a cluster it is not exported to; waits for the
/// typed refusal.
async fn refused_follow(
    client: &Client,
    origin: [u8; 32],
    resource: Resource,
    hints: Vec<aspen_client::NodeTicket>,
) {
    client
        .fed_follow(origin, resource, None, hints)
        .await
        .unwrap();
    client.fed_sync(None, None).await.unwrap();
    // Earlier pulls may fail for other reasons first (the origin's record not yet found on
    // a loaded machine's DHT); the follow pulls again every interval until it is refused.
    wait_until("the pull to be refused", || async {
        let error = client
            .fed_follows()
            .await
            .ok()?
            .first()?
            .last_error
            .clone()?;
        error.contains("is not exported to cluster").then_some(())
    })
    .await;
}

/// Stops `node` and returns its node key (to call as that node).
fn stopped_node_key(node: &mut NodeProc) -> aspen_trust::NodeKey {
    node.kill9();
    aspen_node::keyfile::load_key(&node.dir.join(aspen_node::keyfile::NODE_KEY_FILE)).unwrap()
}

pub(crate) fn follows_of(ticket: &str) -> Vec<serde_json::Value> {
    let out = cli(&["fed", "status", "-o", "json"], Some(ticket));
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    json["follows"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_follows_a_document_by_key_alone_and_catches_up_after_an_outage() {
    let (_testnet, bootstrap) = testnet();
    let root = tempfile::tempdir().unwrap();
    let args = fed_args(&bootstrap);
    let mut a = form(&root.path().join("a"), 3, &refs(&args)).await;
    let mut b_args = args.clone();
    b_args.extend(["--metrics".to_string(), "127.0.0.1:0".to_string()]);
    let b = form(&root.path().join("b"), 3, &refs(&b_args)).await;
    let a_client = client_for(&a.iter().collect::<Vec<_>>()).await;
    let b_client = client_for(&b.iter().collect::<Vec<_>>()).await;
    let a_key = cluster_key(&a_client).await;
    let b_key = cluster_key(&b_client).await;
    let b_ticket = ticket_text(&b);
    let mut b_metrics = Vec::new();
    for node in &b {
        let c = client_of(node).await;
        b_metrics.push(crate::metrics::metrics_addr(&c).await);
        c.close().await;
    }
    // The follow's series, on B's leader (the only node that pulls).
    let follow_series = |name: &str| {
        format!(
            "aspen_fed_follow_{name}{{origin=\"{}\",kind=\"doc\",name=\"plans\"}}",
            hex::encode(a_key)
        )
    };
    let on_leader = |series: String| {
        let addrs = b_metrics.clone();
        async move {
            addrs.iter().find_map(|addr| {
                let s = crate::metrics::scrape(*addr, None);
                s.get(&series).copied()
            })
        }
    };

    a_client.doc_create("plans").await.unwrap();
    a_client
        .fed_export(Resource::doc("plans"), vec![b_key], false)
        .await
        .unwrap();
    // B knows only A's key: A's nodes are found through A's record on the DHT.
    let out = cli(
        &["fed", "follow", &hex::encode(a_key), "doc", "plans"],
        Some(&b_ticket),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    edit(&a_client, "plans", "k", 100).await;
    let heads = sorted_heads(
        &a_client
            .doc_get("plans", Consistency::Linearizable)
            .await
            .unwrap(),
    );
    let local = format!("fed/{}/plans", &hex::encode(a_key)[..16]);
    for node in &b {
        wait_for_heads(node, &b, &local, &heads).await;
    }
    let follows = follows_of(&b_ticket);
    assert_eq!(follows.len(), 1, "{follows:?}");
    assert!(follows[0]["seq"].as_u64().unwrap() >= 1, "{follows:?}");
    assert_eq!(follows[0]["into"], local.as_str());
    let since = wait_until("the follow's lag to show in B's metrics", || {
        on_leader(follow_series("since_success_seconds"))
    })
    .await;
    assert!(since >= 0.0, "{since}");

    // A goes away entirely; B keeps serving its verified copy and reports the failures.
    a_client.close().await;
    for node in &mut a {
        node.kill9();
    }
    wait_until_or_dump("B to notice that A is unreachable", &b, || async {
        let follows = follows_of(&b_ticket);
        follows[0]["last_error"].as_str().map(|_| ())
    })
    .await;
    wait_until("the follow's failures to show in B's metrics", || async {
        on_leader(follow_series("failures"))
            .await
            .filter(|f| *f >= 1.0)
    })
    .await;
    for node in &b {
        let c = client_of(node).await;
        let doc = c.doc_get(&local, Consistency::Serializable).await.unwrap();
        assert_eq!(sorted_heads(&doc), heads);
        c.close().await;
    }

    // A returns (same addresses) with more edits; B catches up.
    for node in &mut a {
        node.restart(None);
    }
    let a_client = client_for(&a.iter().collect::<Vec<_>>()).await;
    edit(&a_client, "plans", "more", 10).await;
    let heads = sorted_heads(
        &a_client
            .doc_get("plans", Consistency::Linearizable)
            .await
            .unwrap(),
    );
    for node in &b {
        wait_for_heads(node, &b, &local, &heads).await;
    }
    let follows = follows_of(&b_ticket);
    assert!(follows[0]["last_error"].is_null(), "{follows:?}");
    a_client.close().await;
    b_client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_that_follow_each_other_converge_after_editing_apart() {
    let (_testnet, bootstrap) = testnet();
    let root = tempfile::tempdir().unwrap();
    let args = fed_args(&bootstrap);
    let mut a = form(&root.path().join("a"), 1, &refs(&args)).await;
    let mut b = form(&root.path().join("b"), 1, &refs(&args)).await;
    let (a_ticket, b_ticket) = (ticket_text(&a), ticket_text(&b));
    let a_client = client_of(&a[0]).await;
    let b_client = client_of(&b[0]).await;
    let (a_key, b_key) = (cluster_key(&a_client).await, cluster_key(&b_client).await);
    for (client, peer) in [(&a_client, b_key), (&b_client, a_key)] {
        client.doc_create("list").await.unwrap();
        client
            .fed_export(Resource::doc("list"), vec![peer], false)
            .await
            .unwrap();
    }
    edit(&a_client, "list", "a", 3).await;
    edit(&b_client, "list", "b", 3).await;
    // Each follows the other's document into its own, this time by ticket.
    for (ticket, origin) in [(&a_ticket, &b_ticket), (&b_ticket, &a_ticket)] {
        let out = cli(
            &["fed", "follow", origin, "doc", "list", "--into", "list"],
            Some(ticket),
        );
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let converged = |a_client: Client, b_client: Client| async move {
        wait_until("both sites to show identical heads", || async {
            let x = a_client
                .doc_get("list", Consistency::Linearizable)
                .await
                .ok()?;
            let y = b_client
                .doc_get("list", Consistency::Linearizable)
                .await
                .ok()?;
            (sorted_heads(&x) == sorted_heads(&y))
                .then(|| (aspen_crdt::view::to_json(&x), aspen_crdt::view::to_json(&y)))
        })
        .await
    };
    let (x, y) = converged(a_client.clone(), b_client.clone()).await;
    assert_eq!(x, y);
    assert_eq!(x.as_object().unwrap().len(), 6, "{x}");

    // Partitioned: each site edits while the other is down.
    a_client.close().await;
    b_client.close().await;
    a[0].kill9();
    let b_client = client_of(&b[0]).await;
    edit(&b_client, "list", "b-alone", 2).await;
    b_client.close().await;
    b[0].kill9();
    a[0].restart(None);
    let a_client = client_of(&a[0]).await;
    edit(&a_client, "list", "a-alone", 2).await;
    b[0].restart(None);
    let b_client = client_of(&b[0]).await;
    let (x, y) = converged(a_client.clone(), b_client.clone()).await;
    assert_eq!(x, y);
    assert_eq!(x.as_object().unwrap().len(), 10, "{x}");
    a_client.close().await;
    b_client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_and_lying_origins_get_nothing_committed() {
    let (_testnet, bootstrap) = testnet();
    let root = tempfile::tempdir().unwrap();
    let args = fed_args(&bootstrap);
    let mut a = form(&root.path().join("a"), 1, &refs(&args)).await;
    let b = form(&root.path().join("b"), 1, &refs(&args)).await;
    let mut c = form(&root.path().join("c"), 1, &refs(&args)).await;
    let a_client = client_of(&a[0]).await;
    let b_client = client_of(&b[0]).await;
    let c_client = client_of(&c[0]).await;
    let (a_key, b_key) = (cluster_key(&a_client).await, cluster_key(&b_client).await);
    a_client.doc_create("plans").await.unwrap();
    edit(&a_client, "plans", "k", 5).await;
    a_client
        .fed_export(Resource::doc("plans"), vec![b_key], false)
        .await
        .unwrap();

    // C is not allowed: a typed refusal, no document.
    refused_follow(&c_client, a_key, Resource::doc("plans"), vec![]).await;
    assert!(c_client
        .doc_get("plans", Consistency::Linearizable)
        .await
        .is_err());
    // C's node proved its cluster to A in that hello, which admits it to A's iroh-blobs, but
    // only for blobs exported to C: a blob exported to B is refused to it.
    let file = root.path().join("for-b");
    std::fs::write(&file, vec![3u8; 200_000]).unwrap();
    let for_b = a_client
        .blob_add_file(&file, Some("site/for-b"), |_| {})
        .await
        .unwrap()
        .hash;
    a_client
        .fed_export(Resource::blob("site/"), vec![b_key], false)
        .await
        .unwrap();
    c_client.close().await;
    let c_node = stopped_node_key(&mut c[0]);
    let ep = aspen_client::endpoint::offline_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        Some(iroh::SecretKey::from_bytes(&c_node.secret_bytes())),
        vec![],
    )
    .await
    .unwrap();
    let store = iroh_blobs::store::mem::MemStore::new();
    let fetched = async {
        let conn = ep
            .connect(a[0].addr(), iroh_blobs::ALPN)
            .await
            .map_err(|e| e.to_string())?;
        store
            .remote()
            .fetch(conn, iroh_blobs::Hash::from_bytes(for_b))
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    assert!(
        fetched.is_err(),
        "a node of cluster C fetched a blob exported to B"
    );
    ep.close().await;

    // A node key with no cluster behind it is refused at the hello.
    let stranger = raw_exchange_as(
        &a[0],
        aspen_federation::FEDERATION_ALPN,
        &[0, 0, 0, 2, 1, 7],
        None,
    )
    .await;
    let reply: aspen_federation::HelloReply =
        aspen_client::wire::decode_body(&stranger[4..]).unwrap();
    assert!(
        matches!(
            reply,
            aspen_federation::HelloReply::Refused(aspen_federation::FedError::Unproven(_))
        ),
        "{reply:?}"
    );

    // A flood of connections that never say hello: at most MAX_PENDING_HELLOS wait (each
    // for at most HELLO_TIMEOUT); the rest are closed at once, and the node keeps serving.
    let mut flood = Vec::new();
    let mut flooders = Vec::new();
    for _ in 0..10 {
        let ep =
            aspen_client::endpoint::offline_endpoint("127.0.0.1:0".parse().unwrap(), None, vec![])
                .await
                .unwrap();
        for _ in 0..8 {
            let conn = ep
                .connect(a[0].addr(), aspen_federation::FEDERATION_ALPN)
                .await
                .unwrap();
            flood.push(conn);
        }
        flooders.push(ep);
    }
    let closed = wait_until("the connections over the bound to be closed", || async {
        let n = flood.iter().filter(|c| c.close_reason().is_some()).count();
        (n >= 80 - 64).then_some(n)
    })
    .await;
    assert!(closed < 80, "every connection was closed at once: {closed}");

    let heads = sorted_heads(
        &a_client
            .doc_get("plans", Consistency::Linearizable)
            .await
            .unwrap(),
    );
    a_client.close().await;

    // B's first pull comes as one saved document; A flips a byte of it: refused, nothing
    // committed.
    let mut lying = refs(&args);
    lying.extend(["--unsafe-test-fault", "fed-flip-byte"]);
    a[0].restart(Some(&lying));
    b_client
        .fed_follow(
            a_key,
            Resource::doc("plans"),
            Some("plans".into()),
            vec![a[0].ticket.clone()],
        )
        .await
        .unwrap();
    let error = wait_until_or_dump("B to reject a damaged snapshot", &a, || async {
        let s = b_client.fed_sync(None, None).await.ok()?;
        // A restarted origin may answer "unavailable" until it has replayed its log (its
        // cluster identity included): a transient error, not the refusal under test.
        s[0].last_error
            .clone()
            .filter(|e| !e.contains("cluster unavailable"))
    })
    .await;
    assert!(
        error.contains("not an acceptable saved document"),
        "{error}"
    );
    assert!(
        b_client
            .doc_get("plans", Consistency::Linearizable)
            .await
            .is_err(),
        "nothing committed"
    );
    // Honest again: B's next pull takes it.
    a[0].restart(Some(&refs(&args)));
    b_client.fed_sync(None, None).await.unwrap();
    wait_for_heads(&b[0], &a, "plans", &heads).await;

    // Then A lies, one way at a time; B commits nothing and says why.
    for (fault, expected) in [
        ("fed-flip-byte", "is not a valid Automerge change"),
        ("fed-extra-change", "not in the history the origin signed"),
        ("fed-wrong-key", "signature is not the origin's"),
        // Seq 1 again, with other heads: a fork (or, later in a chain, a rollback).
        ("fed-old-manifest", "seq"),
    ] {
        let mut with_fault = refs(&args);
        with_fault.extend(["--unsafe-test-fault", fault]);
        a[0].restart(Some(&with_fault));
        // Something new to pull, so every lie has data to lie about.
        let a_client = client_of(&a[0]).await;
        edit(&a_client, "plans", fault, 1).await;
        a_client.close().await;
        let error = wait_until_or_dump(&format!("B to reject {fault}"), &a, || async {
            let s = b_client.fed_sync(None, None).await.ok()?;
            s[0].last_error.clone().filter(|e| e.contains(expected))
        })
        .await;
        eprintln!("{fault}: {error}");
        let doc = b_client
            .doc_get("plans", Consistency::Linearizable)
            .await
            .unwrap();
        assert_eq!(sorted_heads(&doc), heads, "{fault}: nothing committed");
    }
    // An honest origin again: B catches up with everything.
    a[0].restart(Some(&refs(&args)));
    let a_client = client_of(&a[0]).await;
    let heads = sorted_heads(
        &a_client
            .doc_get("plans", Consistency::Linearizable)
            .await
            .unwrap(),
    );
    a_client.close().await;
    wait_for_heads(&b[0], &a, "plans", &heads).await;
    b_client.close().await;
    for ep in flooders {
        ep.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_blob_prefix_arrives_verified_under_the_origins_name() {
    let root = tempfile::tempdir().unwrap();
    let args = ["--fed-pull-interval-ms", "300"];
    let mut a = form(&root.path().join("a"), 1, &args).await;
    let b = form(&root.path().join("b"), 1, &args).await;
    let a_client = client_of(&a[0]).await;
    let b_client = client_of(&b[0]).await;
    let (a_key, b_key) = (cluster_key(&a_client).await, cluster_key(&b_client).await);
    let files = root.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let add = |name: &str, bytes: Vec<u8>| {
        let path = files.join(name);
        std::fs::write(&path, &bytes).unwrap();
        let a_client = a_client.clone();
        let tag = name.replace('_', "/");
        async move {
            a_client
                .blob_add_file(&path, Some(&tag), |_| {})
                .await
                .unwrap()
                .hash
        }
    };
    let site_a = add("site_a", vec![1; 300_000]).await;
    let site_b = add("site_b", b"hello".to_vec()).await;
    add("other_c", b"not exported".to_vec()).await;
    a_client
        .fed_export(Resource::blob("site/"), vec![b_key], false)
        .await
        .unwrap();
    b_client
        .fed_follow(
            a_key,
            Resource::blob("site/"),
            None,
            vec![a[0].ticket.clone()],
        )
        .await
        .unwrap();
    let local = format!("fed/{}/", &hex::encode(a_key)[..16]);
    let tags_on_b = || async {
        let (tags, _) = b_client
            .blob_list(None, 1000, Consistency::Linearizable)
            .await
            .ok()?;
        Some(
            tags.into_iter()
                .map(|t| (t.tag, t.hash))
                .collect::<std::collections::BTreeMap<_, _>>(),
        )
    };
    let want = std::collections::BTreeMap::from([
        (format!("{local}site/a"), site_a),
        (format!("{local}site/b"), site_b),
    ]);
    wait_until_or_dump("the exported tags to reach B", &a, || async {
        (tags_on_b().await? == want).then_some(())
    })
    .await;
    // B serves the bytes itself (verified on the way out).
    let out = root.path().join("out");
    b_client
        .blob_get_to_file(site_a, &out, |_, _| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), vec![1; 300_000]);

    // Later tags under the prefix follow.
    let site_d = add("site_d", b"later".to_vec()).await;
    let mut want = want;
    want.insert(format!("{local}site/d"), site_d);
    wait_until_or_dump("a later tag to reach B", &b, || async {
        (tags_on_b().await? == want).then_some(())
    })
    .await;
    let follows = b_client.fed_follows().await.unwrap();
    assert!(follows[0].seq >= 2, "{follows:?}");
    assert!(follows[0].last_error.is_none(), "{follows:?}");
    a_client.close().await;

    // A lies about its tags, one way at a time; B keeps its verified tags and says why.
    for (fault, expected) in [
        ("fed-flip-byte", "does not match the signed manifest"),
        ("fed-extra-change", "does not match the signed manifest"),
        ("fed-wrong-key", "signature is not the origin's"),
        ("fed-old-manifest", "seq"),
    ] {
        let mut with_fault = args.to_vec();
        with_fault.extend(["--unsafe-test-fault", fault]);
        a[0].restart(Some(&with_fault));
        // A new tag, so every lie has something to lie about.
        let a_client = client_of(&a[0]).await;
        let path = files.join(fault);
        std::fs::write(&path, fault.as_bytes()).unwrap();
        a_client
            .blob_add_file(&path, Some(&format!("site/{fault}")), |_| {})
            .await
            .unwrap();
        a_client.close().await;
        let error = wait_until_or_dump(&format!("B to reject {fault}"), &a, || async {
            let s = b_client.fed_sync(None, None).await.ok()?;
            s[0].last_error.clone().filter(|e| e.contains(expected))
        })
        .await;
        eprintln!("{fault}: {error}");
        assert_eq!(
            tags_on_b().await.unwrap(),
            want,
            "{fault}: nothing committed"
        );
    }
    // Honest again: B takes every new tag.
    a[0].restart(Some(&args));
    wait_until_or_dump("B to catch up with an honest origin", &b, || async {
        (tags_on_b().await?.len() == want.len() + 4).then_some(())
    })
    .await;
    b_client.close().await;
}

/// A 256 MiB blob under a followed tag: the serving node of the origin stalls halfway and is
/// killed there; restarted, it serves only what the follower has not verified yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_followed_blob_resumes_after_its_server_is_killed_midway() {
    use crate::blobs::{hash_file, write_random, MIB};
    let root = tempfile::tempdir().unwrap();
    let args = ["--fed-pull-interval-ms", "300"];
    let mut stalling = args.to_vec();
    stalling.extend(["--unsafe-test-fault", "stall-blob-sends"]);
    let mut a = form(&root.path().join("a"), 1, &stalling).await;
    let b = form(&root.path().join("b"), 1, &args).await;
    let a_client = client_of(&a[0]).await;
    let b_client = client_of(&b[0]).await;
    let (a_key, b_key) = (cluster_key(&a_client).await, cluster_key(&b_client).await);
    let size = 256 * MIB;
    let file = root.path().join("big.bin");
    let expected = write_random(&file, size, 11);
    a_client
        .blob_add_file(&file, Some("media/big"), |_| {})
        .await
        .unwrap();
    a_client
        .fed_export(Resource::blob("media/"), vec![b_key], false)
        .await
        .unwrap();
    a_client.close().await;
    b_client
        .fed_follow(
            a_key,
            Resource::blob("media/"),
            None,
            vec![a[0].ticket.clone()],
        )
        .await
        .unwrap();
    // Half arrives, then A sends nothing more: killed right there.
    wait_until_or_dump("half of the blob to reach B", &b, || async {
        let stats = b_client.blob_stats().await.ok()?;
        (stats.fetched_bytes >= size / 2 - 4 * MIB).then_some(())
    })
    .await;
    a[0].kill9();
    a[0].restart(Some(&args));
    let tag = format!("fed/{}/media/big", &hex::encode(a_key)[..16]);
    wait_until_or_dump("the blob to be complete on B", &b, || async {
        let (tags, _) = b_client
            .blob_list(None, 10, Consistency::Linearizable)
            .await
            .ok()?;
        tags.iter()
            .any(|t| t.tag == tag && t.hash == expected)
            .then_some(())
    })
    .await;
    let stats = b_client.blob_stats().await.unwrap();
    let refetched = stats.fetched_bytes.saturating_sub(size);
    eprintln!(
        "256 MiB blob, server killed midway: {} MiB received in all, {} MiB of it re-fetched",
        stats.fetched_bytes / MIB,
        refetched / MIB
    );
    assert!(
        refetched < size / 8,
        "the verified half was kept, not fetched again: {stats:?}"
    );
    let out = root.path().join("out.bin");
    b_client
        .blob_get_to_file(expected, &out, |_, _| {})
        .await
        .unwrap();
    assert_eq!(hash_file(&out), expected);
    b_client.close().await;
}

/// An iroh-docs namespace exported by A is replicated read-only to every member of B and
/// follows later writes; a cluster it is not exported to gets a typed refusal, hosts
/// nothing, and its node (proven in that hello) is refused the namespace over iroh-docs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_namespace_is_replicated_read_only_and_follows_later_writes() {
    use aspen_client::protocol::NamespaceError;
    let root = tempfile::tempdir().unwrap();
    let args = ["--fed-pull-interval-ms", "300"];
    let a = form(&root.path().join("a"), 1, &args).await;
    let b = form(&root.path().join("b"), 3, &args).await;
    let mut c = form(&root.path().join("c"), 1, &args).await;
    let a_client = client_of(&a[0]).await;
    let b_client = client_for(&b.iter().collect::<Vec<_>>()).await;
    let c_client = client_of(&c[0]).await;
    let (a_key, b_key) = (cluster_key(&a_client).await, cluster_key(&b_client).await);
    let id = a_client.ns_create().await.unwrap();
    a_client
        .ns_set(id, b"k1".to_vec(), b"one".to_vec())
        .await
        .unwrap();
    a_client
        .ns_set(id, b"k2".to_vec(), vec![7; 100_000])
        .await
        .unwrap();
    a_client
        .fed_export(Resource::ns(&id), vec![b_key], false)
        .await
        .unwrap();
    b_client
        .fed_follow(a_key, Resource::ns(&id), None, vec![a[0].ticket.clone()])
        .await
        .unwrap();
    let members: Vec<Client> = futures::future::join_all(b.iter().map(client_of)).await;
    let everywhere = |key: &'static [u8], value: Vec<u8>| {
        let members = &members;
        async move {
            for m in members {
                let (_, got) = m.ns_get(id, key.to_vec()).await.ok()?;
                if got.as_ref() != Some(&value) {
                    return None;
                }
            }
            Some(())
        }
    };
    wait_until_or_dump("every member of B to hold A's entries", &b, || async {
        everywhere(b"k1", b"one".to_vec()).await?;
        everywhere(b"k2", vec![7; 100_000]).await
    })
    .await;
    // A read-only copy: B cannot write into A's namespace.
    let refused = b_client.ns_set(id, b"k9".to_vec(), b"no".to_vec()).await;
    assert!(
        matches!(
            refused,
            Err(ClientError::Rpc(RpcError::Namespace(
                NamespaceError::ReadOnly(_)
            )))
        ),
        "{refused:?}"
    );
    let listed = b_client.ns_namespaces().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(!listed[0].writable, "{listed:?}");
    // Later writes follow.
    a_client
        .ns_set(id, b"k3".to_vec(), b"three".to_vec())
        .await
        .unwrap();
    wait_until_or_dump("a later write to reach every member of B", &b, || async {
        everywhere(b"k3", b"three".to_vec()).await
    })
    .await;
    let follows = b_client.fed_follows().await.unwrap();
    assert!(follows[0].seq >= 2, "{follows:?}");
    assert!(follows[0].last_error.is_none(), "{follows:?}");

    // C is not allowed: a typed refusal and no namespace.
    refused_follow(
        &c_client,
        a_key,
        Resource::ns(&id),
        vec![a[0].ticket.clone()],
    )
    .await;
    assert!(c_client.ns_namespaces().await.unwrap().is_empty());
    // C's node proved its cluster to A in that hello; the namespace is still refused to it.
    c_client.close().await;
    let c_node = stopped_node_key(&mut c[0]);
    use iroh_docs::net::{AbortReason, ConnectError};
    match docs_sync_as(&a[0], c_node.secret_bytes(), id).await {
        Err(ConnectError::RemoteAbort(AbortReason::NotFound) | ConnectError::Close { .. }) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
    for m in members {
        m.close().await;
    }
    a_client.close().await;
    b_client.close().await;
}
