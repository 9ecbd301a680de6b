//! etcd's v3 API (`--etcd-api`), checked against etcd itself: the same etcdctl 3.5 commands
//! run against a real etcd 3.5 (installed by `scripts/install-etcd.sh`) and against Aspen,
//! and their outputs compared line by line, revisions included. Only what differs between
//! any two clusters is masked: the cluster and member ids and the Raft term.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

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

/// A port the OS had free a moment ago (etcd cannot report a port it picked itself).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", stdout(&out), stderr(&out));
    (text, out.status.success())
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

/// A bearer token from the admin, carrying each of `allow`.
fn bearer(ticket: &str, allow: &[&str]) -> String {
    let mut args = vec!["auth", "token", "issue", "--bearer", "--ttl", "1h"];
    for a in allow {
        args.extend(["--allow", a]);
    }
    let out = cli(&args, Some(ticket));
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_string()
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
    let expected = transcript(&etcd.endpoint, None, SCRIPT);
    let got = transcript(&endpoint, Some(&user), SCRIPT);
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
