//! The leader's lease clock: when each lease runs out.
//!
//! Deadlines are not replicated state. Every replica's [`Lessor`] knows which leases exist
//! (apply tells it), but only the leader's holds deadlines: it is promoted when its node
//! becomes leader and then gives every lease its full time to live from that moment (as etcd
//! does), so a leader change never makes a lease expire early. Keep-alives reset a deadline
//! on the leader only; when one passes, the leader proposes a
//! [`crate::api::WriteOp::LeaseExpire`] through Raft and apply deletes the lease and its keys
//! on every replica alike.
//!
//! Why a keep-alive acknowledged at time t keeps the lease until at least t + TTL, across
//! leader changes: the node acknowledges it only after renewing the deadline and then
//! confirming its leadership with a quorum (a ReadIndex round that starts after the renewal),
//! applying up to that read index, and finding the lease still there (so an expiry committed
//! earlier, perhaps by a previous leader, is never answered with an acknowledgement).
//! A later leader's election needs a vote from that quorum, so it happens after the renewal,
//! and its promotion gives the lease a full TTL from then. An old leader that has lost its
//! quorum cannot get an expiry committed: its entries lose to the new leader's log.
//!
//! Time is passed in by the caller (a monotonic `Instant`), so the rules are tested without
//! waiting.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::api::LeaseId;

/// How long after proposing an expiry the leader proposes it again, if the lease still
/// exists (the proposal was lost to a leader change or a full queue).
pub const EXPIRY_RETRY: Duration = Duration::from_secs(1);

/// Why a keep-alive was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenewError {
    #[error("lease {0} not found (it expired, was revoked or never existed)")]
    NotFound(LeaseId),
    #[error("this node does not lead the cluster; its lease clock is stopped")]
    NotLeader,
}

#[derive(Clone, Copy, Debug)]
struct Clock {
    ttl: Duration,
    grant: u64,
    /// Leader only: when the lease runs out.
    deadline: Option<Instant>,
    /// Leader only: when the expiry loop looks at it next (the deadline, or a retry).
    check_at: Option<Instant>,
}

#[derive(Default)]
struct State {
    leader: bool,
    leases: HashMap<LeaseId, Clock>,
    /// (check_at, id) for every lease with a `check_at`.
    queue: BTreeSet<(Instant, LeaseId)>,
}

/// See the module docs. One per state machine; shared by apply and the node's lease loop.
#[derive(Default)]
pub struct Lessor {
    state: std::sync::Mutex<State>,
    /// Signalled when the first deadline may have moved earlier (a grant while leading, a
    /// reset): the expiry loop sleeps until [`Lessor::next_check`] and must look again.
    sooner: tokio::sync::Notify,
}

