//! The node's integration tests, one binary for all of them (one link instead of eight): real
//! `aspen` processes and in-process nodes on loopback. One group:
//! `cargo test -p aspen-node --test integration faults::`.

mod common;

mod access;
mod announcements;
mod automerge_repo;
mod bad_input;
mod blobs;
mod coordination;
mod discovery;
mod docs;
mod e2e;
mod etcd_api;
mod examples;
mod faults;
mod federation;
mod flake;
mod leases;
mod metrics;
mod mirrors;
mod namespaces;
mod watch;
