//! Generates etcd's v3 API (messages, servers and clients) from etcd's own .proto files.
//!
//! The files come from the `etcd-client` crate's sources, which Cargo.lock pins and which are
//! never compiled (a `cfg(any())` dependency): `cargo metadata` says where Cargo unpacked it.
//! `protoc` parses them: the one `.cargo/config.toml` points `PROTOC` at (`scripts/protoc`, the
//! binary of the pinned protoc-bin-vendored crate), so nothing has to be installed. The same
//! protoc builds `etcd-client` itself for the tests; a pure-Rust parser (protox) cost a clean
//! build ~55 s of CPU for its own dependencies.

use std::path::PathBuf;
use std::process::Command;

/// The .proto files compiled, relative to etcd-client's `proto/` directory.
const PROTOS: [&str; 5] = [
    "etcd/api/authpb/auth.proto",
    "etcd/api/mvccpb/kv.proto",
    "etcd/api/etcdserverpb/rpc.proto",
    "etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto",
    "etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=Cargo.toml");
    println!("cargo:rerun-if-env-changed=PROTOC");
    let root = proto_root();
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Calls a service does not implement answer "unimplemented" (the node names the
        // ones it refuses on purpose, with a reason).
        .generate_default_stubs(true)
        .compile_protos(&files, std::slice::from_ref(&root))
        .unwrap_or_else(|e| {
            panic!(
                "compiling etcd's .proto files under {} with protoc (PROTOC={:?}): {e}",
                root.display(),
                std::env::var("PROTOC").ok()
            )
        });
}

/// etcd-client's `proto/` directory, as unpacked by Cargo.
fn proto_root() -> PathBuf {
    let cargo = std::env::var("CARGO").expect("CARGO is set for build scripts");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"))
        .join("Cargo.toml");
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(&manifest)
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed (it finds etcd-client's .proto files): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("cargo metadata's JSON");
    let package = meta["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "etcd-client"))
        .expect("etcd-client is in Cargo.lock (a cfg(any()) dependency of this crate)");
    let manifest = package["manifest_path"]
        .as_str()
        .expect("etcd-client's manifest path");
    let root = PathBuf::from(manifest)
        .parent()
        .expect("a directory")
        .join("proto");
    assert!(
        root.is_dir(),
        "etcd-client's proto/ directory is missing: {}",
        root.display()
    );
    root
}
