//! Transfer throughput: blobs through a cluster, and raw iroh QUIC as the baseline.
//!
//! Both report MiB/s (2^20 bytes per second) per run and the median over the runs, so the
//! blob numbers can be read against what one QUIC stream carries on the same machine.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aspen_blobs::limits::{DEFAULT_REPLICAS, MAX_BLOB_BYTES, MAX_REPLICAS};
use aspen_client::{Client, Consistency};
use clap::Args;
use serde_json::json;

use crate::cli::{ClientArgs, Output};

const MIB: u64 = 1 << 20;
/// Most runs one invocation makes.
const MAX_RUNS: usize = 100;
/// How long the blob benchmark waits for the replicas of one blob.
const REPLICA_DEADLINE: Duration = Duration::from_secs(600);
/// How often it asks whether they are there (the resolution of the replica timing).
const REPLICA_POLL: Duration = Duration::from_millis(5);
/// Bytes per write in the generator and in the raw QUIC sender.
const CHUNK: usize = 1 << 20;
/// The raw QUIC benchmark's protocol (only ever spoken inside one process).
const QUIC_BENCH_ALPN: &[u8] = b"aspen/bench-quic/0";

#[derive(Args, Debug)]
pub struct BlobBenchArgs {
    /// Size of each blob in MiB.
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// Blobs to add one after another (each with new random content).
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Copies the cluster keeps (the nodes' `blobs.replicas`): a run waits until
    /// min(replicas, members) members hold the blob.
    #[arg(long, default_value_t = DEFAULT_REPLICAS)]
    pub replicas: usize,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug)]
pub struct QuicBenchArgs {
    /// Bytes sent per run, in MiB.
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// Runs, one stream each, over one connection.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Instead of a raw stream: one iroh-blobs fetch per run of a blob of that size between
    /// two on-disk stores in this process (verified streaming, data and outboard written,
    /// committed): what a blob fetch can reach here with no cluster around it.
    #[arg(long)]
    pub iroh_blobs: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

pub(super) fn mib_per_sec(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

/// The median of `values` (the lower middle one for an even count); `None` if empty.
fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[(v.len() - 1) / 2])
}

fn check_runs(runs: usize) -> Result<()> {
    if runs == 0 || runs > MAX_RUNS {
        bail!("--runs must be between 1 and {MAX_RUNS}");
    }
    Ok(())
}

/// Writes `size` random bytes to `path` (off the executor).
pub(super) async fn write_random_file(path: PathBuf, size: u64) -> Result<()> {
    tokio::task::spawn_blocking(move || -> Result<()> {
        use std::io::Write;
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut out = std::io::BufWriter::new(file);
        let mut buf = vec![0u8; CHUNK];
        let mut left = size;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            rand::fill(&mut buf[..n]);
            out.write_all(&buf[..n])
                .with_context(|| format!("cannot write {}", path.display()))?;
            left -= n as u64;
        }
        out.flush()
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    })
    .await?
}

/// Gives the file at `path` new content in its first bytes, so every run adds a new blob.
async fn rewrite_head(path: PathBuf) -> Result<()> {
    tokio::task::spawn_blocking(move || -> Result<()> {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        f.seek(std::io::SeekFrom::Start(0))?;
        f.write_all(&rand::random::<[u8; 16]>())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    })
    .await?
}

/// One blob run's timings.
struct BlobRun {
    add: Duration,
    /// From the add's answer until min(replicas, members) members hold it; `None` with one.
    replicate: Option<Duration>,
    get: Duration,
}

pub async fn bench_blob(args: BlobBenchArgs) -> Result<()> {
    check_runs(args.runs)?;
    let size = args.size_mib.saturating_mul(MIB);
    if args.size_mib == 0 || size > MAX_BLOB_BYTES {
        bail!(
            "--size-mib must be between 1 and {} (the blob size limit)",
            MAX_BLOB_BYTES / MIB
        );
    }
    if args.replicas == 0 || args.replicas > MAX_REPLICAS {
        bail!("--replicas must be between 1 and {MAX_REPLICAS}");
    }
    let client = args.client.client().await?;
    client.refresh_members().await?;
    let want = args.replicas.min(client.members().len());
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let input = dir.path().join("blob.in");
    let output = dir.path().join("blob.out");
    write_random_file(input.clone(), size).await?;
    let mut runs = Vec::new();
    for _ in 0..args.runs {
        rewrite_head(input.clone()).await?;
        let result = blob_run(&client, &input, &output, want).await;
        let _ = tokio::fs::remove_file(&output).await;
        runs.push(result?);
    }
    client.close().await;
    report_blob(&args, size, want, &runs);
    Ok(())
}

