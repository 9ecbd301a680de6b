//! Snapshot files: every table of the state machine, streamed row by row.
//!
//! Format (all integers little-endian):
//! ```text
//! magic "ASPENSNAP\x01"
//! repeated: u32 length, postcard(SnapshotRow)     -- Meta first, End last
//! ```
//! The first row is the metadata (exactly the applied log id and membership the rows contain),
//! so the current snapshot's metadata is read without reading the rest. The last row counts
//! the rows, so a truncated file is detected. openraft sends the file to followers in chunks.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::task::{Context, Poll};

use redb::{Durability, ReadableTable};

use super::state_db::StateDb;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use super::key_index::KeyIndex;
use super::state_machine::record_bytes;
use super::{
    encode, IoMode, REVISIONS, SESSIONS, SESSION_FLOORS, SESSION_IDLE, SESSION_SEEN, SM_META,
    SYSTEM,
};
use crate::limits::MAX_SNAPSHOT_ROW_BYTES;
use crate::raft_types::{LogId, SnapshotMeta, StoredMembership};

const MAGIC: &[u8; 10] = b"ASPENSNAP\x01";
const CURRENT: &str = "current.snap";

/// One row of a snapshot file. Variants are only ever appended.
#[derive(Debug, Serialize, Deserialize)]
enum SnapshotRow {
    Meta {
        last_applied: Option<LogId>,
        membership: StoredMembership,
        snapshot_id: String,
    },
    SmMeta {
        key: String,
        value: Vec<u8>,
    },
    Kv {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    History {
        key: Vec<u8>,
        revision: u64,
        value: Vec<u8>,
    },
    Session {
        client_id: u64,
        seq: u64,
        result: Vec<u8>,
    },
    SessionFloor {
        client_id: u64,
        floor: u64,
    },
    End {
        rows: u64,
    },
    /// When a client was last active (leader time, ms).
    SessionSeen {
        client_id: u64,
        seen_ms: u64,
    },
    /// A system key (cluster identity, invitations).
    System {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// A lease (its attached keys are rebuilt from the key space).
    Lease {
        id: u64,
        value: Vec<u8>,
    },
}

/// Why a snapshot could not be built, read or installed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("snapshot database: {0}")]
    Db(#[from] redb::Error),
    #[error("snapshot is malformed: {0}")]
    Malformed(String),
}

impl From<redb::TransactionError> for SnapshotError {
    fn from(e: redb::TransactionError) -> Self {
        SnapshotError::Db(e.into())
    }
}
impl From<redb::TableError> for SnapshotError {
    fn from(e: redb::TableError) -> Self {
        SnapshotError::Db(e.into())
    }
}
impl From<redb::StorageError> for SnapshotError {
    fn from(e: redb::StorageError) -> Self {
        SnapshotError::Db(e.into())
    }
}
impl From<redb::CommitError> for SnapshotError {
    fn from(e: redb::CommitError) -> Self {
        SnapshotError::Db(e.into())
    }
}
impl From<redb::SetDurabilityError> for SnapshotError {
    fn from(e: redb::SetDurabilityError) -> Self {
        SnapshotError::Db(e.into())
    }
}

fn write_row(w: &mut impl Write, row: &SnapshotRow) -> std::io::Result<()> {
    let bytes = encode(row);
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(&bytes)
}

fn read_row(r: &mut impl Read) -> Result<SnapshotRow, SnapshotError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)
        .map_err(|e| SnapshotError::Malformed(format!("truncated row header: {e}")))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_SNAPSHOT_ROW_BYTES {
        return Err(SnapshotError::Malformed(format!(
            "row of {len} bytes exceeds {MAX_SNAPSHOT_ROW_BYTES}"
        )));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)
        .map_err(|e| SnapshotError::Malformed(format!("truncated row: {e}")))?;
    postcard::from_bytes(&buf)
        .map_err(|e| SnapshotError::Malformed(format!("undecodable row: {e}")))
}

