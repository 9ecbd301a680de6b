//! The key index: each key's revisions, in memory.
//!
//! The key space is stored by revision (`kv_revisions`: (revision, key) -> the record), so an
//! apply appends at the end of one B-tree and dirties a page or two, whatever keys it writes.
//! Finding a key's value at a revision then needs this index, which maps each key to the
//! revisions that wrote or deleted it (etcd keeps the same split). It is rebuilt by one scan
//! of the table when the store opens, and after a snapshot is installed.
//!
//! Invariants (the state machine keeps them; readers rely on them):
//! 1. Every record of the table has an entry here, and an entry at or below the committed
//!    revision names a committed record. Apply adds entries before its transaction commits
//!    (so they may name revisions above what a reader's transaction sees: readers ignore
//!    entries above their revision), and removes compacted entries under the write lock while
//!    that transaction commits.
//! 2. A reader takes the read lock, begins its read transaction, and looks up what it needs
//!    before releasing the lock: the index and the transaction then agree at or below the
//!    transaction's revision.
//! 3. A key's revisions are strictly increasing.

use std::collections::BTreeMap;
use std::ops::Bound;

use redb::ReadableTable;

use crate::api::{Key, Revision};

/// How a deleted key is recorded: postcard's encoding of `None::<StoredKv>`.
pub(crate) const TOMBSTONE: &[u8] = &[0];

/// One write of a key: its revision, and whether it put a value (else it deleted the key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KeyRevision {
    pub revision: Revision,
    pub live: bool,
}

/// key -> its writes, oldest first.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct KeyIndex {
    keys: BTreeMap<Key, Vec<KeyRevision>>,
}

type KeyRange<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// The range bounds of a request: `end` `None` is the single key `start`, empty is
/// everything from `start`.
fn bounds<'a>(start: &'a [u8], end: Option<&'a [u8]>) -> Option<KeyRange<'a>> {
    match end {
        None => Some((Bound::Included(start), Bound::Included(start))),
        Some([]) => Some((Bound::Included(start), Bound::Unbounded)),
        Some(e) if e <= start => None,
        Some(e) => Some((Bound::Included(start), Bound::Excluded(e))),
    }
}

