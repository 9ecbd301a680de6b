//! Pulling an Automerge document from another cluster, checked against the origin's signed
//! manifest.
//!
//! The server side ([`changes_since`]) sends the changes a follower lacks, in pages, in causal
//! order. The follower ([`DocPull`]) applies them to a copy of its document and accepts the
//! result only against a verified manifest ([`DocPull::finish`]):
//!
//! - every head the manifest names must be present, so the follower holds at least what the
//!   origin signed for (a server cannot withhold changes);
//! - every change it newly received must be one of the manifest heads or an ancestor of one,
//!   so a server (a mirror, or the origin outside its manifest) cannot slip in changes the
//!   origin never signed for.
//!
//! The follower's own changes are neither sent nor checked: they are its own. Nothing is
//! committed on failure: the pull works on a copy, and a failed pull is simply dropped.
//!
//! The follower names what it has (`have`) by hashes the server surely knows: the heads of
//! the last manifest it accepted from this origin and of what it received so far in this
//! pull, plus its own heads. Its own heads alone may all be local changes the origin has never
//! seen; the server would then send the same first page again and again.

use std::collections::{BTreeSet, HashMap, HashSet};

use automerge::{Automerge, Change, ChangeHash};

use crate::{ContentDigest, Manifest, MAX_HEADS};

/// Most hashes a follower sends in `have` (room for a manifest's heads and as many more).
pub const MAX_HAVE: usize = 2 * MAX_HEADS;

/// One page of changes from [`changes_since`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangesPage {
    /// Raw change bytes ([`Change::raw_bytes`]), dependencies before dependents.
    pub changes: Vec<Vec<u8>>,
    /// Whether changes remain after this page (ask again with the new heads).
    pub more: bool,
}

/// Why an exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    #[error("the peer listed {count} changes it has; at most {max} are allowed")]
    TooManyHave { count: usize, max: usize },
    #[error(
        "change {} arrived before what it depends on: missing {}",
        short(.change),
        list(.missing)
    )]
    MissingDependencies {
        change: [u8; 32],
        missing: Vec<[u8; 32]>,
    },
    #[error("the pull would add {bytes} bytes of changes; at most {max} are allowed")]
    TooMuch { bytes: usize, max: usize },
    #[error("Automerge rejected the changes: {0}")]
    Rejected(String),
    #[error("the manifest does not describe an Automerge document (it carries no heads)")]
    NotADocManifest,
    #[error(
        "the pulled document lacks {} change(s) the manifest names: {}",
        .missing.len(),
        list(.missing)
    )]
    NotCovered { missing: Vec<[u8; 32]> },
    #[error(
        "change {} is not in the history the origin signed (not one of the manifest's heads \
         or their ancestors)",
        short(.change)
    )]
    Unvouched { change: [u8; 32] },
    #[error(
        "the server sent only changes already received in this pull, so the pull would never \
         end (with more than {MAX_HAVE} concurrent changes, retry with larger pages)"
    )]
    Stalled,
}

/// A hash for messages: the first 6 bytes in hex.
fn short(hash: &[u8; 32]) -> String {
    format!("{}…", hex::encode(&hash[..6]))
}

/// Up to four hashes for messages.
fn list(hashes: &[[u8; 32]]) -> String {
    let mut out: Vec<String> = hashes.iter().take(4).map(short).collect();
    if hashes.len() > 4 {
        out.push(format!("and {} more", hashes.len() - 4));
    }
    out.join(", ")
}

/// Runs Automerge code, turning a panic into [`ExchangeError::Rejected`].
fn no_panic<T>(work: impl FnOnce() -> T) -> Result<T, ExchangeError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).map_err(|panic| {
        let reason = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        ExchangeError::Rejected(format!("it panicked: {reason}"))
    })
}

/// The order in which to take `nodes` (hash, deps) so that dependencies within the set come
/// before their dependents; the given order when it already is causal.
fn causal_order(nodes: &[(ChangeHash, &[ChangeHash])]) -> Vec<usize> {
    let index: HashMap<ChangeHash, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, (h, _))| (*h, i))
        .collect();
    // 0: not reached, 1: on the stack, 2: placed.
    let mut state = vec![0u8; nodes.len()];
    let mut order = Vec::with_capacity(nodes.len());
    for root in 0..nodes.len() {
        if state[root] != 0 {
            continue;
        }
        state[root] = 1;
        let mut stack = vec![(root, 0usize)];
        while let Some(&(i, next)) = stack.last() {
            match nodes[i].1.get(next) {
                Some(dep) => {
                    stack.last_mut().expect("not empty").1 += 1;
                    if let Some(&j) = index.get(dep) {
                        if state[j] == 0 {
                            state[j] = 1;
                            stack.push((j, 0));
                        }
                    }
                }
                None => {
                    state[i] = 2;
                    order.push(i);
                    stack.pop();
                }
            }
        }
    }
    order
}

