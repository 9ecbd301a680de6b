//! What a node tells Prometheus: `aspen node run --metrics ADDR` serves `GET /metrics`.
//!
//! Every series is a `prometheus-client` metric owned by the part of the node that does the
//! work (the store's log flushes and applies, the proposer's batches, the client service's
//! requests, the blob service's bytes, the document service's commits); this module gathers
//! them into one registry and serves it. Raft's own state (term, leader, indexes) is read
//! from openraft when a scrape arrives, so an idle node costs nothing between scrapes.
//!
//! The listener is plain HTTP. It binds loopback unless told otherwise, and a non-loopback
//! address needs a bearer token (`--metrics-token-file`): the figures name no keys or values,
//! but they show what the cluster is doing. It serves at most [`MAX_METRICS_CONNECTIONS`]
//! connections at once (more are closed at once), each for at most
//! [`METRICS_CONNECTION_LIMIT`], and answers nothing but `GET /metrics`.

use openraft::async_runtime::WatchReceiver;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aspen_client::protocol::{ClientResponse, NodeFigures};
use aspen_kv::StorageMetrics;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::Semaphore;

use super::NodeState;

/// Most scrape connections served at once; more are closed as they arrive.
pub const MAX_METRICS_CONNECTIONS: usize = 16;
/// Longest a scrape connection stays open (a scrape takes milliseconds).
pub const METRICS_CONNECTION_LIMIT: Duration = Duration::from_secs(10);
/// Longest a bearer token file may be.
const MAX_TOKEN_BYTES: u64 = 4096;

/// The `op` label: which client request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

/// The labels of an error: which request, which kind of error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub op: &'static str,
    pub kind: &'static str,
}

/// A node by id (hex), for the leader series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
}

/// A follow: the origin cluster's key (hex) and the resource.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FollowLabels {
    pub origin: String,
    pub kind: String,
    pub name: String,
}

fn request_seconds() -> Histogram {
    // 50 µs to ~26 s, doubling.
    Histogram::new(exponential_buckets(50e-6, 2.0, 20))
}

/// The node's metrics. Shared (`Arc`) by every service; updating one is a few atomic
/// operations (histograms take a short lock).
pub struct NodeMetrics {
    registry: Mutex<Registry>,
    started: Instant,
    /// The store's log flush and apply figures.
    pub storage: Arc<StorageMetrics>,
    /// Client requests served, by operation.
    pub requests: Family<OpLabels, Counter>,
    /// Time to serve a client request (from its arrival to its answer), by operation.
    pub request_seconds: Family<OpLabels, Histogram, fn() -> Histogram>,
    /// Client requests answered with an error, by operation and kind.
    pub errors: Family<ErrorLabels, Counter>,
    /// Commands per Raft entry this node proposed (the proposer's batches).
    pub proposal_commands: Histogram,
    /// Automerge changes clients committed through this node.
    pub doc_changes: Counter,
    /// Watches open on this node.
    pub watches: Gauge,
    /// Bytes of blobs received (client uploads and fetches from other nodes).
    pub blob_bytes_in: Counter,
    /// Requests that found no leader and waited for an election.
    pub election_waits: Counter,
    /// Requests waiting for an election now.
    pub election_waiting: Gauge,
    /// Bytes sent on iroh-blobs connections this node served.
    pub blob_bytes_out: Counter,
    // Read from openraft and the store at each scrape.
    term: Gauge,
    is_leader: Gauge,
    leader: Family<NodeLabel, Gauge>,
    commit_index: Gauge,
    applied_index: Gauge,
    last_log_index: Gauge,
    snapshot_index: Gauge,
    voters: Gauge,
    learners: Gauge,
    revision: Gauge,
    compacted_revision: Gauge,
    millis_since_quorum_ack: Gauge,
    follow_since_success: Family<FollowLabels, Gauge<f64, AtomicU64>>,
    follow_failures: Family<FollowLabels, Gauge>,
    /// Totals of `requests` and `errors`, for `cluster status`.
    request_total: AtomicU64,
    error_total: AtomicU64,
    /// Where `--metrics` serves, once it does.
    pub serving: std::sync::OnceLock<SocketAddr>,
    /// automerge-repo WebSocket connections open on this node.
    pub repo_connections: Gauge,
    /// automerge-repo upgrades refused (no or bad token, too many connections).
    pub repo_refused: Counter,
    /// automerge-repo messages received from apps.
    pub repo_messages: Counter,
    /// Where `--automerge-repo` serves, once it does.
    pub repo_serving: std::sync::OnceLock<SocketAddr>,
    /// etcd API connections open on this node.
    pub etcd_connections: Gauge,
    /// etcd API connections and requests refused (no or bad token, too many connections).
    pub etcd_refused: Counter,
    /// Where `--etcd-api` serves, once it does.
    pub etcd_serving: std::sync::OnceLock<SocketAddr>,
}

