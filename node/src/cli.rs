//! Command-line interface: argument parsing and the commands that talk to a cluster.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use aspen_client::{Client, ClientOptions, ClusterStatus, ClusterTicket, Consistency, NodeTicket};
use aspen_kv::api::{prefix_end, KeyValue, RangeRequest};
use aspen_trust::{ClusterKey, SignedRecord, RECORD_SALT};
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

/// How to reach a cluster: shared by every command that talks to one.
#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// The cluster: a ticket (aspencluster1..., e.g. DATA_DIR/cluster.ticket) or its public
    /// key (64 hex digits, as `aspen cluster identity` prints), found through the Mainline DHT
    /// or the record cache.
    #[arg(long, env = "ASPEN_CLUSTER", hide_env_values = true, global = true)]
    pub cluster: Option<String>,
    #[command(flatten)]
    pub dht: crate::resolve::DhtArgs,
    /// Directory of cached cluster records (default: $XDG_CACHE_HOME/aspen/records or
    /// ~/.cache/aspen/records). A cached record is used when the DHT cannot be reached.
    #[arg(long, env = "ASPEN_RECORD_CACHE", global = true, value_name = "DIR")]
    pub record_cache: Option<PathBuf>,
    /// Give up after this many seconds (across retries).
    #[arg(long, default_value_t = 20.0, global = true)]
    pub timeout: f64,
    /// Keys and values on the command line and in output are hex-encoded bytes.
    #[arg(long, global = true)]
    pub hex: bool,
    /// The key file this client is known by (created 0600 if missing). Default:
    /// $XDG_CONFIG_HOME/aspen/identity.key or ~/.config/aspen/identity.key.
    #[arg(long, env = "ASPEN_IDENTITY", global = true, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// A capability token (from `aspen auth token issue --to <this identity>`), presented
    /// once on every connection.
    #[arg(long, env = "ASPEN_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
}

/// [`ConnectArgs`] and the output format: what most commands take.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t, global = true)]
    pub output: Output,
}