/// Server side: the changes of `doc` that a peer holding `have` lacks, dependencies first, as
/// raw change bytes. A page stops before the change that would take it past `max_bytes`, but
/// holds at least one change if any is missing, so every call makes progress; `more` says
/// whether changes remain. Hashes in `have` that `doc` does not know are ignored (the peer's
/// own changes). More than [`MAX_HAVE`] hashes: [`ExchangeError::TooManyHave`].
///
/// Each call rebuilds every change the peer lacks (Automerge builds them in one pass over the
/// document), so a first pull of a large document in small pages costs pages × document.
pub fn changes_since(
    doc: &Automerge,
    have: &[[u8; 32]],
    max_bytes: usize,
) -> Result<ChangesPage, ExchangeError> {
    if have.len() > MAX_HAVE {
        return Err(ExchangeError::TooManyHave {
            count: have.len(),
            max: MAX_HAVE,
        });
    }
    no_panic(|| {
        let known: Vec<ChangeHash> = have
            .iter()
            .map(|h| ChangeHash(*h))
            .filter(|h| doc.get_change_meta_by_hash(h).is_some())
            .collect();
        let missing = doc.get_changes(&known);
        let nodes: Vec<_> = missing.iter().map(|c| (c.hash(), c.deps())).collect();
        let order = causal_order(&nodes);
        let mut page = ChangesPage::default();
        let mut bytes = 0usize;
        for i in order {
            let raw = missing[i].raw_bytes();
            if !page.changes.is_empty() && bytes.saturating_add(raw.len()) > max_bytes {
                page.more = true;
                break;
            }
            bytes = bytes.saturating_add(raw.len());
            page.changes.push(raw.to_vec());
        }
        page
    })
}

/// Follower side: one pull of one document from one origin, on a copy of the follower's
/// document. Feed it pages ([`Self::apply`]), asking with [`Self::have`] each time, then
/// check the result against the verified manifest ([`Self::finish`]).
///
/// After an error the pull is spoiled (the copy may hold part of a page, or queued changes):
/// every later [`Self::apply`] or [`Self::finish`] returns that first error again. Start a new
/// pull from the follower's document.
///
/// A pull ends: while [`Self::have`] names everything received (at most [`MAX_HAVE`] heads),
/// each page of an honest server holds changes not received before. Past that bound the server
/// may send again what the follower already got; a page with nothing new is
/// [`ExchangeError::Stalled`], not a loop. The caller still bounds a pull (pages, time): a
/// dishonest server can send empty pages marked `more` forever.
#[derive(Debug)]
pub struct DocPull {
    trial: Automerge,
    /// Hashes the origin surely knows: the heads of `known` (those the follower has) and of
    /// every change received in this pull, including those skipped as already present.
    frontier: BTreeSet<[u8; 32]>,
    /// Every change received in this pull, new or not.
    received: HashSet<ChangeHash>,
    added: Vec<Change>,
    added_bytes: usize,
    max_added_bytes: usize,
    spoiled: Option<ExchangeError>,
}

/// The outcome of a pull that passed [`DocPull::finish`].
#[derive(Debug)]
pub struct Pulled {
    /// The follower's document with the origin's changes merged in.
    pub doc: Automerge,
    /// The changes received that the follower did not have, in the order applied (causal).
    pub added: Vec<Change>,
    /// Raw bytes of `added`.
    pub added_bytes: usize,
    /// Heads of `doc`, sorted.
    pub heads: Vec<[u8; 32]>,
}

impl DocPull {
    /// `local`: a copy of the follower's current document (`Automerge::new()` if it has
    /// none). `known`: heads of the last manifest accepted from this origin (may be empty).
    /// `max_added_bytes`: bound on the raw bytes of new changes over the whole pull.
    /// A `known` hash the document lacks is dropped: naming it would make the server
    /// withhold changes the follower needs. `local` should hold no queued changes (as
    /// assembled from storage): one that a pulled change completes joins the document
    /// without being `added`, and [`Self::finish`] may then refuse changes below it as
    /// [`ExchangeError::Unvouched`] (a refusal, never a wrong acceptance).
    pub fn new(local: Automerge, known: &[[u8; 32]], max_added_bytes: usize) -> Self {
        let frontier = known
            .iter()
            .filter(|h| local.get_change_meta_by_hash(&ChangeHash(**h)).is_some())
            .copied()
            .collect();
        DocPull {
            trial: local,
            frontier,
            received: HashSet::new(),
            added: Vec::new(),
            added_bytes: 0,
            max_added_bytes,
            spoiled: None,
        }
    }

