//! Push triggers: an origin announces each new manifest over iroh-gossip and its follower
//! pulls at once, so edits arrive without waiting for the (here 10-minute) poll; forged and
//! replayed announcements are ignored.

use std::time::{Duration, Instant};

use aspen_client::protocol::Resource;
use aspen_client::{Client, Consistency};

use crate::common::*;
use crate::federation::{cluster_key, sorted_heads};

/// How long one edit may take to reach the follower. Announced, it takes about one change
/// check (200 ms) and one pull; this bound only says "not the 10-minute poll".
const ARRIVAL_BOUND: Duration = Duration::from_secs(20);
/// Edits timed from origin to follower.
const EDITS: usize = 100;

/// Sets `round` in the origin's document "news"; returns its new heads, sorted.
async fn edit_round(origin: Client, value: i64) -> Vec<automerge::ChangeHash> {
    let changed = origin
        .doc_change("news", None, move |tx| {
            use automerge::transaction::Transactable;
            tx.put(automerge::ROOT, "round", value).map(|_| ())
        })
        .await
        .unwrap()
        .unwrap();
    let mut heads = changed.heads;
    heads.sort();
    heads
}

/// How long until `follower`'s copy of "news" has `heads` (None: not within `bound`).
async fn arrival(
    follower: Client,
    heads: Vec<automerge::ChangeHash>,
    bound: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < bound {
        if let Ok(doc) = follower.doc_get("news", Consistency::Serializable).await {
            if sorted_heads(&doc) == heads {
                return Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// Waits for the follow's first successful pull (at once, as for any new follow): it tells
/// the follower where the origin is, and it joins the topic after it.
async fn first_pull(follower: &Client, nodes: &[NodeProc]) {
    wait_until_or_dump("the first pull", nodes, || async {
        let f = follower.fed_follows().await.ok()?.remove(0);
        (f.last_success_ms > 0).then_some(())
    })
    .await;
}

/// Edits on the origin until one reaches `follower` within 2 s: from then on it hears
/// announcements (its topic join may come before the origin's, and is retried).
async fn warm_up(origin: &Client, follower: &Client, nodes: &[NodeProc]) {
    let value = std::sync::atomic::AtomicI64::new(0);
    wait_until_or_dump("the follower to hear announcements", nodes, || async {
        let v = value.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let heads = edit_round(origin.clone(), v).await;
        arrival(follower.clone(), heads, Duration::from_secs(2)).await
    })
    .await;
}

/// Makes `count` edits on the origin, each waited for on `follower` within
/// [`ARRIVAL_BOUND`]; returns how long each took, sorted. Panics with the logs of `nodes`
/// when one does not arrive.
async fn timed_edits(
    origin: &Client,
    follower: &Client,
    count: usize,
    nodes: &[&NodeProc],
) -> Vec<Duration> {
    let mut took = Vec::with_capacity(count);
    for i in 0..count {
        // Values the warm-up edits (counting from 1) do not reach.
        let heads = edit_round(origin.clone(), 1_000_000 + i as i64).await;
        match arrival(follower.clone(), heads, ARRIVAL_BOUND).await {
            Some(t) => took.push(t),
            None => {
                let logs: Vec<String> = nodes.iter().map(|n| n.log()).collect();
                panic!(
                    "edit {i} did not arrive within {ARRIVAL_BOUND:?}; the logs:\n{}",
                    logs.join("\n-----\n")
                )
            }
        }
    }
    took.sort();
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_edit_arrives_when_announced_and_forged_announcements_are_ignored() {
    let root = tempfile::tempdir().unwrap();
    // The origin also announces, with each manifest, one signed by a stranger and the
    // previous one again.
    let a = form(
        &root.path().join("a"),
        1,
        &["--unsafe-test-fault", "fed-forged-announcements"],
    )
    .await;
    // The follower polls every 10 minutes: only announcements bring edits in time.
    let b = form(
        &root.path().join("b"),
        1,
        &["--fed-pull-interval-ms", "600000"],
    )
    .await;
    let a_client = client_of(&a[0]).await;
    let b_client = client_of(&b[0]).await;
    let b_key = cluster_key(&b_client).await;
    let a_key = cluster_key(&a_client).await;
    a_client.doc_create("news").await.unwrap();
    a_client
        .fed_export(Resource::doc("news"), vec![b_key], false)
        .await
        .unwrap();
    b_client
        .fed_follow(
            a_key,
            Resource::doc("news"),
            Some("news".into()),
            vec![a[0].ticket.clone()],
        )
        .await
        .unwrap();

    // From here on only announcements bring edits.
    first_pull(&b_client, &b).await;
    warm_up(&a_client, &b_client, &b).await;
    let took = timed_edits(&a_client, &b_client, EDITS, &[&b[0], &a[0]]).await;
    eprintln!(
        "edit -> follower by announcement: p50 {:?}, p99 {:?}, max {:?} ({EDITS} edits)",
        took[EDITS / 2],
        took[EDITS * 99 / 100],
        took[EDITS - 1]
    );
    // Meanwhile the origin announced a forgery (another key) and a replay every 200 ms.
    // Now nothing changes on the origin: the follower hears more of them and pulls nothing.
    let count = |what: &str| {
        let log = b[0].log();
        log.lines().filter(|l| l.contains(what)).count()
    };
    let forged = "announcement ignored: not the origin's manifest of the resource";
    assert!(
        count(forged) >= EDITS,
        "forgeries ignored: {}",
        count(forged)
    );
    // Pulls are counted from the log, where a pull writes its line just after committing:
    // the last edit's line may come after the edit was seen. A sync (one more pull, waited
    // for) settles the count, which then has to stay put.
    b_client.fed_sync(None, None).await.unwrap();
    // Every edit arrived by a pull of its own ("pulled", or "pulled (snapshot)" when the
    // follower loads a whole snapshot instead of the missing changes).
    let pulled = "follower: pulled";
    let pulls = count(pulled);
    eprintln!("{pulls} pulls logged for {EDITS} edits");
    assert!(pulls >= EDITS, "{pulls} pulls logged for {EDITS} edits");
    let heard = count(forged);
    wait_until_or_dump("the follower to ignore 20 more forgeries", &b, || async {
        (count(forged) >= heard + 20).then_some(())
    })
    .await;
    assert_eq!(
        count(pulled),
        pulls,
        "a forged announcement triggered a pull"
    );
    // Replays: iroh-gossip drops a message it delivered before (same bytes); one that gets
    // through is not newer than what the follower accepted (unit-tested in
    // aspen_federation::announce) and is ignored the same way.
    assert!(
        !b[0].log().contains("announcement over the origin's rate"),
        "no honest announcement was rate-limited"
    );
    a_client.close().await;
    b_client.close().await;
}

/// Edits announced through a mirror: C cannot reach the origin A (it knows only A's key and
/// its mirror B) and polls every 10 minutes, yet each edit on A reaches it, pulled from B,
/// within the bound. C hears A's announcement relayed by B, often before B has pulled; B's
/// own announcement, once it serves the new state, is what brings C up to date.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_arrive_through_a_mirror_that_announces_what_it_serves() {
    const MIRRORED_EDITS: usize = 20;
    let root = tempfile::tempdir().unwrap();
    let slow = ["--fed-pull-interval-ms", "600000"];
    let a = form(&root.path().join("a"), 1, &[]).await;
    let b = form(&root.path().join("b"), 1, &slow).await;
    let c = form(&root.path().join("c"), 1, &slow).await;
    let a_client = client_of(&a[0]).await;
    let b_client = client_of(&b[0]).await;
    let c_client = client_of(&c[0]).await;
    let (a_key, b_key, c_key) = (
        cluster_key(&a_client).await,
        cluster_key(&b_client).await,
        cluster_key(&c_client).await,
    );
    let news = Resource::doc("news");
    a_client.doc_create("news").await.unwrap();
    a_client
        .fed_export(news.clone(), vec![b_key, c_key], false)
        .await
        .unwrap();
    b_client
        .fed_follow(
            a_key,
            news.clone(),
            Some("news".into()),
            vec![a[0].ticket.clone()],
        )
        .await
        .unwrap();
    b_client
        .fed_mirror(a_key, news.clone(), vec![c_key], false)
        .await
        .unwrap();
    // No address of A: C's pulls find the origin unreachable at once and go to B.
    c_client
        .fed_follow_via(
            a_key,
            news.clone(),
            Some("news".into()),
            vec![],
            vec![aspen_client::ViaMirror {
                cluster: b_key,
                nodes: vec![b[0].ticket.clone()],
            }],
        )
        .await
        .unwrap();
    wait_until_or_dump("C's first pull through B", &c, || async {
        let f = c_client.fed_follows().await.ok()?.remove(0);
        (f.last_source == Some(b_key)).then_some(())
    })
    .await;
    // Both followers join their topics after their first pulls.
    warm_up(&a_client, &c_client, &c).await;
    let took = timed_edits(&a_client, &c_client, MIRRORED_EDITS, &[&c[0], &b[0]]).await;
    eprintln!(
        "edit -> reader through a mirror: p50 {:?}, max {:?} ({MIRRORED_EDITS} edits)",
        took[MIRRORED_EDITS / 2],
        took[MIRRORED_EDITS - 1]
    );
    let follow = c_client.fed_follows().await.unwrap().remove(0);
    assert_eq!(follow.last_source, Some(b_key), "{follow:?}");
    // B's own announcements triggered pulls on C (the relayed ones from A alone often find
    // B not yet updated).
    let by_b = format!("by=\"{}\"", &hex::encode(b_key)[..16]);
    let log = c[0].log();
    assert!(
        log.lines()
            .any(|l| l.contains("announced; pulling now") && l.contains(&by_b)),
        "no pull on C was triggered by B's announcement; C's log:\n{log}"
    );
    for client in [a_client, b_client, c_client] {
        client.close().await;
    }
}

/// A followed blob prefix is announced too: each blob tagged on the origin reaches a
/// follower that polls every 10 minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_blob_tagged_on_the_origin_arrives_when_announced() {
    const BLOBS: usize = 5;
    let root = tempfile::tempdir().unwrap();
    let a = form(&root.path().join("a"), 1, &[]).await;
    let b = form(
        &root.path().join("b"),
        1,
        &["--fed-pull-interval-ms", "600000"],
    )
    .await;
    let a_client = client_of(&a[0]).await;
    let b_client = client_of(&b[0]).await;
    let (a_key, b_key) = (cluster_key(&a_client).await, cluster_key(&b_client).await);
    let site = Resource::blob("site/");
    a_client
        .fed_export(site.clone(), vec![b_key], false)
        .await
        .unwrap();
    b_client
        .fed_follow(a_key, site, Some("got/".into()), vec![a[0].ticket.clone()])
        .await
        .unwrap();
    first_pull(&b_client, &b).await;
    let tagged_on_b = |tag: String| {
        let b_client = b_client.clone();
        async move {
            let (tags, _) = b_client
                .blob_list(Some("got/".into()), 100, Consistency::Serializable)
                .await
                .ok()?;
            tags.iter().any(|t| t.tag == tag).then_some(())
        }
    };
    let mut i = 0;
    let mut add = || {
        i += 1;
        let path = root.path().join(format!("blob-{i}"));
        std::fs::write(&path, format!("blob {i}")).unwrap();
        let a_client = a_client.clone();
        async move {
            a_client
                .blob_add_file(&path, Some(&format!("site/{i}")), |_| {})
                .await
                .unwrap();
            format!("got/{i}")
        }
    };
    // The follower joins the topic after its first pull: tag until one arrives.
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(
            Instant::now() < deadline,
            "no blob reached B by announcement"
        );
        let tag = add().await;
        let arrived = tokio::time::timeout(Duration::from_secs(2), async {
            while tagged_on_b(tag.clone()).await.is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        if arrived.is_ok() {
            break;
        }
    }
    for _ in 0..BLOBS {
        let tag = add().await;
        let arrived = tokio::time::timeout(ARRIVAL_BOUND, async {
            while tagged_on_b(tag.clone()).await.is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            arrived.is_ok(),
            "{tag} did not reach B within {ARRIVAL_BOUND:?}; B's log:\n{}",
            b[0].log()
        );
    }
    a_client.close().await;
    b_client.close().await;
}

/// A follower of a 3-node origin that reached a member other than the leader hears the
/// leader's announcements through that member (every member stays on the topic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_reached_another_member_hears_the_leader() {
    const MEMBER_EDITS: usize = 10;
    let root = tempfile::tempdir().unwrap();
    let a = form(&root.path().join("a"), 3, &[]).await;
    let b = form(
        &root.path().join("b"),
        1,
        &["--fed-pull-interval-ms", "600000"],
    )
    .await;
    let a_client = client_for(&a.iter().collect::<Vec<_>>()).await;
    let b_client = client_of(&b[0]).await;
    let (a_key, b_key) = (cluster_key(&a_client).await, cluster_key(&b_client).await);
    a_client.doc_create("news").await.unwrap();
    a_client
        .fed_export(Resource::doc("news"), vec![b_key], false)
        .await
        .unwrap();
    // B knows only a member that is not the leader (A's members all run the same code; the
    // leader is the one that announces).
    let leader = leader_named_by(&a_client).await;
    let other = a.iter().find(|n| n.node_id() != leader).unwrap();
    b_client
        .fed_follow(
            a_key,
            Resource::doc("news"),
            Some("news".into()),
            vec![other.ticket.clone()],
        )
        .await
        .unwrap();
    first_pull(&b_client, &b).await;
    warm_up(&a_client, &b_client, &b).await;
    let nodes: Vec<&NodeProc> = b.iter().chain(a.iter()).collect();
    let took = timed_edits(&a_client, &b_client, MEMBER_EDITS, &nodes).await;
    eprintln!(
        "edit -> follower through a non-leader member: p50 {:?}, max {:?}",
        took[MEMBER_EDITS / 2],
        took[MEMBER_EDITS - 1]
    );
    a_client.close().await;
    b_client.close().await;
}
