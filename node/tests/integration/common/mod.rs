//! Test harness: real `aspen` processes on loopback, each killed when its handle drops (also
//! when a test panics). Waits are on conditions with generous deadlines, never fixed sleeps.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aspen_client::{Client, ClientOptions, ClusterTicket, Consistency, NodeTicket};

pub const DEADLINE: Duration = Duration::from_secs(60);

/// The secret of the identity every test acts as: the first admin of every cluster the
/// harness forms (the same key for the SDK and, through `ASPEN_IDENTITY`, for the CLI).
pub const ADMIN_SECRET: [u8; 32] = [0x5a; 32];

/// The admin identity as a key file, written once per test process (0600).
pub fn admin_identity_file() -> &'static Path {
    static FILE: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    let (_, path) = FILE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.key");
        aspen_node::keyfile::write_private(
            &path,
            &aspen_trust::NodeKey::from_secret_bytes(&ADMIN_SECRET).to_file_contents(),
        )
        .unwrap();
        (dir, path)
    });
    path
}

/// The public key of [`ADMIN_SECRET`].
pub fn admin_key() -> [u8; 32] {
    aspen_trust::NodeKey::from_secret_bytes(&ADMIN_SECRET).public()
}

/// A fresh identity with no grant: what a stranger connects with.
pub fn stranger_options() -> ClientOptions {
    ClientOptions {
        identity: Some(iroh::SecretKey::from_bytes(&rand::random())),
        ..options()
    }
}

/// Options acting as the key `secret`.
pub fn options_as(secret: [u8; 32]) -> ClientOptions {
    ClientOptions {
        identity: Some(iroh::SecretKey::from_bytes(&secret)),
        ..options()
    }
}

/// The bootstrap secret of the node in `dir`.
pub fn bootstrap_secret(dir: &Path) -> [u8; 32] {
    aspen_node::keyfile::read_bootstrap_secret(dir).unwrap()
}

pub fn aspen_bin() -> &'static str {
    env!("CARGO_BIN_EXE_aspen")
}

/// One `aspen node run` process.
pub struct NodeProc {
    pub dir: PathBuf,
    pub args: Vec<String>,
    child: Option<Child>,
    pub ticket: NodeTicket,
}

impl NodeProc {
    pub fn start(dir: &Path, args: &[&str]) -> NodeProc {
        let mut node = NodeProc {
            dir: dir.to_path_buf(),
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
            ticket: NodeTicket {
                endpoint_id: [0; 32],
                addrs: vec![],
            },
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let ticket_path = self.dir.join("node.ticket");
        // Keep the old ticket (the node reuses its port from it); wait for a newer one.
        let before = std::fs::metadata(&ticket_path)
            .and_then(|m| m.modified())
            .ok();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("node.log"))
            .unwrap();
        // Tests never reach the public DHT: off unless a (local) bootstrap is given.
        let no_dht = !self.args.iter().any(|a| a == "--dht-bootstrap");
        let child = Command::new(aspen_bin())
            .args(["node", "run", "--data-dir"])
            .arg(&self.dir)
            .args(no_dht.then_some("--no-dht"))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn aspen");
        self.child = Some(child);
        self.ticket = wait_for(
            &format!("{} to write its ticket", self.dir.display()),
            || {
                let modified = std::fs::metadata(&ticket_path)
                    .and_then(|m| m.modified())
                    .ok();
                if modified.is_none() || modified == before {
                    return None;
                }
                std::fs::read_to_string(&ticket_path)
                    .ok()
                    .and_then(|t| t.parse().ok())
            },
        );
    }