    /// What to send as `have`, sorted, without duplicates, at most [`MAX_HAVE`]: the heads
    /// of `known` and of everything received so far in this pull (so a page of changes the
    /// follower already had still moves the server on), then the copy's current heads.
    ///
    /// The copy's heads alone are not enough: when they are the follower's own changes the
    /// server knows none of them and would send the same first page forever. Truncation only
    /// costs efficiency, never correctness: the server then sends changes the follower
    /// already has, which [`Self::apply`] skips and does not count (a page of nothing else
    /// is [`ExchangeError::Stalled`]).
    pub fn have(&self) -> Vec<[u8; 32]> {
        let mut have: Vec<[u8; 32]> = self.frontier.iter().copied().collect();
        have.extend(self.trial.get_heads().into_iter().map(|h| h.0));
        let mut seen = HashSet::new();
        have.retain(|h| seen.insert(*h));
        have.truncate(MAX_HAVE);
        have.sort_unstable();
        have
    }

    /// Applies one page of parsed changes (the caller parses and size-checks the raw bytes
    /// first). Changes already present are skipped. Every new change must end up in the
    /// document: one whose dependencies were not sent before it (or in the same page) is
    /// [`ExchangeError::MissingDependencies`]. New bytes past the pull's bound:
    /// [`ExchangeError::TooMuch`], checked before anything is applied. A page holding only
    /// changes already received in this pull: [`ExchangeError::Stalled`]. An error spoils
    /// the pull (see [`DocPull`]).
    pub fn apply(&mut self, changes: Vec<Change>) -> Result<(), ExchangeError> {
        if let Some(e) = &self.spoiled {
            return Err(e.clone());
        }
        let result = self.apply_page(changes);
        if let Err(e) = &result {
            self.spoiled = Some(e.clone());
        }
        result
    }

    fn apply_page(&mut self, changes: Vec<Change>) -> Result<(), ExchangeError> {
        let mut seen = HashSet::new();
        let mut page: Vec<Change> = changes
            .into_iter()
            .filter(|c| seen.insert(c.hash()))
            .collect();
        if !page.is_empty() && seen.is_subset(&self.received) {
            return Err(ExchangeError::Stalled);
        }
        let order = {
            let nodes: Vec<_> = page.iter().map(|c| (c.hash(), c.deps())).collect();
            causal_order(&nodes)
        };
        let mut slots: Vec<Option<Change>> = page.drain(..).map(Some).collect();
        page.extend(
            order
                .into_iter()
                .map(|i| slots[i].take().expect("each index once")),
        );
        let fresh: Vec<Change> = page
            .iter()
            .filter(|c| self.trial.get_change_meta_by_hash(&c.hash()).is_none())
            .cloned()
            .collect();
        let bytes = fresh.iter().fold(self.added_bytes, |n, c| {
            n.saturating_add(c.raw_bytes().len())
        });
        if bytes > self.max_added_bytes {
            return Err(ExchangeError::TooMuch {
                bytes,
                max: self.max_added_bytes,
            });
        }
        if !fresh.is_empty() {
            let trial = &mut self.trial;
            no_panic(|| trial.apply_changes(fresh.iter().cloned()))?
                .map_err(|e| ExchangeError::Rejected(e.to_string()))?;
        }

        // Automerge queues a change whose dependencies are missing instead of failing.
        if let Some(stuck) = fresh
            .iter()
            .find(|c| self.trial.get_change_meta_by_hash(&c.hash()).is_none())
        {
            return Err(ExchangeError::MissingDependencies {
                change: stuck.hash().0,
                missing: self.missing_for(stuck, &fresh),
            });
        }
        for c in &page {
            for dep in c.deps() {
                self.frontier.remove(&dep.0);
            }
            self.frontier.insert(c.hash().0);
        }
        self.received.extend(seen);
        self.added_bytes = bytes;
        self.added.extend(fresh);
        Ok(())
    }

