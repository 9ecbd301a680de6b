//! iroh-docs namespaces in a cluster of real `aspen` processes: entries written through one
//! member are readable on every other, a read ticket gives another cluster a read-only
//! replica that keeps syncing, content that never arrived with its entry is repaired, and
//! bad input gets typed errors.

use crate::common::*;
use aspen_client::protocol::{NamespaceError, RpcError};
use aspen_client::{Client, ClientError, ClusterTicket};

/// Waits until `client` (one member) reads `value` for `key`.
async fn wait_value(client: &Client, ns: [u8; 32], key: &str, value: &str, what: &str) {
    wait_until(what, || async {
        let (_, got) = client.ns_get(ns, key.as_bytes().to_vec()).await.ok()?;
        (got.as_deref() == Some(value.as_bytes())).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_written_on_one_member_are_readable_on_the_others() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 3, &[]).await;
    let each: Vec<Client> = {
        let mut v = Vec::new();
        for n in &nodes {
            v.push(client_of(n).await);
        }
        v
    };
    // Created through the CLI on the first member.
    let cluster = ClusterTicket {
        members: vec![nodes[0].ticket.clone()],
    }
    .to_string();
    let out = cli(&["docs", "create", "-o", "json"], Some(&cluster));
    assert!(out.status.success(), "{}", stderr(&out));
    let created: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let ns =
        aspen_client::protocol::parse_namespace_id(created["namespace"].as_str().unwrap()).unwrap();

    // Writers on two different members (two authors), and a key both write.
    let out = cli(
        &["docs", "set", &hex::encode(ns), "from-a", "alpha"],
        Some(&cluster),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    each[1]
        .ns_set(ns, b"from-b".to_vec(), b"beta".to_vec())
        .await
        .unwrap();
    for (i, c) in each.iter().enumerate() {
        wait_value(
            c,
            ns,
            "from-a",
            "alpha",
            &format!("member {i} to read from-a"),
        )
        .await;
        wait_value(
            c,
            ns,
            "from-b",
            "beta",
            &format!("member {i} to read from-b"),
        )
        .await;
    }
    // Every member lists the same entries, and the namespace as writable.
    for c in &each {
        let listed = c.ns_namespaces().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].writable);
        let (entries, more) = c.ns_list(ns, vec![], 10).await.unwrap();
        assert!(!more);
        let keys: Vec<_> = entries.iter().map(|e| e.key.clone()).collect();
        assert_eq!(keys, vec![b"from-a".to_vec(), b"from-b".to_vec()]);
        assert_ne!(entries[0].author, entries[1].author, "two authors wrote");
    }

    // A read ticket: a second, separate cluster imports a read-only replica.
    let ticket = each[2].ns_share(ns, false).await.unwrap();
    let other = form(&root.path().join("other"), 1, &[]).await;
    let outsider = client_of(&other[0]).await;
    // Default deny: the origin admits the other cluster's node to this namespace only.
    each[0]
        .auth_grant(
            other[0].ticket.endpoint_id,
            vec![],
            vec![format!("ns:read:{}", hex::encode(ns))],
        )
        .await
        .unwrap();
    let other_cluster = ClusterTicket {
        members: vec![other[0].ticket.clone()],
    }
    .to_string();
    let out = cli(&["docs", "import", &ticket], Some(&other_cluster));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), hex::encode(ns));
    wait_value(
        &outsider,
        ns,
        "from-a",
        "alpha",
        "the importer to read from-a",
    )
    .await;
    wait_value(
        &outsider,
        ns,
        "from-b",
        "beta",
        "the importer to read from-b",
    )
    .await;
    match outsider.ns_set(ns, b"x".to_vec(), b"y".to_vec()).await {
        Err(ClientError::Rpc(RpcError::Namespace(NamespaceError::ReadOnly(_)))) => {}
        other => panic!("expected ReadOnly, got {other:?}"),
    }
    assert!(!outsider.ns_namespaces().await.unwrap()[0].writable);
    match outsider.ns_share(ns, true).await {
        Err(ClientError::Rpc(RpcError::Namespace(NamespaceError::ReadOnly(_)))) => {}
        other => panic!("expected ReadOnly, got {other:?}"),
    }
    // Later writes in the origin cluster keep flowing to the read-only replica.
    each[0]
        .ns_set(ns, b"from-a".to_vec(), b"alpha-2".to_vec())
        .await
        .unwrap();
    wait_value(
        &outsider,
        ns,
        "from-a",
        "alpha-2",
        "the importer to see the update",
    )
    .await;
    let out = cli(
        &["docs", "get", &hex::encode(ns), "from-a"],
        Some(&other_cluster),
    );
    assert_eq!(stdout(&out).trim(), "alpha-2", "{}", stderr(&out));
    for c in each {
        c.close().await;
    }
    outsider.close().await;
}

