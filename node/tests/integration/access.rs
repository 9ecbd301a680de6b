//! Access control with real `aspen` processes: a key with no grant is refused on every
//! surface (client requests, Raft, iroh-blobs, iroh-docs, iroh-gossip) while the node keeps
//! serving everyone else; grants and roles; capability tokens and their refusals; an
//! uninitialized node cannot be captured; a flood of idle callers stays cheap.

use std::time::Duration;

use crate::common::*;
use aspen_client::protocol::{
    AuthRequest, ClientRequest, ClientResponse, ClusterRequest, RpcError, CLIENT_ALPN,
};
use aspen_client::{Client, ClientError, ClientOptions, Consistency};
use aspen_kv::api::{
    Compare, CompareOp, CompareRange, CompareTarget, RangeRequest, Txn, TxnOp, TxnTree, WriteOp,
};
use aspen_trust::{CapabilityToken, NodeKey, Permission};

/// A fresh identity: its secret and its public key.
fn fresh() -> ([u8; 32], [u8; 32]) {
    let key = NodeKey::generate();
    (key.secret_bytes(), key.public())
}

fn denied<T: std::fmt::Debug>(r: Result<T, ClientError>, what: &str) -> String {
    match r {
        Err(ClientError::Rpc(RpcError::PermissionDenied { needed, .. })) => needed,
        other => panic!("{what}: expected permission denied, got {other:?}"),
    }
}

fn perms(list: &[&str]) -> Vec<Permission> {
    list.iter().map(|p| p.parse().unwrap()).collect()
}

fn put_op(key: &[u8]) -> TxnOp {
    TxnOp::Put {
        key: key.to_vec(),
        value: b"t".to_vec(),
        prev_kv: false,
    }
}

fn version_is_zero(key: &[u8]) -> Compare {
    Compare {
        key: key.to_vec(),
        target: CompareTarget::Version(0),
        op: CompareOp::Equal,
    }
}

/// A transaction tree: the outer transaction puts `outer` and runs a nested one that puts
/// `inner` (both on success; no comparisons).
fn nested_puts(outer: &[u8], inner: &[u8]) -> WriteOp {
    WriteOp::TxnTree(TxnTree {
        nodes: vec![
            Txn {
                compare: vec![],
                success: vec![put_op(outer), TxnOp::Nested(1)],
                failure: vec![],
            },
            Txn {
                compare: vec![],
                success: vec![put_op(inner)],
                failure: vec![],
            },
        ],
        ranges: vec![],
    })
}

/// A read-only transaction tree whose one comparison covers `[start, end)`.
fn range_compare(start: &[u8], end: &[u8]) -> WriteOp {
    WriteOp::TxnTree(TxnTree {
        nodes: vec![Txn {
            compare: vec![version_is_zero(start)],
            success: vec![],
            failure: vec![],
        }],
        ranges: vec![CompareRange {
            node: 0,
            compare: 0,
            end: end.to_vec(),
        }],
    })
}

fn now() -> u64 {
    aspen_node::server::identity::unix_now()
}

