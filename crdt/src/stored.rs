//! A document as stored (metadata, snapshot, pending changes), and the transactions that
//! change it.
//!
//! Every transaction requires the document's metadata to be exactly what it was planned
//! against, so a write planned before a concurrent delete (or delete and re-create) applies
//! nothing. Compaction also requires the snapshot header it replaces, so two compactions
//! never interleave. Changes applied meanwhile are untouched by a compaction: it deletes only
//! the changes its snapshot covers.

use std::collections::HashSet;

use aspen_kv::api::ReadError;
use aspen_kv::api::{SystemOp, SystemTxn};
use aspen_kv::SystemView;
use automerge::{Automerge, Change};

use crate::layout::{self, DataKey, DocMeta, SnapshotHeader, RECORD_VERSION};
use crate::limits::*;
use crate::{ChangeHash, DocError, DocName};

/// One document's stored state, read in one consistent view.
#[derive(Clone, Debug)]
pub struct StoredDoc {
    pub name: DocName,
    pub meta: DocMeta,
    meta_bytes: Vec<u8>,
    header: Option<(SnapshotHeader, Vec<u8>)>,
    chunks: Vec<Vec<u8>>,
    /// Pending changes (not yet compacted), in key (hash) order.
    pub changes: Vec<(ChangeHash, Vec<u8>)>,
}

/// Reads document `name` from a consistent view of the system key space; `Ok(Ok(None))` if
/// it does not exist, `Ok(Err(_))` if what is stored is corrupt.
pub fn read_doc(
    view: &SystemView,
    name: &DocName,
) -> Result<Result<Option<StoredDoc>, DocError>, ReadError> {
    let Some(meta_bytes) = view.get(&layout::meta_key(name))? else {
        return Ok(Ok(None));
    };
    let prefix = layout::data_prefix(name);
    let mut header = None;
    let mut chunks = Vec::new();
    let mut changes = Vec::new();
    let mut bad_key = None;
    view.scan(&prefix, |key, value| {
        match layout::parse_data_key(&key[prefix.len()..]) {
            Some(DataKey::Change(hash)) => changes.push((hash, value.to_vec())),
            Some(DataKey::Header) => header = Some(value.to_vec()),
            Some(DataKey::Chunk(i)) => chunks.push((i, value.to_vec())),
            None => {
                bad_key = Some(hex::encode(key));
                return false;
            }
        }
        true
    })?;
    Ok((|| {
        let corrupt = |reason: String| DocError::Corrupt {
            name: name.to_string(),
            reason,
        };
        if let Some(key) = bad_key {
            return Err(corrupt(format!("unknown key {key}")));
        }
        let meta = DocMeta::decode(name.as_str(), &meta_bytes)?;
        let header = match header {
            Some(bytes) => Some((SnapshotHeader::decode(name.as_str(), &bytes)?, bytes)),
            None => None,
        };
        let expected = header.as_ref().map_or(0, |(h, _)| h.chunks as usize);
        // Chunks come in key order; stale ones past the header's count are never stored.
        if chunks.len() != expected
            || chunks
                .iter()
                .enumerate()
                .any(|(i, (c, _))| *c as usize != i)
        {
            return Err(corrupt(format!(
                "snapshot has chunks {:?}, the header says {expected}",
                chunks.iter().map(|(c, _)| *c).collect::<Vec<_>>()
            )));
        }
        Ok(Some(StoredDoc {
            name: name.clone(),
            meta,
            meta_bytes,
            header,
            chunks: chunks.into_iter().map(|(_, c)| c).collect(),
            changes,
        }))
    })())
}

impl StoredDoc {
    /// Bytes the document occupies: snapshot plus pending changes.
    pub fn stored_bytes(&self) -> usize {
        self.header.as_ref().map_or(0, |(h, _)| h.len as usize)
            + self.changes.iter().map(|(_, c)| c.len()).sum::<usize>()
    }

    /// The BLAKE3 hash of the compacted snapshot, as its header records it.
    pub fn snapshot_hash(&self) -> Option<[u8; 32]> {
        self.header.as_ref().map(|(h, _)| h.hash)
    }

    /// Bytes of pending (uncompacted) changes.
    pub fn pending_bytes(&self) -> usize {
        self.changes.iter().map(|(_, c)| c.len()).sum()
    }

    /// Whether the document has enough pending changes (or bytes of them) to be compacted.
    pub fn wants_compaction(&self) -> bool {
        self.changes.len() >= COMPACT_AFTER_CHANGES || self.pending_bytes() >= COMPACT_AFTER_BYTES
    }

    fn corrupt(&self, reason: String) -> DocError {
        DocError::Corrupt {
            name: self.name.to_string(),
            reason,
        }
    }

    /// The compacted snapshot (a saved Automerge document), checked against its header.
    pub fn snapshot(&self) -> Result<Option<Vec<u8>>, DocError> {
        let Some((header, _)) = &self.header else {
            return Ok(None);
        };
        let bytes = self.chunks.concat();
        if bytes.len() as u64 != header.len || *blake3::hash(&bytes).as_bytes() != header.hash {
            return Err(self.corrupt("snapshot does not match its header".into()));
        }
        Ok(Some(bytes))
    }

    /// Builds the Automerge document: the snapshot, then every pending change. CPU work:
    /// callers keep it off the async executor.
    pub fn load(&self) -> Result<Automerge, DocError> {
        let snapshot = self.snapshot()?;
        let doc = assemble(
            self.name.as_str(),
            snapshot.as_deref(),
            self.changes.iter().map(|(_, c)| c.as_slice()),
        )?;
        Ok(doc)
    }

    fn require_meta(&self) -> (Vec<u8>, Option<Vec<u8>>) {
        (layout::meta_key(&self.name), Some(self.meta_bytes.clone()))
    }
}

/// A stored document `d` built from parts, for tests: a snapshot (saved document) in
/// chunks with its header, and pending changes keyed by their hashes.
#[cfg(test)]
pub(crate) fn test_doc(
    incarnation: [u8; 16],
    snapshot: Option<Vec<u8>>,
    changes: Vec<Vec<u8>>,
) -> StoredDoc {
    let meta = DocMeta {
        version: RECORD_VERSION,
        incarnation,
        created_at_ms: 1,
    };
    let (header, chunks) = match snapshot {
        None => (None, Vec::new()),
        Some(saved) => {
            let chunks: Vec<Vec<u8>> = saved
                .chunks(SNAPSHOT_CHUNK_BYTES)
                .map(<[u8]>::to_vec)
                .collect();
            let header = SnapshotHeader {
                version: RECORD_VERSION,
                chunks: chunks.len() as u16,
                len: saved.len() as u64,
                hash: *blake3::hash(&saved).as_bytes(),
                changes: 0,
            };
            let bytes = layout::encode(&header);
            (Some((header, bytes)), chunks)
        }
    };
    let mut changes: Vec<(ChangeHash, Vec<u8>)> = changes
        .into_iter()
        .map(|c| {
            let hash = Change::from_bytes(c.clone()).map_or([0; 32], |ch| ch.hash().0);
            (hash, c)
        })
        .collect();
    changes.sort();
    StoredDoc {
        name: DocName::new("d").unwrap(),
        meta_bytes: layout::encode(&meta),
        meta,
        header,
        chunks,
        changes,
    }
}

