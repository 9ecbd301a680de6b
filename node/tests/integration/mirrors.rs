//! Mirrors: a cluster that follows a resource serves it onward while the origin is offline,
//! and readers verify every byte against the origin's key. Four one-node clusters on a local
//! DHT testnet: A (the origin), B and D (mirrors), C (a reader).

use aspen_client::protocol::Resource;
use aspen_client::{Client, Consistency, ViaMirror};

use crate::common::*;
use crate::federation::{
    cluster_key, edit, fed_args, fed_args_every, follows_of, refs, sorted_heads, wait_for_heads,
};

/// A's current heads of `name`.
async fn heads_of(client: &Client, name: &str) -> Vec<automerge::ChangeHash> {
    sorted_heads(
        &client
            .doc_get(name, Consistency::Linearizable)
            .await
            .unwrap(),
    )
}

/// Pulls now on `client`'s cluster until its copy `name` has `heads` (its own interval is
/// long: only these syncs pull), then waits, without forcing more pulls, until the pull
/// that brought them has finished and recorded the manifest: the copy lands a moment before,
/// and a cluster killed in between would restart without it.
async fn sync_until(
    client: &Client,
    nodes: &[NodeProc],
    name: &str,
    heads: &[automerge::ChangeHash],
) {
    wait_until_or_dump(&format!("{name} to arrive"), nodes, || async {
        let _ = client.fed_sync(None, None).await;
        let doc = client.doc_get(name, Consistency::Linearizable).await.ok()?;
        (sorted_heads(&doc) == heads).then_some(())
    })
    .await;
    wait_until_or_dump(&format!("the pull of {name} to finish"), nodes, || async {
        let follows = client.fed_follows().await.ok()?;
        let follow = follows.iter().find(|f| f.into == name)?;
        (follow.last_success_ms > 0 && follow.last_success_ms >= follow.last_attempt_ms)
            .then_some(())
    })
    .await;
}

/// The first follow's status (JSON, through the CLI) once a pull of it has succeeded: a
/// pull's data lands a moment before the pull records how it went.
async fn settled_follow(ticket: &str, nodes: &[NodeProc]) -> serde_json::Value {
    wait_until_or_dump("the follow's pull to be recorded", nodes, || async {
        let follow = follows_of(ticket).remove(0);
        (follow["last_success_ms"].as_u64() > Some(0)).then_some(follow)
    })
    .await
}