/// Sends one request as `secret` on the client ALPN, bypassing the SDK's own checks.
async fn raw_request(node: &NodeProc, secret: [u8; 32], request: &ClientRequest) -> ClientResponse {
    let frame = aspen_client::wire::encode_frame(request, usize::MAX).unwrap();
    let reply = raw_exchange_as(node, CLIENT_ALPN, &frame, Some(secret)).await;
    aspen_client::wire::decode_body(&reply[4..]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_without_a_grant_is_refused_everywhere_and_the_node_keeps_serving() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 3, &[]).await;
    let admin = client_for(&nodes.iter().collect::<Vec<_>>()).await;
    // Things a stranger would like: a key, a document, a tagged blob, a namespace.
    admin
        .put(b"secret/k".to_vec(), b"v".to_vec())
        .await
        .unwrap();
    admin.doc_create("plans").await.unwrap();
    let file = root.path().join("blob.bin");
    std::fs::write(&file, vec![7u8; 100_000]).unwrap();
    let blob = admin
        .blob_add_file(&file, Some("private/blob"), |_| {})
        .await
        .unwrap();
    let ns = admin.ns_create().await.unwrap();
    admin
        .ns_set(ns, b"k".to_vec(), b"v".to_vec())
        .await
        .unwrap();

    let (stranger_secret, stranger_key) = fresh();
    let stranger = Client::connect_with(
        aspen_client::ClusterTicket {
            members: nodes.iter().map(|n| n.ticket.clone()).collect(),
        },
        options_as(stranger_secret),
    )
    .await
    .unwrap();
    let needed = denied(stranger.get(b"secret/k".to_vec()).await, "get");
    assert!(needed.contains("kv:read"), "{needed}");
    denied(stranger.put(b"x".to_vec(), b"y".to_vec()).await, "put");
    denied(stranger.delete(b"secret/k".to_vec()).await, "delete");
    denied(
        stranger
            .range(
                RangeRequest::prefix(b"".to_vec()),
                Consistency::Serializable,
            )
            .await,
        "scan",
    );
    denied(
        stranger
            .compare_and_swap(b"secret/k".to_vec(), Some(b"v".to_vec()), b"w".to_vec())
            .await,
        "cas",
    );
    denied(
        stranger.write(nested_puts(b"x", b"y")).await,
        "nested transaction",
    );
    denied(
        stranger.write(range_compare(b"secret/", b"secret0")).await,
        "range comparison",
    );
    denied(stranger.compact(1).await, "compact");
    denied(stranger.status().await, "status");
    denied(stranger.state_digest().await, "digest");
    denied(stranger.remove_member(nodes[1].node_id()).await, "remove");
    denied(
        stranger.add_member(nodes[1].ticket.clone(), [0; 32]).await,
        "add",
    );
    denied(
        stranger.create_invite(Duration::from_secs(60)).await,
        "invite",
    );
    denied(
        stranger.set_net_faults(Default::default()).await,
        "net faults",
    );
    denied(stranger.doc_create("mine").await, "doc create");
    denied(
        stranger.doc_fetch("plans", Consistency::Linearizable).await,
        "doc get",
    );
    denied(stranger.doc_apply("plans", vec![]).await, "doc apply");
    denied(stranger.doc_delete("plans").await, "doc delete");
    denied(
        stranger.doc_list(None, 10, Consistency::Linearizable).await,
        "doc list",
    );
    denied(
        stranger
            .blob_stat(blob.hash, Consistency::Linearizable)
            .await,
        "blob stat",
    );
    denied(
        stranger
            .blob_list(None, 10, Consistency::Linearizable)
            .await,
        "blob list",
    );
    denied(stranger.blob_tag("mine", blob.hash).await, "blob tag");
    denied(stranger.blob_untag("private/blob").await, "blob untag");
    denied(stranger.blob_stats().await, "blob stats");
    denied(
        stranger.blob_add_file(&file, Some("mine"), |_| {}).await,
        "blob add",
    );
    denied(stranger.ns_create().await, "ns create");
    denied(
        stranger.ns_set(ns, b"k".to_vec(), b"x".to_vec()).await,
        "ns set",
    );
    denied(stranger.ns_get(ns, b"k".to_vec()).await, "ns get");
    denied(stranger.ns_list(ns, vec![], 10).await, "ns list");
    denied(stranger.ns_namespaces().await, "ns namespaces");
    denied(stranger.ns_share(ns, false).await, "ns share");
    denied(stranger.ns_import("garbage").await, "ns import");
    denied(
        stranger
            .auth_grant(stranger_key, vec!["admin".into()], vec![])
            .await,
        "grant",
    );
    denied(
        stranger
            .auth_revoke(admin_key(), vec![], vec![], true)
            .await,
        "revoke",
    );
    denied(
        stranger
            .role_create("r".into(), vec!["kv:read:*".into()])
            .await,
        "role create",
    );
    denied(stranger.auth_list().await, "auth list");
    // Requests that carry their own proof refuse a wrong one.
    denied(stranger.recover_admin([0; 32]).await, "recover");
    let init = raw_request(
        &nodes[0],
        stranger_secret,
        &ClientRequest::Cluster(ClusterRequest::Init {
            name: String::new(),
            secret: [0; 32],
        }),
    )
    .await;
    assert!(
        matches!(
            init,
            ClientResponse::Error(RpcError::PermissionDenied { .. })
        ),
        "{init:?}"
    );
    // An invitation is only usable by the node it admits: not for someone else's ticket.
    let join = raw_request(
        &nodes[0],
        stranger_secret,
        &ClientRequest::Cluster(ClusterRequest::Join {
            node: nodes[1].ticket.clone(),
            invite: [1; 32],
        }),
    )
    .await;
    assert!(
        matches!(&join, ClientResponse::Error(RpcError::BadRequest(m)) if m.contains("joining node itself")),
        "{join:?}"
    );
    // What anyone may ask: who it is, and the cluster's public identity.
    let me = stranger.whoami().await.unwrap();
    assert_eq!(me.key, stranger_key);
    assert!(!me.member && me.roles.is_empty() && me.permissions.is_empty());
    stranger.identity().await.unwrap();

    // Raft: a stranger's frame gets no answer (the connection is closed unread).
    for n in &nodes {
        let reply = raw_exchange_as(
            n,
            b"aspen/raft/2",
            b"\x00\x00\x00\x01\x04",
            Some(stranger_secret),
        )
        .await;
        assert!(reply.is_empty(), "raft answered a stranger: {reply:?}");
    }
    // iroh-blobs: a fetch of a known hash by a stranger fails, even from a holder.
    let ep = aspen_client::endpoint::offline_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        Some(iroh::SecretKey::from_bytes(&stranger_secret)),
        vec![],
    )
    .await
    .unwrap();
    let store = iroh_blobs::store::mem::MemStore::new();
    for n in &nodes {
        let addr = n.addr();
        let fetched = async {
            let conn = ep
                .connect(addr, iroh_blobs::ALPN)
                .await
                .map_err(|e| e.to_string())?;
            store
                .remote()
                .fetch(conn, iroh_blobs::Hash::from_bytes(blob.hash))
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        assert!(fetched.is_err(), "a stranger fetched the blob");
        // iroh-docs and iroh-gossip: refused right after the handshake.
        for alpn in [iroh_docs::ALPN, iroh_gossip::ALPN] {
            let addr = n.addr();
            let refused = match ep.connect(addr, alpn).await {
                Err(_) => true,
                Ok(conn) => {
                    // The handshake may finish before the node's hook closes it.
                    tokio::time::timeout(Duration::from_secs(10), conn.closed())
                        .await
                        .is_ok()
                }
            };
            assert!(
                refused,
                "{} accepted a stranger",
                String::from_utf8_lossy(alpn)
            );
        }
    }
    let got = store
        .blobs()
        .status(iroh_blobs::Hash::from_bytes(blob.hash))
        .await
        .map(|s| matches!(s, iroh_blobs::api::proto::BlobStatus::Complete { .. }))
        .unwrap_or(false);
    assert!(!got, "the stranger's store holds the blob");
    ep.close().await;
    stranger.close().await;

    // The node keeps serving the admin.
    admin.put(b"after".to_vec(), b"ok".to_vec()).await.unwrap();
    assert_eq!(
        admin.get(b"after".to_vec()).await.unwrap().unwrap().value,
        b"ok"
    );
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_roles_and_tokens_allow_exactly_what_they_say() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 3, &[]).await;
    let ticket = aspen_client::ClusterTicket {
        members: nodes.iter().map(|n| n.ticket.clone()).collect(),
    };
    let admin = client_for(&nodes.iter().collect::<Vec<_>>()).await;
    admin.put(b"app/a".to_vec(), b"1".to_vec()).await.unwrap();
    admin.put(b"other".to_vec(), b"2".to_vec()).await.unwrap();
    let connect = |options: ClientOptions| {
        let ticket = ticket.clone();
        async move { Client::connect_with(ticket, options).await.unwrap() }
    };

    // readonly: reads, never writes.
    let (ro_secret, ro_key) = fresh();
    admin
        .auth_grant(ro_key, vec!["readonly".into()], vec![])
        .await
        .unwrap();
    let ro = connect(options_as(ro_secret)).await;
    assert_eq!(
        ro.get(b"other".to_vec()).await.unwrap().unwrap().value,
        b"2"
    );
    let needed = denied(
        ro.put(b"app/x".to_vec(), b"1".to_vec()).await,
        "readonly put",
    );
    assert!(needed.contains("kv:write"), "{needed}");
    ro.status().await.unwrap();

    // A custom role and a single permission, then revoked.
    let (w_secret, w_key) = fresh();
    admin
        .role_create("app-writer".into(), vec!["kv:write:app/".into()])
        .await
        .unwrap();
    admin
        .auth_grant(w_key, vec!["app-writer".into()], vec!["doc:read:*".into()])
        .await
        .unwrap();
    let w = connect(options_as(w_secret)).await;
    w.put(b"app/w".to_vec(), b"1".to_vec()).await.unwrap();
    denied(
        w.put(b"other".to_vec(), b"1".to_vec()).await,
        "outside the role",
    );
    // A nested transaction is checked node by node: a write outside the role anywhere in the
    // tree refuses the whole of it, and nothing is written; inside, it runs.
    let needed = denied(
        w.write(nested_puts(b"app/n1", b"other")).await,
        "a nested write outside the role",
    );
    assert!(needed.contains("kv:write:other"), "{needed}");
    assert!(admin.get(b"app/n1".to_vec()).await.unwrap().is_none());
    w.write(nested_puts(b"app/n1", b"app/n2")).await.unwrap();
    assert!(admin.get(b"app/n2".to_vec()).await.unwrap().is_some());
    let listing = admin.auth_list().await.unwrap();
    assert!(listing.roles.iter().any(|r| r.name == "app-writer"));
    assert!(listing
        .grants
        .iter()
        .any(|g| g.key == w_key && g.roles == ["app-writer"]));
    admin
        .auth_revoke(w_key, vec!["app-writer".into()], vec![], false)
        .await
        .unwrap();
    // In force on every member (each applies it): try each one alone.
    for n in &nodes {
        let only = Client::connect_node(n.ticket.clone(), options_as(w_secret))
            .await
            .unwrap();
        wait_until("the revocation to reach the member", || async {
            matches!(
                only.put(b"app/w".to_vec(), b"2".to_vec()).await,
                Err(ClientError::Rpc(RpcError::PermissionDenied { .. }))
            )
            .then_some(())
        })
        .await;
        only.close().await;
    }

    // Tokens: the readonly key hands kv:read:app/ to a key with no grant of its own.
    let ro_key_file = NodeKey::from_secret_bytes(&ro_secret);
    let (t_secret, t_key) = fresh();
    let token = CapabilityToken::issue(
        &ro_key_file,
        t_key,
        perms(&["kv:read:app/"]),
        now() - 10,
        now() + 3600,
        rand::random(),
    )
    .unwrap();
    let with_token = |token: &CapabilityToken, secret: [u8; 32]| ClientOptions {
        token: Some(token.encode()),
        ..options_as(secret)
    };
    let t = connect(with_token(&token, t_secret)).await;
    assert_eq!(t.get(b"app/a".to_vec()).await.unwrap().unwrap().value, b"1");
    let mut range = RangeRequest::prefix(b"app/".to_vec());
    range.limit = 10;
    assert_eq!(
        t.range(range, Consistency::Linearizable)
            .await
            .unwrap()
            .kvs
            .len(),
        4,
        "app/a, app/w and the nested transaction's app/n1, app/n2"
    );
    // Nothing outside app/: a get, a range whose end leaves the prefix, a transaction
    // comparing a key outside it, a write, a delete-range.
    denied(t.get(b"other".to_vec()).await, "token get outside");
    denied(
        t.range(
            RangeRequest {
                start: b"app/".to_vec(),
                end: Some(b"apq".to_vec()),
                limit: 0,
                revision: 0,
            },
            Consistency::Linearizable,
        )
        .await,
        "token range past the prefix",
    );
    denied(
        t.txn(Txn::compare_and_swap(
            b"other".to_vec(),
            None,
            b"x".to_vec(),
        ))
        .await,
        "token txn",
    );
    denied(t.put(b"app/a".to_vec(), b"9".to_vec()).await, "token write");
    // Comparisons over a key range read the whole range: within the prefix it is answered,
    // past it refused; a nested transaction's write is refused to a read-only token.
    t.write(range_compare(b"app/", b"app0")).await.unwrap();
    denied(
        t.write(range_compare(b"app/", b"apq")).await,
        "token range comparison past the prefix",
    );
    denied(
        t.write(WriteOp::TxnTree(TxnTree {
            nodes: vec![
                Txn {
                    compare: vec![version_is_zero(b"app/a")],
                    success: vec![],
                    failure: vec![TxnOp::Nested(1)],
                },
                Txn {
                    compare: vec![],
                    success: vec![put_op(b"app/z")],
                    failure: vec![],
                },
            ],
            ranges: vec![],
        }))
        .await,
        "token nested write",
    );
    denied(
        t.delete_range(b"app/".to_vec(), Some(b"app0".to_vec()), false)
            .await,
        "token delete range",
    );
    let me = t.whoami().await.unwrap();
    assert_eq!(me.token.as_ref().unwrap().root_issuer, ro_key);

    // Refused tokens: each connection presents it first, so the first request fails.
    let refused = |r: Result<Option<aspen_kv::api::KeyValue>, ClientError>, what: &str| match r {
        Err(ClientError::Rpc(RpcError::Token(why))) => why,
        other => panic!("{what}: expected a refused token, got {other:?}"),
    };
    let expired = CapabilityToken::issue(
        &ro_key_file,
        t_key,
        perms(&["kv:read:app/"]),
        now() - 100,
        now() - 50,
        rand::random(),
    )
    .unwrap();
    let why = refused(
        connect(with_token(&expired, t_secret))
            .await
            .get(b"app/a".to_vec())
            .await,
        "expired",
    );
    assert!(why.contains("expired"), "{why}");
    let future = CapabilityToken::issue(
        &ro_key_file,
        t_key,
        perms(&["kv:read:app/"]),
        now() + 3600,
        now() + 7200,
        rand::random(),
    )
    .unwrap();
    refused(
        connect(with_token(&future, t_secret))
            .await
            .get(b"app/a".to_vec())
            .await,
        "not yet valid",
    );
    // Forged: one byte of the signature flipped.
    let mut forged = token.encode();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let forged_options = ClientOptions {
        token: Some(forged),
        ..options_as(t_secret)
    };
    assert!(matches!(
        connect(forged_options).await.get(b"app/a".to_vec()).await,
        Err(ClientError::Rpc(RpcError::Token(_)))
    ));
    // Wrong audience: the token is for t, presented by someone else.
    let (x_secret, x_key) = fresh();
    let why = refused(
        connect(with_token(&token, x_secret))
            .await
            .get(b"app/a".to_vec())
            .await,
        "wrong audience",
    );
    assert!(why.contains("another key"), "{why}");
    // Delegation narrows; it cannot widen (the SDK refuses to sign that; a hand-made chain is
    // refused by the node), and chains are bounded.
    let t_key_file = NodeKey::from_secret_bytes(&t_secret);
    let narrower = token
        .delegate(
            &t_key_file,
            x_key,
            perms(&["kv:read:app/a"]),
            now() - 5,
            now() + 60,
            rand::random(),
        )
        .unwrap();
    let x = connect(with_token(&narrower, x_secret)).await;
    assert_eq!(x.get(b"app/a".to_vec()).await.unwrap().unwrap().value, b"1");
    denied(x.get(b"app/w".to_vec()).await, "delegated outside");
    assert!(token
        .delegate(
            &t_key_file,
            x_key,
            perms(&["kv:read:*"]),
            now() - 5,
            now() + 60,
            rand::random()
        )
        .is_err());
    let mut deep = token.clone();
    let mut holder = t_key_file.clone();
    let mut deep_err = None;
    for _ in 0..aspen_trust::MAX_CHAIN_LEN {
        let next = NodeKey::generate();
        match deep.delegate(
            &holder,
            next.public(),
            perms(&["kv:read:app/"]),
            now() - 5,
            now() + 60,
            rand::random(),
        ) {
            Ok(d) => {
                deep = d;
                holder = next;
            }
            Err(e) => {
                deep_err = Some(e);
                break;
            }
        }
    }
    assert!(deep_err.is_some(), "chains are bounded");
    // The root issuer's own grant bounds the token now: a token from a key without a grant
    // gives nothing.
    let nobody = NodeKey::generate();
    let empty = CapabilityToken::issue(
        &nobody,
        t_key,
        perms(&["kv:read:*"]),
        now() - 5,
        now() + 60,
        rand::random(),
    )
    .unwrap();
    denied(
        connect(with_token(&empty, t_secret))
            .await
            .get(b"app/a".to_vec())
            .await,
        "ungranted issuer",
    );

    // Revocation by the issuer reaches every member without a restart, and revoking the
    // parent revokes its delegations.
    let ro_admin = connect(options_as(ro_secret)).await;
    ro_admin.token_revoke(token.encode()).await.unwrap();
    for n in &nodes {
        for (tok, secret) in [(&token, t_secret), (&narrower, x_secret)] {
            wait_until("the revocation to reach the member", || async {
                let c = Client::connect_node(n.ticket.clone(), with_token(tok, secret))
                    .await
                    .unwrap();
                let r = c.get(b"app/a".to_vec()).await;
                c.close().await;
                matches!(r, Err(ClientError::Rpc(RpcError::Token(_)))).then_some(())
            })
            .await;
        }
    }
    // Someone neither admin nor issuer cannot revoke a token.
    let other_token = CapabilityToken::issue(
        &ro_key_file,
        x_key,
        perms(&["kv:read:app/"]),
        now() - 5,
        now() + 60,
        rand::random(),
    )
    .unwrap();
    denied(
        connect(options_as(t_secret))
            .await
            .token_revoke(other_token.encode())
            .await,
        "revoke someone else's token",
    );
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uninitialized_node_cannot_be_captured_and_admin_can_be_recovered() {
    let root = tempfile::tempdir().unwrap();
    let lone = NodeProc::start(&root.path().join("lone"), &[]);
    let (secret, key) = fresh();
    // A stranger's cluster tries to adopt the node: no bootstrap secret, no admission.
    let theirs = form(&root.path().join("theirs"), 1, &[]).await;
    let their_admin = client_for(&[&theirs[0]]).await;
    let r = their_admin.add_member(lone.ticket.clone(), [0; 32]).await;
    assert!(
        matches!(&r, Err(ClientError::Rpc(RpcError::Membership(m))) if m.contains("refused")),
        "{r:?}"
    );
    // Raft traffic from an unintroduced caller is not served.
    let reply = raw_exchange_as(
        &lone,
        b"aspen/raft/2",
        b"\x00\x00\x00\x01\x04",
        Some(secret),
    )
    .await;
    let response: Option<Vec<u8>> = (!reply.is_empty()).then_some(reply);
    if let Some(r) = response {
        // postcard tag 7 = NotIntroduced
        assert_eq!(r[4], 7, "{r:?}");
    }
    // Init without the secret fails; with it, the caller becomes the first admin.
    let c = Client::connect_node(lone.ticket.clone(), options_as(secret))
        .await
        .unwrap();
    denied(
        c.init_cluster(String::new(), [9; 32]).await,
        "init with a wrong secret",
    );
    c.init_cluster(String::new(), bootstrap_secret(&lone.dir))
        .await
        .unwrap();
    assert_eq!(c.whoami().await.unwrap().roles, ["admin"]);
    c.put(b"k".to_vec(), b"v".to_vec()).await.unwrap();
    // The admin key is lost: whoever reads the member's data directory recovers.
    let (new_secret, new_key) = fresh();
    let r = Client::connect_node(lone.ticket.clone(), options_as(new_secret))
        .await
        .unwrap();
    denied(r.get(b"k".to_vec()).await, "before recovery");
    r.recover_admin(bootstrap_secret(&lone.dir)).await.unwrap();
    assert_eq!(r.get(b"k".to_vec()).await.unwrap().unwrap().value, b"v");
    assert_eq!(r.whoami().await.unwrap().key, new_key);
    assert_ne!(key, new_key);
    // The stranger's cluster still has not got it.
    let s = r.status().await.unwrap();
    assert_eq!(s.members.len(), 1);
    their_admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_identity_whoami_grant_and_token_flow() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, &[]).await;
    let cluster = aspen_client::ClusterTicket {
        members: vec![nodes[0].ticket.clone()],
    }
    .to_string();
    // A new user: its identity file is created 0600 on first use.
    let user_file = root.path().join("cfg/aspen/identity.key");
    let user = user_file.to_str().unwrap();
    let who = cli(&["auth", "whoami", "--identity", user, "-o", "json"], None);
    assert!(who.status.success(), "{}", stderr(&who));
    let v: serde_json::Value = serde_json::from_str(&stdout(&who)).unwrap();
    let key = v["key"].as_str().unwrap().to_string();
    assert_eq!(key.len(), 64);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&user_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // The same key next time; the default location follows XDG_CONFIG_HOME.
    let again = cli(&["auth", "whoami", "--identity", user], None);
    assert_eq!(stdout(&again).trim(), key);
    let xdg = std::process::Command::new(aspen_bin())
        .args(["auth", "whoami"])
        .env_remove("ASPEN_IDENTITY")
        .env("XDG_CONFIG_HOME", root.path().join("cfg"))
        .output()
        .unwrap();
    assert_eq!(stdout(&xdg).trim(), key, "{}", stderr(&xdg));

    // No grant: refused with the missing permission named.
    let put = cli(
        &["kv", "put", "app/x", "1", "--identity", user],
        Some(&cluster),
    );
    assert!(!put.status.success());
    assert!(
        stderr(&put).contains("permission denied") && stderr(&put).contains("kv:write:app/x"),
        "{}",
        stderr(&put)
    );
    // The admin grants a permission; then it works.
    let grant = cli(
        &["auth", "grant", &key, "kv:write:app/", "readonly"],
        Some(&cluster),
    );
    assert!(grant.status.success(), "{}", stderr(&grant));
    let put = cli(
        &["kv", "put", "app/x", "1", "--identity", user],
        Some(&cluster),
    );
    assert!(put.status.success(), "{}", stderr(&put));
    // Plain whoami is just the key (for scripts), also with a cluster; -o json adds the grant.
    let who = cli(&["auth", "whoami", "--identity", user], Some(&cluster));
    assert_eq!(stdout(&who).trim(), key);
    let who = cli(
        &["auth", "whoami", "--identity", user, "-o", "json"],
        Some(&cluster),
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(&who)).unwrap();
    assert_eq!(v["roles"], serde_json::json!(["readonly"]), "{v}");
    assert_eq!(
        v["permissions"],
        serde_json::json!(["kv:write:app/"]),
        "{v}"
    );
    let list = cli(&["auth", "list", "-o", "json"], Some(&cluster));
    assert!(stdout(&list).contains(&key), "{}", stdout(&list));
    // A token from the user to a third key, used with --token.
    let third = root.path().join("third.key");
    let third_key = stdout(&cli(
        &["auth", "whoami", "--identity", third.to_str().unwrap()],
        None,
    ))
    .trim()
    .to_string();
    let issued = cli(
        &[
            "auth",
            "token",
            "issue",
            "--to",
            &third_key,
            "--allow",
            "kv:read:app/",
            "--ttl",
            "1h",
            "--identity",
            user,
        ],
        None,
    );
    assert!(issued.status.success(), "{}", stderr(&issued));
    let token = stdout(&issued).trim().to_string();
    let get = cli(
        &[
            "kv",
            "get",
            "app/x",
            "--identity",
            third.to_str().unwrap(),
            "--token",
            &token,
        ],
        Some(&cluster),
    );
    assert!(get.status.success(), "{}", stderr(&get));
    assert_eq!(stdout(&get).trim(), "1");
    let get = cli(
        &[
            "kv",
            "put",
            "app/x",
            "2",
            "--identity",
            third.to_str().unwrap(),
            "--token",
            &token,
        ],
        Some(&cluster),
    );
    assert!(!get.status.success());
    // A token the user cannot issue: wider than it can check locally is signed, but useless.
    let revoke = cli(
        &["auth", "token", "revoke", &token, "--identity", user],
        Some(&cluster),
    );
    assert!(revoke.status.success(), "{}", stderr(&revoke));
    let get = cli(
        &[
            "kv",
            "get",
            "app/x",
            "--identity",
            third.to_str().unwrap(),
            "--token",
            &token,
        ],
        Some(&cluster),
    );
    assert!(stderr(&get).contains("token refused"), "{}", stderr(&get));
    // Bad input: a malformed key, permission and ttl are one-line errors.
    for args in [
        vec!["auth", "grant", "nothex", "readonly"],
        vec!["auth", "grant", &key, "kv:fly:*"],
        vec![
            "auth",
            "token",
            "issue",
            "--to",
            &third_key,
            "--allow",
            "kv:read:*",
            "--ttl",
            "5y",
        ],
    ] {
        let out = cli(&args, Some(&cluster));
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
    }
}

