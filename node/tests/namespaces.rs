//! iroh-docs namespaces in a cluster of real `aspen` processes: entries written through one
//! member are readable on every other, a read ticket gives another cluster a read-only
//! replica that keeps syncing, and bad input gets typed errors.

mod common;

use aspen_client::protocol::{NamespaceError, RpcError};
use aspen_client::{Client, ClientError, ClusterTicket};
use common::*;

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
