//! Automerge documents in a cluster of real `aspen` processes: concurrent edits through
//! different nodes converge to identical heads and JSON on every node (also across
//! compaction, a restart and a snapshot install), changes made by the JavaScript
//! implementation merge, and bad input gets typed errors.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::common::*;
use aspen_client::{ClientError, Consistency, RpcError};
use aspen_crdt::patch::{PatchOp, PathElem};
use aspen_crdt::DocError;
use serde_json::json;

/// Every node's local (serializable) heads and JSON of `name`, once they are all equal.
async fn converged(nodes: &[&NodeProc], name: &str) -> (Vec<String>, serde_json::Value) {
    let clients: Vec<_> = futures_join(nodes).await;
    let result = wait_until("every node to hold the same document", || async {
        let mut views = BTreeSet::new();
        for c in &clients {
            let doc = c.doc_get(name, Consistency::Serializable).await.ok()?;
            let mut heads = aspen_crdt::view::heads(&doc);
            heads.sort();
            views.insert((heads, aspen_crdt::view::to_json(&doc).to_string()));
        }
        (views.len() == 1).then(|| views.pop_first().unwrap())
    })
    .await;
    for c in clients {
        c.close().await;
    }
    (result.0, serde_json::from_str(&result.1).unwrap())
}

async fn futures_join(nodes: &[&NodeProc]) -> Vec<aspen_client::Client> {
    let mut out = Vec::new();
    for n in nodes {
        out.push(client_of(n).await);
    }
    out
}

fn key(k: &str) -> PathElem {
    PathElem::Key(k.into())
}

