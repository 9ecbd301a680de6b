//! Automatic compaction, as etcd has it: the leader compacts history on a schedule so the
//! store does not grow without bound when nobody runs `aspen kv compact`.
//!
//! Periodic mode keeps a time's worth of history: the leader samples the store revision
//! every `every` and compacts to the revision it sampled `retention` ago. Revision mode keeps
//! a number of revisions: every `every`, it compacts to the current revision minus
//! `retention`. Compaction is an ordinary Raft write (`WriteOp::Compact`), so every replica
//! compacts at the same point of the log; watches from before it then end with "compacted".

use std::collections::VecDeque;

use aspen_kv::api::{Command, Revision, WriteOp};
use tokio::time::Instant;

use super::ClusterHandle;
use crate::config::AutoCompaction;

/// Runs `policy` while this node leads (samples start over when it becomes leader).
pub async fn run(cluster: ClusterHandle, policy: AutoCompaction) {
    let every = match policy {
        AutoCompaction::Off => return,
        AutoCompaction::Periodic { every, .. } | AutoCompaction::Revision { every, .. } => every,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // (when, revision) samples, oldest first (periodic mode).
    let mut samples: VecDeque<(Instant, Revision)> = VecDeque::new();
    loop {
        tick.tick().await;
        if !cluster.is_leader() {
            samples.clear();
            continue;
        }
        let status = match cluster.sm.status().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("auto compaction: cannot read the store status: {e}");
                continue;
            }
        };
        let target = match policy {
            AutoCompaction::Off => return,
            AutoCompaction::Revision { retention, .. } => status.revision.saturating_sub(retention),
            AutoCompaction::Periodic { retention, .. } => {
                let now = Instant::now();
                samples.push_back((now, status.revision));
                let mut target = 0;
                while let Some(&(at, revision)) = samples.front() {
                    if now.duration_since(at) < retention {
                        break;
                    }
                    target = revision;
                    samples.pop_front();
                }
                target
            }
        };
        if target <= status.compacted || target == 0 {
            continue;
        }
        let compact = Command {
            session: None,
            op: WriteOp::Compact { revision: target },
        };
        match cluster.propose(vec![compact]).await {
            Ok(results) => match results.into_iter().next() {
                Some(Ok(_)) => tracing::debug!(revision = target, "auto compaction"),
                // Compacted meanwhile (by hand, or a concurrent check): nothing to do.
                Some(Err(e)) => tracing::debug!("auto compaction to {target} skipped: {e}"),
                None => {}
            },
            Err(e) => tracing::debug!("auto compaction to {target} not proposed: {e}"),
        }
    }
}
