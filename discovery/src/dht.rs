//! The DHT client: fetch, publish (with compare-and-swap) and republish cluster records.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::time::Duration;

use aspen_trust::{
    ClusterKey, ClusterRecord, ClusterSecretKey, RecordError, SignedRecord, MAX_RECORD_BYTES,
    RECORD_SALT,
};
use futures::StreamExt;
use mainline::async_dht::AsyncDht;
use mainline::errors::{ConcurrencyError, PutMutableError, PutQueryError};
use mainline::{Dht, MutableItem, RequestFilter, RequestSpecific, ServerSettings};
use tracing::debug;

/// Default per-request timeout of DHT queries.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// How many times [`ClusterDht::publish`] reads and writes before giving up on conflicts.
pub const MAX_PUBLISH_ATTEMPTS: u32 = 5;

/// A single DHT operation is abandoned after this many request timeouts (at least
/// [`MIN_QUERY_DEADLINE`]). Mainline's own timeouts normally end a query long before: this is
/// a safety net so no caller ever waits unboundedly.
pub const QUERY_DEADLINE_FACTOR: u32 = 30;

/// Lower bound of the safety-net deadline (see [`QUERY_DEADLINE_FACTOR`]).
pub const MIN_QUERY_DEADLINE: Duration = Duration::from_secs(10);

/// How to reach the DHT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhtConfig {
    /// None: the public Mainline bootstrap nodes. Some(list of "host:port"): ONLY these (a
    /// private DHT); the list replaces the defaults.
    pub bootstrap: Option<Vec<String>>,
    /// Per-request timeout of DHT queries (a lookup waits about this long). Default 1 s.
    pub request_timeout: Duration,
}

impl Default for DhtConfig {
    fn default() -> Self {
        DhtConfig {
            bootstrap: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// Why a DHT operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DhtError {
    #[error("the DHT bootstrap list is empty (use None for the public bootstrap nodes)")]
    NoBootstrap,
    #[error("DHT bootstrap address {addr:?} is not usable: {reason}")]
    BadBootstrap { addr: String, reason: String },
    #[error("could not start the DHT client: {0}")]
    Start(#[source] std::io::Error),
    #[error("DHT unreachable: no DHT node answered ({queried} queried)")]
    Unreachable { cluster: ClusterKey, queried: u32 },
    #[error("DHT {what} for cluster {cluster} did not finish within {after:?}")]
    Deadline {
        cluster: ClusterKey,
        what: &'static str,
        after: Duration,
    },
    #[error("DHT item for cluster {cluster} is malformed: {reason}")]
    Malformed { cluster: ClusterKey, reason: String },
    #[error("cannot publish a record for cluster {cluster}: {source}")]
    Record {
        cluster: ClusterKey,
        #[source]
        source: RecordError,
    },
    #[error("cannot publish cluster {cluster}: seq {seq} cannot be incremented")]
    SeqExhausted { cluster: ClusterKey, seq: i64 },
    #[error("storing the record for cluster {cluster} on the DHT failed: {source}")]
    Put {
        cluster: ClusterKey,
        #[source]
        source: PutQueryError,
    },
    #[error(
        "gave up publishing cluster {cluster} after {attempts} conflicting writes (last: {last})"
    )]
    Conflict {
        cluster: ClusterKey,
        attempts: u32,
        #[source]
        last: ConcurrencyError,
    },
    #[error("republishing seq {seq} of cluster {cluster} refused: the DHT holds a newer record")]
    Superseded { cluster: ClusterKey, seq: i64 },
    #[error("the DHT client stopped unexpectedly: {0}")]
    Stopped(String),
}

/// A DHT client (mainline in client mode: it never answers other nodes' requests, not even
/// after mainline's "adaptive mode" would have turned it into a server).
///
/// Cheap to clone; all clones share one UDP socket and one mainline actor thread, which stops
/// when the last clone is dropped. The async methods must run inside a Tokio runtime.
#[derive(Clone, Debug)]
pub struct ClusterDht {
    pub(crate) dht: AsyncDht,
    deadline: Duration,
}

impl ClusterDht {
    /// Starts the client. If every bootstrap address is loopback, binds 127.0.0.1 (tests never
    /// leave the machine); otherwise mainline's default (0.0.0.0).
    ///
    /// Blocking but quick: binds a socket, spawns mainline's thread and resolves bootstrap host
    /// names (DNS, unless they are IP addresses).
    pub fn start(config: &DhtConfig) -> Result<Self, DhtError> {
        let mut builder = Dht::builder();
        builder
            .request_timeout(config.request_timeout)
            .server_settings(ServerSettings {
                filter: Box::new(ClientOnly),
                ..ServerSettings::default()
            });
        if let Some(list) = &config.bootstrap {
            let addrs = resolve_bootstrap(list)?;
            if addrs.iter().all(|a| a.ip().is_loopback()) {
                builder.bind_address(Ipv4Addr::LOCALHOST);
            }
            builder.bootstrap(&addrs);
        }
        let dht = builder.build().map_err(DhtError::Start)?.as_async();
        let deadline = config
            .request_timeout
            .saturating_mul(QUERY_DEADLINE_FACTOR)
            .max(MIN_QUERY_DEADLINE);
        Ok(ClusterDht { dht, deadline })
    }

