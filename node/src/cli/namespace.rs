//! `aspen docs ...`: iroh-docs namespaces hosted by the cluster.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use aspen_client::protocol::{parse_namespace_id, NsEntry};
use aspen_client::Client;
use clap::Subcommand;
use serde_json::json;

use crate::cli::{ClientArgs, Output};

#[derive(Subcommand, Debug)]
pub enum DocsCommand {
    /// Create a namespace (writable) that every member hosts a replica of; prints its id.
    Create {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Set KEY to VALUE (or to the contents of --file) as the contacted member's author.
    Set {
        /// The namespace id (64 hex digits).
        namespace: String,
        key: String,
        /// The value (omit with --file).
        value: Option<String>,
        /// Read the value from this file.
        #[arg(long, conflicts_with = "value")]
        file: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the latest value of KEY (over all authors) on the contacted member.
    Get {
        namespace: String,
        key: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List namespaces, or with NAMESPACE the latest entry of each key.
    List {
        namespace: Option<String>,
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a ticket to the namespace naming every member (read-only unless --write).
    Share {
        namespace: String,
        /// Give write access (anyone with the ticket can write).
        #[arg(long)]
        write: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Host the namespace of a ticket on every member, syncing with the peers it names. A
    /// read ticket gives a read-only replica.
    Import {
        ticket: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

impl DocsCommand {
    fn client_args(&self) -> &ClientArgs {
        match self {
            DocsCommand::Create { client }
            | DocsCommand::Set { client, .. }
            | DocsCommand::Get { client, .. }
            | DocsCommand::List { client, .. }
            | DocsCommand::Share { client, .. }
            | DocsCommand::Import { client, .. } => client,
        }
    }
}

fn bytes_arg(s: &str, hex_mode: bool, what: &str) -> Result<Vec<u8>> {
    if hex_mode {
        hex::decode(s).with_context(|| format!("{what} is not hex"))
    } else {
        Ok(s.as_bytes().to_vec())
    }
}

fn show(bytes: &[u8], hex_mode: bool) -> String {
    if hex_mode {
        hex::encode(bytes)
    } else {
        String::from_utf8_lossy(bytes).into_owned()
    }
}

fn entry_json(e: &NsEntry, hex_mode: bool) -> serde_json::Value {
    json!({
        "key": show(&e.key, hex_mode),
        "author": hex::encode(e.author),
        "hash": hex::encode(e.hash),
        "size": e.size,
        "timestamp_us": e.timestamp_us,
    })
}

pub async fn docs(cmd: DocsCommand) -> Result<()> {
    let c = cmd.client_args().client().await?;
    let result = docs_with(&c, cmd).await;
    c.close().await;
    result
}

async fn docs_with(c: &Client, cmd: DocsCommand) -> Result<()> {
    match cmd {
        DocsCommand::Create { client } => {
            let id = hex::encode(c.ns_create().await?);
            match client.output {
                Output::Json => println!("{}", json!({ "namespace": id })),
                Output::Text => println!("{id}"),
            }
        }
        DocsCommand::Set {
            namespace,
            key,
            value,
            file,
            client,
        } => {
            let id = parse_namespace_id(&namespace)?;
            let value = match (value, file) {
                (Some(v), None) => bytes_arg(&v, client.hex, "VALUE")?,
                (None, Some(f)) => tokio::fs::read(&f)
                    .await
                    .with_context(|| format!("cannot read {}", f.display()))?,
                _ => bail!("give VALUE or --file"),
            };
            let hash = c
                .ns_set(id, bytes_arg(&key, client.hex, "KEY")?, value)
                .await?;
            match client.output {
                Output::Json => println!("{}", json!({ "key": key, "hash": hex::encode(hash) })),
                Output::Text => println!("{}", hex::encode(hash)),
            }
        }
        DocsCommand::Get {
            namespace,
            key,
            client,
        } => {
            let id = parse_namespace_id(&namespace)?;
            let (entry, value) = c.ns_get(id, bytes_arg(&key, client.hex, "KEY")?).await?;
            let Some(entry) = entry else {
                bail!("no entry for key {key:?}");
            };
            let Some(value) = value else {
                bail!(
                    "the content of {key:?} ({}) has not reached this member yet",
                    hex::encode(entry.hash)
                );
            };
            match client.output {
                Output::Json => {
                    let mut j = entry_json(&entry, client.hex);
                    j["value"] = json!(show(&value, client.hex));
                    println!("{j}");
                }
                Output::Text => println!("{}", show(&value, client.hex)),
            }
        }
        DocsCommand::List {
            namespace: None,
            client,
            ..
        } => {
            let list = c.ns_namespaces().await?;
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!(list
                        .iter()
                        .map(|n| json!({
                            "namespace": hex::encode(n.id),
                            "writable": n.writable,
                            "created_at_ms": n.created_at_ms,
                        }))
                        .collect::<Vec<_>>())
                ),
                Output::Text => {
                    for n in &list {
                        let mode = if n.writable { "write" } else { "read" };
                        println!("{}\t{mode}", hex::encode(n.id));
                    }
                }
            }
        }
        DocsCommand::List {
            namespace: Some(namespace),
            prefix,
            limit,
            client,
        } => {
            let id = parse_namespace_id(&namespace)?;
            let (entries, more) = c
                .ns_list(id, bytes_arg(&prefix, client.hex, "--prefix")?, limit)
                .await?;
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({
                        "entries": entries.iter().map(|e| entry_json(e, client.hex)).collect::<Vec<_>>(),
                        "more": more,
                    })
                ),
                Output::Text => {
                    for e in &entries {
                        println!(
                            "{}\t{}\t{} bytes\tauthor {}",
                            show(&e.key, client.hex),
                            hex::encode(e.hash),
                            e.size,
                            &hex::encode(e.author)[..16]
                        );
                    }
                    if more {
                        println!("(more: raise --limit or narrow --prefix)");
                    }
                }
            }
        }
        DocsCommand::Share {
            namespace,
            write,
            client,
        } => {
            let ticket = c.ns_share(parse_namespace_id(&namespace)?, write).await?;
            match client.output {
                Output::Json => println!("{}", json!({ "ticket": ticket, "write": write })),
                Output::Text => println!("{ticket}"),
            }
        }
        DocsCommand::Import { ticket, client } => {
            let id = hex::encode(c.ns_import(&ticket).await?);
            match client.output {
                Output::Json => println!("{}", json!({ "namespace": id })),
                Output::Text => println!("{id}"),
            }
        }
    }
    Ok(())
}
