//! etcd's v3 API (`--etcd-api`), checked against etcd itself: the same etcdctl 3.5 commands
//! run against a real etcd 3.5 (installed by `scripts/install-etcd.sh`) and against Aspen,
//! and their outputs compared line by line, revisions included. Only what differs between
//! any two clusters is masked: the cluster and member ids and the Raft term.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use futures::StreamExt;

use crate::common::*;

/// Where etcd and etcdctl are (installed once per test process).
fn etcd_bin_dir() -> PathBuf {
    static DIR: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut dir = DIR.lock().unwrap_or_else(|e| e.into_inner());
    if dir.is_none() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-etcd.sh");
        let out = Command::new(&script)
            .output()
            .expect("scripts/install-etcd.sh (needs python3 with venv and pip)");
        assert!(
            out.status.success(),
            "installing etcd failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        *dir = Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    dir.clone().unwrap()
}

/// A single-member etcd on loopback, killed when dropped.
struct EtcdProc {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl EtcdProc {
    fn start() -> EtcdProc {
        let bin = etcd_bin_dir();
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let child = Command::new(bin.join("etcd"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        let etcd = EtcdProc {
            child,
            endpoint: format!("127.0.0.1:{client}"),
            _dir: dir,
        };
        wait_for("etcd to serve", || {
            let (_, ok) = etcdctl(&etcd.endpoint, None, &["endpoint", "health"], None);
            ok.then_some(())
        });
        etcd
    }
}

impl Drop for EtcdProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs etcdctl 3.5 against `endpoint` (as `user`, if given; `NAME:PASSWORD`), feeding
/// `stdin`; returns its output (standard output, then standard error) and whether it
/// succeeded.
fn etcdctl(
    endpoint: &str,
    user: Option<&str>,
    args: &[&str],
    stdin: Option<&str>,
) -> (String, bool) {
    let mut cmd = Command::new(etcd_bin_dir().join("etcdctl"));
    cmd.args([
        "--endpoints",
        endpoint,
        "--dial-timeout",
        "5s",
        "--command-timeout",
        "30s",
    ]);
    if let Some(user) = user {
        cmd.args(["--user", user]);
    }
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run etcdctl");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    // Killed if it does not finish (a watch that never ends would hang the test).
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("etcdctl {args:?} did not finish");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", stdout(&out), stderr(&out));
    (text, out.status.success())
}

/// A long-running etcdctl (a watch, a campaign), its standard output read line by line;
/// killed when dropped.
struct EtcdctlProc {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl EtcdctlProc {
    fn spawn(endpoint: &str, user: Option<&str>, args: &[&str]) -> EtcdctlProc {
        use std::io::BufRead;
        let mut cmd = Command::new(etcd_bin_dir().join("etcdctl"));
        cmd.args(["--endpoints", endpoint]);
        if let Some(user) = user {
            cmd.args(["--user", user]);
        }
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run etcdctl");
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
        EtcdctlProc { child, lines }
    }

    /// Every line up to and including the first that is `last`.
    fn lines_until(&self, last: &str) -> Vec<String> {
        let mut got = Vec::new();
        loop {
            let line = self
                .lines
                .recv_timeout(DEADLINE)
                .unwrap_or_else(|_| panic!("no line {last:?} after {got:?}"));
            let done = line == last;
            got.push(line);
            if done {
                return got;
            }
        }
    }
}

impl Drop for EtcdctlProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The parts of etcdctl's output that differ between any two clusters, masked: the cluster
/// and member ids and the Raft term (JSON and `fields` output), and the client library's
/// own warnings (timestamps, addresses).
fn normalize(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("{\"level\"") {
            continue;
        }
        let mut line = line.to_string();
        for field in ["cluster_id", "member_id", "raft_term"] {
            let key = format!("\"{field}\":");
            while let Some(at) = line.find(&key) {
                let start = at + key.len();
                let end = start
                    + line[start..]
                        .find(|c: char| !c.is_ascii_digit())
                        .unwrap_or(line.len() - start);
                line.replace_range(at..end, &format!("\"{field}\"=N"));
            }
        }
        for field in ["\"ClusterID\" : ", "\"MemberID\" : ", "\"RaftTerm\" : "] {
            if line.starts_with(field) {
                line = format!("{field}N");
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// What a sequence of etcdctl commands prints, one block per command with its exit status.
fn transcript(endpoint: &str, user: Option<&str>, script: &[(&str, Option<&str>)]) -> String {
    let mut out = String::new();
    for (command, stdin) in script {
        let args: Vec<&str> = command.split_whitespace().collect();
        let (text, ok) = etcdctl(endpoint, user, &args, *stdin);
        out.push_str(&format!(
            "$ etcdctl {command}\n{}[{}]\n",
            normalize(&text),
            if ok { "ok" } else { "failed" }
        ));
    }
    out
}

/// Where a node serves the etcd API.
async fn etcd_addr(node: &NodeProc) -> String {
    let c = client_of(node).await;
    let status = c.status().await.unwrap();
    c.close().await;
    status
        .figures
        .etcd_api_addr
        .expect("the node serves the etcd API")
}

const ETCD_ARGS: &[&str] = &["--etcd-api", "127.0.0.1:0"];

/// The commands both clusters run, from empty, in order (with what each reads on stdin).
const SCRIPT: &[(&str, Option<&str>)] = &[
    ("put foo bar", None),
    ("put foo baz --prev-kv -w json", None),
    ("get foo", None),
    ("get foo -w json", None),
    ("put foo2 x", None),
    ("put fop y", None),
    ("get foo --prefix", None),
    ("get foo --prefix --keys-only", None),
    ("get foo --prefix --limit 1 -w json", None),
    ("get foo --prefix --count-only -w fields", None),
    ("get foo --prefix --sort-by=MODIFY --order=DESCEND", None),
    ("get foo --prefix --sort-by=VERSION", None),
    (
        "get f --prefix --sort-by=CREATE --order=DESCEND --limit 2 -w json",
        None,
    ),
    ("get --from-key f", None),
    ("get foo fop", None),
    ("get foo --rev=2", None),
    ("get foo --rev=2 -w json", None),
    ("get foo --rev=1 -w json", None),
    ("get foo --rev=100", None),
    ("get foo --consistency=s -w json", None),
    ("put foo --ignore-value", None),
    ("put missing --ignore-value", None),
    ("put foo q --lease=123", None),
    // A transaction that holds: reads before and after its writes.
    (
        "txn -w json",
        Some("mod(\"fop\") > \"0\"\n\nget fop\nput t1 yes\nget t1\n\nput t1 no\n\n"),
    ),
    // One that fails, in the simple output.
    (
        "txn",
        Some("value(\"fop\") = \"nope\"\n\nput t2 yes\n\nget fop\nput t2 no\nget t2 --prefix\n\n"),
    ),
    (
        "txn -w json",
        Some("create(\"t2\") = \"0\"\nversion(\"t1\") = \"1\"\n\nput t3 a\n\n\n"),
    ),
    (
        "txn",
        Some("create(\"zzz\") = \"0\"\n\nput zzz 1\nput zzz 2\n\n\n"),
    ),
    (
        "txn -w json",
        Some("mod(\"t1\") < \"1\"\n\n\ndel t1 --prev-kv\n\n"),
    ),
    (
        "txn -w json",
        Some("create(\"fop\") > \"0\"\n\nget fop --rev=3\n\n\n"),
    ),
    ("del foo2 -w json", None),
    ("del foo --prefix --prev-kv -w json", None),
    ("del nothing", None),
    ("compact 3", None),
    ("get foo --rev=2", None),
    ("get fop --rev=3 -w json", None),
    ("compact 2", None),
    ("get '' --from-key --keys-only", None),
];

#[tokio::test(flavor = "multi_thread")]
async fn etcdctl_prints_the_same_against_aspen_as_against_etcd() {
    let etcd = EtcdProc::start();
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, ETCD_ARGS).await;
    let ticket = ticket_text(&nodes);
    let endpoint = etcd_addr(&nodes[0]).await;
    let token = bearer(&ticket, &["kv:write:*", "cluster:admin:*"]);
    let user = format!("aspen:{token}");
    // A watch of everything from revision 3 on, running while the script does.
    let watches = [
        EtcdctlProc::spawn(
            &etcd.endpoint,
            None,
            &["watch", "--prefix", "", "--rev", "3", "--prev-kv"],
        ),
        EtcdctlProc::spawn(
            &endpoint,
            Some(&user),
            &["watch", "--prefix", "", "--rev", "3", "--prev-kv"],
        ),
    ];
    let mut expected = transcript(&etcd.endpoint, None, SCRIPT);
    let mut got = transcript(&endpoint, Some(&user), SCRIPT);
    // Each watch saw the same events, up to a last put both make.
    for ((endpoint, user), watch) in [
        (etcd.endpoint.as_str(), None),
        (endpoint.as_str(), Some(user.as_str())),
    ]
    .into_iter()
    .zip(&watches)
    {
        let (text, ok) = etcdctl(endpoint, user, &["put", "zz-end", "."], None);
        assert!(ok, "{text}");
        let lines = watch.lines_until("zz-end");
        let out = if user.is_none() {
            &mut expected
        } else {
            &mut got
        };
        out.push_str(&format!(
            "$ etcdctl watch --prefix '' --rev 3 --prev-kv\n{}\n",
            lines.join("\n")
        ));
    }
    // A watch from a compacted revision is cancelled with etcd's reason.
    expected.push_str(&transcript(
        &etcd.endpoint,
        None,
        &[("watch foo --rev 2", None)],
    ));
    got.push_str(&transcript(
        &endpoint,
        Some(&user),
        &[("watch foo --rev 2", None)],
    ));
    if got != expected {
        let diff: Vec<String> = expected
            .lines()
            .zip(got.lines())
            .filter(|(e, g)| e != g)
            .map(|(e, g)| format!("etcd:  {e}\naspen: {g}"))
            .collect();
        panic!(
            "etcdctl printed something else against Aspen:\n{}\n--- etcd:\n{expected}\n--- aspen:\n{got}",
            diff.join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn callers_without_a_grant_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, ETCD_ARGS).await;
    let ticket = ticket_text(&nodes);
    let endpoint = etcd_addr(&nodes[0]).await;
    let refused = |user: Option<&str>, command: &str, why: &str| {
        let args: Vec<&str> = command.split_whitespace().collect();
        let (text, ok) = etcdctl(&endpoint, user, &args, None);
        assert!(!ok, "{command} as {user:?} was served: {text}");
        assert!(text.contains(why), "{command} as {user:?}: {text}");
    };
    // No token at all, for every service.
    for command in [
        "get k",
        "put k v",
        "del k",
        "member list",
        "endpoint status",
        "compact 1",
    ] {
        refused(None, command, "etcdserver: user name is empty");
    }
    let (text, ok) = etcdctl(&endpoint, None, &["txn"], Some("\nput k v\n\n\n"));
    assert!(
        !ok && text.contains("etcdserver: user name is empty"),
        "{text}"
    );
    // Without a token, the streaming and coordination services refuse too.
    {
        use aspen_etcd_api::pb::etcdserverpb::{
            lease_client::LeaseClient, watch_client::WatchClient, LeaseGrantRequest, WatchRequest,
        };
        use aspen_etcd_api::pb::v3lockpb::{lock_client::LockClient, LockRequest};
        let url = format!("http://{endpoint}");
        let empty = |s: tonic::Status| s.message() == "etcdserver: user name is empty";
        let mut watch = WatchClient::connect(url.clone()).await.unwrap();
        let requests = futures::stream::iter([WatchRequest::default()]);
        assert!(watch.watch(requests).await.is_err_and(empty));
        let mut lease = LeaseClient::connect(url.clone()).await.unwrap();
        let grant = LeaseGrantRequest { ttl: 10, id: 0 };
        assert!(lease.lease_grant(grant).await.is_err_and(empty));
        let mut lock = LockClient::connect(url).await.unwrap();
        let request = LockRequest {
            name: b"l".to_vec(),
            lease: 1,
        };
        assert!(lock.lock(request).await.is_err_and(empty));
    }
    // A token that is not one, and a token addressed to a key (not a bearer token).
    refused(
        Some("aspen:garbage"),
        "get k",
        "authentication failed, invalid user ID or password",
    );
    let keyed = {
        let out = cli(
            &[
                "auth",
                "token",
                "issue",
                "--to",
                &hex::encode(admin_key()),
                "--allow",
                "kv:read:*",
                "--ttl",
                "1h",
            ],
            Some(&ticket),
        );
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).trim().to_string()
    };
    refused(
        Some(&format!("aspen:{keyed}")),
        "get k",
        "authentication failed",
    );
    // A reader cannot write; a token for app/ reads nothing else.
    let reader = format!("aspen:{}", bearer(&ticket, &["kv:read:app/"]));
    refused(
        Some(&reader),
        "put app/k v",
        "etcdserver: permission denied",
    );
    refused(Some(&reader), "get other", "etcdserver: permission denied");
    refused(
        Some(&reader),
        "get a --prefix",
        "etcdserver: permission denied",
    );
    refused(Some(&reader), "compact 1", "etcdserver: permission denied");
    let (text, ok) = etcdctl(&endpoint, Some(&reader), &["get", "app/k"], None);
    assert!(ok, "{text}");
    // A transaction is checked whole: a refused read leaves its writes undone.
    let writer = format!("aspen:{}", bearer(&ticket, &["kv:write:app/"]));
    let (text, ok) = etcdctl(
        &endpoint,
        Some(&writer),
        &["txn"],
        Some("\nput app/t yes\nget secret\n\n\n"),
    );
    assert!(!ok && text.contains("permission denied"), "{text}");
    let (text, _) = etcdctl(&endpoint, Some(&writer), &["get", "app/t"], None);
    assert!(
        text.trim().is_empty(),
        "the refused transaction wrote: {text}"
    );
    // Nested transactions and comparisons over key ranges are checked whole too.
    {
        use aspen_etcd_api::pb::etcdserverpb::compare::{
            CompareResult, CompareTarget, TargetUnion,
        };
        use aspen_etcd_api::pb::etcdserverpb::request_op::Request;
        use aspen_etcd_api::pb::etcdserverpb::{
            kv_client::KvClient, Compare, PutRequest, RequestOp, TxnRequest,
        };
        let mut kv = KvClient::connect(format!("http://{endpoint}"))
            .await
            .unwrap();
        let as_user = |token: &str, txn: TxnRequest| {
            let mut r = tonic::Request::new(txn);
            r.metadata_mut().insert("token", token.parse().unwrap());
            r
        };
        let token_of = |user: &str| user.strip_prefix("aspen:").unwrap().to_string();
        let put = |key: &str| RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: key.as_bytes().to_vec(),
                value: b"t".to_vec(),
                ..Default::default()
            })),
        };
        // The writer's outer put is inside app/, its nested one outside: nothing is written.
        let nested = TxnRequest {
            success: vec![
                put("app/n1"),
                RequestOp {
                    request: Some(Request::RequestTxn(TxnRequest {
                        success: vec![put("other")],
                        ..Default::default()
                    })),
                },
            ],
            ..Default::default()
        };
        let status = kv
            .txn(as_user(&token_of(&writer), nested))
            .await
            .unwrap_err();
        assert_eq!(status.message(), "etcdserver: permission denied");
        let (text, _) = etcdctl(&endpoint, Some(&writer), &["get", "app/n1"], None);
        assert!(
            text.trim().is_empty(),
            "the refused nested txn wrote: {text}"
        );
        // A comparison over [app/, end): the reader may read it up to app0, not past it.
        let compare_range = |end: &str| TxnRequest {
            compare: vec![Compare {
                key: b"app/".to_vec(),
                range_end: end.as_bytes().to_vec(),
                result: CompareResult::Greater as i32,
                target: CompareTarget::Version as i32,
                target_union: Some(TargetUnion::Version(0)),
            }],
            ..Default::default()
        };
        let reader_token = token_of(&reader);
        let within = kv
            .txn(as_user(&reader_token, compare_range("app0")))
            .await
            .unwrap();
        // No key under app/ exists (every write above was refused): etcd compares an absent
        // key, whose version 0 is not greater than 0.
        assert!(!within.into_inner().succeeded);
        let status = kv
            .txn(as_user(&reader_token, compare_range("apq")))
            .await
            .unwrap_err();
        assert_eq!(status.message(), "etcdserver: permission denied");
    }
    // A revoked token is refused from then on, though it was used (and verified) before, on
    // a connection that keeps presenting it.
    {
        use aspen_etcd_api::pb::etcdserverpb::{kv_client::KvClient, RangeRequest};
        let revoked = bearer(&ticket, &["kv:read:*"]);
        let mut kv = KvClient::connect(format!("http://{endpoint}"))
            .await
            .unwrap();
        let get = |token: &str| {
            let mut r = tonic::Request::new(RangeRequest {
                key: b"k".to_vec(),
                ..Default::default()
            });
            r.metadata_mut().insert("token", token.parse().unwrap());
            r
        };
        kv.range(get(&revoked)).await.unwrap();
        let out = cli(&["auth", "token", "revoke", &revoked], Some(&ticket));
        assert!(out.status.success(), "{}", stderr(&out));
        wait_until("the revoked token to be refused", || {
            let mut kv = kv.clone();
            let request = get(&revoked);
            async move {
                match kv.range(request).await {
                    Err(s) if s.message() == "etcdserver: permission denied" => Some(()),
                    _ => None,
                }
            }
        })
        .await;
    }
    // Membership and users are Aspen's own.
    let admin = format!("aspen:{}", bearer(&ticket, &["cluster:admin:*"]));
    let (text, ok) = etcdctl(
        &endpoint,
        Some(&admin),
        &["member", "add", "x", "--peer-urls=http://127.0.0.1:1"],
        None,
    );
    assert!(!ok && text.contains("aspen cluster add"), "{text}");
    let (text, ok) = etcdctl(&endpoint, Some(&admin), &["user", "add", "u:p"], None);
    assert!(!ok && text.contains("aspen auth grant"), "{text}");
}

/// Every member serves the etcd API on the one store, and each member's member list names
/// every member's client URL (etcd clients find the other endpoints there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_serves_and_lists_every_members_address() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 3, ETCD_ARGS).await;
    let ticket = ticket_text(&nodes);
    let user = format!("aspen:{}", bearer(&ticket, &["kv:write:*"]));
    let mut endpoints = Vec::new();
    for n in &nodes {
        endpoints.push(etcd_addr(n).await);
    }
    let mut expected: Vec<String> = endpoints.iter().map(|e| format!("http://{e}")).collect();
    expected.sort();
    for endpoint in &endpoints {
        wait_until("every member's address in the member list", || async {
            let (text, ok) = etcdctl(
                endpoint,
                Some(&user),
                &["member", "list", "-w", "json"],
                None,
            );
            assert!(ok, "member list: {text}");
            let list: serde_json::Value = serde_json::from_str(&text).unwrap();
            let mut urls: Vec<String> = list["members"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|m| m["clientURLs"].as_array().cloned().unwrap_or_default())
                .map(|u| u.as_str().unwrap().to_string())
                .collect();
            urls.sort();
            (urls == expected).then_some(())
        })
        .await;
    }
    // A write through one member is read, linearizably, through every other.
    let (text, ok) = etcdctl(&endpoints[0], Some(&user), &["put", "shared", "v"], None);
    assert!(ok, "{text}");
    for endpoint in &endpoints[1..] {
        let (text, ok) = etcdctl(
            endpoint,
            Some(&user),
            &["get", "shared", "--print-value-only"],
            None,
        );
        assert!(ok, "{text}");
        assert_eq!(text.trim(), "v");
    }
    // A transaction that only compares and reads is answered without the log, as etcd
    // answers one: five of them apply nothing (through the log each would apply a command).
    let applied = || async {
        let c = client_of(&nodes[2]).await;
        let figures = c.status().await.unwrap().figures;
        c.close().await;
        figures.applied_commands
    };
    let before = applied().await;
    for _ in 0..5 {
        let (text, ok) = etcdctl(
            &endpoints[2],
            Some(&user),
            &["txn"],
            Some("value(\"shared\") = \"v\"\n\nget shared\n\nget nothing\n\n"),
        );
        assert!(ok, "{text}");
        assert_eq!(normalize(&text).trim(), "SUCCESS\n\nshared\nv", "{text}");
    }
    let after = applied().await;
    assert!(
        after - before < 5,
        "read-only transactions went through the log ({before} -> {after} commands)"
    );
    // etcdctl given every endpoint finds each healthy. (`--cluster`, which reads the member
    // list without credentials as etcd allows, is refused: Aspen answers no caller without a
    // token.)
    let all = endpoints.join(",");
    let (text, ok) = etcdctl(&all, Some(&user), &["endpoint", "health"], None);
    assert!(ok, "{text}");
    assert_eq!(text.matches("is healthy").count(), 3, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_locks_and_elections_work_with_etcdctl() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, ETCD_ARGS).await;
    let ticket = ticket_text(&nodes);
    let endpoint = etcd_addr(&nodes[0]).await;
    let user = format!("aspen:{}", bearer(&ticket, &["kv:write:*"]));
    let run = |args: &[&str]| {
        let (text, ok) = etcdctl(&endpoint, Some(&user), args, None);
        assert!(ok, "etcdctl {args:?}: {text}");
        normalize(&text)
    };
    // A lease: its key, its time to live, a keep-alive, and the revoke that deletes the key.
    let granted = run(&["lease", "grant", "30"]);
    let id = granted
        .split_whitespace()
        .nth(1)
        .expect("lease ID granted ...")
        .to_string();
    assert_eq!(granted.trim(), format!("lease {id} granted with TTL(30s)"));
    run(&["put", "leased", "v", "--lease", &id]);
    let ttl = run(&["lease", "timetolive", &id, "--keys"]);
    assert!(
        ttl.contains("granted with TTL(30s)") && ttl.contains("attached keys([leased])"),
        "{ttl}"
    );
    assert!(run(&["lease", "list"]).contains(&id));
    assert_eq!(
        run(&["lease", "keep-alive", "--once", &id]).trim(),
        format!("lease {id} keepalived with TTL(30)")
    );
    assert_eq!(
        run(&["lease", "revoke", &id]).trim(),
        format!("lease {id} revoked")
    );
    assert_eq!(run(&["get", "leased"]), "");
    assert_eq!(
        run(&["lease", "timetolive", &id]).trim(),
        format!("lease {id} already expired")
    );
    // A lease nobody keeps alive expires, and its key with it.
    let granted = run(&["lease", "grant", "2"]);
    let id = granted.split_whitespace().nth(1).unwrap().to_string();
    run(&["put", "short", "v", "--lease", &id]);
    wait_for("the unrenewed lease's key to go", || {
        run(&["get", "short"]).is_empty().then_some(())
    });

    // A lock: the second holder runs only after the first released it.
    let log = root.path().join("lock.log");
    let holder = |name: &str| {
        let script = format!(
            "echo {name} in >> {0}; sleep 0.5; echo {name} out >> {0}",
            log.display()
        );
        EtcdctlProc::spawn(
            &endpoint,
            Some(&user),
            &["lock", "deploys", "--", "sh", "-c", &script],
        )
    };
    let first = holder("first");
    wait_for("the first holder to hold the lock", || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|l| l.contains("first in"))
            .map(|_| ())
    });
    let second = holder("second");
    wait_for("both holders to finish", || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|l| l.lines().count() == 4)
            .map(|_| ())
    });
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "first in\nfirst out\nsecond in\nsecond out\n",
        "the holders overlapped"
    );
    drop((first, second));

    // An election: the campaigner leads, an observer sees it, a second candidate waits.
    let leader = EtcdctlProc::spawn(&endpoint, Some(&user), &["elect", "pool", "node-a"]);
    let proposal = leader.lines_until("node-a");
    assert_eq!(proposal.len(), 2, "{proposal:?}");
    assert!(proposal[0].starts_with("pool/"), "{proposal:?}");
    let observer = EtcdctlProc::spawn(&endpoint, Some(&user), &["elect", "--listen", "pool"]);
    assert_eq!(observer.lines_until("node-a"), proposal);
    let second = EtcdctlProc::spawn(&endpoint, Some(&user), &["elect", "pool", "node-b"]);
    drop(leader);
    // The first leader's process is gone; its lease (60 s by default) is revoked here so
    // the second candidate need not wait for it to expire.
    let (lease, _) = etcdctl(
        &endpoint,
        Some(&user),
        &["get", &proposal[0], "-w", "json"],
        None,
    );
    let id: serde_json::Value = serde_json::from_str(lease.trim()).unwrap();
    let id = format!("{:x}", id["kvs"][0]["lease"].as_i64().unwrap());
    run(&["lease", "revoke", &id]);
    let next = second.lines_until("node-b");
    assert!(next[0].starts_with("pool/"), "{next:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_callers_without_tokens_costs_the_node_little() {
    use aspen_etcd_api::pb::etcdserverpb::{kv_client::KvClient, RangeRequest};
    let root = tempfile::tempdir().unwrap();
    let nodes = form(
        root.path(),
        1,
        &["--etcd-api", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
    )
    .await;
    let ticket = ticket_text(&nodes);
    let endpoint = etcd_addr(&nodes[0]).await;
    let pid = nodes[0].pid().unwrap();
    let metrics = {
        let c = client_of(&nodes[0]).await;
        let a = crate::metrics::metrics_addr(&c).await;
        c.close().await;
        a
    };
    let refused_before = crate::metrics::get(
        &crate::metrics::scrape(metrics, None),
        "aspen_etcd_refused_total",
    );
    let (rss_before, cpu_before) = (rss(pid), process_cpu_ms(pid));
    // Each caller on a connection of its own, 16 at a time, with no token.
    let attempts = 500;
    let url = format!("http://{endpoint}");
    let refused = futures::stream::iter(0..attempts)
        .map(|_| {
            let url = url.clone();
            async move {
                let mut kv = KvClient::connect(url).await.unwrap();
                let answer = kv
                    .range(RangeRequest {
                        key: b"k".to_vec(),
                        ..Default::default()
                    })
                    .await;
                matches!(answer, Err(s) if s.message() == "etcdserver: user name is empty")
            }
        })
        .buffer_unordered(16)
        .filter(|refused| futures::future::ready(*refused))
        .count()
        .await;
    assert_eq!(refused, attempts);
    // Idle sockets, and sockets that send garbage instead of HTTP/2.
    let mut idle = Vec::new();
    for i in 0..400 {
        let mut s = tokio::net::TcpStream::connect(&endpoint).await.unwrap();
        if i % 2 == 0 {
            use tokio::io::AsyncWriteExt;
            let _ = s
                .write_all(b"GET / HTTP/1.0\r\n\r\nnot http/2 at all")
                .await;
        }
        idle.push(s);
    }
    let growth = rss(pid).saturating_sub(rss_before);
    eprintln!(
        "{attempts} refused calls and 400 idle or garbage sockets: node RSS +{} KiB, CPU {} ms",
        growth >> 10,
        process_cpu_ms(pid) - cpu_before
    );
    assert!(growth < 64 << 20, "the node grew by {} MiB", growth >> 20);
    drop(idle);
    let samples = crate::metrics::scrape(metrics, None);
    assert!(
        crate::metrics::get(&samples, "aspen_etcd_refused_total") - refused_before
            >= attempts as f64
    );
    // Every connection closed again, and a caller with a token is served.
    wait_until("the flood's connections to close", || async {
        let c = client_of(&nodes[0]).await;
        let open = c.status().await.ok()?.figures.etcd_api_connections;
        c.close().await;
        (open == 0).then_some(())
    })
    .await;
    let user = format!("aspen:{}", bearer(&ticket, &["kv:read:*"]));
    let (text, ok) = etcdctl(&endpoint, Some(&user), &["get", "k"], None);
    assert!(ok, "{text}");
}

/// One etcd-client error as etcd's status code and message (the rest of its text carries
/// per-connection metadata).
fn status_of(e: etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => format!("{other}"),
    }
}

