//! `aspen cluster`: form a cluster (init, add, invite, join), inspect it (status, identity)
//! and remove members.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use aspen_client::{Client, ClusterStatus, NodeTicket};
use aspen_trust::{ClusterKey, SignedRecord, RECORD_SALT};
use clap::Subcommand;
use serde_json::json;

use super::{ClientArgs, Output};

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
            "figures": {
                "uptime_secs": s.figures.uptime_secs,
                "requests": s.figures.requests,
                "request_errors": s.figures.request_errors,
                "applied_entries": s.figures.applied_entries,
                "applied_commands": s.figures.applied_commands,
                "log_flushes": s.figures.log_flushes,
                "log_flush_mean_us": s.figures.log_flush_mean_us,
                "doc_changes": s.figures.doc_changes,
                "blob_bytes_in": s.figures.blob_bytes_in,
                "blob_bytes_out": s.figures.blob_bytes_out,
                "watches": s.figures.watches,
                "metrics": s.figures.metrics_addr.as_ref().map(|a| format!("http://{a}/metrics")),
                "automerge_repo": s.figures.automerge_repo_addr.as_ref().map(|a| format!("ws://{a}/")),
                "automerge_repo_connections": s.figures.automerge_repo_connections,
                "etcd_api": s.figures.etcd_api_addr,
                "etcd_api_connections": s.figures.etcd_api_connections,
            },
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
    let f = &s.figures;
    println!(
        "this node since it started ({}):",
        indicatif::HumanDuration(std::time::Duration::from_secs(f.uptime_secs))
    );
    println!(
        "  requests  {} ({} errors), watches open {}",
        f.requests, f.request_errors, f.watches
    );
    let per_entry = if f.applied_entries == 0 {
        0.0
    } else {
        f.applied_commands as f64 / f.applied_entries as f64
    };
    println!(
        "  applied   {} commands in {} entries ({per_entry:.1} per entry)",
        f.applied_commands, f.applied_entries
    );
    println!(
        "  log       {} flushes, mean {:.2} ms",
        f.log_flushes,
        f.log_flush_mean_us as f64 / 1000.0
    );
    println!(
        "  documents {} changes committed; blobs {} in, {} out",
        f.doc_changes,
        indicatif::HumanBytes(f.blob_bytes_in),
        indicatif::HumanBytes(f.blob_bytes_out)
    );
    if let Some(a) = &f.metrics_addr {
        println!("  metrics   http://{a}/metrics");
    }
    if let Some(a) = &f.automerge_repo_addr {
        println!(
            "  automerge-repo ws://{a}/ ({} connections)",
            f.automerge_repo_connections
        );
    }
    if let Some(a) = &f.etcd_api_addr {
        println!("  etcd API  {a} ({} connections)", f.etcd_api_connections);
    }
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
