//! Command-line interface: argument parsing and the commands that talk to a cluster.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use aspen_client::{Client, ClientOptions, ClusterStatus, ClusterTicket, Consistency, NodeTicket};
use aspen_kv::api::{prefix_end, KeyValue, RangeRequest};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

/// Aspen: a strongly consistent, local-first key-value cluster over iroh.
///
/// Start a local 3-node cluster with `aspen up`, then use `aspen kv ...` in another shell
/// (with ASPEN_CLUSTER set as `aspen up` prints).
#[derive(Parser, Debug)]
#[command(name = "aspen", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Output format.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    #[default]
    Text,
    Json,
}

/// Options shared by every command that talks to a cluster.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Cluster ticket (aspencluster1...), e.g. the contents of DATA_DIR/cluster.ticket.
    #[arg(long, env = "ASPEN_CLUSTER", hide_env_values = true, global = true)]
    pub cluster: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t, global = true)]
    pub output: Output,
    /// Give up after this many seconds (across retries).
    #[arg(long, default_value_t = 20.0, global = true)]
    pub timeout: f64,
    /// Keys and values on the command line and in output are hex-encoded bytes.
    #[arg(long, global = true)]
    pub hex: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Form and inspect a cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Read and write keys.
    #[command(subcommand)]
    Kv(KvCommand),
    /// Start a local cluster of N nodes with embedded defaults, in the foreground.
    Up(crate::up::UpArgs),
    /// Load generator, shaped like etcd's benchmark tool.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Run a node in the foreground until interrupted (Ctrl-C or SIGTERM).
    ///
    /// Writes DIR/node.ticket once listening and DIR/cluster.ticket while it is a member.
    Run(RunArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Data directory (key, store, tickets). Default: ./aspen-data, or the config file's.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:7700. Default: 127.0.0.1 and the previous run's
    /// port (or a free one).
    #[arg(long)]
    pub bind: Option<std::net::SocketAddr>,
    /// TOML config file (keys: data_dir, bind, snapshot_every, keep_log_after_snapshot).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Take a snapshot every N log entries.
    #[arg(long)]
    pub snapshot_every: Option<u64>,
    /// Log entries to keep behind a snapshot.
    #[arg(long)]
    pub keep_log_after_snapshot: Option<u64>,
    /// Run with a deliberate bug (fault-test negative controls only). Never use this.
    #[arg(long, hide = true, value_enum)]
    pub unsafe_test_fault: Option<crate::config::TestFault>,
    /// Let clients inject network faults into this node's member traffic (fault tests only).
    #[arg(long, hide = true)]
    pub unsafe_allow_fault_injection: bool,
    /// Exit when standard input closes (used by `aspen up` so nodes never outlive it).
    #[arg(long, hide = true)]
    pub exit_on_stdin_close: bool,
    /// Output format of the start-up line.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Make the node in NODE_TICKET a new one-member cluster.
    Init {
        /// The node's ticket (DATA_DIR/node.ticket).
        node_ticket: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Add a node to the cluster: learner until caught up, then voter.
    Add {
        /// The new node's ticket (its DATA_DIR/node.ticket).
        node_ticket: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a node (by the 16-hex-digit id from `cluster status`).
    Remove {
        node_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Members, leader, term, commit and applied index, revision.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum KvCommand {
    /// Set KEY to VALUE.
    Put {
        key: String,
        value: String,
        /// Also print the previous value.
        #[arg(long)]
        prev: bool,
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

impl ClientArgs {
    fn options(&self) -> Result<ClientOptions> {
        if !(self.timeout.is_finite() && self.timeout > 0.0) {
            bail!("--timeout must be a positive number of seconds");
        }
        let deadline = Duration::from_secs_f64(self.timeout);
        Ok(ClientOptions {
            deadline,
            attempt_timeout: deadline.min(Duration::from_secs(5)),
        })
    }

    pub fn ticket(&self) -> Result<ClusterTicket> {
        let Some(t) = &self.cluster else {
            bail!("no cluster given: pass --cluster <ticket> or set ASPEN_CLUSTER (see DATA_DIR/cluster.ticket)");
        };
        t.parse().context("invalid cluster ticket")
    }

    pub async fn client(&self) -> Result<Client> {
        Ok(Client::connect_with(self.ticket()?, self.options()?).await?)
    }

    fn bytes(&self, s: &str) -> Result<Vec<u8>> {
        if self.hex {
            hex::decode(s).with_context(|| format!("'{s}' is not hex"))
        } else {
            Ok(s.as_bytes().to_vec())
        }
    }

    fn show(&self, b: &[u8]) -> String {
        if self.hex {
            hex::encode(b)
        } else {
            match std::str::from_utf8(b) {
                Ok(s) => s.to_string(),
                Err(_) => b.escape_ascii().to_string(),
            }
        }
    }

    fn kv_json(&self, kv: &KeyValue) -> serde_json::Value {
        json!({
            "key": self.show(&kv.key),
            "value": self.show(&kv.value),
            "create_revision": kv.create_revision,
            "mod_revision": kv.mod_revision,
            "version": kv.version,
        })
    }
}

fn parse_node_id(s: &str) -> Result<u64> {
    let s = s.trim().trim_start_matches("0x");
    if s.is_empty() || s.len() > 16 {
        bail!("node id '{s}' must be 1-16 hex digits (as shown by `aspen cluster status`)");
    }
    u64::from_str_radix(s, 16).with_context(|| format!("node id '{s}' is not hex"))
}

fn print_status(s: &ClusterStatus, output: Output) {
    if output == Output::Json {
        let members: Vec<_> = s
            .members
            .iter()
            .map(|m| {
                json!({
                    "node_id": format!("{:016x}", m.node_id),
                    "voter": m.voter,
                    "leader": s.leader == Some(m.node_id),
                    "addrs": m.node.addrs,
                    "ticket": m.node.to_string(),
                })
            })
            .collect();
        let v = json!({
            "node_id": format!("{:016x}", s.node_id),
            "initialized": s.initialized,
            "leader": s.leader.map(|l| format!("{l:016x}")),
            "term": s.term,
            "commit_index": s.commit_index,
            "applied_index": s.applied_index,
            "last_log_index": s.last_log_index,
            "snapshot_index": s.snapshot_index,
            "revision": s.revision,
            "compacted_revision": s.compacted_revision,
            "members": members,
        });
        println!("{v}");
        return;
    }
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    println!("node      {:016x}", s.node_id);
    println!(
        "leader    {}",
        s.leader
            .map(|l| format!("{l:016x}"))
            .unwrap_or_else(|| "none".into())
    );
    println!("term      {}", s.term);
    println!("commit    {}", opt(s.commit_index));
    println!("applied   {}", opt(s.applied_index));
    println!("revision  {}", s.revision);
    println!("members:");
    for m in &s.members {
        let role = if s.leader == Some(m.node_id) {
            "leader"
        } else if m.voter {
            "voter"
        } else {
            "learner"
        };
        let addrs: Vec<String> = m.node.addrs.iter().map(|a| a.to_string()).collect();
        println!("  {:016x}  {role:<7}  {}", m.node_id, addrs.join(","));
    }
}

pub async fn cluster(cmd: ClusterCommand) -> Result<()> {
    match cmd {
        ClusterCommand::Init {
            node_ticket,
            client,
        } => {
            let node: NodeTicket = node_ticket.parse().context("invalid node ticket")?;
            let c = Client::connect_node(node, client.options()?).await?;
            let status = c.init_cluster().await;
            c.close().await;
            print_status(&status?, client.output);
        }
        ClusterCommand::Add {
            node_ticket,
            client,
        } => {
            let node: NodeTicket = node_ticket.parse().context("invalid node ticket")?;
            let c = client.client().await?;
            let id = c.add_member(node).await;
            c.close().await;
            let id = id?;
            match client.output {
                Output::Json => println!("{}", json!({ "added": format!("{id:016x}") })),
                Output::Text => println!("added {id:016x}"),
            }
        }
        ClusterCommand::Remove { node_id, client } => {
            let id = parse_node_id(&node_id)?;
            let c = client.client().await?;
            let r = c.remove_member(id).await;
            c.close().await;
            r?;
            match client.output {
                Output::Json => println!("{}", json!({ "removed": format!("{id:016x}") })),
                Output::Text => println!("removed {id:016x}"),
            }
        }
        ClusterCommand::Status { client } => {
            let c = client.client().await?;
            let status = c.status().await;
            c.close().await;
            print_status(&status?, client.output);
        }
    }
    Ok(())
}

pub async fn kv(cmd: KvCommand) -> Result<()> {
    let args = match &cmd {
        KvCommand::Put { client, .. }
        | KvCommand::Get { client, .. }
        | KvCommand::Del { client, .. }
        | KvCommand::Compact { client, .. }
        | KvCommand::Cas { client, .. }
        | KvCommand::Scan { client, .. } => client.clone(),
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
            client,
        } => {
            let r = c
                .put_with(client.bytes(&key)?, client.bytes(&value)?, prev)
                .await?;
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
