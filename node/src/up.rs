//! `aspen up`: a local cluster of N `aspen node run` processes, formed and ready to use.
//!
//! Run again with the same data directory and the same cluster comes back (nodes reuse their
//! ports when they can, and announce new addresses when not).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use aspen_client::{Client, ClusterTicket, NodeTicket};
use clap::Args;

use crate::server::{CLUSTER_TICKET_FILE, NODE_TICKET_FILE};

/// The admin identity `aspen up` creates for its cluster, in the data directory.
pub const ADMIN_IDENTITY_FILE: &str = "admin.key";

/// Most nodes `aspen up` starts (Raft clusters of more than 7 voters only get slower).
pub const MAX_UP_NODES: usize = 7;
const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Number of nodes (1-7).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Where the nodes keep their data (one sub-directory per node).
    #[arg(long, default_value = "aspen-data")]
    pub data_dir: PathBuf,
    /// Start the cluster, print its ticket, and exit, leaving the nodes running in the
    /// background (stop them with `kill $(cat DATA_DIR/node-*/pid)`).
    #[arg(long)]
    pub detach: bool,
    /// Every node serves Prometheus metrics on a free loopback port (the message lists
    /// where; `aspen node run --metrics`).
    #[arg(long)]
    pub metrics: bool,
    /// Every node serves automerge-repo's WebSocket protocol on a free loopback port (the
    /// message lists where; `aspen node run --automerge-repo`).
    #[arg(long)]
    pub automerge_repo: bool,
    /// Every node serves etcd's v3 gRPC API on a free loopback port (the message lists
    /// where; `aspen node run --etcd-api`).
    #[arg(long)]
    pub etcd_api: bool,
    /// Output format of the "cluster is up" message.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: crate::cli::Output,
}

struct Children(Vec<tokio::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.start_kill();
        }
    }
}

