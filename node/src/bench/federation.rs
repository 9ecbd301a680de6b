//! `aspen bench fed`: what following another cluster's document costs, between two running
//! clusters (the follower is `--cluster`, the origin `--origin`):
//!
//! - first sync: a new document of `--changes` changes on the origin, followed by the
//!   follower; the time from the follow to the follower's last pull having committed it;
//! - arrival: single edits on the origin of a small followed document, and the time until the
//!   follower holds each, once with nothing asked (the origin's announcement triggers the
//!   pull, or else the follower's pull interval: run the follower with a long one to time
//!   announcements alone) and once asking it to pull at once (`fed sync`);
//! - blob pull: a blob of `--blob-mib` random MiB tagged on the origin under an exported
//!   prefix, followed; from the follow until the follower's pull has fetched it (verified
//!   streaming from the origin node) and tagged it through its Raft.
//!
//! With `--mirror`, only a blob pull, through a mirror: a third cluster follows the origin's
//! prefix and mirrors it to `--cluster`, which follows the origin naming that mirror and
//! knowing no address of the origin (run it with the DHT off, on a cluster that never
//! reached the origin), so every byte comes from the mirror, verified against the origin's
//! key. Timed like the direct blob pull, for a side-by-side figure.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aspen_client::{Client, ClusterTicket, Consistency, Resource};
use clap::Args;
use serde_json::json;

use crate::cli::{ClientArgs, Output};

/// How long the bench waits for one sync or arrival before it gives up.
const WAIT_LIMIT: Duration = Duration::from_secs(300);
/// How often the follower is polled.
const POLL: Duration = Duration::from_millis(10);
const MIB: u64 = 1 << 20;

