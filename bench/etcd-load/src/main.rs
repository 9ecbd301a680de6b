//! `etcd-load`: put, get, watch and lease load against etcd 3.5, in the same shapes as
//! Aspen's own benchmarks (`aspen bench put|get|watch-*|lease-keepalive`), so the two can be
//! compared on one machine. `scripts/bench-etcd.sh` (watch, lease) and
//! `scripts/bench-vs-etcd.sh` (put, get) install etcd, start it on 127.0.0.1 and run these.
//!
//! `--endpoint` takes one client URL or several, comma-separated (all members of a cluster).
//! One `etcd_client::Client` is one tonic channel balancing over those endpoints (one HTTP/2
//! connection per endpoint); every call on it is its own HTTP/2 stream. The watch and lease
//! loads use ONE `Client`: every watcher and every keep-alive task makes its own RPC call on
//! it (etcd-client opens a new gRPC `Watch` stream per `watch()` call; no watches share a
//! stream).
//!
//! Load shapes:
//!
//! * `put --clients N --conns C --total T --key-space K --val-size V`: the shape of
//!   `node/src/bench/mod.rs`. C `Client`s are connected (and warmed up with a `status` call
//!   per endpoint); N tasks, task i using client i mod C, share a counter of T requests. Each
//!   task takes the next request while the counter is below T: a put of a V-byte value to a
//!   uniformly random key `bench/{:010}` of the K keys, waiting for its response. Latency is
//!   per successful request; req/s = successful requests / elapsed (first request to last
//!   response); p50/p99 nearest-rank. etcd has no idempotency session: a put is a plain `Put`.
//! * `get ... [--serializable]`: the same with gets of such keys, linearizable (etcd's
//!   default; a follower asks the leader for a read index) or serializable (local read).
//!   Like `scripts/bench.sh`, the caller fills the key space beforehand (a `put` run of K
//!   requests); a key not yet written is still a successful get.
//! * `watch-latency --watchers W --puts P --interval-ms 20`: W watchers all watch the key
//!   `bench/watch`; the run waits until etcd has confirmed every watch as created. Then one
//!   writer does P sequential puts of a 256-byte value to that key, starting one every
//!   interval (after a put's response it sleeps until its start + interval, so puts never
//!   pile up). For each put, t0 is the instant just before it is sent; each watcher stamps
//!   the instant it receives the event, matched to the put by revision (the put response
//!   header's revision = the event's mod_revision). One sample per (watcher, put):
//!   receipt - t0. Prints the sample count, p50, p99 and max in ms, and the put's own
//!   round trip p50 (`put_p50_ms`: t0 to the put's response).
//! * `watch-throughput --watchers W --puts P`: the same W watchers; one writer does P
//!   sequential puts (256-byte values) as fast as it can, each waiting for its response.
//!   Elapsed = from the first put's start until the last watcher received its last event.
//!   Prints events delivered (all watchers) per second, W*P / elapsed, and the put rate.
//! * `lease-keepalive --clients C --seconds S`: grants C leases (TTL 60 s); C concurrent
//!   tasks, each with its own lease and its own `LeaseKeepAlive` stream, repeatedly send one
//!   keep-alive and wait for its answer, for S seconds. Prints acknowledged keep-alives per
//!   second (all tasks together). The leases are revoked afterwards.
//!
//! Each run prints one line of `key=value` fields, starting with the subcommand's name.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Parser, Subcommand};
use etcd_client::{Client, GetOptions, WatchStream};

const WATCH_KEY: &str = "bench/watch";
const VALUE_SIZE: usize = 256;
/// Upper bound on how long watchers wait for their events, so a run always ends.
const WATCH_DEADLINE: Duration = Duration::from_secs(300);