/// `n` changes made on `doc`, the i-th setting key `k<from + i>`, each depending on the
/// one before, for tests.
#[cfg(test)]
pub(crate) fn test_changes(doc: &mut Automerge, from: usize, n: usize) -> Vec<Vec<u8>> {
    use automerge::transaction::Transactable;
    (from..from + n)
        .map(|i| {
            let mut tx = doc.transaction();
            tx.put(automerge::ROOT, format!("k{i}"), i as i64)
                .expect("put on the root");
            tx.commit();
            doc.get_last_local_change()
                .expect("just committed")
                .raw_bytes()
                .to_vec()
        })
        .collect()
}

/// Runs Automerge work that may panic: automerge 0.12 panics on some damaged input that it
/// parses (found by `assembling_damaged_changes_never_panics`). The value touched by `work`
/// is discarded on a panic, so no half-updated document escapes.
pub(crate) fn no_panic<T>(work: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).map_err(|panic| {
        let reason = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        format!("rejected by Automerge (it panicked: {reason})")
    })
}

/// The raw changes in `bytes`: one change, or every change of a saved document (as written
/// by `Automerge.save` of any implementation). `Err`: neither, with Automerge's reason.
pub fn changes_in(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    if let Ok(Ok(_)) = no_panic(|| Change::from_bytes(bytes.to_vec())) {
        return Ok(vec![bytes.to_vec()]);
    }
    let doc = no_panic(|| Automerge::load(bytes))?.map_err(|e| e.to_string())?;
    Ok(doc
        .get_changes(&[])
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect())
}

/// Builds a document from a saved snapshot (if any) and changes, as a node serves it
/// (`ClientResponse::Doc`). Every change must parse and end up applied: a change whose
/// dependencies are missing means the data is incomplete, and is reported as corrupt.
pub fn assemble<'a>(
    name: &str,
    snapshot: Option<&[u8]>,
    changes: impl Iterator<Item = &'a [u8]>,
) -> Result<Automerge, DocError> {
    let corrupt = |reason: String| DocError::Corrupt {
        name: name.to_string(),
        reason,
    };
    let mut doc = match snapshot {
        Some(bytes) => no_panic(|| Automerge::load(bytes))
            .map_err(&corrupt)?
            .map_err(|e| corrupt(format!("snapshot: {e}")))?,
        None => Automerge::new(),
    };
    let mut parsed = Vec::new();
    for bytes in changes {
        let change = no_panic(|| Change::from_bytes(bytes.to_vec()))
            .map_err(&corrupt)?
            .map_err(|e| corrupt(format!("change: {e}")))?;
        parsed.push(change);
    }
    let hashes: Vec<_> = parsed.iter().map(|c| c.hash()).collect();
    no_panic(|| doc.apply_changes(parsed))
        .map_err(&corrupt)?
        .map_err(|e| corrupt(format!("applying changes: {e}")))?;
    if let Some(h) = hashes
        .iter()
        .find(|h| doc.get_change_meta_by_hash(h).is_none())
    {
        return Err(corrupt(format!("change {h} is missing dependencies")));
    }
    Ok(doc)
}

/// A new document's transaction: creates it unless one of that name exists.
pub fn plan_create(name: &DocName, incarnation: [u8; 16], now_ms: u64) -> SystemTxn {
    let meta = DocMeta {
        version: RECORD_VERSION,
        incarnation,
        created_at_ms: now_ms,
    };
    SystemTxn {
        require: vec![(layout::meta_key(name), None)],
        writes: vec![SystemOp::Put {
            key: layout::meta_key(name),
            value: layout::encode(&meta),
        }],
    }
}

/// Deletes the document and everything stored under it.
pub fn plan_delete(stored: &StoredDoc) -> SystemTxn {
    SystemTxn {
        require: vec![stored.require_meta()],
        writes: vec![
            SystemOp::Delete {
                key: layout::meta_key(&stored.name),
            },
            SystemOp::DeletePrefix {
                prefix: layout::data_prefix(&stored.name),
            },
        ],
    }
}

/// What committing a request's changes takes.
#[derive(Debug)]
pub struct ChangePlan {
    /// Hashes of the changes the document does not have yet, in request order.
    pub added: Vec<ChangeHash>,
    /// The transaction to propose; `None` when every change is already there.
    pub txn: Option<SystemTxn>,
    /// Heads the document will have once the transaction is applied (if nothing else is).
    pub heads: Vec<ChangeHash>,
}

/// Automerge's chunk header: magic bytes, then a 4-byte checksum, the chunk type, and the
/// data length (unsigned LEB128).
const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_CHANGE: u8 = 1;
const CHUNK_COMPRESSED_CHANGE: u8 = 2;

/// Refuses, before Automerge sees them, chunks that are not changes and compressed changes
/// that inflate past [`MAX_CHANGE_BYTES`]: Automerge inflates a compressed chunk with an
/// unbounded `read_to_end`, so a 1 MiB change could otherwise take gigabytes.
fn check_chunk(index: usize, bytes: &[u8]) -> Result<(), DocError> {
    let invalid = |reason: &str| DocError::InvalidChange {
        index,
        reason: reason.to_string(),
    };
    let Some(rest) = bytes.strip_prefix(&CHUNK_MAGIC[..]) else {
        return Err(invalid("not an Automerge chunk (bad magic bytes)"));
    };
    let Some((&kind, mut rest)) = rest.get(4..).and_then(|r| r.split_first()) else {
        return Err(invalid("truncated chunk header"));
    };
    match kind {
        CHUNK_CHANGE => Ok(()),
        CHUNK_COMPRESSED_CHANGE => {
            let mut len: u64 = 0;
            let mut shift = 0;
            loop {
                let Some((&b, r)) = rest.split_first() else {
                    return Err(invalid("truncated chunk length"));
                };
                rest = r;
                if shift > 63 {
                    return Err(invalid("chunk length overflows"));
                }
                len |= u64::from(b & 0x7f) << shift;
                shift += 7;
                if b & 0x80 == 0 {
                    break;
                }
            }
            let data = usize::try_from(len)
                .ok()
                .and_then(|len| rest.get(..len))
                .ok_or_else(|| invalid("chunk shorter than its declared length"))?;
            use std::io::Read;
            let mut inflated = 0usize;
            let mut decoder = flate2::bufread::DeflateDecoder::new(data);
            let mut buf = [0u8; 16 * 1024];
            loop {
                match decoder.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => inflated += n,
                    Err(e) => return Err(invalid(&format!("bad compressed data: {e}"))),
                }
                if inflated > MAX_CHANGE_BYTES {
                    return Err(DocError::Inflates {
                        index,
                        max: MAX_CHANGE_BYTES,
                    });
                }
            }
        }
        other => Err(invalid(&format!(
            "chunk type {other} is not a change (send changes, or a saved document through `doc apply`, which splits it)"
        ))),
    }
}

const CHUNK_DOCUMENT: u8 = 0;
/// Bit of a column specification that says the column is DEFLATE-compressed.
const COLUMN_DEFLATE: u64 = 0b1000;

/// Reads an unsigned LEB128 number off the front of `input`.
fn take_uleb(input: &mut &[u8]) -> Option<u64> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = input.split_first()?;
        *input = rest;
        value |= u64::from(b & 0x7f).checked_shl(shift)?;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn take_bytes<'a>(input: &mut &'a [u8], n: u64) -> Option<&'a [u8]> {
    let n = usize::try_from(n).ok()?;
    let (taken, rest) = (input.get(..n)?, input.get(n..)?);
    *input = rest;
    Some(taken)
}

