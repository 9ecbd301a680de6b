//! Resolution: the DHT first, verified, else the last good record from the cache.

use aspen_trust::{ClusterKey, ClusterRecord, RecordError, SignedRecord};
use tracing::{debug, warn};

use crate::cache::{CacheError, RecordCache};
use crate::check_authentic;
use crate::dht::{ClusterDht, DhtError};

/// Where a resolved record came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Fetched from the DHT just now (and verified).
    Dht,
    /// The last good record from the on-disk cache (re-verified).
    Cache,
}

/// A verified cluster record.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub record: ClusterRecord,
    pub signed: SignedRecord,
    pub source: Source,
    /// Why the DHT did not provide the record, when it came from the cache.
    pub dht_problem: Option<String>,
}

/// Why the cached record was not used.
#[derive(Debug, thiserror::Error)]
pub enum CacheProblem {
    #[error("cached record unreadable: {0}")]
    Unreadable(#[source] CacheError),
    #[error("cached record rejected: {0}")]
    Rejected(#[source] RecordError),
}

/// Why no verified record could be found.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(
        "cluster {cluster} not found on the DHT and {}",
        no_cache(cache_problem)
    )]
    NotFound {
        cluster: ClusterKey,
        cache_problem: Option<CacheProblem>,
    },
    #[error(
        "cannot find cluster {cluster}: {}, and {}",
        dht_reason(dht),
        no_cache_record(cache_problem)
    )]
    Unreachable {
        cluster: ClusterKey,
        /// `None`: the resolver has no DHT client.
        dht: Option<DhtError>,
        cache_problem: Option<CacheProblem>,
    },
    #[error(
        "record for cluster {cluster} rejected: {reason}{}",
        and_cache(cache_problem)
    )]
    Rejected {
        cluster: ClusterKey,
        reason: RecordError,
        cache_problem: Option<CacheProblem>,
    },
}

fn no_cache(problem: &Option<CacheProblem>) -> String {
    match problem {
        None => "not cached".into(),
        Some(p) => format!("its cache is unusable ({p})"),
    }
}

fn no_cache_record(problem: &Option<CacheProblem>) -> String {
    match problem {
        None => "no cached record".into(),
        Some(p) => format!("no usable cached record ({p})"),
    }
}

fn dht_reason(dht: &Option<DhtError>) -> String {
    match dht {
        None => "the DHT is off".into(),
        Some(e) => e.to_string(),
    }
}

fn and_cache(problem: &Option<CacheProblem>) -> String {
    match problem {
        None => String::new(),
        Some(p) => format!("; and the {p}"),
    }
}

/// What the DHT gave instead of a usable record.
enum DhtMiss {
    NotFound,
    Unreachable(Option<DhtError>),
    Rejected(RecordError),
}

/// Resolves cluster keys to verified records: the DHT first, else the cache.
#[derive(Clone, Debug)]
pub struct Resolver {
    dht: Option<ClusterDht>,
    cache: Option<RecordCache>,
}

impl Resolver {
    pub fn new(dht: Option<ClusterDht>, cache: Option<RecordCache>) -> Self {
        Resolver { dht, cache }
    }

    /// The verified record of cluster `key` at time `now` (Unix seconds).
    ///
    /// 1. The cached record, if any, is verified (key, signature, expiry); an unusable one is
    ///    ignored with a warning, and the reason kept for the error message. The seq of an
    ///    authentic cached record (even an expired one) is the floor for step 2.
    /// 2. The DHT item, if any, must verify and must not be older than that floor (no replays).
    ///    Accepted: it is cached and returned ([`Source::Dht`]). Rejected: a valid cached record
    ///    is returned instead, with the reason in [`Resolved::dht_problem`]; without one, the
    ///    error is [`ResolveError::Rejected`].
    /// 3. No item, or the DHT failed: a valid cached record ([`Source::Cache`]), else
    ///    [`ResolveError::NotFound`] / [`ResolveError::Unreachable`].
    pub async fn resolve(&self, key: &ClusterKey, now: u64) -> Result<Resolved, ResolveError> {
        let cluster = *key;

        let mut usable_cached = None;
        let mut cache_problem = None;
        let mut floor = None;
        if let Some(cache) = &self.cache {
            match cache.load_async(key).await {
                Ok(None) => {}
                Ok(Some(signed)) => {
                    if check_authentic(&signed, key).is_ok() {
                        floor = Some(signed.seq);
                    }
                    match signed.verify(key, now) {
                        Ok(record) => usable_cached = Some((signed, record)),
                        Err(e) => {
                            warn!(%cluster, "ignoring cached record: {e}");
                            cache_problem = Some(CacheProblem::Rejected(e));
                        }
                    }
                }
                Err(e) => {
                    warn!(%cluster, "ignoring cached record: {e}");
                    cache_problem = Some(CacheProblem::Unreadable(e));
                }
            }
        }

        let fetched = match &self.dht {
            None => Err(None),
            Some(dht) => dht.fetch(key).await.map_err(Some),
        };
        let miss = match fetched {
            Ok(Some(signed)) => {
                let checked = signed.verify(key, now).and_then(|record| {
                    floor.map_or(Ok(()), |f| signed.check_not_older_than(f))?;
                    Ok(record)
                });
                match checked {
                    Ok(record) => {
                        self.remember(&signed).await;
                        return Ok(Resolved {
                            record,
                            signed,
                            source: Source::Dht,
                            dht_problem: None,
                        });
                    }
                    Err(reason) => {
                        warn!(%cluster, seq = signed.seq, "rejecting the DHT record: {reason}");
                        DhtMiss::Rejected(reason)
                    }
                }
            }
            Ok(None) => DhtMiss::NotFound,
            Err(e) => DhtMiss::Unreachable(e),
        };

        if let Some((signed, record)) = usable_cached {
            let dht_problem = match &miss {
                DhtMiss::NotFound => "not found on the DHT".to_owned(),
                DhtMiss::Unreachable(e) => dht_reason(e),
                DhtMiss::Rejected(reason) => format!("DHT record rejected: {reason}"),
            };
            debug!(%cluster, seq = signed.seq, %dht_problem, "using the cached record");
            return Ok(Resolved {
                record,
                signed,
                source: Source::Cache,
                dht_problem: Some(dht_problem),
            });
        }
        Err(match miss {
            DhtMiss::NotFound => ResolveError::NotFound {
                cluster,
                cache_problem,
            },
            DhtMiss::Unreachable(dht) => ResolveError::Unreachable {
                cluster,
                dht,
                cache_problem,
            },
            DhtMiss::Rejected(reason) => ResolveError::Rejected {
                cluster,
                reason,
                cache_problem,
            },
        })
    }

    /// Caches a freshly verified record; failing to is worth a warning, not an error.
    async fn remember(&self, signed: &SignedRecord) {
        if let Some(cache) = &self.cache {
            match cache.store_async(signed).await {
                Ok(()) => {}
                // Another resolver cached a newer one meanwhile: fine.
                Err(e @ CacheError::Older { .. }) => debug!("not caching: {e}"),
                Err(e) => warn!(cluster = %signed.cluster, "could not cache the record: {e}"),
            }
        }
    }
}
