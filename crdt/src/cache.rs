//! Documents a node has loaded, kept between requests.
//!
//! Every commit needs its document loaded: the compacted snapshot parsed and the pending
//! changes applied (6 ms for a 3,000-key snapshot on the benchmark machine, against 37 µs to
//! clone the loaded document). A cached document is reused when the stored document is the
//! same incarnation and the same snapshot, with pending changes that include every change the
//! cached one was built from: Automerge documents holding the same changes are the same
//! document, so applying the missing changes gives exactly what a full load gives. Anything
//! else (another incarnation, a new snapshot after a compaction, a change that went away)
//! loads from storage. The cache is local to one node and never touches replicated state.
//!
//! A document is taken out of the cache while a request uses it, so no two requests share
//! one; a request that finds it taken loads its own copy.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use automerge::{Automerge, Change};

use crate::stored::no_panic;
use crate::{ChangeHash, DocError, DocName, StoredDoc};

/// Most documents one node keeps loaded.
pub const MAX_CACHED_DOCS: usize = 64;
/// Most stored bytes (snapshots plus pending changes) of the documents kept loaded; a
/// document larger than this is never kept.
pub const MAX_CACHED_BYTES: usize = 64 * 1024 * 1024;

/// Loaded documents by name, least recently kept evicted first.
#[derive(Default)]
pub struct DocCache {
    entries: Mutex<HashMap<DocName, Cached>>,
    clock: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

struct Cached {
    incarnation: [u8; 16],
    snapshot: Option<[u8; 32]>,
    /// The pending changes applied on top of the snapshot.
    changes: HashSet<ChangeHash>,
    doc: Automerge,
    bytes: usize,
    kept_at: u64,
}

impl Cached {
    /// This document brought up to `stored`, if `stored` is a later state of it.
    fn catch_up(mut self, stored: &StoredDoc) -> Option<Automerge> {
        if self.incarnation != stored.meta.incarnation || self.snapshot != stored.snapshot_hash() {
            return None;
        }
        let pending: HashSet<ChangeHash> = stored.changes.iter().map(|(h, _)| *h).collect();
        if !self.changes.is_subset(&pending) {
            return None;
        }
        let mut missing = Vec::new();
        for (hash, bytes) in &stored.changes {
            if !self.changes.contains(hash) {
                missing.push(no_panic(|| Change::from_bytes(bytes.clone())).ok()?.ok()?);
            }
        }
        let hashes: Vec<_> = missing.iter().map(Change::hash).collect();
        no_panic(|| self.doc.apply_changes(missing)).ok()?.ok()?;
        hashes
            .iter()
            .all(|h| self.doc.get_change_meta_by_hash(h).is_some())
            .then_some(self.doc)
    }
}

impl DocCache {
    /// The document `stored` describes: the cached one brought up to date when it can be,
    /// else loaded from `stored`. CPU work: callers keep it off the async executor.
    pub fn load(&self, stored: &StoredDoc) -> Result<Automerge, DocError> {
        let cached = self
            .entries
            .lock()
            .expect("cache lock")
            .remove(&stored.name);
        if let Some(doc) = cached.and_then(|c| c.catch_up(stored)) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(doc);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        stored.load()
    }

    /// Keeps `doc`, the document `stored` describes (as [`Self::load`] returned it), for the
    /// next request.
    pub fn keep(&self, stored: &StoredDoc, doc: Automerge) {
        let bytes = stored.stored_bytes();
        if bytes > MAX_CACHED_BYTES {
            return;
        }
        let mut entries = self.entries.lock().expect("cache lock");
        entries.insert(
            stored.name.clone(),
            Cached {
                incarnation: stored.meta.incarnation,
                snapshot: stored.snapshot_hash(),
                changes: stored.changes.iter().map(|(h, _)| *h).collect(),
                doc,
                bytes,
                kept_at: self.clock.fetch_add(1, Ordering::Relaxed),
            },
        );
        while entries.len() > MAX_CACHED_DOCS
            || entries.values().map(|c| c.bytes).sum::<usize>() > MAX_CACHED_BYTES
        {
            let oldest = entries
                .iter()
                .min_by_key(|(_, c)| c.kept_at)
                .map(|(name, _)| name.clone())
                .expect("over the limits, so not empty");
            entries.remove(&oldest);
        }
    }