/// Many callers that each open a connection, declare a maximum-size frame and send nothing:
/// the node's memory grows by far less than the frames declared, and it keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_callers_declaring_huge_frames_stay_cheap() {
    const CALLERS: usize = 500;
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, &[]).await;
    let node = &nodes[0];
    let pid = node.pid().unwrap();
    // Resident memory, and address space (a buffer of the declared size, even untouched,
    // would show there).
    let mem = |field: &str| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let rss = || mem("VmRSS:");
    let before = rss();
    let vm_before = mem("VmSize:");
    // A node takes at most MAX_CONNECTIONS_PER_KEY client connections per key: the callers
    // come from 10 keys (keys are free; what a connection costs does not depend on its key).
    let mut endpoints = Vec::new();
    for _ in 0..10 {
        endpoints.push(
            aspen_client::endpoint::offline_endpoint("127.0.0.1:0".parse().unwrap(), None, vec![])
                .await
                .unwrap(),
        );
    }
    let ep = endpoints[0].clone();
    let mut held = Vec::new();
    let header = (aspen_client::protocol::MAX_CLIENT_FRAME as u32).to_be_bytes();
    for i in 0..CALLERS {
        let addr = node.addr();
        let conn = endpoints[i % endpoints.len()]
            .connect(addr, CLIENT_ALPN)
            .await
            .unwrap();
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&header).await.unwrap();
        held.push((conn, send, recv));
    }
    // Strangers on every other protocol: refused at the handshake (iroh's protocols) or
    // closed unread (Raft); whatever stays open is held too.
    let mut others = Vec::new();
    for alpn in [
        b"aspen/raft/2".as_slice(),
        iroh_blobs::ALPN,
        iroh_docs::ALPN,
        iroh_gossip::ALPN,
    ] {
        for _ in 0..CALLERS / 5 {
            let addr = node.addr();
            if let Ok(conn) = ep.connect(addr, alpn).await {
                if let Ok((mut send, recv)) = conn.open_bi().await {
                    let _ = send.write_all(&header).await;
                    others.push((conn, send, recv));
                }
            }
        }
    }
    // The node still answers a real client promptly.
    let admin = client_of(node).await;
    admin.put(b"alive".to_vec(), b"yes".to_vec()).await.unwrap();
    let after = rss();
    let growth = after.saturating_sub(before);
    let vm_growth = mem("VmSize:").saturating_sub(vm_before);
    eprintln!(
        "{CALLERS} idle client callers declaring {} MiB frames, and {} strangers on each other \
         protocol: node RSS {} -> {} MiB (+{} MiB), address space +{} MiB",
        aspen_client::protocol::MAX_CLIENT_FRAME >> 20,
        CALLERS / 5,
        before >> 20,
        after >> 20,
        growth >> 20,
        vm_growth >> 20
    );
    assert!(growth < 100 << 20, "node grew by {} MiB", growth >> 20);
    // Allocating the declared sizes would reserve 500 x 64 MiB.
    assert!(
        vm_growth < 2 << 30,
        "address space grew by {} MiB",
        vm_growth >> 20
    );
    admin.close().await;
    drop(held);
    drop(others);
    for ep in endpoints {
        ep.close().await;
    }
}

