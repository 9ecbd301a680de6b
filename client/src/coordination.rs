//! Locks and elections on leases and watches, with etcd's recipe.
//!
//! A contender holds a [`LeaseSession`] (a lease kept alive in the background) and puts one key,
//! `NAME/<lease id in hex>`, attached to it. Contenders are ordered by their key's
//! `create_revision`: the one with the lowest holds the lock (or leads the election). The
//! others each wait for the deletion of the contender just before them (a watch from the
//! revision they read at, so a deletion is never missed), then look again. When a holder's
//! session ends, its key goes with the lease, and the next contender proceeds.
//!
//! The fencing token of a lock is its key's `create_revision`: it grows with every
//! acquisition, so a resource that remembers the highest token it has seen and refuses lower
//! ones is safe from a holder that lost the lock without knowing (a process paused past its
//! lease's TTL). See the README's example.

use aspen_kv::api::{
    prefix_end, CompareOp, CompareTarget, EventKind, KeyValue, LeaseId, RangeRequest, Revision,
    Txn, TxnOp, WriteOutcome,
};
use futures::StreamExt;

use crate::lease::is_lease_gone;
use crate::protocol::{Consistency, WatchRequest};
use crate::{Client, ClientError, KeepAlive, WatchUpdate};

/// A lease kept alive while this value lives; revoked when [`LeaseSession::close`]d. Contenders
/// hold one each.
pub struct LeaseSession {
    client: Client,
    lease: LeaseId,
    ttl_secs: u64,
    lost: tokio::sync::watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LeaseSession {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LeaseSession {
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    pub fn ttl_secs(&self) -> u64 {
        self.ttl_secs
    }

    /// Resolves once the lease is known gone (expired or revoked): whatever the session held
    /// is lost then.
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        let _ = lost.wait_for(|l| *l).await;
    }

    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Ends the session: stops the keep-alives and revokes the lease (deleting its keys).
    pub async fn close(self) -> Result<(), ClientError> {
        self.task.abort();
        match self.client.lease_revoke(self.lease).await {
            Err(e) if is_lease_gone(&e) => Ok(()),
            other => other.map(|_| ()),
        }
    }
}

/// A held lock or leadership: the contender's key and its creation revision (the fencing
/// token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub key: Vec<u8>,
    pub token: Revision,
}

fn contender_key(name: &[u8], lease: LeaseId) -> Vec<u8> {
    let mut key = name.to_vec();
    key.push(b'/');
    key.extend(format!("{lease:016x}").as_bytes());
    key
}

fn contenders(name: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    let end = prefix_end(&prefix);
    (prefix, end)
}