pub async fn up(args: UpArgs) -> Result<()> {
    if args.nodes == 0 || args.nodes > MAX_UP_NODES {
        bail!("--nodes must be between 1 and {MAX_UP_NODES}");
    }
    let exe = std::env::current_exe().context("cannot find the aspen executable")?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let dirs: Vec<PathBuf> = (1..=args.nodes)
        .map(|i| args.data_dir.join(format!("node-{i}")))
        .collect();
    let formed = dirs.iter().any(|d| d.join(CLUSTER_TICKET_FILE).exists());
    let mut children = Children(Vec::new());
    let mut previous = Vec::new();
    for dir in &dirs {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        previous.push(
            std::fs::metadata(dir.join(NODE_TICKET_FILE))
                .and_then(|m| m.modified())
                .ok(),
        );
        let log = std::fs::File::create(dir.join("node.log")).context("cannot create node.log")?;
        let mut cmd = tokio::process::Command::new(&exe);
        // A local cluster: the DHT stays off (nothing leaves the machine).
        cmd.arg("node")
            .arg("run")
            .arg("--no-dht")
            .arg("--data-dir")
            .arg(dir);
        if args.metrics {
            cmd.arg("--metrics").arg("127.0.0.1:0");
        }
        if args.automerge_repo {
            cmd.arg("--automerge-repo").arg("127.0.0.1:0");
        }
        if args.etcd_api {
            cmd.arg("--etcd-api").arg("127.0.0.1:0");
        }
        if !args.detach {
            cmd.arg("--exit-on-stdin-close").stdin(Stdio::piped());
        } else {
            cmd.stdin(Stdio::null());
        }
        cmd.stdout(log.try_clone()?).stderr(log);
        let child = cmd.spawn().context("cannot start a node process")?;
        if let Some(pid) = child.id() {
            std::fs::write(dir.join("pid"), format!("{pid}\n"))?;
        }
        children.0.push(child);
    }
    let mut tickets = Vec::new();
    for (dir, before) in dirs.iter().zip(&previous) {
        tickets.push(wait_for_ticket(dir, *before, &mut children).await?);
    }
    // The cluster's first admin: a key file next to the nodes' directories.
    let admin_path = args.data_dir.join(ADMIN_IDENTITY_FILE);
    let admin = {
        let path = admin_path.clone();
        tokio::task::spawn_blocking(move || crate::keyfile::load_or_create_key(&path))
            .await?
            .with_context(|| format!("admin identity {}", admin_path.display()))?
    };
    let options = crate::cli::auth::options_for(&admin, Duration::from_secs(30));
    if !formed {
        let secrets = {
            let dirs = dirs.clone();
            tokio::task::spawn_blocking(move || {
                dirs.iter()
                    .map(|d| crate::keyfile::read_bootstrap_secret(d))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await??
        };
        let first = Client::connect_node(tickets[0].clone(), options.clone()).await?;
        first
            .init_cluster(String::new(), secrets[0])
            .await
            .context("cannot initialize the first node")?;
        first.close().await;
        let cluster = Client::connect_with(
            ClusterTicket {
                members: vec![tickets[0].clone()],
            },
            options.clone(),
        )
        .await?;
        for (t, secret) in tickets[1..].iter().zip(&secrets[1..]) {
            cluster
                .add_member(t.clone(), *secret)
                .await
                .with_context(|| format!("cannot add node {:016x}", t.node_id()))?;
        }
        cluster.close().await;
    } else {
        // A cluster formed earlier (perhaps before access control, or with another admin
        // key): `up` owns the data directories, so it makes its admin key admin again with
        // the first node's bootstrap secret (nothing is written if it already is).
        let secret = {
            let dir = dirs[0].clone();
            tokio::task::spawn_blocking(move || crate::keyfile::read_bootstrap_secret(&dir))
                .await??
        };
        let first = Client::connect_node(tickets[0].clone(), options.clone()).await?;
        let r = retry_while_starting(|| first.recover_admin(secret)).await;
        first.close().await;
        r.context("cannot make the admin identity an admin")?;
    }
    let ticket = ClusterTicket {
        members: tickets.clone(),
    };
    let client = Client::connect_with(ticket.clone(), options.clone()).await?;
    let status = retry_while_starting(|| client.status())
        .await
        .context("the cluster does not answer")?;
    client.close().await;
    let (mut metrics, mut repos, mut etcds) = (Vec::new(), Vec::new(), Vec::new());
    if args.metrics || args.automerge_repo || args.etcd_api {
        for node in &tickets {
            let c = Client::connect_node(node.clone(), options.clone()).await?;
            let s = retry_while_starting(|| c.status()).await;
            c.close().await;
            let figures = s.context("a node does not answer")?.figures;
            if let Some(addr) = figures.metrics_addr {
                metrics.push(format!("http://{addr}/metrics"));
            }
            if let Some(addr) = figures.automerge_repo_addr {
                repos.push(format!("ws://{addr}/"));
            }
            if let Some(addr) = figures.etcd_api_addr {
                etcds.push(addr);
            }
        }
    }
    let ticket_path = args.data_dir.join(CLUSTER_TICKET_FILE);
    std::fs::write(&ticket_path, format!("{ticket}\n"))
        .context("cannot write the cluster ticket")?;

    if args.output == crate::cli::Output::Json {
        let v = serde_json::json!({
            "nodes": args.nodes,
            "leader": status.leader.map(|l| format!("{l:016x}")),
            "cluster_ticket": ticket.to_string(),
            "cluster_ticket_file": ticket_path,
            "identity_file": admin_path,
            "data_dir": args.data_dir,
            "metrics": metrics,
            "automerge_repo": repos,
            "etcd_api": etcds,
        });
        println!("{v}");
    } else {
        print_up_message(&args, &status, &ticket_path, &admin_path);
        if !metrics.is_empty() {
            println!("Metrics (Prometheus): {}", metrics.join(" "));
            println!();
        }
        if !repos.is_empty() {
            println!(
                "automerge-repo (WebSocket; add ?token=..., see `aspen auth token issue --bearer`): {}",
                repos.join(" ")
            );
            println!();
        }
        if !etcds.is_empty() {
            println!(
                "etcd API (etcdctl --endpoints={} --user aspen:TOKEN, TOKEN from `aspen auth token issue --bearer`)",
                etcds.join(",")
            );
            println!();
        }
    }
    if args.detach {
        std::mem::forget(children);
        return Ok(());
    }
    wait_then_stop(children).await
}

fn print_up_message(
    args: &UpArgs,
    status: &aspen_client::ClusterStatus,
    ticket_path: &Path,
    admin_path: &Path,
) {
    println!(
        "Aspen is up: {} node(s), leader {:016x}.",
        args.nodes,
        status.leader.unwrap_or(0)
    );
    println!(
        "Data: {} (logs in node-*/node.log)",
        args.data_dir.display()
    );
    println!();
    // The name this binary was invoked by (e.g. target/debug/aspen under `cargo run`).
    let me = std::env::args().next().unwrap_or_else(|| "aspen".into());
    println!("In another shell:");
    println!("  export ASPEN_CLUSTER=$(cat {})", ticket_path.display());
    let admin = std::fs::canonicalize(admin_path).unwrap_or_else(|_| admin_path.to_path_buf());
    println!("  export ASPEN_IDENTITY={}", admin.display());
    println!("  {me} kv put hello world");
    println!("  {me} kv get hello");
    println!("  {me} cluster status");
    println!();
    if !args.detach {
        println!("Press Ctrl-C to stop the cluster.");
    }
}

/// Runs `call` until it succeeds or [`START_TIMEOUT`] passes: a cluster that just restarted
/// may refuse for a moment (no leader yet, or a member whose policy has not caught up).
async fn retry_while_starting<T, F, Fut>(mut call: F) -> Result<T, aspen_client::ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, aspen_client::ClientError>>,
{
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(e) => {
                tracing::debug!("cluster not ready yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn wait_then_stop(mut children: Children) -> Result<()> {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        exited = first_exit(&mut children) => {
            bail!("a node exited unexpectedly ({exited}); see its node.log");
        }
    }
    println!("stopping");
    // Closing stdin makes every node shut down cleanly.
    for c in &mut children.0 {
        drop(c.stdin.take());
    }
    for c in &mut children.0 {
        let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
    }
    Ok(())
}

async fn first_exit(children: &mut Children) -> String {
    loop {
        for c in &mut children.0 {
            if let Ok(Some(status)) = c.try_wait() {
                return status.to_string();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for a node to write a fresh node.ticket (newer than `before`).
async fn wait_for_ticket(
    dir: &Path,
    before: Option<std::time::SystemTime>,
    children: &mut Children,
) -> Result<NodeTicket> {
    let path = dir.join(NODE_TICKET_FILE);
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        let modified = tokio::fs::metadata(&path)
            .await
            .and_then(|m| m.modified())
            .ok();
        if modified.is_some() && modified != before {
            if let Ok(text) = tokio::fs::read_to_string(&path).await {
                if let Ok(t) = text.parse::<NodeTicket>() {
                    return Ok(t);
                }
            }
        }
        for c in &mut children.0 {
            if let Ok(Some(status)) = c.try_wait() {
                bail!(
                    "a node exited during start-up ({status}); see {}",
                    dir.join("node.log").display()
                );
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "node in {} did not start within {START_TIMEOUT:?}",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