/// `writers` clients, each through its own node, make `per_writer` edits concurrently: one
/// map key of their own, one element at the front of the shared list, one counter increment.
async fn concurrent_edits(nodes: &[&NodeProc], name: &str, round: usize, per_writer: usize) {
    let mut tasks = Vec::new();
    for (w, node) in nodes.iter().enumerate() {
        let client = client_of(node).await;
        let name = name.to_string();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                let ops = [
                    PatchOp::Set {
                        path: vec![key("by"), key(&format!("r{round}-w{w}-{i:03}"))],
                        value: json!(i),
                    },
                    PatchOp::Insert {
                        path: vec![key("log"), PathElem::Index(0)],
                        value: json!(format!("r{round}-w{w}-{i}")),
                    },
                    PatchOp::Increment {
                        path: vec![key("count")],
                        by: 1,
                    },
                ];
                client
                    .doc_patch(&name, &ops, Some(format!("edit {i}")))
                    .await
                    .unwrap()
                    .expect("a change");
            }
            client.close().await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_converge_across_compaction_restart_and_snapshot_install() {
    let root = tempfile::tempdir().unwrap();
    let args = ["--snapshot-every", "20", "--keep-log-after-snapshot", "0"];
    let mut nodes = form(root.path(), 3, &args).await;
    let client = client_for(&nodes.iter().collect::<Vec<_>>()).await;
    client.doc_create("shared").await.unwrap();
    client
        .doc_patch(
            "shared",
            &[
                PatchOp::Set {
                    path: vec![key("by")],
                    value: json!({}),
                },
                PatchOp::Set {
                    path: vec![key("log")],
                    value: json!([]),
                },
                // The counter exists before the writers start: concurrent creations of it
                // would conflict (one wins), concurrent increments of one counter add up.
                PatchOp::Increment {
                    path: vec![key("count")],
                    by: 0,
                },
            ],
            None,
        )
        .await
        .unwrap();

    // 3 writers x 50 edits: past the compaction threshold (128 pending changes).
    concurrent_edits(&nodes.iter().collect::<Vec<_>>(), "shared", 0, 50).await;
    let (heads, doc) = converged(&nodes.iter().collect::<Vec<_>>(), "shared").await;
    assert_eq!(doc["count"], 150);
    assert_eq!(doc["by"].as_object().unwrap().len(), 150);
    assert_eq!(doc["log"].as_array().unwrap().len(), 150);
    assert!(!heads.is_empty());
    // Compaction runs in the background, after the request that crossed the threshold.
    wait_until("the document to be compacted", || async {
        let stored = client
            .doc_fetch("shared", Consistency::Linearizable)
            .await
            .unwrap();
        (stored.snapshot.is_some() && stored.changes.len() < 128).then_some(())
    })
    .await;
    let history = aspen_crdt::view::history(
        &client
            .doc_get("shared", Consistency::Linearizable)
            .await
            .unwrap(),
    );
    assert_eq!(
        history.len(),
        151,
        "init + 150 edits, none lost to compaction"
    );

    // A follower is killed; edits continue through the other two; it restarts and catches up
    // (its log was purged behind snapshots, so through a snapshot install).
    let leader = leader_named_by(&client).await;
    let down = nodes.iter().position(|n| n.node_id() != leader).unwrap();
    nodes[down].kill9();
    let up: Vec<&NodeProc> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != down)
        .map(|(_, n)| n)
        .collect();
    concurrent_edits(&up, "shared", 1, 20).await;
    nodes[down].restart(None);
    let (heads_after, doc) = converged(&nodes.iter().collect::<Vec<_>>(), "shared").await;
    assert_eq!(doc["count"], 190);
    assert_ne!(heads_after, heads);
    let s = client_of(&nodes[down]).await.status().await.unwrap();
    assert!(s.snapshot_index.is_some(), "{s:?}");

    // A node added now receives the document with the state machine snapshot.
    let late = NodeProc::start(&root.path().join("late"), &args);
    client
        .add_member(late.ticket.clone(), bootstrap_secret(&late.dir))
        .await
        .unwrap();
    let mut all: Vec<&NodeProc> = nodes.iter().collect();
    all.push(&late);
    let (heads_late, doc_late) = converged(&all, "shared").await;
    assert_eq!((heads_late, doc_late), (heads_after, doc));

    // Every replica's whole state (system key space included) is identical.
    let digests = wait_until("equal state digests", || async {
        let mut set = BTreeSet::new();
        for n in &all {
            let c = client_of(n).await;
            let d = c.state_digest().await.ok();
            c.close().await;
            set.insert(d?.hash);
        }
        (set.len() == 1).then_some(set)
    })
    .await;
    assert_eq!(digests.len(), 1);

    // Documents are listed, deleted, and gone everywhere.
    client.doc_create("b-other").await.unwrap();
    let (docs, more) = client
        .doc_list(None, 10, Consistency::Linearizable)
        .await
        .unwrap();
    let names: Vec<_> = docs.iter().map(|d| d.name.as_str()).collect();
    assert_eq!((names, more), (vec!["b-other", "shared"], false));
    let (page, more) = client
        .doc_list(None, 1, Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!((page.len(), more), (1, true));
    let (page, _) = client
        .doc_list(Some("b-other".into()), 10, Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(page[0].name, "shared");
    client.doc_delete("shared").await.unwrap();
    for n in &all {
        let c = client_of(n).await;
        wait_until("the deleted document to vanish", || async {
            matches!(
                c.doc_get("shared", Consistency::Serializable).await,
                Err(ClientError::Rpc(RpcError::Doc(DocError::NotFound(_))))
            )
            .then_some(())
        })
        .await;
        c.close().await;
    }
    client.close().await;
}

/// Many clients committing to one document through one node at once: every change is
/// committed (the node checks and commits the changes waiting for the document together),
/// the document holds all of them, and it is compacted in the background with no request
/// left to do it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_on_one_document_all_commit_and_it_is_compacted_in_the_background() {
    use automerge::transaction::Transactable;
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, &[]).await;
    let client = client_for(&[&nodes[0]]).await;
    client.doc_create("busy").await.unwrap();
    const CLIENTS: usize = 16;
    const EACH: usize = 10;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut doc = automerge::Automerge::new().with_actor(automerge::ActorId::random());
            let mut heads = Vec::new();
            for i in 0..EACH {
                let mut tx = doc.transaction();
                tx.put(automerge::ROOT, format!("c{c}-{i}"), i as i64)
                    .unwrap();
                tx.commit();
                let change = doc.get_last_local_change().unwrap();
                let committed = client
                    .doc_apply("busy", vec![change.raw_bytes().to_vec()])
                    .await
                    .unwrap();
                assert_eq!(committed.added, vec![change.hash()]);
                heads = committed.heads;
            }
            heads
        }));
    }
    for t in tasks {
        assert!(!t.await.unwrap().is_empty());
    }
    let doc = client
        .doc_get("busy", Consistency::Linearizable)
        .await
        .unwrap();
    let json = aspen_crdt::view::to_json(&doc);
    assert_eq!(json.as_object().unwrap().len(), CLIENTS * EACH, "{json}");
    assert_eq!(
        doc.get_heads().len(),
        CLIENTS,
        "one head per client's chain"
    );
    // 160 changes: past the threshold of 128. No request is made from here on.
    let stored = wait_until("the document to be compacted", || async {
        let stored = client
            .doc_fetch("busy", Consistency::Serializable)
            .await
            .unwrap();
        stored.snapshot.is_some().then_some(stored)
    })
    .await;
    assert!(
        stored.changes.len() < 128,
        "{} pending",
        stored.changes.len()
    );
    let compacted = client
        .doc_get("busy", Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(aspen_crdt::view::to_json(&compacted), json);
    // Changes still commit after the compaction (on top of its snapshot).
    let mut more = compacted.fork().with_actor(automerge::ActorId::random());
    let mut tx = more.transaction();
    tx.put(automerge::ROOT, "after", true).unwrap();
    tx.commit();
    let change = more.get_last_local_change().unwrap().raw_bytes().to_vec();
    assert_eq!(
        client
            .doc_apply("busy", vec![change])
            .await
            .unwrap()
            .added
            .len(),
        1
    );
    client.close().await;
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../crdt/tests/fixtures")
        .join(name)
}

