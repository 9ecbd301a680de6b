//! Node configuration: embedded defaults, optionally a TOML file, then command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// Publishing the cluster record on the Mainline DHT (`[dht]` in the file).
    pub dht: DhtSettings,
    /// Blob replication and garbage collection (`[blobs]` in the file).
    pub blobs: BlobSettings,
    /// Federation with other clusters.
    pub federation: FederationSettings,
    /// Automatic compaction (etcd's `--auto-compaction-mode` and `-retention`): how
    /// `auto_compaction_retention` is read.
    pub auto_compaction_mode: CompactionMode,
    /// History to keep: "0" (off, the default), a time ("90s", "30m", "12h"; a bare number
    /// is hours, as in etcd) in periodic mode, or a number of revisions in revision mode.
    pub auto_compaction_retention: String,
    /// Serve Prometheus metrics (`GET /metrics`) on this address. Off by default; a
    /// non-loopback address needs `metrics_token_file`.
    pub metrics: Option<SocketAddr>,
    /// A file holding the bearer token scrapers must present to `metrics`.
    pub metrics_token_file: Option<PathBuf>,
    /// Serve automerge-repo's WebSocket sync protocol on this address (off by default).
    /// Every connection must present a bearer token (`?token=` in the URL).
    pub automerge_repo: Option<SocketAddr>,
    /// Serve etcd's v3 gRPC API on this address (off by default). Every call presents a
    /// bearer token (etcd's `token` metadata; etcdctl `--user NAME:TOKEN`).
    pub etcd_api: Option<SocketAddr>,
    /// Microseconds the async worker keeps spinning after each request instead of parking
    /// (0: off; at most 10,000). See `aspen node run --help`.
    pub busy_poll_us: u64,
    /// How often the leader checks (default: a tenth of the retention in periodic mode, at
    /// least 100 ms and at most an hour; 5 minutes in revision mode). Tests only.
    #[serde(skip)]
    pub auto_compaction_every: Option<Duration>,
    /// A deliberate bug, for the test harness's negative controls only (never from a file).
    #[serde(skip)]
    pub test_fault: Option<TestFault>,
    /// Accept `SetNetFaults` requests (fault tests only; never from a file).
    #[serde(skip)]
    pub allow_fault_injection: bool,
    /// The cluster this node was told to join (`--join KEY`): before it is a member, it
    /// takes Raft traffic only from nodes certified by this key.
    #[serde(skip)]
    pub join: Option<aspen_trust::ClusterKey>,
}

/// How a node uses the Mainline DHT. The leader publishes the cluster record there so clients
/// can find the cluster by its key alone.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DhtSettings {
    /// Use the DHT at all. Off: the cluster is reachable only by tickets.
    pub enabled: bool,
    /// `host:port` bootstrap nodes that REPLACE the public Mainline bootstrap nodes (a
    /// private DHT). Empty: the public ones.
    pub bootstrap: Vec<String>,
    /// Per-request timeout of DHT queries, in milliseconds (a lookup takes about this long).
    pub request_timeout_ms: u64,
    /// How often the leader puts the record again, in seconds (DHT nodes drop items after a
    /// few hours).
    pub republish_interval_secs: u64,
    /// How long a published record is valid, in seconds; the leader re-signs it after half.
    pub record_validity_secs: u64,
}

/// How a node keeps blobs. Every member should use the same `replicas`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BlobSettings {
    /// How many members should hold each referenced blob (capped at the cluster size).
    pub replicas: usize,
    /// How long a blob nothing references is kept before it is deleted, in seconds (a fresh
    /// upload without a tag, or a blob whose last tag was removed).
    pub gc_grace_secs: u64,
    /// How often unreferenced blobs are looked for, in seconds.
    pub gc_interval_secs: u64,
}

impl Default for BlobSettings {
    fn default() -> Self {
        BlobSettings {
            replicas: aspen_blobs::limits::DEFAULT_REPLICAS,
            gc_grace_secs: 60 * 60,
            gc_interval_secs: 60,
        }
    }
}

