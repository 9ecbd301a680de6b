//! `aspen dht-testnet`: a local Mainline DHT on 127.0.0.1, for finding clusters by key with
//! nothing leaving the machine (trying discovery out, and the examples). The nodes are the
//! `mainline` crate's own, the same DHT code the public network runs.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// Most nodes a local testnet may run.
pub const MAX_TESTNET_NODES: usize = 64;

pub async fn dht_testnet(nodes: usize, bootstrap_file: Option<PathBuf>) -> Result<()> {
    if !(1..=MAX_TESTNET_NODES).contains(&nodes) {
        bail!("--nodes must be between 1 and {MAX_TESTNET_NODES}");
    }
    let testnet = tokio::task::spawn_blocking(move || mainline::Testnet::builder(nodes).build())
        .await?
        .context("cannot start the local DHT nodes")?;
    let bootstrap = testnet.bootstrap.join(",");
    if let Some(path) = &bootstrap_file {
        // Written whole (then renamed), so a script waiting for the file never reads half.
        let partial = path.with_extension("partial");
        tokio::fs::write(&partial, format!("{bootstrap}\n"))
            .await
            .with_context(|| format!("cannot write {}", partial.display()))?;
        tokio::fs::rename(&partial, path)
            .await
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!("{bootstrap}");
    eprintln!(
        "a local Mainline DHT of {nodes} nodes on 127.0.0.1 is running; give nodes and clients \
         --dht-bootstrap {bootstrap}. Stop it with Ctrl-C."
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    drop(testnet);
    Ok(())
}
