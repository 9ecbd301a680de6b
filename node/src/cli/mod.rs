//! Command-line interface: the top-level commands and what they share (connecting to a
//! cluster, output formats); each command group lives in its own module.

pub mod auth;
pub mod blob;
pub mod cluster;
pub mod coordination;
pub mod doc;
pub mod fed;
pub mod kv;
pub mod lease;
pub mod namespace;
pub mod testnet;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use aspen_client::{Client, ClientOptions, ClusterTicket, NodeTicket};
use aspen_kv::api::KeyValue;
use aspen_trust::ClusterKey;
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
    Cluster(cluster::ClusterCommand),
    /// Read and write keys.
    #[command(subcommand)]
    Kv(kv::KvCommand),
    /// Leases: keys that live only while a lease is kept alive (grant, keepalive, ttl,
    /// list, revoke).
    #[command(subcommand)]
    Lease(lease::LeaseCommand),
    /// Run a command while holding a distributed lock (its fencing token in
    /// ASPEN_LOCK_TOKEN), or hold the lock until stopped.
    Lock(coordination::LockArgs),
    /// Campaign in an election and lead until stopped, or --listen to the leader.
    Elect(coordination::ElectArgs),
    /// Automerge documents: create, edit (JSON patch or raw changes), read, list, delete.
    #[command(subcommand)]
    Doc(doc::DocCommand),
    /// Blobs (BLAKE3-addressed files): add, get (verified), list, tag, untag, stat, stats.
    #[command(subcommand)]
    Blob(blob::BlobCommand),
    /// iroh-docs namespaces every member hosts: create, set, get, list, share, import.
    #[command(subcommand)]
    Docs(namespace::DocsCommand),
    /// Access control: who am I, grants, roles, capability tokens, admin recovery.
    #[command(subcommand)]
    Auth(auth::AuthCommand),
    /// Federation with other clusters: what this cluster exports (and to whom), and what it
    /// follows (pulls, verified) from others.
    #[command(subcommand)]
    Fed(fed::FedCommand),
    /// Start a local cluster of N nodes with embedded defaults, in the foreground.
    Up(crate::up::UpArgs),
    /// Load generator, shaped like etcd's benchmark tool.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// Run a local Mainline DHT on 127.0.0.1 until stopped, for finding clusters by key with
    /// nothing leaving the machine: prints the bootstrap addresses to pass as
    /// `--dht-bootstrap` to nodes and clients.
    DhtTestnet {
        /// How many DHT nodes.
        #[arg(long, default_value_t = 8)]
        nodes: usize,
        /// Also write the bootstrap addresses to this file (for scripts to wait on).
        #[arg(long, value_name = "FILE")]
        bootstrap_file: Option<PathBuf>,
    },
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
    /// TOML config file (keys: data_dir, bind, snapshot_every, keep_log_after_snapshot,
    /// auto_compaction_mode, auto_compaction_retention, metrics, metrics_token_file,
    /// automerge_repo, etcd_api, busy_poll_us, and a [dht] table: enabled, bootstrap, request_timeout_ms, republish_interval_secs,
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
    /// Compact history automatically, keeping this much (etcd's flag): a time in periodic
    /// mode ("90s", "30m", "12h"; a bare number is hours), a number of revisions in
    /// revision mode. 0: never (the default; `aspen kv compact` compacts by hand).
    #[arg(long, value_name = "RETENTION")]
    pub auto_compaction_retention: Option<String>,
    /// How --auto-compaction-retention is read.
    #[arg(long, value_enum)]
    pub auto_compaction_mode: Option<crate::config::CompactionMode>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9100 (port 0: any
    /// free port; the node prints where). Off by default. A non-loopback address needs
    /// --metrics-token-file.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// File holding a bearer token every scrape must present (`Authorization: Bearer ...`;
    /// Prometheus' `authorization.credentials_file`).
    #[arg(long, value_name = "FILE", requires = "metrics")]
    pub metrics_token_file: Option<PathBuf>,
    /// Serve automerge-repo's WebSocket sync protocol at ws://ADDR/ (e.g. 127.0.0.1:3030;
    /// port 0: any free port, the node prints where), so JavaScript apps using
    /// @automerge/automerge-repo with its WebSocket adapter sync the cluster's documents.
    /// Document id X is the Aspen document `automerge/X`. Every connection presents a
    /// bearer token in the URL (ws://ADDR/?token=aspen-token-v1:...; see `aspen auth token
    /// issue --bearer`). Plain WebSocket: put TLS in front of a non-loopback address.
    #[arg(long, value_name = "ADDR")]
    pub automerge_repo: Option<std::net::SocketAddr>,
    /// Serve etcd's v3 gRPC API at ADDR (e.g. 127.0.0.1:2379; port 0: any free port, the
    /// node prints where), so etcdctl and etcd's client libraries use the cluster's key
    /// space. Every call presents a bearer token: etcdctl --user NAME:TOKEN (any name; the
    /// token from `aspen auth token issue --bearer`). etcd's revisions are Aspen's plus one.
    /// Plain gRPC: put TLS in front of a non-loopback address.
    #[arg(long, value_name = "ADDR")]
    pub etcd_api: Option<std::net::SocketAddr>,
    /// Microseconds the node's async worker keeps spinning after each request from an
    /// authorized caller or a member, instead of sleeping in the kernel (default 300; 0:
    /// off; at most 10000). Waking a sleeping thread costs tens of microseconds on a virtual
    /// machine, several times per write: spinning cuts a lone put's latency by about a
    /// quarter, for one core kept busy while requests keep coming. An idle node never spins,
    /// and the spinner stops for a second whenever it had to wait for a CPU (busy cores).
    #[arg(long, value_name = "MICROSECONDS", env = "ASPEN_BUSY_POLL_US")]
    pub busy_poll_us: Option<u64>,
    /// Seconds between the leader's automatic compaction checks (tests only).
    #[arg(long, hide = true)]
    pub auto_compaction_every: Option<f64>,
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
    /// Milliseconds between pulls of each followed resource (default 30000, +-25% jitter).
    #[arg(long, value_name = "MS")]
    pub fed_pull_interval_ms: Option<u64>,
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

impl ConnectArgs {
    /// Timeouts, the identity (loaded or created off the executor) and the token.
    pub async fn options(&self) -> Result<ClientOptions> {
        if !(self.timeout.is_finite() && self.timeout > 0.0) {
            bail!("--timeout must be a positive number of seconds");
        }
        let deadline = Duration::from_secs_f64(self.timeout);
        let key = auth::load_identity(self.identity.clone()).await?;
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

    pub(crate) fn cache_dir(&self) -> Option<PathBuf> {
        self.record_cache
            .clone()
            .or_else(crate::resolve::default_cache_dir)
    }

    /// The cluster key given with `--cluster`, if it is a key rather than a ticket.
    pub(crate) fn cluster_key(&self) -> Result<Option<ClusterKey>> {
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

    pub(crate) fn bytes(&self, s: &str) -> Result<Vec<u8>> {
        if self.hex {
            hex::decode(s).with_context(|| format!("'{s}' is not hex"))
        } else {
            Ok(s.as_bytes().to_vec())
        }
    }

    pub(crate) fn show(&self, b: &[u8]) -> String {
        if self.hex {
            hex::encode(b)
        } else {
            match std::str::from_utf8(b) {
                Ok(s) => s.to_string(),
                Err(_) => b.escape_ascii().to_string(),
            }
        }
    }

    pub(crate) fn kv_json(&self, kv: &KeyValue) -> serde_json::Value {
        json!({
            "key": self.show(&kv.key),
            "value": self.show(&kv.value),
            "create_revision": kv.create_revision,
            "mod_revision": kv.mod_revision,
            "version": kv.version,
            "lease": kv.lease,
        })
    }
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
