//! What each revision changed, in revision order: the pages watches read.
//!
//! The key space is stored by (revision, key) (`kv_revisions`), so a watch reads forward from
//! any revision and sees each revision's events together, in key order, with no gap and no
//! duplicate: the store itself is the watch's buffer, and a watcher that falls behind only
//! reads further back (until compaction passes it, which is an explicit error). The previous
//! value of an event comes through the key index.

use std::sync::RwLock;

use redb::ReadableTable;

use super::key_index::KeyIndex;
use super::state_db::StateDb;
use super::state_machine::{record, StoredKv};
use super::{REVISIONS, SM_META};
use crate::api::{ChangesPage, ChangesRequest, Event, EventKind, KeyValue, ReadError, Revision};
use crate::limits::{MAX_CHANGES_BYTES, MAX_CHANGES_SCANNED};

fn meta_revision(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<Revision, redb::Error> {
    match meta.get(name)? {
        None => Ok(0),
        Some(v) => postcard::from_bytes(v.value())
            .map_err(|e| redb::Error::Corrupted(format!("undecodable {name}: {e}"))),
    }
}

pub(crate) fn in_range(key: &[u8], start: &[u8], end: Option<&[u8]>) -> bool {
    match end {
        None => key == start,
        Some([]) => key >= start,
        Some(end) => key >= start && key < end,
    }
}

fn decode(bytes: &[u8]) -> Result<Option<StoredKv>, ReadError> {
    postcard::from_bytes(bytes).map_err(|e| ReadError::Storage(format!("undecodable history: {e}")))
}

fn storage(e: impl Into<redb::Error>) -> ReadError {
    ReadError::Storage(e.into().to_string())
}

/// Reads one page of changes (see [`ChangesRequest`] and [`ChangesPage`]).
pub(crate) fn read(
    db: &StateDb,
    index: &RwLock<KeyIndex>,
    req: &ChangesRequest,
) -> Result<ChangesPage, ReadError> {
    read_bounded(db, index, req, MAX_CHANGES_BYTES, MAX_CHANGES_SCANNED)
}

/// [`read`] with the page bounds as arguments (tests use small ones).
pub(crate) fn read_bounded(
    db: &StateDb,
    index: &RwLock<KeyIndex>,
    req: &ChangesRequest,
    max_bytes: usize,
    max_scanned: usize,
) -> Result<ChangesPage, ReadError> {
    req.validate()?;
    // Previous values are looked up in the index while the page is read, under its read lock
    // taken before the transaction (see `key_index`).
    let index = index.read().expect("key index lock");
    let txn = db.begin_read().map_err(storage)?;
    let meta = txn.open_table(SM_META).map_err(storage)?;
    let current = meta_revision(&meta, "revision").map_err(storage)?;
    let compacted = meta_revision(&meta, "compacted").map_err(storage)?;
    let from = if req.from == 0 { current + 1 } else { req.from };
    if from < compacted {
        return Err(ReadError::Compacted {
            requested: from,
            compacted,
        });
    }
    let revisions = txn.open_table(REVISIONS).map_err(storage)?;
    let mut page = ChangesPage {
        events: Vec::new(),
        next_from: current + 1,
        next_after: None,
        revision: current,
        compacted,
    };
    if from > current {
        page.next_from = from;
        page.next_after = req.after.clone();
        return Ok(page);
    }
    let (start, end) = (req.start.as_slice(), req.end.as_deref());
    let mut bytes = 0usize;
    let mut scanned = 0usize;
    // The revision being read; a page ends at a revision boundary unless one revision alone
    // is over the byte bound (then it ends after a key: a fragment).
    let mut at: Option<Revision> = None;
    let first: (u64, &[u8]) = (from, req.after.as_deref().unwrap_or(&[]));
    for item in revisions.range(first..).map_err(storage)? {
        let (k, v) = item.map_err(storage)?;
        let (rev, key) = k.value();
        if rev > current {
            break;
        }
        if rev == from && req.after.as_deref().is_some_and(|a| key <= a) {
            continue;
        }
        if at != Some(rev) {
            // A new revision: stop here if the page is full.
            if at.is_some() && (bytes >= max_bytes || scanned >= max_scanned) {
                page.next_from = rev;
                return Ok(page);
            }
            at = Some(rev);
        }
        scanned += 1;
        if !in_range(key, start, end) {
            continue;
        }
        if bytes >= max_bytes {
            // One revision over the bound: a fragment ends after the previous key.
            page.next_from = rev;
            page.next_after = page.events.last().map(|e| e.kv.key.clone());
            return Ok(page);
        }
        let mut event = match decode(v.value())? {
            Some(stored) => Event {
                kind: EventKind::Put,
                kv: stored.into_kv(key.to_vec()),
                prev_kv: None,
            },
            None => Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    key: key.to_vec(),
                    value: Vec::new(),
                    create_revision: 0,
                    mod_revision: rev,
                    version: 0,
                    lease: 0,
                },
                prev_kv: None,
            },
        };
        if req.prev_kv {
            if let Some(before) = index.before(key, rev).filter(|b| b.live) {
                event.prev_kv = record(&revisions, before.revision, key)
                    .map_err(storage)?
                    .map(|p| p.into_kv(key.to_vec()));
            }
        }
        bytes += super::recent::event_bytes(&event);
        page.events.push(event);
    }
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::encode;

    /// A store holding `writes` (revision, key, value; `None` a delete), written straight
    /// into the tables as apply would; `legacy`: into the history table of stores before
    /// `kv_revisions`, then moved as opening such a store does.
    fn store(
        writes: &[(u64, &str, Option<&str>)],
        compacted: u64,
        legacy: bool,
    ) -> (StateDb, RwLock<KeyIndex>) {
        let db = StateDb::new(
            redb::Database::builder()
                .create_with_backend(redb::backends::InMemoryBackend::new())
                .unwrap(),
        );
        let txn = db.begin_write().unwrap();
        if !legacy {
            crate::storage::create_sm_tables(&txn).unwrap();
        }
        {
            let mut revisions = txn.open_table(REVISIONS).unwrap();
            let mut history =
                legacy.then(|| txn.open_table(crate::storage::LEGACY_HISTORY).unwrap());
            let mut versions = std::collections::HashMap::new();
            for (rev, key, value) in writes {
                let record = value.map(|v| {
                    let version = versions.entry(*key).or_insert(0u64);
                    *version += 1;
                    StoredKv {
                        value: v.as_bytes().to_vec(),
                        create_revision: *rev,
                        mod_revision: *rev,
                        version: *version,
                        lease: 0,
                    }
                });
                if record.is_none() {
                    versions.remove(key);
                }
                match &mut history {
                    Some(h) => h.insert((key.as_bytes(), *rev), encode(&record).as_slice()),
                    None => revisions.insert((*rev, key.as_bytes()), encode(&record).as_slice()),
                }
                .unwrap();
            }
            let mut meta = txn.open_table(SM_META).unwrap();
            let last = writes.iter().map(|w| w.0).max().unwrap_or(0);
            meta.insert("revision", encode(&last).as_slice()).unwrap();
            meta.insert("compacted", encode(&compacted).as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
        if legacy {
            crate::storage::move_legacy_history(db.database()).unwrap();
        }
        let index = RwLock::new(crate::storage::state_machine::load_index(&db).unwrap());
        (db, index)
    }

    fn all(prefix: &str, from: u64, prev_kv: bool) -> ChangesRequest {
        ChangesRequest {
            start: prefix.as_bytes().to_vec(),
            end: Some(crate::api::prefix_end(prefix.as_bytes())),
            from,
            after: None,
            prev_kv,
        }
    }

    /// (revision, key, kind) of each event.
    fn shape(events: &[Event]) -> Vec<(u64, String, EventKind)> {
        events
            .iter()
            .map(|e| {
                (
                    e.kv.mod_revision,
                    String::from_utf8(e.kv.key.clone()).unwrap(),
                    e.kind,
                )
            })
            .collect()
    }

    const WRITES: &[(u64, &str, Option<&str>)] = &[
        (1, "a", Some("1")),
        (2, "b", Some("1")),
        (3, "a", Some("2")),
        (4, "c", Some("1")),
        (4, "b", None),
        (5, "a", None),
        (5, "c", None),
        (6, "x/1", Some("1")),
    ];

    #[test]
    fn pages_follow_any_bound_without_gap_or_duplicate() {
        let (db, index) = store(WRITES, 0, false);
        let whole = read(&db, &index, &all("", 1, true)).unwrap();
        assert_eq!(whole.next_from, 7);
        assert_eq!(whole.events.len(), WRITES.len());
        // Every bound gives the same events, each revision whole unless one revision alone
        // is over the byte bound.
        for max_bytes in [1, 60, 120, 1000] {
            for max_scanned in [1, 2, 3, 100] {
                let mut got = Vec::new();
                let mut req = all("", 1, true);
                for _ in 0..100 {
                    let page = read_bounded(&db, &index, &req, max_bytes, max_scanned).unwrap();
                    got.extend(page.events);
                    if page.next_from == 7 && page.next_after.is_none() {
                        break;
                    }
                    req.from = page.next_from;
                    req.after = page.next_after;
                }
                assert_eq!(got, whole.events, "bounds {max_bytes}/{max_scanned}");
            }
        }
    }

    #[test]
    fn events_are_state_diffs_with_previous_values() {
        let (db, index) = store(WRITES, 0, false);
        let page = read(&db, &index, &all("", 3, true)).unwrap();
        assert_eq!(
            shape(&page.events),
            [
                (3, "a".into(), EventKind::Put),
                (4, "b".into(), EventKind::Delete),
                (4, "c".into(), EventKind::Put),
                (5, "a".into(), EventKind::Delete),
                (5, "c".into(), EventKind::Delete),
                (6, "x/1".into(), EventKind::Put),
            ]
        );
        let prev: Vec<Option<Vec<u8>>> = page
            .events
            .iter()
            .map(|e| e.prev_kv.as_ref().map(|p| p.value.clone()))
            .collect();
        assert_eq!(
            prev,
            [
                Some(b"1".to_vec()),
                Some(b"1".to_vec()),
                None,
                Some(b"2".to_vec()),
                Some(b"1".to_vec()),
                None
            ]
        );
        // Without prev_kv, none; a delete carries only its key and revision.
        let page = read(&db, &index, &all("a", 1, false)).unwrap();
        assert_eq!(shape(&page.events).len(), 3);
        assert!(page.events.iter().all(|e| e.prev_kv.is_none()));
        assert_eq!(page.events[2].kv.value, Vec::<u8>::new());
        // One key only.
        let one = ChangesRequest {
            end: None,
            ..all("c", 1, false)
        };
        assert_eq!(read(&db, &index, &one).unwrap().events.len(), 2);
        // From now: nothing yet, and the next page starts after the current revision.
        let now = read(&db, &index, &all("", 0, false)).unwrap();
        assert!(now.events.is_empty());
        assert_eq!((now.next_from, now.revision), (7, 6));
        // A future revision is waited for, not refused.
        let later = read(&db, &index, &all("", 9, false)).unwrap();
        assert_eq!(later.next_from, 9);
    }

    #[test]
    fn a_compacted_revision_is_an_explicit_error() {
        let (db, index) = store(WRITES, 4, false);
        assert_eq!(
            read(&db, &index, &all("", 3, false)),
            Err(ReadError::Compacted {
                requested: 3,
                compacted: 4
            })
        );
        assert_eq!(
            read(&db, &index, &all("", 4, false)).unwrap().events.len(),
            5
        );
    }

    #[test]
    fn a_store_written_before_kv_revisions_is_moved_and_reads_the_same() {
        let (db, index) = store(WRITES, 2, true);
        let (want_db, want_index) = store(WRITES, 2, false);
        for from in [2, 3, 5] {
            assert_eq!(
                read(&db, &index, &all("", from, true)).unwrap(),
                read(&want_db, &want_index, &all("", from, true)).unwrap()
            );
        }
        assert_eq!(*index.read().unwrap(), *want_index.read().unwrap());
        // The old tables are gone; a second open moves nothing.
        let txn = db.begin_read().unwrap();
        let names: Vec<String> = txn
            .list_tables()
            .unwrap()
            .map(|t| redb::TableHandle::name(&t).to_string())
            .collect();
        assert!(
            !names
                .iter()
                .any(|n| n == "kv_history" || n == "kv" || n == "kv_changes"),
            "{names:?}"
        );
        drop(txn);
        crate::storage::move_legacy_history(db.database()).unwrap();
        assert_eq!(
            crate::storage::state_machine::load_index(&db).unwrap(),
            *want_index.read().unwrap()
        );
    }
}