impl NodeMetrics {
    pub fn new(node_id: u64, storage: Arc<StorageMetrics>) -> Self {
        let m = NodeMetrics {
            registry: Mutex::new(Registry::with_prefix("aspen")),
            started: Instant::now(),
            storage,
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(request_seconds),
            errors: Family::default(),
            proposal_commands: aspen_kv::metrics::batch_sizes(),
            doc_changes: Counter::default(),
            watches: Gauge::default(),
            blob_bytes_in: Counter::default(),
            election_waits: Counter::default(),
            election_waiting: Gauge::default(),
            blob_bytes_out: Counter::default(),
            term: Gauge::default(),
            is_leader: Gauge::default(),
            leader: Family::default(),
            commit_index: Gauge::default(),
            applied_index: Gauge::default(),
            last_log_index: Gauge::default(),
            snapshot_index: Gauge::default(),
            voters: Gauge::default(),
            learners: Gauge::default(),
            revision: Gauge::default(),
            compacted_revision: Gauge::default(),
            millis_since_quorum_ack: Gauge::default(),
            follow_since_success: Family::default(),
            follow_failures: Family::default(),
            request_total: AtomicU64::new(0),
            error_total: AtomicU64::new(0),
            serving: Default::default(),
            repo_connections: Gauge::default(),
            repo_refused: Counter::default(),
            repo_messages: Counter::default(),
            repo_serving: Default::default(),
            etcd_connections: Gauge::default(),
            etcd_refused: Counter::default(),
            etcd_serving: Default::default(),
        };
        m.register_all(node_id);
        m
    }

    fn register_all(&self, node_id: u64) {
        let mut r = self.registry.lock().expect("registry lock");
        let info: Family<NodeLabel, Gauge> = Family::default();
        info.get_or_create(&NodeLabel {
            node: format!("{node_id:016x}"),
        })
        .set(1);
        r.register("node", "This node's id (the label); always 1", info);
        r.register("raft_term", "Current Raft term", self.term.clone());
        r.register(
            "raft_is_leader",
            "1 if this node is the Raft leader, else 0",
            self.is_leader.clone(),
        );
        r.register(
            "raft_leader",
            "The leader this node knows of (the label); 1, or no series when none is known",
            self.leader.clone(),
        );
        r.register(
            "raft_commit_index",
            "Highest log index this node knows is committed",
            self.commit_index.clone(),
        );
        r.register(
            "raft_applied_index",
            "Highest log index applied to this node's state machine",
            self.applied_index.clone(),
        );
        r.register(
            "raft_last_log_index",
            "Highest log index in this node's log",
            self.last_log_index.clone(),
        );
        r.register(
            "raft_snapshot_index",
            "Log index of this node's latest snapshot",
            self.snapshot_index.clone(),
        );
        r.register(
            "raft_voters",
            "Voting members in the membership this node knows",
            self.voters.clone(),
        );
        r.register(
            "raft_learners",
            "Non-voting members in the membership this node knows",
            self.learners.clone(),
        );
        r.register(
            "raft_millis_since_quorum_ack",
            "On the leader: milliseconds since a quorum last acknowledged it (-1 elsewhere)",
            self.millis_since_quorum_ack.clone(),
        );
        r.register(
            "raft_proposal_commands",
            "Client commands per Raft entry this node proposed (batch size)",
            self.proposal_commands.clone(),
        );
        r.register(
            "kv_revision",
            "The key-value store's current revision on this node",
            self.revision.clone(),
        );
        r.register(
            "kv_compacted_revision",
            "The key-value store's compaction point on this node",
            self.compacted_revision.clone(),
        );
        self.storage.register(&mut r);
        r.register(
            "requests",
            "Client requests served, by operation",
            self.requests.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "Time from a client request's arrival to its answer, by operation",
            Unit::Seconds,
            self.request_seconds.clone(),
        );
        r.register(
            "request_errors",
            "Client requests answered with an error, by operation and kind",
            self.errors.clone(),
        );
        r.register("watches", "Watches open on this node", self.watches.clone());
        r.register(
            "election_waits",
            "Requests that found no leader and waited for an election (at most 3 s each)",
            self.election_waits.clone(),
        );
        r.register(
            "election_waiting",
            "Requests waiting for an election now",
            self.election_waiting.clone(),
        );
        r.register(
            "automerge_repo_connections",
            "automerge-repo WebSocket connections open on this node",
            self.repo_connections.clone(),
        );
        r.register(
            "automerge_repo_refused",
            "automerge-repo WebSocket upgrades refused (no or bad token, too many connections)",
            self.repo_refused.clone(),
        );
        r.register(
            "automerge_repo_messages",
            "automerge-repo messages received from apps",
            self.repo_messages.clone(),
        );
        r.register(
            "etcd_connections",
            "etcd API (gRPC) connections open on this node",
            self.etcd_connections.clone(),
        );
        r.register(
            "etcd_refused",
            "etcd API connections and requests refused (no or bad token, too many connections)",
            self.etcd_refused.clone(),
        );
        r.register(
            "busy_poll_windows",
            "Times the async worker started spinning after a request (--busy-poll-us; 0 without)",
            crate::busy_poll::WINDOWS.clone(),
        );
        r.register_with_unit(
            "busy_poll_spin",
            "Time the async worker spent spinning instead of sleeping (counted as each window closes)",
            Unit::Seconds,
            crate::busy_poll::SPIN_SECONDS.clone(),
        );
        r.register(
            "busy_poll_backoffs",
            "Times the spinner found the cores busy with other threads and stopped spinning for a second",
            crate::busy_poll::BACKOFFS.clone(),
        );
        r.register(
            "doc_changes_committed",
            "Automerge changes clients committed through this node (doc change requests)",
            self.doc_changes.clone(),
        );
        r.register_with_unit(
            "blob_received",
            "Blob bytes received: client uploads and fetches from other nodes and clusters",
            Unit::Bytes,
            self.blob_bytes_in.clone(),
        );
        r.register_with_unit(
            "blob_sent",
            "Bytes sent on iroh-blobs connections this node served (QUIC, counted each second)",
            Unit::Bytes,
            self.blob_bytes_out.clone(),
        );
        r.register_with_unit(
            "fed_follow_since_success",
            "On the leader: seconds since a follow's last successful pull (-1: none yet)",
            Unit::Seconds,
            self.follow_since_success.clone(),
        );
        r.register(
            "fed_follow_failures",
            "On the leader: a follow's pull failures since its last success",
            self.follow_failures.clone(),
        );
    }