impl BlobSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.replicas == 0 || self.replicas > aspen_blobs::limits::MAX_REPLICAS {
            return Err(ConfigError::Blobs(format!(
                "replicas must be between 1 and {}",
                aspen_blobs::limits::MAX_REPLICAS
            )));
        }
        if self.gc_interval_secs == 0 {
            return Err(ConfigError::Blobs(
                "gc_interval_secs must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// How this cluster pulls what it follows from other clusters.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FederationSettings {
    /// How often the leader pulls each follow, in milliseconds (spread by +-25% jitter; a
    /// failing origin is retried with capped exponential backoff instead).
    pub pull_interval_ms: u64,
}

impl Default for FederationSettings {
    fn default() -> Self {
        FederationSettings {
            pull_interval_ms: aspen_federation::schedule::DEFAULT_PULL_INTERVAL.as_millis() as u64,
        }
    }
}

impl FederationSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(100..=24 * 60 * 60 * 1000).contains(&self.pull_interval_ms) {
            return Err(ConfigError::Federation(
                "pull_interval_ms must be between 100 and 86400000 (one day)".into(),
            ));
        }
        Ok(())
    }

    pub fn schedule(&self) -> aspen_federation::PullSchedule {
        aspen_federation::PullSchedule {
            interval: Duration::from_millis(self.pull_interval_ms),
            ..Default::default()
        }
    }
}

/// Shortest republish interval accepted (DHT puts are not free for the network).
pub const MIN_REPUBLISH_INTERVAL: Duration = Duration::from_secs(1);

impl Default for DhtSettings {
    fn default() -> Self {
        DhtSettings {
            enabled: true,
            bootstrap: Vec::new(),
            request_timeout_ms: 1000,
            republish_interval_secs: 30 * 60,
            record_validity_secs: 7 * 24 * 60 * 60,
        }
    }
}

