//! `aspen node run --metrics ADDR`: a real node's `/metrics`, scraped over HTTP, names the
//! series the docs promise and they move when requests are made; the listener refuses what
//! it should (other paths and methods, missing or wrong bearer tokens, non-loopback binds
//! without a token) and a flood of idle connections costs a bounded amount.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use aspen_client::Client;

use crate::common::*;

/// A scrape's samples: series (name with labels, as printed) -> value.
pub(crate) type Samples = BTreeMap<String, f64>;

/// One HTTP/1.1 request on a fresh connection; returns (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, body.to_string())
}

pub(crate) fn scrape(addr: SocketAddr, token: Option<&str>) -> Samples {
    let (status, body) = http(addr, "GET", "/metrics", token);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.trim_end().ends_with("# EOF"),
        "not OpenMetrics: {body}"
    );
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("series value");
            (series.to_string(), value.parse().expect("a number"))
        })
        .collect()
}

pub(crate) fn get(samples: &Samples, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no series {series} in {samples:#?}"))
}

/// Where the node serves metrics, as its status says.
pub(crate) async fn metrics_addr(client: &Client) -> SocketAddr {
    let status = client.status().await.unwrap();
    status
        .figures
        .metrics_addr
        .expect("the node serves metrics")
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_name_the_series_and_move_with_requests() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, &["--metrics", "127.0.0.1:0"]).await;
    let client = client_for(&nodes.iter().collect::<Vec<_>>()).await;
    let addr = metrics_addr(&client).await;

    let before = scrape(addr, None);
    let node = format!("{:016x}", nodes[0].node_id());
    assert_eq!(get(&before, &format!("aspen_node{{node=\"{node}\"}}")), 1.0);
    assert_eq!(get(&before, "aspen_raft_is_leader"), 1.0);
    assert_eq!(
        get(&before, &format!("aspen_raft_leader{{node=\"{node}\"}}")),
        1.0
    );
    assert!(get(&before, "aspen_raft_term") >= 1.0);
    for series in [
        "aspen_raft_commit_index",
        "aspen_raft_applied_index",
        "aspen_raft_last_log_index",
        "aspen_raft_voters",
        "aspen_raft_proposal_commands_count",
        "aspen_raft_log_flush_seconds_count",
        "aspen_raft_log_flush_seconds_bucket{le=\"+Inf\"}",
        "aspen_raft_log_flush_appends_count",
        "aspen_raft_log_queue_seconds_count",
        "aspen_state_machine_apply_seconds_count",
        "aspen_state_machine_apply_queue_seconds_count",
        "aspen_state_machine_applied_commands_total",
        "aspen_kv_revision",
        "aspen_watches",
        "aspen_election_waits_total",
        "aspen_election_waiting",
        "aspen_doc_changes_committed_total",
        "aspen_blob_received_bytes_total",
        "aspen_blob_sent_bytes_total",
    ] {
        get(&before, series);
    }

    // Writes, a read, a refused write, a document change, a blob in and out.
    for i in 0..20 {
        client
            .put(format!("m/{i}").into_bytes(), b"v".to_vec())
            .await
            .unwrap();
    }
    client.get(b"m/1".to_vec()).await.unwrap();
    let stranger = Client::connect_with(nodes[0].cluster_ticket().unwrap(), stranger_options())
        .await
        .unwrap();
    assert!(stranger.put(b"m/x".to_vec(), b"v".to_vec()).await.is_err());
    stranger.close().await;
    client.doc_create("metrics-doc").await.unwrap();
    client
        .doc_change("metrics-doc", None, |tx| {
            use automerge::transaction::Transactable;
            tx.put(automerge::ROOT, "k", 1i64)
        })
        .await
        .unwrap()
        .expect("a change");
    let blob = root.path().join("blob.bin");
    std::fs::write(&blob, vec![7u8; 300_000]).unwrap();
    let added = client
        .blob_add_file(&blob, Some("metrics/blob"), |_| {})
        .await
        .unwrap();
    let out = root.path().join("blob.out");
    client
        .blob_get_to_file(added.hash, &out, |_, _| {})
        .await
        .unwrap();

    // Blob bytes out are counted each second on an open connection and at its end: wait.
    let after = wait_until("blob bytes sent to show", || async {
        let s = scrape(addr, None);
        (get(&s, "aspen_blob_sent_bytes_total") >= 300_000.0).then_some(s)
    })
    .await;
    let moved = |series: &str| get(&after, series) - get(&before, series);
    assert!(moved("aspen_raft_commit_index") >= 20.0);
    assert!(moved("aspen_raft_applied_index") >= 20.0);
    assert!(moved("aspen_kv_revision") >= 20.0);
    assert!(moved("aspen_raft_log_flush_seconds_count") >= 20.0);
    // Each write's append waited for the log writer, and its apply for a pool thread.
    assert!(moved("aspen_raft_log_queue_seconds_count") >= 20.0);
    assert!(moved("aspen_state_machine_apply_queue_seconds_count") >= 20.0);
    assert!(moved("aspen_raft_proposal_commands_count") >= 20.0);
    assert!(moved("aspen_state_machine_applied_commands_total") >= 20.0);
    // 20 writes and the stranger's refused one.
    assert_eq!(get(&after, "aspen_requests_total{op=\"kv_put\"}"), 21.0);
    assert_eq!(
        get(
            &after,
            "aspen_request_duration_seconds_count{op=\"kv_put\"}"
        ),
        21.0
    );
    assert!(get(&after, "aspen_request_duration_seconds_sum{op=\"kv_put\"}") > 0.0);
    assert!(get(&after, "aspen_requests_total{op=\"kv_range\"}") >= 1.0);
    assert_eq!(
        get(
            &after,
            "aspen_request_errors_total{op=\"kv_put\",kind=\"permission_denied\"}"
        ),
        1.0
    );
    assert_eq!(get(&after, "aspen_doc_changes_committed_total"), 1.0);
    assert!(get(&after, "aspen_blob_received_bytes_total") >= 300_000.0);

    // `cluster status` shows the key figures.
    let status = client.status().await.unwrap();
    assert!(status.figures.requests >= 23, "{:?}", status.figures);
    assert!(status.figures.request_errors >= 1);
    assert!(status.figures.log_flushes >= 20);
    assert_eq!(status.figures.doc_changes, 1);
    let cli_status = cli(&["cluster", "status"], Some(&ticket_text(&nodes)));
    assert!(cli_status.status.success(), "{}", stderr(&cli_status));
    let text = stdout(&cli_status);
    assert!(
        text.contains("log ") && text.contains("flushes, mean"),
        "{text}"
    );
    assert!(text.contains(&format!("http://{addr}/metrics")), "{text}");

    // Only GET /metrics.
    assert_eq!(http(addr, "GET", "/", None).0, 404);
    assert_eq!(http(addr, "POST", "/metrics", None).0, 405);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_the_token_and_bound_what_a_flood_costs() {
    let root = tempfile::tempdir().unwrap();
    let token_file = root.path().join("metrics.token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();

    // A non-loopback address without a token: the node refuses to start, and says why.
    let refused = cli_command(
        &[
            "node",
            "run",
            "--no-dht",
            "--data-dir",
            root.path().join("open").to_str().unwrap(),
            "--metrics",
            "0.0.0.0:0",
        ],
        None,
    )
    .output()
    .unwrap();
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("without a bearer token"),
        "{}",
        stderr(&refused)
    );

    let nodes = form(
        root.path(),
        1,
        &[
            "--metrics",
            "127.0.0.1:0",
            "--metrics-token-file",
            token_file.to_str().unwrap(),
        ],
    )
    .await;
    let client = client_for(&nodes.iter().collect::<Vec<_>>()).await;
    let addr = metrics_addr(&client).await;
    assert_eq!(http(addr, "GET", "/metrics", None).0, 401);
    assert_eq!(http(addr, "GET", "/metrics", Some("wrong")).0, 401);
    assert_eq!(http(addr, "GET", "/metrics", Some("s3cret-token1")).0, 401);
    assert_eq!(http(addr, "GET", "/", None).0, 401);
    assert!(scrape(addr, Some("s3cret-token")).contains_key("aspen_raft_term"));

    // 200 connections that never send a request: the node serves at most
    // MAX_METRICS_CONNECTIONS of them at once (the rest are closed as they arrive) and
    // closes every one within its timeouts; clients are served meanwhile.
    let flood: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    for i in 0..10 {
        client
            .put(format!("f/{i}").into_bytes(), b"v".to_vec())
            .await
            .unwrap();
    }
    for s in &flood {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut buf = [0u8; 1];
        let read = (&*s).read(&mut buf);
        assert!(
            matches!(read, Ok(0) | Err(_))
                && !matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
            "an idle metrics connection was kept open: {read:?}"
        );
    }
    drop(flood);
    let s = wait_until("a scrape after the flood", || async {
        let mut stream = TcpStream::connect(addr).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret-token\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw).ok()?;
        raw.starts_with("HTTP/1.1 200").then_some(raw)
    })
    .await;
    assert!(s.contains("aspen_requests_total{op=\"kv_put\"} 10"), "{s}");
    client.close().await;
}

