//! Node configuration: embedded defaults, optionally a TOML file, then command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Everything `aspen node run` needs.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Where the node keeps its key, store and tickets.
    pub data_dir: PathBuf,
    /// Address to listen on. Loopback with an OS-chosen port by default (nothing leaves the
    /// machine); use e.g. `0.0.0.0:7700` to serve a LAN.
    pub bind: SocketAddr,
    /// Take a snapshot after this many log entries.
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot; followers lagging further get the snapshot.
    pub keep_log_after_snapshot: u64,
    /// A deliberate bug, for the test harness's negative controls only (never from a file).
    #[serde(skip)]
    pub test_fault: Option<TestFault>,
    /// Accept `SetNetFaults` requests (fault tests only; never from a file).
    #[serde(skip)]
    pub allow_fault_injection: bool,
}

/// Deliberate bugs a node can be started with (hidden flag `--unsafe-test-fault`), so the
/// fault tests can show that their checker catches a broken store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TestFault {
    /// Serve linearizable reads from local state, skipping the ReadIndex round.
    StaleReads,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            data_dir: PathBuf::from("aspen-data"),
            bind: "127.0.0.1:0".parse().expect("valid"),
            snapshot_every: 10_000,
            keep_log_after_snapshot: 1_000,
            test_fault: None,
            allow_fault_injection: false,
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("config file {0}: {1}")]
    Parse(PathBuf, String),
    #[error("snapshot_every must be at least 1")]
    SnapshotEvery,
}

impl NodeConfig {
    /// Loads `path` (TOML) over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        let config: NodeConfig = toml::from_str(&text)
            .map_err(|e| ConfigError::Parse(path.to_path_buf(), e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.snapshot_every == 0 {
            return Err(ConfigError::SnapshotEvery);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aspen.toml");
        std::fs::write(&path, "bind = \"127.0.0.1:7000\"\nsnapshot_every = 5\n").unwrap();
        let c = NodeConfig::from_file(&path).unwrap();
        assert_eq!(c.bind, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(c.snapshot_every, 5);
        assert_eq!(c.data_dir, NodeConfig::default().data_dir);
        std::fs::write(&path, "bnid = \"x\"\n").unwrap();
        assert!(matches!(
            NodeConfig::from_file(&path),
            Err(ConfigError::Parse(..))
        ));
        std::fs::write(&path, "snapshot_every = 0\n").unwrap();
        assert!(matches!(
            NodeConfig::from_file(&path),
            Err(ConfigError::SnapshotEvery)
        ));
    }
}