fn read_magic(r: &mut impl Read) -> Result<(), SnapshotError> {
    let mut magic = [0u8; MAGIC.len()];
    r.read_exact(&mut magic)
        .map_err(|e| SnapshotError::Malformed(format!("missing header: {e}")))?;
    if &magic != MAGIC {
        return Err(SnapshotError::Malformed(
            "not an Aspen snapshot (bad magic)".into(),
        ));
    }
    Ok(())
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{nanos}-{}.snap",
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes a snapshot of the state machine as of one read transaction, makes it the current
/// snapshot, and returns its metadata, path, and the file opened for reading (before it was
/// made current: a later build may replace the path at any time).
pub(super) fn build(
    db: &StateDb,
    index: &RwLock<KeyIndex>,
    dir: &Path,
) -> Result<(SnapshotMeta, PathBuf, std::fs::File), SnapshotError> {
    // Each key's writes as of the transaction (see `key_index` for the lock order).
    let (txn, history) = {
        let index = index.read().expect("key index lock");
        let txn = db.begin_read()?;
        let revision: u64 = match txn.open_table(SM_META)?.get("revision")? {
            Some(v) => postcard::from_bytes(v.value())
                .map_err(|e| SnapshotError::Malformed(format!("state machine revision: {e}")))?,
            None => 0,
        };
        (txn, index.history_at(revision))
    };
    // Applies commit without fsync. Make everything this read transaction sees durable BEFORE
    // the snapshot exists: a snapshot ahead of the durable state machine would, after a crash,
    // claim entries the state machine no longer has (openraft refuses to start then).
    let mut sync = db.begin_write()?;
    sync.set_durability(Durability::Immediate)?;
    sync.commit()?;
    let meta_table = txn.open_table(SM_META)?;
    let get = |k: &str| -> Result<Option<Vec<u8>>, SnapshotError> {
        Ok(meta_table.get(k)?.map(|v| v.value().to_vec()))
    };
    let decode_err =
        |e: postcard::Error| SnapshotError::Malformed(format!("state machine metadata: {e}"));
    let last_applied: Option<LogId> = match get("last_applied")? {
        Some(b) => postcard::from_bytes(&b).map_err(decode_err)?,
        None => None,
    };
    let membership: StoredMembership = match get("membership")? {
        Some(b) => postcard::from_bytes(&b).map_err(decode_err)?,
        None => StoredMembership::default(),
    };
    // Named by content: apply is deterministic, so every snapshot at one log id is the same
    // (and a simulation replays with the same ids).
    let snapshot_id = match &last_applied {
        Some(id) => format!("{}-{}", id.leader_id.term, id.index),
        None => "empty".to_string(),
    };
    let tmp = dir.join(unique_name("building"));
    let file = std::fs::File::create(&tmp)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(MAGIC)?;
    let mut rows = 0u64;
    let mut put = |w: &mut BufWriter<std::fs::File>, row: SnapshotRow| -> std::io::Result<()> {
        rows += 1;
        write_row(w, &row)
    };
    put(
        &mut w,
        SnapshotRow::Meta {
            last_applied,
            membership: membership.clone(),
            snapshot_id,
        },
    )?;
    for item in meta_table.iter()? {
        let (k, v) = item?;
        put(
            &mut w,
            SnapshotRow::SmMeta {
                key: k.value().to_string(),
                value: v.value().to_vec(),
            },
        )?;
    }
    // The rows of earlier stores' key space and history tables, in their order: the current
    // value of each live key, then every record by (key, revision).
    let revisions = txn.open_table(REVISIONS)?;
    for (key, revs) in &history {
        let newest = revs.last().expect("history_at lists keys with writes");
        if newest.live {
            let record = record_bytes(&revisions, newest.revision, key)?;
            put(
                &mut w,
                SnapshotRow::Kv {
                    key: key.clone(),
                    value: record[1..].to_vec(),
                },
            )?;
        }
    }
    for (key, revs) in &history {
        for r in revs {
            put(
                &mut w,
                SnapshotRow::History {
                    key: key.clone(),
                    revision: r.revision,
                    value: record_bytes(&revisions, r.revision, key)?,
                },
            )?;
        }
    }
    for item in txn.open_table(SESSIONS)?.iter()? {
        let (k, v) = item?;
        let (client_id, seq) = k.value();
        put(
            &mut w,
            SnapshotRow::Session {
                client_id,
                seq,
                result: v.value().to_vec(),
            },
        )?;
    }
    for item in txn.open_table(SESSION_SEEN)?.iter()? {
        let (k, v) = item?;
        put(
            &mut w,
            SnapshotRow::SessionSeen {
                client_id: k.value(),
                seen_ms: v.value(),
            },
        )?;
    }
    for item in txn.open_table(SESSION_FLOORS)?.iter()? {
        let (k, v) = item?;
        put(
            &mut w,
            SnapshotRow::SessionFloor {
                client_id: k.value(),
                floor: v.value(),
            },
        )?;
    }
    for item in txn.open_table(SYSTEM)?.iter()? {
        let (k, v) = item?;
        put(
            &mut w,
            SnapshotRow::System {
                key: k.value().to_vec(),
                value: v.value().to_vec(),
            },
        )?;
    }
    for item in txn.open_table(super::leases::LEASES)?.iter()? {
        let (k, v) = item?;
        put(
            &mut w,
            SnapshotRow::Lease {
                id: k.value(),
                value: v.value().to_vec(),
            },
        )?;
    }
    let total = rows + 1;
    write_row(&mut w, &SnapshotRow::End { rows: total })?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    let reader = std::fs::File::open(&tmp)?;
    let path = make_current(dir, &tmp)?;
    Ok((
        SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
        },
        path,
        reader,
    ))
}

