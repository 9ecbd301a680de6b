//! etcd's revision numbers and the store's.
//!
//! etcd counts its empty store as revision 1, so its first write is revision 2; the store
//! counts the empty store as 0. Every revision on the etcd API is therefore the store's plus
//! one, so that a fresh Aspen cluster numbers writes exactly as a fresh etcd does (and
//! `etcdctl get --rev=N` means the same thing against both). `aspen kv` shows the store's
//! numbers.

use aspen_kv::api::Revision;

use crate::EtcdError;

/// A store revision as etcd numbers it.
pub fn to_etcd(revision: Revision) -> i64 {
    i64::try_from(revision.saturating_add(1)).unwrap_or(i64::MAX)
}

/// A key's create or mod revision as etcd numbers it: 0 (an absent key) stays 0.
pub fn key_rev_to_etcd(revision: Revision) -> i64 {
    if revision == 0 {
        0
    } else {
        to_etcd(revision)
    }
}

/// Which state a read asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadAt {
    /// The current revision (etcd: 0 or below).
    Current,
    /// This store revision (etcd's revision minus one), at least 1.
    Store(Revision),
    /// The empty store before the first write (etcd's revision 1): nothing exists there.
    Empty,
}

/// The state a read at etcd revision `revision` asks for.
pub fn read_at(revision: i64) -> ReadAt {
    match revision {
        i64::MIN..=0 => ReadAt::Current,
        1 => ReadAt::Empty,
        r => ReadAt::Store(r as u64 - 1),
    }
}

/// A key's create or mod revision in a request (a filter or a comparison), in the store's
/// numbers: etcd's 0 and 1 (nothing was written at or before 1) are the store's 0.
pub fn key_rev_from_etcd(revision: i64) -> Result<Revision, EtcdError> {
    if revision < 0 {
        return Err(EtcdError::InvalidArgument(format!(
            "revision {revision} is negative"
        )));
    }
    Ok((revision as u64).saturating_sub(1))
}

/// The store's compaction revision for etcd's `compact(revision)`: etcd keeps `revision`
/// and forgets what is below it, as the store does.
pub fn compact_from_etcd(revision: i64) -> Result<Revision, EtcdError> {
    if revision < 1 {
        // etcd answers a compaction at or below what it compacted with this.
        return Err(EtcdError::Compacted);
    }
    Ok(revision as u64 - 1)
}

/// The first store revision whose events a watch from etcd revision `start` wants (0: from
/// now on). The store's first write is revision 1, so etcd's 1 and 2 both mean "from the
/// beginning".
pub fn watch_from_etcd(start: i64) -> Revision {
    if start <= 0 {
        0
    } else {
        (start as u64 - 1).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_fresh_store_numbers_like_etcd() {
        assert_eq!(to_etcd(0), 1, "the empty store");
        assert_eq!(to_etcd(1), 2, "the first write");
        assert_eq!(key_rev_to_etcd(0), 0, "an absent key");
        assert_eq!(read_at(0), ReadAt::Current);
        assert_eq!(read_at(-5), ReadAt::Current);
        assert_eq!(read_at(1), ReadAt::Empty);
        assert_eq!(read_at(2), ReadAt::Store(1));
        assert_eq!(watch_from_etcd(0), 0);
        assert_eq!(watch_from_etcd(1), 1);
        assert_eq!(watch_from_etcd(2), 1);
        assert_eq!(watch_from_etcd(3), 2);
        assert_eq!(to_etcd(u64::MAX), i64::MAX);
    }

    proptest! {
        #[test]
        fn revisions_round_trip(r in 1u64..i64::MAX as u64 - 1) {
            prop_assert_eq!(read_at(to_etcd(r)), ReadAt::Store(r));
            prop_assert_eq!(key_rev_from_etcd(key_rev_to_etcd(r)).unwrap(), r);
            prop_assert_eq!(compact_from_etcd(to_etcd(r)).unwrap(), r);
            prop_assert_eq!(watch_from_etcd(to_etcd(r)), r);
        }
    }
}