/// Splits bytes holding Automerge chunks end to end (what Automerge's `load_incremental`
/// takes, e.g. the changes of an Automerge sync message) into the chunks, each with its type
/// byte. Every length is checked against the bytes that remain; nothing is copied.
pub fn split_chunks(bytes: &[u8]) -> Result<Vec<(u8, &[u8])>, DocError> {
    let invalid = |at: usize, reason: &str| DocError::InvalidChange {
        index: at,
        reason: format!("chunk at byte {at}: {reason}"),
    };
    let mut chunks = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let chunk = &bytes[at..];
        let mut rest = chunk
            .strip_prefix(&CHUNK_MAGIC[..])
            .ok_or_else(|| invalid(at, "not an Automerge chunk (bad magic bytes)"))?;
        let (&kind, r) = rest
            .get(4..)
            .and_then(|r| r.split_first())
            .ok_or_else(|| invalid(at, "truncated chunk header"))?;
        rest = r;
        let len = take_uleb(&mut rest).ok_or_else(|| invalid(at, "truncated chunk length"))?;
        take_bytes(&mut rest, len)
            .ok_or_else(|| invalid(at, "shorter than its declared length"))?;
        let size = chunk.len() - rest.len();
        chunks.push((kind, &chunk[..size]));
        at += size;
    }
    Ok(chunks)
}

/// The changes in chunks received from an untrusted peer (an Automerge sync message's
/// changes): each change chunk parsed as [`parse_change`] parses it (bounds first), each
/// document chunk loaded as [`load_saved`] loads it and all its changes taken. CPU work:
/// callers off the async executor.
pub fn received_changes(bytes: &[u8]) -> Result<Vec<Change>, DocError> {
    let mut changes = Vec::new();
    for (index, (kind, chunk)) in split_chunks(bytes)?.into_iter().enumerate() {
        if kind == CHUNK_DOCUMENT {
            changes.extend(load_saved(chunk)?.get_changes(&[]));
        } else {
            changes.push(parse_change(index, chunk.to_vec())?);
        }
    }
    Ok(changes)
}

/// Refuses, before Automerge sees them, bytes that are not exactly one document chunk (what
/// `save` writes), and a document whose compressed columns inflate past `max` bytes in all:
/// Automerge inflates columns with an unbounded `read_to_end`. Walks the chunk's layout
/// (actors, heads, column specifications and lengths) without building anything; every
/// count is bounded by the bytes that must follow it.
pub fn check_saved_document(bytes: &[u8], max: usize) -> Result<(), DocError> {
    let invalid = |reason: &str| DocError::InvalidDocument(reason.to_string());
    let truncated = || invalid("truncated document chunk");
    let rest = bytes
        .strip_prefix(&CHUNK_MAGIC[..])
        .ok_or_else(|| invalid("not an Automerge chunk (bad magic bytes)"))?;
    let (&kind, mut rest) = rest
        .get(4..)
        .and_then(|r| r.split_first())
        .ok_or_else(truncated)?;
    if kind != CHUNK_DOCUMENT {
        return Err(invalid(&format!("chunk type {kind} is not a document")));
    }
    let len = take_uleb(&mut rest).ok_or_else(truncated)?;
    let mut body = take_bytes(&mut rest, len).ok_or_else(truncated)?;
    if !rest.is_empty() {
        return Err(invalid("bytes after the document chunk"));
    }
    let actors = take_uleb(&mut body).ok_or_else(truncated)?;
    for _ in 0..actors {
        let n = take_uleb(&mut body).ok_or_else(truncated)?;
        take_bytes(&mut body, n).ok_or_else(truncated)?;
    }
    let heads = take_uleb(&mut body).ok_or_else(truncated)?;
    take_bytes(&mut body, heads.checked_mul(32).ok_or_else(truncated)?).ok_or_else(truncated)?;
    let mut columns = Vec::new();
    for _ in 0..2 {
        let n = take_uleb(&mut body).ok_or_else(truncated)?;
        for _ in 0..n {
            let spec = take_uleb(&mut body).ok_or_else(truncated)?;
            let len = take_uleb(&mut body).ok_or_else(truncated)?;
            columns.push((spec, len));
        }
    }
    let mut inflated = 0usize;
    for (spec, len) in columns {
        let data = take_bytes(&mut body, len).ok_or_else(truncated)?;
        if spec & COLUMN_DEFLATE == 0 {
            inflated += data.len();
        } else {
            use std::io::Read;
            let mut decoder = flate2::bufread::DeflateDecoder::new(data);
            let mut buf = [0u8; 16 * 1024];
            loop {
                match decoder.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => inflated += n,
                    Err(e) => return Err(invalid(&format!("bad compressed column: {e}"))),
                }
                if inflated > max {
                    break;
                }
            }
        }
        if inflated > max {
            return Err(invalid(&format!("its columns inflate past {max} bytes")));
        }
    }
    Ok(())
}

/// Loads a saved document received from elsewhere: `check_saved_document` first, then
/// Automerge (its panics caught). CPU work: callers off the async executor.
pub fn load_saved(bytes: &[u8]) -> Result<Automerge, DocError> {
    check_saved_document(bytes, crate::limits::MAX_DOC_INFLATED_BYTES)?;
    no_panic(|| Automerge::load(bytes))
        .map_err(DocError::InvalidDocument)?
        .map_err(|e| DocError::InvalidDocument(e.to_string()))
}

/// Parses one raw change (number `index` of a request) with the bounds checked first: its
/// size, its chunk type, and how far a compressed change inflates. Automerge panics are
/// caught. CPU work: callers off the async executor.
pub fn parse_change(index: usize, bytes: Vec<u8>) -> Result<Change, DocError> {
    if bytes.len() > MAX_CHANGE_BYTES {
        return Err(DocError::ChangeTooLarge {
            index,
            len: bytes.len(),
            max: MAX_CHANGE_BYTES,
        });
    }
    check_chunk(index, &bytes)?;
    no_panic(|| Change::from_bytes(bytes))
        .map_err(|reason| DocError::InvalidChange { index, reason })?
        .map_err(|e| DocError::InvalidChange {
            index,
            reason: e.to_string(),
        })
}

/// The changes of `changes` that `doc` does not have yet (parsed, duplicates dropped, in the
/// order given).
fn new_changes(doc: &Automerge, changes: Vec<Vec<u8>>) -> Result<Vec<Change>, DocError> {
    Ok(new_changes_beside(doc, &HashSet::new(), changes)?.new)
}

/// A request's changes as checked for a batch.
struct Checked {
    /// The changes neither the document nor an earlier request of the batch has.
    new: Vec<Change>,
    /// Its changes that only an earlier request of the batch has.
    earlier: Vec<automerge::ChangeHash>,
}

/// [`new_changes`], the changes in `present` (earlier requests') counting as in the
/// document.
fn new_changes_beside(
    doc: &Automerge,
    present: &HashSet<automerge::ChangeHash>,
    changes: Vec<Vec<u8>>,
) -> Result<Checked, DocError> {
    let mut checked = Checked {
        new: Vec::new(),
        earlier: Vec::new(),
    };
    let mut seen = HashSet::new();
    for (index, bytes) in changes.into_iter().enumerate() {
        let change = parse_change(index, bytes)?;
        let hash = change.hash();
        if doc.get_change_meta_by_hash(&hash).is_some() || !seen.insert(hash) {
            continue;
        }
        if present.contains(&hash) {
            checked.earlier.push(hash);
        } else {
            checked.new.push(change);
        }
    }
    Ok(checked)
}