    /// The local UDP address the client sends from.
    pub async fn local_addr(&self) -> Result<SocketAddrV4, DhtError> {
        let dht = self.dht.clone();
        let task = tokio::spawn(async move { dht.info().await.local_addr() });
        task.await.map_err(|e| DhtError::Stopped(e.to_string()))
    }

    /// The most recent item under (`key`, [`RECORD_SALT`]), converted to a [`SignedRecord`]
    /// WITHOUT Aspen-level verification (`None` if no node has it). Bounded in time by
    /// mainline's request timeouts.
    ///
    /// Errors with [`DhtError::Unreachable`] when no node answered at all, so "nobody has it"
    /// and "nobody could be asked" stay distinct.
    pub async fn fetch(&self, key: &ClusterKey) -> Result<Option<SignedRecord>, DhtError> {
        let cluster = *key;
        let item = self
            .best_item(cluster.to_bytes(), RECORD_SALT, cluster, "lookup")
            .await?;
        item.map(|item| to_signed(cluster, &item)).transpose()
    }

    /// Publishes `record` with BEP-44 compare-and-swap: reads the current item, signs `record`
    /// as seq `max(floor_seq, current + 1)` (`floor_seq` when there is none) and puts it with
    /// `cas` = the seq read. On a conflict (another writer, or replicas disagreeing) it reads
    /// again and retries, at most [`MAX_PUBLISH_ATTEMPTS`] times, then fails with
    /// [`DhtError::Conflict`]. Returns the record as stored.
    ///
    /// If, after a conflict, the re-read shows nobody else wrote (the same item as before, or
    /// the one we just tried), the refusals came from replicas still holding an older item (a
    /// put that reached only some nodes). Such replicas refuse every CAS until they forget the
    /// item, so that retry is made without CAS; its seq is still above everything seen. (The
    /// record is a full snapshot, not a delta: the worst case of this is that one of two
    /// simultaneous snapshots wins, and the next publish supersedes it anyway.)
    pub async fn publish(
        &self,
        secret: &ClusterSecretKey,
        record: &ClusterRecord,
        floor_seq: i64,
    ) -> Result<SignedRecord, DhtError> {
        let cluster = secret.public();
        // Refuse an invalid record before any network traffic.
        record
            .encode()
            .map_err(|source| DhtError::Record { cluster, source })?;
        // After a conflict: the seq read then, and the item we tried to write.
        let mut last: Option<(Option<i64>, SignedRecord)> = None;
        let mut last_conflict = None;
        for attempt in 1..=MAX_PUBLISH_ATTEMPTS {
            let current = self.fetch(&cluster).await?;
            let current_seq = current.as_ref().map(|c| c.seq);
            let seq = match current_seq {
                None => floor_seq,
                Some(c) => c
                    .checked_add(1)
                    .ok_or(DhtError::SeqExhausted { cluster, seq: c })?
                    .max(floor_seq),
            };
            // Nobody else wrote since the conflict: the refusals came from stale replicas.
            let stale_replicas = last.as_ref().is_some_and(|(read, tried)| {
                current_seq == *read || current.as_ref() == Some(tried)
            });
            let cas = if stale_replicas { None } else { current_seq };
            let signed = SignedRecord::sign(secret, record, seq)
                .map_err(|source| DhtError::Record { cluster, source })?;
            match self.put(&signed, cas).await? {
                Ok(()) => {
                    debug!(%cluster, seq, attempt, "cluster record published");
                    return Ok(signed);
                }
                Err(PutMutableError::Concurrency(conflict)) => {
                    debug!(%cluster, seq, ?cas, attempt, %conflict, "publish conflict; re-reading");
                    last_conflict = Some(conflict);
                    last = Some((current_seq, signed));
                }
                Err(PutMutableError::Query(source)) => {
                    return Err(DhtError::Put { cluster, source })
                }
            }
        }
        Err(DhtError::Conflict {
            cluster,
            attempts: MAX_PUBLISH_ATTEMPTS,
            last: last_conflict.unwrap_or(ConcurrencyError::CasFailed),
        })
    }

