//! Watch and lease load, in the same shapes as `bench/etcd-load` drives etcd with:
//!
//! - `watch-latency`: W watchers of one key on one connection; one writer puts a 256-byte
//!   value every `--interval-ms`; a sample is the time from just before a put was sent to
//!   a watcher receiving its event (one per watcher and put); the put's own round trip p50
//!   too (an idle node's put, against the back-to-back puts of `bench put`).
//! - `watch-throughput`: the same watchers; the writer puts as fast as it can (one at a
//!   time); events delivered per second, from the first put to the last event received.
//! - `lease-keepalive`: C tasks on one connection, each keeping its own lease alive with
//!   one keep-alive after another; acknowledged keep-alives per second.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use aspen_client::{Client, WatchRequest, WatchUpdate};
use clap::Args;
use futures::StreamExt;
use serde_json::json;

use crate::cli::{ClientArgs, Output};

const KEY: &[u8] = b"bench/watch";

#[derive(Args, Debug)]
pub struct WatchBenchArgs {
    /// Watchers of the key, all on one connection.
    #[arg(long, default_value_t = 1)]
    pub watchers: usize,
    /// Puts the writer makes.
    #[arg(long, default_value_t = 200)]
    pub puts: u64,
    /// Milliseconds between the starts of two puts (latency; 0: as fast as possible).
    #[arg(long, default_value_t = 20)]
    pub interval_ms: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    pub val_size: usize,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug)]