/// Asks `WhoAmI` (open to anyone) on `conn`; the error if the connection is refused.
async fn whoami_on(conn: &iroh::endpoint::Connection) -> Result<ClientResponse, String> {
    let frame =
        aspen_client::wire::encode_frame(&ClientRequest::Auth(AuthRequest::WhoAmI), usize::MAX)
            .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(&frame).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let reply = recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())?;
    aspen_client::wire::decode_body(&reply[4..]).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_holds_a_bounded_number_of_connections() {
    use aspen_node::server::{CLOSE_TOO_MANY_CONNECTIONS, MAX_CONNECTIONS_PER_KEY};
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, &[]).await;
    let node = &nodes[0];
    let addr = || node.addr();
    let ep = aspen_client::endpoint::offline_endpoint("127.0.0.1:0".parse().unwrap(), None, vec![])
        .await
        .unwrap();
    let mut conns = Vec::new();
    for _ in 0..MAX_CONNECTIONS_PER_KEY + 1 {
        conns.push(ep.connect(addr(), CLIENT_ALPN).await.unwrap());
    }
    // Exactly one of them is over the limit: the node closes it with its own code.
    let mut answered = Vec::new();
    let mut refused = 0;
    for conn in conns {
        match whoami_on(&conn).await {
            Ok(ClientResponse::Auth(_)) => answered.push(conn),
            Ok(other) => panic!("unexpected answer {other:?}"),
            Err(_) => {
                let reason = conn.closed().await;
                assert!(
                    matches!(&reason, iroh::endpoint::ConnectionError::ApplicationClosed(c)
                        if c.error_code == CLOSE_TOO_MANY_CONNECTIONS.into()),
                    "{reason:?}"
                );
                refused += 1;
            }
        }
    }
    assert_eq!((answered.len(), refused), (MAX_CONNECTIONS_PER_KEY, 1));
    // Another key is not affected.
    let other = client_of(node).await;
    other.put(b"k".to_vec(), b"v".to_vec()).await.unwrap();
    other.close().await;
    // A closed connection gives its slot back.
    answered.pop().unwrap().close(0u32.into(), b"done");
    wait_until("a slot to come back", || async {
        let conn = ep.connect(addr(), CLIENT_ALPN).await.ok()?;
        let ok = matches!(whoami_on(&conn).await, Ok(ClientResponse::Auth(_)));
        ok.then_some(conn)
    })
    .await;
    drop(answered);
    ep.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iroh_docs_reader_syncs_only_the_namespaces_it_may_read() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, &[]).await;
    let node = &nodes[0];
    let admin = client_of(node).await;
    let mine = admin.ns_create().await.unwrap();
    let other = admin.ns_create().await.unwrap();
    for ns in [mine, other] {
        admin
            .ns_set(ns, b"k".to_vec(), b"v".to_vec())
            .await
            .unwrap();
    }
    let (reader, reader_key) = fresh();
    admin
        .auth_grant(
            reader_key,
            vec![],
            vec![format!("ns:read:{}", hex::encode(mine))],
        )
        .await
        .unwrap();
    // The granted namespace: its entry arrives.
    let got = docs_sync_as(node, reader, mine).await.unwrap();
    assert!(got.outcome.num_recv >= 1, "{got:?}");
    // Another namespace on the same node, whose id the reader knows: refused after the Init
    // message (iroh-docs' client reports the node's abort as the stream closing under it, or
    // as the abort itself), before any entry.
    use iroh_docs::net::{AbortReason, ConnectError};
    match docs_sync_as(node, reader, other).await {
        Err(ConnectError::RemoteAbort(AbortReason::NotFound) | ConnectError::Close { .. }) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Control: with a grant on it, the same request succeeds.
    admin
        .auth_grant(
            reader_key,
            vec![],
            vec![format!("ns:read:{}", hex::encode(other))],
        )
        .await
        .unwrap();
    let got = docs_sync_as(node, reader, other).await.unwrap();
    assert!(got.outcome.num_recv >= 1, "{got:?}");
    admin.close().await;
}