    /// Drops document `name` (deleted).
    pub fn forget(&self, name: &DocName) {
        self.entries.lock().expect("cache lock").remove(name);
    }

    /// Loads served from the cache and from storage so far.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stored::{test_changes as changes, test_doc};
    fn same(a: &Automerge, b: &Automerge) -> bool {
        a.get_heads() == b.get_heads() && a.clone().save() == b.clone().save()
    }

    #[test]
    fn a_later_state_of_a_cached_document_is_caught_up_not_reloaded() {
        let mut author = Automerge::new();
        let snapshot_changes = changes(&mut author, 0, 5);
        let mut base = Automerge::new();
        for c in &snapshot_changes {
            base.apply_changes([Change::from_bytes(c.clone()).unwrap()])
                .unwrap();
        }
        let snapshot = base.save();
        let first = changes(&mut author, 5, 2);
        let later = changes(&mut author, 7, 3);
        let cache = DocCache::default();

        let v1 = test_doc([1; 16], Some(snapshot.clone()), first.clone());
        let doc = cache.load(&v1).unwrap();
        assert!(same(&doc, &v1.load().unwrap()));
        cache.keep(&v1, doc);
        assert_eq!(cache.hits_and_misses(), (0, 1));

        let v2 = test_doc([1; 16], Some(snapshot), [first, later].concat());
        let doc = cache.load(&v2).unwrap();
        assert_eq!(cache.hits_and_misses(), (1, 1));
        assert!(same(&doc, &v2.load().unwrap()));
        assert_eq!(doc.get_heads(), author.get_heads());
    }

    #[test]
    fn anything_but_a_later_state_loads_from_storage() {
        let mut author = Automerge::new();
        let first = changes(&mut author, 0, 3);
        let more = changes(&mut author, 3, 2);
        let cache = DocCache::default();
        let v1 = test_doc([1; 16], None, first.clone());
        let keep = |cache: &DocCache| cache.keep(&v1, v1.load().unwrap());

        // Deleted and re-created: another incarnation.
        keep(&cache);
        let other = test_doc([2; 16], None, first.clone());
        assert!(same(&cache.load(&other).unwrap(), &other.load().unwrap()));
        assert_eq!(cache.hits_and_misses(), (0, 1));

        // Compacted: a new snapshot.
        keep(&cache);
        let mut all = Automerge::new();
        for c in first.iter().chain(&more) {
            all.apply_changes([Change::from_bytes(c.clone()).unwrap()])
                .unwrap();
        }
        let compacted = test_doc([1; 16], Some(all.save()), vec![]);
        assert!(same(&cache.load(&compacted).unwrap(), &all));
        assert_eq!(cache.hits_and_misses(), (0, 2));

        // A change the cached document holds is gone.
        keep(&cache);
        let fewer = test_doc([1; 16], None, first[..2].to_vec());
        assert!(same(&cache.load(&fewer).unwrap(), &fewer.load().unwrap()));
        assert_eq!(cache.hits_and_misses(), (0, 3));

        // Damaged new change: the load from storage reports it.
        keep(&cache);
        let mut bad = more[0].clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        let damaged = test_doc([1; 16], None, [first, vec![bad]].concat());
        assert!(matches!(
            cache.load(&damaged),
            Err(DocError::Corrupt { .. })
        ));

        // Taken out while in use: a second load misses, and nothing is left behind.
        keep(&cache);
        let _in_use = cache.load(&v1).unwrap();
        let (hits, misses) = cache.hits_and_misses();
        cache.load(&v1).unwrap();
        assert_eq!(cache.hits_and_misses(), (hits, misses + 1));
    }

    #[test]
    fn the_cache_is_bounded() {
        let cache = DocCache::default();
        let mut author = Automerge::new();
        let one = changes(&mut author, 0, 1);
        for i in 0..MAX_CACHED_DOCS + 10 {
            let mut doc = test_doc([1; 16], None, one.clone());
            doc.name = DocName::new(format!("d{i}")).unwrap();
            cache.keep(&doc, doc.load().unwrap());
        }
        let entries = cache.entries.lock().unwrap();
        assert_eq!(entries.len(), MAX_CACHED_DOCS);
        // The oldest went first.
        assert!(!entries.contains_key(&DocName::new("d0").unwrap()));
        assert!(entries.contains_key(&DocName::new(format!("d{}", MAX_CACHED_DOCS + 9)).unwrap()));
    }
}