#[derive(Args, Debug)]
pub struct FedBenchArgs {
    /// The origin cluster's ticket.
    #[arg(long, value_name = "TICKET")]
    pub origin: String,
    /// The identity (key file) to use on the origin (an admin there: it creates documents
    /// and exports them).
    #[arg(long, value_name = "FILE")]
    pub origin_identity: PathBuf,
    /// Changes in the document of the first sync (one actor, one change per key write).
    #[arg(long, default_value_t = 100_000)]
    pub changes: usize,
    /// Edits whose arrival is timed, each way.
    #[arg(long, default_value_t = 20)]
    pub edits: usize,
    /// Size of the followed blob whose pull is timed (0: no blob phase).
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub blob_mib: u64,
    /// Time only a blob pull through this mirror cluster (its ticket), as the module docs
    /// describe.
    #[arg(long, value_name = "TICKET", requires = "mirror_identity")]
    pub mirror: Option<String>,
    /// An admin identity on the mirror cluster.
    #[arg(long, value_name = "FILE")]
    pub mirror_identity: Option<PathBuf>,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn bench_fed(args: FedBenchArgs) -> Result<()> {
    if args.changes == 0 || args.edits == 0 {
        bail!("--changes and --edits must be at least 1");
    }
    let follower = args.client.client().await?;
    let origin_ticket: ClusterTicket = args
        .origin
        .trim()
        .parse()
        .context("--origin is not a cluster ticket")?;
    let mut origin_options = args.client.options().await?;
    let key = crate::cli::auth::load_identity(Some(args.origin_identity.clone())).await?;
    origin_options.identity = Some(iroh::SecretKey::from_bytes(&key.secret_bytes()));
    let origin = Client::connect_with(origin_ticket.clone(), origin_options).await?;
    let origin_key = origin.identity().await?.1.cluster_key;
    let follower_key = follower.identity().await?.1.cluster_key;
    let tag = format!("{:08x}", rand::random::<u32>());
    if let (Some(mirror), Some(identity)) = (&args.mirror, &args.mirror_identity) {
        if args.blob_mib == 0 {
            bail!("--mirror times a blob pull: --blob-mib must be at least 1");
        }
        let ticket: ClusterTicket = mirror
            .trim()
            .parse()
            .context("--mirror is not a cluster ticket")?;
        let mut options = args.client.options().await?;
        let key = crate::cli::auth::load_identity(Some(identity.clone())).await?;
        options.identity = Some(iroh::SecretKey::from_bytes(&key.secret_bytes()));
        let mirror = Client::connect_with(ticket.clone(), options).await?;
        let parties = Parties {
            origin: &origin,
            origin_key,
            origin_ticket: &origin_ticket,
            follower: &follower,
            follower_key,
        };
        let took = mirror_blob_pull(&parties, &mirror, &ticket, &tag, args.blob_mib).await;
        mirror.close().await;
        origin.close().await;
        follower.close().await;
        let took = took?;
        let rate = super::transfer::mib_per_sec(args.blob_mib * MIB, took);
        match args.client.output {
            Output::Json => println!(
                "{}",
                json!({ "mirror_blob_pull": {
                    "mib": args.blob_mib,
                    "ms": took.as_secs_f64() * 1000.0,
                    "mib_per_sec": rate,
                }})
            ),
            Output::Text => println!(
                "blob pull of {} MiB through a mirror: {:.0} ms ({rate:.0} MiB/s)",
                args.blob_mib,
                took.as_secs_f64() * 1000.0
            ),
        }
        return Ok(());
    }

    // First sync of a long history.
    let big = format!("bench/fed-{tag}");
    eprintln!("writing {} changes to {big} on the origin...", args.changes);
    origin.doc_create(&big).await?;
    for batch in history(args.changes).chunks(aspen_crdt::limits::MAX_CHANGES_PER_REQUEST) {
        origin.doc_apply(&big, batch.to_vec()).await?;
    }
    let big_heads = heads(&origin.doc_get(&big, Consistency::Linearizable).await?);
    origin
        .fed_export(Resource::doc(&big), vec![follower_key], false)
        .await?;
    let started = Instant::now();
    follower
        .fed_follow(
            origin_key,
            Resource::doc(&big),
            Some(big.clone()),
            origin_ticket.members.clone(),
        )
        .await?;
    wait_for_pull(&follower, origin_key, &Resource::doc(&big)).await?;
    let first_sync = started.elapsed();
    let pulled = heads(&follower.doc_get(&big, Consistency::Serializable).await?);
    if pulled != big_heads {
        bail!("the follower's copy of {big} does not have the origin's heads");
    }

    // Arrival of single edits.
    let small = format!("bench/fed-{tag}-edits");
    origin.doc_create(&small).await?;
    origin
        .fed_export(Resource::doc(&small), vec![follower_key], false)
        .await?;
    follower
        .fed_follow(
            origin_key,
            Resource::doc(&small),
            Some(small.clone()),
            origin_ticket.members.clone(),
        )
        .await?;
    let mut announced = Vec::new();
    let mut by_sync = Vec::new();
    for round in 0..2 * args.edits {
        let changed = origin
            .doc_change(&small, None, move |tx| {
                use automerge::transaction::Transactable;
                tx.put(automerge::ROOT, "round", round as i64).map(|_| ())
            })
            .await?
            .context("an edit changed nothing")?;
        let t = Instant::now();
        let want: Vec<[u8; 32]> = sorted(changed.heads.iter().map(|h| h.0).collect());
        let synced = round % 2 == 1;
        if synced {
            follower
                .fed_sync(Some(origin_key), Some(Resource::doc(&small)))
                .await?;
        }
        wait_for_heads(&follower, &small, &want).await?;
        if synced {
            by_sync.push(t.elapsed());
        } else {
            announced.push(t.elapsed());
        }
    }
    let blob = match args.blob_mib {
        0 => None,
        mib => Some(
            blob_pull(
                &origin,
                &follower,
                origin_key,
                follower_key,
                &origin_ticket,
                &tag,
                mib,
            )
            .await?,
        ),
    };
    for name in [&big, &small] {
        let _ = follower
            .fed_unfollow(origin_key, Resource::doc(name.as_str()))
            .await;
        let _ = origin
            .fed_unexport(Resource::doc(name.as_str()), vec![], false, true)
            .await;
        let _ = origin.doc_delete(name).await;
        let _ = follower.doc_delete(name).await;
    }
    origin.close().await;
    follower.close().await;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        ms(v[((v.len() - 1) as f64 * p).round() as usize])
    };
    let (i50, i99) = (pct(&mut announced, 0.5), pct(&mut announced, 0.99));
    let (s50, s99) = (pct(&mut by_sync, 0.5), pct(&mut by_sync, 0.99));
    match args.client.output {
        Output::Json => println!(
            "{}",
            json!({
                "changes": args.changes,
                "first_sync_ms": ms(first_sync),
                "changes_per_sec": args.changes as f64 / first_sync.as_secs_f64(),
                "arrival_announced_ms": { "p50": i50, "p99": i99, "n": announced.len() },
                "arrival_by_sync_ms": { "p50": s50, "p99": s99, "n": by_sync.len() },
                "blob_pull": blob.map(|d| json!({
                    "mib": args.blob_mib,
                    "ms": ms(d),
                    "mib_per_sec": super::transfer::mib_per_sec(args.blob_mib * MIB, d),
                })),
            })
        ),
        Output::Text => {
            println!(
                "first sync of {} changes: {:.0} ms ({:.0} changes/s)",
                args.changes,
                ms(first_sync),
                args.changes as f64 / first_sync.as_secs_f64()
            );
            println!(
                "edit -> follower, announced (nothing asked):  p50 {i50:.0} ms, p99 {i99:.0} ms ({} edits)",
                announced.len()
            );
            println!(
                "edit -> follower, with `fed sync`:              p50 {s50:.1} ms, p99 {s99:.1} ms ({} edits)",
                by_sync.len()
            );
            if let Some(d) = blob {
                println!(
                    "blob pull of {} MiB: {:.0} ms ({:.0} MiB/s)",
                    args.blob_mib,
                    ms(d),
                    super::transfer::mib_per_sec(args.blob_mib * MIB, d)
                );
            }
        }
    }
    Ok(())
}

