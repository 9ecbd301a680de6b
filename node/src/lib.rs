//! The `aspen` node and CLI. See ARCHITECTURE.md for the map.

pub mod bench;
pub mod busy_poll;
pub mod cli;
pub mod config;
pub mod keyfile;
pub mod resolve;
pub mod run;
pub mod server;
pub mod up;