/// A 3-node cluster holding `k` = `v`, reduced to one member: the leader (`keep_leader`) or a
/// follower; the other two are killed. Returns the nodes, the kept one's index, and where it
/// serves metrics.
async fn one_member_left(
    root: &std::path::Path,
    keep_leader: bool,
) -> (Vec<NodeProc>, usize, std::net::SocketAddr) {
    let mut nodes = form(root, 3, &["--metrics", "127.0.0.1:0"]).await;
    let client = client_for(&nodes.iter().collect::<Vec<_>>()).await;
    client.put(b"k".to_vec(), b"v".to_vec()).await.unwrap();
    let leader = leader_named_by(&client).await;
    client.close().await;
    let keep = nodes
        .iter()
        .position(|n| (n.node_id() == leader) == keep_leader)
        .unwrap();
    let kept = client_of(&nodes[keep]).await;
    let metrics = crate::metrics::metrics_addr(&kept).await;
    kept.close().await;
    for (i, node) in nodes.iter_mut().enumerate() {
        if i != keep {
            node.kill9();
        }
    }
    (nodes, keep, metrics)
}

/// A linearizable read of `k`, as a stranger sends it.
fn stranger_read() -> ClientRequest {
    ClientRequest::Kv(aspen_client::KvRequest::Range {
        request: RangeRequest::key(b"k".to_vec()),
        consistency: Consistency::Linearizable,
    })
}