async fn blob_run(client: &Client, input: &Path, output: &Path, want: usize) -> Result<BlobRun> {
    let tag = format!("bench/blob-{:016x}", rand::random::<u64>());
    let started = Instant::now();
    let added = client.blob_add_file(input, Some(&tag), |_| {}).await?;
    let add = started.elapsed();
    let result = async {
        let replicate = if want > 1 {
            let started = Instant::now();
            loop {
                let info = client
                    .blob_stat(added.hash, Consistency::Linearizable)
                    .await?;
                if info.holders.len() >= want {
                    break Some(started.elapsed());
                }
                if started.elapsed() > REPLICA_DEADLINE {
                    bail!(
                        "only {} of {want} members hold the blob after {REPLICA_DEADLINE:?}",
                        info.holders.len()
                    );
                }
                tokio::time::sleep(REPLICA_POLL).await;
            }
        } else {
            None
        };
        let started = Instant::now();
        client
            .blob_get_to_file(added.hash, output, |_, _| {})
            .await?;
        let get = started.elapsed();
        Ok(BlobRun {
            add,
            replicate,
            get,
        })
    }
    .await;
    // The benchmark's blobs become garbage once untagged.
    let untagged = client.blob_untag(&tag).await;
    let run = result?;
    untagged.with_context(|| format!("cannot untag {tag}"))?;
    Ok(run)
}

fn report_blob(args: &BlobBenchArgs, size: u64, want: usize, runs: &[BlobRun]) {
    let add = median(runs.iter().map(|r| mib_per_sec(size, r.add)));
    let replicate = median(
        runs.iter()
            .filter_map(|r| r.replicate.map(|d| mib_per_sec(size, d))),
    );
    let get = median(runs.iter().map(|r| mib_per_sec(size, r.get)));
    match args.client.output {
        Output::Json => println!(
            "{}",
            json!({
                "op": "blob", "size_bytes": size, "replicas": want,
                "add_mib_per_sec": add, "replica_fetch_mib_per_sec": replicate,
                "get_mib_per_sec": get,
                "runs": runs.iter().map(|r| json!({
                    "add_seconds": r.add.as_secs_f64(),
                    "replica_fetch_seconds": r.replicate.map(|d| d.as_secs_f64()),
                    "get_seconds": r.get.as_secs_f64(),
                })).collect::<Vec<_>>(),
            })
        ),
        Output::Text => {
            let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} MiB/s"));
            println!(
                "blob of {} MiB, {} run(s), {want} replica(s) (medians):",
                size / MIB,
                runs.len()
            );
            println!("  add            {}", show(add));
            println!("  replica fetch  {}", show(replicate));
            println!("  get            {}", show(get));
        }
    }
}

pub async fn bench_quic(args: QuicBenchArgs) -> Result<()> {
    check_runs(args.runs)?;
    if args.size_mib == 0 || args.size_mib > 64 * 1024 {
        bail!("--size-mib must be between 1 and 65536");
    }
    let size = args.size_mib * MIB;
    let (what, times) = if args.iroh_blobs {
        let what = "iroh-blobs fetch between two on-disk stores on 127.0.0.1";
        (what, iroh_blobs_runs(size, args.runs).await?)
    } else {
        let what = "raw iroh QUIC, one stream on 127.0.0.1";
        (what, quic_runs(size, args.runs).await?)
    };
    let rates: Vec<f64> = times.iter().map(|d| mib_per_sec(size, *d)).collect();
    let med = median(rates.iter().copied());
    match args.output {
        Output::Json => println!(
            "{}",
            json!({ "op": if args.iroh_blobs { "iroh-blobs" } else { "quic" },
                    "size_bytes": size, "mib_per_sec": med, "runs_mib_per_sec": rates })
        ),
        Output::Text => {
            println!("{what}, {} MiB x {}:", size / MIB, args.runs);
            println!("  median  {:.0} MiB/s", med.unwrap_or(0.0));
            let all: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
            println!("  runs    {} MiB/s", all.join(" / "));
        }
    }
    Ok(())
}

