//! Which members hold a referenced blob.
//!
//! Every member computes the same answer from the same index: members that do not hold the
//! blob are ranked by a rendezvous score (BLAKE3 of the hash and the member id), and the
//! best-ranked ones fetch it until `replicas` members hold it. No coordination is needed and
//! the choice is stable as blobs come and go. A chosen member that is down would leave the
//! blob under-replicated, so a member may widen the choice (`extra`) after waiting.

use std::collections::BTreeSet;

use aspen_kv::NodeId;

use crate::BlobHash;

/// The rendezvous score of `node` for `hash` (lower ranks first).
pub fn score(hash: &BlobHash, node: NodeId) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(hash);
    h.update(&node.to_be_bytes());
    *h.finalize().as_bytes()
}

/// Members that should fetch `hash` now: the best-ranked non-holders, as many as are
/// missing to reach `replicas` holders among `members`, plus `extra` more.
pub fn fetchers(
    hash: &BlobHash,
    members: &BTreeSet<NodeId>,
    holders: &BTreeSet<NodeId>,
    replicas: usize,
    extra: usize,
) -> Vec<NodeId> {
    let held = members.intersection(holders).count();
    let need = replicas.min(members.len()).saturating_sub(held);
    if need == 0 {
        return Vec::new();
    }
    let mut candidates: Vec<NodeId> = members.difference(holders).copied().collect();
    candidates.sort_by_key(|n| score(hash, *n));
    candidates.truncate(need + extra);
    candidates
}

/// The holders to fetch `hash` from, in the order to try them (best-ranked first, `me`
/// excluded).
pub fn sources(hash: &BlobHash, holders: &BTreeSet<NodeId>, me: NodeId) -> Vec<NodeId> {
    let mut out: Vec<NodeId> = holders.iter().copied().filter(|n| *n != me).collect();
    out.sort_by_key(|n| score(hash, *n));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn three_replicas_on_three_members_means_everyone() {
        let members: BTreeSet<NodeId> = [1, 2, 3].into();
        let holders: BTreeSet<NodeId> = [2].into();
        let mut f = fetchers(&[0; 32], &members, &holders, 3, 0);
        f.sort();
        assert_eq!(f, vec![1, 3]);
        assert!(fetchers(&[0; 32], &members, &members, 3, 0).is_empty());
    }

    proptest! {
        #[test]
        fn fetchers_fill_exactly_the_gap(
            hash in any::<[u8; 32]>(),
            members in proptest::collection::btree_set(0u64..20, 1..8),
            holders in proptest::collection::btree_set(0u64..20, 0..8),
            replicas in 1usize..8,
            extra in 0usize..3,
        ) {
            let f = fetchers(&hash, &members, &holders, replicas, extra);
            let held = members.intersection(&holders).count();
            let target = replicas.min(members.len());
            for n in &f {
                prop_assert!(members.contains(n) && !holders.contains(n));
            }
            let non_holders = members.difference(&holders).count();
            let gap = target.saturating_sub(held);
            let expected = if gap == 0 { 0 } else { (gap + extra).min(non_holders) };
            prop_assert_eq!(f.len(), expected);
            // Deterministic: every member computes the same choice.
            prop_assert_eq!(f.clone(), fetchers(&hash, &members, &holders, replicas, extra));
            // Widening only adds members.
            if extra > 0 {
                let narrow = fetchers(&hash, &members, &holders, replicas, 0);
                prop_assert!(f.starts_with(&narrow));
            }
        }
    }
}