/// `doc` with `parsed` applied (a copy): every change must be applied (none left waiting for
/// dependencies) and Automerge must accept it.
fn applied_copy(doc: &Automerge, parsed: &[Change]) -> Result<Automerge, DocError> {
    let mut trial = doc.clone();
    let invalid = |reason: String| DocError::InvalidChange { index: 0, reason };
    no_panic(|| trial.apply_changes(parsed.to_vec()))
        .map_err(invalid)?
        .map_err(|e| invalid(e.to_string()))?;
    for change in parsed {
        if trial.get_change_meta_by_hash(&change.hash()).is_none() {
            let missing = change
                .deps()
                .iter()
                .filter(|d| trial.get_change_meta_by_hash(d).is_none())
                .map(|d| d.to_string())
                .collect();
            return Err(DocError::MissingDependencies {
                change: change.hash().to_string(),
                missing,
            });
        }
    }
    Ok(trial)
}

/// Checks raw Automerge changes against the loaded document `doc` (of `stored`) and plans
/// the transaction that stores the new ones. A change must parse, be within the limits, and
/// have all its dependencies in the document or in the same request; the document must stay
/// within [`MAX_DOC_BYTES`]. Changes the document already has are skipped (retries are
/// harmless). CPU work: callers off the async executor.
pub fn plan_changes(
    stored: &StoredDoc,
    doc: &Automerge,
    changes: Vec<Vec<u8>>,
) -> Result<ChangePlan, DocError> {
    check_request(&changes)?;
    let parsed = new_changes(doc, changes)?;
    if parsed.is_empty() {
        return Ok(unchanged(doc));
    }
    let added_bytes: usize = parsed.iter().map(|c| c.raw_bytes().len()).sum();
    let len = stored.stored_bytes() + added_bytes;
    if len > MAX_DOC_BYTES {
        return Err(DocError::TooLarge {
            len,
            max: MAX_DOC_BYTES,
        });
    }
    let trial = applied_copy(doc, &parsed)?;
    let writes = parsed
        .iter()
        .map(|c| SystemOp::Put {
            key: layout::change_key(&stored.name, &c.hash().0),
            value: c.raw_bytes().to_vec(),
        })
        .collect();
    Ok(ChangePlan {
        added: parsed.iter().map(|c| c.hash().0).collect(),
        txn: Some(SystemTxn {
            require: vec![stored.require_meta()],
            writes,
        }),
        heads: trial.get_heads().iter().map(|h| h.0).collect(),
    })
}

/// Checks a request's size before anything is parsed.
fn check_request(changes: &[Vec<u8>]) -> Result<(), DocError> {
    if changes.len() > MAX_CHANGES_PER_REQUEST {
        return Err(DocError::TooManyChanges {
            len: changes.len(),
            max: MAX_CHANGES_PER_REQUEST,
        });
    }
    let total: usize = changes.iter().map(Vec::len).sum();
    if total > MAX_REQUEST_BYTES {
        return Err(DocError::TooLarge {
            len: total,
            max: MAX_REQUEST_BYTES,
        });
    }
    Ok(())
}

/// The first of `parsed` that could not be applied to `doc` with the changes `present` (a
/// dependency in neither nor among `parsed`, directly or through another of them), with the
/// dependencies it lacks: what a trial apply would leave waiting, found without applying
/// anything.
fn missing_dependencies(
    doc: &Automerge,
    present: &HashSet<automerge::ChangeHash>,
    parsed: &[Change],
) -> Option<DocError> {
    let have =
        |d: &automerge::ChangeHash| present.contains(d) || doc.get_change_meta_by_hash(d).is_some();
    let mut ready: HashSet<automerge::ChangeHash> = HashSet::new();
    loop {
        let before = ready.len();
        for change in parsed {
            if !ready.contains(&change.hash())
                && change.deps().iter().all(|d| ready.contains(d) || have(d))
            {
                ready.insert(change.hash());
            }
        }
        if ready.len() == before {
            break;
        }
    }
    let change = parsed.iter().find(|c| !ready.contains(&c.hash()))?;
    Some(DocError::MissingDependencies {
        change: change.hash().to_string(),
        missing: change
            .deps()
            .iter()
            .filter(|d| !ready.contains(d) && !have(d))
            .map(|d| d.to_string())
            .collect(),
    })
}

/// One request of a batch as [`plan_batch`] accepted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Hashes of the changes the document did not have yet, in request order.
    pub added: Vec<ChangeHash>,
    /// Heads the document has with this request and the ones accepted before it applied.
    pub heads: Vec<ChangeHash>,
}

/// What [`plan_batch`] decided.
#[derive(Debug)]
pub struct BatchPlan {
    /// Each request's outcome, in the order given.
    pub outcomes: Vec<Result<Accepted, DocError>>,
    /// The one transaction that stores every accepted new change; `None` when no request adds
    /// any.
    pub txn: Option<SystemTxn>,
    /// Hashes of every change the transaction stores.
    pub added: Vec<ChangeHash>,
    /// Bytes of those changes.
    pub added_bytes: usize,
}

/// Plans several requests' changes to one document as one transaction. Each request is
/// checked as [`plan_changes`] checks it, against `doc` with the requests accepted before it
/// applied (so a request may build on an earlier one of the batch); a refused request changes
/// nothing. The accepted changes are applied to `doc` itself rather than to a copy, all in
/// one call (applying a change costs Automerge time in proportion to the document, so one
/// apply for the batch is much cheaper than one per request): every dependency is checked to
/// be present first, so Automerge applies them all or refuses; if it refuses (or panics),
/// `doc` is rebuilt from `stored` and the requests are applied one by one, so that only the
/// refused ones are refused. On return `doc` is the document `stored` describes with every
/// accepted change applied. `Err`: a rebuild failed (what is stored is corrupt), and `doc`
/// must be dropped. CPU work: callers off the async executor.
pub fn plan_batch(
    stored: &StoredDoc,
    doc: &mut Automerge,
    requests: Vec<Vec<Vec<u8>>>,
) -> Result<BatchPlan, DocError> {
    // Every request checked, nothing applied: the new changes of each accepted one.
    let mut present = HashSet::new();
    let mut added_bytes = 0;
    let mut checked: Vec<Result<Checked, DocError>> = Vec::with_capacity(requests.len());
    for changes in requests {
        let outcome = (|| {
            check_request(&changes)?;
            let request = new_changes_beside(doc, &present, changes)?;
            let parsed = &request.new;
            let bytes: usize = parsed.iter().map(|c| c.raw_bytes().len()).sum();
            let len = stored.stored_bytes() + added_bytes + bytes;
            if len > MAX_DOC_BYTES {
                return Err(DocError::TooLarge {
                    len,
                    max: MAX_DOC_BYTES,
                });
            }
            if let Some(e) = missing_dependencies(doc, &present, parsed) {
                return Err(e);
            }
            added_bytes += bytes;
            present.extend(parsed.iter().map(Change::hash));
            Ok(request)
        })();
        checked.push(outcome);
    }
    // The accepted changes applied at once, the heads after each request worked out from
    // the dependencies (a new change is a head until a later one depends on it).
    let all: Vec<Change> = checked
        .iter()
        .flatten()
        .flat_map(|c| c.new.iter().cloned())
        .collect();
    let hashes: Vec<_> = all.iter().map(Change::hash).collect();
    let mut heads: std::collections::BTreeSet<_> = doc.get_heads().into_iter().collect();
    let applied = all.is_empty()
        || matches!(no_panic(|| doc.apply_changes(all)), Ok(Ok(())))
            && hashes
                .iter()
                .all(|h| doc.get_change_meta_by_hash(h).is_some());
    if !applied {
        *doc = stored.load()?;
        return plan_one_by_one(stored, doc, checked);
    }
    let mut plan = BatchPlan {
        outcomes: Vec::with_capacity(checked.len()),
        txn: None,
        added: Vec::new(),
        added_bytes: 0,
    };
    let mut writes = Vec::new();
    for outcome in checked {
        plan.outcomes.push(outcome.map(|Checked { new, .. }| {
            heads.extend(new.iter().map(Change::hash));
            for change in &new {
                for dep in change.deps() {
                    heads.remove(dep);
                }
            }
            let added = new.iter().map(|c| c.hash().0).collect();
            for change in new {
                plan.added.push(change.hash().0);
                plan.added_bytes += change.raw_bytes().len();
                writes.push(SystemOp::Put {
                    key: layout::change_key(&stored.name, &change.hash().0),
                    value: change.raw_bytes().to_vec(),
                });
            }
            Accepted {
                added,
                heads: heads.iter().map(|h| h.0).collect(),
            }
        }));
    }
    if !writes.is_empty() {
        plan.txn = Some(SystemTxn {
            require: vec![stored.require_meta()],
            writes,
        });
    }
    Ok(plan)
}