fn doc_err(r: Result<impl std::fmt::Debug, ClientError>) -> DocError {
    match r {
        Err(ClientError::Rpc(RpcError::Doc(e))) | Err(ClientError::Doc(e)) => e,
        other => panic!("expected a document error, got {other:?}"),
    }
}

/// Changes saved by the JavaScript implementation (`@automerge/automerge`, see
/// crdt/tests/fixtures/README.md) are accepted through the CLI and merge with concurrent
/// changes made here; bad input is refused with typed errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_changes_merge_and_bad_input_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, &[]).await;
    let ticket = nodes[0].cluster_ticket().unwrap().to_string();
    let client = client_for(&[&nodes[0]]).await;
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("js-expected.json")).unwrap())
            .unwrap();

    let out = cli(&["doc", "create", "js"], Some(&ticket));
    assert!(out.status.success(), "{}", stderr(&out));
    // A change made here, concurrent with everything the JS document holds.
    let out = cli(&["doc", "set", "js", "rust", "true"], Some(&ticket));
    assert!(out.status.success(), "{}", stderr(&out));
    let rust_head = client
        .doc_get("js", Consistency::Linearizable)
        .await
        .unwrap()
        .get_heads()[0]
        .to_string();
    let change1 = fixture("js-change-1.bin");
    let change2 = fixture("js-change-2.bin");
    // Change 2 alone lacks its dependency.
    let out = cli(
        &["doc", "apply", "js", change2.to_str().unwrap()],
        Some(&ticket),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("depends on changes"),
        "{}",
        stderr(&out)
    );
    let out = cli(
        &[
            "doc",
            "apply",
            "js",
            change1.to_str().unwrap(),
            change2.to_str().unwrap(),
            "-o",
            "json",
        ],
        Some(&ticket),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let applied: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(applied["added"].as_array().unwrap().len(), 2);
    let out = cli(&["doc", "get", "js", "-o", "json"], Some(&ticket));
    assert!(out.status.success(), "{}", stderr(&out));
    let got: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let mut want = expected["doc"].clone();
    want["rust"] = json!(true);
    assert_eq!(got["doc"], want);
    let mut heads: Vec<String> = got["heads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_string())
        .collect();
    heads.sort();
    let mut want_heads = vec![
        expected["heads_after_2"][0].as_str().unwrap().to_string(),
        rust_head,
    ];
    want_heads.sort();
    assert_eq!(heads, want_heads, "the JS head and ours, merged");
    // Applying again adds nothing (idempotent retries).
    let again = client
        .doc_apply("js", vec![std::fs::read(&change1).unwrap()])
        .await
        .unwrap();
    assert!(again.added.is_empty());
    // A whole document saved by JS imports into a new document with the same heads.
    let out = cli(&["doc", "create", "js-saved"], Some(&ticket));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(
        &[
            "doc",
            "apply",
            "js-saved",
            fixture("js-doc.bin").to_str().unwrap(),
        ],
        Some(&ticket),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let saved = client
        .doc_get("js-saved", Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(aspen_crdt::view::to_json(&saved), expected["doc"]);
    assert_eq!(
        aspen_crdt::view::heads(&saved),
        vec![expected["heads_after_2"][0].as_str().unwrap().to_string()]
    );

    // Bad input: typed errors, nothing stored.
    assert!(matches!(
        doc_err(
            client
                .doc_apply("nope", vec![std::fs::read(&change1).unwrap()])
                .await
        ),
        DocError::NotFound(_)
    ));
    assert!(matches!(
        doc_err(client.doc_apply("js", vec![b"not a change".to_vec()]).await),
        DocError::InvalidChange { index: 0, .. }
    ));
    let mut truncated = std::fs::read(&change2).unwrap();
    truncated.truncate(truncated.len() - 3);
    assert!(matches!(
        doc_err(client.doc_apply("js", vec![truncated]).await),
        DocError::InvalidChange { .. }
    ));
    let huge = vec![0u8; aspen_crdt::limits::MAX_CHANGE_BYTES + 1];
    assert!(matches!(
        doc_err(client.doc_apply("js", vec![huge]).await),
        DocError::ChangeTooLarge { .. }
    ));
    let many =
        vec![std::fs::read(&change1).unwrap(); aspen_crdt::limits::MAX_CHANGES_PER_REQUEST + 1];
    assert!(matches!(
        doc_err(client.doc_apply("js", many).await),
        DocError::TooManyChanges { .. }
    ));
    assert!(matches!(
        doc_err(client.doc_create("js").await),
        DocError::Exists(_)
    ));
    assert!(matches!(
        doc_err(client.doc_create("").await),
        DocError::BadName { .. }
    ));
    assert!(matches!(
        doc_err(client.doc_get("bad\nname", Consistency::Linearizable).await),
        DocError::BadName { .. }
    ));
    let bad_patch = [PatchOp::Increment {
        path: vec![key("title")],
        by: 1,
    }];
    assert!(matches!(
        doc_err(client.doc_patch("js", &bad_patch, None).await),
        DocError::BadPatch { .. }
    ));
    let out = cli(
        &["doc", "patch", "js", "[{\"op\": \"frob\"}]"],
        Some(&ticket),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("patch operation"), "{}", stderr(&out));
    let out = cli(&["doc", "get", "missing"], Some(&ticket));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no document named \"missing\""),
        "{}",
        stderr(&out)
    );
    // Documents are not part of the kv key space, and clients cannot write the system space.
    let all = client
        .range(
            aspen_kv::api::RangeRequest {
                start: vec![0],
                end: Some(vec![]),
                ..aspen_kv::api::RangeRequest::key(vec![])
            },
            Consistency::Linearizable,
        )
        .await
        .unwrap();
    assert!(all.kvs.is_empty(), "{:?}", all.kvs);
    let sneaky = client
        .write(aspen_kv::api::WriteOp::SystemTxn(
            aspen_kv::api::SystemTxn {
                require: vec![],
                writes: vec![aspen_kv::api::SystemOp::DeletePrefix {
                    prefix: b"crdt/".to_vec(),
                }],
            },
        ))
        .await;
    assert!(sneaky.is_err(), "{sneaky:?}");
    assert_eq!(
        aspen_crdt::view::to_json(
            &client
                .doc_get("js", Consistency::Linearizable)
                .await
                .unwrap()
        ),
        want
    );
    // The load generator commits its change chains without errors.
    let out = cli(
        &[
            "bench",
            "doc",
            "--clients",
            "2",
            "--total",
            "20",
            "-o",
            "json",
        ],
        Some(&ticket),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let bench: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (bench["ok"].as_u64(), bench["errors"].as_u64()),
        (Some(20), Some(0))
    );
    client.close().await;
}
