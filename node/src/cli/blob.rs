//! `aspen blob ...`: add, fetch, list, tag and inspect blobs.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aspen_blobs::{hash_hex, parse_hash};
use aspen_client::{Client, Consistency};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::cli::{ClientArgs, ConnectArgs, Output};

#[derive(Subcommand, Debug)]
pub enum BlobCommand {
    /// Store a file (or standard input, `-`) in the cluster and print its BLAKE3 hash.
    ///
    /// The contacted member stores it and records itself as a holder; other members fetch
    /// it (verified) until the configured number hold it. With --tag the blob is referenced
    /// under that name; an untagged blob is deleted after the grace period unless tagged.
    Add {
        /// The file, or `-` for standard input.
        file: PathBuf,
        /// Reference the blob under this name (replacing what the name referenced).
        #[arg(long)]
        tag: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Download a blob from a member that holds it, verifying every chunk against its hash.
    Get {
        /// The blob's hash (64 hex digits).
        hash: String,
        /// Where to write it (`-`: standard output). Written as FILE.part until complete.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// List tags in name order, with the blob each names and how many members hold it.
    List {
        /// Start after this tag.
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Read the contacted node's state (possibly stale) instead of a linearizable read.
        #[arg(long)]
        serializable: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// What the cluster knows of a blob: size, tags, holders.
    Stat {
        hash: String,
        #[arg(long)]
        serializable: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Point a tag at a blob some member holds (the contacted member fetches it first).
    Tag {
        tag: String,
        hash: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a tag; a blob no tag names is deleted after the grace period.
    Untag {
        tag: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The contacted member's blob store: blobs held, fetches, verification failures, GC.
    Stats {
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    bar
}

fn summary(tag: &str, hash: &str, size: u64, replicas: Option<u32>) -> String {
    match replicas {
        Some(r) => format!("{tag}\t{hash}\t{size}\t{r} replicas"),
        None => format!("{tag}\t{hash}\t{size}"),
    }
}

pub async fn blob(cmd: BlobCommand) -> Result<()> {
    let connect = match &cmd {
        BlobCommand::Get { connect, .. } => connect.clone(),
        BlobCommand::Add { client, .. }
        | BlobCommand::List { client, .. }
        | BlobCommand::Stat { client, .. }
        | BlobCommand::Tag { client, .. }
        | BlobCommand::Untag { client, .. }
        | BlobCommand::Stats { client, .. } => client.connect.clone(),
    };
    let c = connect.client().await?;
    let result = blob_with(&c, cmd).await;
    c.close().await;
    result
}

async fn blob_with(c: &Client, cmd: BlobCommand) -> Result<()> {
    match cmd {
        BlobCommand::Add { file, tag, client } => {
            // Standard input is spooled to a file first: an upload announces its size.
            let spool;
            let path: &Path = if file.as_os_str() == "-" {
                spool = tempfile::NamedTempFile::new().context("cannot create a temporary file")?;
                let mut out = spool.reopen()?;
                tokio::task::spawn_blocking(move || {
                    std::io::copy(&mut std::io::stdin().lock(), &mut out)
                })
                .await?
                .context("cannot read standard input")?;
                spool.path()
            } else {
                &file
            };
            let size = std::fs::metadata(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .len();
            let progress = bar(size);
            let added = c
                .blob_add_file(path, tag.as_deref(), |n| progress.set_position(n))
                .await;
            progress.finish_and_clear();
            let added = added?;
            let hash = hash_hex(&added.hash);
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({
                        "hash": hash,
                        "size": added.size,
                        "tag": tag,
                        "previous": added.previous.map(|h| hash_hex(&h)),
                        "node": format!("{:016x}", added.node.node_id()),
                    })
                ),
                Output::Text => println!("{hash}"),
            }
        }
        BlobCommand::Get {
            hash, output, json, ..
        } => {
            let hash = parse_hash(&hash)?;
            let to_stdout = output.as_os_str() == "-";
            let spool;
            let target: PathBuf = if to_stdout {
                spool = tempfile::TempDir::new().context("cannot create a temporary directory")?;
                spool.path().join("blob")
            } else {
                output.clone()
            };
            let progress = bar(0);
            let got = c
                .blob_get_to_file(hash, &target, |n, total| {
                    progress.set_length(total);
                    progress.set_position(n);
                })
                .await;
            progress.finish_and_clear();
            let size = got?;
            if to_stdout {
                let target = target.clone();
                tokio::task::spawn_blocking(move || {
                    let mut f = std::fs::File::open(&target)?;
                    std::io::copy(&mut f, &mut std::io::stdout().lock())
                })
                .await?
                .context("cannot write to standard output")?;
            } else if json {
                println!(
                    "{}",
                    json!({ "hash": hash_hex(&hash), "size": size, "file": output })
                );
            } else {
                println!("wrote {size} bytes to {}", output.display());
            }
        }
        BlobCommand::List {
            after,
            limit,
            serializable,
            client,
        } => {
            let (tags, more) = c
                .blob_list(after, limit, Consistency::serializable_if(serializable))
                .await?;
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({
                        "tags": tags.iter().map(|t| json!({
                            "tag": t.tag,
                            "hash": hash_hex(&t.hash),
                            "size": t.size,
                            "created_at_ms": t.created_at_ms,
                            "replicas": t.replicas,
                        })).collect::<Vec<_>>(),
                        "more": more,
                    })
                ),
                Output::Text => {
                    for t in &tags {
                        println!(
                            "{}",
                            summary(&t.tag, &hash_hex(&t.hash), t.size, Some(t.replicas))
                        );
                    }
                    if more {
                        println!("(more: --after {:?})", tags.last().map(|t| &t.tag));
                    }
                }
            }
        }
        BlobCommand::Stat {
            hash,
            serializable,
            client,
        } => {
            let hash = parse_hash(&hash)?;
            let info = c
                .blob_stat(hash, Consistency::serializable_if(serializable))
                .await?;
            let holders: Vec<String> = info.holders.iter().map(|h| format!("{h:016x}")).collect();
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({
                        "hash": hash_hex(&info.hash),
                        "size": info.size,
                        "tags": info.tags,
                        "holders": holders,
                        "local": info.local,
                    })
                ),
                Output::Text => {
                    println!("hash     {}", hash_hex(&info.hash));
                    match info.size {
                        Some(s) => println!("size     {s}"),
                        None => println!("size     unknown (no tag or holder records it)"),
                    }
                    println!("tags     {}", info.tags.join(", "));
                    println!("holders  {}", holders.join(", "));
                }
            }
        }
        BlobCommand::Tag { tag, hash, client } => {
            let hash = parse_hash(&hash)?;
            let previous = c.blob_tag(&tag, hash).await?;
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({ "tag": tag, "hash": hash_hex(&hash), "previous": previous.map(|h| hash_hex(&h)) })
                ),
                Output::Text => match previous {
                    Some(p) if p != hash => {
                        println!("{tag} -> {} (was {})", hash_hex(&hash), hash_hex(&p))
                    }
                    _ => println!("{tag} -> {}", hash_hex(&hash)),
                },
            }
        }
        BlobCommand::Untag { tag, client } => {
            c.blob_untag(&tag).await?;
            match client.output {
                Output::Json => println!("{}", json!({ "untagged": tag })),
                Output::Text => println!("untagged {tag}"),
            }
        }
        BlobCommand::Stats { client } => {
            let s = c.blob_stats().await?;
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({
                        "node_id": format!("{:016x}", s.node_id),
                        "blobs": s.blobs,
                        "bytes": s.bytes,
                        "replicas_target": s.replicas_target,
                        "fetched": s.fetched,
                        "fetched_bytes": s.fetched_bytes,
                        "fetch_failures": s.fetch_failures,
                        "verify_failures": s.verify_failures,
                        "gc_deleted": s.gc_deleted,
                    })
                ),
                Output::Text => {
                    println!("node             {:016x}", s.node_id);
                    println!("blobs            {} ({} bytes)", s.blobs, s.bytes);
                    println!("replicas target  {}", s.replicas_target);
                    println!("fetched          {} ({} bytes)", s.fetched, s.fetched_bytes);
                    println!("fetch failures   {}", s.fetch_failures);
                    println!("verify failures  {}", s.verify_failures);
                    println!("gc deleted       {}", s.gc_deleted);
                }
            }
        }
    }
    Ok(())
}