impl DhtSettings {
    /// The discovery crate's configuration (`None` when the DHT is off).
    pub fn dht_config(&self) -> Option<aspen_discovery::DhtConfig> {
        self.enabled.then(|| aspen_discovery::DhtConfig {
            bootstrap: (!self.bootstrap.is_empty()).then(|| self.bootstrap.clone()),
            request_timeout: Duration::from_millis(self.request_timeout_ms),
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.request_timeout_ms == 0 || self.request_timeout_ms > 60_000 {
            return Err(ConfigError::Dht(
                "request_timeout_ms must be between 1 and 60000".into(),
            ));
        }
        if self.republish_interval_secs < MIN_REPUBLISH_INTERVAL.as_secs() {
            return Err(ConfigError::Dht(
                "republish_interval_secs must be at least 1".into(),
            ));
        }
        if self.record_validity_secs < 2 * self.republish_interval_secs {
            return Err(ConfigError::Dht(
                "record_validity_secs must be at least twice republish_interval_secs".into(),
            ));
        }
        for b in &self.bootstrap {
            if !b.contains(':') {
                return Err(ConfigError::Dht(format!(
                    "bootstrap node '{b}' must be host:port"
                )));
            }
        }
        Ok(())
    }
}

/// Deliberate bugs a node can be started with (hidden flag `--unsafe-test-fault`), so the
/// fault tests can show that their checker catches a broken store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TestFault {
    /// Serve linearizable reads from local state, skipping the ReadIndex round.
    StaleReads,
    /// Flip one byte of every blob sent to a peer (a lying holder).
    CorruptBlobSends,
    /// Send the first half of every blob sent to a peer, then nothing (a server that stalls
    /// mid-transfer; the federation resume test kills it there).
    StallBlobSends,
    /// Federation: flip a byte in every change served to a follower (in the first blob hash
    /// of a tag list).
    FedFlipByte,
    /// Federation: serve the first manifest ever signed instead of the current one (a replay).
    FedOldManifest,
    /// Federation: sign manifests with a key that is not the cluster's.
    FedWrongKey,
    /// Federation: add a change (or a tag) nobody signed for to what is served.
    FedExtraChange,
    /// Federation: at every check for changed exports, also announce a manifest signed by
    /// another key and the previously announced one again (a replay).
    FedForgedAnnouncements,
    /// Watches: a watch reopened from a revision (a resume) starts one revision later,
    /// skipping that revision's events.
    WatchSkipOnResume,
    /// Membership: a node that belongs to no cluster yet exits (as if killed) when the first
    /// log entries reach it, before storing them: the moment between `cluster add`'s
    /// introduction and the new member's first entry.
    CrashBeforeFirstEntry,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            data_dir: PathBuf::from("aspen-data"),
            bind: "127.0.0.1:0".parse().expect("valid"),
            snapshot_every: 10_000,
            keep_log_after_snapshot: 1_000,
            dht: DhtSettings::default(),
            blobs: BlobSettings::default(),
            federation: FederationSettings::default(),
            auto_compaction_mode: CompactionMode::Periodic,
            auto_compaction_retention: "0".into(),
            auto_compaction_every: None,
            metrics: None,
            metrics_token_file: None,
            automerge_repo: None,
            etcd_api: None,
            busy_poll_us: crate::busy_poll::DEFAULT_WINDOW.as_micros() as u64,
            test_fault: None,
            allow_fault_injection: false,
            join: None,
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
    #[error("dht: {0}")]
    Dht(String),
    #[error("blobs: {0}")]
    Blobs(String),
    #[error("federation: {0}")]
    Federation(String),
    #[error("busy_poll_us is {0}; at most {max} (microseconds)", max = crate::busy_poll::MAX_WINDOW.as_micros())]
    BusyPoll(u64),
    #[error("auto compaction retention {0:?}: {1}")]
    AutoCompaction(String, &'static str),
}

/// How the automatic compaction retention is read.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CompactionMode {
    /// Keep the history of the last RETENTION (a time).
    #[default]
    Periodic,
    /// Keep the last RETENTION revisions.
    Revision,
}

/// What the leader's compaction loop does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoCompaction {
    Off,
    /// Every `every`, compact to the revision the store had `retention` ago.
    Periodic {
        retention: Duration,
        every: Duration,
    },
    /// Every `every`, compact to the current revision minus `retention`.
    Revision {
        retention: u64,
        every: Duration,
    },
}

/// Default check interval of revision mode (as etcd's).
pub const REVISION_COMPACTION_EVERY: Duration = Duration::from_secs(5 * 60);

/// Parses a periodic retention: a number with an optional unit s, m or h (bare: hours).
fn parse_retention(text: &str) -> Result<Duration, &'static str> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&text[..i], &text[i..]),
        None => (text, "h"),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| "expected a number with an optional unit s, m or h (e.g. 30m)")?;
    let secs = match unit {
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err("the unit must be s, m or h"),
    };
    if !secs.is_finite() || !(0.0..=10.0 * 365.0 * 24.0 * 3600.0).contains(&secs) {
        return Err("must be between 0 and ten years");
    }
    Ok(Duration::from_secs_f64(secs))
}