/// [`plan_batch`] once Automerge refused the batch as a whole: `doc` is as stored, and the
/// requests `checked` accepted are applied one at a time (their dependencies checked again,
/// as an earlier request may now be refused; a change that only an earlier request had
/// becomes the later one's to add), `doc` rebuilt after each refusal.
fn plan_one_by_one(
    stored: &StoredDoc,
    doc: &mut Automerge,
    checked: Vec<Result<Checked, DocError>>,
) -> Result<BatchPlan, DocError> {
    let mut plan = BatchPlan {
        outcomes: Vec::with_capacity(checked.len()),
        txn: None,
        added: Vec::new(),
        added_bytes: 0,
    };
    let by_hash: std::collections::HashMap<automerge::ChangeHash, Change> = checked
        .iter()
        .flatten()
        .flat_map(|c| c.new.iter().map(|c| (c.hash(), c.clone())))
        .collect();
    let mut writes: Vec<SystemOp> = Vec::new();
    let none = HashSet::new();
    for outcome in checked {
        let mut damaged = false;
        let outcome = outcome.and_then(|Checked { mut new, earlier }| {
            for hash in earlier {
                if doc.get_change_meta_by_hash(&hash).is_none() {
                    new.extend(by_hash.get(&hash).cloned());
                }
            }
            if let Some(e) = missing_dependencies(doc, &none, &new) {
                return Err(e);
            }
            let raw: Vec<(ChangeHash, Vec<u8>)> = new
                .iter()
                .map(|c| (c.hash().0, c.raw_bytes().to_vec()))
                .collect();
            if new.is_empty() {
                return Ok(raw);
            }
            let refused = match no_panic(|| doc.apply_changes(new)) {
                Err(reason) => Some(reason),
                Ok(Err(e)) => Some(e.to_string()),
                Ok(Ok(())) => raw
                    .iter()
                    .any(|(h, _)| {
                        doc.get_change_meta_by_hash(&automerge::ChangeHash(*h))
                            .is_none()
                    })
                    .then(|| "Automerge did not apply it".to_string()),
            };
            match refused {
                Some(reason) => {
                    damaged = true;
                    Err(DocError::InvalidChange { index: 0, reason })
                }
                None => Ok(raw),
            }
        });
        if damaged {
            // `doc` may hold part of the refused request.
            *doc = rebuild(stored, &writes)?;
        }
        match outcome {
            Ok(new) => {
                for (hash, bytes) in &new {
                    plan.added_bytes += bytes.len();
                    plan.added.push(*hash);
                    writes.push(SystemOp::Put {
                        key: layout::change_key(&stored.name, hash),
                        value: bytes.clone(),
                    });
                }
                plan.outcomes.push(Ok(Accepted {
                    added: new.into_iter().map(|(h, _)| h).collect(),
                    heads: doc.get_heads().iter().map(|h| h.0).collect(),
                }));
            }
            Err(refusal) => plan.outcomes.push(Err(refusal)),
        }
    }
    if !writes.is_empty() {
        plan.txn = Some(SystemTxn {
            require: vec![stored.require_meta()],
            writes,
        });
    }
    Ok(plan)
}

/// The document `stored` describes with the changes `writes` puts applied (all of them
/// applied once already).
fn rebuild(stored: &StoredDoc, writes: &[SystemOp]) -> Result<Automerge, DocError> {
    let mut doc = stored.load()?;
    let mut changes = Vec::new();
    for op in writes {
        if let SystemOp::Put { value, .. } = op {
            changes.push(
                no_panic(|| Change::from_bytes(value.clone()))
                    .map_err(|e| stored.corrupt(e))?
                    .map_err(|e| stored.corrupt(e.to_string()))?,
            );
        }
    }
    no_panic(|| doc.apply_changes(changes))
        .map_err(|e| stored.corrupt(e))?
        .map_err(|e| stored.corrupt(format!("re-applying accepted changes: {e}")))?;
    Ok(doc)
}

fn unchanged(doc: &Automerge) -> ChangePlan {
    ChangePlan {
        added: Vec::new(),
        txn: None,
        heads: doc.get_heads().iter().map(|h| h.0).collect(),
    }
}

/// A merge already done by whoever verified the changes: the merged document and the hashes
/// of the changes it added.
pub struct Merged {
    pub doc: Automerge,
    pub added: Vec<ChangeHash>,
}

/// Like [`plan_changes`], for changes pulled from another cluster (already verified against
/// its signed manifest): any number of them. What fits one request is stored as changes;
/// more is merged into `doc` and stored as one snapshot (so a first pull of a long history
/// is one Raft entry, not thousands). With `merged` (the same changes already merged into a
/// copy of `doc` or of an older state of it), a large import uses that document as long as it
/// holds every head of `doc`, instead of parsing and applying everything again. The document
/// must stay within [`MAX_DOC_BYTES`].
pub fn plan_import(
    stored: &StoredDoc,
    doc: &Automerge,
    changes: Vec<Vec<u8>>,
    merged: Option<Merged>,
) -> Result<ChangePlan, DocError> {
    let total: usize = changes.iter().map(Vec::len).sum();
    if changes.len() <= MAX_CHANGES_PER_REQUEST && total <= MAX_REQUEST_BYTES {
        return plan_changes(stored, doc, changes);
    }
    if let Some(merged) = merged.filter(|m| {
        doc.get_heads()
            .iter()
            .all(|h| m.doc.get_change_meta_by_hash(h).is_some())
    }) {
        return plan_replace(stored, doc, merged);
    }
    let parsed = new_changes(doc, changes)?;
    if parsed.is_empty() {
        return Ok(unchanged(doc));
    }
    let merged = applied_copy(doc, &parsed)?;
    let (txn, _) = snapshot_txn(stored, &merged).ok_or_else(|| DocError::TooLarge {
        len: stored.stored_bytes() + total,
        max: MAX_DOC_BYTES,
    })?;
    Ok(ChangePlan {
        added: parsed.iter().map(|c| c.hash().0).collect(),
        txn: Some(txn),
        heads: merged.get_heads().iter().map(|h| h.0).collect(),
    })
}

/// Stores `merged.doc` (which must hold every head of `doc`, the stored document) as the
/// document's one snapshot: for a document pulled whole from another cluster, already
/// verified against its signed manifest.
pub fn plan_replace(
    stored: &StoredDoc,
    doc: &Automerge,
    merged: Merged,
) -> Result<ChangePlan, DocError> {
    if let Some(h) = doc
        .get_heads()
        .iter()
        .find(|h| merged.doc.get_change_meta_by_hash(h).is_none())
    {
        return Err(DocError::InvalidDocument(format!(
            "it lacks change {} of the stored document",
            crate::hash_hex(&h.0)
        )));
    }
    let (txn, _) = snapshot_txn(stored, &merged.doc).ok_or_else(|| DocError::TooLarge {
        len: merged.doc.save().len(),
        max: MAX_DOC_BYTES,
    })?;
    Ok(ChangePlan {
        added: merged.added,
        txn: Some(txn),
        heads: merged.doc.get_heads().iter().map(|h| h.0).collect(),
    })
}

