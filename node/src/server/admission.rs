//! Who a node that belongs to no cluster yet will take Raft traffic from.
//!
//! An uninitialized node would otherwise follow whoever sends it `AppendEntries` first: a
//! stranger who races the operator could make it a member of the stranger's cluster. So a
//! fresh node serves Raft only to callers that *introduced* themselves with a certificate
//! (the cluster key signing the caller's node key) for the cluster the node expects:
//!
//! - started with `--join KEY`, it expects cluster `KEY`;
//! - otherwise it expects nobody until an introduction carries its bootstrap secret
//!   (`DATA_DIR/bootstrap.secret`, 0600), which the operator handed to `aspen cluster add`;
//!   the certificate in that introduction names the cluster it then expects, so later
//!   leaders of the same cluster can introduce themselves without the secret.
//!
//! The cluster an introduction with the secret named is written to `DATA_DIR/joining.cluster`
//! (fsynced) before the introduction is answered. A node killed after `aspen cluster add`
//! made it a member but before any log entry reached its disk would otherwise come back
//! expecting nobody, refuse every member's introduction, and leave the cluster one voter short
//! for good.
//!
//! Once the node applies a membership that includes it, membership alone decides (see
//! `Peers::serve`).

use std::path::Path;
use std::sync::Mutex;

use aspen_trust::{ClusterKey, NodeCertificate};

/// Most callers an uninitialized node remembers as introduced (a cluster has at most 7
/// members; leaders may change a few times while the node catches up).
pub const MAX_INTRODUCED: usize = 32;

/// File in the data directory naming the cluster an operator's introduction vouched for.
pub const JOINING_FILE: &str = "joining.cluster";

/// Why the joining file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JoiningFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} does not hold a cluster key: {why}")]
    Format { path: String, why: String },
}

/// The cluster a previous run was introduced to with the bootstrap secret, if any.
/// Blocking: call it off the executor.
pub fn load_joining(dir: &Path) -> Result<Option<ClusterKey>, JoiningFileError> {
    let path = dir.join(JOINING_FILE);
    let shown = || path.display().to_string();
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            text.trim()
                .parse()
                .map(Some)
                .map_err(
                    |e: aspen_trust::ClusterKeyParseError| JoiningFileError::Format {
                        path: shown(),
                        why: e.to_string(),
                    },
                )
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(JoiningFileError::Read {
            path: shown(),
            source,
        }),
    }
}

/// Records `cluster` as the one this node joins (write, fsync, rename, fsync the directory).
/// Blocking: call it off the executor.
pub fn save_joining(dir: &Path, cluster: &ClusterKey) -> Result<(), JoiningFileError> {
    use std::io::Write;
    let path = dir.join(JOINING_FILE);
    let tmp = dir.join(format!("{JOINING_FILE}.tmp"));
    let write = |source| JoiningFileError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::File::create(&tmp).map_err(write)?;
    file.write_all(format!("{cluster}\n").as_bytes())
        .map_err(write)?;
    file.sync_all().map_err(write)?;
    std::fs::rename(&tmp, &path).map_err(write)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write)
}

/// Why an introduction was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IntroduceError {
    #[error("bad certificate: {0}")]
    Certificate(String),
    #[error("wrong bootstrap secret")]
    WrongSecret,
    #[error(
        "this node expects no cluster yet: `aspen cluster add` must pass its bootstrap secret"
    )]
    NotExpecting,
    #[error("this node is joining cluster {expected}, not {found}")]
    OtherCluster {
        expected: ClusterKey,
        found: ClusterKey,
    },
}

#[derive(Debug, Default)]
struct State {
    expected: Option<ClusterKey>,
    introduced: Vec<[u8; 32]>,
}

/// An uninitialized node's admission state.
#[derive(Debug)]
pub struct Admission {
    bootstrap_secret: [u8; 32],
    state: Mutex<State>,
    /// Where [`JOINING_FILE`] is kept (none in unit tests).
    dir: Option<std::path::PathBuf>,
}

impl Admission {
    pub fn new(bootstrap_secret: [u8; 32], join: Option<ClusterKey>) -> Self {
        Admission {
            bootstrap_secret,
            state: Mutex::new(State {
                expected: join,
                introduced: Vec::new(),
            }),
            dir: None,
        }
    }

    /// Keeps the vouched-for cluster in `dir` (see [`save_joining`]).
    pub fn persisted_in(mut self, dir: std::path::PathBuf) -> Self {
        self.dir = Some(dir);
        self
    }

    /// The directory [`JOINING_FILE`] is kept in.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Whether `secret` is this node's bootstrap secret (constant time).
    pub fn secret_matches(&self, secret: &[u8; 32]) -> bool {
        let diff = self
            .bootstrap_secret
            .iter()
            .zip(secret)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        diff == 0
    }