#[derive(Parser)]
#[command(about = "Put, get, watch and lease load against etcd 3.5")]
struct Cli {
    /// etcd client URL(s), comma-separated.
    #[arg(
        long,
        visible_alias = "endpoints",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    endpoint: Vec<String>,
    /// Log in as NAME:PASSWORD (etcd's auth; against Aspen's etcd API: any name, and a
    /// bearer token as the password).
    #[arg(long, value_name = "NAME:PASSWORD")]
    user: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Puts of random keys in the key space.
    Put(KvArgs),
    /// Gets of random keys in the key space (linearizable unless --serializable).
    Get(KvArgs),
    /// Put -> watch event latency, one put per interval.
    WatchLatency {
        #[arg(long, default_value_t = 1)]
        watchers: usize,
        #[arg(long, default_value_t = 200)]
        puts: usize,
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
    },
    /// Watch events delivered per second while one writer puts back to back.
    WatchThroughput {
        #[arg(long, default_value_t = 1000)]
        watchers: usize,
        #[arg(long, default_value_t = 2000)]
        puts: usize,
    },
    /// Acknowledged lease keep-alives per second.
    LeaseKeepalive {
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

/// The flags of `aspen bench put|get`.
#[derive(Args)]
struct KvArgs {
    /// Concurrent requests in flight (tasks, each waiting for its response).
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// `Client`s (channels) the tasks are spread over.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Total requests.
    #[arg(long, default_value_t = 10_000)]
    total: u64,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 10_000)]
    key_space: u64,
    /// Value size in bytes (put).
    #[arg(long, default_value_t = VALUE_SIZE)]
    val_size: usize,
    /// Serializable reads (get).
    #[arg(long)]
    serializable: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let endpoints = &Endpoints {
        urls: cli.endpoint.clone(),
        user: cli.user.clone(),
    };
    match cli.cmd {
        Cmd::Put(args) => kv_load(endpoints, true, args).await,
        Cmd::Get(args) => kv_load(endpoints, false, args).await,
        Cmd::WatchLatency {
            watchers,
            puts,
            interval_ms,
        } => {
            let client = connect(endpoints).await?;
            watch_latency(client, watchers, puts, Duration::from_millis(interval_ms)).await
        }
        Cmd::WatchThroughput { watchers, puts } => {
            watch_throughput(connect(endpoints).await?, watchers, puts).await
        }
        Cmd::LeaseKeepalive { clients, seconds } => {
            let client = connect(endpoints).await?;
            lease_keepalive(client, clients, Duration::from_secs(seconds)).await
        }
    }
}

/// Where to connect, and as whom.
struct Endpoints {
    urls: Vec<String>,
    user: Option<String>,
}

async fn connect(endpoints: &Endpoints) -> Result<Client> {
    let options = match &endpoints.user {
        Some(user) => {
            let (name, password) = user.split_once(':').context("--user takes NAME:PASSWORD")?;
            Some(etcd_client::ConnectOptions::new().with_user(name, password))
        }
        None => None,
    };
    Client::connect(&endpoints.urls, options)
        .await
        .with_context(|| format!("connecting to {}", endpoints.urls.join(",")))
}

