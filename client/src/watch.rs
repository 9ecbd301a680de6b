//! Watches: a `Stream` of what changed in a key range, resumed across disconnects and
//! member failures from exactly where it stopped.
//!
//! Each watch is one QUIC stream on the client's connection to a member. The SDK keeps a
//! cursor (the next revision, and within a revision split into fragments, the last key
//! delivered) and, when the stream or the member fails, opens the watch again on a member
//! from that cursor: the node reads what changed from its history, so nothing is missed or
//! repeated. A member that lags behind the cursor simply waits until it has caught up.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use aspen_kv::api::{Event, Key, Revision};
use tokio::sync::mpsc;

use crate::protocol::{
    ClientRequest, ClientResponse, KvRequest, KvResponse, WatchCanceled, WatchMessage,
    WatchRequest, MAX_CLIENT_FRAME,
};
use crate::{Client, ClientError, ConnectError};

/// Reset code a node uses for a watch whose watcher stopped reading (see the node's
/// `WATCH_SEND_TIMEOUT`).
pub const WATCH_TOO_SLOW: u32 = 0x5157;
/// The node's shortest progress interval (it raises shorter ones to this).
const MIN_PROGRESS: Duration = Duration::from_millis(100);
/// Updates a watch holds for its reader before it stops reading from the node.
const WATCH_BUFFER: usize = 16;
/// Longest wait between attempts to reopen a watch.
const MAX_REOPEN_BACKOFF: Duration = Duration::from_secs(2);
/// Progress interval the SDK asks for when the caller asked for none: a node that sends
/// nothing for this long plus the attempt timeout is taken for dead and the watch moves
/// (a killed member's connection may otherwise look open until QUIC's idle timeout).
const LIVENESS_PROGRESS: Duration = Duration::from_secs(2);

/// One update of a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchUpdate {
    /// Events in revision order, each revision's events together (a revision too large for
    /// one frame comes in parts, `fragment` set on all but the last). `revision`: the
    /// serving node's revision when read.
    Events {
        events: Vec<Event>,
        revision: Revision,
        fragment: bool,
    },
    /// Nothing changed in the range up to `revision` (when progress was asked for).
    Progress { revision: Revision },
}

