//! The key-value service: writes go through Raft (batched by the proposer, or forwarded to
//! the leader); reads are served from this node's state machine, after a read barrier unless
//! the caller asked for a serializable read. Watches stream what changed from this node's
//! state machine ([`serve_watch`]).

use std::time::Duration;

use aspen_client::protocol::{
    ClientResponse, Consistency, KvRequest, KvResponse, RpcError, WatchCanceled, WatchMessage,
    WatchRequest, MAX_CLIENT_FRAME, MAX_PROGRESS_EVERY_MS,
};
use aspen_kv::api::{ChangesRequest, ReadError};
use iroh::endpoint::{RecvStream, SendStream, VarInt};

use super::auth::Access;
use super::ClusterHandle;

pub struct KvService {
    cluster: ClusterHandle,
}

impl KvService {
    pub fn new(cluster: ClusterHandle) -> Self {
        KvService { cluster }
    }

    /// Serves one key-value request (access already checked, except for what a lease
    /// revocation deletes, which is checked here).
    pub async fn handle(
        &self,
        request: KvRequest,
        access: &Access<'_>,
    ) -> Result<KvResponse, RpcError> {
        match request {
            KvRequest::Write { mut commands } => {
                super::leases::assign_lease_ids(&mut commands);
                ClusterHandle::validate(&commands, true)?;
                super::leases::check_revokes(&self.cluster, &commands, access).await?;
                let results = self.cluster.propose(commands).await?;
                Ok(KvResponse::Write { results })
            }
            KvRequest::Lease(request) => Ok(KvResponse::Lease(
                super::leases::handle(&self.cluster, request, access).await?,
            )),
            KvRequest::Range {
                request,
                consistency,
            } => {
                request.validate()?;
                if consistency == Consistency::Linearizable {
                    self.cluster.read_barrier().await?;
                }
                Ok(KvResponse::Range(self.cluster.sm.range(request).await?))
            }
            KvRequest::Watch(_) => Err(RpcError::BadRequest(
                "a watch is served on its own stream".into(),
            )),
        }
    }
}

/// How long a watcher may leave a frame unread before its watch is cancelled as too slow
/// (the stream is reset with [`WATCH_TOO_SLOW`]). Nothing is buffered for it meanwhile: the
/// history is the buffer, and the watch resumes from it.
pub const WATCH_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Stream reset code of a watch cancelled because its watcher did not read.
pub const WATCH_TOO_SLOW: u32 = 0x5157;
/// Shortest progress interval a watch may ask for (shorter ones are raised to it).
pub const MIN_PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Serves one watch on its stream (access already checked) until the watcher closes it, the
/// watch is cancelled, or the watcher stops reading.
pub async fn serve_watch(
    cluster: &ClusterHandle,
    request: WatchRequest,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    if let Err(e) = serve_watch_frames(cluster, request, &mut send, &mut recv).await {
        match e {
            WatchEnd::TooSlow => {
                tracing::debug!("watch cancelled: the watcher stopped reading");
                let _ = send.reset(VarInt::from_u32(WATCH_TOO_SLOW));
                return;
            }
            WatchEnd::Gone(why) => tracing::debug!("watch ended: {why}"),
        }
    }
    let _ = send.finish();
}

enum WatchEnd {
    TooSlow,
    Gone(String),
}

async fn send_frame(send: &mut SendStream, response: &ClientResponse) -> Result<(), WatchEnd> {
    match tokio::time::timeout(
        WATCH_SEND_TIMEOUT,
        aspen_client::wire::write_frame(send, response, MAX_CLIENT_FRAME),
    )
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(WatchEnd::Gone(e.to_string())),
        Err(_) => Err(WatchEnd::TooSlow),
    }
}

async fn send_message(send: &mut SendStream, message: WatchMessage) -> Result<(), WatchEnd> {
    send_frame(send, &ClientResponse::Kv(KvResponse::Watch(message))).await
}

async fn serve_watch_frames(
    cluster: &ClusterHandle,
    request: WatchRequest,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), WatchEnd> {
    let mut changes = ChangesRequest {
        start: request.start,
        end: request.end,
        from: request.from,
        after: request.after,
        prev_kv: request.prev_kv,
    };
    if let Err(e) = changes.validate() {
        return send_frame(send, &ClientResponse::Error(e.into())).await;
    }
    if request.progress_every_ms > MAX_PROGRESS_EVERY_MS {
        let e = RpcError::BadRequest(format!(
            "progress every {} ms: the longest interval is {MAX_PROGRESS_EVERY_MS} ms (a day)",
            request.progress_every_ms
        ));
        return send_frame(send, &ClientResponse::Error(e)).await;
    }
    let mut revisions = cluster.sm.watch_revision();
    let current = match cluster.sm.status().await {
        Ok(status) => status.revision,
        Err(e) => return send_frame(send, &ClientResponse::Error(e.into())).await,
    };
    if changes.from == 0 {
        changes.from = current + 1;
        changes.after = None;
    } else if cluster.test_fault == Some(crate::config::TestFault::WatchSkipOnResume)
        && changes.after.is_none()
    {
        changes.from += 1;
    }
    send_message(
        send,
        WatchMessage::Created {
            from: changes.from,
            revision: current,
        },
    )
    .await?;
    let progress = (request.progress_every_ms > 0)
        .then(|| Duration::from_millis(request.progress_every_ms).max(MIN_PROGRESS_EVERY));
    let mut last_sent = tokio::time::Instant::now();
    // The watcher sends nothing after its request: its side ending means it left.
    let left = async {
        let mut buf = [0u8; 64];
        while let Ok(Some(_)) = recv.read(&mut buf).await {}
    };
    tokio::pin!(left);
    loop {
        let page = match cluster.sm.changes(changes.clone()).await {
            Ok(page) => page,
            Err(ReadError::Compacted {
                requested,
                compacted,
            }) => {
                let reason = WatchCanceled::Compacted {
                    requested,
                    compacted,
                };
                return send_message(send, WatchMessage::Canceled(reason)).await;
            }
            Err(e) => {
                let reason = WatchCanceled::Storage(e.to_string());
                return send_message(send, WatchMessage::Canceled(reason)).await;
            }
        };
        let caught_up = page.next_after.is_none() && page.next_from > page.revision;
        if !page.events.is_empty() {
            send_message(
                send,
                WatchMessage::Events {
                    events: page.events,
                    revision: page.revision,
                    fragment: page.next_after.is_some(),
                },
            )
            .await?;
            last_sent = tokio::time::Instant::now();
        }
        changes.from = page.next_from;
        changes.after = page.next_after;
        if !caught_up {
            continue;
        }
        let seen = page.revision;
        let progress_at = progress.map(|p| last_sent + p);
        tokio::select! {
            moved = async { revisions.wait_for(|r| *r > seen).await.map(|_| ()) } => {
                if moved.is_err() {
                    return Err(WatchEnd::Gone("the store closed".into()));
                }
            }
            _ = &mut left => return Err(WatchEnd::Gone("the watcher left".into())),
            _ = tokio::time::sleep_until(progress_at.unwrap_or_else(tokio::time::Instant::now)),
                if progress_at.is_some() => {
                send_message(send, WatchMessage::Progress { revision: seen }).await?;
                last_sent = tokio::time::Instant::now();
            }
        }
    }
}