/// The mirror report of `mirror` in a follow's status (JSON).
fn report<'a>(follow: &'a serde_json::Value, mirror: &[u8; 32]) -> &'a serde_json::Value {
    follow["mirrors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["cluster"] == hex::encode(mirror))
        .unwrap_or_else(|| panic!("no report of mirror {}: {follow}", hex::encode(mirror)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_serve_the_origins_data_while_it_is_offline_and_liars_are_refused() {
    let (_testnet, bootstrap) = testnet();
    let root = tempfile::tempdir().unwrap();
    let fast = fed_args(&bootstrap);
    // B and C pull only when told to (a 10-minute interval).
    let slow = fed_args_every(&bootstrap, 600_000);
    let mut a = form(&root.path().join("a"), 1, &refs(&fast)).await;
    let mut b = form(&root.path().join("b"), 1, &refs(&slow)).await;
    let mut c = form(&root.path().join("c"), 1, &refs(&slow)).await;
    let mut d = form(&root.path().join("d"), 1, &refs(&fast)).await;
    let a_client = client_of(&a[0]).await;
    let mut b_client = client_of(&b[0]).await;
    let mut c_client = client_of(&c[0]).await;
    let d_client = client_of(&d[0]).await;
    let a_key = cluster_key(&a_client).await;
    let b_key = cluster_key(&b_client).await;
    let c_key = cluster_key(&c_client).await;
    let d_key = cluster_key(&d_client).await;
    let (b_ticket, c_ticket) = (ticket_text(&b), ticket_text(&c));
    let plans = Resource::doc("plans");
    let local = format!("fed/{}/plans", &hex::encode(a_key)[..16]);

    a_client.doc_create("plans").await.unwrap();
    edit(&a_client, "plans", "one", 20).await;
    a_client
        .fed_export(plans.clone(), vec![b_key, c_key, d_key], false)
        .await
        .unwrap();

    // B and D follow A and mirror their copies to C (B through the CLI). A cluster mirrors
    // only what it follows.
    let a_hex = hex::encode(a_key);
    let c_hex = hex::encode(c_key);
    let out = cli(
        &["fed", "mirror", &a_hex, "doc", "plans", "--to", &c_hex],
        Some(&b_ticket),
    );
    assert!(!out.status.success(), "mirroring an unfollowed resource");
    assert!(stderr(&out).contains("is not followed"), "{}", stderr(&out));
    let out = cli(&["fed", "follow", &a_hex, "doc", "plans"], Some(&b_ticket));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(
        &["fed", "mirror", &a_hex, "doc", "plans", "--to", &c_hex],
        Some(&b_ticket),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&["fed", "mirrors", "-o", "json"], Some(&b_ticket));
    let mirrors: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(mirrors["mirrors"][0]["origin"], a_hex.as_str(), "{mirrors}");
    assert_eq!(mirrors["mirrors"][0]["to"][0], c_hex.as_str(), "{mirrors}");
    d_client
        .fed_follow(a_key, plans.clone(), None, vec![])
        .await
        .unwrap();
    d_client
        .fed_mirror(a_key, plans.clone(), vec![c_key], false)
        .await
        .unwrap();
    let one = heads_of(&a_client, "plans").await;
    sync_until(&b_client, &b, &local, &one).await;
    wait_for_heads(&d[0], &d, &local, &one).await;

    // C follows A naming B as a mirror, and pulls from A while A is up.
    let out = cli(
        &[
            "fed",
            "follow",
            &a_hex,
            "doc",
            "plans",
            "--via",
            &hex::encode(b_key),
        ],
        Some(&c_ticket),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    sync_until(&c_client, &c, &local, &one).await;
    // A moves on while B is down (B stays behind): C and D pull it. Then C goes down too,
    // and A moves on again: only D has the latest when A goes offline.
    b_client.close().await;
    b[0].kill9();
    edit(&a_client, "plans", "two", 5).await;
    let two = heads_of(&a_client, "plans").await;
    sync_until(&c_client, &c, &local, &two).await;
    c_client.close().await;
    c[0].kill9();
    edit(&a_client, "plans", "three", 5).await;
    let three = heads_of(&a_client, "plans").await;
    wait_for_heads(&d[0], &d, &local, &three).await;

    // A goes offline; B and C come back. C's next pulls: A unreachable; B (named) serves an
    // older manifest than C holds: refused; D (found through the DHT directory, C was never
    // told of it) serves A's latest, verified against A's key.
    a_client.close().await;
    a[0].kill9();
    b[0].restart(None);
    c[0].restart(None);
    b_client = client_of(&b[0]).await;
    c_client = client_of(&c[0]).await;
    sync_until(&c_client, &c, &local, &three).await;
    let follow = &settled_follow(&c_ticket, &c).await;
    assert_eq!(follow["last_source"], hex::encode(d_key), "{follow}");
    let stale = report(follow, &b_key);
    assert_eq!(stale["ok"], false, "{follow}");
    assert!(
        stale["detail"]
            .as_str()
            .unwrap()
            .contains("older than the accepted seq"),
        "{follow}"
    );
    assert_eq!(report(follow, &d_key)["ok"], true, "{follow}");

    // Default deny: B mirrors to C only. D, which also lost A, finds B on the DHT and asks
    // it: refused, with the same answer as for a resource B does not mirror at all.
    let d_ticket = ticket_text(&d);
    let refusal = wait_until_or_dump("D to be refused by B", &d, || async {
        let follows = follows_of(&d_ticket);
        let report = follows[0]["mirrors"]
            .as_array()?
            .iter()
            .find(|m| m["cluster"] == hex::encode(b_key))?
            .clone();
        Some(report)
    })
    .await;
    assert_eq!(refusal["ok"], false, "{refusal}");
    assert!(
        refusal["detail"].as_str().unwrap().contains(&format!(
            "is not exported to cluster {}",
            hex::encode(d_key)
        )),
        "{refusal}"
    );

    // Mirrors chain: D mirrors to B too, and B, whose origin is gone, catches up from D
    // (A -> D -> B). (Until now nothing could serve B: it had to stay stale.)
    d_client
        .fed_mirror(a_key, plans.clone(), vec![b_key], false)
        .await
        .unwrap();
    sync_until(&b_client, &b, &local, &three).await;
    let follow = &settled_follow(&b_ticket, &b).await;
    assert_eq!(follow["last_source"], hex::encode(d_key), "{follow}");

    // D lies, one way at a time. Each round C follows into a fresh copy naming D first: C
    // refuses D's answer, says why, commits nothing of it, and gets A's data from B instead.
    for (fault, expected) in [
        ("fed-flip-byte", "not an acceptable saved document"),
        ("fed-wrong-key", "signature is not the origin's"),
    ] {
        let mut lying = refs(&fast);
        lying.extend(["--unsafe-test-fault", fault]);
        d[0].restart(Some(&lying));
        let into = format!("round-{fault}");
        c_client.fed_unfollow(a_key, plans.clone()).await.unwrap();
        c_client
            .fed_follow_via(
                a_key,
                plans.clone(),
                Some(into.clone()),
                vec![],
                vec![ViaMirror {
                    cluster: d_key,
                    nodes: vec![d[0].ticket.clone()],
                }],
            )
            .await
            .unwrap();
        sync_until(&c_client, &c, &into, &three).await;
        // Refollowing starts the follow's status afresh. A later pull (a sync, an
        // announcement) asks B first, as D failed: D's refusal stays on record.
        let follow = settled_follow(&c_ticket, &c).await;
        assert_eq!(
            follow["last_source"],
            hex::encode(b_key),
            "{fault}: {follow}"
        );
        let liar = report(&follow, &d_key);
        assert_eq!(liar["ok"], false, "{fault}: {follow}");
        assert!(
            liar["detail"].as_str().unwrap().contains(expected),
            "{fault}: {follow}"
        );
    }
    for client in [b_client, c_client, d_client] {
        client.close().await;
    }
}

/// A followed blob prefix, mirrored: C gets A's blobs from B while A is offline (each
/// verified against its hash; B's gate admits C's node for them), and refuses a tag list B
/// tampered with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirrored_blob_prefix_is_served_verified_while_the_origin_is_offline() {
    let root = tempfile::tempdir().unwrap();
    let args = ["--fed-pull-interval-ms", "300"];
    let mut a = form(&root.path().join("a"), 1, &args).await;
    let mut b = form(&root.path().join("b"), 1, &args).await;
    let c = form(&root.path().join("c"), 1, &args).await;
    let a_client = client_of(&a[0]).await;
    let b_client = client_of(&b[0]).await;
    let c_client = client_of(&c[0]).await;
    let (a_key, b_key, c_key) = (
        cluster_key(&a_client).await,
        cluster_key(&b_client).await,
        cluster_key(&c_client).await,
    );
    let site = Resource::blob("site/");
    let mut hashes = Vec::new();
    for (tag, bytes) in [
        ("site/a", vec![1u8; 300_000]),
        ("site/b", b"hello".to_vec()),
    ] {
        let path = root.path().join(tag.replace('/', "_"));
        std::fs::write(&path, &bytes).unwrap();
        let added = a_client
            .blob_add_file(&path, Some(tag), |_| {})
            .await
            .unwrap();
        hashes.push((tag, added.hash, bytes));
    }
    a_client
        .fed_export(site.clone(), vec![b_key, c_key], false)
        .await
        .unwrap();
    a_client.close().await;
    b_client
        .fed_follow(a_key, site.clone(), None, vec![a[0].ticket.clone()])
        .await
        .unwrap();
    b_client
        .fed_mirror(a_key, site.clone(), vec![c_key], false)
        .await
        .unwrap();
    wait_until_or_dump("B to pull A's tags", &b, || async {
        let f = b_client.fed_follows().await.ok()?.remove(0);
        (f.seq >= 1 && f.last_error.is_none()).then_some(())
    })
    .await;

    // A goes offline; C follows A naming B, and gets every blob from B.
    a[0].kill9();
    let (a_ticket, b_ticket) = (a[0].ticket.clone(), b[0].ticket.clone());
    let via = |into: Option<&str>| {
        c_client.fed_follow_via(
            a_key,
            site.clone(),
            into.map(str::to_string),
            vec![a_ticket.clone()],
            vec![ViaMirror {
                cluster: b_key,
                nodes: vec![b_ticket.clone()],
            }],
        )
    };
    via(None).await.unwrap();
    let local = format!("fed/{}/", &hex::encode(a_key)[..16]);
    // C's tags under `prefix` (listed after `prefix`: tags sort by name).
    let tags_on_c = |prefix: String| {
        let c_client = c_client.clone();
        async move {
            let (tags, _) = c_client
                .blob_list(Some(prefix.clone()), 1000, Consistency::Linearizable)
                .await
                .ok()?;
            Some(
                tags.into_iter()
                    .filter(|t| t.tag.starts_with(&prefix))
                    .map(|t| (t.tag, t.hash))
                    .collect::<Vec<_>>(),
            )
        }
    };
    let want: Vec<(String, [u8; 32])> = hashes
        .iter()
        .map(|(tag, hash, _)| (format!("{local}{tag}"), *hash))
        .collect();
    wait_until_or_dump("A's blobs to reach C through B", &b, || async {
        let _ = c_client.fed_sync(None, None).await;
        (tags_on_c(local.clone()).await? == want).then_some(())
    })
    .await;
    for (_, hash, bytes) in &hashes {
        let out = root.path().join(format!("out-{}", hex::encode(&hash[..4])));
        c_client
            .blob_get_to_file(*hash, &out, |_, _| {})
            .await
            .unwrap();
        assert_eq!(&std::fs::read(&out).unwrap(), bytes);
    }
    let follow = wait_until_or_dump("C's pull to be recorded", &b, || async {
        let follow = c_client.fed_follows().await.ok()?.remove(0);
        (follow.last_success_ms > 0).then_some(follow)
    })
    .await;
    assert_eq!(follow.last_source, Some(b_key), "{follow:?}");

    // B tampers with the tag list: C refuses it and tags nothing.
    b[0].restart(Some(
        &[&args[..], &["--unsafe-test-fault", "fed-flip-byte"]].concat(),
    ));
    c_client.fed_unfollow(a_key, site.clone()).await.unwrap();
    via(Some("round/")).await.unwrap();
    let detail = wait_until_or_dump("C to refuse B's tampered list", &b, || async {
        let _ = c_client.fed_sync(None, None).await;
        let follow = c_client.fed_follows().await.ok()?.remove(0);
        let report = follow.mirrors.iter().find(|m| m.cluster == b_key)?;
        (!report.ok).then(|| report.detail.clone())
    })
    .await;
    assert!(
        detail.contains("does not match the signed manifest"),
        "{detail}"
    );
    assert_eq!(tags_on_c("round/".into()).await.unwrap(), vec![]);
    for client in [b_client, c_client] {
        client.close().await;
    }
}

/// A followed iroh-docs namespace, mirrored: C gets A's entries and their content from B
/// while A is offline (iroh-docs checks each entry's signatures, and C checks the whole
/// state against A's signed digest); D, to which B does not mirror, is refused and hosts
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirrored_namespace_is_served_while_the_origin_is_offline() {
    let root = tempfile::tempdir().unwrap();
    let args = ["--fed-pull-interval-ms", "300"];
    let mut a = form(&root.path().join("a"), 1, &args).await;
    let b = form(&root.path().join("b"), 1, &args).await;
    let c = form(&root.path().join("c"), 1, &args).await;
    let d = form(&root.path().join("d"), 1, &args).await;
    let a_client = client_of(&a[0]).await;
    let b_client = client_of(&b[0]).await;
    let c_client = client_of(&c[0]).await;
    let d_client = client_of(&d[0]).await;
    let (a_key, b_key) = (cluster_key(&a_client).await, cluster_key(&b_client).await);
    let (c_key, d_key) = (cluster_key(&c_client).await, cluster_key(&d_client).await);
    let id = a_client.ns_create().await.unwrap();
    let entries: &[(&[u8], Vec<u8>)] = &[(b"k1", b"one".to_vec()), (b"k2", vec![7; 100_000])];
    for (key, value) in entries {
        a_client
            .ns_set(id, key.to_vec(), value.clone())
            .await
            .unwrap();
    }
    let ns = Resource::ns(&id);
    a_client
        .fed_export(ns.clone(), vec![b_key, c_key, d_key], false)
        .await
        .unwrap();
    b_client
        .fed_follow(a_key, ns.clone(), None, vec![a[0].ticket.clone()])
        .await
        .unwrap();
    b_client
        .fed_mirror(a_key, ns.clone(), vec![c_key], false)
        .await
        .unwrap();
    let holds_all = |client: Client| async move {
        for (key, value) in entries {
            let (_, got) = client.ns_get(id, key.to_vec()).await.ok()?;
            if got.as_ref() != Some(value) {
                return None;
            }
        }
        Some(())
    };
    // Entries land as iroh-docs delivers them, before B's pull checks the whole state and
    // records A's manifest (what B serves as a mirror): wait for both, before A goes.
    wait_until_or_dump("B to hold A's entries", &b, || async {
        holds_all(b_client.clone()).await?;
        let follow = b_client.fed_follows().await.ok()?.remove(0);
        (follow.seq >= 1).then_some(())
    })
    .await;

    // A goes offline; C, which never reached A, gets everything from B.
    a_client.close().await;
    a[0].kill9();
    let (a_ticket, b_ticket) = (a[0].ticket.clone(), b[0].ticket.clone());
    let via = |client: Client| {
        let (ns, a_ticket, b_ticket) = (ns.clone(), a_ticket.clone(), b_ticket.clone());
        async move {
            let mirror = ViaMirror {
                cluster: b_key,
                nodes: vec![b_ticket],
            };
            client
                .fed_follow_via(a_key, ns, None, vec![a_ticket], vec![mirror])
                .await
        }
    };
    via(c_client.clone()).await.unwrap();
    // Entries land as iroh-docs delivers them, before the pull checks the whole state and
    // records A's manifest: wait for both.
    wait_until_or_dump("A's entries to reach C through B", &c, || async {
        holds_all(c_client.clone()).await?;
        let follow = c_client.fed_follows().await.ok()?.remove(0);
        (follow.seq >= 1 && follow.last_source == Some(b_key)).then_some(())
    })
    .await;

    // Default deny: B does not mirror to D. D is refused, says why, and hosts nothing.
    via(d_client.clone()).await.unwrap();
    let detail = wait_until_or_dump("D to be refused by B", &d, || async {
        let _ = d_client.fed_sync(None, None).await;
        let follow = d_client.fed_follows().await.ok()?.remove(0);
        let report = follow.mirrors.iter().find(|m| m.cluster == b_key)?;
        (!report.ok).then(|| report.detail.clone())
    })
    .await;
    assert!(
        detail.contains(&format!(
            "is not exported to cluster {}",
            hex::encode(d_key)
        )),
        "{detail}"
    );
    assert!(d_client.ns_namespaces().await.unwrap().is_empty());
    for client in [b_client, c_client, d_client] {
        client.close().await;
    }
}