/// Why a watch ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("watch cancelled: {0}")]
    Canceled(#[from] WatchCanceled),
    #[error("watch cancelled by the node: this watcher did not read its events in time")]
    TooSlow,
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// A running watch: a `Stream` of updates that ends after an error. Dropping it ends the
/// watch on the node.
pub struct Watch {
    updates: mpsc::Receiver<Result<WatchUpdate, WatchError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl futures::Stream for Watch {
    type Item = Result<WatchUpdate, WatchError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.updates.poll_recv(cx)
    }
}

/// Where a watch resumes.
#[derive(Clone, Debug)]
struct Cursor {
    from: Revision,
    after: Option<Key>,
}

impl Cursor {
    /// Moves past `events` (the last of them is the last delivered).
    fn past(&mut self, events: &[Event], fragment: bool) {
        if let Some(last) = events.last() {
            if fragment {
                self.from = last.kv.mod_revision;
                self.after = Some(last.kv.key.clone());
            } else {
                self.from = last.kv.mod_revision.saturating_add(1);
                self.after = None;
            }
        }
    }
}

/// How one attempt at a watch stream ended.
enum Ended {
    /// Final: tell the reader and stop.
    Final(WatchError),
    /// The reader is gone.
    ReaderGone,
    /// The stream or the member failed: open it again from the cursor.
    Retry(String),
}

impl Client {
    /// Watches a key range (see [`WatchRequest`]; `from` 0 starts at the next revision).
    /// Events come in revision order with no gap and no duplicate, across disconnects and
    /// member failures; a watch that can no longer be continued exactly (its next revision
    /// was compacted, the node cancelled a watcher that did not read, access was refused)
    /// ends with an error.
    pub fn watch(&self, request: WatchRequest) -> Watch {
        let (tx, updates) = mpsc::channel(WATCH_BUFFER);
        let client = self.clone();
        let task = tokio::spawn(async move {
            let error = client.run_watch(request, &tx).await;
            let _ = tx.send(Err(error)).await;
        });
        Watch { updates, task }
    }

    async fn run_watch(
        &self,
        request: WatchRequest,
        tx: &mpsc::Sender<Result<WatchUpdate, WatchError>>,
    ) -> WatchError {
        let mut cursor = Cursor {
            from: request.from,
            after: request.after.clone(),
        };
        let mut failing_since: Option<Instant> = None;
        let mut backoff = Duration::from_millis(50);
        let mut exclude: Vec<[u8; 32]> = Vec::new();
        loop {
            let Some(target) = self.pick_target(&exclude).or_else(|| {
                exclude.clear();
                self.pick_target(&[])
            }) else {
                return WatchError::Client(ClientError::Unavailable {
                    attempts: 0,
                    elapsed: Duration::ZERO,
                    last: "the client knows no member".into(),
                });
            };
            let attempt = WatchRequest {
                from: cursor.from,
                after: cursor.after.clone(),
                progress_every_ms: if request.progress_every_ms == 0 {
                    LIVENESS_PROGRESS.as_millis() as u64
                } else {
                    request.progress_every_ms
                },
                ..request.clone()
            };
            let show_progress = request.progress_every_ms > 0;
            let mut delivered = false;
            match self
                .watch_once(
                    &target,
                    attempt,
                    show_progress,
                    &mut cursor,
                    tx,
                    &mut delivered,
                )
                .await
            {
                Ended::Final(e) => return e,
                Ended::ReaderGone => {
                    return WatchError::Client(ClientError::Io("reader gone".into()))
                }
                Ended::Retry(why) => {
                    tracing::debug!(member = %hex::encode(&target.endpoint_id[..8]), "watch reopens: {why}");
                    if delivered {
                        failing_since = None;
                        backoff = Duration::from_millis(50);
                    }
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.inner.options.deadline {
                        return WatchError::Client(ClientError::Unavailable {
                            attempts: 0,
                            elapsed: since.elapsed(),
                            last: why,
                        });
                    }
                    self.mark_down(&target);
                    self.rotate_past(&target);
                    exclude.push(target.endpoint_id);
                    if exclude.len() >= self.members().len() {
                        exclude.clear();
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_REOPEN_BACKOFF);
                }
            }
        }
    }

    /// One watch stream on one member, until it ends.
    async fn watch_once(
        &self,
        target: &crate::NodeTicket,
        request: WatchRequest,
        show_progress: bool,
        cursor: &mut Cursor,
        tx: &mpsc::Sender<Result<WatchUpdate, WatchError>>,
        delivered: &mut bool,
    ) -> Ended {
        // The node sends something at least every progress interval: silence longer than
        // that and an attempt timeout means it is gone.
        let silence = Duration::from_millis(request.progress_every_ms).max(MIN_PROGRESS)
            + self.inner.options.attempt_timeout;
        let conn = match self.connection(target).await {
            Ok(c) => c,
            Err(ConnectError::Refused(e)) => return Ended::Final(ClientError::Rpc(e).into()),
            Err(ConnectError::Transport(e)) => return Ended::Retry(e),
        };
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                self.forget(target);
                return Ended::Retry(format!("open stream: {e}"));
            }
        };
        let opening = ClientRequest::Kv(KvRequest::Watch(request));
        if let Err(e) = crate::wire::write_frame(&mut send, &opening, MAX_CLIENT_FRAME).await {
            self.forget(target);
            return Ended::Retry(e.to_string());
        }
        loop {
            let read = crate::wire::read_frame::<ClientResponse>(&mut recv, MAX_CLIENT_FRAME);
            let frame = match tokio::time::timeout(silence, read).await {
                Ok(frame) => frame,
                Err(_) => {
                    self.forget(target);
                    return Ended::Retry(format!("no word from the node for {silence:?}"));
                }
            };
            let message = match frame {
                Ok(ClientResponse::Kv(KvResponse::Watch(m))) => m,
                Ok(ClientResponse::Error(e)) if e.is_retryable() => {
                    return Ended::Retry(e.to_string())
                }
                Ok(ClientResponse::Error(e)) => return Ended::Final(ClientError::Rpc(e).into()),
                Ok(other) => {
                    return Ended::Final(ClientError::Protocol(format!("{other:?}")).into())
                }
                Err(crate::wire::FrameError::Reset(code)) if code == u64::from(WATCH_TOO_SLOW) => {
                    return Ended::Final(WatchError::TooSlow)
                }
                Err(e) => {
                    self.forget(target);
                    return Ended::Retry(e.to_string());
                }
            };
            let update = match message {
                WatchMessage::Created { from, .. } => {
                    if cursor.from == 0 {
                        cursor.from = from;
                    }
                    continue;
                }
                WatchMessage::Events {
                    events,
                    revision,
                    fragment,
                } => {
                    cursor.past(&events, fragment);
                    WatchUpdate::Events {
                        events,
                        revision,
                        fragment,
                    }
                }
                WatchMessage::Progress { revision } => {
                    if cursor.after.is_none() {
                        cursor.from = cursor.from.max(revision.saturating_add(1));
                    }
                    if !show_progress {
                        continue;
                    }
                    WatchUpdate::Progress { revision }
                }
                WatchMessage::Canceled(reason) => return Ended::Final(reason.into()),
            };
            *delivered = true;
            if tx.send(Ok(update)).await.is_err() {
                return Ended::ReaderGone;
            }
        }
    }
}