/// If the document has enough pending changes, the transaction that replaces them with a
/// compacted snapshot of `doc` (loaded from `stored`). `None`: nothing to do, or the
/// snapshot would exceed [`MAX_DOC_BYTES`] (the changes then stay as they are).
pub fn plan_compaction(stored: &StoredDoc, doc: &Automerge) -> Option<Compaction> {
    if !stored.wants_compaction() {
        return None;
    }
    let (txn, snapshot) = snapshot_txn(stored, doc)?;
    Some(Compaction { txn, snapshot })
}

/// A compaction planned by [`plan_compaction`].
#[derive(Debug)]
pub struct Compaction {
    pub txn: SystemTxn,
    /// BLAKE3 of the new snapshot (as its header records it).
    pub snapshot: [u8; 32],
}

/// The transaction that stores `doc` (`stored` with changes merged in) as the document's
/// snapshot, replacing the pending changes `stored` lists; `None` if the snapshot would
/// exceed [`MAX_DOC_BYTES`].
fn snapshot_txn(stored: &StoredDoc, doc: &Automerge) -> Option<(SystemTxn, [u8; 32])> {
    let saved = doc.save();
    if saved.len() > MAX_DOC_BYTES {
        return None;
    }
    let chunks: Vec<&[u8]> = saved.chunks(SNAPSHOT_CHUNK_BYTES).collect();
    let header = SnapshotHeader {
        version: RECORD_VERSION,
        chunks: chunks.len() as u16,
        len: saved.len() as u64,
        hash: *blake3::hash(&saved).as_bytes(),
        changes: doc.get_changes(&[]).len() as u64,
    };
    let old_chunks = stored.header.as_ref().map_or(0, |(h, _)| h.chunks);
    let mut writes = vec![SystemOp::Put {
        key: layout::header_key(&stored.name),
        value: layout::encode(&header),
    }];
    for (i, chunk) in chunks.iter().enumerate() {
        writes.push(SystemOp::Put {
            key: layout::chunk_key(&stored.name, i as u16),
            value: chunk.to_vec(),
        });
    }
    for stale in header.chunks..old_chunks {
        writes.push(SystemOp::Delete {
            key: layout::chunk_key(&stored.name, stale),
        });
    }
    for (hash, _) in stored.changes.iter().take(MAX_COMPACTED_CHANGES) {
        writes.push(SystemOp::Delete {
            key: layout::change_key(&stored.name, hash),
        });
    }
    let txn = SystemTxn {
        require: vec![
            stored.require_meta(),
            (
                layout::header_key(&stored.name),
                stored.header.as_ref().map(|(_, bytes)| bytes.clone()),
            ),
        ],
        writes,
    };
    Some((txn, header.hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An empty stored document named `d`, as a fresh `create` leaves it.
    fn empty_stored() -> StoredDoc {
        test_doc([7; 16], None, vec![])
    }

    /// A chain of `n` changes by one actor, each depending on the one before.
    fn chain(n: usize) -> Vec<Vec<u8>> {
        test_changes(&mut Automerge::new(), 0, n)
    }

    #[test]
    fn an_import_of_a_long_history_is_one_snapshot_and_a_short_one_is_changes() {
        let stored = empty_stored();
        let doc = stored.load().unwrap();
        let mut origin = Automerge::new();
        let history = test_changes(&mut origin, 0, MAX_CHANGES_PER_REQUEST + 1);
        let plan = plan_import(&stored, &doc, history.clone(), None).unwrap();
        assert_eq!(plan.added.len(), MAX_CHANGES_PER_REQUEST + 1);
        assert_eq!(plan.heads, vec![origin.get_heads()[0].0]);
        let txn = plan.txn.unwrap();
        assert!(
            txn.writes.iter().any(|w| matches!(w, SystemOp::Put { key, .. } if *key == layout::header_key(&stored.name))),
            "stored as a snapshot"
        );
        // Applying the snapshot gives the origin's document.
        let saved = match &txn.writes[1] {
            SystemOp::Put { value, .. } => value.clone(),
            other => panic!("{other:?}"),
        };
        let loaded = test_doc([7; 16], Some(saved), vec![]).load().unwrap();
        assert_eq!(loaded.get_heads(), origin.get_heads());

        // A short import is plain changes; a change with a missing dependency is refused.
        let plan = plan_import(&stored, &doc, history[..3].to_vec(), None).unwrap();
        assert_eq!(plan.added.len(), 3);
        let mut gap = history.clone();
        gap.remove(1);
        assert!(matches!(
            plan_import(&stored, &doc, gap, None),
            Err(DocError::MissingDependencies { .. })
        ));
    }

    #[test]
    fn an_import_reuses_a_merge_that_holds_the_document_and_redoes_one_that_does_not() {
        let stored = empty_stored();
        let doc = stored.load().unwrap();
        let mut origin = Automerge::new();
        let history = test_changes(&mut origin, 0, MAX_CHANGES_PER_REQUEST + 1);
        let merged = Merged {
            doc: origin.clone(),
            added: vec![[1; 32]],
        };
        let plan = plan_import(&stored, &doc, history.clone(), Some(merged)).unwrap();
        // The given merge was used as it is (its `added` passed through).
        assert_eq!(plan.added, vec![[1; 32]]);
        assert_eq!(plan.heads, vec![origin.get_heads()[0].0]);

        // A merge that lacks a change the document has is not used.
        let mut local = doc.clone();
        let mine = test_changes(&mut local, 1000, 1);
        let stored_local = test_doc([7; 16], None, mine);
        let local = stored_local.load().unwrap();
        let stale = Merged {
            doc: origin.clone(),
            added: vec![[1; 32]],
        };
        let plan = plan_import(&stored_local, &local, history, Some(stale)).unwrap();
        assert_eq!(plan.added.len(), MAX_CHANGES_PER_REQUEST + 1);
        assert_eq!(plan.heads.len(), 2, "both histories");
    }

    #[test]
    fn a_batch_checks_each_request_against_the_ones_before_it() {
        let stored = empty_stored();
        let mut doc = stored.load().unwrap();
        let mut author = Automerge::new();
        let c = test_changes(&mut author, 0, 4);
        // The same actor and sequence number as c[0], another change: Automerge refuses it
        // only when applying (after the dependency check), so `doc` is rebuilt.
        let mut rival = Automerge::new().with_actor(author.get_actor().clone());
        let clash = test_changes(&mut rival, 100, 1);
        let plan = plan_batch(
            &stored,
            &mut doc,
            vec![
                vec![c[0].clone()],
                vec![c[2].clone()], // lacks c[1]: refused, changes nothing
                vec![c[1].clone(), c[2].clone()],
                clash,
                vec![c[0].clone()], // already there: accepted, adds nothing
                vec![b"junk".to_vec()],
                vec![c[3].clone()],
            ],
        )
        .unwrap();
        let hash = |c: &Vec<u8>| Change::from_bytes(c.clone()).unwrap().hash().0;
        let o = &plan.outcomes;
        assert_eq!(o[0].as_ref().unwrap().added, vec![hash(&c[0])]);
        assert!(matches!(o[1], Err(DocError::MissingDependencies { .. })));
        assert_eq!(o[2].as_ref().unwrap().added, vec![hash(&c[1]), hash(&c[2])]);
        assert_eq!(o[2].as_ref().unwrap().heads, vec![hash(&c[2])]);
        assert!(
            matches!(o[3], Err(DocError::InvalidChange { .. })),
            "{:?}",
            o[3]
        );
        assert!(o[4].as_ref().unwrap().added.is_empty());
        assert_eq!(o[4].as_ref().unwrap().heads, vec![hash(&c[2])]);
        assert!(matches!(o[5], Err(DocError::InvalidChange { .. })));
        assert_eq!(o[6].as_ref().unwrap().heads, vec![hash(&c[3])]);
        assert_eq!(plan.added, c.iter().map(hash).collect::<Vec<_>>());
        assert_eq!(plan.added_bytes, c.iter().map(Vec::len).sum::<usize>());
        // `doc` is the author's document, and the transaction stores exactly its changes.
        assert_eq!(doc.get_heads(), author.get_heads());
        assert_eq!(doc.save(), author.save());
        let txn = plan.txn.unwrap();
        assert_eq!(txn.require, vec![stored.require_meta()]);
        assert_eq!(txn.writes.len(), 4);

        // Nothing new: no transaction.
        let plan = plan_batch(&stored, &mut doc, vec![vec![c[3].clone()]]).unwrap();
        assert!(plan.txn.is_none() && plan.added.is_empty());
    }

    #[test]
    fn a_change_sent_again_in_a_batch_is_committed_even_if_its_first_request_is_refused() {
        let stored = empty_stored();
        let mut doc = stored.load().unwrap();
        let mut author = Automerge::new();
        let c = test_changes(&mut author, 0, 1);
        let mut rival = Automerge::new().with_actor(author.get_actor().clone());
        let clash = test_changes(&mut rival, 100, 1);
        let hash = Change::from_bytes(c[0].clone()).unwrap().hash().0;
        let plan = plan_batch(
            &stored,
            &mut doc,
            vec![
                vec![c[0].clone(), clash[0].clone()], // refused by Automerge as a whole
                vec![c[0].clone()],                   // so this one adds c[0]
            ],
        )
        .unwrap();
        assert!(matches!(
            plan.outcomes[0],
            Err(DocError::InvalidChange { .. })
        ));
        assert_eq!(plan.outcomes[1].as_ref().unwrap().added, vec![hash]);
        assert_eq!(plan.added, vec![hash]);
        assert_eq!(doc.get_heads(), author.get_heads());
    }

    #[test]
    fn a_batch_applied_at_once_answers_each_request_with_its_own_heads() {
        let stored = empty_stored();
        let mut doc = stored.load().unwrap();
        let mut a = Automerge::new();
        let mut b = Automerge::new();
        let ca = test_changes(&mut a, 0, 3);
        let cb = test_changes(&mut b, 10, 2);
        let requests = vec![
            vec![ca[0].clone()],
            vec![cb[0].clone()],
            vec![ca[2].clone(), ca[1].clone()],
            vec![cb[1].clone(), ca[0].clone()],
        ];
        let plan = plan_batch(&stored, &mut doc, requests.clone()).unwrap();
        // Each request's heads are what Automerge gives applying the requests one by one.
        let mut reference = Automerge::new();
        for (request, outcome) in requests.into_iter().zip(&plan.outcomes) {
            reference
                .apply_changes(request.into_iter().map(|c| Change::from_bytes(c).unwrap()))
                .unwrap();
            let heads: Vec<_> = reference.get_heads().iter().map(|h| h.0).collect();
            assert_eq!(outcome.as_ref().unwrap().heads, heads);
        }
        assert_eq!(plan.outcomes[3].as_ref().unwrap().added.len(), 1);
        assert_eq!(plan.added.len(), 5);
        assert_eq!(doc.get_heads(), reference.get_heads());
        assert_eq!(crate::view::to_json(&doc), crate::view::to_json(&reference));
    }

    #[test]
    fn a_batch_stays_within_the_document_limit() {
        use automerge::transaction::Transactable;
        let stored = empty_stored();
        let mut doc = stored.load().unwrap();
        let mut author = Automerge::new();
        // Changes of ~0.9 MiB of incompressible bytes each: the 18th would pass 16 MiB.
        let mut state = 1u64;
        let requests: Vec<Vec<Vec<u8>>> = (0..18)
            .map(|i| {
                let bytes: Vec<u8> = (0..MAX_CHANGE_BYTES * 9 / 10 / 8)
                    .flat_map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        state.to_le_bytes()
                    })
                    .collect();
                let mut tx = author.transaction();
                tx.put(automerge::ROOT, format!("k{i}"), bytes).unwrap();
                tx.commit();
                vec![author.get_last_local_change().unwrap().raw_bytes().to_vec()]
            })
            .collect();
        let plan = plan_batch(&stored, &mut doc, requests).unwrap();
        assert!(plan.outcomes[..17].iter().all(Result::is_ok));
        assert!(matches!(plan.outcomes[17], Err(DocError::TooLarge { .. })));
        assert!(plan.added_bytes <= MAX_DOC_BYTES);
    }

    #[test]
    fn a_compressed_change_that_inflates_past_the_limit_is_refused() {
        use std::io::Write;
        // A compressed-change chunk whose data inflates to 64 MiB of zeros (a few KiB).
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            enc.write_all(&zeros).unwrap();
        }
        let data = enc.finish().unwrap();
        assert!(data.len() < MAX_CHANGE_BYTES);
        let mut chunk = CHUNK_MAGIC.to_vec();
        chunk.extend([0; 4]);
        chunk.push(CHUNK_COMPRESSED_CHANGE);
        let mut len = data.len() as u64;
        loop {
            let b = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                chunk.push(b);
                break;
            }
            chunk.push(b | 0x80);
        }
        chunk.extend(&data);
        let stored = empty_stored();
        let doc = stored.load().unwrap();
        assert!(matches!(
            plan_changes(&stored, &doc, vec![chunk]),
            Err(DocError::Inflates { index: 0, .. })
        ));
        // A real change that Automerge compressed is still accepted.
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        use automerge::transaction::Transactable;
        tx.put(automerge::ROOT, "text", "x".repeat(10_000)).unwrap();
        tx.commit();
        let mut change = doc.get_changes(&[]).into_iter().next().unwrap().clone();
        let compressed = change.bytes().to_vec();
        assert_eq!(
            compressed[8], CHUNK_COMPRESSED_CHANGE,
            "automerge compressed it"
        );
        let stored = empty_stored();
        let empty = stored.load().unwrap();
        assert_eq!(
            plan_changes(&stored, &empty, vec![compressed])
                .unwrap()
                .added
                .len(),
            1
        );
    }

    fn uleb(mut n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    }

    /// A saved document loads; other chunks, trailing bytes and a column that inflates past
    /// the bound are refused before Automerge sees them.
    #[test]
    fn saved_documents_are_checked_before_loading() {
        let mut doc = Automerge::new();
        for i in 0..200 {
            let ops = crate::patch::parse(&format!(
                r#"[{{"op": "set", "path": ["k{}"], "value": "{}"}}]"#,
                i % 7,
                "x".repeat(i)
            ))
            .unwrap();
            crate::patch::apply(&mut doc, &ops, None, 0).unwrap();
        }
        let saved = doc.save();
        let loaded = load_saved(&saved).unwrap();
        assert_eq!(loaded.get_heads(), doc.get_heads());
        // A change, and a document with anything after it: refused.
        let change = doc.get_last_local_change().unwrap().raw_bytes().to_vec();
        assert!(matches!(
            load_saved(&change),
            Err(DocError::InvalidDocument(_))
        ));
        let mut longer = saved.clone();
        longer.extend_from_slice(&change);
        assert!(matches!(
            load_saved(&longer),
            Err(DocError::InvalidDocument(_))
        ));
        // A bound below what this document's columns take: refused.
        assert!(check_saved_document(&saved, 16).is_err());
        // A column of 256 MiB of zeros, deflated to a few hundred KiB: refused at the bound.
        let bomb = {
            use std::io::Write;
            let mut enc =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..256 {
                enc.write_all(&zeros).unwrap();
            }
            enc.finish().unwrap()
        };
        let mut body = vec![0, 0]; // no actors, no heads
        body.push(1); // one change column: (spec with the deflate bit, length)
        body.push(COLUMN_DEFLATE as u8 | 0x10);
        body.extend(uleb(bomb.len()));
        body.push(0); // no op columns
        body.extend_from_slice(&bomb);
        let mut chunk = CHUNK_MAGIC.to_vec();
        chunk.extend_from_slice(&[0; 4]);
        chunk.push(CHUNK_DOCUMENT);
        chunk.extend(uleb(body.len()));
        chunk.extend_from_slice(&body);
        match load_saved(&chunk) {
            Err(DocError::InvalidDocument(why)) => assert!(why.contains("inflate"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// A document with `n` changes, each setting one key.
    fn doc_of(n: usize) -> Automerge {
        let mut doc = Automerge::new();
        for i in 0..n {
            let ops = crate::patch::parse(&format!(
                r#"[{{"op": "set", "path": ["k{i}"], "value": {i}}}]"#
            ))
            .unwrap();
            crate::patch::apply(&mut doc, &ops, None, 0).unwrap();
        }
        doc
    }

    #[test]
    fn received_chunks_split_into_the_changes_they_hold() {
        let doc = doc_of(5);
        let changes: Vec<_> = doc.get_changes(&[]);
        // Changes end to end, as an Automerge sync message (v2) carries them.
        let stream: Vec<u8> = changes
            .iter()
            .flat_map(|c| c.raw_bytes().to_vec())
            .collect();
        let split = split_chunks(&stream).unwrap();
        assert_eq!(split.len(), 5);
        let got: Vec<_> = received_changes(&stream)
            .unwrap()
            .iter()
            .map(|c| c.hash())
            .collect();
        let want: Vec<_> = changes.iter().map(|c| c.hash()).collect();
        assert_eq!(got, want);
        // A whole saved document (what a sync message sends a peer that has nothing).
        let got: Vec<_> = received_changes(&doc.save())
            .unwrap()
            .iter()
            .map(|c| c.hash())
            .collect();
        assert_eq!(got.len(), 5);
        assert!(want.iter().all(|h| got.contains(h)));
        // Cut short, or followed by junk: refused.
        assert!(split_chunks(&stream[..stream.len() - 1]).is_err());
        let mut junk = stream.clone();
        junk.push(0);
        assert!(split_chunks(&junk).is_err());
        assert!(split_chunks(&[]).unwrap().is_empty());
    }

    proptest! {
        /// Arbitrary bytes, and a real saved document damaged anywhere, offered as a saved
        /// document: a typed error or a document, never a panic.
        #[test]
        fn loading_arbitrary_saved_documents_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
            at in any::<usize>(),
            byte in any::<u8>(),
        ) {
            let _ = load_saved(&bytes);
            let mut doc = Automerge::new();
            let ops = crate::patch::parse(r#"[{"op": "set", "path": ["a"], "value": [1, "x"]}]"#).unwrap();
            crate::patch::apply(&mut doc, &ops, None, 0).unwrap();
            let mut saved = doc.save();
            let i = at % saved.len();
            saved[i] ^= byte | 1;
            let _ = load_saved(&saved);
            saved.truncate(i);
            let _ = load_saved(&saved);
        }

        /// Chunks received from a peer, arbitrary or damaged anywhere: changes or a typed
        /// error, never a panic.
        #[test]
        fn received_chunks_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
            at in any::<usize>(),
            byte in any::<u8>(),
        ) {
            let _ = received_changes(&bytes);
            let doc = doc_of(3);
            let mut stream: Vec<u8> = doc
                .get_changes(&[])
                .iter()
                .flat_map(|c| c.raw_bytes().to_vec())
                .collect();
            let i = at % stream.len();
            stream[i] ^= byte | 1;
            let _ = received_changes(&stream);
            stream.truncate(i);
            let _ = received_changes(&stream);
        }

        /// Whatever a node serves (or a disk returns), assembling it is a document or a
        /// typed error, never a panic.
        #[test]
        fn assembling_arbitrary_bytes_never_panics(
            snapshot in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..256)),
            changes in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..256), 0..4),
        ) {
            let _ = assemble("d", snapshot.as_deref(), changes.iter().map(Vec::as_slice));
        }

        /// Real changes with bytes flipped or cut: still no panic.
        #[test]
        fn assembling_damaged_changes_never_panics(at in any::<usize>(), byte in any::<u8>(), cut in any::<bool>()) {
            let mut doc = Automerge::new();
            let ops = crate::patch::parse(r#"[{"op": "set", "path": ["a"], "value": [1, "x", {"b": null}]}]"#).unwrap();
            let mut change = crate::patch::apply(&mut doc, &ops, None, 0).unwrap().unwrap();
            let i = at % change.len();
            if cut { change.truncate(i) } else { change[i] ^= byte | 1 }
            let _ = assemble("d", None, std::iter::once(change.as_slice()));
            let mut saved = doc.save();
            let j = at % saved.len();
            saved[j] ^= byte | 1;
            let _ = assemble("d", Some(&saved), std::iter::empty());
        }

        /// Arbitrary bytes offered as changes: a typed error (or nothing to add), never a
        /// panic, and never a transaction.
        #[test]
        fn planning_arbitrary_bytes_never_panics(
            changes in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..256), 1..4),
        ) {
            let stored = empty_stored();
            match plan_changes(&stored, &Automerge::new(), changes) {
                Err(DocError::InvalidChange { .. } | DocError::MissingDependencies { .. }) => {}
                Err(e) => prop_assert!(false, "unexpected error {e:?}"),
                Ok(plan) => prop_assert!(plan.txn.is_none() && plan.added.is_empty()),
            }
        }

        /// A chain submitted in any order in one request, with duplicates, is planned as
        /// exactly its distinct changes, and the planned heads are the chain's last change;
        /// without its first change, the rest is refused for missing dependencies.
        #[test]
        fn planning_a_shuffled_chain(n in 1usize..6, seed in any::<u64>(), dup in any::<bool>()) {
            let changes = chain(n);
            let mut request = changes.clone();
            // A deterministic shuffle from the seed.
            let mut state = seed | 1;
            for i in (1..request.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                request.swap(i, (state % (i as u64 + 1)) as usize);
            }
            if dup {
                request.push(changes[0].clone());
            }
            let stored = empty_stored();
            let plan = plan_changes(&stored, &Automerge::new(), request).unwrap();
            prop_assert_eq!(plan.added.len(), n);
            prop_assert_eq!(plan.txn.as_ref().map(|t| t.writes.len()), Some(n));
            let last = Change::from_bytes(changes[n - 1].clone()).unwrap().hash();
            prop_assert_eq!(plan.heads, vec![last.0]);
            if n > 1 {
                let missing_first = changes[1..].to_vec();
                let refused = matches!(
                    plan_changes(&stored, &Automerge::new(), missing_first),
                    Err(DocError::MissingDependencies { .. })
                );
                prop_assert!(refused, "a change without its dependency was planned");
            }
        }
    }
}
