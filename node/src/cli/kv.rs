//! `aspen kv`: read and write keys (put, get, del, cas, scan, compact).

use anyhow::{bail, Result};
use aspen_client::{Client, Consistency};
use aspen_kv::api::{prefix_end, RangeRequest};
use clap::{Args, Subcommand};
use serde_json::json;

use super::{ClientArgs, Output};

#[derive(Subcommand, Debug)]
pub enum KvCommand {
    /// Set KEY to VALUE.
    Put {
        key: String,
        value: String,
        /// Also print the previous value.
        #[arg(long)]
        prev: bool,
        /// Attach KEY to this lease (from `aspen lease grant`): it is deleted when the lease
        /// ends. A put without --lease detaches the key from its lease.
        #[arg(long, default_value_t = 0)]
        lease: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Read KEY (linearizable unless --serializable).
    Get {
        key: String,
        #[command(flatten)]
        read: ReadArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete KEY, or every key with prefix KEY (--prefix), or [KEY, END) (--end).
    Del {
        key: String,
        #[arg(long, conflicts_with = "end")]
        prefix: bool,
        #[arg(long)]
        end: Option<String>,
        /// Print the deleted key-values.
        #[arg(long)]
        prev: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Forget history before REVISION: reads at older revisions then fail with "compacted".
    Compact {
        revision: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Set KEY to NEW only if its current value is --expect (or it is absent, --absent).
    /// Exits with status 1 if the comparison failed (nothing is written then).
    Cas {
        key: String,
        new: String,
        /// The value KEY must have.
        #[arg(long, required_unless_present = "absent")]
        expect: Option<String>,
        /// KEY must not exist.
        #[arg(long, conflicts_with = "expect")]
        absent: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print every change to KEY, to the keys with --prefix P, or to [--from A, --to B), one
    /// event per line, until stopped (Ctrl-C). Starts at the next revision, or at --rev N
    /// (history back to the compaction point). Events come in revision order, each
    /// revision's together, and the watch survives member failures without missing or
    /// repeating one. Text: `PUT KEY VALUE` / `DELETE KEY`, with the revision.
    Watch {
        /// The key to watch (omit with --prefix or --from).
        #[arg(required_unless_present_any = ["prefix", "from"], conflicts_with_all = ["prefix", "from"])]
        key: Option<String>,
        /// Watch every key starting with P ("" for all keys).
        #[arg(long, conflicts_with = "from")]
        prefix: Option<String>,
        /// Watch [A, B) (B omitted: to the end of the key space).
        #[arg(long)]
        from: Option<String>,
        #[arg(long, requires = "from")]
        to: Option<String>,
        /// Start at this revision (0: the next one).
        #[arg(long, default_value_t = 0)]
        rev: u64,
        /// Also print each key's previous value.
        #[arg(long)]
        prev_kv: bool,
        /// Print a progress line (the current revision) after this many seconds without
        /// events (0: never).
        #[arg(long, default_value_t = 0.0)]
        progress: f64,
        /// Stop after this many events (0: never).
        #[arg(long, default_value_t = 0)]
        count: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List keys with PREFIX (all keys if omitted), or in [--from, --to).
    Scan {
        prefix: Option<String>,
        #[arg(long, conflicts_with = "prefix")]
        from: Option<String>,
        #[arg(long, requires = "from")]
        to: Option<String>,
        /// At most N keys (0: no limit; pages are fetched until done).
        #[arg(long, default_value_t = 0)]
        limit: u64,
        #[command(flatten)]
        read: ReadArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub async fn kv(cmd: KvCommand) -> Result<()> {
    let args = match &cmd {
        KvCommand::Put { client, .. }
        | KvCommand::Get { client, .. }
        | KvCommand::Del { client, .. }
        | KvCommand::Compact { client, .. }
        | KvCommand::Cas { client, .. }
        | KvCommand::Scan { client, .. }
        | KvCommand::Watch { client, .. } => client.clone(),
    };
    let c = args.client().await?;
    let result = kv_with(&c, cmd).await;
    c.close().await;
    result
}

async fn kv_with(c: &Client, cmd: KvCommand) -> Result<()> {
    match cmd {
        KvCommand::Put {
            key,
            value,
            prev,
            lease,
            client,
        } => {
            let (key, value) = (client.bytes(&key)?, client.bytes(&value)?);
            let r = if lease == 0 {
                c.put_with(key, value, prev).await?
            } else {
                c.put_with_lease(key, value, lease, prev).await?
            };
            match client.output {
                Output::Json => {
                    println!(
                        "{}",
                        json!({ "revision": r.revision, "prev": r.prev.as_ref().map(|kv| client.kv_json(kv)) })
                    )
                }
                Output::Text => {
                    if let Some(p) = &r.prev {
                        println!("prev {}", client.show(&p.value));
                    }
                    println!("revision {}", r.revision);
                }
            }
        }
        KvCommand::Get { key, read, client } => {
            let key_bytes = client.bytes(&key)?;
            let found = c.get_with(key_bytes, read.rev, read.consistency()).await?;
            match (client.output, &found) {
                (Output::Json, Some(kv)) => println!("{}", client.kv_json(kv)),
                (Output::Json, None) => println!("null"),
                (Output::Text, Some(kv)) => println!("{}", client.show(&kv.value)),
                (Output::Text, None) => {}
            }
            if found.is_none() {
                bail!("key '{key}' not found");
            }
        }
        KvCommand::Del {
            key,
            prefix,
            end,
            prev,
            client,
        } => {
            let start = client.bytes(&key)?;
            let end = match (prefix, end) {
                (true, _) => Some(prefix_end(&start)),
                (false, Some(e)) => Some(client.bytes(&e)?),
                (false, None) => None,
            };
            let r = c.delete_range(start, end, prev).await?;
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({ "revision": r.revision, "deleted": r.deleted,
                            "prev": r.prev.iter().map(|kv| client.kv_json(kv)).collect::<Vec<_>>() })
                ),
                Output::Text => {
                    for kv in &r.prev {
                        println!("{} {}", client.show(&kv.key), client.show(&kv.value));
                    }
                    println!("deleted {}", r.deleted);
                }
            }
        }
        KvCommand::Cas {
            key,
            new,
            expect,
            absent: _,
            client,
        } => {
            let expect = expect.map(|e| client.bytes(&e)).transpose()?;
            let r = c
                .compare_and_swap(client.bytes(&key)?, expect, client.bytes(&new)?)
                .await?;
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({ "swapped": r.succeeded, "revision": r.revision })
                ),
                Output::Text if r.succeeded => println!("revision {}", r.revision),
                Output::Text => {}
            }
            if !r.succeeded {
                bail!("'{key}' did not have the expected value; nothing written");
            }
        }
        KvCommand::Compact { revision, client } => {
            let current = c.compact(revision).await?;
            match client.output {
                Output::Json => {
                    println!("{}", json!({ "compacted": revision, "revision": current }))
                }
                Output::Text => println!("compacted history before revision {revision}"),
            }
        }
        KvCommand::Watch {
            key,
            prefix,
            from,
            to,
            rev,
            prev_kv,
            progress,
            count,
            client,
        } => {
            let max_progress = aspen_client::protocol::MAX_PROGRESS_EVERY_MS as f64 / 1000.0;
            if !(progress.is_finite() && (0.0..=max_progress).contains(&progress)) {
                bail!("--progress must be a number of seconds from 0 to {max_progress}");
            }
            let (start, end) = match (key, prefix, from) {
                (Some(k), _, _) => (client.bytes(&k)?, None),
                (None, Some(p), _) => {
                    let start = client.bytes(&p)?;
                    let end = prefix_end(&start);
                    (start, Some(end))
                }
                (None, None, Some(f)) => (
                    client.bytes(&f)?,
                    Some(match to {
                        Some(t) => client.bytes(&t)?,
                        None => Vec::new(),
                    }),
                ),
                (None, None, None) => bail!("name a KEY, --prefix or --from"),
            };
            watch(
                c,
                &client,
                aspen_client::WatchRequest {
                    start,
                    end,
                    from: rev,
                    after: None,
                    prev_kv,
                    progress_every_ms: (progress * 1000.0) as u64,
                },
                count,
            )
            .await?;
        }
        KvCommand::Scan {
            prefix,
            from,
            to,
            limit,
            read,
            client,
        } => {
            let consistency = read.consistency();
            let mut request = match (prefix, from) {
                (Some(p), _) => RangeRequest::prefix(client.bytes(&p)?),
                (None, Some(f)) => RangeRequest {
                    start: client.bytes(&f)?,
                    end: Some(match to {
                        Some(t) => client.bytes(&t)?,
                        None => vec![],
                    }),
                    limit: 0,
                    revision: 0,
                },
                (None, None) => RangeRequest {
                    start: vec![],
                    end: Some(vec![]),
                    limit: 0,
                    revision: 0,
                },
            };
            request.revision = read.rev;
            let mut all = Vec::new();
            let mut revision;
            loop {
                let remaining = if limit == 0 {
                    0
                } else {
                    limit - all.len() as u64
                };
                request.limit = remaining.min(aspen_kv::limits::MAX_RANGE_LIMIT);
                let page = c.range(request.clone(), consistency).await?;
                revision = page.revision;
                let more = page.more;
                if let Some(last) = page.kvs.last() {
                    request.start = last.key.iter().copied().chain([0]).collect();
                }
                all.extend(page.kvs);
                if !more || (limit != 0 && all.len() as u64 >= limit) {
                    break;
                }
                // Continue consistently at the revision of the first page.
                request.revision = revision;
            }
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({ "revision": revision, "kvs": all.iter().map(|kv| client.kv_json(kv)).collect::<Vec<_>>() })
                ),
                Output::Text => {
                    for kv in &all {
                        println!("{} {}", client.show(&kv.key), client.show(&kv.value));
                    }
                }
            }
        }
    }
    Ok(())
}

/// How a read is served: shared by `kv get` and `kv scan`.
#[derive(Args, Debug, Clone, Copy)]
pub struct ReadArgs {
    /// Read as of this revision (0: the current one).
    #[arg(long, default_value_t = 0)]
    pub rev: u64,
    /// Serve from the contacted node's local state (faster, may be stale).
    #[arg(long)]
    pub serializable: bool,
}

impl ReadArgs {
    fn consistency(&self) -> Consistency {
        Consistency::serializable_if(self.serializable)
    }
}

/// Prints a watch's events, one per line, until `count` events (0: forever) or an error.
async fn watch(
    c: &Client,
    client: &ClientArgs,
    request: aspen_client::WatchRequest,
    count: u64,
) -> Result<()> {
    use aspen_client::WatchUpdate;
    use aspen_kv::api::EventKind;
    use futures::StreamExt;
    let mut watch = c.watch(request);
    let mut seen = 0u64;
    while let Some(update) = watch.next().await {
        match update? {
            WatchUpdate::Events { events, .. } => {
                for e in events {
                    let kind = match e.kind {
                        EventKind::Put => "PUT",
                        EventKind::Delete => "DELETE",
                    };
                    match client.output {
                        Output::Json => println!(
                            "{}",
                            json!({
                                "type": kind,
                                "revision": e.kv.mod_revision,
                                "kv": client.kv_json(&e.kv),
                                "prev_kv": e.prev_kv.as_ref().map(|p| client.kv_json(p)),
                            })
                        ),
                        Output::Text => {
                            let mut line =
                                format!("{} {kind} {}", e.kv.mod_revision, client.show(&e.kv.key));
                            if e.kind == EventKind::Put {
                                line.push(' ');
                                line.push_str(&client.show(&e.kv.value));
                            }
                            if let Some(p) = &e.prev_kv {
                                line.push_str(&format!(" (was {})", client.show(&p.value)));
                            }
                            println!("{line}");
                        }
                    }
                    seen += 1;
                    if count > 0 && seen >= count {
                        return Ok(());
                    }
                }
            }
            WatchUpdate::Progress { revision } => match client.output {
                Output::Json => println!("{}", json!({ "type": "PROGRESS", "revision": revision })),
                Output::Text => println!("{revision} PROGRESS"),
            },
        }
    }
    Ok(())
}