impl std::ops::Deref for ClientArgs {
    type Target = ConnectArgs;
    fn deref(&self) -> &ConnectArgs {
        &self.connect
    }
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
    /// Automerge documents: create, edit (JSON patch or raw changes), read, list, delete.
    #[command(subcommand)]
    Doc(crate::doc_cli::DocCommand),
    /// Blobs (BLAKE3-addressed files): add, get (verified), list, tag, untag, stat, stats.
    #[command(subcommand)]
    Blob(crate::blob_cli::BlobCommand),
    /// iroh-docs namespaces every member hosts: create, set, get, list, share, import.
    #[command(subcommand)]
    Docs(crate::namespace_cli::DocsCommand),
    /// Access control: who am I, grants, roles, capability tokens, admin recovery.
    #[command(subcommand)]
    Auth(crate::auth_cli::AuthCommand),
    /// Start a local cluster of N nodes with embedded defaults, in the foreground.
    Up(crate::up::UpArgs),
    /// Load generator, shaped like etcd's benchmark tool.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// Find a cluster by its public key (Mainline DHT, else the record cache) and print its
    /// verified record: members, addresses, seq, expiry.
    Discover {
        /// The cluster key (64 hex digits, from `aspen cluster identity`).
        cluster_key: String,
        #[command(flatten)]
        dht: crate::resolve::DhtArgs,
        /// Directory of cached cluster records (see `--record-cache` of the kv commands).
        #[arg(long, env = "ASPEN_RECORD_CACHE", value_name = "DIR")]
        record_cache: Option<PathBuf>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
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
    /// TOML config file (keys: data_dir, bind, snapshot_every, keep_log_after_snapshot, and a
    /// [dht] table: enabled, bootstrap, request_timeout_ms, republish_interval_secs,
    /// record_validity_secs, and a [blobs] table: replicas, gc_grace_secs, gc_interval_secs).
    /// Flags override it.
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
    #[command(flatten)]
    pub dht: crate::resolve::DhtArgs,
    /// How many members should hold each referenced blob (default 3, capped at the cluster
    /// size). Use the same value on every member.
    #[arg(long, value_name = "N")]
    pub blob_replicas: Option<usize>,
    /// Seconds an unreferenced blob (untagged upload, or last tag removed) is kept before it
    /// is deleted (default 3600).
    #[arg(long, value_name = "SECS")]
    pub blob_gc_grace_secs: Option<u64>,
    /// Seconds between looks for unreferenced blobs (default 60).
    #[arg(long, value_name = "SECS")]
    pub blob_gc_interval_secs: Option<u64>,
    /// Seconds between DHT republishes of the cluster record (leader only).
    #[arg(long, value_name = "SECS")]
    pub dht_republish_secs: Option<u64>,
    /// Seconds a published cluster record stays valid.
    #[arg(long, value_name = "SECS")]
    pub record_validity_secs: Option<u64>,
    /// Join the cluster with this public key (found through the DHT or the record cache),
    /// using the invitation in `--invite-file`. Until it is a member, the node takes Raft
    /// traffic only from nodes certified by this key.
    #[arg(long, value_name = "CLUSTER_KEY", requires = "invite_file")]
    pub join: Option<String>,
    /// File holding the invitation token from `aspen cluster invite` (64 hex digits), or `-`
    /// for standard input. (Not a flag value: command lines are visible to other users.)
    #[arg(long, value_name = "FILE", requires = "join")]
    pub invite_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Make a node a new one-member cluster, with a new cluster key and this client's
    /// identity as its first admin. Needs the node's bootstrap secret: give its data
    /// directory, or its ticket and --bootstrap-secret.
    Init {
        /// The node's data directory (reads node.ticket and bootstrap.secret there), or its
        /// ticket (DATA_DIR/node.ticket) with --bootstrap-secret.
        node: String,
        /// The node's bootstrap secret file (DATA_DIR/bootstrap.secret), when NODE is a
        /// ticket.
        #[arg(long, value_name = "FILE")]
        bootstrap_secret: Option<PathBuf>,
        /// A name for the cluster (published in its DHT record; at most 63 bytes).
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Add a node to the cluster: learner until caught up, then voter. Needs cluster:admin
    /// and the new node's bootstrap secret (give its data directory, or its ticket and
    /// --bootstrap-secret); a node started with --join uses `aspen cluster invite` instead.
    Add {
        /// The new node's data directory, or its ticket (DATA_DIR/node.ticket) with
        /// --bootstrap-secret.
        node: String,
        /// The new node's bootstrap secret file (DATA_DIR/bootstrap.secret), when NODE is a
        /// ticket.
        #[arg(long, value_name = "FILE")]
        bootstrap_secret: Option<PathBuf>,
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
    /// The cluster's public key (its name on the DHT), and with `-o json` the exact BEP-44
    /// coordinates (public key, salt, seq) to fetch its record with any Mainline client.
    Identity {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Create a single-use invitation for one node to join with
    /// `aspen node run --join CLUSTER_KEY --invite-file FILE`. The token is shown only once.
    /// Needs cluster:admin.
    Invite {
        /// How long the invitation is valid, in seconds (at most 7 days).
        #[arg(long, default_value_t = 3600, value_name = "SECS")]
        valid_for: u64,
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

impl ConnectArgs {
    /// Timeouts, the identity (loaded or created off the executor) and the token.
    pub async fn options(&self) -> Result<ClientOptions> {
        if !(self.timeout.is_finite() && self.timeout > 0.0) {
            bail!("--timeout must be a positive number of seconds");
        }
        let deadline = Duration::from_secs_f64(self.timeout);
        let key = crate::auth_cli::load_identity(self.identity.clone()).await?;
        let token = match &self.token {
            Some(t) => Some(
                t.parse::<aspen_trust::CapabilityToken>()
                    .context("--token / ASPEN_TOKEN is not a capability token")?
                    .encode(),
            ),
            None => None,
        };
        Ok(ClientOptions {
            deadline,
            attempt_timeout: deadline.min(Duration::from_secs(5)),
            identity: Some(iroh::SecretKey::from_bytes(&key.secret_bytes())),
            token,
            ..Default::default()
        })
    }

    fn cache_dir(&self) -> Option<PathBuf> {
        self.record_cache
            .clone()
            .or_else(crate::resolve::default_cache_dir)
    }

    /// The cluster key given with `--cluster`, if it is a key rather than a ticket.
    fn cluster_key(&self) -> Result<Option<ClusterKey>> {
        match &self.cluster {
            Some(s) if !s.trim().starts_with("aspen") => {
                s.parse::<ClusterKey>().map(Some).with_context(|| {
                    "--cluster is neither a ticket (aspencluster1...) nor a cluster key"
                })
            }
            _ => Ok(None),
        }
    }

    /// The members to contact: from the ticket, or from the cluster's verified record.
    pub async fn ticket(&self) -> Result<ClusterTicket> {
        let Some(t) = &self.cluster else {
            bail!("no cluster given: pass --cluster <ticket or cluster key> or set ASPEN_CLUSTER (see DATA_DIR/cluster.ticket)");
        };
        match self.cluster_key()? {
            Some(key) => {
                let resolved = crate::resolve::resolve(&key, &self.dht, self.cache_dir()).await?;
                Ok(crate::resolve::ticket_of(&resolved.record))
            }
            None => t.parse().context("invalid cluster ticket"),
        }
    }

    /// Connects; given a cluster key, also checks that the cluster reached holds that key.
    pub async fn client(&self) -> Result<Client> {
        Ok(self.clients(1).await?.remove(0))
    }

    /// `n` independent connections (for the load generator); the cluster is resolved and
    /// checked once.
    pub async fn clients(&self, n: usize) -> Result<Vec<Client>> {
        let ticket = self.ticket().await?;
        let options = self.options().await?;
        let mut clients = Vec::with_capacity(n.max(1));
        for _ in 0..n.max(1) {
            clients.push(Client::connect_with(ticket.clone(), options.clone()).await?);
        }
        if let Some(key) = self.cluster_key()? {
            if let Err(e) = crate::resolve::verify_cluster(&clients[0], &key).await {
                for c in &clients {
                    c.close().await;
                }
                return Err(e);
            }
        }
        Ok(clients)
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

/// A node named by its data directory (ticket and bootstrap secret read there) or by its
/// ticket and a bootstrap secret file.
pub async fn node_and_secret(
    node: &str,
    secret: Option<PathBuf>,
) -> Result<(NodeTicket, [u8; 32])> {
    let node = node.to_string();
    tokio::task::spawn_blocking(move || {
        let dir = std::path::Path::new(&node);
        if dir.is_dir() {
            let ticket_path = dir.join(crate::server::NODE_TICKET_FILE);
            let ticket = std::fs::read_to_string(&ticket_path)
                .with_context(|| format!("cannot read {}", ticket_path.display()))?
                .parse::<NodeTicket>()
                .with_context(|| format!("invalid ticket in {}", ticket_path.display()))?;
            let secret = crate::keyfile::read_bootstrap_secret(secret.as_deref().unwrap_or(dir))?;
            return Ok((ticket, secret));
        }
        let ticket: NodeTicket = node
            .parse()
            .context("invalid node ticket (NODE must be a data directory or a node ticket)")?;
        let Some(path) = secret else {
            bail!("given a node ticket, pass --bootstrap-secret DATA_DIR/bootstrap.secret (or give the node's data directory instead)");
        };
        Ok((ticket, crate::keyfile::read_bootstrap_secret(&path)?))
    })
    .await?
}

fn parse_node_id(s: &str) -> Result<u64> {
    let s = s.trim().trim_start_matches("0x");
    if s.is_empty() || s.len() > 16 {
        bail!("node id '{s}' must be 1-16 hex digits (as shown by `aspen cluster status`)");
    }
    u64::from_str_radix(s, 16).with_context(|| format!("node id '{s}' is not hex"))
}

fn print_identity(i: &aspen_client::ClusterIdentity, output: Output) -> Result<()> {
    let record = match &i.record {
        Some(bytes) => Some(SignedRecord::decode(bytes).context("the node's stored record")?),
        None => None,
    };
    let key = hex::encode(i.cluster_key);
    match output {
        Output::Json => {
            let salt = String::from_utf8_lossy(RECORD_SALT);
            let target = hex::encode(aspen_discovery::dht_target(&ClusterKey::from_bytes(
                &i.cluster_key,
            )?));
            println!(
                "{}",
                json!({
                    "cluster_key": key,
                    "name": i.name,
                    "bep44": {
                        "public_key": key,
                        "salt": salt,
                        "salt_hex": hex::encode(RECORD_SALT),
                        "target": target,
                        "seq": record.as_ref().map(|r| r.seq),
                    },
                })
            );
        }
        Output::Text => {
            println!("cluster key  {key}");
            if !i.name.is_empty() {
                println!("name         {}", i.name);
            }
            match &record {
                Some(r) => println!("record seq   {}", r.seq),
                None => println!("record seq   none (not published: DHT off or not yet)"),
            }
        }
    }
    Ok(())
}

/// `aspen discover`: resolve and print a cluster's record.
pub async fn discover(
    key: &str,
    dht: &crate::resolve::DhtArgs,
    cache: Option<PathBuf>,
    output: Output,
) -> Result<()> {
    let key: ClusterKey = key.parse().context("invalid cluster key")?;
    let cache = cache.or_else(crate::resolve::default_cache_dir);
    let r = crate::resolve::resolve(&key, dht, cache).await?;
    let source = match r.source {
        aspen_discovery::Source::Dht => "dht",
        aspen_discovery::Source::Cache => "cache",
    };
    let members: Vec<_> = r
        .record
        .members
        .iter()
        .map(|m| {
            let ticket = NodeTicket {
                endpoint_id: m.node,
                addrs: m.addrs.clone(),
            };
            json!({
                "node_id": format!("{:016x}", ticket.node_id()),
                "endpoint_id": hex::encode(m.node),
                "addrs": m.addrs,
                "ticket": ticket.to_string(),
            })
        })
        .collect();
    match output {
        Output::Json => println!(
            "{}",
            json!({
                "cluster_key": key.to_string(),
                "name": r.record.name,
                "seq": r.signed.seq,
                "issued_at": r.record.issued_at,
                "expires_at": r.record.expires_at,
                "relay_url": r.record.relay_url,
                "source": source,
                "dht_problem": r.dht_problem,
                "members": members,
                "ticket": crate::resolve::ticket_of(&r.record).to_string(),
            })
        ),
        Output::Text => {
            println!("cluster  {key}");
            if !r.record.name.is_empty() {
                println!("name     {}", r.record.name);
            }
            println!(
                "record   seq {}, from the {source}, expires at Unix time {}",
                r.signed.seq, r.record.expires_at
            );
            if let Some(p) = &r.dht_problem {
                println!("note     {p}");
            }
            println!("members:");
            for m in &r.record.members {
                let ticket = NodeTicket {
                    endpoint_id: m.node,
                    addrs: m.addrs.clone(),
                };
                let addrs: Vec<String> = m.addrs.iter().map(|a| a.to_string()).collect();
                println!("  {:016x}  {}", ticket.node_id(), addrs.join(","));
            }
            println!("ticket   {}", crate::resolve::ticket_of(&r.record));
        }
    }
    Ok(())
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
            node,
            bootstrap_secret,
            name,
            client,
        } => {
            let (node, secret) = node_and_secret(&node, bootstrap_secret).await?;
            let c = Client::connect_node(node, client.options().await?).await?;
            let status = c.init_cluster(name, secret).await;
            let identity = match &status {
                Ok(_) => c.identity().await.ok(),
                Err(_) => None,
            };
            c.close().await;
            let status = status?;
            if client.output == Output::Text {
                if let Some((_, i)) = identity {
                    println!("cluster key {}", hex::encode(i.cluster_key));
                }
            }
            print_status(&status, client.output);
        }
        ClusterCommand::Identity { client } => {
            let c = client.client().await?;
            let identity = c.identity().await;
            c.close().await;
            print_identity(&identity?.1, client.output)?;
        }
        ClusterCommand::Invite { valid_for, client } => {
            let c = client.client().await?;
            let invite = c.create_invite(Duration::from_secs(valid_for)).await;
            let identity = match &invite {
                Ok(_) => c.identity().await.map(|(_, i)| i).ok(),
                Err(_) => None,
            };
            c.close().await;
            let (token, expires_at) = invite?;
            let key = identity
                .map(|i| hex::encode(i.cluster_key))
                .unwrap_or_else(|| "CLUSTER_KEY".into());
            let token = hex::encode(token);
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({ "token": token, "expires_at": expires_at, "cluster_key": key })
                ),
                Output::Text => {
                    println!("invitation (single use, expires at Unix time {expires_at}):");
                    println!("  echo {token} > invite.token");
                    println!("  aspen node run --join {key} --invite-file invite.token");
                }
            }
        }
        ClusterCommand::Add {
            node,
            bootstrap_secret,
            client,
        } => {
            let (node, secret) = node_and_secret(&node, bootstrap_secret).await?;
            let c = client.client().await?;
            let id = c.add_member(node, secret).await;
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