impl KeyIndex {
    /// Builds the index from the revisions table.
    pub fn load(
        table: &impl ReadableTable<(u64, &'static [u8]), &'static [u8]>,
    ) -> Result<KeyIndex, redb::Error> {
        let mut index = KeyIndex::default();
        for item in table.iter()? {
            let (k, v) = item?;
            let (revision, key) = k.value();
            index.record(key, revision, v.value() != TOMBSTONE);
        }
        Ok(index)
    }

    /// Notes that `key` was written (`live`) or deleted at `revision`, above its other writes.
    pub fn record(&mut self, key: &[u8], revision: Revision, live: bool) {
        let revisions = match self.keys.get_mut(key) {
            Some(r) => r,
            None => self.keys.entry(key.to_vec()).or_default(),
        };
        assert!(
            revisions.last().is_none_or(|l| l.revision < revision),
            "key index: revision {revision} is not above {:?}",
            revisions.last()
        );
        revisions.push(KeyRevision { revision, live });
    }

    /// The newest write of `key` at or below `revision`.
    pub fn at(&self, key: &[u8], revision: Revision) -> Option<KeyRevision> {
        newest_at(self.keys.get(key)?, revision)
    }

    /// The newest write of `key` below `revision`.
    pub fn before(&self, key: &[u8], revision: Revision) -> Option<KeyRevision> {
        newest_at(self.keys.get(key)?, revision.checked_sub(1)?)
    }

    /// The revision holding the value of each key in the range that exists at `revision`, in
    /// key order, at most `max` of them.
    pub fn live_at(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        revision: Revision,
        max: usize,
    ) -> Vec<(Key, Revision)> {
        let Some(range) = bounds(start, end) else {
            return Vec::new();
        };
        self.keys
            .range::<[u8], _>(range)
            .filter_map(|(k, revs)| match newest_at(revs, revision) {
                Some(r) if r.live => Some((k.clone(), r.revision)),
                _ => None,
            })
            .take(max)
            .collect()
    }

    /// How many keys of the range exist at `revision`.
    pub fn count_live_at(&self, start: &[u8], end: Option<&[u8]>, revision: Revision) -> u64 {
        let Some(range) = bounds(start, end) else {
            return 0;
        };
        self.keys
            .range::<[u8], _>(range)
            .filter(|(_, revs)| newest_at(revs, revision).is_some_and(|r| r.live))
            .count() as u64
    }

    /// Every key with its writes at or below `revision` (oldest first), in key order.
    pub fn history_at(&self, revision: Revision) -> Vec<(Key, Vec<KeyRevision>)> {
        self.keys
            .iter()
            .filter_map(|(k, revs)| {
                let upto: Vec<KeyRevision> = revs
                    .iter()
                    .take_while(|r| r.revision <= revision)
                    .copied()
                    .collect();
                (!upto.is_empty()).then(|| (k.clone(), upto))
            })
            .collect()
    }

    /// The records a compaction at `revision` drops: per key, every write below it except the
    /// newest, and that one too when it is a delete (reads at `revision` or later stay exact).
    pub fn compacted_below(&self, revision: Revision) -> Vec<(Revision, Key)> {
        let mut doomed = Vec::new();
        for (key, revs) in &self.keys {
            let below = revs.partition_point(|r| r.revision < revision);
            if below == 0 {
                continue;
            }
            let keep_newest = revs[below - 1].live;
            let drop = if keep_newest { below - 1 } else { below };
            doomed.extend(revs[..drop].iter().map(|r| (r.revision, key.clone())));
        }
        doomed
    }

    /// Forgets `doomed` writes (those [`Self::compacted_below`] named); keys left with none go.
    pub fn remove(&mut self, doomed: &[(Revision, Key)]) {
        for (revision, key) in doomed {
            if let Some(revs) = self.keys.get_mut(key) {
                revs.retain(|r| r.revision != *revision);
                if revs.is_empty() {
                    self.keys.remove(key);
                }
            }
        }
    }
}

fn newest_at(revs: &[KeyRevision], revision: Revision) -> Option<KeyRevision> {
    let n = revs.partition_point(|r| r.revision <= revision);
    n.checked_sub(1).map(|i| revs[i])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_tombstone_is_postcards_none() {
        let none: Option<crate::storage::state_machine::StoredKv> = None;
        assert_eq!(crate::storage::encode(&none), TOMBSTONE);
    }

    /// One write: (key number, live).
    fn writes() -> impl Strategy<Value = Vec<Vec<(u8, bool)>>> {
        // Per revision, a few distinct keys.
        prop::collection::vec(
            prop::collection::btree_map(0u8..6, any::<bool>(), 1..3)
                .prop_map(|m| m.into_iter().collect::<Vec<_>>()),
            0..40,
        )
    }

    /// The model: every write as (key, revision, live), compacted by brute force.
    fn model_at(all: &[(u8, Revision, bool)], key: u8, revision: Revision) -> Option<KeyRevision> {
        all.iter()
            .filter(|(k, r, _)| *k == key && *r <= revision)
            .max_by_key(|(_, r, _)| *r)
            .map(|(_, r, live)| KeyRevision {
                revision: *r,
                live: *live,
            })
    }

    proptest! {
        /// Lookups agree with a brute-force model before and after a compaction, at every
        /// revision a compaction keeps readable.
        #[test]
        fn lookups_match_a_model_across_compaction(writes in writes(), cut in 0u64..45) {
            let mut index = KeyIndex::default();
            let mut all = Vec::new();
            for (i, keys) in writes.iter().enumerate() {
                let revision = i as u64 + 1;
                for (k, live) in keys {
                    index.record(&[*k], revision, *live);
                    all.push((*k, revision, *live));
                }
            }
            let last = writes.len() as u64;
            let cut = cut.min(last + 1).max(1);
            let doomed = index.compacted_below(cut);
            for (revision, key) in &doomed {
                // Only records below the cut, never the one a read at the cut needs.
                prop_assert!(*revision < cut);
                let needed = model_at(&all, key[0], cut);
                prop_assert!(needed.is_none_or(|n| !n.live || n.revision != *revision));
            }
            index.remove(&doomed);
            for revision in cut..=last + 1 {
                for k in 0u8..6 {
                    let want = model_at(&all, k, revision).filter(|w| w.live);
                    let got = index.at(&[k], revision).filter(|g| g.live);
                    prop_assert_eq!(got, want, "key {} at {}", k, revision);
                    if revision > cut {
                        let want = model_at(&all, k, revision - 1).filter(|w| w.live);
                        let got = index.before(&[k], revision).filter(|g| g.live);
                        prop_assert_eq!(got, want);
                    }
                }
                let live: Vec<(Key, Revision)> = (0u8..6)
                    .filter_map(|k| {
                        model_at(&all, k, revision)
                            .filter(|w| w.live)
                            .map(|w| (vec![k], w.revision))
                    })
                    .collect();
                prop_assert_eq!(index.live_at(&[], Some(&[]), revision, usize::MAX), live.clone());
                prop_assert_eq!(index.live_at(&[1], Some(&[4]), revision, 2),
                    live.iter().filter(|(k, _)| (1..4).contains(&k[0])).take(2).cloned().collect::<Vec<_>>());
                prop_assert_eq!(index.count_live_at(&[], Some(&[]), revision), live.len() as u64);
                prop_assert_eq!(index.count_live_at(&[1], Some(&[4]), revision),
                    live.iter().filter(|(k, _)| (1..4).contains(&k[0])).count() as u64);
                prop_assert_eq!(index.count_live_at(&[2], None, revision),
                    live.iter().filter(|(k, _)| k[0] == 2).count() as u64);
            }
        }
    }
}