    pub fn is_introduced(&self, caller: &[u8; 32]) -> bool {
        self.state
            .lock()
            .expect("admission lock")
            .introduced
            .contains(caller)
    }

    /// Checks `caller`'s introduction (its certificate and maybe this node's secret) and
    /// remembers it.
    pub fn introduce(
        &self,
        caller: &[u8; 32],
        certificate: &[u8],
        secret: Option<&[u8; 32]>,
        now: u64,
    ) -> Result<ClusterKey, IntroduceError> {
        let cert = NodeCertificate::decode(certificate)
            .map_err(|e| IntroduceError::Certificate(e.to_string()))?;
        cert.verify(&cert.cluster, caller, now)
            .map_err(|e| IntroduceError::Certificate(e.to_string()))?;
        let mut state = self.state.lock().expect("admission lock");
        match (secret, state.expected) {
            (Some(s), _) if !self.secret_matches(s) => return Err(IntroduceError::WrongSecret),
            // The operator vouches for this cluster (it may override an earlier one).
            (Some(_), _) => state.expected = Some(cert.cluster),
            (None, Some(expected)) if expected != cert.cluster => {
                return Err(IntroduceError::OtherCluster {
                    expected,
                    found: cert.cluster,
                })
            }
            (None, Some(_)) => {}
            (None, None) => return Err(IntroduceError::NotExpecting),
        }
        if !state.introduced.contains(caller) {
            if state.introduced.len() >= MAX_INTRODUCED {
                state.introduced.remove(0);
            }
            state.introduced.push(*caller);
        }
        Ok(cert.cluster)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aspen_trust::ClusterSecretKey;

    fn cert(cluster: &ClusterSecretKey, node: [u8; 32]) -> Vec<u8> {
        NodeCertificate::issue(cluster, node, 1000)
            .encode()
            .to_vec()
    }

    #[test]
    fn a_fresh_node_admits_only_with_its_secret_then_the_same_cluster() {
        let a = Admission::new([7; 32], None);
        let cluster = ClusterSecretKey::generate();
        let other = ClusterSecretKey::generate();
        let leader = [1; 32];
        // No secret, no expectation: refused.
        assert_eq!(
            a.introduce(&leader, &cert(&cluster, leader), None, 10),
            Err(IntroduceError::NotExpecting)
        );
        assert_eq!(
            a.introduce(&leader, &cert(&cluster, leader), Some(&[8; 32]), 10),
            Err(IntroduceError::WrongSecret)
        );
        assert!(!a.is_introduced(&leader));
        a.introduce(&leader, &cert(&cluster, leader), Some(&[7; 32]), 10)
            .unwrap();
        assert!(a.is_introduced(&leader));
        // A later leader of the same cluster needs no secret; another cluster is refused.
        let next = [2; 32];
        a.introduce(&next, &cert(&cluster, next), None, 10).unwrap();
        let stranger = [3; 32];
        assert!(matches!(
            a.introduce(&stranger, &cert(&other, stranger), None, 10),
            Err(IntroduceError::OtherCluster { .. })
        ));
        // A certificate for someone else's key, or an expired one, proves nothing.
        assert!(matches!(
            a.introduce(&stranger, &cert(&cluster, next), None, 10),
            Err(IntroduceError::Certificate(_))
        ));
        assert!(matches!(
            a.introduce(&next, &cert(&cluster, next), None, 1000),
            Err(IntroduceError::Certificate(_))
        ));
        assert!(!a.is_introduced(&stranger));
    }

    #[test]
    fn the_vouched_cluster_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_joining(dir.path()).unwrap(), None);
        let cluster = ClusterSecretKey::generate();
        save_joining(dir.path(), &cluster.public()).unwrap();
        let loaded = load_joining(dir.path()).unwrap();
        assert_eq!(loaded, Some(cluster.public()));
        // The restarted node takes a member of that cluster without the secret again.
        let a = Admission::new([7; 32], loaded);
        a.introduce(&[1; 32], &cert(&cluster, [1; 32]), None, 10)
            .unwrap();
        std::fs::write(dir.path().join(JOINING_FILE), "not a key").unwrap();
        assert!(matches!(
            load_joining(dir.path()),
            Err(JoiningFileError::Format { .. })
        ));
    }

    #[test]
    fn a_joining_node_expects_its_cluster() {
        let cluster = ClusterSecretKey::generate();
        let a = Admission::new([7; 32], Some(cluster.public()));
        let leader = [1; 32];
        a.introduce(&leader, &cert(&cluster, leader), None, 10)
            .unwrap();
        let other = ClusterSecretKey::generate();
        assert!(a
            .introduce(&[2; 32], &cert(&other, [2; 32]), None, 10)
            .is_err());
    }
}
