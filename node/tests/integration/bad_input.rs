//! Bad input from users and the network: typed errors, no panic, the node keeps serving.

use crate::common::*;
use aspen_client::protocol::{
    ClientRequest, ClientResponse, ClusterRequest, KvRequest, RpcError, CLIENT_ALPN,
};
use aspen_client::{Client, ClientError, ClusterTicket};
use aspen_kv::api::{Command, LimitError, WriteOp};
use aspen_kv::limits::{MAX_KEY_BYTES, MAX_VALUE_BYTES};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_typed_errors_and_the_node_keeps_serving() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, &[]).await;
    let node = &nodes[0];
    let client = client_for(&[node]).await;
    let cluster = ClusterTicket {
        members: vec![node.ticket.clone()],
    }
    .to_string();

    // Oversized key and value: refused by the SDK before sending...
    let big_key = vec![b'k'; MAX_KEY_BYTES + 1];
    assert!(matches!(
        client.put(big_key.clone(), vec![]).await,
        Err(ClientError::Limit(LimitError::KeyTooLarge { .. }))
    ));
    let big_value = vec![0u8; MAX_VALUE_BYTES + 1];
    assert!(matches!(
        client.put(b"k".to_vec(), big_value).await,
        Err(ClientError::Limit(LimitError::ValueTooLarge { .. }))
    ));
    // ...and by the node when a client does not check.
    let request = ClientRequest::Kv(KvRequest::Write {
        commands: vec![Command {
            session: None,
            op: WriteOp::Put {
                key: big_key.clone(),
                value: vec![],
                prev_kv: false,
            },
        }],
    });
    let frame = aspen_client::wire::encode_frame(&request, usize::MAX).unwrap();
    let reply = raw_exchange(node, CLIENT_ALPN, &frame).await;
    let response: ClientResponse = aspen_client::wire::decode_body(&reply[4..]).unwrap();
    assert!(
        matches!(
            response,
            ClientResponse::Error(RpcError::Limit(LimitError::KeyTooLarge { .. }))
        ),
        "{response:?}"
    );
    // The CLI says so in one line.
    let key = "k".repeat(MAX_KEY_BYTES + 1);
    let out = cli(&["kv", "put", &key, "v"], Some(&cluster));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("key is {} bytes", MAX_KEY_BYTES + 1)),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));

    // Garbage and oversized frames on each protocol.
    let reply = raw_exchange(node, CLIENT_ALPN, b"\x00\x00\x00\x05hello").await;
    let response: ClientResponse = aspen_client::wire::decode_body(&reply[4..]).unwrap();
    assert!(
        matches!(response, ClientResponse::Error(RpcError::BadRequest(_))),
        "{response:?}"
    );
    let reply = raw_exchange(node, CLIENT_ALPN, &u32::MAX.to_be_bytes()).await;
    let response: ClientResponse = aspen_client::wire::decode_body(&reply[4..]).unwrap();
    assert!(
        matches!(&response, ClientResponse::Error(RpcError::BadRequest(m)) if m.contains("exceeds")),
        "{response:?}"
    );
    let _ = raw_exchange(node, b"aspen/raft/2", b"\xff\xff\xff\xff garbage").await;
    let _ = raw_exchange(node, b"aspen/raft/2", b"\x00\x00\x00\x02\x07\x07").await;
    let _ = raw_exchange(node, CLIENT_ALPN, b"").await;

    // Malformed tickets and node ids.
    let out = cli(&["kv", "get", "x"], Some("aspencluster1notbase32!!"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid cluster ticket"),
        "{}",
        stderr(&out)
    );
    let out = cli(&["kv", "get", "x"], None);
    assert!(stderr(&out).contains("ASPEN_CLUSTER"), "{}", stderr(&out));
    let out = cli(&["cluster", "init", "aspennode1aaaa"], None);
    assert!(
        stderr(&out).contains("invalid node ticket"),
        "{}",
        stderr(&out)
    );
    let out = cli(&["cluster", "remove", "not-hex"], Some(&cluster));
    assert!(stderr(&out).contains("not hex"), "{}", stderr(&out));

    // A node with more addresses than a ticket may hold is refused (raw request: the SDK's
    // ticket parser would already refuse it).
    let crowded = aspen_client::NodeTicket {
        endpoint_id: *iroh::SecretKey::generate().public().as_bytes(),
        addrs: (0..=aspen_client::ticket::MAX_ADDRS_PER_NODE as u16)
            .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], 20000 + p)))
            .collect(),
    };
    let frame = aspen_client::wire::encode_frame(
        &ClientRequest::Cluster(ClusterRequest::Admit {
            node: crowded,
            secret: [0; 32],
        }),
        usize::MAX,
    )
    .unwrap();
    let reply = raw_exchange(node, CLIENT_ALPN, &frame).await;
    let response: ClientResponse = aspen_client::wire::decode_body(&reply[4..]).unwrap();
    assert!(
        matches!(&response, ClientResponse::Error(RpcError::BadRequest(m)) if m.contains("addresses")),
        "{response:?}"
    );

    // Fault injection is refused unless the node was started for fault tests.
    let refused = client
        .set_net_faults(aspen_client::NetFaults {
            isolate_from: vec![1],
            ..Default::default()
        })
        .await;
    assert!(
        matches!(&refused, Err(aspen_client::ClientError::Rpc(RpcError::BadRequest(m))) if m.contains("not enabled")),
        "{refused:?}"
    );

    let out_of_range = client
        .set_net_faults(aspen_client::NetFaults {
            drop_per_mille: 2000,
            ..Default::default()
        })
        .await;
    assert!(
        matches!(&out_of_range, Err(aspen_client::ClientError::Rpc(RpcError::BadRequest(m))) if m.contains("at most 1000")),
        "{out_of_range:?}"
    );

    // The system key space (the cluster secret) cannot be written by a client.
    let request = ClientRequest::Kv(KvRequest::Write {
        commands: vec![Command {
            session: None,
            op: WriteOp::System(aspen_kv::api::SystemWrite {
                key: aspen_node::server::identity::SECRET_KEY.to_vec(),
                expect: None,
                new: Some(vec![0; 32]),
            }),
        }],
    });
    let frame = aspen_client::wire::encode_frame(&request, usize::MAX).unwrap();
    let reply = raw_exchange(node, CLIENT_ALPN, &frame).await;
    let response: ClientResponse = aspen_client::wire::decode_body(&reply[4..]).unwrap();
    assert!(
        matches!(&response, ClientResponse::Error(RpcError::BadRequest(m)) if m.contains("system key space")),
        "{response:?}"
    );
    // Invitations: validity bounded; joins need a real invitation.
    for secs in [0, 8 * 24 * 3600] {
        let r = client
            .create_invite(std::time::Duration::from_secs(secs))
            .await;
        assert!(
            matches!(&r, Err(ClientError::Rpc(RpcError::BadRequest(m))) if m.contains("valid for")),
            "{r:?}"
        );
    }
    let stranger = aspen_client::NodeTicket {
        endpoint_id: iroh::SecretKey::from_bytes(&[9; 32])
            .public()
            .as_bytes()
            .to_owned(),
        addrs: vec!["127.0.0.1:9".parse().unwrap()],
    };
    // (An invitation is used by the joining node itself: the caller's key is the ticket's.)
    let joiner = Client::connect_node(node.ticket.clone(), options_as([9; 32]))
        .await
        .unwrap();
    let r = joiner.join(stranger, [0; 32]).await;
    joiner.close().await;
    assert!(
        matches!(&r, Err(ClientError::Rpc(RpcError::BadRequest(m))) if m.contains("unknown invitation")),
        "{r:?}"
    );
    assert_eq!(client.status().await.unwrap().members.len(), 1);
    // Cluster keys on the command line.
    for (args, expect) in [
        (&["discover", "abc"][..], "invalid cluster key"),
        (&["kv", "get", "x", "--cluster", "zz"], "neither a ticket"),
    ] {
        let out = cli(args, None);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(expect), "{args:?}: {}", stderr(&out));
        assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
    }

    // Still serving.
    client
        .put(b"still".to_vec(), b"alive".to_vec())
        .await
        .unwrap();
    assert_eq!(
        client.get(b"still".to_vec()).await.unwrap().unwrap().value,
        b"alive"
    );
    assert!(!node.log().contains("panicked"), "{}", node.log());
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_cluster_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProc::start(&root.path().join("gone"), &[]);
    let cluster = ClusterTicket {
        members: vec![node.ticket.clone()],
    }
    .to_string();
    node.kill9();
    let out = cli(&["kv", "get", "x", "--timeout", "2"], Some(&cluster));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cluster unreachable"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
}

#[test]
fn help_explains_every_command() {
    for args in [
        &["--help"][..],
        &["kv", "--help"],
        &["cluster", "--help"],
        &["node", "run", "--help"],
        &["up", "--help"],
        &["bench", "put", "--help"],
        &["discover", "--help"],
        &["cluster", "identity", "--help"],
        &["cluster", "invite", "--help"],
        &["doc", "--help"],
        &["blob", "--help"],
        &["blob", "add", "--help"],
        &["blob", "get", "--help"],
    ] {
        let out = cli(args, None);
        assert!(out.status.success(), "{args:?}");
        assert!(stdout(&out).contains("Usage"), "{args:?}");
    }
}

/// Output into a closed pipe (`aspen ... | head`) ends the command as SIGPIPE ends other
/// Unix tools: no panic, no backtrace.
#[cfg(unix)]
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(aspen_bin())
        .args(["bench", "quic", "--size-mib", "1", "--runs", "1"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}: {err}",
        out.status
    );
}