/// A stranger's answer: denied, or the denial could not be confirmed with a leader; never
/// served.
fn assert_refused(answer: &ClientResponse) {
    assert!(
        matches!(
            answer,
            ClientResponse::Error(RpcError::PermissionDenied { .. })
        ) || matches!(answer, ClientResponse::Error(RpcError::Unavailable(m))
                if m.contains("cannot confirm the access policy")),
        "{answer:?}"
    );
}

/// During an election a request waits for the new leader (up to 3 s), a stranger's denial
/// too (a member's grant may not be replayed yet after a restart), but at most
/// `MAX_STRANGER_ELECTION_WAITS` denials wait at once node-wide: a flood of strangers against
/// a node whose cluster cannot elect a leader holds a bounded number of tasks, is refused,
/// and costs the node little; a member's read still waits and is served after the election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_waiting_for_an_election_are_bounded() {
    use aspen_node::server::cluster::MAX_STRANGER_ELECTION_WAITS;
    use futures::StreamExt;
    let root = tempfile::tempdir().unwrap();
    // One follower left: its cluster cannot elect a leader.
    let (mut nodes, keep, metrics) = one_member_left(root.path(), false).await;
    let kept = client_of(&nodes[keep]).await;
    wait_until("the kept follower to know no leader", || async {
        let status = kept.status().await.ok()?;
        status.leader.is_none().then_some(())
    })
    .await;
    let series = |name: &str| crate::metrics::get(&crate::metrics::scrape(metrics, None), name);
    let waits_before = series("aspen_election_waits_total");
    let pid = nodes[keep].pid().unwrap();
    let (rss_before, cpu_before) = (rss(pid), process_cpu_ms(pid));
    // Twice as many strangers at once as may wait, each on its own key.
    let (strangers, at_once) = (256, 2 * MAX_STRANGER_ELECTION_WAITS);
    let get = stranger_read();
    let kept_node = &nodes[keep];
    let flood = futures::stream::iter(0..strangers)
        .map(|_| raw_request(kept_node, fresh().0, &get))
        .buffer_unordered(at_once)
        .collect::<Vec<ClientResponse>>();
    let mut flood = Box::pin(flood);
    let mut most_waiting = 0.0f64;
    let answers = loop {
        tokio::select! {
            answers = &mut flood => break answers,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                let waiting = tokio::task::spawn_blocking(move || {
                    crate::metrics::get(&crate::metrics::scrape(metrics, None), "aspen_election_waiting")
                })
                .await
                .unwrap();
                most_waiting = most_waiting.max(waiting);
            }
        }
    };
    drop(flood);
    answers.iter().for_each(assert_refused);
    let waited = series("aspen_election_waits_total") - waits_before;
    let growth = rss(pid).saturating_sub(rss_before);
    eprintln!(
        "{strangers} strangers, {at_once} at once, during an election: {waited} waited, at most \
         {most_waiting} at a time seen; node RSS +{} KiB, CPU {} ms",
        growth >> 10,
        process_cpu_ms(pid) - cpu_before
    );
    // The first arrivals found free slots; nobody past the bound waited.
    assert!(waited >= MAX_STRANGER_ELECTION_WAITS as f64, "{waited}");
    assert!(
        most_waiting <= MAX_STRANGER_ELECTION_WAITS as f64,
        "{most_waiting}"
    );
    assert!(growth < 64 << 20, "the node grew by {} MiB", growth >> 20);
    // A member's client waits too: its read is served once the cluster is back.
    let waits_after = series("aspen_election_waits_total");
    let read = tokio::spawn(async move {
        let got = kept.get(b"k".to_vec()).await;
        kept.close().await;
        got
    });
    wait_until("the member's read to wait for the election", || async {
        (series("aspen_election_waits_total") > waits_after).then_some(())
    })
    .await;
    for (i, node) in nodes.iter_mut().enumerate() {
        if i != keep {
            node.restart(None);
        }
    }
    let got = read
        .await
        .unwrap()
        .expect("the member's read after the election");
    assert_eq!(got.map(|kv| kv.value), Some(b"v".to_vec()));
}

