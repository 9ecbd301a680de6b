//! `aspen node run`: one node in the foreground.

use anyhow::Result;
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
    let node = RunningNode::start(&config).await?;
    let ticket = node.node_ticket();
    let addrs: Vec<String> = ticket.addrs.iter().map(|a| a.to_string()).collect();
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({ "node_id": format!("{:016x}", node.state.id), "addrs": addrs,
                                "ticket": ticket.to_string(), "data_dir": config.data_dir })
        ),
        Output::Text => {
            println!(
                "node {:016x} listening on {}",
                node.state.id,
                addrs.join(", ")
            );
            println!("node ticket: {ticket}");
            println!("data dir: {}", config.data_dir.display());
        }
    }
    wait_for_stop(args.exit_on_stdin_close).await;
    tracing::info!("shutting down");
    node.shutdown().await;
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