pub struct LeaseBenchArgs {
    /// Concurrent keep-alive loops, each with its own lease, on one connection.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Each watcher's (revision, when received) of every event.
type Received = Vec<(u64, Instant)>;

/// Starts `n` watchers of [`KEY`] on `client`; returns once every one runs. Each ends once
/// it received revision `last` (0 until the writer is done).
async fn start_watchers(
    client: &Client,
    n: usize,
    last: Arc<AtomicU64>,
) -> Result<Vec<tokio::task::JoinHandle<Result<Received>>>> {
    let (ready_tx, mut ready) = tokio::sync::mpsc::channel::<()>(n.max(1));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        // Progress shows the watch runs, and wakes it to see that the writer is done.
        let mut watch = client.watch(WatchRequest {
            start: KEY.to_vec(),
            end: None,
            from: 0,
            after: None,
            prev_kv: false,
            progress_every_ms: 100,
        });
        let (ready_tx, last) = (ready_tx.clone(), last.clone());
        tasks.push(tokio::spawn(async move {
            let mut got: Received = Vec::new();
            let mut announced = false;
            loop {
                let done = |got: &Received| {
                    let last = last.load(Ordering::SeqCst);
                    last > 0 && got.last().is_some_and(|(r, _)| *r >= last)
                };
                match watch.next().await {
                    Some(Ok(WatchUpdate::Events { events, .. })) => {
                        let now = Instant::now();
                        got.extend(events.iter().map(|e| (e.kv.mod_revision, now)));
                    }
                    Some(Ok(WatchUpdate::Progress { .. })) => {
                        if !announced {
                            announced = true;
                            let _ = ready_tx.send(()).await;
                        }
                    }
                    Some(Err(e)) => bail!("a watcher failed: {e}"),
                    None => bail!("a watch ended"),
                }
                if done(&got) {
                    return Ok(got);
                }
            }
        }));
    }
    for _ in 0..n {
        ready.recv().await;
    }
    Ok(tasks)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// `watch-latency` and `watch-throughput`.
pub async fn bench_watch(args: WatchBenchArgs, throughput: bool) -> Result<()> {
    if args.watchers == 0 || args.puts == 0 {
        bail!("--watchers and --puts must be at least 1");
    }
    if args.watchers > aspen_client::protocol::MAX_WATCHES_PER_CONNECTION {
        bail!(
            "--watchers: one connection holds at most {} watches",
            aspen_client::protocol::MAX_WATCHES_PER_CONNECTION
        );
    }
    let client = args.client.client().await?;
    let writer = args.client.client().await?;
    writer.status().await?;
    let last = Arc::new(AtomicU64::new(0));
    let watchers = start_watchers(&client, args.watchers, last.clone()).await?;
    let value = vec![b'x'; args.val_size];
    let interval = Duration::from_millis(if throughput { 0 } else { args.interval_ms });
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let started = Instant::now();
    let mut next = tokio::time::Instant::now();
    let mut revision = 0;
    let mut put_ms = Vec::new();
    for _ in 0..args.puts {
        tokio::time::sleep_until(next).await;
        next += interval;
        let t0 = Instant::now();
        revision = writer.put(KEY.to_vec(), value.clone()).await?.revision;
        put_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        sent.insert(revision, t0);
    }
    put_ms.sort_by(|a, b| a.total_cmp(b));
    let put_p50 = pct(&put_ms, 0.5);
    let put_secs = started.elapsed().as_secs_f64();
    last.store(revision, Ordering::SeqCst);
    let mut samples = Vec::new();
    let mut events = 0u64;
    let mut last_received = started;
    for w in watchers {
        let got = w.await??;
        events += got.len() as u64;
        for (rev, at) in got {
            last_received = last_received.max(at);
            if let Some(t0) = sent.get(&rev) {
                samples.push(at.duration_since(*t0).as_secs_f64() * 1000.0);
            }
        }
    }
    let elapsed = last_received.duration_since(started).as_secs_f64();
    samples.sort_by(|a, b| a.total_cmp(b));
    let (p50, p99, max) = (pct(&samples, 0.5), pct(&samples, 0.99), pct(&samples, 1.0));
    let events_per_sec = events as f64 / elapsed;
    let puts_per_sec = args.puts as f64 / put_secs;
    match args.client.output {
        Output::Json => println!(
            "{}",
            json!({ "bench": if throughput { "watch-throughput" } else { "watch-latency" },
                    "watchers": args.watchers, "puts": args.puts, "events": events,
                    "p50_ms": p50, "p99_ms": p99, "max_ms": max, "put_p50_ms": put_p50,
                    "events_per_sec": events_per_sec, "puts_per_sec": puts_per_sec })
        ),
        Output::Text => {
            println!(
                "{} watchers, {} puts: {events} events in {elapsed:.2}s",
                args.watchers, args.puts
            );
            println!("  put-to-event p50  {p50:.3} ms");
            println!("  put-to-event p99  {p99:.3} ms");
            println!("  put-to-event max  {max:.3} ms");
            println!("  put p50           {put_p50:.3} ms (the put's own round trip)");
            println!("  events/s          {events_per_sec:.0}");
            println!("  puts/s            {puts_per_sec:.0}");
        }
    }
    client.close().await;
    writer.close().await;
    Ok(())
}

/// `lease-keepalive`.
pub async fn bench_lease(args: LeaseBenchArgs) -> Result<()> {
    if args.clients == 0 || !(args.seconds.is_finite() && args.seconds > 0.0) {
        bail!("--clients must be at least 1 and --seconds positive");
    }
    let client = args.client.client().await?;
    let mut leases = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        leases.push(client.lease_grant(60, 0).await?.id);
    }
    let until = Instant::now() + Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for id in leases.iter().copied() {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut errors, mut latencies) = (0u64, 0u64, Vec::new());
            while Instant::now() < until {
                let t = Instant::now();
                match client.lease_keep_alive_once(id).await {
                    Ok(_) => {
                        ok += 1;
                        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    Err(_) => errors += 1,
                }
            }
            (ok, errors, latencies)
        }));
    }
    let (mut ok, mut errors, mut latencies) = (0, 0, Vec::new());
    for t in tasks {
        let (o, e, l) = t.await?;
        ok += o;
        errors += e;
        latencies.extend(l);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let rate = ok as f64 / elapsed;
    match args.client.output {
        Output::Json => println!(
            "{}",
            json!({ "bench": "lease-keepalive", "clients": args.clients, "ok": ok, "errors": errors,
                    "keepalives_per_sec": rate, "p50_ms": pct(&latencies, 0.5), "p99_ms": pct(&latencies, 0.99) })
        ),
        Output::Text => {
            println!(
                "{} keep-alive loops: {ok} ok, {errors} errors in {elapsed:.2}s",
                args.clients
            );
            println!("  keep-alives/s  {rate:.0}");
            println!("  p50            {:.3} ms", pct(&latencies, 0.5));
            println!("  p99            {:.3} ms", pct(&latencies, 0.99));
        }
    }
    for id in leases {
        let _ = client.lease_revoke(id).await;
    }
    client.close().await;
    if errors > 0 {
        bail!("{errors} keep-alives failed");
    }
    Ok(())
}