    /// Records one answered client request.
    pub fn served(&self, op: &'static str, took: Duration, response: &ClientResponse) {
        let error = match response {
            ClientResponse::Error(e) => Some(e.kind()),
            _ => None,
        };
        self.answered(op, took, error);
    }

    /// Records one answered request of any protocol: `error` is the kind of error it was
    /// answered with, if any.
    pub fn answered(&self, op: &'static str, took: Duration, error: Option<&'static str>) {
        let labels = OpLabels { op };
        self.requests.get_or_create(&labels).inc();
        self.request_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        self.request_total.fetch_add(1, Ordering::Relaxed);
        if let Some(kind) = error {
            self.errors.get_or_create(&ErrorLabels { op, kind }).inc();
            self.error_total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reads Raft's and the store's state into the gauges (before each scrape).
    async fn refresh(&self, node: &NodeState) {
        let cluster = &node.cluster;
        let m = cluster.raft.metrics().borrow_watched().clone();
        let committed = cluster
            .raft
            .with_raft_state(|st| st.local_committed().map(|l| l.index))
            .await
            .unwrap_or(None);
        let index = |i: Option<u64>| i.map_or(-1, |i| i as i64);
        self.term.set(m.current_term as i64);
        let leader =
            super::cluster::known_leader(m.current_leader, m.state.is_leader(), cluster.id);
        self.is_leader.set(i64::from(leader == Some(cluster.id)));
        self.leader.clear();
        if let Some(l) = leader {
            self.leader
                .get_or_create(&NodeLabel {
                    node: format!("{l:016x}"),
                })
                .set(1);
        }
        self.commit_index.set(index(committed));
        self.applied_index
            .set(index(m.last_applied.map(|l| l.index)));
        self.last_log_index.set(index(m.last_log_index));
        self.snapshot_index.set(index(m.snapshot.map(|l| l.index)));
        let membership = m.membership_config.membership();
        let voters = membership.voter_ids().count();
        let members = membership.nodes().count();
        self.voters.set(voters as i64);
        self.learners.set(members.saturating_sub(voters) as i64);
        self.millis_since_quorum_ack
            .set(m.last_quorum_acked.as_ref().map_or(-1, |at| {
                openraft::Instant::elapsed(&**at).as_millis() as i64
            }));
        if let Ok(store) = cluster.sm.status().await {
            self.revision.set(store.revision as i64);
            self.compacted_revision.set(store.compacted as i64);
        }
        self.follow_since_success.clear();
        self.follow_failures.clear();
        let now_ms = super::identity::unix_now() * 1000;
        for ((origin, resource), status) in node.fed.pulls.all() {
            let labels = FollowLabels {
                origin: hex::encode(origin),
                kind: resource.kind.to_string(),
                name: label_value(&resource.name),
            };
            let since = if status.last_success_ms == 0 {
                -1.0
            } else {
                now_ms.saturating_sub(status.last_success_ms) as f64 / 1000.0
            };
            self.follow_since_success.get_or_create(&labels).set(since);
            self.follow_failures
                .get_or_create(&labels)
                .set(i64::from(status.failures));
        }
    }

    /// The whole registry in Prometheus' text format, refreshed first.
    pub async fn render(&self, node: &NodeState) -> String {
        self.refresh(node).await;
        let mut text = String::new();
        let registry = self.registry.lock().expect("registry lock");
        prometheus_client::encoding::text::encode(&mut text, &registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// The key figures `aspen cluster status` shows.
    pub fn figures(&self) -> NodeFigures {
        let (log_flushes, mean_ms) = self.storage.log_flush_mean_ms();
        NodeFigures {
            uptime_secs: self.started.elapsed().as_secs(),
            requests: self.request_total.load(Ordering::Relaxed),
            request_errors: self.error_total.load(Ordering::Relaxed),
            applied_entries: self.storage.applied_entries.get(),
            applied_commands: self.storage.applied_commands.get(),
            log_flushes,
            log_flush_mean_us: (mean_ms * 1000.0) as u64,
            doc_changes: self.doc_changes.get(),
            blob_bytes_in: self.blob_bytes_in.get(),
            blob_bytes_out: self.blob_bytes_out.get(),
            watches: self.watches.get().max(0) as u64,
            metrics_addr: self.serving.get().map(|a| a.to_string()),
            automerge_repo_addr: self.repo_serving.get().map(|a| a.to_string()),
            automerge_repo_connections: self.repo_connections.get().max(0) as u64,
            etcd_api_addr: self.etcd_serving.get().map(|a| a.to_string()),
            etcd_api_connections: self.etcd_connections.get().max(0) as u64,
        }
    }
}

/// A label value Prometheus' text format can carry (the encoder does not escape).
fn label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Why the metrics listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error(
        "refusing to serve metrics on the non-loopback address {0} without a bearer token \
         (give --metrics-token-file, or bind 127.0.0.1)"
    )]
    NeedsToken(SocketAddr),
    #[error("cannot read the metrics token file {0}: {1}")]
    Token(std::path::PathBuf, String),
}

/// Reads a bearer token file (trimmed; must not be empty), off the executor.
pub async fn read_token(path: &std::path::Path) -> Result<String, MetricsError> {
    let path = path.to_path_buf();
    let p = path.clone();
    let read = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(&p)
            .and_then(|f| f.take(MAX_TOKEN_BYTES + 1).read_to_string(&mut text))
            .map_err(|e| e.to_string())?;
        if text.len() as u64 > MAX_TOKEN_BYTES {
            return Err(format!("longer than {MAX_TOKEN_BYTES} bytes"));
        }
        let token = text.trim().to_string();
        if token.is_empty() || token.chars().any(|c| c.is_control() || c == ' ') {
            return Err("expected one token: not empty, no spaces or control characters".into());
        }
        Ok(token)
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    read.map_err(|e| MetricsError::Token(path, e))
}

/// Binds the metrics listener; [`serve`] then answers on it.
pub async fn bind(
    addr: SocketAddr,
    token: Option<&str>,
) -> Result<tokio::net::TcpListener, MetricsError> {
    if !addr.ip().is_loopback() && token.is_none() {
        return Err(MetricsError::NeedsToken(addr));
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| MetricsError::Bind(addr, e))
}

/// Serves `GET /metrics` on `listener` until the task is aborted.
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: std::sync::Weak<NodeState>,
    token: Option<String>,
) {
    let slots = Arc::new(Semaphore::new(MAX_METRICS_CONNECTIONS));
    let token: Option<Arc<str>> = token.map(Into::into);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::debug!("metrics accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream); // Over the limit: closed at once.
            continue;
        };
        let node = node.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let node = node.clone();
                let token = token.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(req, node, token).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .keep_alive(true)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(METRICS_CONNECTION_LIMIT, conn).await;
            drop(slot);
        });
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    node: std::sync::Weak<NodeState>,
    token: Option<Arc<str>>,
) -> Response<Full<Bytes>> {
    if let Some(token) = &token {
        let presented = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
            let mut r = plain(StatusCode::UNAUTHORIZED, "a bearer token is required\n");
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
    }
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "only /metrics is served here\n");
    }
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    let Some(node) = node.upgrade() else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "the node is stopping\n");
    };
    let text = node.cluster.metrics.render(&node).await;
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    r
}

/// Compares secrets without leaking where they differ through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label_value("x\ny"), "x\\ny");
        assert_eq!(label_value("plain/name"), "plain/name");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
