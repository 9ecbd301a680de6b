//! `--automerge-repo`: the real JavaScript automerge-repo (2.5.6, with its WebSocket adapter,
//! from npm; `node/tests/automerge-repo/`, installed here with `npm install`) against a 3-node
//! cluster, and raw WebSocket clients for what a well-behaved app never sends.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use aspen_repo_protocol::{DocumentId, Message, PeerMetadata};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::common::*;

/// The JavaScript package's directory, with its dependencies installed as package-lock.json
/// pins them (once per test process; again only when the lock file changed). `npm install`,
/// not `npm ci`: npm 11 leaves the platform packages of an optional native dependency
/// (cbor-extract, which cbor-x can do without) out of the lock file, and `npm ci` then
/// refuses it as out of sync. `--no-save`: otherwise `npm install` writes those packages
/// back into the lock file, and running the tests would change a tracked file.
fn js_dir() -> PathBuf {
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/automerge-repo");
    let mut done = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if !*done {
        let stamp = dir.join("node_modules/.package-lock.json");
        let lock = dir.join("package-lock.json");
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        if modified(&stamp).is_none() || modified(&stamp) < modified(&lock) {
            let out = Command::new("npm")
                .args([
                    "install",
                    "--no-save",
                    "--no-audit",
                    "--no-fund",
                    "--loglevel=error",
                ])
                .current_dir(&dir)
                .output()
                .expect("npm (Node.js) must be installed to run the automerge-repo tests");
            assert!(
                out.status.success(),
                "npm install failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        *done = true;
    }
    dir
}

/// A `node repo-client.mjs ...` process, killed when dropped; its output read line by line.
struct JsClient {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl JsClient {
    fn spawn(args: &[&str]) -> JsClient {
        let mut child = Command::new("node")
            .arg("repo-client.mjs")
            .args(args)
            .current_dir(js_dir())
            .env("WAIT_MS", "60000")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node (Node.js) must be installed to run the automerge-repo tests");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        JsClient { child, lines }
    }

    /// The next JSON line (the script prints nothing else on stdout).
    fn next(&self) -> Value {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(120))
            .expect("the JavaScript client said nothing within 120 s (or exited)");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// The final line, which must say `"ok": true`.
    fn ok(&self) -> Value {
        let v = self.next();
        assert_eq!(
            v["ok"],
            Value::Bool(true),
            "the JavaScript client failed: {v}"
        );
        v
    }

    fn say(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for JsClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where each node serves automerge-repo.
async fn repo_addrs(nodes: &[NodeProc]) -> Vec<SocketAddr> {
    let mut addrs = Vec::new();
    for n in nodes {
        let c = client_of(n).await;
        let status = c.status().await.unwrap();
        c.close().await;
        addrs.push(
            status
                .figures
                .automerge_repo_addr
                .expect("the node serves automerge-repo")
                .parse()
                .unwrap(),
        );
    }
    addrs
}

fn ws_url(addr: SocketAddr, token: &str) -> String {
    format!("ws://{addr}/?token={token}")
}

/// `aspen doc get NAME` as JSON, once the document exists.
fn doc_json(ticket: &str, name: &str) -> Option<Value> {
    let out = cli(&["doc", "get", name], Some(ticket));
    out.status
        .success()
        .then(|| serde_json::from_str(&stdout(&out)).unwrap())
}

const REPO_ARGS: &[&str] = &["--automerge-repo", "127.0.0.1:0"];

/// The Automerge sync message automerge-repo 2.5.6 sends in a `request` for a document it has
/// not got (as captured from it).
const EMPTY_REQUEST: [u8; 10] = [0x42, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x02, 0x02, 0x84];

#[tokio::test(flavor = "multi_thread")]
async fn javascript_apps_on_two_members_converge_and_see_changes_made_with_aspen_doc() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 3, REPO_ARGS).await;
    let ticket = ticket_text(&nodes);
    let addrs = repo_addrs(&nodes).await;
    let token = bearer(&ticket, &["doc:write:automerge/"]);

    // Two repos, on members 1 and 2, edit one list concurrently (20 items each).
    let js = JsClient::spawn(&[
        "converge",
        &ws_url(addrs[0], &token),
        &ws_url(addrs[1], &token),
        "20",
    ]);
    let done = js.ok();
    let url = done["url"].as_str().unwrap().to_string();
    let id = DocumentId::parse(&url).unwrap();
    let name = format!("automerge/{id}");
    assert_eq!(done["items"].as_array().unwrap().len(), 40);
    assert_eq!(done["heads_a"], done["heads_b"]);

    // What the apps converged on is what the cluster stores (read through member 3).
    let stored =
        wait_until_or_dump("the cluster to hold all 40 items", &nodes, || {
            let (t, n) = (ticket.clone(), name.clone());
            async move {
                doc_json(&t, &n).filter(|d| d["items"].as_array().is_some_and(|i| i.len() == 40))
            }
        })
        .await;
    assert_eq!(stored["items"], done["items"]);

    // A change made with `aspen doc` reaches an app connected to member 3.
    let watcher = JsClient::spawn(&["await", &ws_url(addrs[2], &token), &url, "fromCli", "42"]);
    let out = cli(&["doc", "set", &name, "fromCli", "42"], Some(&ticket));
    assert!(out.status.success(), "{}", stderr(&out));
    let seen = watcher.ok();
    assert_eq!(seen["doc"]["fromCli"], 42);
    assert_eq!(seen["doc"]["items"], done["items"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_whose_member_is_killed_continues_on_another_member() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = form(root.path(), 3, REPO_ARGS).await;
    let addrs = repo_addrs(&nodes).await;
    // The CLI talks to the members that stay.
    let ticket = ticket_text(&nodes[1..]);
    let token = bearer(&ticket, &["doc:write:automerge/"]);

    let mut js = JsClient::spawn(&[
        "failover",
        &ws_url(addrs[0], &token),
        &ws_url(addrs[1], &token),
    ]);
    let ready = js.next();
    let url = ready["ready"].as_str().expect("ready").to_string();
    let name = format!("automerge/{}", DocumentId::parse(&url).unwrap());
    wait_until_or_dump("the app's document to be committed", &nodes, || {
        let (t, n) = (ticket.clone(), name.clone());
        async move { doc_json(&t, &n).filter(|d| d["before"] == 1) }
    })
    .await;

    nodes[0].kill9();
    js.say("killed");
    assert_eq!(js.next()["moved"], true);
    // The change the app made while its member was gone reaches the cluster through member 2.
    wait_until_or_dump("the offline change to be committed", &nodes[1..], || {
        let (t, n) = (ticket.clone(), name.clone());
        async move { doc_json(&t, &n).filter(|d| d["after"] == 2) }
    })
    .await;
    let out = cli(&["doc", "set", &name, "fromCli", "7"], Some(&ticket));
    assert!(out.status.success(), "{}", stderr(&out));
    let doc = js.ok();
    assert_eq!(doc["doc"]["fromCli"], 7);
    assert_eq!(doc["doc"]["before"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn apps_without_a_grant_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, REPO_ARGS).await;
    let ticket = ticket_text(&nodes);
    let addr = repo_addrs(&nodes).await[0];
    let writer = bearer(&ticket, &["doc:write:automerge/"]);

    // No token, a garbled one, and a token addressed to a key (not a bearer token).
    JsClient::spawn(&["refused", &format!("ws://{addr}/")]).ok();
    JsClient::spawn(&["refused", &ws_url(addr, "aspen-token-v1:00")]).ok();
    let keyed = cli(
        &[
            "auth",
            "token",
            "issue",
            "--to",
            &hex::encode(admin_key()),
            "--allow",
            "doc:write:automerge/",
        ],
        Some(&ticket),
    );
    assert!(keyed.status.success(), "{}", stderr(&keyed));
    JsClient::spawn(&["refused", &ws_url(addr, stdout(&keyed).trim())]).ok();

    // A token for other documents: the app's document is unavailable to it, and nothing
    // it sends is stored.
    let other = bearer(&ticket, &["doc:write:elsewhere/"]);
    let js = JsClient::spawn(&[
        "converge",
        &ws_url(addr, &writer),
        &ws_url(addr, &writer),
        "1",
    ]);
    let url = js.ok()["url"].as_str().unwrap().to_string();
    let u = JsClient::spawn(&["unavailable", &ws_url(addr, &other), &url]);
    u.ok();

    // A bearer token is refused on the client protocol (no QUIC key is its audience), and
    // the zero key (the bearer audience) cannot be given a grant.
    let out = cli(&["kv", "get", "x", "--token", &other], Some(&ticket));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("token refused"), "{}", stderr(&out));
    let out = cli(
        &["auth", "grant", &"0".repeat(64), "doc:read:*"],
        Some(&ticket),
    );
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("stands for bearer-token callers"),
        "{}",
        stderr(&out)
    );
    // Bearer tokens are short-lived: at most 30 days.
    let out = cli(
        &[
            "auth",
            "token",
            "issue",
            "--bearer",
            "--allow",
            "doc:read:automerge/",
            "--ttl",
            "31d",
        ],
        Some(&ticket),
    );
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(stderr(&out).contains("at most 30d"), "{}", stderr(&out));
}

/// A token that may read but not write: syncing works, and the first change it sends ends the
/// connection with an `error`, and nothing is stored.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_token_cannot_write() {
    use automerge::sync::SyncDoc;
    use automerge::transaction::Transactable;
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, REPO_ARGS).await;
    let ticket = ticket_text(&nodes);
    let addr = repo_addrs(&nodes).await[0];
    let reader = bearer(&ticket, &["doc:read:automerge/"]);
    let id = DocumentId::from_bytes(&rand::random::<[u8; 16]>()).unwrap();
    let name = format!("automerge/{id}");
    let out = cli(&["doc", "create", &name], Some(&ticket));
    assert!(out.status.success(), "{}", stderr(&out));

    // An app with its own change syncs with the node until it sends that change.
    let mut doc = automerge::Automerge::new();
    let mut tx = doc.transaction();
    tx.put(automerge::ROOT, "x", 1_i64).unwrap();
    tx.commit();
    let mut state = automerge::sync::State::new();
    let mut ws = joined(addr, &reader).await;
    let error = loop {
        if let Some(m) = doc.generate_sync_message(&mut state) {
            let sync = Message::Sync {
                sender_id: "raw-test".into(),
                target_id: "x".into(),
                document_id: id.clone(),
                data: m.encode(),
            };
            ws.send(WsMessage::Binary(sync.encode().unwrap().into()))
                .await
                .unwrap();
        }
        match next(&mut ws).await.expect("an answer before the close") {
            Message::Sync { data, .. } => {
                let m = automerge::sync::Message::decode(&data).unwrap();
                doc.receive_sync_message(&mut state, m).unwrap();
            }
            Message::Error { message } => break message,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(error.contains("doc:write"), "{error}");
    let stored = doc_json(&ticket, &name).unwrap();
    assert!(stored.get("x").is_none(), "{stored}");
}

/// Busy polling (see `node/src/busy_poll.rs`): an app's sync messages open the spinning
/// window once they are authorized; a connection without a token, and a token without a grant
/// for the document, open none.
#[tokio::test(flavor = "multi_thread")]
async fn busy_polling_follows_authorized_sync_messages_only() {
    use crate::metrics::{get, metrics_addr, scrape, Samples};
    use automerge::sync::SyncDoc;
    let root = tempfile::tempdir().unwrap();
    let args = [REPO_ARGS, &["--metrics", "127.0.0.1:0"]].concat();
    let nodes = form(root.path(), 1, &args).await;
    let ticket = ticket_text(&nodes);
    let addr = repo_addrs(&nodes).await[0];
    let client = client_for(&nodes.iter().collect::<Vec<_>>()).await;
    let metrics = metrics_addr(&client).await;
    let windows = |s: &Samples| get(s, "aspen_busy_poll_windows_total");
    let id = DocumentId::from_bytes(&rand::random::<[u8; 16]>()).unwrap();
    let name = format!("automerge/{id}");
    let out = cli(&["doc", "create", &name], Some(&ticket));
    assert!(out.status.success(), "{}", stderr(&out));
    // A sync message from an empty document: a fresh sync state always has one to send.
    let sync = || Message::Sync {
        sender_id: "raw-test".into(),
        target_id: "x".into(),
        document_id: id.clone(),
        data: automerge::Automerge::new()
            .generate_sync_message(&mut automerge::sync::State::new())
            .expect("a first sync message")
            .encode(),
    };
    let before = scrape(metrics, None);

    // No token: the upgrade is refused.
    let refused = tokio_tungstenite::connect_async(format!("ws://{addr}/")).await;
    assert!(refused.is_err(), "an upgrade without a token was accepted");
    // A token for other documents: joined, and its sync is answered `doc-unavailable`.
    let mut ws = joined(addr, &bearer(&ticket, &["doc:read:elsewhere/"])).await;
    ws.send(WsMessage::Binary(sync().encode().unwrap().into()))
        .await
        .unwrap();
    match next(&mut ws).await {
        Some(Message::DocUnavailable { .. }) => {}
        other => panic!("expected doc-unavailable, got {other:?}"),
    }
    assert_eq!(
        windows(&scrape(metrics, None)),
        windows(&before),
        "refused sync messages"
    );

    // A reader's sync messages do. (Sent again until then, each on a new connection, which
    // the node always answers: on a loaded machine the spinner may be backing off for a
    // second, and then nothing opens the window.)
    let reader = bearer(&ticket, &["doc:read:automerge/"]);
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let mut ws = joined(addr, &reader).await;
        ws.send(WsMessage::Binary(sync().encode().unwrap().into()))
            .await
            .unwrap();
        match next(&mut ws).await {
            Some(Message::Sync { .. }) => {}
            other => panic!("expected sync, got {other:?}"),
        }
        if windows(&scrape(metrics, None)) > windows(&before) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "authorized sync messages never opened the window"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A raw WebSocket connection to `addr` with `token`, joined.
async fn joined(
    addr: SocketAddr,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(addr, token))
        .await
        .expect("upgrade");
    let join = Message::Join {
        sender_id: "raw-test".into(),
        peer_metadata: PeerMetadata::default(),
        supported_protocol_versions: vec!["1".into()],
    };
    ws.send(WsMessage::Binary(join.encode().unwrap().into()))
        .await
        .unwrap();
    match next(&mut ws).await {
        Some(Message::Peer { target_id, .. }) => assert_eq!(target_id, "raw-test"),
        other => panic!("expected peer, got {other:?}"),
    }
    ws
}

/// The next protocol message, `None` once the server closed the connection.
async fn next<S>(ws: &mut S) -> Option<Message>
where
    S: futures::Stream<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let frame = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("the server neither answered nor closed");
        match frame {
            Some(Ok(WsMessage::Binary(b))) => return Some(Message::decode(&b).unwrap()),
            Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// Reads until the server closes, returning the `error` message it sent first.
async fn error_then_close<S>(ws: &mut S) -> String
where
    S: futures::Stream<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut error = None;
    while let Some(m) = next(ws).await {
        if let Message::Error { message } = m {
            error.get_or_insert(message);
        }
    }
    error.expect("an error message before the close")
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_ends_only_the_connection_that_sent_it() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, REPO_ARGS).await;
    let ticket = ticket_text(&nodes);
    let addr = repo_addrs(&nodes).await[0];
    let token = bearer(&ticket, &["doc:write:automerge/"]);
    // A well-behaved connection that stays open throughout.
    let mut good = joined(addr, &token).await;

    let bad_frames: Vec<(&str, Vec<u8>)> = vec![
        ("not CBOR", vec![0xff, 0x00, 0x13]),
        ("unknown type", {
            let mut b = Vec::new();
            ciborium_like_map(&mut b, &[("type", "teleport"), ("senderId", "x")]);
            b
        }),
        ("a map without a type", vec![0xa0]),
    ];
    for (what, frame) in bad_frames {
        let mut ws = joined(addr, &token).await;
        ws.send(WsMessage::Binary(frame.into())).await.unwrap();
        let error = error_then_close(&mut ws).await;
        assert!(!error.is_empty(), "{what}");
    }

    // A sync message whose Automerge payload is garbage.
    let mut ws = joined(addr, &token).await;
    let id = DocumentId::from_bytes(&rand::random::<[u8; 16]>()).unwrap();
    let sync = Message::Sync {
        sender_id: "raw-test".into(),
        target_id: "x".into(),
        document_id: id.clone(),
        data: vec![0x42, 0xff, 0xff, 0xff],
    };
    ws.send(WsMessage::Binary(sync.encode().unwrap().into()))
        .await
        .unwrap();
    assert!(error_then_close(&mut ws)
        .await
        .contains("not an Automerge sync message"));

    // A text frame, and a frame over the size limit.
    let mut ws = joined(addr, &token).await;
    ws.send(WsMessage::Text("hello".into())).await.unwrap();
    assert!(error_then_close(&mut ws).await.contains("text frames"));
    let mut ws = joined(addr, &token).await;
    let huge = vec![0u8; aspen_repo_protocol::MAX_MESSAGE_BYTES + 1];
    let _ = ws.send(WsMessage::Binary(huge.into())).await;
    while next(&mut ws).await.is_some() {}

    // A flood of requests for documents that do not exist: each answered unavailable, until
    // the per-connection bound closes the connection.
    let mut ws = joined(addr, &token).await;
    let empty_request = automerge::sync::Message::decode(&EMPTY_REQUEST)
        .unwrap()
        .encode();
    let limit = aspen_node::server::automerge_repo::MAX_DOCS_PER_CONNECTION;
    for _ in 0..limit + 1 {
        let request = Message::Request {
            sender_id: "raw-test".into(),
            target_id: "x".into(),
            document_id: DocumentId::from_bytes(&rand::random::<[u8; 16]>()).unwrap(),
            data: empty_request.clone(),
        };
        if ws
            .send(WsMessage::Binary(request.encode().unwrap().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let (mut unavailable, mut error) = (0, None);
    while let Some(m) = next(&mut ws).await {
        match m {
            Message::DocUnavailable { .. } => unavailable += 1,
            Message::Error { message } => error = Some(message),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(unavailable, limit);
    assert!(error.unwrap().contains("already syncs"));

    // The well-behaved connection still works: it asks for a document and is answered.
    let request = Message::Request {
        sender_id: "raw-test".into(),
        target_id: "x".into(),
        document_id: id,
        data: empty_request,
    };
    good.send(WsMessage::Binary(request.encode().unwrap().into()))
        .await
        .unwrap();
    assert!(matches!(
        next(&mut good).await,
        Some(Message::DocUnavailable { .. })
    ));
}

/// Callers without a token: 500 upgrade attempts are each answered 401 before any WebSocket
/// exists, and 400 TCP connections that send nothing are held at most until their upgrade
/// times out (past the pending-upgrade bound, closed at once): the node's memory stays flat
/// and an app with a token is served afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_callers_without_tokens_costs_the_node_little() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(
        root.path(),
        1,
        &[
            "--automerge-repo",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ],
    )
    .await;
    let ticket = ticket_text(&nodes);
    let addr = repo_addrs(&nodes).await[0];
    let token = bearer(&ticket, &["doc:write:automerge/"]);
    let pid = nodes[0].pid().unwrap();
    let metrics = {
        let c = client_of(&nodes[0]).await;
        let a = crate::metrics::metrics_addr(&c).await;
        c.close().await;
        a
    };
    let refused_before = crate::metrics::get(
        &crate::metrics::scrape(metrics, None),
        "aspen_automerge_repo_refused_total",
    );
    let (rss_before, cpu_before) = (rss(pid), process_cpu_ms(pid));
    let attempts = 500;
    let refused = futures::stream::iter(0..attempts)
        .map(|_| async move {
            match tokio_tungstenite::connect_async(format!("ws://{addr}/")).await {
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status() == 401,
                _ => false,
            }
        })
        .buffer_unordered(16)
        .filter(|refused| futures::future::ready(*refused))
        .count()
        .await;
    assert_eq!(refused, attempts);
    let mut idle = Vec::new();
    for _ in 0..400 {
        if let Ok(s) = tokio::net::TcpStream::connect(addr).await {
            idle.push(s);
        }
    }
    let growth = rss(pid).saturating_sub(rss_before);
    eprintln!(
        "{attempts} refused upgrades and 400 idle sockets: node RSS +{} KiB, CPU {} ms",
        growth >> 10,
        process_cpu_ms(pid) - cpu_before
    );
    assert!(growth < 64 << 20, "the node grew by {} MiB", growth >> 20);
    drop(idle);
    // No connection stayed open, the refusals are counted, and an app with a token is served.
    let c = client_of(&nodes[0]).await;
    let figures = c.status().await.unwrap().figures;
    c.close().await;
    assert_eq!(figures.automerge_repo_connections, 0);
    let _ws = wait_until("an app with a token to be served", || async {
        match tokio_tungstenite::connect_async(ws_url(addr, &token)).await {
            Ok(_) => Some(()),
            Err(_) => None,
        }
    })
    .await;
    let mut ws = joined(addr, &token).await;
    let request = Message::Request {
        sender_id: "raw-test".into(),
        target_id: "x".into(),
        document_id: DocumentId::from_bytes(&[9; 16]).unwrap(),
        data: automerge::sync::Message::decode(&EMPTY_REQUEST)
            .unwrap()
            .encode(),
    };
    ws.send(WsMessage::Binary(request.encode().unwrap().into()))
        .await
        .unwrap();
    assert!(matches!(
        next(&mut ws).await,
        Some(Message::DocUnavailable { .. })
    ));
    // The metrics count the refusals, the open connections and the message.
    let after = crate::metrics::scrape(metrics, None);
    assert!(
        crate::metrics::get(&after, "aspen_automerge_repo_refused_total")
            >= refused_before + attempts as f64
    );
    assert!(crate::metrics::get(&after, "aspen_automerge_repo_connections") >= 1.0);
    assert!(crate::metrics::get(&after, "aspen_automerge_repo_messages_total") >= 1.0);
}

/// Writes a CBOR map of text to text (enough for hand-made bad messages).
fn ciborium_like_map(out: &mut Vec<u8>, entries: &[(&str, &str)]) {
    out.push(0xa0 | entries.len() as u8);
    for (k, v) in entries {
        for s in [k, v] {
            out.push(0x60 | s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        }
    }
}