impl Client {
    /// Grants a lease of `ttl_secs` and keeps it alive in the background.
    pub async fn session(&self, ttl_secs: u64) -> Result<LeaseSession, ClientError> {
        let lease = self.lease_grant(ttl_secs, 0).await?;
        let mut keep_alive: KeepAlive = self.lease_keep_alive(lease.id);
        let (tx, lost) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            while let Some(ack) = keep_alive.next().await {
                if let Err(e) = ack {
                    if is_lease_gone(&e) {
                        break;
                    }
                }
            }
            let _ = tx.send(true);
        });
        Ok(LeaseSession {
            client: self.clone(),
            lease: lease.id,
            ttl_secs: lease.ttl_secs,
            lost,
            task,
        })
    }

    /// Acquires lock `name`, waiting for earlier contenders; the token is the lock key's
    /// creation revision.
    pub async fn lock(&self, session: &LeaseSession, name: &[u8]) -> Result<Held, ClientError> {
        self.contend(session, name, Vec::new()).await
    }

    /// Campaigns in election `name` with `value`; resolves once this contender leads.
    pub async fn campaign(
        &self,
        session: &LeaseSession,
        name: &[u8],
        value: Vec<u8>,
    ) -> Result<Held, ClientError> {
        self.contend(session, name, value).await
    }

    /// Gives up a lock or leadership (deletes the contender's key; the session stays).
    pub async fn release(&self, held: &Held) -> Result<(), ClientError> {
        self.delete(held.key.clone()).await.map(|_| ())
    }

    /// The leader of election `name` (the contender with the lowest creation revision).
    pub async fn election_leader(&self, name: &[u8]) -> Result<Option<KeyValue>, ClientError> {
        Ok(self.contenders_of(name, 0).await?.0.into_iter().next())
    }

    /// Every contender of `name`, oldest first, and the revision read at.
    async fn contenders_of(
        &self,
        name: &[u8],
        revision: Revision,
    ) -> Result<(Vec<KeyValue>, Revision), ClientError> {
        let (start, end) = contenders(name);
        let mut request = RangeRequest {
            start,
            end: Some(end),
            limit: 0,
            revision,
        };
        let mut all = Vec::new();
        loop {
            let page = self
                .range(request.clone(), Consistency::Linearizable)
                .await?;
            request.revision = page.revision;
            all.extend(page.kvs);
            if !page.more {
                break;
            }
            request.start = all
                .last()
                .expect("more")
                .key
                .iter()
                .copied()
                .chain([0])
                .collect();
        }
        all.sort_by_key(|kv| kv.create_revision);
        Ok((all, request.revision))
    }

    async fn contend(
        &self,
        session: &LeaseSession,
        name: &[u8],
        value: Vec<u8>,
    ) -> Result<Held, ClientError> {
        let key = contender_key(name, session.lease);
        // Create the key if this session has none yet (a retry, or the same session
        // contending again, finds its own).
        let txn = Txn {
            compare: vec![aspen_kv::api::Compare {
                key: key.clone(),
                target: CompareTarget::CreateRevision(0),
                op: CompareOp::Equal,
            }],
            success: vec![TxnOp::PutWith {
                key: key.clone(),
                value,
                prev_kv: false,
                options: aspen_kv::api::PutOptions {
                    lease: session.lease,
                    ..Default::default()
                },
            }],
            failure: vec![],
        };
        let created = self.txn(txn).await?;
        let mine = if created.succeeded {
            match created.results.first() {
                Some(WriteOutcome::Put { revision, .. }) => *revision,
                other => return Err(ClientError::Protocol(format!("{other:?}"))),
            }
        } else {
            match self.get(key.clone()).await? {
                Some(kv) => kv.create_revision,
                None => return Err(session_lost(session)),
            }
        };
        loop {
            let (all, read_at) = self.contenders_of(name, 0).await?;
            if !all.iter().any(|kv| kv.key == key) {
                return Err(session_lost(session));
            }
            let Some(before) = all.iter().rev().find(|kv| kv.create_revision < mine) else {
                return Ok(Held { key, token: mine });
            };
            self.wait_deleted(&before.key, read_at + 1, session).await?;
        }
    }

    /// Waits until `key` is deleted at or after revision `from`.
    async fn wait_deleted(
        &self,
        key: &[u8],
        from: Revision,
        session: &LeaseSession,
    ) -> Result<(), ClientError> {
        let mut watch = self.watch(WatchRequest {
            start: key.to_vec(),
            end: None,
            from,
            after: None,
            prev_kv: false,
            progress_every_ms: 0,
        });
        loop {
            tokio::select! {
                update = watch.next() => match update {
                    Some(Ok(WatchUpdate::Events { events, .. })) => {
                        if events.iter().any(|e| e.kind == EventKind::Delete) {
                            return Ok(());
                        }
                    }
                    Some(Ok(WatchUpdate::Progress { .. })) => {}
                    Some(Err(e)) => return Err(ClientError::Io(format!("watching {}: {e}", key.escape_ascii()))),
                    None => return Err(ClientError::Io("watch ended".into())),
                },
                _ = session.lost() => return Err(session_lost(session)),
            }
        }
    }
}

fn session_lost(session: &LeaseSession) -> ClientError {
    ClientError::Apply(aspen_kv::api::ApplyError::LeaseNotFound { id: session.lease })
}
