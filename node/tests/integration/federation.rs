//! Federation: exports are replicated policy that only admins change (the CLI, the SDK from
//! another member, and a stranger).

use aspen_client::protocol::{Resource, ResourceKind, RpcError};
use aspen_client::{Client, ClientError, ClientOptions};
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
        stderr(&bad_ns).contains("cannot be exported"),
        "{}",
        stderr(&bad_ns)
    );
    let bad_kind = run(&["fed", "export", "table", "x", "--public"]);
    assert!(!bad_kind.status.success());

    // A key without a grant can neither read nor change the exports.
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