/// Atomically makes `path` the current snapshot and removes older files.
pub(super) fn make_current(dir: &Path, path: &Path) -> std::io::Result<PathBuf> {
    let current = dir.join(CURRENT);
    std::fs::rename(path, &current)?;
    sync_dir(dir)?;
    // Leftovers of interrupted builds or receives.
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("building-") && entry.path() != current {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(current)
}

/// The current snapshot's metadata and path, with the file opened once, rewound to its start
/// (the metadata and the bytes then come from the same file even if a build replaces the path
/// meanwhile), if there is one.
pub(super) fn read_current_meta(
    dir: &Path,
) -> Result<Option<(SnapshotMeta, PathBuf, std::fs::File)>, SnapshotError> {
    use std::io::{Seek, SeekFrom};
    let path = dir.join(CURRENT);
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let meta = {
        let mut r = BufReader::new(&file);
        read_magic(&mut r)?;
        match read_row(&mut r)? {
            SnapshotRow::Meta {
                last_applied,
                membership,
                // Written for the file's sake (it names the content); openraft 0.10 no longer
                // keeps an id in a snapshot's metadata.
                snapshot_id: _,
            } => SnapshotMeta {
                last_log_id: last_applied,
                last_membership: membership,
            },
            _ => {
                return Err(SnapshotError::Malformed(
                    "first row is not the metadata".into(),
                ))
            }
        }
    };
    file.seek(SeekFrom::Start(0))?;
    Ok(Some((meta, path, file)))
}

/// Replaces the whole state machine with the snapshot at `path`, in one durable transaction.
pub(super) fn install(
    db: &StateDb,
    index: &RwLock<KeyIndex>,
    path: &Path,
    meta: &SnapshotMeta,
) -> Result<(), SnapshotError> {
    let mut r = BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    read_magic(&mut r)?;
    match read_row(&mut r)? {
        SnapshotRow::Meta { last_applied, .. } if last_applied == meta.last_log_id => {}
        SnapshotRow::Meta { last_applied, .. } => {
            return Err(SnapshotError::Malformed(format!(
                "snapshot contains {last_applied:?} but was announced as {:?}",
                meta.last_log_id
            )))
        }
        _ => {
            return Err(SnapshotError::Malformed(
                "first row is not the metadata".into(),
            ))
        }
    }
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    {
        let mut sm_meta = txn.open_table(SM_META)?;
        let mut revisions = txn.open_table(REVISIONS)?;
        let mut sessions = txn.open_table(SESSIONS)?;
        let mut floors = txn.open_table(SESSION_FLOORS)?;
        let mut seen = txn.open_table(SESSION_SEEN)?;
        let mut idle = txn.open_table(SESSION_IDLE)?;
        let mut system = txn.open_table(SYSTEM)?;
        let mut leases = txn.open_table(super::leases::LEASES)?;
        leases.retain(|_, _| false)?;
        system.retain(|_, _| false)?;
        seen.retain(|_, _| false)?;
        idle.retain(|_, _| false)?;
        sm_meta.retain(|_, _| false)?;
        revisions.retain(|_, _| false)?;
        sessions.retain(|_, _| false)?;
        floors.retain(|_, _| false)?;
        let mut rows = 1u64;
        loop {
            let row = read_row(&mut r)?;
            rows += 1;
            match row {
                SnapshotRow::Meta { .. } => {
                    return Err(SnapshotError::Malformed("second metadata row".into()))
                }
                SnapshotRow::SmMeta { key, value } => {
                    sm_meta.insert(key.as_str(), value.as_slice())?;
                }
                // The current values follow from the history.
                SnapshotRow::Kv { .. } => {}
                SnapshotRow::History {
                    key,
                    revision,
                    value,
                } => {
                    revisions.insert((revision, key.as_slice()), value.as_slice())?;
                }
                SnapshotRow::Session {
                    client_id,
                    seq,
                    result,
                } => {
                    sessions.insert((client_id, seq), result.as_slice())?;
                }
                SnapshotRow::SessionFloor { client_id, floor } => {
                    floors.insert(client_id, floor)?;
                }
                SnapshotRow::SessionSeen { client_id, seen_ms } => {
                    seen.insert(client_id, seen_ms)?;
                    idle.insert((seen_ms, client_id), ())?;
                }
                SnapshotRow::System { key, value } => {
                    system.insert(key.as_slice(), value.as_slice())?;
                }
                SnapshotRow::Lease { id, value } => {
                    leases.insert(id, value.as_slice())?;
                }
                SnapshotRow::End { rows: expected } => {
                    if expected != rows {
                        return Err(SnapshotError::Malformed(format!(
                            "{rows} rows, trailer says {expected}"
                        )));
                    }
                    break;
                }
            }
        }
        // The snapshot's own metadata is authoritative for what was applied.
        sm_meta.insert("last_applied", encode(&meta.last_log_id).as_slice())?;
        sm_meta.insert("membership", encode(&meta.last_membership).as_slice())?;
    }
    // The key index and the lease keys are derived from the history, not shipped.
    let fresh = KeyIndex::load(&txn.open_table(REVISIONS)?)?;
    super::leases::rebuild_keys(&txn, &fresh)?;
    let mut index = index.write().expect("key index lock");
    txn.commit()?;
    *index = fresh;
    Ok(())
}

/// A snapshot file being written (received) or read (sent). openraft hands it whole to the
/// network, which streams its bytes; the path lets `install_snapshot` move a received file
/// into place.
pub struct SnapshotFile {
    path: PathBuf,
    file: FileIo,
}

/// The file under a [`SnapshotFile`]: tokio's (blocking pool) for a node, a plain file used
/// inline for [`IoMode::Inline`] (simulation: no thread may escape the runtime).
enum FileIo {
    Pool(tokio::fs::File),
    Inline(std::fs::File),
}

impl SnapshotFile {
    pub(super) async fn create_receiving(dir: &Path, io: IoMode) -> std::io::Result<Self> {
        let path = dir.join(unique_name("receiving"));
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create_new(true);
        let file = match io {
            IoMode::Threads => {
                FileIo::Pool(tokio::fs::OpenOptions::from(options).open(&path).await?)
            }
            IoMode::Inline => FileIo::Inline(options.open(&path)?),
        };
        Ok(SnapshotFile { path, file })
    }

    /// A snapshot file already opened for reading (as `path`).
    pub(super) fn opened(path: PathBuf, file: std::fs::File, io: IoMode) -> Self {
        let file = match io {
            IoMode::Threads => FileIo::Pool(tokio::fs::File::from_std(file)),
            IoMode::Inline => FileIo::Inline(file),
        };
        SnapshotFile { path, file }
    }

    /// Flushes and fsyncs a received file before it is read back.
    pub(super) async fn finish(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match &mut self.file {
            FileIo::Pool(f) => {
                f.flush().await?;
                f.sync_all().await
            }
            FileIo::Inline(f) => f.sync_all(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AsyncRead for SnapshotFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.file {
            FileIo::Pool(f) => Pin::new(f).poll_read(cx, buf),
            FileIo::Inline(f) => {
                use std::io::Read;
                let n = f.read(buf.initialize_unfilled())?;
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.file {
            FileIo::Pool(f) => Pin::new(f).poll_write(cx, buf),
            FileIo::Inline(f) => Poll::Ready(std::io::Write::write(f, buf)),
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.file {
            FileIo::Pool(f) => Pin::new(f).poll_flush(cx),
            FileIo::Inline(f) => Poll::Ready(std::io::Write::flush(f)),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.file {
            FileIo::Pool(f) => Pin::new(f).poll_shutdown(cx),
            FileIo::Inline(_) => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(mut self: Pin<&mut Self>, position: std::io::SeekFrom) -> std::io::Result<()> {
        match &mut self.file {
            FileIo::Pool(f) => Pin::new(f).start_seek(position),
            FileIo::Inline(f) => std::io::Seek::seek(f, position).map(|_| ()),
        }
    }
    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        match &mut self.file {
            FileIo::Pool(f) => Pin::new(f).poll_complete(cx),
            FileIo::Inline(f) => Poll::Ready(std::io::Seek::stream_position(f)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever bytes a peer sends as a snapshot: a typed error, never a panic, and the
        /// state machine is left as it was.
        #[test]
        fn arbitrary_snapshot_bytes_are_rejected_without_panic(
            body in proptest::collection::vec(any::<u8>(), 0..512),
            with_magic in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let db = StateDb::new(redb::Database::create(dir.path().join("s.redb")).unwrap());
            let txn = db.begin_write().unwrap();
            txn.open_table(REVISIONS).unwrap().insert((1, b"keep".as_slice()), b"me".as_slice()).unwrap();
            txn.commit().unwrap();
            let index = RwLock::new(KeyIndex::default());
            let path = dir.path().join("in.snap");
            let mut bytes = if with_magic { MAGIC.to_vec() } else { vec![] };
            bytes.extend(&body);
            std::fs::write(&path, &bytes).unwrap();
            let meta = SnapshotMeta::default();
            prop_assert!(install(&db, &index, &path, &meta).is_err());
            // A failed install changes nothing.
            prop_assert_eq!(&*index.read().unwrap(), &KeyIndex::default());
            let txn = db.begin_read().unwrap();
            let kept = txn.open_table(REVISIONS).unwrap().get((1, b"keep".as_slice())).unwrap().map(|v| v.value().to_vec());
            prop_assert_eq!(kept, Some(b"me".to_vec()));
            std::fs::write(dir.path().join(CURRENT), &bytes).unwrap();
            prop_assert!(read_current_meta(dir.path()).is_err());
        }
    }

    #[test]
    fn truncated_snapshot_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::new(redb::Database::create(dir.path().join("s.redb")).unwrap());
        let txn = db.begin_write().unwrap();
        super::super::create_sm_tables(&txn).unwrap();
        let stored = super::super::state_machine::StoredKv {
            value: b"v".to_vec(),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: 0,
        };
        txn.open_table(REVISIONS)
            .unwrap()
            .insert((1, b"k".as_slice()), encode(&Some(stored)).as_slice())
            .unwrap();
        txn.open_table(SM_META)
            .unwrap()
            .insert("revision", encode(&1u64).as_slice())
            .unwrap();
        txn.commit().unwrap();
        let index = RwLock::new(super::super::state_machine::load_index(&db).unwrap());
        let snaps = dir.path().join("snaps");
        std::fs::create_dir_all(&snaps).unwrap();
        let (meta, path, _) = build(&db, &index, &snaps).unwrap();
        let full = std::fs::read(&path).unwrap();
        // Every strict prefix fails; the whole file installs.
        for cut in [MAGIC.len(), full.len() / 2, full.len() - 1] {
            let p = dir.path().join(format!("cut-{cut}.snap"));
            std::fs::write(&p, &full[..cut]).unwrap();
            assert!(
                matches!(
                    install(&db, &index, &p, &meta),
                    Err(SnapshotError::Malformed(_))
                ),
                "cut at {cut}"
            );
        }
        let before = index.read().unwrap().history_at(u64::MAX);
        install(&db, &index, &path, &meta).unwrap();
        assert_eq!(index.read().unwrap().history_at(u64::MAX), before);
    }

    /// A snapshot being sent keeps the bytes it was announced with while newer builds replace
    /// the current file (a follower once received a newer build announced as the older one,
    /// and refused it, until the test timed out).
    #[test]
    fn a_snapshot_keeps_its_bytes_when_a_newer_build_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::new(redb::Database::create(dir.path().join("s.redb")).unwrap());
        let index = RwLock::new(KeyIndex::default());
        let snaps = dir.path().join("snaps");
        std::fs::create_dir_all(&snaps).unwrap();
        let applied = |i: u64| {
            let txn = db.begin_write().unwrap();
            super::super::create_sm_tables(&txn).unwrap();
            let id = Some(crate::raft_types::log_id(1, 1, i));
            txn.open_table(SM_META)
                .unwrap()
                .insert("last_applied", encode(&id).as_slice())
                .unwrap();
            txn.commit().unwrap();
            id
        };
        let meta_in = |file: &std::fs::File| match read_row(&mut {
            let mut r = BufReader::new(file);
            read_magic(&mut r).unwrap();
            r
        })
        .unwrap()
        {
            SnapshotRow::Meta { last_applied, .. } => last_applied,
            _ => panic!("no metadata first"),
        };
        let first = applied(1);
        let (meta, _, built) = build(&db, &index, &snaps).unwrap();
        assert_eq!(meta.last_log_id, first);
        let (current, _, opened) = read_current_meta(&snaps).unwrap().unwrap();
        assert_eq!(current.last_log_id, first);
        applied(2);
        build(&db, &index, &snaps).unwrap();
        // Both handles still read the first build; the path now holds the second.
        assert_eq!(meta_in(&built), first);
        assert_eq!(meta_in(&opened), first);
        assert_eq!(
            read_current_meta(&snaps).unwrap().unwrap().0.last_log_id,
            Some(crate::raft_types::log_id(1, 1, 2))
        );
    }
}