/// Times the follow of a fresh `mib` MiB blob, until the follower's pull has tagged it.
async fn blob_pull(
    origin: &Client,
    follower: &Client,
    origin_key: [u8; 32],
    follower_key: [u8; 32],
    origin_ticket: &ClusterTicket,
    tag: &str,
    mib: u64,
) -> Result<Duration> {
    let size = mib.saturating_mul(MIB);
    if size > aspen_blobs::limits::MAX_BLOB_BYTES {
        bail!(
            "--blob-mib must be at most {} (the blob size limit)",
            aspen_blobs::limits::MAX_BLOB_BYTES / MIB
        );
    }
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let input = dir.path().join("blob.in");
    eprintln!("adding a {mib} MiB blob on the origin...");
    super::transfer::write_random_file(input.clone(), size).await?;
    let prefix = format!("bench/fed-{tag}-blobs/");
    let added = origin
        .blob_add_file(&input, Some(&format!("{prefix}blob")), |_| {})
        .await?;
    let resource = Resource::blob(&prefix);
    origin
        .fed_export(resource.clone(), vec![follower_key], false)
        .await?;
    let started = Instant::now();
    follower
        .fed_follow(
            origin_key,
            resource.clone(),
            None,
            origin_ticket.members.clone(),
        )
        .await?;
    wait_for_pull(follower, origin_key, &resource).await?;
    let took = started.elapsed();
    let local = format!("fed/{}/{prefix}blob", &hex::encode(origin_key)[..16]);
    let info = follower
        .blob_stat(added.hash, Consistency::Serializable)
        .await?;
    if !info.tags.contains(&local) {
        bail!("the follower did not tag the blob as {local}");
    }
    let _ = follower.fed_unfollow(origin_key, resource.clone()).await;
    let _ = origin.fed_unexport(resource, vec![], false, true).await;
    let _ = origin.blob_untag(&format!("{prefix}blob")).await;
    let _ = follower.blob_untag(&local).await;
    Ok(took)
}

/// The two clusters every phase involves.
struct Parties<'a> {
    origin: &'a Client,
    origin_key: [u8; 32],
    origin_ticket: &'a ClusterTicket,
    follower: &'a Client,
    follower_key: [u8; 32],
}