fn deadline(now: Instant, ttl: Duration) -> Instant {
    // A TTL of centuries may not fit an Instant: a year from now is as good as never here.
    now.checked_add(ttl)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

impl State {
    fn schedule(&mut self, id: LeaseId, at: Option<Instant>) {
        let Some(clock) = self.leases.get_mut(&id) else {
            return;
        };
        if let Some(old) = clock.check_at.take() {
            self.queue.remove(&(old, id));
        }
        clock.check_at = at;
        if let Some(at) = at {
            self.queue.insert((at, id));
        }
    }
}

impl Lessor {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("lessor lock")
    }

    /// Apply granted a lease.
    pub(crate) fn granted(&self, id: LeaseId, ttl_secs: u64, grant: u64, now: Instant) {
        let mut s = self.lock();
        let ttl = Duration::from_secs(ttl_secs);
        let leader = s.leader;
        if let Some(old) = s.leases.get(&id).and_then(|c| c.check_at) {
            s.queue.remove(&(old, id));
        }
        s.leases.insert(
            id,
            Clock {
                ttl,
                grant,
                deadline: None,
                check_at: None,
            },
        );
        if leader {
            let at = deadline(now, ttl);
            s.leases.get_mut(&id).expect("inserted").deadline = Some(at);
            let first = s.queue.first().map(|(first, _)| *first);
            s.schedule(id, Some(at));
            drop(s);
            if first.is_none_or(|first| at < first) {
                // A permit is kept if nobody waits yet: the loop's next wait returns at once.
                self.sooner.notify_one();
            }
        }
    }

    /// Completes when a deadline earlier than the last [`Self::next_check`] may exist (see
    /// the field); a notification given before the wait began is not lost.
    pub async fn due_sooner(&self) {
        self.sooner.notified().await
    }

    /// Apply removed a lease (revoked or expired).
    pub(crate) fn removed(&self, id: LeaseId) {
        let mut s = self.lock();
        s.schedule(id, None);
        s.leases.remove(&id);
    }

    /// The store was replaced (opened, or a snapshot installed): these leases exist now.
    pub(crate) fn reset(&self, leases: Vec<(LeaseId, u64, u64)>, now: Instant) {
        let leader = {
            let mut s = self.lock();
            let leader = s.leader;
            *s = State::default();
            leader
        };
        for (id, ttl, grant) in leases {
            self.granted(id, ttl, grant, now);
        }
        if leader {
            self.promote(now);
            self.sooner.notify_one();
        }
    }

    /// This node became leader: every lease gets its full time to live from `now`.
    pub fn promote(&self, now: Instant) {
        let mut s = self.lock();
        s.leader = true;
        s.queue.clear();
        let ids: Vec<LeaseId> = s.leases.keys().copied().collect();
        for id in ids {
            let clock = s.leases.get_mut(&id).expect("listed");
            let at = deadline(now, clock.ttl);
            clock.deadline = Some(at);
            clock.check_at = None;
            s.schedule(id, Some(at));
        }
    }

    /// This node no longer leads: its deadlines mean nothing now.
    pub fn demote(&self) {
        let mut s = self.lock();
        s.leader = false;
        s.queue.clear();
        for clock in s.leases.values_mut() {
            clock.deadline = None;
            clock.check_at = None;
        }
    }

    pub fn is_leader(&self) -> bool {
        self.lock().leader
    }

    /// A keep-alive: the lease's deadline becomes `now` + its TTL. Returns the TTL. Refused
    /// for a lease whose deadline has passed (its expiry is under way). The caller must
    /// confirm leadership after this returns and before acknowledging (see module docs).
    pub fn renew(&self, id: LeaseId, now: Instant) -> Result<Duration, RenewError> {
        let mut s = self.lock();
        if !s.leader {
            return Err(RenewError::NotLeader);
        }
        let Some(clock) = s.leases.get_mut(&id) else {
            return Err(RenewError::NotFound(id));
        };
        if clock.deadline.is_some_and(|d| d <= now) {
            return Err(RenewError::NotFound(id));
        }
        let ttl = clock.ttl;
        let at = deadline(now, ttl);
        clock.deadline = Some(at);
        s.schedule(id, Some(at));
        Ok(ttl)
    }

    /// Leader only: the time left before the lease runs out (`None`: unknown lease, or not
    /// the leader).
    pub fn remaining(&self, id: LeaseId, now: Instant) -> Option<Duration> {
        let s = self.lock();
        let clock = s.leases.get(&id)?;
        clock.deadline.map(|d| d.saturating_duration_since(now))
    }

    /// Leader only: up to `max` leases whose deadline has passed, as (id, grant), to propose
    /// expiries for. Each is looked at again after [`EXPIRY_RETRY`] unless apply removes it
    /// meanwhile.
    pub fn expired(&self, now: Instant, max: usize) -> Vec<(LeaseId, u64)> {
        let mut s = self.lock();
        if !s.leader {
            return Vec::new();
        }
        let due: Vec<(Instant, LeaseId)> = s
            .queue
            .iter()
            .take_while(|(at, _)| *at <= now)
            .take(max)
            .copied()
            .collect();
        let mut out = Vec::with_capacity(due.len());
        for (_, id) in due {
            let clock = s.leases[&id];
            if clock.deadline.is_some_and(|d| d <= now) {
                out.push((id, clock.grant));
            }
            s.schedule(id, Some(now + EXPIRY_RETRY));
        }
        out
    }

    /// When [`Self::expired`] next has something to return (leader only).
    pub fn next_check(&self) -> Option<Instant> {
        self.lock().queue.first().map(|(at, _)| *at)
    }

    /// How many leases this replica knows of.
    pub fn len(&self) -> usize {
        self.lock().leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn only_a_leader_keeps_deadlines() {
        let l = Lessor::default();
        let t0 = Instant::now();
        l.granted(1, 10, 1, t0);
        assert_eq!(l.renew(1, t0), Err(RenewError::NotLeader));
        assert!(l.expired(t0 + secs(100), 10).is_empty());
        assert_eq!(l.remaining(1, t0), None);
        l.promote(t0 + secs(50));
        assert_eq!(l.remaining(1, t0 + secs(50)), Some(secs(10)));
        l.demote();
        assert!(l.expired(t0 + secs(100), 10).is_empty());
    }

    #[test]
    fn promotion_gives_every_lease_its_full_ttl() {
        let l = Lessor::default();
        let t0 = Instant::now();
        l.promote(t0);
        l.granted(1, 10, 1, t0);
        // Nine seconds in, leadership moves away and back: the lease starts over.
        l.demote();
        l.promote(t0 + secs(9));
        assert!(l.expired(t0 + secs(18), 10).is_empty());
        assert_eq!(l.expired(t0 + secs(19), 10), vec![(1, 1)]);
    }

    #[test]
    fn keep_alives_push_the_deadline_and_a_passed_one_cannot_be_renewed() {
        let l = Lessor::default();
        let t0 = Instant::now();
        l.promote(t0);
        l.granted(7, 5, 3, t0);
        assert_eq!(l.renew(7, t0 + secs(4)), Ok(secs(5)));
        assert!(l.expired(t0 + secs(8), 10).is_empty());
        assert_eq!(l.next_check(), Some(t0 + secs(9)));
        assert_eq!(l.expired(t0 + secs(9), 10), vec![(7, 3)]);
        assert_eq!(l.renew(7, t0 + secs(9)), Err(RenewError::NotFound(7)));
        // Not proposed again until the retry interval passed, then again until apply removes it.
        assert!(l.expired(t0 + secs(9), 10).is_empty());
        assert_eq!(l.expired(t0 + secs(9) + EXPIRY_RETRY, 10), vec![(7, 3)]);
        l.removed(7);
        assert!(l.expired(t0 + secs(100), 10).is_empty());
        assert_eq!(l.renew(7, t0), Err(RenewError::NotFound(7)));
        assert_eq!(l.next_check(), None);
    }

    #[test]
    fn expiries_come_in_deadline_order_and_bounded() {
        let l = Lessor::default();
        let t0 = Instant::now();
        l.promote(t0);
        for id in 1..=10u64 {
            l.granted(id, 100 - id, id, t0);
        }
        let first = l.expired(t0 + secs(200), 3);
        assert_eq!(first, vec![(10, 10), (9, 9), (8, 8)]);
        assert_eq!(l.expired(t0 + secs(200), 100).len(), 7);
    }

    #[test]
    fn a_reset_keeps_the_leadership_and_restarts_the_clocks() {
        let l = Lessor::default();
        let t0 = Instant::now();
        l.promote(t0);
        l.granted(1, 5, 1, t0);
        l.reset(vec![(2, 5, 9)], t0 + secs(3));
        assert_eq!(l.remaining(1, t0 + secs(3)), None);
        assert_eq!(l.remaining(2, t0 + secs(3)), Some(secs(5)));
        assert_eq!(l.expired(t0 + secs(8), 10), vec![(2, 9)]);
    }

    /// Whether `due_sooner` completes at once (polled once, never waited on).
    async fn signalled(l: &Lessor) -> bool {
        tokio::time::timeout(Duration::ZERO, l.due_sooner())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_lease_due_before_the_others_wakes_the_expiry_loop() {
        let l = Lessor::default();
        let t0 = Instant::now();
        // Not leading: no deadlines, nothing to wake for.
        l.granted(1, 10, 1, t0);
        assert!(!signalled(&l).await);
        l.promote(t0);
        assert!(!signalled(&l).await, "the loop promotes; it knows");
        // Later than lease 1's deadline: the loop's sleep is still right.
        l.granted(2, 20, 2, t0);
        assert!(!signalled(&l).await);
        // Earlier: the loop must look again, once.
        l.granted(3, 5, 3, t0);
        assert!(signalled(&l).await);
        assert!(!signalled(&l).await);
        // The first lease of an empty clock, and a reset while leading.
        let empty = Lessor::default();
        empty.promote(t0);
        empty.granted(9, 60, 9, t0);
        assert!(signalled(&empty).await);
        l.reset(vec![(4, 5, 4)], t0);
        assert!(signalled(&l).await);
        l.demote();
        l.granted(5, 1, 5, t0);
        assert!(!signalled(&l).await);
    }

    #[test]
    fn centuries_do_not_overflow() {
        let l = Lessor::default();
        let t0 = Instant::now();
        l.promote(t0);
        l.granted(1, crate::limits::MAX_LEASE_TTL_SECS, 1, t0);
        assert!(l.renew(1, t0).is_ok());
        assert!(l.expired(t0 + secs(3600), 10).is_empty());
    }
}
