//! The `aspen` binary. Errors are printed as one line on stderr with a non-zero exit code.

use clap::Parser;

use aspen_node::cli::{Cli, Command, NodeCommand};

/// mimalloc instead of the system allocator: a node allocates and frees small buffers on
/// every request from many threads, where glibc's malloc took ~15% of a loaded node's CPU
/// (BENCHMARKS.md, "Where write time goes").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Node(_)) {
        // A command's output piped into `head` ends quietly when the reader goes away, as
        // other Unix tools do, instead of panicking on the broken pipe. (Rust ignores
        // SIGPIPE; a node keeps it ignored.)
        #[cfg(unix)]
        // SAFETY: restores the default disposition before any other thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("ASPEN_LOG").unwrap_or_else(|_| {
        let default = if matches!(cli.command, Command::Node(_)) {
            // openraft logs every failed replication retry (about ten a second per dead
            // member), and the QUIC stack each failed attempt to drop a dead path (dozens a
            // second after a member moved); the node logs member reachability itself
            // (server/peers.rs).
            "info,iroh=warn,noq_proto=error,mainline=warn,openraft=warn,openraft::replication=off,openraft::raft::responder=error,automerge=off"
        } else {
            // A command stops waiting for members that do not answer when it is done
            // (`Client::close`); iroh then reports its endpoint as dropped uncleanly.
            "warn,automerge=off,iroh::socket=off"
        };
        tracing_subscriber::EnvFilter::new(default)
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Plain text when logging to a file (e.g. node.log under `aspen up`).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(async_workers());
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Node(NodeCommand::Run(args)) => aspen_node::run::run(args).await,
            Command::Cluster(cmd) => aspen_node::cli::cluster::cluster(cmd).await,
            Command::Kv(cmd) => aspen_node::cli::kv::kv(cmd).await,
            Command::Lease(cmd) => aspen_node::cli::lease::lease(cmd).await,
            Command::Lock(args) => aspen_node::cli::coordination::lock(args).await,
            Command::Elect(args) => aspen_node::cli::coordination::elect(args).await,
            Command::Doc(cmd) => aspen_node::cli::doc::doc(cmd).await,
            Command::Blob(cmd) => aspen_node::cli::blob::blob(cmd).await,
            Command::Docs(cmd) => aspen_node::cli::namespace::docs(cmd).await,
            Command::Auth(cmd) => aspen_node::cli::auth::auth(cmd).await,
            Command::Fed(cmd) => aspen_node::cli::fed::fed(cmd).await,
            Command::Up(args) => aspen_node::up::up(args).await,
            Command::Bench(cmd) => aspen_node::bench::bench(cmd).await,
            Command::DhtTestnet {
                nodes,
                bootstrap_file,
            } => aspen_node::cli::testnet::dht_testnet(nodes, bootstrap_file).await,
            Command::Discover {
                cluster_key,
                dht,
                record_cache,
                output,
            } => aspen_node::cli::discover(&cluster_key, &dht, record_cache, output).await,
        }
    });
    // Do not wait for lingering connection tasks.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    if let Err(e) = result {
        if let Some(aspen_node::cli::coordination::ChildExit(code)) = e.downcast_ref() {
            std::process::exit(*code);
        }
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

/// Async worker threads: one fewer than the machine's cores, at least one.
///
/// The node's storage work (redb applies, the log's writes and syncs) runs on threads of its
/// own, which want the remaining core; on a 2-core machine a second async worker mostly adds
/// cross-thread wake-ups (sequential puts 13% slower at one node, BENCHMARKS.md).
/// `TOKIO_WORKER_THREADS` overrides this.
fn async_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().saturating_sub(1))
        .unwrap_or(1)
        .max(1)
}
