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
//! A compaction this node proposes is told to the cache before it is proposed
//! ([`DocCache::compacting`]): its snapshot holds exactly the old snapshot and the pending
//! changes it deletes, so a cached document built from those changes stays usable once the
//! compaction applies, instead of being loaded again from the new snapshot.
//!
//! A document is taken out of the cache while a request uses it, so no two requests share
//! one; a request that finds it taken loads its own copy (the node's document service commits
//! changes to one document from one task, so only other kinds of requests ever do).

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
    /// The last compaction this node proposed, per document (at most [`MAX_CACHED_DOCS`]).
    compactions: Mutex<HashMap<DocName, Compaction>>,
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

/// A compaction of one incarnation of a document: snapshot `new` holds exactly snapshot
/// `old` and the pending changes `covered`, and the compaction deletes all of `covered`.
#[derive(Clone)]
struct Compaction {
    incarnation: [u8; 16],
    old: Option<[u8; 32]>,
    new: [u8; 32],
    covered: HashSet<ChangeHash>,
}

impl Cached {
    /// This document brought up to `stored`, if `stored` is a later state of it.
    fn catch_up(
        mut self,
        stored: &StoredDoc,
        compaction: Option<&Compaction>,
    ) -> Option<Automerge> {
        if self.incarnation != stored.meta.incarnation {
            return None;
        }
        if self.snapshot != stored.snapshot_hash() {
            // Compacted since: usable if the compaction replaced this document's snapshot
            // and only changes it was built from, for then the new snapshot holds nothing
            // this document lacks.
            let c = compaction.filter(|c| {
                c.incarnation == self.incarnation
                    && c.old == self.snapshot
                    && Some(c.new) == stored.snapshot_hash()
                    && c.covered.is_subset(&self.changes)
            })?;
            self.changes.retain(|h| !c.covered.contains(h));
            self.snapshot = Some(c.new);
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
        // Only looked up when the snapshot changed (rarely), and copied out of the lock.
        let compaction = cached
            .as_ref()
            .filter(|c| c.snapshot != stored.snapshot_hash())
            .and_then(|_| {
                let compactions = self.compactions.lock().expect("cache lock");
                compactions.get(&stored.name).cloned()
            });
        if let Some(doc) = cached.and_then(|c| c.catch_up(stored, compaction.as_ref())) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(doc);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        stored.load()
    }

    /// Keeps `doc` for the next request: the document `stored` describes (as [`Self::load`]
    /// returned it) with the changes `added` applied, all of them committed (stored) since
    /// `stored` was read.
    pub fn keep(&self, stored: &StoredDoc, doc: Automerge, added: &[ChangeHash]) {
        let bytes = stored.stored_bytes();
        if bytes > MAX_CACHED_BYTES {
            return;
        }
        let mut changes: HashSet<ChangeHash> = stored.changes.iter().map(|(h, _)| *h).collect();
        changes.extend(added);
        let mut entries = self.entries.lock().expect("cache lock");
        entries.insert(
            stored.name.clone(),
            Cached {
                incarnation: stored.meta.incarnation,
                snapshot: stored.snapshot_hash(),
                changes,
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

    /// Tells the cache that this node proposes a compaction of `stored` that deletes every
    /// pending change of it, replacing them with `snapshot` (the BLAKE3 of the saved
    /// document `stored` describes). Told before proposing: until a stored document has that
    /// snapshot, this changes nothing.
    pub fn compacting(&self, stored: &StoredDoc, snapshot: [u8; 32]) {
        if stored.changes.len() > crate::limits::MAX_COMPACTED_CHANGES {
            return; // Some changes stay pending: not a compaction of all of them.
        }
        let mut compactions = self.compactions.lock().expect("cache lock");
        if compactions.len() >= MAX_CACHED_DOCS && !compactions.contains_key(&stored.name) {
            let any = compactions.keys().next().cloned().expect("not empty");
            compactions.remove(&any);
        }
        compactions.insert(
            stored.name.clone(),
            Compaction {
                incarnation: stored.meta.incarnation,
                old: stored.snapshot_hash(),
                new: snapshot,
                covered: stored.changes.iter().map(|(h, _)| *h).collect(),
            },
        );
    }

    /// Drops document `name` (deleted).
    pub fn forget(&self, name: &DocName) {
        self.entries.lock().expect("cache lock").remove(name);
        self.compactions.lock().expect("cache lock").remove(name);
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
        cache.keep(&v1, doc, &[]);
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
        let keep = |cache: &DocCache| cache.keep(&v1, v1.load().unwrap(), &[]);

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
    fn a_compaction_this_node_proposed_keeps_the_cached_document() {
        let mut author = Automerge::new();
        let first = changes(&mut author, 0, 4);
        let later = changes(&mut author, 4, 2);
        let cache = DocCache::default();
        let v1 = test_doc([1; 16], None, first.clone());
        let doc = v1.load().unwrap();
        let snapshot = doc.save();
        // Kept with two more changes committed on top of `v1`.
        let mut kept = doc.clone();
        let added: Vec<ChangeHash> = later
            .iter()
            .map(|c| {
                let c = Change::from_bytes(c.clone()).unwrap();
                let h = c.hash().0;
                kept.apply_changes([c]).unwrap();
                h
            })
            .collect();
        cache.keep(&v1, kept, &added);
        // The compaction of `v1` applied: its snapshot, and the two later changes pending.
        cache.compacting(&v1, *blake3::hash(&snapshot).as_bytes());
        let v2 = test_doc([1; 16], Some(snapshot.clone()), later.clone());
        let loaded = cache.load(&v2).unwrap();
        assert_eq!(cache.hits_and_misses(), (1, 0), "caught up, not reloaded");
        assert!(same(&loaded, &v2.load().unwrap()));
        cache.keep(&v2, loaded, &[]);
        // Another node's compaction (a snapshot this node did not make) loads from storage.
        let mut all = Automerge::new();
        for c in first.iter().chain(&later) {
            all.apply_changes([Change::from_bytes(c.clone()).unwrap()])
                .unwrap();
        }
        let v3 = test_doc([1; 16], Some(all.save()), vec![]);
        assert!(same(&cache.load(&v3).unwrap(), &all));
        assert_eq!(cache.hits_and_misses(), (1, 1));
        // A compaction of changes the cached document lacks does not apply to it.
        let cache = DocCache::default();
        let v0 = test_doc([1; 16], None, first[..2].to_vec());
        cache.keep(&v0, v0.load().unwrap(), &[]);
        cache.compacting(&v1, *blake3::hash(&snapshot).as_bytes());
        let v2 = test_doc([1; 16], Some(snapshot), later);
        assert!(same(&cache.load(&v2).unwrap(), &v2.load().unwrap()));
        assert_eq!(cache.hits_and_misses(), (0, 1));
    }

    #[test]
    fn the_cache_is_bounded() {
        let cache = DocCache::default();
        let mut author = Automerge::new();
        let one = changes(&mut author, 0, 1);
        for i in 0..MAX_CACHED_DOCS + 10 {
            let mut doc = test_doc([1; 16], None, one.clone());
            doc.name = DocName::new(format!("d{i}")).unwrap();
            cache.keep(&doc, doc.load().unwrap(), &[]);
        }
        let entries = cache.entries.lock().unwrap();
        assert_eq!(entries.len(), MAX_CACHED_DOCS);
        // The oldest went first.
        assert!(!entries.contains_key(&DocName::new("d0").unwrap()));
        assert!(entries.contains_key(&DocName::new(format!("d{}", MAX_CACHED_DOCS + 9)).unwrap()));
    }
}
