//! `aspen fed ...`: federation with other clusters. Exports: the resources this cluster
//! lets other clusters pull, and which clusters (by cluster key) may. Follows: the resources
//! of other clusters this cluster pulls, and how those pulls go. Mirrors: followed resources
//! this cluster serves onward, verified against their origin's key.

use anyhow::{bail, Context, Result};
use aspen_client::{
    Client, ClusterTicket, FollowSummary, NodeTicket, Resource, ResourceKind, ViaMirror,
};
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
    /// Pull a resource of another cluster from now on: the leader pulls it every interval
    /// (`--fed-pull-interval-ms` of `node run`), verifies it against the origin's signed
    /// manifest and commits it here, so every member serves it, also while the origin is
    /// offline. Documents, blob prefixes and iroh-docs namespaces (a read-only replica on
    /// every member, `aspen docs list ID`) can be followed.
    Follow {
        /// The origin: its cluster key (found through the DHT or the record cache), or a
        /// cluster ticket (its key is then asked for and checked, and its members are
        /// remembered as addresses to dial).
        origin: String,
        #[command(flatten)]
        resource: ResourceArgs,
        /// Where it goes here: the local document the origin's changes merge into, or the
        /// local tag prefix for blobs (default: fed/<first 16 hex digits of the origin
        /// key>/<NAME>). Two sites that follow each other's document into their own converge.
        /// A namespace keeps its id.
        #[arg(long, value_name = "LOCAL_NAME")]
        into: Option<String>,
        /// A mirror to pull from when the origin cannot be reached: its cluster key or a
        /// cluster ticket (repeatable; tried in order, before the mirrors the DHT names,
        /// except that a mirror refused or unreachable on the last pull goes after those).
        /// Whatever a mirror serves is verified against the origin's key. Replaces the
        /// follow's list when given.
        #[arg(long, value_name = "CLUSTER")]
        via: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Serve this cluster's copy of a followed resource to other clusters, as a mirror:
    /// readers that cannot reach the origin pull it from here and verify it against the
    /// origin's key (a mirror serves exactly the origin's last manifest it accepted, and the
    /// data it names). The leader announces the mirror in the resource's DHT directory,
    /// and each manifest it accepts on the resource's gossip topic. Documents, blob
    /// prefixes and namespaces can be mirrored.
    Mirror {
        /// The origin's cluster key.
        origin: String,
        #[command(flatten)]
        resource: ResourceArgs,
        /// A cluster key that may pull it from here (repeatable).
        #[arg(long = "to", value_name = "CLUSTER_KEY")]
        to: Vec<String>,
        /// Any cluster may pull it from here.
        #[arg(long)]
        public: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop mirroring: to the clusters named with --to, to anyone (--public), or, with
    /// neither, at all.
    Unmirror {
        origin: String,
        #[command(flatten)]
        resource: ResourceArgs,
        #[arg(long = "to", value_name = "CLUSTER_KEY")]
        to: Vec<String>,
        #[arg(long)]
        public: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List what this cluster mirrors, and to whom.
    Mirrors {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop following a resource (what was pulled stays).
    Unfollow {
        /// The origin's cluster key.
        origin: String,
        #[command(flatten)]
        resource: ResourceArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List what this cluster follows.
    Follows {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Pull now: every follow, those of one origin, or one; waits for the pulls to finish
    /// and prints their status.
    Sync {
        /// Only the follows of this origin (cluster key).
        origin: Option<String>,
        /// Only this resource kind (with NAME).
        #[arg(value_enum, requires = "name")]
        kind: Option<KindArg>,
        /// Only this resource name.
        name: Option<String>,
        /// Seconds to wait for the pulls.
        #[arg(long, default_value_t = 60.0, value_name = "SECS")]
        wait: f64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// How each follow's pulls go: the last verified manifest, last success, lag, next
    /// attempt and last error (as the leader knows them).
    Status {
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
        let kind = kind_of(self.kind);
        let resource = Resource {
            kind,
            name: match self.kind {
                KindArg::Ns => self.name.trim().to_ascii_lowercase(),
                _ => self.name.clone(),
            },
        };
        resource
            .check()
            .with_context(|| format!("'{}' is not a valid {} name", self.name, kind))?;
        Ok(resource)
    }
}

fn kind_of(kind: KindArg) -> ResourceKind {
    match kind {
        KindArg::Doc => ResourceKind::Doc,
        KindArg::Blob => ResourceKind::Blob,
        KindArg::Ns => ResourceKind::Ns,
    }
}

fn origin_key(s: &str) -> Result<ClusterKey> {
    s.trim()
        .parse::<ClusterKey>()
        .with_context(|| format!("'{s}' is not a cluster key (64 hex digits)"))
}

/// The origin named on the command line: a cluster key, or a ticket whose cluster key is
/// asked for (and its node's certificate checked) and whose members become dialing hints.
async fn origin_of(s: &str, args: &ClientArgs) -> Result<([u8; 32], Vec<NodeTicket>)> {
    if !s.trim().starts_with("aspen") {
        return Ok((origin_key(s)?.to_bytes(), Vec::new()));
    }
    let ticket: ClusterTicket = s.trim().parse().context("invalid cluster ticket")?;
    let options = args.options().await?;
    let origin = Client::connect_with(ticket.clone(), options)
        .await
        .context("cannot reach the origin cluster")?;
    let identity = origin.identity().await;
    origin.close().await;
    let (node, identity) = identity.context("cannot ask the origin cluster for its key")?;
    let key = ClusterKey::from_bytes(&identity.cluster_key)
        .map_err(|_| anyhow::anyhow!("the origin sent an invalid cluster key"))?;
    let cert = aspen_trust::NodeCertificate::decode(&identity.certificate)
        .context("the origin's node sent a bad certificate")?;
    cert.verify(&key, &node.endpoint_id, crate::server::identity::unix_now())
        .context("the origin's node certificate")?;
    if ticket.members.len() > aspen_federation::follows::MAX_HINTS {
        bail!(
            "the ticket lists {} nodes; a follow remembers at most {} (pass the cluster key instead)",
            ticket.members.len(),
            aspen_federation::follows::MAX_HINTS
        );
    }
    Ok((key.to_bytes(), ticket.members))
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
        | FedCommand::Exports { client }
        | FedCommand::Follow { client, .. }
        | FedCommand::Mirror { client, .. }
        | FedCommand::Unmirror { client, .. }
        | FedCommand::Mirrors { client }
        | FedCommand::Unfollow { client, .. }
        | FedCommand::Follows { client }
        | FedCommand::Sync { client, .. }
        | FedCommand::Status { client } => client,
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
        FedCommand::Follow {
            origin,
            resource,
            into,
            via,
            client,
        } => {
            let resource = resource.resource()?;
            let (origin, hints) = origin_of(&origin, &client).await?;
            if c.identity().await?.1.cluster_key == origin {
                bail!("that is this cluster's own key: follow another cluster's resources");
            }
            if via.len() > aspen_federation::MAX_VIA {
                bail!(
                    "{} mirrors named; a follow takes at most {}",
                    via.len(),
                    aspen_federation::MAX_VIA
                );
            }
            let mut mirrors = Vec::new();
            for v in &via {
                let (cluster, nodes) = origin_of(v, &client)
                    .await
                    .with_context(|| format!("--via {v}"))?;
                mirrors.push(ViaMirror { cluster, nodes });
            }
            if via.is_empty() {
                c.fed_follow(origin, resource.clone(), into, hints).await?;
            } else {
                c.fed_follow_via(origin, resource.clone(), into, hints, mirrors)
                    .await?;
            }
            done(client.output, "following", &resource);
        }
        FedCommand::Mirror {
            origin,
            resource,
            to,
            public,
            client,
        } => {
            if to.is_empty() && !public {
                bail!("mirror to whom? name cluster keys with --to KEY, or use --public");
            }
            let resource = resource.resource()?;
            c.fed_mirror(
                origin_key(&origin)?.to_bytes(),
                resource.clone(),
                cluster_keys(&to)?,
                public,
            )
            .await?;
            done(client.output, "mirroring", &resource);
        }
        FedCommand::Unmirror {
            origin,
            resource,
            to,
            public,
            client,
        } => {
            let resource = resource.resource()?;
            let all = to.is_empty() && !public;
            c.fed_unmirror(
                origin_key(&origin)?.to_bytes(),
                resource.clone(),
                cluster_keys(&to)?,
                public,
                all,
            )
            .await?;
            done(client.output, "unmirrored", &resource);
        }
        FedCommand::Mirrors { client } => {
            let list = c.fed_mirrors().await?;
            let rows: Vec<PolicyRow> = list
                .iter()
                .map(|m| PolicyRow {
                    origin: Some(m.origin),
                    resource: &m.resource,
                    public: m.public,
                    to: &m.to,
                    created_at_ms: m.created_at_ms,
                })
                .collect();
            print_policies(client.output, "mirrors", "nothing is mirrored", &rows);
        }
        FedCommand::Unfollow {
            origin,
            resource,
            client,
        } => {
            let resource = resource.resource()?;
            c.fed_unfollow(origin_key(&origin)?.to_bytes(), resource.clone())
                .await?;
            done(client.output, "unfollowed", &resource);
        }
        FedCommand::Follows { client } | FedCommand::Status { client } => {
            print_follows(client.output, &c.fed_follows().await?);
        }
        FedCommand::Sync {
            origin,
            kind,
            name,
            wait,
            client,
        } => {
            if !(wait.is_finite() && wait >= 0.0) {
                bail!("--wait must be a number of seconds");
            }
            let origin = origin
                .as_deref()
                .map(origin_key)
                .transpose()?
                .map(|k| k.to_bytes());
            let resource = match (kind, name) {
                (Some(kind), Some(name)) => Some(ResourceArgs { kind, name }.resource()?),
                _ => None,
            };
            let since = crate::server::identity::unix_now_ms();
            let mut list = c.fed_sync(origin, resource.clone()).await?;
            // The node answers after a few seconds; longer pulls are waited for here.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(wait);
            let selected = |f: &FollowSummary| {
                origin.is_none_or(|o| o == f.origin)
                    && resource.as_ref().is_none_or(|r| *r == f.resource)
            };
            while list
                .iter()
                .filter(|f| selected(f))
                .any(|f| f.last_attempt_ms < since || f.next_attempt_ms == 0)
                && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                list = c.fed_follows().await?;
            }
            list.retain(selected);
            print_follows(client.output, &list);
            if list.iter().any(|f| f.last_error.is_some()) {
                bail!("some pulls failed (see last error above)");
            }
        }
        FedCommand::Exports { client } => {
            let list = c.fed_exports().await?;
            let rows: Vec<PolicyRow> = list
                .iter()
                .map(|e| PolicyRow {
                    origin: None,
                    resource: &e.resource,
                    public: e.public,
                    to: &e.to,
                    created_at_ms: e.created_at_ms,
                })
                .collect();
            print_policies(client.output, "exports", "nothing is exported", &rows);
        }
    }
    Ok(())
}

/// One export (this cluster's resource) or mirror policy (another origin's), as listed.
struct PolicyRow<'a> {
    /// The origin, for a mirror.
    origin: Option<[u8; 32]>,
    resource: &'a Resource,
    public: bool,
    to: &'a [[u8; 32]],
    created_at_ms: u64,
}

/// Lists export or mirror policies: JSON under `list_name`, or one line each.
fn print_policies(output: Output, list_name: &str, nothing: &str, rows: &[PolicyRow]) {
    let to_hex = |to: &[[u8; 32]]| to.iter().map(hex::encode).collect::<Vec<_>>();
    match output {
        Output::Json => {
            let items: Vec<_> = rows
                .iter()
                .map(|r| {
                    let mut item = json!({
                        "kind": r.resource.kind.to_string(),
                        "name": r.resource.name,
                        "public": r.public,
                        "to": to_hex(r.to),
                        "created_at_ms": r.created_at_ms,
                    });
                    if let Some(origin) = r.origin {
                        item["origin"] = json!(hex::encode(origin));
                    }
                    item
                })
                .collect();
            println!("{}", json!({ list_name: items }));
        }
        Output::Text => {
            if rows.is_empty() {
                println!("{nothing}");
            }
            for r in rows {
                let mut to = to_hex(r.to);
                if r.public {
                    to.insert(0, "any cluster".into());
                }
                match r.origin {
                    Some(origin) => println!(
                        "{} of {}  to {}",
                        r.resource,
                        hex::encode(origin),
                        to.join(", ")
                    ),
                    None => println!("{}  to {}", r.resource, to.join(", ")),
                }
            }
        }
    }
}

fn print_follows(output: Output, list: &[FollowSummary]) {
    let now = crate::server::identity::unix_now_ms();
    match output {
        Output::Json => {
            let items: Vec<_> = list
                .iter()
                .map(|f| {
                    json!({
                        "origin": hex::encode(f.origin),
                        "kind": f.resource.kind.to_string(),
                        "name": f.resource.name,
                        "into": f.into,
                        "created_at_ms": f.created_at_ms,
                        "seq": f.seq,
                        "manifest_issued_at_ms": f.manifest_issued_at_ms,
                        "last_success_ms": f.last_success_ms,
                        "last_attempt_ms": f.last_attempt_ms,
                        "next_attempt_ms": f.next_attempt_ms,
                        "lag_ms": (f.last_success_ms > 0).then(|| now.saturating_sub(f.last_success_ms)),
                        "failures": f.failures,
                        "last_error": f.last_error,
                        "via": f.via.iter().map(hex::encode).collect::<Vec<_>>(),
                        "last_source": f.last_source.map(hex::encode),
                        "mirrors": f.mirrors.iter().map(|m| json!({
                            "cluster": hex::encode(m.cluster),
                            "ok": m.ok,
                            "detail": m.detail,
                            "at_ms": m.at_ms,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            println!("{}", json!({ "follows": items }));
        }
        Output::Text => {
            if list.is_empty() {
                println!("nothing is followed");
            }
            let ago = |ms: u64| {
                if ms == 0 {
                    "never".to_string()
                } else {
                    format!("{:.1}s ago", now.saturating_sub(ms) as f64 / 1000.0)
                }
            };
            for f in list {
                println!("{} of {} -> {}", f.resource, hex::encode(f.origin), f.into);
                println!(
                    "  manifest seq {}, last success {}, next pull in {:.1}s, failures {}",
                    f.seq,
                    ago(f.last_success_ms),
                    f.next_attempt_ms.saturating_sub(now) as f64 / 1000.0,
                    f.failures
                );
                if let Some(m) = f.last_source {
                    println!("  last pulled from mirror {}", hex::encode(m));
                }
                if !f.via.is_empty() {
                    let via: Vec<String> = f.via.iter().map(hex::encode).collect();
                    println!("  mirrors to try: {}", via.join(", "));
                }
                for m in &f.mirrors {
                    let verdict = if m.ok {
                        "served verified data".to_string()
                    } else {
                        format!("refused: {}", m.detail)
                    };
                    println!(
                        "  mirror {} {}: {verdict}",
                        hex::encode(m.cluster),
                        ago(m.at_ms)
                    );
                }
                if let Some(e) = &f.last_error {
                    println!("  last error: {e}");
                }
            }
        }
    }
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