/// `put` and `get`: the loop of Aspen's `aspen bench put|get` (see the module doc).
async fn kv_load(endpoints: &Endpoints, is_put: bool, args: KvArgs) -> Result<()> {
    ensure!(
        args.clients > 0 && args.conns > 0 && args.total > 0 && args.key_space > 0,
        "--clients, --conns, --total and --key-space must be at least 1"
    );
    let mut conns = Vec::with_capacity(args.conns);
    for _ in 0..args.conns {
        let mut client = connect(endpoints).await?;
        // Warm up before measuring (the channel balances over the endpoints).
        for _ in &endpoints.urls {
            client.status().await?;
        }
        conns.push(client);
    }
    let issued = Arc::new(AtomicU64::new(0));
    let value = vec![b'x'; args.val_size];
    let serializable = args.serializable;
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.clients)
        .map(|i| {
            let mut client = conns[i % conns.len()].clone();
            let issued = issued.clone();
            let value = value.clone();
            let (total, key_space) = (args.total, args.key_space);
            tokio::spawn(async move {
                let mut keys = RandomKeys::new(i);
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                while issued.fetch_add(1, Ordering::Relaxed) < total {
                    let key = keys.next(key_space);
                    let t = Instant::now();
                    let ok = if is_put {
                        client.put(key, value.clone(), None).await.is_ok()
                    } else {
                        let options = serializable.then(|| GetOptions::new().with_serializable());
                        client.get(key, options).await.is_ok()
                    };
                    if ok {
                        latencies.push(t.elapsed().as_secs_f64() * 1e3);
                    } else {
                        errors += 1;
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(args.total as usize);
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let op = match (is_put, serializable) {
        (true, _) => "put",
        (false, false) => "get-linearizable",
        (false, true) => "get-serializable",
    };
    let pct = |q| {
        if latencies.is_empty() {
            0.0
        } else {
            percentile(&latencies, q)
        }
    };
    println!(
        "{op} clients={} conns={} total={} ok={} errors={errors} seconds={elapsed:.3} requests_per_sec={:.0} p50_ms={:.3} p99_ms={:.3}",
        args.clients,
        args.conns,
        args.total,
        latencies.len(),
        latencies.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
    );
    ensure!(errors == 0, "{errors} requests failed");
    Ok(())
}

/// Uniformly random keys `bench/{:010}` (splitmix64, seeded per task from std's random
/// hasher keys, so no `rand` dependency).
struct RandomKeys(u64);

impl RandomKeys {
    fn new(task: usize) -> Self {
        Self(std::collections::hash_map::RandomState::new().hash_one(task))
    }

    fn next(&mut self, key_space: u64) -> String {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        format!("bench/{:010}", (z ^ (z >> 31)) % key_space)
    }
}

/// Opens `n` watches on [`WATCH_KEY`], each its own `watch()` call (own gRPC stream) on the
/// shared client, and returns once etcd has answered `created` for every one of them.
async fn create_watchers(client: &Client, n: usize) -> Result<Vec<WatchStream>> {
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        let mut stream = client.clone().watch(WATCH_KEY, None).await?;
        let resp = stream
            .message()
            .await?
            .with_context(|| format!("watch {i} closed before it was created"))?;
        ensure!(resp.created(), "watch {i}: first response is not `created`");
        streams.push(stream);
    }
    Ok(streams)
}

/// Spawns one task per watch stream. Each collects `(mod_revision, receipt instant)` for
/// every event until it has seen `expect` events (or the stream ends, or the deadline).
fn spawn_receivers(
    streams: Vec<WatchStream>,
    expect: usize,
) -> Vec<tokio::task::JoinHandle<Result<Vec<(i64, Instant)>>>> {
    streams
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let mut seen = Vec::with_capacity(expect);
                let deadline = tokio::time::Instant::now() + WATCH_DEADLINE;
                while seen.len() < expect {
                    let msg = match tokio::time::timeout_at(deadline, stream.message()).await {
                        Ok(msg) => msg?,
                        Err(_) => break, // deadline: report what arrived
                    };
                    let Some(resp) = msg else { break };
                    let now = Instant::now();
                    if resp.canceled() {
                        bail!("watch canceled: {}", resp.cancel_reason());
                    }
                    for ev in resp.events() {
                        if let Some(kv) = ev.kv() {
                            seen.push((kv.mod_revision(), now));
                        }
                    }
                }
                Ok(seen)
            })
        })
        .collect()
}

async fn collect(
    handles: Vec<tokio::task::JoinHandle<Result<Vec<(i64, Instant)>>>>,
) -> Result<Vec<Vec<(i64, Instant)>>> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await??);
    }
    Ok(out)
}

/// One put of a 256-byte value; returns the revision it created.
async fn put(client: &mut Client, value: &[u8]) -> Result<i64> {
    let resp = client.put(WATCH_KEY, value.to_vec(), None).await?;
    Ok(resp
        .header()
        .context("put response without header")?
        .revision())
}