    pub fn node_id(&self) -> u64 {
        self.ticket.node_id()
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The exit status, once the process has exited by itself.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGSTOP: the process freezes (no timers, no I/O) until [`NodeProc::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`NodeProc::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.pid().expect("process running").to_string();
        let status = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(status.success(), "kill {sig} {pid}");
    }

    /// Starts the process again on the same data directory (same arguments unless replaced).
    pub fn restart(&mut self, args: Option<&[&str]>) {
        self.kill9();
        if let Some(a) = args {
            self.args = a.iter().map(|s| s.to_string()).collect();
        }
        self.spawn();
    }

    pub fn cluster_ticket(&self) -> Option<ClusterTicket> {
        std::fs::read_to_string(self.dir.join("cluster.ticket"))
            .ok()
            .and_then(|t| t.parse().ok())
    }

    /// The node's iroh address (its key and first listening address).
    pub fn addr(&self) -> iroh::EndpointAddr {
        iroh::EndpointAddr::new(iroh::EndpointId::from_bytes(&self.ticket.endpoint_id).unwrap())
            .with_ip_addr(self.ticket.addrs[0])
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `f` until it returns `Some`, panicking after [`DEADLINE`].
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Like [`wait_until`], but a timeout also prints the last lines of each node's log.
pub async fn wait_until_or_dump<T, F, Fut>(what: &str, nodes: &[NodeProc], mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() >= DEADLINE {
            dump_logs(&format!("timed out waiting for {what}"), nodes);
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Prints why a test is failing, then the end of each node's log (and, with
/// `ASPEN_TEST_LOG_DIR`, writes the whole logs there).
pub fn dump_logs(why: &str, nodes: &[NodeProc]) {
    // CI shows the start and end of a failure's output: the cause first, then short
    // tails without openraft's per-retry replication noise.
    eprintln!("{why}; the nodes' logs end:");
    for n in nodes {
        let log = n.log();
        // For chasing a rare failure: whole logs, not just their tails.
        if let Ok(d) = std::env::var("ASPEN_TEST_LOG_DIR") {
            let _ = std::fs::write(
                format!("{d}/{}-{:016x}.log", std::process::id(), n.node_id()),
                &log,
            );
        }
        let tail: Vec<&str> = log
            .lines()
            .rev()
            .filter(|l| !l.contains("replication_handler") && !l.contains("membership_log_id"))
            .take(15)
            .collect();
        eprintln!("--- {:016x} (last 15 lines of its log)", n.node_id());
        for line in tail.into_iter().rev() {
            eprintln!("{line}");
        }
    }
}

/// Async version of [`wait_for`].
pub async fn wait_until<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    wait_until_or_dump(what, &[], f).await
}

/// The leader a member names, waiting while the member that answers knows none (between
/// elections, or just restarted).
pub async fn leader_named_by(client: &Client) -> aspen_kv::NodeId {
    wait_until("a member to name a leader", || async {
        client.status().await.ok()?.leader
    })
    .await
}

/// A local Mainline DHT: 8 nodes on loopback (nothing reaches the internet); the bootstrap
/// list to pass as `--dht-bootstrap`.
pub fn testnet() -> (mainline::Testnet, String) {
    let testnet = mainline::Testnet::builder(8)
        .build()
        .expect("local testnet");
    let bootstrap = testnet.bootstrap.join(",");
    (testnet, bootstrap)
}

/// The ticket of these nodes, as text.
pub fn ticket_text(nodes: &[NodeProc]) -> String {
    ClusterTicket {
        members: nodes.iter().map(|n| n.ticket.clone()).collect(),
    }
    .to_string()
}

/// Runs the CLI to completion.
pub fn cli(args: &[&str], cluster: Option<&str>) -> Output {
    cli_command(args, cluster).output().expect("run aspen")
}

/// A CLI process left running (killed when dropped, also when the test panics), its
/// standard output readable line by line as it comes.
pub struct CliProc {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl CliProc {
    pub fn spawn(args: &[&str], cluster: Option<&str>) -> CliProc {
        use std::io::BufRead;
        let mut child = cli_command(args, cluster)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run aspen");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        CliProc { child, lines }
    }

    /// The next line of output, waiting up to [`DEADLINE`] (None: the process ended).
    pub fn next_line(&self) -> Option<String> {
        tokio::task::block_in_place(|| match self.lines.recv_timeout(DEADLINE) {
            Ok(line) => Some(line),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => None,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("no output within {DEADLINE:?}")
            }
        })
    }

    /// SIGINT, as Ctrl-C sends.
    pub fn interrupt(&self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit (up to [`DEADLINE`]).
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        tokio::task::block_in_place(|| loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the CLI did not exit within {DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        })
    }
}

impl Drop for CliProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The CLI command as tests run it: the admin identity, no DHT, the cluster given.
pub fn cli_command(args: &[&str], cluster: Option<&str>) -> Command {
    let mut cmd = Command::new(aspen_bin());
    cmd.args(args)
        .env_remove("ASPEN_CLUSTER")
        .env_remove("ASPEN_DHT_BOOTSTRAP")
        .env_remove("ASPEN_TOKEN")
        .stdin(Stdio::null());
    // The admin identity unless the test names another (never the user's own).
    if !args.contains(&"--identity") {
        cmd.env("ASPEN_IDENTITY", admin_identity_file());
    }
    // Never the public DHT: tests that resolve keys pass --dht-bootstrap (a local testnet).
    if !args.contains(&"--dht-bootstrap") {
        cmd.env("ASPEN_NO_DHT", "true");
    }
    if let Some(c) = cluster {
        cmd.env("ASPEN_CLUSTER", c);
    }
    cmd
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

pub fn options() -> ClientOptions {
    ClientOptions {
        attempt_timeout: Duration::from_secs(5),
        deadline: Duration::from_secs(60),
        identity: Some(iroh::SecretKey::from_bytes(&ADMIN_SECRET)),
        ..Default::default()
    }
}

/// A client for the whole cluster.
pub async fn client_for(nodes: &[&NodeProc]) -> Client {
    let ticket = ClusterTicket {
        members: nodes.iter().map(|n| n.ticket.clone()).collect(),
    };
    Client::connect_with(ticket, options()).await.unwrap()
}

/// A client that only talks to `node`.
pub async fn client_of(node: &NodeProc) -> Client {
    Client::connect_node(node.ticket.clone(), options())
        .await
        .unwrap()
}

/// Starts `n` nodes and forms a cluster with the SDK.
pub async fn form(root: &Path, n: usize, args: &[&str]) -> Vec<NodeProc> {
    form_each(root, n, |_| args.iter().map(|a| a.to_string()).collect()).await
}

/// Like [`form`], with each node's own arguments (`args(i)` for node `i`).
pub async fn form_each(
    root: &Path,
    n: usize,
    args: impl Fn(usize) -> Vec<String>,
) -> Vec<NodeProc> {
    let nodes: Vec<NodeProc> = (0..n)
        .map(|i| {
            let args = args(i);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            NodeProc::start(&root.join(format!("n{i}")), &args)
        })
        .collect();
    let first = client_of(&nodes[0]).await;
    first
        .init_cluster(String::new(), bootstrap_secret(&nodes[0].dir))
        .await
        .unwrap();
    for node in &nodes[1..] {
        first
            .add_member(node.ticket.clone(), bootstrap_secret(&node.dir))
            .await
            .unwrap();
    }
    first.close().await;
    nodes
}

/// Every key under `prefix` as seen by `node` alone (serializable), sorted.
pub async fn local_keys(node: &NodeProc, prefix: &str) -> Option<Vec<Vec<u8>>> {
    Some(
        local_kvs(node, prefix)
            .await?
            .into_iter()
            .map(|kv| kv.key)
            .collect(),
    )
}

/// Every key-value under `prefix` as seen by `node` alone (serializable), sorted by key.
pub async fn local_kvs(node: &NodeProc, prefix: &str) -> Option<Vec<aspen_kv::api::KeyValue>> {
    let c = Client::connect_node(
        node.ticket.clone(),
        ClientOptions {
            attempt_timeout: Duration::from_secs(2),
            deadline: Duration::from_secs(3),
            ..options()
        },
    )
    .await
    .ok()?;
    // Closed whatever the outcome: a leaked connection counts against the node's
    // per-key limit until it times out.
    let keys = range_all(&c, prefix).await;
    c.close().await;
    keys
}

async fn range_all(c: &Client, prefix: &str) -> Option<Vec<aspen_kv::api::KeyValue>> {
    let mut keys = Vec::new();
    let mut req = aspen_kv::api::RangeRequest::prefix(prefix.as_bytes().to_vec());
    loop {
        let page = c.range(req.clone(), Consistency::Serializable).await.ok()?;
        let more = page.more;
        let next: Vec<u8> = page
            .kvs
            .last()
            .map(|kv| kv.key.iter().copied().chain([0]).collect())
            .unwrap_or_default();
        keys.extend(page.kvs);
        if !more {
            break;
        }
        req.start = next;
        req.revision = page.revision;
    }
    Some(keys)
}

/// Concurrent writers that record every acknowledged key.
pub struct Writers {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeSet<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    /// One writer task per client in `clients`, writing keys `PREFIX<writer>-<n>`.
    pub fn start(clients: Vec<Client>, prefix: &str) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let tasks = clients
            .into_iter()
            .enumerate()
            .map(|(w, client)| {
                let (stop, acked) = (stop.clone(), acked.clone());
                let prefix = prefix.to_string();
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("{prefix}{w:02}-{i:07}");
                        // A failed write may or may not have been applied: only acks count.
                        if client
                            .put(key.clone().into_bytes(), b"v".to_vec())
                            .await
                            .is_ok()
                        {
                            acked.lock().unwrap().insert(key);
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        Writers { stop, acked, tasks }
    }

    pub fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    pub async fn wait_for_more(&self, more: usize) {
        let target = self.count() + more;
        wait_until(&format!("{target} acknowledged writes"), || async {
            (self.count() >= target).then_some(())
        })
        .await;
    }

    pub async fn stop(self) -> BTreeSet<String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

/// Asserts every acknowledged key is present on `node` (waiting for it to catch up).
pub async fn assert_all_present(node: &NodeProc, prefix: &str, acked: &BTreeSet<String>) {
    let missing = wait_until("node to hold every acknowledged write", || async {
        let keys = local_keys(node, prefix).await?;
        let have: BTreeSet<String> = keys
            .into_iter()
            .map(|k| String::from_utf8(k).unwrap())
            .collect();
        let missing: Vec<_> = acked.difference(&have).cloned().collect();
        missing.is_empty().then_some(missing)
    })
    .await;
    assert!(missing.is_empty());
}

/// Sends raw bytes on one stream of `alpn` as the admin (a client that skips the SDK's
/// checks) and returns what comes back: empty if the node refused the connection or closed
/// the stream. [`raw_exchange_as`] picks the key (`None`: a fresh one).
pub async fn raw_exchange(node: &NodeProc, alpn: &[u8], bytes: &[u8]) -> Vec<u8> {
    raw_exchange_as(node, alpn, bytes, Some(ADMIN_SECRET)).await
}

pub async fn raw_exchange_as(
    node: &NodeProc,
    alpn: &[u8],
    bytes: &[u8],
    secret: Option<[u8; 32]>,
) -> Vec<u8> {
    let ep = aspen_client::endpoint::offline_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        secret.map(|s| iroh::SecretKey::from_bytes(&s)),
        vec![],
    )
    .await
    .unwrap();
    let addr = node.addr();
    let out = async {
        let conn = ep.connect(addr, alpn).await.ok()?;
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        send.write_all(bytes).await.ok()?;
        send.finish().ok()?;
        let out = recv.read_to_end(1 << 20).await.ok();
        conn.close(0u32.into(), b"done");
        out
    }
    .await
    .unwrap_or_default();
    ep.close().await;
    out
}

/// Syncs `namespace` from `node` over iroh-docs as `secret`, into a fresh in-memory replica.
pub async fn docs_sync_as(
    node: &NodeProc,
    secret: [u8; 32],
    namespace: [u8; 32],
) -> Result<iroh_docs::net::SyncFinished, iroh_docs::net::ConnectError> {
    let ep = aspen_client::endpoint::offline_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        Some(iroh::SecretKey::from_bytes(&secret)),
        vec![],
    )
    .await
    .unwrap();
    let sync = iroh_docs::actor::SyncHandle::spawn(
        iroh_docs::store::Store::memory(),
        None,
        "reader".into(),
    );
    let id = iroh_docs::NamespaceId::from(&namespace);
    sync.import_namespace(iroh_docs::Capability::Read(id))
        .await
        .unwrap();
    let opts = iroh_docs::actor::OpenOpts {
        sync: true,
        subscribe: None,
    };
    sync.open(id, opts).await.unwrap();
    let addr = node.addr();
    let result = iroh_docs::net::connect_and_sync(&ep, &sync, id, addr, None).await;
    let _ = sync.shutdown().await;
    ep.close().await;
    result
}

/// Resident memory of process `pid`, in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// CPU time (user + system) of process `pid` so far, in milliseconds (reported, not
/// asserted).
pub fn process_cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap().split(' ').collect();
    // utime and stime: fields 14 and 15 of stat, 12 and 13 after the command name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    ticks * 1000 / hz
}

/// A bearer token from the admin, carrying each of `allow`.
pub fn bearer(ticket: &str, allow: &[&str]) -> String {
    let mut args = vec!["auth", "token", "issue", "--bearer", "--ttl", "1h"];
    for a in allow {
        args.extend(["--allow", a]);
    }
    let out = cli(&args, Some(ticket));
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_string()
}

/// A port the OS had free a moment ago (etcd cannot report a port it picked itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