/// The other side of an election: a leader that lost its quorum. A stranger's denial asks it
/// for a read index, which openraft refuses once no quorum has answered within the leader's
/// lease; so a flood of strangers is refused (none waits for an election: a leader is known),
/// within bounded time and memory, and the node serves members again once the quorum is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_at_a_leader_without_a_quorum_are_refused() {
    use futures::StreamExt;
    let root = tempfile::tempdir().unwrap();
    let (mut nodes, keep, metrics) = one_member_left(root.path(), true).await;
    let series = |name: &str| crate::metrics::get(&crate::metrics::scrape(metrics, None), name);
    let waits_before = series("aspen_election_waits_total");
    let pid = nodes[keep].pid().unwrap();
    let (rss_before, cpu_before) = (rss(pid), process_cpu_ms(pid));
    let started = std::time::Instant::now();
    let (strangers, at_once) = (256, 128);
    let get = stranger_read();
    let kept_node = &nodes[keep];
    let answers: Vec<ClientResponse> = tokio::time::timeout(
        Duration::from_secs(120),
        futures::stream::iter(0..strangers)
            .map(|_| raw_request(kept_node, fresh().0, &get))
            .buffer_unordered(at_once)
            .collect(),
    )
    .await
    .expect("every stranger answered");
    answers.iter().for_each(assert_refused);
    let growth = rss(pid).saturating_sub(rss_before);
    eprintln!(
        "{strangers} strangers, {at_once} at once, at a leader without a quorum: answered in \
         {:?}; node RSS +{} KiB, CPU {} ms",
        started.elapsed(),
        growth >> 10,
        process_cpu_ms(pid) - cpu_before
    );
    assert!(growth < 64 << 20, "the node grew by {} MiB", growth >> 20);
    assert_eq!(
        series("aspen_election_waits_total"),
        waits_before,
        "a leader is known: nobody waits for an election"
    );
    for (i, node) in nodes.iter_mut().enumerate() {
        if i != keep {
            node.restart(None);
        }
    }
    let member = client_for(&nodes.iter().collect::<Vec<_>>()).await;
    let got = member.get(b"k".to_vec()).await.unwrap();
    assert_eq!(got.map(|kv| kv.value), Some(b"v".to_vec()));
    member.close().await;
}

