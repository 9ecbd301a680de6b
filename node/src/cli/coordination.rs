//! `aspen lock` and `aspen elect`: etcd's lock and election recipes on leases and watches
//! (see `aspen_client::LeaseSession`).

use std::process::Stdio;

use anyhow::{bail, Context, Result};
use aspen_client::{Client, WatchRequest, WatchUpdate};
use aspen_kv::api::prefix_end;
use clap::Args;
use futures::StreamExt;
use serde_json::json;

use super::{ClientArgs, Output};

/// A command's exit status, passed on by `aspen lock` (main exits with it, silently).
#[derive(Debug, thiserror::Error)]
#[error("the command exited with status {0}")]
pub struct ChildExit(pub i32);

#[derive(Args, Debug)]
pub struct LockArgs {
    /// The lock's name (its contenders' keys are NAME/<lease id>).
    pub name: String,
    /// TTL of the session's lease, in seconds: if this process stops keeping it alive (it
    /// dies, or is cut off from the cluster), the lock is released this long after.
    #[arg(long, default_value_t = 60)]
    pub ttl: u64,
    /// The command to run while holding the lock, after `--`. It gets the fencing token in
    /// ASPEN_LOCK_TOKEN (the lock key's creation revision, larger for every acquisition),
    /// the key in ASPEN_LOCK_KEY and the lease in ASPEN_LEASE_ID. If the lease is lost while
    /// it runs, it is killed and `aspen lock` fails. Without a command: print the key and
    /// token, and hold the lock until stopped (Ctrl-C).
    #[arg(last = true)]
    pub command: Vec<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug)]
pub struct ElectArgs {
    /// The election's name.
    pub name: String,
    /// Campaign with this value: wait to become leader, print it, then lead until stopped
    /// (Ctrl-C resigns).
    #[arg(required_unless_present = "listen", conflicts_with = "listen")]
    pub value: Option<String>,
    /// Do not campaign: print the leader's value now and whenever the leader changes.
    #[arg(long)]
    pub listen: bool,
    /// TTL of the campaign's lease, in seconds (leadership ends this long after this
    /// process stops keeping it alive).
    #[arg(long, default_value_t = 60)]
    pub ttl: u64,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn lock(args: LockArgs) -> Result<()> {
    let c = args.client.client().await?;
    let result = lock_with(&c, &args).await;
    c.close().await;
    result
}

async fn lock_with(c: &Client, args: &LockArgs) -> Result<()> {
    let name = args.client.bytes(&args.name)?;
    let session = c.session(args.ttl).await?;
    let held = tokio::select! {
        held = c.lock(&session, &name) => held?,
        _ = tokio::signal::ctrl_c() => {
            session.close().await?;
            bail!("interrupted while waiting for the lock");
        }
    };
    let key = args.client.show(&held.key);
    let Some((program, rest)) = args.command.split_first() else {
        match args.client.output {
            Output::Json => println!("{}", json!({ "key": key, "token": held.token })),
            Output::Text => println!("{key} {}", held.token),
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = session.lost() => bail!("the lock's lease was lost; the lock is no longer held"),
        }
        session.close().await?;
        return Ok(());
    };
    let mut child = tokio::process::Command::new(program)
        .args(rest)
        .env("ASPEN_LOCK_TOKEN", held.token.to_string())
        .env("ASPEN_LOCK_KEY", &key)
        .env("ASPEN_LEASE_ID", session.lease().to_string())
        .stdin(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    let status = tokio::select! {
        status = child.wait() => status.context("waiting for the command")?,
        _ = session.lost() => {
            let _ = child.kill().await;
            bail!("the lock's lease was lost while {program} ran; it was killed");
        }
        _ = tokio::signal::ctrl_c() => {
            let _ = child.kill().await;
            session.close().await?;
            bail!("interrupted; {program} was killed and the lock released");
        }
    };
    session.close().await?;
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => Err(ChildExit(code).into()),
        None => Err(ChildExit(128).into()),
    }
}

pub async fn elect(args: ElectArgs) -> Result<()> {
    let c = args.client.client().await?;
    let result = elect_with(&c, &args).await;
    c.close().await;
    result
}

async fn elect_with(c: &Client, args: &ElectArgs) -> Result<()> {
    let name = args.client.bytes(&args.name)?;
    let Some(value) = &args.value else {
        return listen(c, args, &name).await;
    };
    let session = c.session(args.ttl).await?;
    let held = tokio::select! {
        held = c.campaign(&session, &name, args.client.bytes(value)?) => held?,
        _ = tokio::signal::ctrl_c() => {
            session.close().await?;
            bail!("interrupted while campaigning");
        }
    };
    match args.client.output {
        Output::Json => println!(
            "{}",
            json!({ "leader": value, "key": args.client.show(&held.key), "revision": held.token })
        ),
        Output::Text => println!(
            "elected: {value} (key {}, revision {})",
            args.client.show(&held.key),
            held.token
        ),
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = session.lost() => bail!("the campaign's lease was lost; no longer the leader"),
    }
    session.close().await?;
    Ok(())
}

/// Prints the leader's value at start and on every change of leader, until stopped.
async fn listen(c: &Client, args: &ElectArgs, name: &[u8]) -> Result<()> {
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    let mut watch = c.watch(WatchRequest {
        end: Some(prefix_end(&prefix)),
        start: prefix,
        from: 0,
        after: None,
        prev_kv: false,
        progress_every_ms: 0,
    });
    // The leader's key last printed (None inside: no leader); nothing printed yet.
    let mut shown: Option<Option<Vec<u8>>> = None;
    loop {
        // Read after the watch started: a change from then on wakes the loop again.
        let leader = c.election_leader(name).await?;
        let key = leader.as_ref().map(|kv| kv.key.clone());
        if shown.as_ref() != Some(&key) {
            let value = leader.as_ref().map(|kv| args.client.show(&kv.value));
            match args.client.output {
                Output::Json => println!("{}", json!({ "leader": value })),
                Output::Text => println!("{}", value.as_deref().unwrap_or("(no leader)")),
            }
            shown = Some(key);
        }
        tokio::select! {
            update = watch.next() => match update {
                Some(Ok(WatchUpdate::Events { .. } | WatchUpdate::Progress { .. })) => {}
                Some(Err(e)) => return Err(e.into()),
                None => bail!("the watch ended"),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
