//! Blobs in a cluster of real `aspen` processes: a 256 MiB blob added on one node reaches
//! the replicas verified, a corrupted copy on a peer is detected and fetched again from a
//! good holder, garbage collection removes only unreferenced blobs and only after the grace
//! period, and bad input gets typed errors.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;
use aspen_blobs::{hash_hex, BlobError, BlobHash};
use aspen_client::protocol::{BlobRequest, ClientRequest, ClientResponse, RpcError, CLIENT_ALPN};
use aspen_client::{Client, ClientError, ClusterTicket, Consistency};

pub(crate) const MIB: u64 = 1 << 20;

/// Writes `size` bytes of seeded pseudo-random data and returns their BLAKE3 hash.
pub(crate) fn write_random(path: &Path, size: u64, seed: u64) -> BlobHash {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut hasher = blake3::Hasher::new();
    let mut state = seed | 1;
    let mut buf = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        for word in buf.chunks_mut(8) {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let v = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            word.copy_from_slice(&v[..word.len()]);
        }
        let n = left.min(MIB) as usize;
        file.write_all(&buf[..n]).unwrap();
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    file.flush().unwrap();
    *hasher.finalize().as_bytes()
}

pub(crate) fn hash_file(path: &Path) -> BlobHash {
    let mut hasher = blake3::Hasher::new();
    let mut file = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    *hasher.finalize().as_bytes()
}

/// Where a node's store keeps the bytes of a (large, not inlined) blob.
fn data_file(node: &NodeProc, hash: &BlobHash) -> PathBuf {
    node.dir
        .join("blobs")
        .join("data")
        .join(format!("{}.data", hash_hex(hash)))
}

fn one_node_ticket(node: &NodeProc) -> String {
    ClusterTicket {
        members: vec![node.ticket.clone()],
    }
    .to_string()
}

