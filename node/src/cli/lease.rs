//! `aspen lease`: grant, keep alive, inspect, list and revoke leases. Keys are attached with
//! `aspen kv put KEY VALUE --lease ID` and deleted when the lease ends.

use anyhow::{bail, Result};
use aspen_client::Client;
use clap::Subcommand;
use futures::StreamExt;
use serde_json::json;

use super::{ClientArgs, Output};

#[derive(Subcommand, Debug)]
pub enum LeaseCommand {
    /// Grant a lease that lives TTL seconds unless kept alive; prints its id. Keys put with
    /// `--lease ID` are deleted when it ends.
    Grant {
        /// Time to live in seconds (2 to 9,000,000,000).
        ttl: u64,
        /// Use this id (1 to 2^63-1) instead of a random one.
        #[arg(long, default_value_t = 0)]
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Keep lease ID alive until stopped (Ctrl-C), printing each acknowledgement; exits
    /// with an error once the lease is gone. Keep-alives go every third of the TTL, and each
    /// acknowledged one keeps the lease at least TTL seconds from when it was sent.
    Keepalive {
        id: u64,
        /// Send one keep-alive and exit.
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revoke lease ID now: it and every key attached are deleted (needs write access to
    /// each of those keys).
    Revoke {
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show lease ID: its TTL, the time left (by the leader's clock), and with --keys the
    /// keys attached.
    Ttl {
        id: u64,
        #[arg(long)]
        keys: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List every lease id.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub async fn lease(cmd: LeaseCommand) -> Result<()> {
    let args = match &cmd {
        LeaseCommand::Grant { client, .. }
        | LeaseCommand::Keepalive { client, .. }
        | LeaseCommand::Revoke { client, .. }
        | LeaseCommand::Ttl { client, .. }
        | LeaseCommand::List { client } => client.clone(),
    };
    let c = args.client().await?;
    let result = lease_with(&c, cmd).await;
    c.close().await;
    result
}

async fn lease_with(c: &Client, cmd: LeaseCommand) -> Result<()> {
    match cmd {
        LeaseCommand::Grant { ttl, id, client } => {
            let lease = c.lease_grant(ttl, id).await?;
            match client.output {
                Output::Json => println!("{}", json!({ "id": lease.id, "ttl": lease.ttl_secs })),
                Output::Text => println!("{}", lease.id),
            }
        }
        LeaseCommand::Keepalive { id, once, client } => {
            if once {
                let k = c.lease_keep_alive_once(id).await?;
                print_kept_alive(&client, id, k.ttl_secs);
                return Ok(());
            }
            let mut acks = c.lease_keep_alive(id);
            while let Some(ack) = acks.next().await {
                match ack {
                    Ok(k) => print_kept_alive(&client, id, k.ttl_secs),
                    Err(e) if aspen_client::is_lease_gone(&e) => {
                        bail!("lease {id} is gone (expired or revoked)")
                    }
                    Err(e) => eprintln!("keep-alive of lease {id} failed, retrying: {e}"),
                }
            }
        }
        LeaseCommand::Revoke { id, client } => {
            let r = c.lease_revoke(id).await?;
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({ "revision": r.revision, "deleted": r.deleted })
                ),
                Output::Text => println!("revoked lease {id}; deleted {} keys", r.deleted),
            }
        }
        LeaseCommand::Ttl { id, keys, client } => {
            let s = c.lease_time_to_live(id, keys).await?;
            let remaining = s.remaining_ms as f64 / 1000.0;
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({ "id": s.id, "ttl": s.ttl_secs, "remaining": remaining,
                            "key_count": s.key_count,
                            "keys": s.keys.iter().map(|k| client.show(k)).collect::<Vec<_>>() })
                ),
                Output::Text => {
                    println!(
                        "lease {} granted with TTL {}s, {remaining:.1}s remaining, {} keys",
                        s.id, s.ttl_secs, s.key_count
                    );
                    for k in &s.keys {
                        println!("{}", client.show(k));
                    }
                }
            }
        }
        LeaseCommand::List { client } => {
            let ids = c.lease_list().await?;
            match client.output {
                Output::Json => println!("{}", json!({ "leases": ids })),
                Output::Text => {
                    for id in ids {
                        println!("{id}");
                    }
                }
            }
        }
    }
    Ok(())
}

fn print_kept_alive(client: &ClientArgs, id: u64, ttl: u64) {
    match client.output {
        Output::Json => println!("{}", json!({ "id": id, "ttl": ttl })),
        Output::Text => println!("lease {id} kept alive, TTL {ttl}s"),
    }
}