/// A member whose copy of the blob index lags (restarted while the rest of its cluster is
/// frozen, after a tag was made without it) must not refuse a reader whose right to a blob
/// comes through that tag: a blob named by hash is refused only once the member has caught up
/// with a leader, and while it cannot, it says so (retryable), not "permission denied". Once
/// the cluster is back, the same member serves the same request. (Before the fix, the
/// catch-up covered the policy's own checks but not the blob index's, and a restarted member
/// refused an admin's `blob get` in the blob test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_member_confirms_a_blob_denial_with_a_leader() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = form(root.path(), 3, &[]).await;
    let admin = client_for(&nodes.iter().collect::<Vec<_>>()).await;
    let (secret, key) = fresh();
    admin
        .auth_grant(key, vec![], vec!["blob:read:pics/*".into()])
        .await
        .unwrap();
    // A follower lags: no election follows its loss, so the upload below never waits for one.
    let leader = leader_named_by(&admin).await;
    admin.close().await;
    let lagging = nodes.iter().position(|n| n.node_id() != leader).unwrap();
    let others: Vec<usize> = (0..nodes.len()).filter(|i| *i != lagging).collect();
    nodes[lagging].kill9();
    // Uploaded through the other two only (an upload streams its body: it is not retried on
    // another member, so it must not pick the dead one).
    let admin = client_for(&others.iter().map(|i| &nodes[*i]).collect::<Vec<_>>()).await;
    let file = root.path().join("cat.bin");
    std::fs::write(&file, b"a cat, tagged while the third member was down").unwrap();
    let added = admin
        .blob_add_file(&file, Some("pics/cat"), |_| {})
        .await
        .unwrap();
    admin.close().await;

    // The other two frozen: the restarted member cannot learn of the tag, nor reach a leader.
    for i in &others {
        nodes[*i].pause();
    }
    nodes[lagging].restart(None);
    let stat = ClientRequest::Blob(aspen_client::BlobRequest::Stat {
        hash: added.hash,
        consistency: Consistency::Serializable,
    });
    let answer = raw_request(&nodes[lagging], secret, &stat).await;
    assert!(
        matches!(&answer, ClientResponse::Error(RpcError::Unavailable(m))
            if m.contains("cannot confirm the access policy")),
        "a member that cannot reach a leader must not deny on its own: {answer:?}"
    );

    for i in &others {
        nodes[*i].resume();
    }
    wait_until_or_dump(
        "the caught-up member to serve the tag's reader",
        &nodes,
        || {
            let stat = stat.clone();
            let node = &nodes[lagging];
            async move {
                match raw_request(node, secret, &stat).await {
                    ClientResponse::Blob(aspen_client::BlobResponse::Info(info)) => Some(info),
                    ClientResponse::Error(RpcError::Unavailable(_)) => None,
                    other => panic!("expected the blob's info or 'retry', got {other:?}"),
                }
            }
        },
    )
    .await;
    // A key with no grant is still refused there, now that it has caught up.
    let (stranger, _) = fresh();
    let refused = raw_request(&nodes[lagging], stranger, &stat).await;
    assert!(
        matches!(
            refused,
            ClientResponse::Error(RpcError::PermissionDenied { .. })
        ),
        "{refused:?}"
    );
}