async fn watch_latency(
    client: Client,
    watchers: usize,
    puts: usize,
    interval: Duration,
) -> Result<()> {
    let streams = create_watchers(&client, watchers).await?;
    let handles = spawn_receivers(streams, puts);

    let value = vec![b'x'; VALUE_SIZE];
    let mut writer = client.clone();
    let mut sent = Vec::with_capacity(puts); // (revision, t0)
    let mut put_ms = Vec::with_capacity(puts);
    for _ in 0..puts {
        let t0 = Instant::now();
        let rev = put(&mut writer, &value).await?;
        put_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        sent.push((rev, t0));
        tokio::time::sleep_until((t0 + interval).into()).await;
    }

    let t0_of: std::collections::HashMap<i64, Instant> = sent.into_iter().collect();
    let mut samples: Vec<f64> = Vec::with_capacity(watchers * puts);
    for seen in collect(handles).await? {
        for (rev, at) in seen {
            if let Some(t0) = t0_of.get(&rev) {
                samples.push(at.duration_since(*t0).as_secs_f64() * 1e3);
            }
        }
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    put_ms.sort_by(|a, b| a.total_cmp(b));
    ensure!(!samples.is_empty(), "no watch events received");
    println!(
        "watch-latency watchers={watchers} puts={puts} interval_ms={} samples={} expected={} p50_ms={:.3} p99_ms={:.3} max_ms={:.3} put_p50_ms={:.3}",
        interval.as_millis(),
        samples.len(),
        watchers * puts,
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        samples[samples.len() - 1],
        percentile(&put_ms, 0.50),
    );
    Ok(())
}

async fn watch_throughput(client: Client, watchers: usize, puts: usize) -> Result<()> {
    let streams = create_watchers(&client, watchers).await?;
    let handles = spawn_receivers(streams, puts);

    let value = vec![b'x'; VALUE_SIZE];
    let mut writer = client.clone();
    let start = Instant::now();
    for _ in 0..puts {
        put(&mut writer, &value).await?;
    }
    let puts_done = start.elapsed();

    let mut events = 0usize;
    let mut last = start;
    for seen in collect(handles).await? {
        events += seen.len();
        if let Some(&(_, at)) = seen.last() {
            last = last.max(at);
        }
    }
    let elapsed = last.duration_since(start).as_secs_f64();
    println!(
        "watch-throughput watchers={watchers} puts={puts} events={events} expected={} elapsed_s={elapsed:.3} events_per_s={:.0} puts_per_s={:.0}",
        watchers * puts,
        events as f64 / elapsed,
        puts as f64 / puts_done.as_secs_f64(),
    );
    Ok(())
}

async fn lease_keepalive(client: Client, clients: usize, run_for: Duration) -> Result<()> {
    let mut ids = Vec::with_capacity(clients);
    for _ in 0..clients {
        ids.push(client.clone().lease_grant(60, None).await?.id());
    }
    let start = Instant::now();
    let deadline = start + run_for;
    let tasks: Vec<_> = ids
        .iter()
        .map(|&id| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let (mut keeper, mut stream) = client.lease_keep_alive(id).await?;
                let mut acked = 0u64;
                while Instant::now() < deadline {
                    keeper.keep_alive().await?;
                    let resp = stream
                        .message()
                        .await?
                        .context("keep-alive stream closed")?;
                    ensure!(resp.ttl() > 0, "lease {id} expired");
                    acked += 1;
                }
                anyhow::Ok(acked)
            })
        })
        .collect();
    let mut acked = 0u64;
    for t in tasks {
        acked += t.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut c = client.clone();
    for id in ids {
        c.lease_revoke(id).await?;
    }
    println!(
        "lease-keepalive clients={clients} seconds={} acked={acked} elapsed_s={elapsed:.3} keepalives_per_s={:.0}",
        run_for.as_secs(),
        acked as f64 / elapsed,
    );
    Ok(())
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
