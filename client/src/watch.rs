//! Watches: a `Stream` of what changed in a key range, resumed across disconnects and
//! member failures from exactly where it stopped.
//!
//! All watches a client has on one member share one QUIC stream (a
//! [`KvRequest::Watches`] stream): a [`WatchStream`] writes their create and cancel frames
//! and routes the node's frames to each watch by id. Each watch keeps a cursor (the next
//! revision, and within a revision split into fragments, the last key delivered) and, when
//! its stream or member fails, opens the watch again on a member from that cursor: the node
//! reads what changed from its history, so nothing is missed or repeated. A member that lags
//! behind the cursor simply waits until it has caught up.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use aspen_kv::api::{Event, Key, Revision};
use tokio::sync::mpsc;

use crate::protocol::{
    ClientRequest, ClientResponse, KvRequest, KvResponse, WatchCanceled, WatchControl,
    WatchMessage, WatchRequest, MAX_CLIENT_FRAME,
};
use crate::{Client, ClientError, ConnectError, NodeTicket};

/// Reset code a node uses for a watch stream whose reader stopped reading (see the node's
/// `WATCH_SEND_TIMEOUT`).
pub const WATCH_TOO_SLOW: u32 = 0x5157;
/// The node's shortest progress interval (it raises shorter ones to this).
const MIN_PROGRESS: Duration = Duration::from_millis(100);
/// Updates a watch holds for its reader before it stops taking frames from its stream.
const WATCH_BUFFER: usize = 16;
/// Frames a watch stream holds for one watch before it waits for that watch.
const ROUTE_BUFFER: usize = 16;
/// How long a watch stream waits for one watch to take a frame before cancelling that
/// watch as too slow (shorter than the node's 30 s, so the node never resets the stream of
/// the other watches because of one).
const WATCH_READER_TIMEOUT: Duration = Duration::from_secs(10);
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
    #[error("watch cancelled: this watcher did not read its events in time")]
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

/// How one attempt at a watch ended.
enum Ended {
    /// Final: tell the reader and stop.
    Final(WatchError),
    /// The reader is gone.
    ReaderGone,
    /// The stream or the member failed: open it again from the cursor.
    Retry(String),
}

/// Where a watch stream sends one watch's frames.
struct Route {
    frames: mpsc::Sender<WatchMessage>,
    /// Set when the stream gave up on this watch because it did not take its frames.
    too_slow: Arc<AtomicBool>,
}

/// The one watch stream of a client to one member.
pub(crate) struct WatchStream {
    control: mpsc::UnboundedSender<WatchControl>,
    routes: Arc<Mutex<HashMap<u64, Route>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    heard: Arc<Heard>,
}

/// When a stream last heard from its node. A stream waiting for one of its watches to take
/// a frame reads nothing meanwhile; that silence is not the node's.
#[derive(Default)]
struct Heard {
    at: Mutex<Option<Instant>>,
    busy: AtomicBool,
}

impl Heard {
    /// Whether the node may be gone: nothing heard for `silence`, and not because the
    /// stream was busy with a slow watch.
    fn silent_for(&self, silence: Duration) -> bool {
        !self.busy.load(Ordering::Relaxed)
            && self
                .at
                .lock()
                .expect("lock")
                .is_none_or(|at| at.elapsed() >= silence)
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl WatchStream {
    fn is_open(&self) -> bool {
        !self.control.is_closed() && self.tasks.iter().all(|t| !t.is_finished())
    }

    /// Ends the stream: every watch on it retries elsewhere.
    fn kill(&self) {
        for t in &self.tasks {
            t.abort();
        }
        self.routes.lock().expect("lock").clear();
    }
}

/// Unregisters a watch from its stream (and cancels it on the node) when dropped.
struct Registration {
    stream: Arc<WatchStream>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self
            .stream
            .routes
            .lock()
            .expect("lock")
            .remove(&self.id)
            .is_some()
        {
            let _ = self
                .stream
                .control
                .send(WatchControl::Cancel { id: self.id });
        }
    }
}

/// Opens a watch stream on `conn` and starts its writer and router.
async fn open_watch_stream(conn: &iroh::endpoint::Connection) -> Result<WatchStream, String> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| format!("open stream: {e}"))?;
    crate::wire::write_frame(
        &mut send,
        &ClientRequest::Kv(KvRequest::Watches),
        MAX_CLIENT_FRAME,
    )
    .await
    .map_err(|e| e.to_string())?;
    let (control, mut controls) = mpsc::unbounded_channel::<WatchControl>();
    let routes: Arc<Mutex<HashMap<u64, Route>>> = Default::default();
    let writer = tokio::spawn(async move {
        while let Some(c) = controls.recv().await {
            if crate::wire::write_frame(&mut send, &c, MAX_CLIENT_FRAME)
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = send.finish();
    });
    let table = routes.clone();
    let cancel = control.clone();
    let heard = Arc::new(Heard::default());
    let noted = heard.clone();
    let router = tokio::spawn(async move {
        let fail_all = |message: Option<WatchMessage>, too_slow: bool| {
            for (_, route) in table.lock().expect("lock").drain() {
                route.too_slow.store(too_slow, Ordering::Relaxed);
                if let Some(m) = &message {
                    let _ = route.frames.try_send(m.clone());
                }
            }
        };
        loop {
            let frame =
                crate::wire::read_frame::<ClientResponse>(&mut recv, MAX_CLIENT_FRAME).await;
            *noted.at.lock().expect("lock") = Some(Instant::now());
            let (id, message) = match frame {
                Ok(ClientResponse::Kv(KvResponse::Watched { id, message })) => (id, message),
                // The stream itself was refused (no permission to watch anything).
                Ok(ClientResponse::Error(e)) => {
                    return fail_all(Some(WatchMessage::Refused(e)), false)
                }
                Ok(_) => return fail_all(None, false),
                Err(crate::wire::FrameError::Reset(code)) if code == u64::from(WATCH_TOO_SLOW) => {
                    return fail_all(None, true)
                }
                Err(_) => return fail_all(None, false),
            };
            let route = table
                .lock()
                .expect("lock")
                .get(&id)
                .map(|r| (r.frames.clone(), r.too_slow.clone()));
            let Some((frames, too_slow)) = route else {
                continue; // Cancelled meanwhile.
            };
            noted.busy.store(true, Ordering::Relaxed);
            let delivered = tokio::time::timeout(WATCH_READER_TIMEOUT, frames.send(message)).await;
            *noted.at.lock().expect("lock") = Some(Instant::now());
            noted.busy.store(false, Ordering::Relaxed);
            match delivered {
                Ok(_) => {}
                Err(_) => {
                    // This watch's reader stalls the others: it alone is cancelled.
                    too_slow.store(true, Ordering::Relaxed);
                    table.lock().expect("lock").remove(&id);
                    let _ = cancel.send(WatchControl::Cancel { id });
                }
            }
        }
    });
    Ok(WatchStream {
        control,
        routes,
        tasks: vec![writer, router],
        heard,
    })
}

