//! `aspen node run`: one node in the foreground.

use std::time::Duration;

use anyhow::{Context, Result};
use aspen_client::{Client, ClientOptions};
use aspen_trust::ClusterKey;
use tokio::io::AsyncReadExt;

use crate::cli::{Output, RunArgs};
use crate::config::NodeConfig;
use crate::server::RunningNode;

pub async fn run(args: RunArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => NodeConfig::from_file(path)?,
        None => NodeConfig::default(),
    };
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some(b) = args.bind {
        config.bind = b;
    }
    if let Some(n) = args.snapshot_every {
        config.snapshot_every = n;
    }
    if let Some(n) = args.keep_log_after_snapshot {
        config.keep_log_after_snapshot = n;
    }
    if let Some(r) = args.auto_compaction_retention {
        config.auto_compaction_retention = r;
    }
    if let Some(m) = args.auto_compaction_mode {
        config.auto_compaction_mode = m;
    }
    if let Some(s) = args.auto_compaction_every {
        anyhow::ensure!(
            s.is_finite() && (0.01..=86400.0).contains(&s),
            "--auto-compaction-every must be 0.01 to 86400 seconds"
        );
        config.auto_compaction_every = Some(Duration::from_secs_f64(s));
    }
    if let Some(a) = args.metrics {
        config.metrics = Some(a);
    }
    if let Some(f) = args.metrics_token_file {
        config.metrics_token_file = Some(f);
    }
    if let Some(a) = args.automerge_repo {
        config.automerge_repo = Some(a);
    }
    if let Some(a) = args.etcd_api {
        config.etcd_api = Some(a);
    }
    if let Some(us) = args.busy_poll_us {
        config.busy_poll_us = us;
    }
    args.dht.apply(&mut config.dht);
    if let Some(n) = args.blob_replicas {
        config.blobs.replicas = n;
    }
    if let Some(s) = args.blob_gc_grace_secs {
        config.blobs.gc_grace_secs = s;
    }
    if let Some(s) = args.blob_gc_interval_secs {
        config.blobs.gc_interval_secs = s;
    }
    if let Some(s) = args.dht_republish_secs {
        config.dht.republish_interval_secs = s;
    }
    if let Some(ms) = args.fed_pull_interval_ms {
        config.federation.pull_interval_ms = ms;
    }
    if let Some(s) = args.record_validity_secs {
        config.dht.record_validity_secs = s;
    }
    let join = match (&args.join, &args.invite_file) {
        (Some(key), Some(file)) => {
            let key: ClusterKey = key.parse().context("--join: invalid cluster key")?;
            let token = read_invite(file).await?;
            let mut bytes = [0u8; 32];
            hex::decode_to_slice(token.trim(), &mut bytes).map_err(|_| {
                anyhow::anyhow!(
                    "--invite-file: expected 64 hex digits (from `aspen cluster invite`)"
                )
            })?;
            config.join = Some(key);
            Some((key, bytes))
        }
        _ => None,
    };
    if let Some(fault) = args.unsafe_test_fault {
        tracing::warn!(
            ?fault,
            "running with a deliberate bug for testing: NOT SAFE"
        );
        config.test_fault = Some(fault);
    }
    if args.unsafe_allow_fault_injection {
        tracing::warn!("clients may inject network faults into this node: testing only");
        config.allow_fault_injection = true;
    }
    config.validate()?;
    if crate::busy_poll::start(Duration::from_micros(config.busy_poll_us)) {
        tracing::debug!(
            window_us = config.busy_poll_us,
            "busy polling after requests"
        );
    }
    let node = RunningNode::start(&config).await?;
    let ticket = node.node_ticket();
    let addrs: Vec<String> = ticket.addrs.iter().map(|a| a.to_string()).collect();
    let metrics = node.state.cluster.metrics.serving.get().copied();
    let repo = node.state.cluster.metrics.repo_serving.get().copied();
    let etcd = node.state.cluster.metrics.etcd_serving.get().copied();
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({ "node_id": format!("{:016x}", node.state.cluster.id), "addrs": addrs,
                                "ticket": ticket.to_string(), "data_dir": config.data_dir,
                                "metrics": metrics.map(|a| format!("http://{a}/metrics")),
                                "automerge_repo": repo.map(|a| format!("ws://{a}/")),
                                "etcd_api": etcd.map(|a| a.to_string()) })
        ),
        Output::Text => {
            println!(
                "node {:016x} listening on {}",
                node.state.cluster.id,
                addrs.join(", ")
            );
            println!("node ticket: {ticket}");
            println!("data dir: {}", config.data_dir.display());
            if let Some(a) = metrics {
                println!("metrics: http://{a}/metrics");
            }
            if let Some(a) = repo {
                println!("automerge-repo: ws://{a}/");
            }
            if let Some(a) = etcd {
                println!("etcd API: {a} (etcdctl --endpoints={a} --user NAME:TOKEN)");
            }
        }
    }
    let joined = async {
        match join {
            Some((key, token)) => join_cluster(&node, &config, key, token).await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        _ = wait_for_stop(args.exit_on_stdin_close) => Ok(()),
        r = joined => match r {
            Ok(()) => {
                wait_for_stop(args.exit_on_stdin_close).await;
                Ok(())
            }
            Err(e) => Err(e),
        },
    };
    tracing::info!("shutting down");
    node.shutdown().await;
    result
}