    /// The first hash on each path back from `stuck` that is neither in the document nor in
    /// this page, sorted.
    fn missing_for(&self, stuck: &Change, page: &[Change]) -> Vec<[u8; 32]> {
        let by_hash: HashMap<ChangeHash, &Change> = page.iter().map(|c| (c.hash(), c)).collect();
        let mut missing = Vec::new();
        let mut seen = HashSet::new();
        let mut stack: Vec<ChangeHash> = stuck.deps().to_vec();
        while let Some(hash) = stack.pop() {
            if !seen.insert(hash) || self.trial.get_change_meta_by_hash(&hash).is_some() {
                continue;
            }
            match by_hash.get(&hash) {
                Some(change) => stack.extend_from_slice(change.deps()),
                None => missing.push(hash.0),
            }
        }
        missing.sort_unstable();
        missing
    }

    /// Checks the result against a verified manifest, which must carry heads
    /// ([`ExchangeError::NotADocManifest`]): every head it names is in the document
    /// ([`ExchangeError::NotCovered`]), and every added change is one of those heads or an
    /// ancestor of one ([`ExchangeError::Unvouched`]).
    pub fn finish(self, manifest: &Manifest) -> Result<Pulled, ExchangeError> {
        if let Some(e) = self.spoiled {
            return Err(e);
        }
        let ContentDigest::Heads(heads) = &manifest.digest else {
            return Err(ExchangeError::NotADocManifest);
        };
        let mut missing: Vec<[u8; 32]> = heads
            .iter()
            .filter(|h| {
                self.trial
                    .get_change_meta_by_hash(&ChangeHash(**h))
                    .is_none()
            })
            .copied()
            .collect();
        if !missing.is_empty() {
            missing.sort_unstable();
            missing.dedup();
            return Err(ExchangeError::NotCovered { missing });
        }

        // The path from a head down to an added change runs through added changes only
        // (anything the follower already had has all its ancestors), so walking the added
        // changes from the heads finds every vouched one. Automerge's own
        // `get_changes(heads)` is not used: it works by per-actor sequence numbers, not by
        // the dependency graph, and rebuilds every change.
        let by_hash: HashMap<ChangeHash, &Change> =
            self.added.iter().map(|c| (c.hash(), c)).collect();
        let mut vouched = HashSet::new();
        let mut stack: Vec<ChangeHash> = heads.iter().map(|h| ChangeHash(*h)).collect();
        while let Some(hash) = stack.pop() {
            if let Some(change) = by_hash.get(&hash) {
                if vouched.insert(hash) {
                    stack.extend_from_slice(change.deps());
                }
            }
        }
        if let Some(stray) = self.added.iter().find(|c| !vouched.contains(&c.hash())) {
            return Err(ExchangeError::Unvouched {
                change: stray.hash().0,
            });
        }

        let mut doc_heads: Vec<[u8; 32]> =
            self.trial.get_heads().into_iter().map(|h| h.0).collect();
        doc_heads.sort_unstable();
        Ok(Pulled {
            doc: self.trial,
            added: self.added,
            added_bytes: self.added_bytes,
            heads: doc_heads,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use automerge::transaction::Transactable;
    use automerge::{ActorId, ReadDoc, ROOT};
    use proptest::prelude::*;

    use super::*;
    use crate::manifest::MANIFEST_VERSION;
    use crate::Resource;

    fn site(n: u8) -> Automerge {
        Automerge::new().with_actor(ActorId::from([n; 16]))
    }

    /// One change putting `value` at `key`; its hash.
    fn edit(doc: &mut Automerge, key: &str, value: &str) -> [u8; 32] {
        let mut tx = doc.transaction();
        tx.put(ROOT, key, value).unwrap();
        tx.commit().0.expect("a change").0
    }

    /// A document of `n` changes by site `actor`, each holding about 100 bytes of text.
    fn history(actor: u8, n: usize) -> Automerge {
        let mut doc = site(actor);
        for i in 0..n {
            edit(&mut doc, &format!("k{i}"), &format!("{i:0>100}"));
        }
        doc
    }

    fn heads(doc: &Automerge) -> Vec<[u8; 32]> {
        let mut heads: Vec<_> = doc.get_heads().into_iter().map(|h| h.0).collect();
        heads.sort_unstable();
        heads
    }

    fn manifest(doc: &Automerge) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            origin: [1; 32],
            resource: Resource::doc("d"),
            seq: 1,
            digest: ContentDigest::heads(heads(doc)),
            parent: None,
            issued_at: 0,
        }
    }

    fn all_changes(doc: &Automerge) -> Vec<Change> {
        doc.get_changes(&[])
    }

    fn parse(page: &ChangesPage) -> Vec<Change> {
        page.changes
            .iter()
            .map(|b| Change::from_bytes(b.clone()).unwrap())
            .collect()
    }

    /// What a pull saw of the server: pages and changes received.
    #[derive(Debug, Default, PartialEq)]
    struct Seen {
        pages: usize,
        received: usize,
    }

    /// Pulls from `server` until it has nothing more, or `stop_after` pages.
    fn pull_from(
        server: &Automerge,
        pull: &mut DocPull,
        max_bytes: usize,
        stop_after: usize,
    ) -> Result<Seen, ExchangeError> {
        let mut seen = Seen::default();
        while seen.pages < stop_after {
            assert!(seen.pages < 1000, "the pull does not end");
            let page = changes_since(server, &pull.have(), max_bytes)?;
            assert!(
                page.changes.len() == 1
                    || page.changes.iter().map(Vec::len).sum::<usize>() <= max_bytes
            );
            seen.pages += 1;
            seen.received += page.changes.len();
            pull.apply(parse(&page))?;
            if !page.more {
                break;
            }
        }
        Ok(seen)
    }

    fn pull_all(
        server: &Automerge,
        pull: &mut DocPull,
        max_bytes: usize,
    ) -> Result<Seen, ExchangeError> {
        pull_from(server, pull, max_bytes, usize::MAX)
    }

    #[test]
    fn an_empty_follower_pulls_a_document_in_pages() {
        let origin = history(1, 9);
        let sizes: Vec<usize> = all_changes(&origin)
            .iter()
            .map(|c| c.raw_bytes().len())
            .collect();
        let max = *sizes.iter().max().unwrap();
        assert!(4 * sizes.iter().min().unwrap() > 3 * max, "{sizes:?}");
        let mut pull = DocPull::new(Automerge::new(), &[], usize::MAX);
        let seen = pull_all(&origin, &mut pull, 3 * max).unwrap();
        assert_eq!((seen.pages, seen.received), (3, 9));
        let pulled = pull.finish(&manifest(&origin)).unwrap();
        assert_eq!(pulled.heads, heads(&origin));
        assert_eq!(pulled.doc.hydrate(None), origin.hydrate(None));
        assert_eq!(pulled.added.len(), 9);
        assert_eq!(pulled.added_bytes, sizes.iter().sum::<usize>());
        // In the order applied, which is causal: the origin's own order here.
        let order: Vec<_> = pulled.added.iter().map(Change::hash).collect();
        let expected: Vec<_> = all_changes(&origin).iter().map(Change::hash).collect();
        assert_eq!(order, expected);
    }

    #[test]
    fn a_page_always_makes_progress() {
        let origin = history(1, 4);
        let mut pull = DocPull::new(Automerge::new(), &[], usize::MAX);
        let seen = pull_all(&origin, &mut pull, 1).unwrap();
        assert_eq!((seen.pages, seen.received), (4, 4));
        assert_eq!(
            pull.finish(&manifest(&origin)).unwrap().heads,
            heads(&origin)
        );
        // Nothing missing: an empty page, no more.
        assert_eq!(
            changes_since(&origin, &heads(&origin), 1).unwrap(),
            ChangesPage::default()
        );
    }

    #[test]
    fn a_follower_receives_only_what_it_lacks() {
        let origin = history(1, 10);
        let mut follower = Automerge::new();
        follower
            .apply_changes(all_changes(&origin)[..4].to_vec())
            .unwrap();
        let mut pull = DocPull::new(follower, &[], usize::MAX);
        let seen = pull_all(&origin, &mut pull, 1 << 20).unwrap();
        assert_eq!((seen.pages, seen.received), (1, 6));
        let pulled = pull.finish(&manifest(&origin)).unwrap();
        assert_eq!(pulled.added.len(), 6);
        assert_eq!(pulled.heads, heads(&origin));
        assert_eq!(pulled.doc.hydrate(None), origin.hydrate(None));
    }

    #[test]
    fn diverged_sites_merge_and_the_follower_keeps_its_own_changes() {
        let mut origin = history(1, 3);
        let shared = heads(&origin);
        let mut follower = origin.clone();
        follower.set_actor(ActorId::from([2; 16]));
        let origin_new: BTreeSet<_> = (0..3)
            .map(|i| ChangeHash(edit(&mut origin, &format!("o{i}"), "origin")))
            .collect();
        let own: Vec<_> = (0..2)
            .map(|i| ChangeHash(edit(&mut follower, &format!("f{i}"), "follower")))
            .collect();

        // With the shared heads as `known`, only the origin's new changes travel.
        let mut pull = DocPull::new(follower.clone(), &shared, usize::MAX);
        let seen = pull_all(&origin, &mut pull, 1 << 20).unwrap();
        assert_eq!(seen.received, 3);
        let pulled = pull.finish(&manifest(&origin)).unwrap();
        let added: BTreeSet<_> = pulled.added.iter().map(Change::hash).collect();
        assert_eq!(added, origin_new);
        for h in heads(&origin).iter().chain(own.iter().map(|h| &h.0)) {
            assert!(pulled
                .doc
                .get_change_meta_by_hash(&ChangeHash(*h))
                .is_some());
        }
        let mut expected = follower.clone();
        expected.merge(&mut origin.clone()).unwrap();
        assert_eq!(pulled.heads, heads(&expected));
        assert_eq!(pulled.doc.hydrate(None), expected.hydrate(None));
        assert!(pulled.doc.get(ROOT, "f1").unwrap().is_some());
        assert!(pulled.doc.get(ROOT, "o2").unwrap().is_some());

        // Without `known` the follower's heads mean nothing to the origin: everything
        // travels again, but only the new changes are added.
        let mut pull = DocPull::new(follower, &[], usize::MAX);
        let seen = pull_all(&origin, &mut pull, 1 << 20).unwrap();
        assert_eq!(seen.received, 6);
        let pulled = pull.finish(&manifest(&origin)).unwrap();
        let added: BTreeSet<_> = pulled.added.iter().map(Change::hash).collect();
        assert_eq!(added, origin_new);
    }

    #[test]
    fn a_server_that_withholds_changes_is_caught() {
        let origin = history(1, 9);
        let max = all_changes(&origin)
            .iter()
            .map(|c| c.raw_bytes().len())
            .max()
            .unwrap();
        let mut pull = DocPull::new(Automerge::new(), &[], usize::MAX);
        let seen = pull_from(&origin, &mut pull, 3 * max, 2).unwrap();
        assert_eq!(seen.received, 6);
        assert_eq!(
            pull.finish(&manifest(&origin)).unwrap_err(),
            ExchangeError::NotCovered {
                missing: heads(&origin)
            }
        );
    }

    #[test]
    fn a_server_that_adds_changes_is_caught() {
        let origin = history(1, 3);
        let signed = manifest(&origin);
        // The server holds one change more than the origin signed for (a mirror making
        // things up, or the origin ahead of its manifest).
        let mut server = origin.clone();
        server.set_actor(ActorId::from([9; 16]));
        let extra = edit(&mut server, "k0", "forged");
        let mut pull = DocPull::new(Automerge::new(), &[], usize::MAX);
        pull_all(&server, &mut pull, 1 << 20).unwrap();
        assert_eq!(
            pull.finish(&signed).unwrap_err(),
            ExchangeError::Unvouched { change: extra }
        );

        // A change on a branch beside the signed history is refused just the same.
        let mut follower = Automerge::new();
        follower
            .apply_changes(all_changes(&origin)[..1].to_vec())
            .unwrap();
        let mut side = follower.clone();
        side.set_actor(ActorId::from([8; 16]));
        let branch = edit(&mut side, "k1", "beside");
        let mut pull = DocPull::new(follower, &[], usize::MAX);
        let mut page: Vec<Change> = all_changes(&origin)[1..].to_vec();
        page.push(side.get_change_by_hash(&ChangeHash(branch)).unwrap());
        pull.apply(page).unwrap();
        assert_eq!(
            pull.finish(&signed).unwrap_err(),
            ExchangeError::Unvouched { change: branch }
        );
    }

    #[test]
    fn a_page_in_any_order_is_applied_dependencies_first() {
        let origin = history(1, 4);
        let mut page = all_changes(&origin);
        let causal: Vec<_> = page.iter().map(Change::hash).collect();
        page.reverse();
        page.push(page[0].clone());
        let mut pull = DocPull::new(Automerge::new(), &[], usize::MAX);
        pull.apply(page).unwrap();
        let pulled = pull.finish(&manifest(&origin)).unwrap();
        let added: Vec<_> = pulled.added.iter().map(Change::hash).collect();
        assert_eq!(added, causal);
    }

    #[test]
    fn a_change_sent_before_its_dependency_is_refused_and_spoils_the_pull() {
        let origin = history(1, 3);
        let changes = all_changes(&origin);
        let mut pull = DocPull::new(Automerge::new(), &[], usize::MAX);
        let err = pull
            .apply(vec![changes[0].clone(), changes[2].clone()])
            .unwrap_err();
        let expected = ExchangeError::MissingDependencies {
            change: changes[2].hash().0,
            missing: vec![changes[1].hash().0],
        };
        assert_eq!(err, expected);
        assert!(err
            .to_string()
            .contains(&hex::encode(&changes[1].hash().0[..6])));
        // Spoiled: sending the missing change now does not rescue it.
        assert_eq!(pull.apply(vec![changes[1].clone()]), Err(expected.clone()));
        assert_eq!(pull.finish(&manifest(&origin)).unwrap_err(), expected);
    }

    #[test]
    fn the_bytes_added_over_a_pull_are_bounded() {
        let origin = history(1, 5);
        let sizes: Vec<usize> = all_changes(&origin)
            .iter()
            .map(|c| c.raw_bytes().len())
            .collect();
        let bound = sizes[0] + sizes[1] + sizes[2] - 1;
        let mut pull = DocPull::new(Automerge::new(), &[], bound);
        assert_eq!(
            pull_all(&origin, &mut pull, 1).unwrap_err(),
            ExchangeError::TooMuch {
                bytes: bound + 1,
                max: bound
            }
        );

        // Changes the follower already has do not count.
        let mut follower = Automerge::new();
        follower
            .apply_changes(all_changes(&origin)[..2].to_vec())
            .unwrap();
        let mut pull = DocPull::new(follower, &[], sizes[2..].iter().sum());
        let page = ChangesPage {
            changes: all_changes(&origin)
                .iter()
                .map(|c| c.raw_bytes().to_vec())
                .collect(),
            more: false,
        };
        pull.apply(parse(&page)).unwrap();
        let pulled = pull.finish(&manifest(&origin)).unwrap();
        assert_eq!(pulled.added_bytes, sizes[2..].iter().sum::<usize>());
    }

    #[test]
    fn have_is_bounded() {
        let origin = history(1, 2);
        let many: Vec<[u8; 32]> = (0..=MAX_HAVE as u32)
            .map(|i| {
                let mut h = [0; 32];
                h[..4].copy_from_slice(&i.to_be_bytes());
                h
            })
            .collect();
        assert_eq!(
            changes_since(&origin, &many, 1 << 20),
            Err(ExchangeError::TooManyHave {
                count: MAX_HAVE + 1,
                max: MAX_HAVE
            })
        );
        assert_eq!(
            changes_since(&origin, &many[..MAX_HAVE], 1 << 20)
                .unwrap()
                .changes
                .len(),
            2
        );

        // A known hash the follower lacks is not sent (the server would skip what it names).
        let pull = DocPull::new(Automerge::new(), &many[..3], usize::MAX);
        assert_eq!(pull.have(), Vec::<[u8; 32]>::new());
    }

    #[test]
    fn a_history_wider_than_have_stalls_or_needs_larger_pages() {
        // More concurrent changes than `have` may name, then one change merging them.
        let mut origin = site(1);
        for i in 0..MAX_HAVE + 40 {
            let mut writer = site(0).with_actor(ActorId::from((i as u32 + 10).to_be_bytes()));
            edit(&mut writer, "k", "v");
            origin.apply_changes(all_changes(&writer)).unwrap();
        }
        assert_eq!(origin.get_heads().len(), MAX_HAVE + 40);
        edit(&mut origin, "k", "merged");
        let one = all_changes(&origin)[0].raw_bytes().len();

        // Pages of 20 changes: once everything concurrent is received, `have` cannot name it
        // all, and the server sends again what the follower got.
        let mut pull = DocPull::new(Automerge::new(), &[], usize::MAX);
        assert_eq!(
            pull_all(&origin, &mut pull, 20 * one),
            Err(ExchangeError::Stalled)
        );
        assert_eq!(pull.have().len(), MAX_HAVE);
        assert_eq!(pull.apply(vec![]), Err(ExchangeError::Stalled));

        // Pages that hold the excess and the (large) merging change get through, some
        // changes sent twice: the first page has 530 concurrent changes, `have` names 512.
        let mut pull = DocPull::new(Automerge::new(), &[], usize::MAX);
        let seen = pull_all(&origin, &mut pull, 530 * one).unwrap();
        assert_eq!(seen.pages, 2);
        assert!(seen.received > MAX_HAVE + 41, "{seen:?}");
        let pulled = pull.finish(&manifest(&origin)).unwrap();
        assert_eq!(pulled.added.len(), MAX_HAVE + 41);
        assert_eq!(pulled.heads, heads(&origin));
    }

    #[test]
    fn a_follower_ahead_of_the_origin_still_finishes() {
        // The follower has all of the origin's changes and one of its own on top, and no
        // `known`: the server knows none of its heads, yet pages of changes it already has
        // move the pull on.
        let origin = history(1, 5);
        let mut follower = origin.clone();
        follower.set_actor(ActorId::from([2; 16]));
        edit(&mut follower, "mine", "x");
        let mut pull = DocPull::new(follower.clone(), &[], usize::MAX);
        let seen = pull_all(&origin, &mut pull, 1).unwrap();
        assert_eq!((seen.pages, seen.received), (5, 5));
        let pulled = pull.finish(&manifest(&origin)).unwrap();
        assert!(pulled.added.is_empty());
        assert_eq!(pulled.heads, heads(&follower));
    }

    #[test]
    fn unknown_have_hashes_are_ignored() {
        let origin = history(1, 5);
        let changes = all_changes(&origin);
        let page = changes_since(&origin, &[[7; 32], changes[2].hash().0], 1 << 20).unwrap();
        let sent: Vec<_> = parse(&page).iter().map(Change::hash).collect();
        assert_eq!(sent, vec![changes[3].hash(), changes[4].hash()]);
        let page = changes_since(&origin, &[[7; 32], [0xff; 32]], 1 << 20).unwrap();
        assert_eq!(page.changes.len(), 5);
        assert!(!page.more);
    }

    #[test]
    fn other_manifests_and_conflicting_changes_are_refused() {
        let origin = history(1, 2);
        let mut pull = DocPull::new(Automerge::new(), &[], usize::MAX);
        pull_all(&origin, &mut pull, 1 << 20).unwrap();
        let blobs = Manifest {
            resource: Resource::blob("b"),
            digest: ContentDigest::BlobTags {
                count: 0,
                list: [0; 32],
            },
            ..manifest(&origin)
        };
        assert_eq!(
            pull.finish(&blobs).unwrap_err(),
            ExchangeError::NotADocManifest
        );

        // Another change under the same actor and sequence number as one the follower has:
        // Automerge refuses it.
        let mut follower = site(1);
        edit(&mut follower, "k0", "mine");
        let mut pull = DocPull::new(follower, &[], usize::MAX);
        let err = pull.apply(all_changes(&origin)).unwrap_err();
        assert!(matches!(err, ExchangeError::Rejected(_)), "{err:?}");
    }

    #[derive(Clone, Debug)]
    enum Step {
        /// An edit at the origin (true) or at the follower.
        Edit(bool, u8, u8),
        /// A sync: the follower takes everything from the origin (true), or the reverse.
        Sync(bool),
    }

    fn arb_step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (any::<bool>(), 0u8..4, any::<u8>()).prop_map(|(o, k, v)| Step::Edit(o, k, v)),
            1 => any::<bool>().prop_map(Step::Sync),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn pulls_of_random_histories_cover_the_origin(
            steps in proptest::collection::vec(arb_step(), 0..16),
            max_bytes in 1usize..400,
            use_known in any::<bool>(),
        ) {
            let mut origin = site(1);
            let mut follower = site(2);
            let mut known = Vec::new();
            for (i, step) in steps.into_iter().enumerate() {
                match step {
                    Step::Edit(at_origin, key, value) => {
                        let doc = if at_origin { &mut origin } else { &mut follower };
                        // Unique values: writing a key's current value makes no change.
                        edit(doc, &format!("k{key}"), &format!("{i}:{value}"));
                    }
                    Step::Sync(true) => {
                        follower.merge(&mut origin.clone()).unwrap();
                        known = heads(&origin);
                    }
                    Step::Sync(false) => {
                        origin.merge(&mut follower.clone()).unwrap();
                    }
                }
            }
            let known = if use_known { known } else { Vec::new() };
            let mut pull = DocPull::new(follower.clone(), &known, usize::MAX);
            pull_all(&origin, &mut pull, max_bytes).unwrap();
            let pulled = pull.finish(&manifest(&origin)).unwrap();

            for h in heads(&origin) {
                prop_assert!(pulled.doc.get_change_meta_by_hash(&ChangeHash(h)).is_some());
            }
            let mut expected = follower.clone();
            expected.merge(&mut origin.clone()).unwrap();
            prop_assert_eq!(&pulled.heads, &heads(&expected));
            prop_assert_eq!(pulled.doc.hydrate(None), expected.hydrate(None));
            let added: BTreeSet<_> = pulled.added.iter().map(Change::hash).collect();
            let lacking: BTreeSet<_> =
                follower.get_changes_added(&origin).iter().map(Change::hash).collect();
            prop_assert_eq!(added, lacking);
        }
    }
}