/// Waits until `node`'s own view says it holds `hash` completely and is recorded as holder.
async fn wait_held(node: &NodeProc, hash: BlobHash, what: &str) {
    let client = client_of(node).await;
    wait_until(what, || async {
        let info = client
            .blob_stat(hash, Consistency::Serializable)
            .await
            .ok()?;
        (info.local && info.holders.contains(&node.node_id())).then_some(())
    })
    .await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_blob_reaches_the_replicas_verified_and_corrupt_data_is_fetched_again() {
    let mut root = tempfile::tempdir().unwrap();
    root.disable_cleanup(std::env::var_os("ASPEN_KEEP_TEST_DIR").is_some());
    // The second member lies: every blob it sends has one byte flipped.
    let mut nodes = [
        NodeProc::start(&root.path().join("n0"), &[]),
        NodeProc::start(
            &root.path().join("n1"),
            &["--unsafe-test-fault", "corrupt-blob-sends"],
        ),
        NodeProc::start(&root.path().join("n2"), &[]),
    ];
    let first = client_of(&nodes[0]).await;
    first
        .init_cluster(String::new(), bootstrap_secret(&nodes[0].dir))
        .await
        .unwrap();
    for n in &nodes[1..] {
        first
            .add_member(n.ticket.clone(), bootstrap_secret(&n.dir))
            .await
            .unwrap();
    }
    first.close().await;
    // The third member is down while the blob is added and first replicated.
    nodes[2].kill9();

    let file = root.path().join("big.bin");
    let size = 256 * MIB;
    let expected = write_random(&file, size, 7);
    let out = cli(
        &[
            "blob",
            "add",
            file.to_str().unwrap(),
            "--tag",
            "big",
            "-o",
            "json",
        ],
        Some(&one_node_ticket(&nodes[0])),
    );
    assert!(out.status.success(), "blob add: {}", stderr(&out));
    let added: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(added["hash"], hash_hex(&expected));
    assert_eq!(added["size"], size);
    assert_eq!(
        added["node"],
        format!("{:016x}", nodes[0].node_id()),
        "the contacted node stored it"
    );

    // The second member fetches it from the first, verified.
    wait_held(&nodes[1], expected, "the second member to hold the blob").await;
    assert_eq!(hash_file(&data_file(&nodes[1], &expected)), expected);

    // Now only the lying member can serve it. The third member comes back and fetches: the
    // corrupt chunk is detected and nothing corrupt is recorded.
    nodes[0].kill9();
    nodes[2].restart(None);
    let third = client_of(&nodes[2]).await;
    wait_until_or_dump(
        "the third member to detect the corrupt data",
        &nodes,
        || async {
            let stats = third.blob_stats().await.ok()?;
            (stats.verify_failures >= 1).then_some(())
        },
    )
    .await;
    let info = third
        .blob_stat(expected, Consistency::Serializable)
        .await
        .unwrap();
    assert!(
        !info.local && !info.holders.contains(&nodes[2].node_id()),
        "corrupt data must not be recorded as a replica: {info:?}"
    );
    // An honest holder returns; the third member fetches what it is missing from it.
    nodes[0].restart(None);
    wait_held(
        &nodes[2],
        expected,
        "the third member to hold a verified copy",
    )
    .await;
    assert_eq!(hash_file(&data_file(&nodes[2], &expected)), expected);
    let stats = third.blob_stats().await.unwrap();
    assert_eq!(stats.fetched, 1, "{stats:?}");
    assert!(
        stats.fetched_bytes < size + size / 4,
        "the verified part before each corrupt byte was kept (starting over would cost \
         at least 1.5x the size): {stats:?}"
    );
    third.close().await;

    // A download through the CLI is verified too: whichever holder it tries first, the bytes
    // written are exactly the blob.
    let got = root.path().join("got.bin");
    let cluster = nodes[0].cluster_ticket().unwrap().to_string();
    let out = cli(
        &[
            "blob",
            "get",
            &hash_hex(&expected),
            "-o",
            got.to_str().unwrap(),
            "--json",
        ],
        Some(&cluster),
    );
    assert!(out.status.success(), "blob get: {}", stderr(&out));
    assert_eq!(hash_file(&got), expected);
    let listed = cli(&["blob", "list", "-o", "json"], Some(&cluster));
    let listed: serde_json::Value = serde_json::from_str(&stdout(&listed)).unwrap();
    assert_eq!(listed["tags"][0]["tag"], "big");
    assert_eq!(listed["tags"][0]["replicas"], 3);
}

async fn add_bytes(client: &Client, dir: &Path, name: &str, tag: Option<&str>) -> BlobHash {
    let path = dir.join(name);
    let expected = write_random(&path, 3 * MIB, name.len() as u64 + 11);
    let added = client.blob_add_file(&path, tag, |_| {}).await.unwrap();
    assert_eq!(added.hash, expected);
    expected
}

/// Whether any node's store still has `hash`.
async fn anywhere(clients: &[Client], hash: BlobHash) -> bool {
    for c in clients {
        if c.blob_stat(hash, Consistency::Serializable)
            .await
            .unwrap()
            .local
        {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_collection_takes_only_unreferenced_blobs_and_only_after_the_grace() {
    const GRACE: Duration = Duration::from_secs(6);
    let root = tempfile::tempdir().unwrap();
    let nodes = form(
        root.path(),
        3,
        &["--blob-gc-grace-secs", "6", "--blob-gc-interval-secs", "1"],
    )
    .await;
    let refs: Vec<&NodeProc> = nodes.iter().collect();
    let client = client_for(&refs).await;
    let mut each = Vec::new();
    for n in &nodes {
        each.push(client_of(n).await);
    }

    let kept = add_bytes(&client, root.path(), "kept", Some("kept")).await;
    let dropped = add_bytes(&client, root.path(), "dropped", Some("dropped")).await;
    for n in &nodes {
        wait_held(n, kept, "every member to hold the kept blob").await;
        wait_held(n, dropped, "every member to hold the soon-untagged blob").await;
    }
    let untagged_at = Instant::now();
    let orphan = add_bytes(&client, root.path(), "orphan", None).await;
    client.blob_untag("dropped").await.unwrap();
    let untagged_at = untagged_at.min(Instant::now());

    // Within the grace period nothing may be deleted (checked only while the grace holds).
    let still = anywhere(&each, dropped).await && anywhere(&each, orphan).await;
    if untagged_at.elapsed() < GRACE {
        assert!(still, "deleted within the grace period");
    }
    // After it, both unreferenced blobs are gone everywhere, records included.
    wait_until("unreferenced blobs to be collected", || async {
        (!anywhere(&each, dropped).await && !anywhere(&each, orphan).await).then_some(())
    })
    .await;
    assert!(
        untagged_at.elapsed() >= GRACE,
        "collected after {:?}, before the grace period ended",
        untagged_at.elapsed()
    );
    wait_until("the collected blobs' replica records to go", || async {
        let a = client
            .blob_stat(dropped, Consistency::Linearizable)
            .await
            .ok()?;
        let b = client
            .blob_stat(orphan, Consistency::Linearizable)
            .await
            .ok()?;
        (a.holders.is_empty() && b.holders.is_empty()).then_some(())
    })
    .await;
    // The referenced blob is untouched on every member.
    for (n, c) in nodes.iter().zip(&each) {
        let info = c.blob_stat(kept, Consistency::Serializable).await.unwrap();
        assert!(info.local, "kept blob missing on {:016x}", n.node_id());
    }
    let mut deleted = 0;
    for c in &each {
        deleted += c.blob_stats().await.unwrap().gc_deleted;
    }
    assert!(deleted >= 4, "gc_deleted over the members: {deleted}");
    // A collected blob cannot be tagged again: nobody holds it.
    match client.blob_tag("again", dropped).await {
        Err(ClientError::Rpc(RpcError::Blob(BlobError::NotFound(_)))) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
    for c in each {
        c.close().await;
    }
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_blob_input_gets_typed_errors() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, &[]).await;
    let node = &nodes[0];
    let client = client_of(node).await;
    let cluster = one_node_ticket(node);

    // A bad hash on the command line.
    let out = cli(&["blob", "get", "xyz", "-o", "/dev/null"], Some(&cluster));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid blob hash"),
        "{}",
        stderr(&out)
    );
    let out = cli(&["blob", "stat", &"0".repeat(63)], Some(&cluster));
    assert!(
        stderr(&out).contains("invalid blob hash"),
        "{}",
        stderr(&out)
    );
    // Unknown blob and tag.
    match client.blob_tag("t", [9; 32]).await {
        Err(ClientError::Rpc(RpcError::Blob(BlobError::NotFound(_)))) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
    match client.blob_untag("nope").await {
        Err(ClientError::Rpc(RpcError::Blob(BlobError::TagNotFound(_)))) => {}
        other => panic!("expected TagNotFound, got {other:?}"),
    }
    let out = cli(
        &["blob", "get", &hash_hex(&[9; 32]), "-o", "/dev/null"],
        Some(&cluster),
    );
    assert!(
        stderr(&out).contains("no member holds blob"),
        "{}",
        stderr(&out)
    );
    // Bad tag names, refused by the SDK and by the node.
    assert!(matches!(
        client.blob_untag("").await,
        Err(ClientError::Blob(BlobError::BadTagName { .. }))
    ));
    let raw = |request: &ClientRequest, body: &[u8]| {
        let mut bytes =
            aspen_client::wire::encode_frame(request, aspen_client::protocol::MAX_CLIENT_FRAME)
                .unwrap();
        bytes.extend_from_slice(body);
        bytes
    };
    let answer = |bytes: Vec<u8>| -> ClientResponse {
        aspen_client::wire::decode_body(&bytes[4..]).unwrap()
    };
    let bad_tag = ClientRequest::Blob(BlobRequest::Add {
        size: 1,
        tag: Some("a\u{7}".into()),
    });
    assert!(matches!(
        answer(raw_exchange(node, CLIENT_ALPN, &raw(&bad_tag, b"x")).await),
        ClientResponse::Error(RpcError::Blob(BlobError::BadTagName { .. }))
    ));
    // An upload announcing more than the limit, fewer bytes than announced, or more.
    let huge = ClientRequest::Blob(BlobRequest::Add {
        size: aspen_blobs::limits::MAX_BLOB_BYTES + 1,
        tag: None,
    });
    assert!(matches!(
        answer(raw_exchange(node, CLIENT_ALPN, &raw(&huge, b"")).await),
        ClientResponse::Error(RpcError::Blob(BlobError::TooLarge { .. }))
    ));
    let short = ClientRequest::Blob(BlobRequest::Add {
        size: 100,
        tag: Some("short".into()),
    });
    assert!(matches!(
        answer(raw_exchange(node, CLIENT_ALPN, &raw(&short, &[1; 10])).await),
        ClientResponse::Error(RpcError::Blob(BlobError::Truncated {
            expected: 100,
            got: 10
        }))
    ));
    let long = ClientRequest::Blob(BlobRequest::Add {
        size: 10,
        tag: Some("long".into()),
    });
    assert!(matches!(
        answer(raw_exchange(node, CLIENT_ALPN, &raw(&long, &[1; 100])).await),
        ClientResponse::Error(RpcError::Blob(BlobError::TooLong { expected: 10 }))
    ));
    // Nothing was tagged by the refused uploads, and the node still serves.
    let (tags, _) = client
        .blob_list(None, 10, Consistency::Linearizable)
        .await
        .unwrap();
    assert!(tags.is_empty(), "{tags:?}");
    let hash = add_bytes(&client, root.path(), "ok", Some("ok")).await;
    let info = client
        .blob_stat(hash, Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(info.tags, vec!["ok".to_string()]);
    assert_eq!(info.size, Some(3 * MIB));
    client.close().await;
}