    /// Puts an already signed item again, unchanged (same seq): refreshes DHT storage.
    pub async fn republish(&self, signed: &SignedRecord) -> Result<(), DhtError> {
        let cluster = signed.cluster;
        if signed.value.len() > MAX_RECORD_BYTES {
            return Err(DhtError::Record {
                cluster,
                source: RecordError::TooLarge(signed.value.len()),
            });
        }
        match self.put(signed, None).await? {
            Ok(()) => Ok(()),
            Err(PutMutableError::Concurrency(ConcurrencyError::NotMostRecent)) => {
                Err(DhtError::Superseded {
                    cluster,
                    seq: signed.seq,
                })
            }
            Err(PutMutableError::Concurrency(last)) => Err(DhtError::Conflict {
                cluster,
                attempts: 1,
                last,
            }),
            Err(PutMutableError::Query(source)) => Err(DhtError::Put { cluster, source }),
        }
    }

    /// One BEP-44 put of `signed` (outer error: the client failed; inner: the DHT refused).
    async fn put(
        &self,
        signed: &SignedRecord,
        cas: Option<i64>,
    ) -> Result<Result<(), PutMutableError>, DhtError> {
        let item = MutableItem::new_signed_unchecked(
            signed.cluster.to_bytes(),
            signed.signature,
            &signed.value,
            signed.seq,
            Some(RECORD_SALT),
        );
        let dht = self.dht.clone();
        self.guarded(signed.cluster, "put", async move {
            dht.put_mutable(item, cas).await.map(|_| ())
        })
        .await
    }

    /// Runs a mainline call on its own task, under the safety-net deadline. Mainline panics
    /// (`expect`) if its actor thread is gone; the task boundary turns that into an error.
    /// The item stored under `public` and `salt` that Mainline's order ranks first (higher
    /// seq, then the larger value: deterministic). `Ok(None)`: nodes answered, none held
    /// one; [`DhtError::Unreachable`]: nobody answered. `cluster` and `what` name the lookup
    /// in errors.
    pub(crate) async fn best_item(
        &self,
        public: [u8; 32],
        salt: &'static [u8],
        cluster: ClusterKey,
        what: &'static str,
    ) -> Result<Option<MutableItem>, DhtError> {
        let dht = self.dht.clone();
        let (item, outcome) = self
            .guarded(cluster, what, async move {
                let mut get = dht.get_mutable_detailed(&public, Some(salt), None);
                let mut best: Option<MutableItem> = None;
                while let Some(item) = get.items.next().await {
                    let newer = match &best {
                        None => true,
                        Some(b) => (item.seq(), item.value()) > (b.seq(), b.value()),
                    };
                    if newer {
                        best = Some(item);
                    }
                }
                (best, get.outcome.recv().await)
            })
            .await?;
        debug!(%cluster, what, ?outcome, found = item.is_some(), "DHT lookup done");
        match item {
            Some(item) => Ok(Some(item)),
            None if outcome.responded() == 0 => Err(DhtError::Unreachable {
                cluster,
                queried: outcome.queried,
            }),
            None => Ok(None),
        }
    }