/// A plain iroh-docs peer outside any Aspen cluster (another organisation's node), in memory
/// on loopback.
struct ForeignPeer {
    router: iroh::protocol::Router,
    docs: iroh_docs::protocol::Docs,
    blobs: iroh_blobs::store::mem::MemStore,
}

impl ForeignPeer {
    async fn start() -> ForeignPeer {
        let endpoint =
            aspen_client::endpoint::offline_endpoint("127.0.0.1:0".parse().unwrap(), None, vec![])
                .await
                .unwrap();
        let blobs = iroh_blobs::store::mem::MemStore::new();
        let gossip = iroh_gossip::net::Gossip::builder().spawn(endpoint.clone());
        let docs = iroh_docs::protocol::Docs::memory()
            .spawn(endpoint.clone(), (*blobs).clone(), gossip.clone())
            .await
            .unwrap();
        let router = iroh::protocol::Router::builder(endpoint)
            .accept(
                iroh_blobs::ALPN,
                iroh_blobs::BlobsProtocol::new(&blobs, None),
            )
            .accept(iroh_gossip::ALPN, gossip)
            .accept(iroh_docs::ALPN, docs.clone())
            .spawn();
        ForeignPeer {
            router,
            docs,
            blobs,
        }
    }
}

/// iroh-docs fetches an entry's content once, when the entry arrives, and only if the sender
/// has it. Here the sender gets the content only later and never announces it, so the value
/// reaches the importer only through the node's own content repair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_that_arrives_after_its_entry_is_fetched_later() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, &[]).await;
    let client = client_of(&nodes[0]).await;
    let foreign = ForeignPeer::start().await;
    let doc = foreign.docs.create().await.unwrap();
    let author = foreign.docs.author_default().await.unwrap();
    let value = b"content that came late".to_vec();
    let hash = iroh_blobs::Hash::new(&value);
    // The entry names content its writer does not hold yet.
    doc.set_hash(author, b"late".to_vec(), hash, value.len() as u64)
        .await
        .unwrap();
    let ticket = doc
        .share(
            iroh_docs::api::protocol::ShareMode::Read,
            iroh_docs::api::protocol::AddrInfoOptions::Addresses,
        )
        .await
        .unwrap();
    let ns = client.ns_import(&ticket.to_string()).await.unwrap();
    // The entry arrives without its value.
    wait_until("the importer to see the entry", || async {
        let (entry, got) = client.ns_get(ns, b"late".to_vec()).await.ok()?;
        let entry = entry?;
        assert_eq!(entry.hash, *hash.as_bytes());
        assert_eq!(got, None, "content cannot be there yet");
        Some(())
    })
    .await;
    // The writer gets the content, behind iroh-docs' back (no announcement).
    let added = foreign.blobs.add_bytes(value.clone()).await.unwrap();
    assert_eq!(added.hash, hash);
    wait_value(
        &client,
        ns,
        "late",
        "content that came late",
        "the importer to repair the missing content",
    )
    .await;
    client.close().await;
    foreign.router.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_namespace_input_gets_typed_errors() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, &[]).await;
    let client = client_of(&nodes[0]).await;
    let cluster = ClusterTicket {
        members: vec![nodes[0].ticket.clone()],
    }
    .to_string();
    let out = cli(&["docs", "get", "nothex", "k"], Some(&cluster));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid namespace id"),
        "{}",
        stderr(&out)
    );
    match client.ns_get([7; 32], b"k".to_vec()).await {
        Err(ClientError::Rpc(RpcError::Namespace(NamespaceError::Unknown(_)))) => {}
        other => panic!("expected Unknown, got {other:?}"),
    }
    match client.ns_import("docnotaticket").await {
        Err(ClientError::Rpc(RpcError::Namespace(NamespaceError::BadTicket(_)))) => {}
        other => panic!("expected BadTicket, got {other:?}"),
    }
    let ns = client.ns_create().await.unwrap();
    assert!(matches!(
        client.ns_set(ns, vec![], b"v".to_vec()).await,
        Err(ClientError::Namespace(NamespaceError::EmptyKey))
    ));
    assert!(matches!(
        client
            .ns_set(
                ns,
                vec![b'k'; aspen_client::protocol::MAX_NS_KEY_BYTES + 1],
                vec![]
            )
            .await,
        Err(ClientError::Namespace(NamespaceError::KeyTooLarge { .. }))
    ));
    let (entry, value) = client.ns_get(ns, b"missing".to_vec()).await.unwrap();
    assert!(entry.is_none() && value.is_none());
    let out = cli(
        &["docs", "get", &hex::encode(ns), "missing"],
        Some(&cluster),
    );
    assert!(stderr(&out).contains("no entry"), "{}", stderr(&out));
    client.close().await;
}