/// A key-value as the transcript shows it.
fn kv_line(kv: &etcd_client::KeyValue) -> String {
    format!(
        "{}={} create {} mod {} version {} leased {}",
        String::from_utf8_lossy(kv.key()),
        String::from_utf8_lossy(kv.value()),
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
        kv.lease() != 0
    )
}

/// A transaction's answer, nested ones included, with each operation's header revision.
fn txn_line(r: &etcd_client::TxnResponse) -> String {
    use etcd_client::TxnOpResponse;
    let rev = |h: Option<&etcd_client::ResponseHeader>| h.map_or(-1, |h| h.revision());
    let ops: Vec<String> = r
        .op_responses()
        .into_iter()
        .map(|op| match op {
            TxnOpResponse::Put(p) => {
                format!(
                    "put@{} prev {:?}",
                    rev(p.header()),
                    p.prev_key().map(kv_line)
                )
            }
            TxnOpResponse::Get(g) => format!(
                "get@{} {:?} count {} more {}",
                rev(g.header()),
                g.kvs().iter().map(kv_line).collect::<Vec<_>>(),
                g.count(),
                g.more()
            ),
            TxnOpResponse::Delete(d) => format!(
                "del@{} {} {:?}",
                rev(d.header()),
                d.deleted(),
                d.prev_kvs().iter().map(kv_line).collect::<Vec<_>>()
            ),
            TxnOpResponse::Txn(t) => format!("txn@{} {}", rev(t.header()), txn_line(&t)),
        })
        .collect();
    format!(
        "@{} succeeded {} [{}]",
        rev(r.header()),
        r.succeeded(),
        ops.join("; ")
    )
}