/// Times the follow of a fresh `mib` MiB blob through `mirror`: from the follower's follow
/// until its pull, served by the mirror, has tagged it.
async fn mirror_blob_pull(
    p: &Parties<'_>,
    mirror: &Client,
    mirror_ticket: &ClusterTicket,
    tag: &str,
    mib: u64,
) -> Result<Duration> {
    let size = mib.saturating_mul(MIB);
    if size > aspen_blobs::limits::MAX_BLOB_BYTES {
        bail!(
            "--blob-mib must be at most {} (the blob size limit)",
            aspen_blobs::limits::MAX_BLOB_BYTES / MIB
        );
    }
    let mirror_key = mirror.identity().await?.1.cluster_key;
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let input = dir.path().join("blob.in");
    eprintln!("adding a {mib} MiB blob on the origin...");
    super::transfer::write_random_file(input.clone(), size).await?;
    let prefix = format!("bench/fed-{tag}-mirrored/");
    let added = p
        .origin
        .blob_add_file(&input, Some(&format!("{prefix}blob")), |_| {})
        .await?;
    let resource = Resource::blob(&prefix);
    p.origin
        .fed_export(resource.clone(), vec![mirror_key], false)
        .await?;
    eprintln!("the mirror pulls it from the origin...");
    mirror
        .fed_follow(
            p.origin_key,
            resource.clone(),
            None,
            p.origin_ticket.members.clone(),
        )
        .await?;
    wait_for_pull(mirror, p.origin_key, &resource).await?;
    mirror
        .fed_mirror(p.origin_key, resource.clone(), vec![p.follower_key], false)
        .await?;
    let started = Instant::now();
    p.follower
        .fed_follow_via(
            p.origin_key,
            resource.clone(),
            None,
            vec![],
            vec![aspen_client::ViaMirror {
                cluster: mirror_key,
                nodes: mirror_ticket.members.clone(),
            }],
        )
        .await?;
    let pulled = wait_for_pull(p.follower, p.origin_key, &resource).await;
    let took = started.elapsed();
    let source = p
        .follower
        .fed_follows()
        .await?
        .into_iter()
        .find(|f| f.origin == p.origin_key && f.resource == resource)
        .and_then(|f| f.last_source);
    let local = format!("fed/{}/{prefix}blob", &hex::encode(p.origin_key)[..16]);
    let tagged = p
        .follower
        .blob_stat(added.hash, Consistency::Serializable)
        .await
        .map(|info| info.tags.contains(&local));
    let _ = p
        .follower
        .fed_unfollow(p.origin_key, resource.clone())
        .await;
    let _ = mirror.fed_unfollow(p.origin_key, resource.clone()).await;
    let _ = p.origin.fed_unexport(resource, vec![], false, true).await;
    let _ = p.origin.blob_untag(&format!("{prefix}blob")).await;
    let _ = mirror.blob_untag(&local).await;
    let _ = p.follower.blob_untag(&local).await;
    pulled?;
    if source != Some(mirror_key) {
        bail!(
            "the follower's pull did not come from the mirror (the follower must not know \
             the origin's address: DHT off, and no earlier follow of the origin)"
        );
    }
    if !tagged? {
        bail!("the follower did not tag the blob as {local}");
    }
    Ok(took)
}

/// `n` changes of one actor, each setting one of 100 keys.
fn history(n: usize) -> Vec<Vec<u8>> {
    use automerge::transaction::Transactable;
    let mut doc = automerge::Automerge::new();
    (0..n)
        .map(|i| {
            let mut tx = doc.transaction();
            tx.put(automerge::ROOT, format!("k{}", i % 100), i as i64)
                .expect("a put on the root");
            tx.commit();
            doc.get_last_local_change()
                .expect("just committed")
                .raw_bytes()
                .to_vec()
        })
        .collect()
}

fn heads(doc: &automerge::Automerge) -> Vec<[u8; 32]> {
    sorted(doc.get_heads().iter().map(|h| h.0).collect())
}

fn sorted(mut v: Vec<[u8; 32]>) -> Vec<[u8; 32]> {
    v.sort();
    v
}

/// Polls the follower's status until its first pull of `resource` committed.
async fn wait_for_pull(follower: &Client, origin: [u8; 32], resource: &Resource) -> Result<()> {
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        let follows = follower.fed_follows().await?;
        let follow = follows
            .iter()
            .find(|f| f.origin == origin && &f.resource == resource)
            .context("the follow disappeared")?;
        if follow.last_success_ms > 0 {
            return Ok(());
        }
        if let Some(e) = &follow.last_error {
            bail!("the pull failed: {e}");
        }
        if Instant::now() > deadline {
            bail!("no pull of {resource} within {WAIT_LIMIT:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls the follower until document `name` has `want` as its heads.
async fn wait_for_heads(follower: &Client, name: &str, want: &[[u8; 32]]) -> Result<()> {
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        if let Ok(doc) = follower.doc_get(name, Consistency::Serializable).await {
            if heads(&doc) == want {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{name} did not reach the origin's heads within {WAIT_LIMIT:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}