impl Client {
    /// Watches a key range (see [`WatchRequest`]; `from` 0 starts at the next revision).
    /// Events come in revision order with no gap and no duplicate, across disconnects and
    /// member failures; a watch that can no longer be continued exactly (its next revision
    /// was compacted, it did not read its events in time, access was refused) ends with an
    /// error.
    pub fn watch(&self, request: WatchRequest) -> Watch {
        let (tx, updates) = mpsc::channel(WATCH_BUFFER);
        let client = self.clone();
        let task = tokio::spawn(async move {
            let error = client.run_watch(request, &tx).await;
            let _ = tx.send(Err(error)).await;
        });
        Watch { updates, task }
    }

    /// The watch stream to `target`, opened if there is none (or it failed).
    async fn watch_stream(&self, target: &NodeTicket) -> Result<Arc<WatchStream>, Ended> {
        if let Some(s) = self
            .inner
            .watch_streams
            .lock()
            .expect("lock")
            .get(&target.endpoint_id)
        {
            if s.is_open() {
                return Ok(s.clone());
            }
        }
        let conn = match self.connection(target).await {
            Ok(c) => c,
            Err(ConnectError::Refused(e)) => return Err(Ended::Final(ClientError::Rpc(e).into())),
            Err(ConnectError::Transport(e)) => return Err(Ended::Retry(e)),
        };
        let stream = match open_watch_stream(&conn).await {
            Ok(s) => Arc::new(s),
            Err(e) => {
                self.forget(target);
                return Err(Ended::Retry(e));
            }
        };
        let mut streams = self.inner.watch_streams.lock().expect("lock");
        // Another watch may have opened one meanwhile: share it.
        if let Some(s) = streams.get(&target.endpoint_id).filter(|s| s.is_open()) {
            return Ok(s.clone());
        }
        streams.insert(target.endpoint_id, stream.clone());
        Ok(stream)
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
        let show_progress = request.progress_every_ms > 0;
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
                progress_every_ms: if show_progress {
                    request.progress_every_ms
                } else {
                    LIVENESS_PROGRESS.as_millis() as u64
                },
                ..request.clone()
            };
            let mut delivered = false;
            let ended = match self.watch_stream(&target).await {
                Ok(stream) => {
                    self.watch_once(
                        &target,
                        stream,
                        attempt,
                        show_progress,
                        &mut cursor,
                        tx,
                        &mut delivered,
                    )
                    .await
                }
                Err(e) => e,
            };
            match ended {
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

    /// One watch on one member's watch stream, until it ends.
    #[allow(clippy::too_many_arguments)]
    async fn watch_once(
        &self,
        target: &NodeTicket,
        stream: Arc<WatchStream>,
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
        let id = self.inner.next_watch_id.fetch_add(1, Ordering::Relaxed);
        let (frames_tx, mut frames) = mpsc::channel(ROUTE_BUFFER);
        let too_slow = Arc::new(AtomicBool::new(false));
        stream.routes.lock().expect("lock").insert(
            id,
            Route {
                frames: frames_tx,
                too_slow: too_slow.clone(),
            },
        );
        let registration = Registration {
            stream: stream.clone(),
            id,
        };
        if stream
            .control
            .send(WatchControl::Create { id, request })
            .is_err()
        {
            return Ended::Retry("the watch stream closed".into());
        }
        loop {
            let message = match tokio::time::timeout(silence, frames.recv()).await {
                Ok(Some(m)) => m,
                Ok(None) if too_slow.load(Ordering::Relaxed) => {
                    return Ended::Final(WatchError::TooSlow)
                }
                Ok(None) => return Ended::Retry("the watch stream failed".into()),
                // The stream hears from the node for other watches (or is busy): alive.
                Err(_) if !stream.heard.silent_for(silence) => continue,
                Err(_) => {
                    // Probably a dead member: drop the stream (its other watches move too)
                    // and the connection.
                    drop(registration);
                    stream.kill();
                    self.forget(target);
                    return Ended::Retry(format!("no word from the node for {silence:?}"));
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
                WatchMessage::Refused(e) if e.is_retryable() => return Ended::Retry(e.to_string()),
                WatchMessage::Refused(e) => return Ended::Final(ClientError::Rpc(e).into()),
            };
            *delivered = true;
            if tx.send(Ok(update)).await.is_err() {
                return Ended::ReaderGone;
            }
        }
    }
}
