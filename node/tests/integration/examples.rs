//! The runnable examples under `examples/`, each run as its README says (with the binary
//! under test), and their outcome checked.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::aspen_bin;

/// Longest an example may take here (they take seconds; the machine may be loaded).
const EXAMPLE_DEADLINE: Duration = Duration::from_secs(300);

/// An example script in its own process group, killed with everything it started if the test
/// ends first.
struct Example {
    child: std::process::Child,
}

impl Drop for Example {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-9", "--", &group]).status();
        let _ = self.child.wait();
    }
}

/// Runs `examples/NAME/run.sh` to completion; returns its standard output.
fn run_example(name: &str) -> String {
    run_example_with(name, &[], &[])
}

/// Runs `examples/NAME/run.sh ARGS...` with more environment to completion; returns its
/// standard output.
fn run_example_with(name: &str, args: &[&str], env: &[(&str, &std::path::Path)]) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tempfile::NamedTempFile::new().unwrap();
    let err = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new("bash")
        .arg(root.join("examples").join(name).join("run.sh"))
        .args(args)
        .envs(env.iter().copied())
        .env("ASPEN_BIN", aspen_bin())
        .stdin(Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(err.reopen().unwrap())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut example = Example { child };
    let started = Instant::now();
    let status = loop {
        if let Some(status) = example.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < EXAMPLE_DEADLINE,
            "example {name} still running after {EXAMPLE_DEADLINE:?}; stderr:\n{}",
            std::fs::read_to_string(err.path()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(out.path()).unwrap();
    assert!(
        status.success(),
        "example {name} failed ({status}); stdout:\n{stdout}\nstderr:\n{}",
        std::fs::read_to_string(err.path()).unwrap_or_default()
    );
    stdout
}

#[test]
fn discover_finds_a_cluster_by_key_alone_and_reads_from_it() {
    let out = run_example("discover");
    assert!(
        out.contains("read by key alone: greeting = hello from the site"),
        "{out}"
    );
    assert!(
        out.contains("from the dht"),
        "the record came from the DHT:\n{out}"
    );
    assert!(out.trim_end().ends_with("discover: OK"), "{out}");
}

#[test]
fn edge_sites_keep_working_apart_and_converge() {
    let out = run_example("edge-sites");
    let last = out.rsplit("both sites: ").next().unwrap();
    for want in [
        "\"tents\": 10",
        "\"radios\": 3",
        "\"water\": 35",
        "\"blankets\": 80",
    ] {
        assert!(
            last.contains(want),
            "missing {want} in the converged document:\n{out}"
        );
    }
    assert!(out.trim_end().ends_with("edge-sites: OK"), "{out}");
}

#[test]
fn forge_clones_from_its_own_cluster_and_refuses_a_rewritten_ref() {
    if Command::new("git").arg("--version").output().is_err() {
        panic!("the forge example needs git on the PATH (Debian: apt install git)");
    }
    let out = run_example("forge");
    assert!(
        out.contains("B's clone: 3 commits"),
        "B cloned A's repository:\n{out}"
    );
    assert!(
        out.contains("refused: data rejected: the tag list does not match the signed manifest"),
        "C refused the rewritten ref:\n{out}"
    );
    assert!(out.contains("through mirror"), "{out}");
    assert!(out.trim_end().ends_with("forge: OK"), "{out}");
}

/// The shared-list page in a real headless Chromium: two pages, each syncing through another
/// member, see each other's items. The screenshots' paths are in the test's output.
#[test]
fn shared_list_pages_on_two_members_see_each_others_items() {
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("shared-list");
    std::fs::create_dir_all(&shots).unwrap();
    let out = run_example_with("shared-list", &["--check"], &[("SCREENSHOT_DIR", &shots)]);
    println!("{out}");
    assert!(out.trim_end().ends_with("shared-list: OK"), "{out}");
    assert!(
        out.contains(r#"["milk (from member A)","bread (from member B)"]"#),
        "{out}"
    );
    for page in ["a", "b"] {
        let shot = shots.join(format!("shared-list-{page}.png"));
        let png = std::fs::read(&shot).unwrap();
        assert!(
            png.starts_with(b"\x89PNG"),
            "{} is not a PNG",
            shot.display()
        );
        println!("screenshot: {}", shot.display());
    }
}
