//! `aspen fed ...`: federation with other clusters. So far: exports, the resources this
//! cluster lets other clusters pull and which clusters (by cluster key) may.

use anyhow::{bail, Context, Result};
use aspen_client::{Client, Resource, ResourceKind};
use aspen_trust::ClusterKey;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use crate::cli::{ClientArgs, Output};

#[derive(Subcommand, Debug)]
pub enum FedCommand {
    /// Let other clusters pull a resource: the clusters named with --to (their cluster keys,
    /// as `aspen cluster identity` prints them), or any cluster (--public). Adds to what an
    /// existing export allows. Nothing is exported by default.
    Export {
        #[command(flatten)]
        resource: ResourceArgs,
        /// A cluster key that may pull it (repeatable).
        #[arg(long = "to", value_name = "CLUSTER_KEY")]
        to: Vec<String>,
        /// Any cluster may pull it.
        #[arg(long)]
        public: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop exporting a resource: to the clusters named with --to, to anyone (--public), or,
    /// with neither, at all.
    Unexport {
        #[command(flatten)]
        resource: ResourceArgs,
        #[arg(long = "to", value_name = "CLUSTER_KEY")]
        to: Vec<String>,
        #[arg(long)]
        public: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List what this cluster exports, and to whom.
    Exports {
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Which resource: a kind and a name.
#[derive(Args, Debug)]
pub struct ResourceArgs {
    /// doc (an Automerge document), blob (the blobs tagged under a tag prefix), or ns (an
    /// iroh-docs namespace).
    #[arg(value_enum)]
    pub kind: KindArg,
    /// The document name, the tag prefix ("" for every tag), or the namespace id (64 hex).
    pub name: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KindArg {
    Doc,
    Blob,
    Ns,
}

impl ResourceArgs {
    fn resource(&self) -> Result<Resource> {
        let kind = match self.kind {
            KindArg::Doc => ResourceKind::Doc,
            KindArg::Blob => ResourceKind::Blob,
            KindArg::Ns => ResourceKind::Ns,
        };
        let resource = Resource {
            kind,
            name: match self.kind {
                KindArg::Ns => self.name.trim().to_ascii_lowercase(),
                _ => self.name.clone(),
            },
        };
        resource
            .check()
            .with_context(|| format!("'{}' cannot be exported", self.name))?;
        Ok(resource)
    }
}

fn cluster_keys(keys: &[String]) -> Result<Vec<[u8; 32]>> {
    keys.iter()
        .map(|k| {
            k.parse::<ClusterKey>()
                .map(|k| k.to_bytes())
                .with_context(|| format!("--to '{k}' is not a cluster key (64 hex digits)"))
        })
        .collect()
}

pub async fn fed(cmd: FedCommand) -> Result<()> {
    let args = match &cmd {
        FedCommand::Export { client, .. }
        | FedCommand::Unexport { client, .. }
        | FedCommand::Exports { client } => client,
    };
    let c = args.client().await?;
    let result = fed_with(&c, cmd).await;
    c.close().await;
    result
}

async fn fed_with(c: &Client, cmd: FedCommand) -> Result<()> {
    match cmd {
        FedCommand::Export {
            resource,
            to,
            public,
            client,
        } => {
            if to.is_empty() && !public {
                bail!("export to whom? name cluster keys with --to KEY, or use --public");
            }
            let resource = resource.resource()?;
            c.fed_export(resource.clone(), cluster_keys(&to)?, public)
                .await?;
            done(client.output, "exported", &resource);
        }
        FedCommand::Unexport {
            resource,
            to,
            public,
            client,
        } => {
            let resource = resource.resource()?;
            let all = to.is_empty() && !public;
            c.fed_unexport(resource.clone(), cluster_keys(&to)?, public, all)
                .await?;
            done(client.output, "unexported", &resource);
        }
        FedCommand::Exports { client } => {
            let list = c.fed_exports().await?;
            match client.output {
                Output::Json => {
                    let items: Vec<_> = list
                        .iter()
                        .map(|e| {
                            json!({
                                "kind": e.resource.kind.to_string(),
                                "name": e.resource.name,
                                "public": e.public,
                                "to": e.to.iter().map(hex::encode).collect::<Vec<_>>(),
                                "created_at_ms": e.created_at_ms,
                            })
                        })
                        .collect();
                    println!("{}", json!({ "exports": items }));
                }
                Output::Text => {
                    if list.is_empty() {
                        println!("nothing is exported");
                    }
                    for e in &list {
                        let mut to: Vec<String> = e.to.iter().map(hex::encode).collect();
                        if e.public {
                            to.insert(0, "any cluster".into());
                        }
                        println!("{}  to {}", e.resource, to.join(", "));
                    }
                }
            }
        }
    }
    Ok(())
}

fn done(output: Output, what: &str, resource: &Resource) {
    match output {
        Output::Json => println!(
            "{}",
            json!({ "kind": resource.kind.to_string(), "name": resource.name, "done": what })
        ),
        Output::Text => println!("{what} {resource}"),
    }
}
