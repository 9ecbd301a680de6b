//! The on-disk cache of the last good record of each cluster.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use aspen_trust::{ClusterKey, RecordError, SignedRecord, MAX_RECORD_BYTES};

use crate::check_authentic;

/// Largest file [`RecordCache::load`] reads: the cache form of a record of the largest size
/// (version, key, seq, signature, value length, value).
pub const MAX_CACHE_FILE_BYTES: usize = 1 + 32 + 8 + 64 + 2 + MAX_RECORD_BYTES;

/// Serialises writers in this process, so "never replace a higher seq" holds between the
/// read and the rename. (Writes are rare; one lock for every cache is enough.)
static WRITE_LOCK: Mutex<()> = Mutex::new(());

/// Makes temporary file names unique within the process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Why the cache could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot {action} cache file {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cache file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("refusing to cache a record for cluster {cluster} that is not authentic: {reason}")]
    NotAuthentic {
        cluster: ClusterKey,
        #[source]
        reason: RecordError,
    },
    #[error("refusing to replace cached seq {cached} of cluster {cluster} with older seq {seq}")]
    Older {
        cluster: ClusterKey,
        seq: i64,
        cached: i64,
    },
    #[error("cache task failed: {0}")]
    Task(String),
}

/// Persistent cache of the last good record per cluster: one file `<dir>/<64-hex key>.record`
/// holding [`SignedRecord::encode`].
///
/// Writes are atomic (temporary file, fsync, rename, fsync of the directory) and never replace
/// a record with a lower seq. Reads never trust the file: a corrupt one is a typed error, and
/// callers verify what they load. The plain functions block (std::fs); async code uses the
/// `_async` wrappers, which run them on tokio's blocking pool.
#[derive(Clone, Debug)]
pub struct RecordCache {
    dir: PathBuf,
}

impl RecordCache {
    /// A cache in `dir` (created on the first store).
    pub fn new(dir: PathBuf) -> Self {
        RecordCache { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the record of `key` is kept.
    pub fn path(&self, key: &ClusterKey) -> PathBuf {
        self.dir.join(format!("{key}.record"))
    }

    /// The cached record of `key`, decoded but NOT verified (`None` if there is none).
    pub fn load(&self, key: &ClusterKey) -> Result<Option<SignedRecord>, CacheError> {
        let path = self.path(key);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(io_error("open", &path, source)),
        };
        let mut bytes = Vec::with_capacity(MAX_CACHE_FILE_BYTES);
        file.take(MAX_CACHE_FILE_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| io_error("read", &path, source))?;
        if bytes.len() > MAX_CACHE_FILE_BYTES {
            return Err(CacheError::Corrupt {
                path,
                reason: format!("larger than {MAX_CACHE_FILE_BYTES} bytes"),
            });
        }
        SignedRecord::decode(&bytes)
            .map(Some)
            .map_err(|e| CacheError::Corrupt {
                path,
                reason: e.to_string(),
            })
    }

    /// Stores `record` unless the cache already holds an authentic record of the same cluster
    /// with a higher seq ([`CacheError::Older`]). Only authentic records (signed by their
    /// cluster key, well-formed; expiry is not checked) are accepted. A corrupt or forged file
    /// in the way is replaced.
    pub fn store(&self, record: &SignedRecord) -> Result<(), CacheError> {
        let cluster = record.cluster;
        check_authentic(record, &cluster)
            .map_err(|reason| CacheError::NotAuthentic { cluster, reason })?;
        let _guard = WRITE_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Ok(Some(existing)) = self.load(&cluster) {
            if check_authentic(&existing, &cluster).is_ok() {
                if existing.seq > record.seq {
                    return Err(CacheError::Older {
                        cluster,
                        seq: record.seq,
                        cached: existing.seq,
                    });
                }
                if existing == *record {
                    return Ok(());
                }
            }
        }
        fs::create_dir_all(&self.dir)
            .map_err(|e| io_error("create directory for", &self.dir, e))?;
        let path = self.path(&cluster);
        let tmp = self.dir.join(format!(
            ".{cluster}.record.{}.{}.tmp",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let written = write_synced(&tmp, &record.encode())
            .and_then(|()| fs::rename(&tmp, &path).map_err(|e| io_error("rename", &tmp, e)));
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written?;
        // The rename is durable only once the directory is synced.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error("sync directory of", &path, e))
    }

    /// [`Self::load`] on the blocking pool.
    pub async fn load_async(&self, key: &ClusterKey) -> Result<Option<SignedRecord>, CacheError> {
        let (cache, key) = (self.clone(), *key);
        tokio::task::spawn_blocking(move || cache.load(&key))
            .await
            .map_err(|e| CacheError::Task(e.to_string()))?
    }

    /// [`Self::store`] on the blocking pool.
    pub async fn store_async(&self, record: &SignedRecord) -> Result<(), CacheError> {
        let (cache, record) = (self.clone(), record.clone());
        tokio::task::spawn_blocking(move || cache.store(&record))
            .await
            .map_err(|e| CacheError::Task(e.to_string()))?
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let mut file = File::create(path).map_err(|e| io_error("create", path, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error("write", path, e))
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> CacheError {
    CacheError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}