impl NodeConfig {
    /// The automatic compaction policy the settings describe.
    pub fn auto_compaction(&self) -> Result<AutoCompaction, ConfigError> {
        let text = &self.auto_compaction_retention;
        let err = |why| ConfigError::AutoCompaction(text.clone(), why);
        match self.auto_compaction_mode {
            CompactionMode::Periodic => {
                let retention = parse_retention(text).map_err(err)?;
                if retention.is_zero() {
                    return Ok(AutoCompaction::Off);
                }
                let every = self.auto_compaction_every.unwrap_or_else(|| {
                    (retention / 10).clamp(Duration::from_millis(100), Duration::from_secs(3600))
                });
                Ok(AutoCompaction::Periodic { retention, every })
            }
            CompactionMode::Revision => {
                let retention: u64 = text
                    .trim()
                    .parse()
                    .map_err(|_| err("expected a number of revisions"))?;
                if retention == 0 {
                    return Ok(AutoCompaction::Off);
                }
                let every = self
                    .auto_compaction_every
                    .unwrap_or(REVISION_COMPACTION_EVERY);
                Ok(AutoCompaction::Revision { retention, every })
            }
        }
    }
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
        if u128::from(self.busy_poll_us) > crate::busy_poll::MAX_WINDOW.as_micros() {
            return Err(ConfigError::BusyPoll(self.busy_poll_us));
        }
        self.blobs.validate()?;
        self.federation.validate()?;
        self.auto_compaction()?;
        self.dht.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_poll_window_is_bounded() {
        let with = |us| NodeConfig {
            busy_poll_us: us,
            ..NodeConfig::default()
        };
        assert_eq!(NodeConfig::default().busy_poll_us, 300);
        with(0).validate().expect("0 turns it off");
        with(10_000).validate().expect("the largest window");
        let e = with(10_001).validate().unwrap_err();
        assert!(matches!(e, ConfigError::BusyPoll(10_001)), "{e}");
        assert!(e.to_string().contains("at most 10000"), "{e}");
    }

    #[test]
    fn auto_compaction_settings_parse_like_etcd() {
        let policy = |mode, retention: &str| {
            NodeConfig {
                auto_compaction_mode: mode,
                auto_compaction_retention: retention.into(),
                ..NodeConfig::default()
            }
            .auto_compaction()
        };
        use CompactionMode::*;
        assert_eq!(policy(Periodic, "0").unwrap(), AutoCompaction::Off);
        assert_eq!(
            policy(Periodic, "1").unwrap(),
            AutoCompaction::Periodic {
                retention: Duration::from_secs(3600),
                every: Duration::from_secs(360)
            }
        );
        assert_eq!(
            policy(Periodic, "30m").unwrap(),
            AutoCompaction::Periodic {
                retention: Duration::from_secs(1800),
                every: Duration::from_secs(180)
            }
        );
        assert_eq!(
            policy(Periodic, "0.5s").unwrap(),
            AutoCompaction::Periodic {
                retention: Duration::from_millis(500),
                every: Duration::from_millis(100)
            }
        );
        assert_eq!(
            policy(Revision, "1000").unwrap(),
            AutoCompaction::Revision {
                retention: 1000,
                every: REVISION_COMPACTION_EVERY
            }
        );
        for (mode, bad) in [
            (Periodic, "abc"),
            (Periodic, "5x"),
            (Periodic, "-1h"),
            (Periodic, "1e300h"),
            (Revision, "1h"),
            (Revision, "-3"),
        ] {
            assert!(
                matches!(policy(mode, bad), Err(ConfigError::AutoCompaction(..))),
                "{bad}"
            );
        }
    }

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
        std::fs::write(
            &path,
            "[dht]\nbootstrap = [\"127.0.0.1:6881\"]\nrepublish_interval_secs = 60\n",
        )
        .unwrap();
        let c = NodeConfig::from_file(&path).unwrap();
        assert_eq!(c.dht.bootstrap, vec!["127.0.0.1:6881".to_string()]);
        assert!(c.dht.enabled);
        assert_eq!(c.dht.republish_interval_secs, 60);
        std::fs::write(&path, "[dht]\nbootstrap = [\"nohost\"]\n").unwrap();
        assert!(matches!(
            NodeConfig::from_file(&path),
            Err(ConfigError::Dht(_))
        ));
        std::fs::write(&path, "snapshot_every = 0\n").unwrap();
        assert!(matches!(
            NodeConfig::from_file(&path),
            Err(ConfigError::SnapshotEvery)
        ));
    }
}