/// Drives a cluster through the Rust `etcd-client` crate, from empty, and writes down what
/// it answers (lease ids, which differ between any two clusters, left out).
async fn drive_with_etcd_client(client: &mut etcd_client::Client) -> Vec<String> {
    use etcd_client::{
        Compare, CompareOp, DeleteOptions, EventType, GetOptions, PutOptions, SortOrder,
        SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions,
    };
    let mut out = Vec::new();
    let rev = |h: Option<&etcd_client::ResponseHeader>| h.map_or(-1, |h| h.revision());

    let r = client.put("a", "1", None).await.unwrap();
    out.push(format!("put a: revision {}", rev(r.header())));
    let r = client
        .put("a", "2", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    out.push(format!("put a again: prev {:?}", r.prev_key().map(kv_line)));
    for (k, v) in [("b", "x"), ("c", "y"), ("d", "z")] {
        client.put(k, v, None).await.unwrap();
    }
    let gets = [
        (
            "all by mod, descending, 2",
            GetOptions::new()
                .with_all_keys()
                .with_sort(SortTarget::Mod, SortOrder::Descend)
                .with_limit(2),
        ),
        (
            "count only",
            GetOptions::new().with_prefix().with_count_only(),
        ),
        (
            "keys only from b",
            GetOptions::new().with_from_key().with_keys_only(),
        ),
        (
            "mod at least 4",
            GetOptions::new().with_all_keys().with_min_mod_revision(4),
        ),
        ("a at revision 2", GetOptions::new().with_revision(2)),
    ];
    for (what, options) in gets {
        let key = if what.starts_with("keys only") {
            "b"
        } else if what == "count only" {
            ""
        } else {
            "a"
        };
        let r = client.get(key, Some(options)).await.unwrap();
        out.push(format!(
            "get {what}: {:?} more {} count {}",
            r.kvs().iter().map(kv_line).collect::<Vec<_>>(),
            r.more(),
            r.count()
        ));
    }
    let txn = Txn::new()
        .when([Compare::value("a", CompareOp::Equal, "2")])
        .and_then([TxnOp::put("t", "yes", None), TxnOp::get("a", None)])
        .or_else([TxnOp::get("a", None)]);
    let r = client.txn(txn).await.unwrap();
    let gets: Vec<Vec<String>> = r
        .op_responses()
        .into_iter()
        .filter_map(|op| match op {
            TxnOpResponse::Get(g) => Some(g.kvs().iter().map(kv_line).collect()),
            _ => None,
        })
        .collect();
    out.push(format!("txn: succeeded {} gets {gets:?}", r.succeeded()));
    // Nested transactions and reads between writes: each read sees the writes before it,
    // every comparison the state before the transaction; a delete of nothing keeps the old
    // revision in its header.
    let prefix = || Some(GetOptions::new().with_prefix());
    let nested = Txn::new()
        .when([Compare::version("n1", CompareOp::Equal, 0)])
        .and_then([
            TxnOp::put("n2", "two", Some(PutOptions::new().with_prev_key())),
            TxnOp::get(
                "n",
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Key, SortOrder::Descend),
                ),
            ),
        ])
        .or_else([TxnOp::put("n3", "three", None)]);
    let txn = Txn::new()
        .when([Compare::value("a", CompareOp::Equal, "2")])
        .and_then([
            TxnOp::get("n", prefix()),
            TxnOp::delete("nothing", None),
            TxnOp::get("n", prefix()),
            TxnOp::put("n1", "one", None),
            TxnOp::get("n", prefix()),
            TxnOp::txn(nested),
            TxnOp::delete("a", Some(DeleteOptions::new().with_prev_key())),
            TxnOp::get(
                "",
                Some(GetOptions::new().with_all_keys().with_count_only()),
            ),
            TxnOp::put("n4", "four", None),
            TxnOp::get("n", prefix()),
        ]);
    let r = client.txn(txn).await.unwrap();
    out.push(format!("nested txn: {}", txn_line(&r)));
    // The outer comparison fails now (a is gone): the failure branch's nested transaction
    // runs, its reads before and after its write.
    let txn = Txn::new()
        .when([Compare::value("a", CompareOp::Equal, "2")])
        .or_else([TxnOp::txn(
            Txn::new()
                .when([Compare::create_revision("n1", CompareOp::Greater, 0)])
                .and_then([
                    TxnOp::get("n1", None),
                    TxnOp::delete(
                        "n",
                        Some(DeleteOptions::new().with_prefix().with_prev_key()),
                    ),
                    TxnOp::get("n", Some(GetOptions::new().with_prefix().with_count_only())),
                ]),
        )]);
    let r = client.txn(txn).await.unwrap();
    out.push(format!("failing txn, nested: {}", txn_line(&r)));
    // Comparisons over key ranges: every key of the range, or an absent key if none exists.
    for (k, v) in [("r/1", "x"), ("r/2", "x"), ("r/3", "y")] {
        client.put(k, v, None).await.unwrap();
    }
    let cases = [
        (
            "r/1..r/3 = x",
            Compare::value("r/1", CompareOp::Equal, "x").with_range("r/3"),
        ),
        (
            "r/ = x",
            Compare::value("r/", CompareOp::Equal, "x").with_prefix(),
        ),
        (
            "r/ version > 0",
            Compare::version("r/", CompareOp::Greater, 0).with_prefix(),
        ),
        (
            "s/ = x",
            Compare::value("s/", CompareOp::Equal, "x").with_prefix(),
        ),
        (
            "s/ version = 0",
            Compare::version("s/", CompareOp::Equal, 0).with_prefix(),
        ),
        (
            "r/ mod < 100",
            Compare::mod_revision("r/", CompareOp::Less, 100).with_prefix(),
        ),
        (
            "all from r/2 created > 1",
            Compare::create_revision("r/2", CompareOp::Greater, 1).with_range("\0"),
        ),
    ];
    for (what, compare) in cases {
        let txn = Txn::new().when([compare]).and_then([TxnOp::get(
            "r/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )]);
        let r = client.txn(txn).await.unwrap();
        out.push(format!("range compare {what}: {}", txn_line(&r)));
    }
    // Deletes may overlap (a later one deletes what is left), in a branch and across a
    // nested transaction; a read between them sees what the first left.
    let txn = Txn::new().and_then([
        TxnOp::delete(
            "r/",
            Some(DeleteOptions::new().with_range("r/3").with_prev_key()),
        ),
        TxnOp::get("r/", Some(GetOptions::new().with_prefix())),
        TxnOp::delete(
            "r/",
            Some(DeleteOptions::new().with_prefix().with_prev_key()),
        ),
        TxnOp::txn(Txn::new().and_then([TxnOp::delete("r/2", None)])),
    ]);
    let r = client.txn(txn).await.unwrap();
    out.push(format!("overlapping deletes: {}", txn_line(&r)));
    let r = client
        .delete(
            "b",
            Some(DeleteOptions::new().with_range("d").with_prev_key()),
        )
        .await
        .unwrap();
    out.push(format!(
        "delete b..d: {} {:?}",
        r.deleted(),
        r.prev_kvs().iter().map(kv_line).collect::<Vec<_>>()
    ));

    // A lease, its key, a keep-alive on the stream, the list, and the revoke.
    let lease = client.lease_grant(30, None).await.unwrap();
    out.push(format!("lease granted ttl {}", lease.ttl()));
    client
        .put("l", "v", Some(PutOptions::new().with_lease(lease.id())))
        .await
        .unwrap();
    let ttl = client
        .lease_time_to_live(
            lease.id(),
            Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
        )
        .await
        .unwrap();
    out.push(format!(
        "lease: granted {} keys {:?}",
        ttl.granted_ttl(),
        ttl.keys()
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect::<Vec<_>>()
    ));
    let (mut keeper, mut answers) = client.lease_keep_alive(lease.id()).await.unwrap();
    keeper.keep_alive().await.unwrap();
    let kept = answers.message().await.unwrap().unwrap();
    out.push(format!("kept alive: ttl {}", kept.ttl()));
    let listed = client.leases().await.unwrap();
    out.push(format!("leases: {}", listed.leases().len()));
    client.lease_revoke(lease.id()).await.unwrap();
    let r = client.get("l", None).await.unwrap();
    out.push(format!("after the revoke: {} keys", r.kvs().len()));
    let gone = client.lease_time_to_live(lease.id(), None).await.unwrap();
    out.push(format!("revoked lease ttl {}", gone.ttl()));

    // A watch: live events with their previous values.
    let mut watch = client
        .watch("w", Some(WatchOptions::new().with_prefix().with_prev_key()))
        .await
        .unwrap();
    let created = watch.message().await.unwrap().unwrap();
    out.push(format!(
        "watch created {} canceled {}",
        created.created(),
        created.canceled()
    ));
    client.put("w1", "x", None).await.unwrap();
    client.put("w1", "y", None).await.unwrap();
    client.delete("w1", None).await.unwrap();
    let mut events = Vec::new();
    while events.len() < 3 {
        let m = watch.message().await.unwrap().unwrap();
        for e in m.events() {
            events.push(format!(
                "{:?} {} prev {:?} (header {})",
                e.event_type(),
                e.kv().map(kv_line).unwrap_or_default(),
                e.prev_kv().map(kv_line),
                rev(m.header())
            ));
        }
    }
    out.extend(events);
    let _ = EventType::Put;

    // History from a revision, then compaction: reads and watches below it are refused.
    let mut history = client
        .watch("a", Some(WatchOptions::new().with_start_revision(2)))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let m = history.message().await.unwrap().unwrap();
        seen.extend(m.events().iter().map(|e| kv_line(e.kv().unwrap())));
    }
    out.push(format!("history of a: {seen:?}"));
    client.compact(5, None).await.unwrap();
    let r = client
        .get("a", Some(GetOptions::new().with_revision(3)))
        .await;
    out.push(format!("get at 3: {:?}", r.map(|_| ()).map_err(status_of)));
    let mut compacted = client
        .watch("a", Some(WatchOptions::new().with_start_revision(3)))
        .await
        .unwrap();
    loop {
        let m = compacted.message().await.unwrap().unwrap();
        if m.canceled() {
            out.push(format!(
                "watch from 3: canceled, compact revision {}, {}",
                m.compact_revision(),
                m.cancel_reason()
            ));
            break;
        }
    }
    // etcd's lock service: a second holder gets the lock once the first unlocks.
    let first = client.lease_grant(30, None).await.unwrap().id();
    let second = client.lease_grant(30, None).await.unwrap().id();
    let held = client
        .lock(
            "job",
            Some(etcd_client::LockOptions::new().with_lease(first)),
        )
        .await
        .unwrap();
    out.push(format!("locked: {}", held.key().starts_with(b"job/")));
    let mut other = client.clone();
    let waiting = tokio::spawn(async move {
        other
            .lock(
                "job",
                Some(etcd_client::LockOptions::new().with_lease(second)),
            )
            .await
            .unwrap()
            .key()
            .to_vec()
    });
    // Whether the second has its key in yet is a race; that it does not hold the lock is not.
    out.push(format!("second holds it too: {}", waiting.is_finished()));
    client.unlock(held.key()).await.unwrap();
    let next = waiting.await.unwrap();
    out.push(format!("second holder: {}", next != held.key()));
    client.unlock(next).await.unwrap();
    // etcd's election service: campaign, leader, proclaim, resign.
    let won = client.campaign("pool", "node-a", first).await.unwrap();
    let key = won.leader().unwrap().clone();
    out.push(format!(
        "campaign: leader name {}",
        String::from_utf8_lossy(key.name())
    ));
    let leader = client.leader("pool").await.unwrap();
    out.push(format!(
        "leader: {:?}",
        leader
            .kv()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
    ));
    client
        .proclaim(
            "node-b",
            Some(etcd_client::ProclaimOptions::new().with_leader(key.clone())),
        )
        .await
        .unwrap();
    let leader = client.leader("pool").await.unwrap();
    out.push(format!(
        "after proclaim: {:?}",
        leader
            .kv()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
    ));
    client
        .resign(Some(etcd_client::ResignOptions::new().with_leader(key)))
        .await
        .unwrap();
    let r = client.leader("pool").await;
    out.push(format!(
        "after resign: {:?}",
        r.map(|_| ()).map_err(status_of)
    ));
    let r = client.put("", "v", None).await;
    out.push(format!("empty key: {:?}", r.map(|_| ()).map_err(status_of)));
    let r = client.lease_revoke(12345).await;
    out.push(format!(
        "unknown lease: {:?}",
        r.map(|_| ()).map_err(status_of)
    ));
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rust_etcd_client_gets_the_same_answers_from_aspen_as_from_etcd() {
    let etcd = EtcdProc::start();
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), 1, ETCD_ARGS).await;
    let endpoint = etcd_addr(&nodes[0]).await;
    let token = bearer(&ticket_text(&nodes), &["kv:write:*", "cluster:admin:*"]);
    let mut real = etcd_client::Client::connect([format!("http://{}", etcd.endpoint)], None)
        .await
        .unwrap();
    let options = etcd_client::ConnectOptions::new().with_user("aspen", token);
    let mut aspen = etcd_client::Client::connect([format!("http://{endpoint}")], Some(options))
        .await
        .unwrap();
    let expected = drive_with_etcd_client(&mut real).await;
    let got = drive_with_etcd_client(&mut aspen).await;
    if std::env::var_os("ASPEN_SHOW_TRANSCRIPT").is_some() {
        eprintln!("{}", expected.join("\n"));
    }
    assert_eq!(got, expected, "etcd-client got other answers from Aspen");
    // What differs by design: the version, and who the members are.
    let status = aspen.status().await.unwrap();
    assert_eq!(status.version(), "3.5.0");
    assert_eq!(status.leader(), status.header().unwrap().member_id());
    let members = aspen.member_list().await.unwrap();
    assert_eq!(members.members().len(), 1);
    assert_eq!(
        members.members()[0].client_urls(),
        [format!("http://{endpoint}")]
    );
}
