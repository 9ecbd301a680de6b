//! etcd's v3 API for Aspen.
//!
//! etcd's tools and client libraries (etcdctl, the Go, Python, Java and Rust clients) speak
//! gRPC with the messages of etcd's `.proto` files. This crate holds:
//!
//! - [`pb`]: those messages, and the gRPC servers and clients, generated at build time from
//!   etcd's own `.proto` files (build.rs);
//! - [`EtcdError`]: etcd's error statuses, with the exact codes and messages etcd sends,
//!   because clients recognise errors by their message text;
//! - [`revision`]: how etcd's revision numbers map to the store's;
//! - [`range`], [`txn`] and [`watch`]: the translation of etcd's reads, transactions and
//!   watches into the store's requests, and of the store's answers back. Pure: no I/O, no
//!   clock.
//!
//! The node serves these (`node/src/server/etcd/`); this crate decides what a request means.

pub mod error;
pub mod range;
pub mod revision;
pub mod txn;
pub mod watch;

pub use error::EtcdError;

/// etcd's messages and gRPC services, generated from its `.proto` files.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod v3lockpb {
        tonic::include_proto!("v3lockpb");
    }
    pub mod v3electionpb {
        tonic::include_proto!("v3electionpb");
    }
}