/// Reads an invitation token from a file or, for `-`, standard input (off the executor).
async fn read_invite(path: &std::path::Path) -> Result<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut text = String::new();
        if path.as_os_str() == "-" {
            std::io::stdin()
                .take(1024)
                .read_to_string(&mut text)
                .context("cannot read the invitation from standard input")?;
        } else {
            std::fs::File::open(&path)
                .and_then(|f| f.take(1024).read_to_string(&mut text))
                .with_context(|| format!("cannot read the invitation from {}", path.display()))?;
        }
        Ok(text)
    })
    .await?
}

/// Most attempts to reach the cluster when joining (a refusal ends it at once).
const JOIN_ATTEMPTS: u32 = 20;

/// `--join KEY --invite TOKEN`: finds the cluster by its key and asks to be admitted, until
/// admitted (Ok) or refused (Err: the node then stops).
async fn join_cluster(
    node: &RunningNode,
    config: &NodeConfig,
    key: ClusterKey,
    token: [u8; 32],
) -> Result<()> {
    if !node.state.cluster.is_member() {
        let cache = Some(config.data_dir.join("records"));
        let mut delay = Duration::from_millis(500);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let tried = async {
                let resolved =
                    crate::resolve::resolve_with(&key, node.dht.clone(), cache.clone()).await?;
                // From the node's own endpoint: the invitation is bound to the caller's key,
                // which must be the joining node's.
                let client = Client::with_endpoint(
                    node.endpoint(),
                    crate::resolve::ticket_of(&resolved.record),
                    ClientOptions::default(),
                );
                let r = client.join(node.node_ticket(), token).await;
                client.close().await;
                anyhow::Ok(r)
            };
            let why = match tried.await {
                Ok(Ok(())) => break,
                Ok(Err(aspen_client::ClientError::Rpc(e))) => {
                    anyhow::bail!("cluster {key} refused to admit this node: {e}")
                }
                Ok(Err(e)) => e.to_string(),
                Err(e) => format!("{e:#}"),
            };
            if attempt >= JOIN_ATTEMPTS {
                anyhow::bail!("cannot join cluster {key} after {attempt} attempts: {why}");
            }
            tracing::warn!("joining cluster {key} (attempt {attempt}): {why}");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }
    tracing::info!(cluster = %key, "admitted to the cluster");
    Ok(())
}

async fn wait_for_stop(stdin_close: bool) {
    let stdin_closed = async {
        if !stdin_close {
            return std::future::pending::<()>().await;
        }
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
        _ = stdin_closed => {}
    }
}
