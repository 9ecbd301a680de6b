//! The `aspen` node and CLI. See ARCHITECTURE.md for the map.

pub mod auth_cli;
pub mod bench;
pub mod blob_cli;
pub mod cli;
pub mod config;
pub mod doc_cli;
pub mod keyfile;
pub mod namespace_cli;
pub mod resolve;
pub mod run;
pub mod server;
pub mod up;
