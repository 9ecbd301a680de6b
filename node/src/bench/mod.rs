//! `aspen bench`: a load generator shaped like etcd's `benchmark` tool, plus transfer
//! throughput (blobs, and raw iroh QUIC as the baseline) in `transfer`.

mod federation;
mod transfer;
mod watch;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use aspen_client::{Client, Consistency};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::cli::{ClientArgs, Output};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Puts of random keys in the key space.
    Put(BenchArgs),
    /// Gets of random keys in the key space (linearizable unless --serializable).
    Get(BenchArgs),
    /// Automerge changes committed to one new document through Raft: each client commits its
    /// own chain of changes (made beforehand, one actor per client), one change per request.
    Doc(BenchArgs),
    /// Blob throughput: upload a blob of random bytes to one member (add), wait until the
    /// other members hold their replicas (replica fetch), download it back (get).
    Blob(transfer::BlobBenchArgs),
    /// Raw iroh QUIC throughput, the baseline for `blob` and `fed`: one stream between two
    /// endpoints in this process on 127.0.0.1 (no cluster needed); with `--iroh-blobs`, one
    /// iroh-blobs fetch between two on-disk stores instead.
    Quic(transfer::QuicBenchArgs),
    /// Federation between two running clusters (--cluster follows --origin): first sync of a
    /// long document history, and the time from an edit on the origin to its arrival.
    Fed(federation::FedBenchArgs),
    /// Watch latency: W watchers of one key (one connection), a put every --interval-ms;
    /// put-to-event p50/p99 over every watcher and put.
    WatchLatency(watch::WatchBenchArgs),
    /// Watch throughput: W watchers of one key, puts as fast as one writer goes; events
    /// delivered per second.
    WatchThroughput(watch::WatchBenchArgs),
    /// Lease keep-alives per second: C loops on one connection, each keeping its own lease
    /// alive one keep-alive after another.
    LeaseKeepalive(watch::LeaseBenchArgs),
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Connections (client endpoints) the requests are spread over.
    #[arg(long, default_value_t = 1)]
    pub conns: usize,
    /// Total requests.
    #[arg(long, default_value_t = 10_000)]
    pub total: u64,
    /// Value size in bytes (put).
    #[arg(long, default_value_t = 256)]
    pub val_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 10_000)]
    pub key_space: u64,
    /// Serializable reads (get).
    #[arg(long)]
    pub serializable: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn bench(cmd: BenchCommand) -> Result<()> {
    let (is_put, args) = match cmd {
        BenchCommand::Put(a) => (true, a),
        BenchCommand::Get(a) => (false, a),
        BenchCommand::Doc(a) => return bench_doc(a).await,
        BenchCommand::Blob(a) => return transfer::bench_blob(a).await,
        BenchCommand::Quic(a) => return transfer::bench_quic(a).await,
        BenchCommand::Fed(a) => return federation::bench_fed(a).await,
        BenchCommand::WatchLatency(a) => return watch::bench_watch(a, false).await,
        BenchCommand::WatchThroughput(a) => return watch::bench_watch(a, true).await,
        BenchCommand::LeaseKeepalive(a) => return watch::bench_lease(a).await,
    };
    if args.clients == 0 || args.conns == 0 || args.total == 0 || args.key_space == 0 {
        bail!("--clients, --conns, --total and --key-space must be at least 1");
    }
    check_conns(args.conns)?;
    if args.val_size > aspen_kv::limits::MAX_VALUE_BYTES {
        bail!(
            "--val-size exceeds the value limit of {} bytes",
            aspen_kv::limits::MAX_VALUE_BYTES
        );
    }
    let conns = args.client.clients(args.conns).await?;
    // Warm up every connection (and the leader's) before measuring.
    for c in &conns {
        c.status().await?;
    }
    let issued = Arc::new(AtomicU64::new(0));
    let value = vec![b'x'; args.val_size];
    let consistency = Consistency::serializable_if(args.serializable);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let client: Client = conns[i % conns.len()].clone();
        let issued = issued.clone();
        let value = value.clone();
        let (total, key_space) = (args.total, args.key_space);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            while issued.fetch_add(1, Ordering::Relaxed) < total {
                let key = format!("bench/{:010}", rand::random::<u64>() % key_space).into_bytes();
                let t = Instant::now();
                let ok = if is_put {
                    client.put(key, value.clone()).await.is_ok()
                } else {
                    client.get_with(key, 0, consistency).await.is_ok()
                };
                if ok {
                    latencies.push(t.elapsed());
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let (latencies, errors) = collect(tasks).await?;
    let elapsed = started.elapsed();
    let op = if is_put {
        "put"
    } else if args.serializable {
        "get (serializable)"
    } else {
        "get (linearizable)"
    };
    report(op, &args, latencies, errors, elapsed);
    for c in conns {
        c.close().await;
    }
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}

/// Each load task's latencies of successful requests and its error count.
type TaskResult = (Vec<Duration>, u64);

/// Waits for every load task; their latencies together, and their errors summed.
async fn collect(tasks: Vec<tokio::task::JoinHandle<TaskResult>>) -> Result<TaskResult> {
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        latencies.extend(l);
        errors += e;
    }
    Ok((latencies, errors))
}

/// Prints throughput and latency percentiles of a finished run.
fn report(
    op: &str,
    args: &BenchArgs,
    mut latencies: Vec<Duration>,
    errors: u64,
    elapsed: Duration,
) {
    latencies.sort();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    let rps = latencies.len() as f64 / elapsed.as_secs_f64();
    match args.client.output {
        Output::Json => println!(
            "{}",
            json!({ "op": op, "clients": args.clients, "conns": args.conns, "total": args.total,
                    "ok": latencies.len(), "errors": errors, "seconds": elapsed.as_secs_f64(),
                    "requests_per_sec": rps, "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
                    "max_ms": pct(1.0) })
        ),
        Output::Text => {
            println!(
                "{op}: {} ok, {errors} errors in {:.2}s",
                latencies.len(),
                elapsed.as_secs_f64()
            );
            println!("  requests/s  {rps:.0}");
            println!("  p50         {:.3} ms", pct(0.50));
            println!("  p90         {:.3} ms", pct(0.90));
            println!("  p99         {:.3} ms", pct(0.99));
        }
    }
}

/// Each client's chain of changes: actor `i`, each change setting its own key and depending
/// on the previous one, so a client's changes are valid when committed in order.
fn change_chains(clients: usize, total: u64, val_size: usize) -> Vec<Vec<Vec<u8>>> {
    use automerge::transaction::Transactable;
    (0..clients)
        .map(|i| {
            let n = total / clients as u64 + u64::from((i as u64) < total % clients as u64);
            let mut doc = automerge::Automerge::new().with_actor(automerge::ActorId::random());
            let value = "x".repeat(val_size);
            (0..n)
                .map(|step| {
                    let mut tx = doc.transaction();
                    tx.put(automerge::ROOT, format!("c{i}-{step}"), value.as_str())
                        .expect("put on the root");
                    tx.commit();
                    doc.get_last_local_change()
                        .expect("just committed")
                        .raw_bytes()
                        .to_vec()
                })
                .collect()
        })
        .collect()
}

async fn bench_doc(args: BenchArgs) -> Result<()> {
    if args.clients == 0 || args.conns == 0 || args.total == 0 {
        bail!("--clients, --conns and --total must be at least 1");
    }
    check_conns(args.conns)?;
    if args.val_size > aspen_crdt::limits::MAX_CHANGE_BYTES / 2 {
        bail!("--val-size is too large for one change");
    }
    let chains = change_chains(args.clients, args.total, args.val_size);
    let conns = args.client.clients(args.conns).await?;
    let name = format!("bench/doc-{:016x}", rand::random::<u64>());
    conns[0].doc_create(&name).await?;
    for c in &conns {
        c.status().await?;
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, chain) in chains.into_iter().enumerate() {
        let client: Client = conns[i % conns.len()].clone();
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            for change in chain {
                let t = Instant::now();
                match client.doc_apply(&name, vec![change]).await {
                    Ok(_) => latencies.push(t.elapsed()),
                    // A chain cannot go on past a change that was not committed.
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let (latencies, errors) = collect(tasks).await?;
    let elapsed = started.elapsed();
    report("doc change", &args, latencies, errors, elapsed);
    let _ = conns[0].doc_delete(&name).await;
    for c in conns {
        c.close().await;
    }
    if errors > 0 {
        bail!("{errors} client chains stopped at a failed change");
    }
    Ok(())
}

/// A node accepts at most this many connections from one key.
fn check_conns(conns: usize) -> Result<()> {
    if conns > crate::server::MAX_CONNECTIONS_PER_KEY {
        bail!(
            "--conns is at most {} (a node accepts no more connections from one key)",
            crate::server::MAX_CONNECTIONS_PER_KEY
        );
    }
    Ok(())
}
