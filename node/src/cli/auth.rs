//! `aspen auth`: who am I, grants and roles, capability tokens, admin recovery.
//!
//! A client is known by its key: `--identity FILE` / `ASPEN_IDENTITY`, else
//! `$XDG_CONFIG_HOME/aspen/identity.key` (or `~/.config/aspen/identity.key`), created 0600 on
//! first use. Tokens are signed locally with that key; only revocation talks to the cluster.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use aspen_client::{Client, ClientOptions};
use aspen_trust::{CapabilityToken, NodeKey, Permission, RoleOrPermission};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::cli::{ClientArgs, Output};

/// Longest a token may be valid (`--ttl`).
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);

#[derive(Subcommand, Debug)]
pub enum AuthCommand {
    /// Print this client's public key (what grants are given to). With -o json and a
    /// cluster (--cluster / ASPEN_CLUSTER), also what the cluster lets it do.
    Whoami {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Give KEY roles (admin, readwrite, readonly, or a custom role) and permissions
    /// (KIND:ACTION:PATTERN, e.g. kv:read:app/ or doc:write:*). Needs cluster:admin.
    ///
    /// KIND is kv, doc, blob, ns or cluster; ACTION is read, write or admin (each includes
    /// the ones before it); PATTERN is a prefix of the key, document name, blob tag or
    /// namespace id (hex), or * for everything.
    Grant {
        /// The key to grant to (64 hex digits, from `aspen auth whoami`).
        key: String,
        /// Roles and permissions.
        #[arg(required = true)]
        grants: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Take roles and permissions away from KEY; with none named, its whole grant. Needs
    /// cluster:admin.
    Revoke {
        key: String,
        grants: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Custom roles.
    #[command(subcommand)]
    Role(RoleCommand),
    /// Every grant and custom role, and revoked tokens. Needs cluster:admin.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Capability tokens: hand some of your permissions to another key.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Make this client's identity an admin again, proven by a member's bootstrap secret:
    /// for when every admin key is lost. Needs read access to the member's data directory.
    Recover {
        /// The member's data directory (reads node.ticket and bootstrap.secret there).
        data_dir: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum RoleCommand {
    /// Create (or replace) a role. Needs cluster:admin.
    Create {
        name: String,
        #[arg(required = true)]
        permissions: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Sign a token that lets --to use some of your permissions (or, with --from, narrow a
    /// token you were given and pass it on). Prints the token. Signed locally: a member
    /// accepts it while your own grant still covers it.
    Issue(IssueArgs),
    /// Revoke a token, and every token delegated from it, on every member. Needs
    /// cluster:admin or to have issued it.
    Revoke {
        /// The token (aspen-token-v1:...).
        #[arg(id = "revoked_token", value_name = "TOKEN")]
        token: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Longest validity of a bearer token: whoever holds one can use it.
pub const MAX_BEARER_TTL: Duration = Duration::from_secs(30 * 86_400);

#[derive(Args, Debug)]
pub struct IssueArgs {
    /// The key that may use the token (64 hex digits): it is not a bearer token.
    #[arg(long, required_unless_present = "bearer", conflicts_with = "bearer")]
    pub to: Option<String>,
    /// A bearer token instead: whoever holds it may use it, on the automerge-repo WebSocket
    /// listener and the etcd API only (browser pages and etcd clients cannot prove a key).
    /// Keep it narrow (e.g. `doc:write:automerge/`, `kv:write:app/`) and short-lived (at
    /// most 30d); it cannot be delegated (--from).
    #[arg(long, conflicts_with = "from")]
    pub bearer: bool,
    /// Permissions it carries (KIND:ACTION:PATTERN), at most what you hold.
    #[arg(long, required = true, num_args = 1..)]
    pub allow: Vec<String>,
    /// How long it is valid: e.g. 30m, 24h, 7d (at most 365d).
    #[arg(long, default_value = "24h")]
    pub ttl: String,
    /// Delegate: narrow this token (which must be addressed to you) instead of issuing a
    /// new one from your own grant.
    #[arg(long, value_name = "TOKEN")]
    pub from: Option<String>,
    /// The key file to sign with (default: as every command, see --identity).
    #[arg(long, env = "ASPEN_IDENTITY", value_name = "FILE")]
    pub identity: Option<PathBuf>,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

/// The default identity file: `$XDG_CONFIG_HOME/aspen/identity.key`, else
/// `~/.config/aspen/identity.key`.
pub fn default_identity_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("aspen").join("identity.key"));
    }
    std::env::var_os("HOME").filter(|d| !d.is_empty()).map(|h| {
        PathBuf::from(h)
            .join(".config")
            .join("aspen")
            .join("identity.key")
    })
}

/// Loads the client identity (creating it 0600 on first use), off the executor.
pub async fn load_identity(path: Option<PathBuf>) -> Result<NodeKey> {
    let path = match path.or_else(default_identity_path) {
        Some(p) => p,
        None => bail!(
            "no identity: pass --identity FILE or set ASPEN_IDENTITY (HOME and XDG_CONFIG_HOME are unset)"
        ),
    };
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || crate::keyfile::load_or_create_key(&path))
        .await?
        .with_context(|| format!("identity {shown}"))
}

/// Parses a public key given as 64 hex digits.
pub fn parse_key(s: &str) -> Result<[u8; 32]> {
    let s = s.trim();
    let mut key = [0u8; 32];
    if s.len() != 64 || hex::decode_to_slice(s, &mut key).is_err() {
        bail!("'{s}' is not a key: expected 64 hex digits (as `aspen auth whoami` prints)");
    }
    iroh::PublicKey::from_bytes(&key)
        .with_context(|| format!("'{s}' is not an Ed25519 public key"))?;
    Ok(key)
}

/// Parses durations like `90s`, `30m`, `24h`, `7d`.
pub fn parse_ttl(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .with_context(|| format!("'{s}' is not a duration: use e.g. 30m, 24h or 7d"))?;
    let secs = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        other => bail!("unknown unit '{other}' in '{s}': use s, m, h or d"),
    };
    let ttl = Duration::from_secs(n.saturating_mul(secs));
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        bail!("--ttl must be between 1s and 365d");
    }
    Ok(ttl)
}

fn split_grants(items: &[String]) -> Result<(Vec<String>, Vec<String>)> {
    let mut roles = Vec::new();
    let mut permissions = Vec::new();
    for item in items {
        match item.parse::<RoleOrPermission>() {
            Ok(RoleOrPermission::Role(r)) => roles.push(r),
            Ok(RoleOrPermission::Permission(p)) => permissions.push(p.to_string()),
            Err(e) => bail!("'{item}': {e}"),
        }
    }
    Ok((roles, permissions))
}

fn unix_now() -> u64 {
    crate::server::identity::unix_now()
}

pub async fn auth(cmd: AuthCommand) -> Result<()> {
    match cmd {
        AuthCommand::Whoami { client } => whoami(client).await,
        AuthCommand::Grant {
            key,
            grants,
            client,
        } => {
            let key = parse_key(&key)?;
            let (roles, permissions) = split_grants(&grants)?;
            with_client(&client, |c| async move {
                c.auth_grant(key, roles, permissions).await
            })
            .await?;
            done(&client, json!({ "granted": hex::encode(key) }), "granted");
            Ok(())
        }
        AuthCommand::Revoke {
            key,
            grants,
            client,
        } => {
            let key = parse_key(&key)?;
            let all = grants.is_empty();
            let (roles, permissions) = split_grants(&grants)?;
            with_client(&client, |c| async move {
                c.auth_revoke(key, roles, permissions, all).await
            })
            .await?;
            done(&client, json!({ "revoked": hex::encode(key) }), "revoked");
            Ok(())
        }
        AuthCommand::Role(RoleCommand::Create {
            name,
            permissions,
            client,
        }) => {
            for p in &permissions {
                p.parse::<Permission>()
                    .with_context(|| format!("invalid permission '{p}'"))?;
            }
            let shown = name.clone();
            with_client(&client, |c| async move {
                c.role_create(name, permissions).await
            })
            .await?;
            done(&client, json!({ "role": shown }), "role created");
            Ok(())
        }
        AuthCommand::List { client } => {
            let listing = with_client(&client, |c| async move { c.auth_list().await }).await?;
            print_listing(&listing, client.output);
            Ok(())
        }
        AuthCommand::Token(TokenCommand::Issue(args)) => issue(args).await,
        AuthCommand::Token(TokenCommand::Revoke { token, client }) => {
            let token: CapabilityToken = token.parse().context("not a capability token")?;
            let hash = hex::encode(token.hash());
            with_client(
                &client,
                |c| async move { c.token_revoke(token.encode()).await },
            )
            .await?;
            done(&client, json!({ "revoked_token": hash }), "token revoked");
            Ok(())
        }
        AuthCommand::Recover { data_dir, client } => {
            let (node, secret) =
                crate::cli::cluster::node_and_secret(&data_dir.display().to_string(), None).await?;
            let options = client.options().await?;
            let c = Client::connect_node(node, options).await?;
            let key = c.key();
            let r = c.recover_admin(secret).await;
            c.close().await;
            r?;
            done(
                &client,
                json!({ "admin": hex::encode(key) }),
                &format!("{} is an admin", hex::encode(key)),
            );
            Ok(())
        }
    }
}

async fn with_client<T, F, Fut>(args: &ClientArgs, f: F) -> Result<T>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, aspen_client::ClientError>>,
{
    let c = args.client().await?;
    let r = f(c.clone()).await;
    c.close().await;
    Ok(r?)
}

fn done(args: &ClientArgs, value: serde_json::Value, text: &str) {
    match args.output {
        Output::Json => println!("{value}"),
        Output::Text => println!("{text}"),
    }
}

async fn whoami(args: ClientArgs) -> Result<()> {
    let key = load_identity(args.identity.clone()).await?.public();
    // Text output is just the key (`KEY=$(aspen auth whoami)`); what the cluster lets it do
    // comes with -o json.
    let seen = if args.cluster.is_some() && args.output == Output::Json {
        let c = args.client().await?;
        let r = c.whoami().await;
        c.close().await;
        Some(r?)
    } else {
        None
    };
    match args.output {
        Output::Json => {
            let mut v = json!({ "key": hex::encode(key) });
            if let Some(w) = &seen {
                v["member"] = json!(w.member);
                v["roles"] = json!(w.roles);
                v["permissions"] = json!(w.permissions);
                v["token"] = match &w.token {
                    Some(t) => json!({
                        "root_issuer": hex::encode(t.root_issuer),
                        "permissions": t.permissions,
                        "expires_at": t.expires_at,
                    }),
                    None => serde_json::Value::Null,
                };
            }
            println!("{v}");
        }
        Output::Text => {
            println!("{}", hex::encode(key));
            if let Some(w) = &seen {
                if w.member {
                    println!("member node (may do everything)");
                }
                if !w.roles.is_empty() {
                    println!("roles        {}", w.roles.join(" "));
                }
                if !w.permissions.is_empty() {
                    println!("permissions  {}", w.permissions.join(" "));
                }
                if w.roles.is_empty() && w.permissions.is_empty() && !w.member {
                    println!("no grant: this key may do nothing here (ask an admin: aspen auth grant {} ROLE)", hex::encode(key));
                }
                if let Some(t) = &w.token {
                    println!(
                        "token        {} (from {}, expires at Unix time {})",
                        t.permissions.join(" "),
                        hex::encode(t.root_issuer),
                        t.expires_at
                    );
                }
            }
        }
    }
    Ok(())
}

async fn issue(args: IssueArgs) -> Result<()> {
    let me = load_identity(args.identity.clone()).await?;
    let audience = match &args.to {
        Some(to) => parse_key(to)?,
        None => aspen_trust::BEARER_AUDIENCE,
    };
    let ttl = parse_ttl(&args.ttl)?;
    if args.bearer && ttl > MAX_BEARER_TTL {
        bail!(
            "a bearer token may be valid for at most {}d (anyone holding it can use it); \
             issue a shorter one and renew it",
            MAX_BEARER_TTL.as_secs() / 86_400
        );
    }
    let permissions: Vec<Permission> = args
        .allow
        .iter()
        .map(|p| {
            p.parse()
                .with_context(|| format!("invalid permission '{p}'"))
        })
        .collect::<Result<_>>()?;
    let now = unix_now();
    let nonce: [u8; 16] = rand::random();
    let token = match &args.from {
        None => {
            CapabilityToken::issue(&me, audience, permissions, now, now + ttl.as_secs(), nonce)?
        }
        Some(parent) => {
            let parent: CapabilityToken =
                parent.parse().context("--from is not a capability token")?;
            // A delegation lies within its parent's validity window.
            let leaf = parent.leaf().clone();
            let expires = (now + ttl.as_secs()).min(leaf.expires_at);
            parent.delegate(
                &me,
                audience,
                permissions,
                now.max(leaf.not_before),
                expires,
                nonce,
            )?
        }
    };
    match args.output {
        Output::Json => println!(
            "{}",
            json!({
                "token": token.to_string(),
                "hash": hex::encode(token.hash()),
                "to": if args.bearer { "bearer".to_string() } else { hex::encode(audience) },
                "expires_at": crate::server::auth::chain_expiry(&token),
            })
        ),
        Output::Text => println!("{token}"),
    }
    Ok(())
}

fn print_listing(l: &aspen_client::protocol::AuthListing, output: Output) {
    match output {
        Output::Json => {
            let v = json!({
                "grants": l.grants.iter().map(|g| json!({
                    "key": hex::encode(g.key), "roles": g.roles, "permissions": g.permissions,
                })).collect::<Vec<_>>(),
                "roles": l.roles.iter().map(|r| json!({
                    "name": r.name, "permissions": r.permissions,
                })).collect::<Vec<_>>(),
                "revoked_tokens": l.revoked_tokens.iter().map(|(h, e)| json!({
                    "hash": hex::encode(h), "expires_at": e,
                })).collect::<Vec<_>>(),
            });
            println!("{v}");
        }
        Output::Text => {
            println!("grants:");
            for g in &l.grants {
                let mut items = g.roles.clone();
                items.extend(g.permissions.iter().cloned());
                println!("  {}  {}", hex::encode(g.key), items.join(" "));
            }
            if !l.roles.is_empty() {
                println!("roles:");
                for r in &l.roles {
                    println!("  {}  {}", r.name, r.permissions.join(" "));
                }
            }
            if !l.revoked_tokens.is_empty() {
                println!("revoked tokens:");
                for (h, e) in &l.revoked_tokens {
                    println!("  {}  until Unix time {e}", hex::encode(h));
                }
            }
        }
    }
}

/// Client options for a process acting as `key` (tests and `aspen up`).
pub fn options_for(key: &NodeKey, deadline: Duration) -> ClientOptions {
    ClientOptions {
        deadline,
        identity: Some(iroh::SecretKey::from_bytes(&key.secret_bytes())),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        crate::cli::Cli::command().debug_assert();
    }

    #[test]
    fn ttls_parse_with_units_and_bounds() {
        assert_eq!(parse_ttl("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_ttl("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert!(parse_ttl("0h").is_err());
        assert!(parse_ttl("366d").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("5w").is_err());
        assert!(parse_ttl("99999999999999999999d").is_err());
    }

    #[test]
    fn keys_are_checked() {
        assert!(parse_key("zz").is_err());
        assert!(parse_key(&"00".repeat(31)).is_err());
        let k = NodeKey::generate().public();
        assert_eq!(parse_key(&hex::encode(k)).unwrap(), k);
    }
}