    pub(crate) async fn guarded<T: Send + 'static>(
        &self,
        cluster: ClusterKey,
        what: &'static str,
        call: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, DhtError> {
        let task = tokio::spawn(call);
        let abort = task.abort_handle();
        match tokio::time::timeout(self.deadline, task).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(join)) => Err(DhtError::Stopped(join.to_string())),
            Err(_) => {
                abort.abort();
                Err(DhtError::Deadline {
                    cluster,
                    what,
                    after: self.deadline,
                })
            }
        }
    }
}

/// Refuses every incoming request. Mainline 8 has no client-only setting: its default
/// "adaptive" mode turns a client into a DHT server after ~15 minutes on a publicly reachable
/// address. With this filter such a "server" still answers nobody, so an Aspen node never
/// stores or routes for others.
#[derive(Clone, Debug)]
struct ClientOnly;

impl RequestFilter for ClientOnly {
    fn allow_request(&self, _request: &RequestSpecific, _from: SocketAddrV4) -> bool {
        false
    }
}

/// Resolves "host:port" entries to the IPv4 addresses mainline can use (it is IPv4 only).
fn resolve_bootstrap(list: &[String]) -> Result<Vec<SocketAddrV4>, DhtError> {
    if list.is_empty() {
        return Err(DhtError::NoBootstrap);
    }
    let mut out = Vec::new();
    for entry in list {
        let bad = |reason: String| DhtError::BadBootstrap {
            addr: entry.clone(),
            reason,
        };
        let resolved = entry.to_socket_addrs().map_err(|e| bad(e.to_string()))?;
        let before = out.len();
        out.extend(resolved.filter_map(|a| match a {
            SocketAddr::V4(v4) => Some(v4),
            SocketAddr::V6(_) => None,
        }));
        if out.len() == before {
            return Err(bad("no IPv4 address (mainline is IPv4 only)".into()));
        }
    }
    Ok(out)
}

/// Converts a DHT item (signature and target already checked by mainline) to our form.
fn to_signed(cluster: ClusterKey, item: &MutableItem) -> Result<SignedRecord, DhtError> {
    let malformed = |reason: &str| DhtError::Malformed {
        cluster,
        reason: reason.to_owned(),
    };
    if item.key() != &cluster.to_bytes() {
        return Err(malformed("item is under another key"));
    }
    if item.salt() != Some(RECORD_SALT) {
        return Err(malformed("item has another salt"));
    }
    Ok(SignedRecord {
        cluster,
        seq: item.seq(),
        value: item.value().to_vec(),
        signature: *item.signature(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_lists_are_checked() {
        assert!(matches!(resolve_bootstrap(&[]), Err(DhtError::NoBootstrap)));
        assert!(matches!(
            resolve_bootstrap(&["not an address".into()]),
            Err(DhtError::BadBootstrap { .. })
        ));
        assert!(matches!(
            resolve_bootstrap(&["[::1]:6881".into()]),
            Err(DhtError::BadBootstrap { .. })
        ));
        let ok = resolve_bootstrap(&["127.0.0.1:6881".into(), "127.0.0.2:1".into()]).unwrap();
        assert_eq!(ok.len(), 2);
        assert!(ok.iter().all(|a| a.ip().is_loopback()));
    }

    #[test]
    fn an_item_under_another_key_or_salt_is_malformed() {
        let a = ClusterSecretKey::generate();
        let b = ClusterSecretKey::generate();
        let signer = mainline::SigningKey::from_bytes(&b.to_bytes());
        let item = MutableItem::new(signer.clone(), b"x", 1, Some(RECORD_SALT));
        assert!(matches!(
            to_signed(a.public(), &item),
            Err(DhtError::Malformed { .. })
        ));
        let item = MutableItem::new(signer.clone(), b"x", 1, Some(b"other"));
        assert!(matches!(
            to_signed(b.public(), &item),
            Err(DhtError::Malformed { .. })
        ));
        let item = MutableItem::new(signer, b"x", 1, Some(RECORD_SALT));
        assert_eq!(item.target().as_bytes(), &crate::dht_target(&b.public()));
        let signed = to_signed(b.public(), &item).unwrap();
        assert_eq!((signed.seq, signed.value.as_slice()), (1, &b"x"[..]));
    }
}
