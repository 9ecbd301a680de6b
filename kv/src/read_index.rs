//! Linearizable read points (ReadIndex) that stay safe across a leader's restart.
//!
//! openraft 0.9 restored a node whose persisted vote is its own committed vote as leader at
//! startup, with its commit index unknown (Aspen does not persist it), and then offered
//! max(committed, first log id of its leadership) as the read index: possibly below entries
//! that were committed, and acknowledged to clients, before the restart. A read at that index
//! could miss acknowledged writes. (Seen as a node denying its admin after a full-cluster
//! restart because its access policy had not been replayed yet; and as simulation seed 5893,
//! while the simulation still read at openraft's own read point, returning a key as absent
//! after a leader came back with its committed vote.) openraft 0.10 does the same unless told
//! not to; Aspen tells it not to (`raft_config`: a restarted leader runs an election), for a
//! worse reason (seed 16662), and keeps this floor as a second line.
//!
//! So a [`ReadIndex`] never hands out an index below the leader's last log index as of its
//! first read under the current vote: every entry in a leader's log is committed while it
//! stays leader (a leader's log holds only entries of earlier terms that it must commit and
//! its own), so this costs the first read of a leadership a wait, never a stale answer.
//!
//! The node and the deterministic simulation both read through this type, so the simulation
//! checks the read path the node runs.

use std::sync::Mutex;

use openraft::async_runtime::WatchReceiver;
use openraft::error::{LinearizableReadError, RaftError};
use openraft::ReadPolicy;

use crate::raft_types::{Raft, TypeConfig, Vote};

/// What confirming a read point can fail with (openraft's own error).
pub type ReadIndexError = RaftError<TypeConfig, LinearizableReadError<TypeConfig>>;

/// Read points of one Raft instance (make a new one when the node restarts).
pub struct ReadIndex {
    raft: Raft,
    /// The vote the floor was taken under, and the leader's last log index then.
    floor: Mutex<Option<(Vote, Option<u64>)>>,
}

impl ReadIndex {
    pub fn new(raft: Raft) -> Self {
        ReadIndex {
            raft,
            floor: Mutex::new(None),
        }
    }

    /// Confirms leadership with a quorum (openraft's ReadIndex round) and returns the index
    /// a linearizable read must wait to have applied: openraft's read index, raised to the
    /// floor of this leadership.
    pub async fn confirm(&self) -> Result<Option<u64>, ReadIndexError> {
        let (read, _applied) = self.raft.get_read_log_id(ReadPolicy::ReadIndex).await?;
        // Read after the core answered, so at least its state at startup is reported.
        let (vote, last) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            (m.vote, m.last_log_index)
        };
        let floor = {
            let mut floor = self.floor.lock().expect("read floor lock");
            match &*floor {
                Some((v, index)) if *v == vote => *index,
                _ => {
                    *floor = Some((vote, last));
                    last
                }
            }
        };
        Ok(Some(read.index()).max(floor))
    }
}
