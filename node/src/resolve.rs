//! Finding a cluster by its public key: DHT options shared by the CLI and `node run`, record
//! resolution (DHT, then the on-disk cache), and checking that the node we reached really
//! serves that cluster.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use aspen_client::{Client, ClusterTicket, NodeTicket};
use aspen_discovery::{ClusterDht, DhtConfig, RecordCache, Resolved, Resolver};
use aspen_trust::{ClusterKey, ClusterRecord, NodeCertificate};
use clap::Args;

use crate::config::DhtSettings;
use crate::server::identity::unix_now;

/// Mainline DHT options (for `node run` and for every command given a cluster key).
#[derive(Args, Debug, Clone, Default)]
pub struct DhtArgs {
    /// DHT bootstrap nodes (host:port, comma-separated) that REPLACE the public Mainline
    /// bootstrap nodes: a private DHT.
    #[arg(
        long,
        env = "ASPEN_DHT_BOOTSTRAP",
        value_delimiter = ',',
        global = true,
        value_name = "HOST:PORT,..."
    )]
    pub dht_bootstrap: Vec<String>,
    /// Do not use the Mainline DHT at all (clusters are then found by ticket or cached record).
    #[arg(long, env = "ASPEN_NO_DHT", global = true)]
    pub no_dht: bool,
    /// Per-request timeout of DHT queries, in milliseconds (a lookup takes about this long).
    #[arg(long, global = true, value_name = "MS")]
    pub dht_timeout_ms: Option<u64>,
}

impl DhtArgs {
    /// Applies these flags over `settings` (from defaults or a config file).
    pub fn apply(&self, settings: &mut DhtSettings) {
        if !self.dht_bootstrap.is_empty() {
            settings.bootstrap = self.dht_bootstrap.clone();
        }
        if self.no_dht {
            settings.enabled = false;
        }
        if let Some(ms) = self.dht_timeout_ms {
            settings.request_timeout_ms = ms;
        }
    }

    fn config(&self) -> Result<Option<DhtConfig>> {
        let mut settings = DhtSettings::default();
        self.apply(&mut settings);
        settings.validate()?;
        Ok(settings.dht_config())
    }
}

/// Where resolved records are cached: `--record-cache`, else `$ASPEN_RECORD_CACHE`, else
/// `$XDG_CACHE_HOME/aspen/records`, else `$HOME/.cache/aspen/records`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("aspen").join("records"));
    }
    std::env::var_os("HOME").filter(|d| !d.is_empty()).map(|h| {
        PathBuf::from(h)
            .join(".cache")
            .join("aspen")
            .join("records")
    })
}

/// Resolves `key` through the DHT (unless off) and the cache.
pub async fn resolve(
    key: &ClusterKey,
    dht: &DhtArgs,
    cache_dir: Option<PathBuf>,
) -> Result<Resolved> {
    let dht = match dht.config()? {
        // Binds a socket and may resolve bootstrap host names: off the executor.
        Some(c) => Some(
            tokio::task::spawn_blocking(move || ClusterDht::start(&c))
                .await?
                .context("cannot start the DHT client")?,
        ),
        None => None,
    };
    resolve_with(key, dht, cache_dir).await
}

/// Like [`resolve`], with an already running DHT client.
pub async fn resolve_with(
    key: &ClusterKey,
    dht: Option<ClusterDht>,
    cache_dir: Option<PathBuf>,
) -> Result<Resolved> {
    let resolver = Resolver::new(dht, cache_dir.map(RecordCache::new));
    let resolved = tokio::time::timeout(RESOLVE_TIMEOUT, resolver.resolve(key, unix_now()))
        .await
        .map_err(|_| anyhow::anyhow!("resolving cluster {key} took over {RESOLVE_TIMEOUT:?}"))??;
    if let Some(problem) = &resolved.dht_problem {
        tracing::warn!("using the cached record of cluster {key}: {problem}");
    }
    Ok(resolved)
}

/// A ticket with the record's members.
pub fn ticket_of(record: &ClusterRecord) -> ClusterTicket {
    ClusterTicket {
        members: record
            .members
            .iter()
            .map(|m| NodeTicket {
                endpoint_id: m.node,
                addrs: m.addrs.clone(),
            })
            .collect(),
    }
}

/// Checks that the cluster `client` reaches is `key`: the answering node (authenticated by
/// iroh's TLS) presents a valid certificate from that key.
pub async fn verify_cluster(client: &Client, key: &ClusterKey) -> Result<()> {
    let (node, identity) = client
        .identity()
        .await
        .context("cannot ask the cluster for its identity")?;
    if identity.cluster_key != key.to_bytes() {
        bail!(
            "node {:016x} serves cluster {}, not {key}",
            node.node_id(),
            hex::encode(identity.cluster_key)
        );
    }
    let cert = NodeCertificate::decode(&identity.certificate)
        .with_context(|| format!("node {:016x} sent a bad certificate", node.node_id()))?;
    cert.verify(key, &node.endpoint_id, unix_now())
        .with_context(|| format!("node {:016x}'s certificate", node.node_id()))?;
    Ok(())
}

/// How long a command waits for a record before giving up (the DHT lookup has its own
/// per-request timeouts; this bounds the whole resolution).
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(30);