/// One fetch per run into a fresh store, timed from the dial until the store has committed.
async fn iroh_blobs_runs(size: u64, runs: usize) -> Result<Vec<Duration>> {
    use iroh_blobs::store::fs::FsStore;
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let input = dir.path().join("blob.in");
    write_random_file(input.clone(), size).await?;
    let source = FsStore::load(dir.path().join("source"))
        .await
        .context("cannot open a blob store")?;
    let hash = source
        .blobs()
        .add_path(&input)
        .await
        .context("cannot add the blob")?
        .hash;
    let local = "127.0.0.1:0".parse().expect("a socket address");
    let server =
        aspen_client::endpoint::offline_endpoint(local, None, vec![iroh_blobs::ALPN.to_vec()])
            .await?;
    let router = iroh::protocol::Router::builder(server.clone())
        .accept(
            iroh_blobs::ALPN,
            iroh_blobs::BlobsProtocol::new(&source, None),
        )
        .spawn();
    let fetcher = aspen_client::endpoint::offline_endpoint(local, None, vec![]).await?;
    let mut times = Vec::new();
    for run in 0..runs {
        let target = FsStore::load(dir.path().join(format!("target-{run}")))
            .await
            .context("cannot open a blob store")?;
        let started = Instant::now();
        let conn = fetcher.connect(server.addr(), iroh_blobs::ALPN).await?;
        let stats = target.remote().fetch(conn.clone(), hash).complete().await?;
        target.sync_db().await?;
        times.push(started.elapsed());
        conn.close(0u32.into(), b"done");
        if stats.payload_bytes_read != size {
            bail!("fetched {} of {size} bytes", stats.payload_bytes_read);
        }
        target.shutdown().await?;
    }
    fetcher.close().await;
    router.shutdown().await?;
    Ok(times)
}

/// One stream per run over one connection, timed until the receiver acknowledged every byte.
async fn quic_runs(size: u64, runs: usize) -> Result<Vec<Duration>> {
    let local = "127.0.0.1:0".parse().expect("a socket address");
    let server =
        aspen_client::endpoint::offline_endpoint(local, None, vec![QUIC_BENCH_ALPN.to_vec()])
            .await?;
    let sender = aspen_client::endpoint::offline_endpoint(local, None, vec![]).await?;
    let addr = server.addr();
    let receiver = tokio::spawn({
        let server = server.clone();
        async move {
            let incoming = server.accept().await.context("the endpoint closed")?;
            let conn = incoming.await?;
            let mut buf = vec![0u8; CHUNK];
            // One stream per run: count what arrives, answer with the count.
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let mut got = 0u64;
                while let Some(n) = recv.read(&mut buf).await? {
                    got += n as u64;
                }
                send.write_all(&got.to_le_bytes()).await?;
                send.finish()?;
            }
            anyhow::Ok(())
        }
    });
    let conn = sender.connect(addr, QUIC_BENCH_ALPN).await?;
    let chunk = bytes::Bytes::from(vec![0x5a; CHUNK]);
    let mut times = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await?;
        let mut left = size;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            send.write_chunk(chunk.slice(..n)).await?;
            left -= n as u64;
        }
        send.finish()?;
        let answer = recv.read_to_end(8).await?;
        let elapsed = started.elapsed();
        let got = u64::from_le_bytes(
            answer
                .try_into()
                .map_err(|_| anyhow::anyhow!("the receiver's answer is not a count"))?,
        );
        if got != size {
            bail!("the receiver got {got} of {size} bytes");
        }
        times.push(elapsed);
    }
    conn.close(0u32.into(), b"done");
    sender.close().await;
    server.close().await;
    receiver.abort();
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_is_the_middle_value() {
        assert_eq!(median([]), None);
        assert_eq!(median([3.0]), Some(3.0));
        assert_eq!(median([5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), Some(2.0));
    }

    #[test]
    fn rates_are_in_mib_per_second() {
        assert_eq!(mib_per_sec(2 * MIB, Duration::from_secs(1)), 2.0);
        assert_eq!(mib_per_sec(MIB, Duration::from_millis(500)), 2.0);
    }
}