/// Busy polling (`--busy-poll-us`, on by default): a real node opens the spinning window for
/// an authorized caller's requests only, never while idle or for a stranger's refused
/// requests (a cheap packet must not buy a core's time); `--busy-poll-us 0` never spins, and
/// a window over the limit is refused with a clear message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_polling_follows_authorized_requests_only() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(
        &root.path().join("on"),
        1,
        &["--metrics", "127.0.0.1:0", "--etcd-api", "127.0.0.1:0"],
    )
    .await;
    let client = client_for(&nodes.iter().collect::<Vec<_>>()).await;
    let addr = metrics_addr(&client).await;
    let etcd = client
        .status()
        .await
        .unwrap()
        .figures
        .etcd_api_addr
        .unwrap();
    let windows = |s: &Samples| get(s, "aspen_busy_poll_windows_total");
    let spun = |s: &Samples| get(s, "aspen_busy_poll_spin_seconds_total");

    // Idle: nothing opens the window.
    let idle = scrape(addr, None);
    get(&idle, "aspen_busy_poll_backoffs_total"); // served
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(windows(&scrape(addr, None)), windows(&idle), "an idle node");

    // A stranger's requests are all refused, and open nothing.
    let stranger = Client::connect_with(nodes[0].cluster_ticket().unwrap(), stranger_options())
        .await
        .unwrap();
    for i in 0..20 {
        let put = stranger.put(format!("bp/{i}").into_bytes(), b"v".to_vec());
        assert!(put.await.is_err(), "a stranger's put was accepted");
    }
    stranger.close().await;
    // Nor do etcd API calls without a token or with a bad one.
    {
        use aspen_etcd_api::pb::etcdserverpb::{kv_client::KvClient, RangeRequest};
        let mut kv = KvClient::connect(format!("http://{etcd}")).await.unwrap();
        for (token, code) in [
            (None, tonic::Code::InvalidArgument),
            (Some("aspen-token-v1:garbage"), tonic::Code::Unauthenticated),
        ] {
            let mut request = tonic::Request::new(RangeRequest {
                key: b"bp/0".to_vec(),
                ..Default::default()
            });
            if let Some(t) = token {
                request.metadata_mut().insert("token", t.parse().unwrap());
            }
            let refused = kv.range(request).await.unwrap_err();
            assert_eq!(refused.code(), code, "{refused:?}");
        }
    }
    let before = scrape(addr, None);
    assert_eq!(
        windows(&before),
        windows(&idle),
        "a stranger's refused requests"
    );

    // The admin's puts do, and the time spent spinning is counted as each window closes.
    // (Puts again until then: on a loaded machine the spinner may be backing off for a
    // second, `aspen_busy_poll_backoffs_total`, and then no request opens the window.)
    let after = wait_until("the spinning to be counted", || async {
        five_puts(&client).await;
        let s = scrape(addr, None);
        (spun(&s) > spun(&before)).then_some(s)
    })
    .await;
    assert!(windows(&after) > windows(&before), "{after:?}");
    client.close().await;

    // Off: puts, and no window.
    let off = form(
        &root.path().join("off"),
        1,
        &["--metrics", "127.0.0.1:0", "--busy-poll-us", "0"],
    )
    .await;
    let client = client_for(&off.iter().collect::<Vec<_>>()).await;
    let addr = metrics_addr(&client).await;
    five_puts(&client).await;
    let s = scrape(addr, None);
    assert_eq!((windows(&s), spun(&s)), (0.0, 0.0));
    client.close().await;

    // Too long a window: refused before the node starts.
    let dir = root.path().join("bad");
    let out = cli(
        &[
            "node",
            "run",
            "--data-dir",
            dir.to_str().unwrap(),
            "--busy-poll-us",
            "10001",
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("at most 10000"), "{}", stderr(&out));
}

/// Five puts by `client` (an admin), each answered.
async fn five_puts(client: &Client) {
    for i in 0..5 {
        let key = format!("bp/{i}").into_bytes();
        client.put(key, b"v".to_vec()).await.unwrap();
    }
}
