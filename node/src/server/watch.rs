//! Watch streams: every watch of a client connection on one QUIC stream.
//!
//! The client creates and cancels watches with [`WatchControl`] frames; each watch runs as
//! its own task that reads what changed from the state machine's history
//! (`StateMachineStore::changes`) and queues its frames; one writer sends them, tagged with
//! the watch's id. Nothing is buffered beyond a small queue: when a watch's frames cannot be
//! sent, its task waits, and the history is the buffer. A reader that leaves the stream
//! unread for [`WATCH_SEND_TIMEOUT`] has it reset with [`WATCH_TOO_SLOW`], which cancels its
//! watches with that reason rather than skipping anything.
//!
//! Watch streams and watches (the etcd API's too) run on a thread of their own
//! ([`spawn_watch_task`]). The node keeps one async worker fewer than the cores, so that a
//! lone write's hand-offs stay on one thread; on that worker, fanning each change out to a
//! thousand watchers competed with the writes that make the changes (about 90,000 events/s
//! on two cores, against 240,000 with a second worker and 275,000-464,000 with this thread).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aspen_client::protocol::{
    ClientRequest, ClientResponse, KvRequest, KvResponse, RpcError, WatchCanceled, WatchControl,
    WatchMessage, WatchRequest, MAX_CLIENT_FRAME, MAX_PROGRESS_EVERY_MS,
    MAX_WATCHES_PER_CONNECTION,
};
use aspen_kv::api::{ChangesRequest, ReadError};
use iroh::endpoint::{RecvStream, SendStream, VarInt};
use tokio::sync::mpsc;
pub(super) use tokio_util::task::AbortOnDropHandle;

use super::{auth, ClusterHandle, NodeState};

/// How long a watch stream's reader may leave a frame unread before the stream is reset
/// with [`WATCH_TOO_SLOW`].
pub const WATCH_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Stream reset code of a watch stream whose reader did not read.
pub const WATCH_TOO_SLOW: u32 = 0x5157;
/// Shortest progress interval a watch may ask for (shorter ones are raised to it).
pub const MIN_PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// Frames queued for the writer, from all watches of a stream.
const WATCH_QUEUE: usize = 64;

/// The watch thread's runtime (single-threaded, started on first use, one per process);
/// `None` if the thread could not be started (watches then run on the caller's runtime).
fn watch_runtime() -> Option<&'static tokio::runtime::Handle> {
    static RUNTIME: std::sync::OnceLock<Option<tokio::runtime::Handle>> =
        std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| tracing::warn!("watches share the async workers: {e}"))
                .ok()?;
            let handle = runtime.handle().clone();
            std::thread::Builder::new()
                .name("aspen-watches".into())
                .spawn(move || runtime.block_on(std::future::pending::<()>()))
                .map_err(|e| tracing::warn!("watches share the async workers: {e}"))
                .ok()?;
            Some(handle)
        })
        .as_ref()
}

/// Runs `task` on the watch thread. The caller keeps the handle and aborts the task when it
/// is done with it (so nothing outlives the runtime that serves the connection): hold it in
/// an [`AbortOnDropHandle`].
pub(super) fn spawn_watch_task<F>(task: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    match watch_runtime() {
        Some(runtime) => runtime.spawn(task),
        None => tokio::spawn(task),
    }
}

/// Serves one watch stream (its opening already authorized) until the client closes it,
/// or it is reset as too slow. `open` counts the watches of the connection.
pub async fn serve_watches(
    state: Arc<NodeState>,
    caller: Arc<auth::Caller>,
    open: Arc<AtomicUsize>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let (out, mut queued) = mpsc::channel::<(u64, WatchMessage)>(WATCH_QUEUE);
    // Control frames are read by their own task: a frame read cancelled halfway by the
    // select below would lose its first bytes.
    let (controls_tx, mut controls) = mpsc::channel::<WatchControl>(16);
    let reader = tokio::spawn(async move {
        while let Ok(c) =
            aspen_client::wire::read_frame::<WatchControl>(&mut recv, MAX_CLIENT_FRAME).await
        {
            if controls_tx.send(c).await.is_err() {
                return;
            }
        }
    });
    let mut running: HashMap<u64, Running> = HashMap::new();
    let ended = loop {
        tokio::select! {
            control = controls.recv() => {
                let Some(control) = control else {
                    break Ok(()); // The client closed its side (or sent garbage).
                };
                match control {
                    WatchControl::Create { id, request } => {
                        let refusal = if running.contains_key(&id) {
                            Some(RpcError::BadRequest(format!("watch id {id} is in use on this stream")))
                        } else {
                            admit(&state, &caller, &open, &request).await.err()
                        };
                        if let Some(e) = refusal {
                            if let Err(e) = send_frame(&mut send, id, WatchMessage::Refused(e)).await {
                                break Err(e);
                            }
                            continue;
                        }
                        open.fetch_add(1, Ordering::Relaxed);
                        state.cluster.metrics.watches.inc();
                        let task = tokio::spawn(run_watch(state.cluster.clone(), id, request, out.clone()));
                        let metrics = state.cluster.metrics.clone();
                        running.insert(id, Running { task, open: open.clone(), metrics });
                    }
                    WatchControl::Cancel { id } => {
                        running.remove(&id);
                    }
                }
            }
            Some((id, message)) = queued.recv() => {
                let last = matches!(message, WatchMessage::Canceled(_) | WatchMessage::Refused(_));
                // A frame of a watch cancelled meanwhile is dropped.
                if !running.contains_key(&id) {
                    continue;
                }
                if let Err(e) = send_frame(&mut send, id, message).await {
                    break Err(e);
                }
                if last {
                    running.remove(&id);
                }
            }
        }
    };
    reader.abort();
    drop(running);
    match ended {
        Err(Gone::TooSlow) => {
            tracing::debug!("watch stream reset: its reader stopped reading");
            let _ = send.reset(VarInt::from_u32(WATCH_TOO_SLOW));
        }
        Err(Gone::Closed(why)) => tracing::debug!("watch stream ended: {why}"),
        Ok(()) => {
            let _ = send.finish();
        }
    }
}

/// A running watch: its task stops, and its count goes, when this is dropped.
struct Running {
    task: tokio::task::JoinHandle<()>,
    open: Arc<AtomicUsize>,
    metrics: Arc<super::metrics::NodeMetrics>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.metrics.watches.dec();
    }
}

/// Whether a watch may start: the connection has room, the request is sane, the caller
/// may read the range.
pub(super) async fn admit(
    state: &NodeState,
    caller: &auth::Caller,
    open: &AtomicUsize,
    request: &WatchRequest,
) -> Result<(), RpcError> {
    if open.load(Ordering::Relaxed) >= MAX_WATCHES_PER_CONNECTION {
        return Err(RpcError::TooManyWatches {
            max: MAX_WATCHES_PER_CONNECTION,
        });
    }
    if request.progress_every_ms > MAX_PROGRESS_EVERY_MS {
        return Err(RpcError::BadRequest(format!(
            "progress every {} ms: the longest interval is {MAX_PROGRESS_EVERY_MS} ms (a day)",
            request.progress_every_ms
        )));
    }
    changes_of(request).validate()?;
    // Authorized like a read of its range.
    let as_read = ClientRequest::Kv(KvRequest::Watch(request.clone()));
    state.authorize(&as_read, caller).await
}

fn changes_of(request: &WatchRequest) -> ChangesRequest {
    ChangesRequest {
        start: request.start.clone(),
        end: request.end.clone(),
        from: request.from,
        after: request.after.clone(),
        prev_kv: request.prev_kv,
    }
}

enum Gone {
    TooSlow,
    Closed(String),
}

async fn send_frame(send: &mut SendStream, id: u64, message: WatchMessage) -> Result<(), Gone> {
    let frame = ClientResponse::Kv(KvResponse::Watched { id, message });
    match tokio::time::timeout(
        WATCH_SEND_TIMEOUT,
        aspen_client::wire::write_frame(send, &frame, MAX_CLIENT_FRAME),
    )
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Gone::Closed(e.to_string())),
        Err(_) => Err(Gone::TooSlow),
    }
}

/// One watch: queues `Created`, then pages of events as the store moves (and progress when
/// asked), until cancelled (its task aborted) or it cannot go on.
pub(super) async fn run_watch(
    cluster: ClusterHandle,
    id: u64,
    request: WatchRequest,
    out: mpsc::Sender<(u64, WatchMessage)>,
) {
    let send = |message: WatchMessage| {
        let out = out.clone();
        async move { out.send((id, message)).await.is_ok() }
    };
    let mut changes = changes_of(&request);
    let mut revisions = cluster.sm.watch_revision();
    let current = match cluster.sm.status().await {
        Ok(status) => status.revision,
        Err(e) => {
            send(WatchMessage::Canceled(WatchCanceled::Storage(
                e.to_string(),
            )))
            .await;
            return;
        }
    };
    if changes.from == 0 {
        changes.from = current + 1;
        changes.after = None;
    } else if cluster.test_fault == Some(crate::config::TestFault::WatchSkipOnResume)
        && changes.after.is_none()
    {
        changes.from += 1;
    }
    let created = WatchMessage::Created {
        from: changes.from,
        revision: current,
    };
    if !send(created).await {
        return;
    }
    let progress = (request.progress_every_ms > 0)
        .then(|| Duration::from_millis(request.progress_every_ms).max(MIN_PROGRESS_EVERY));
    let mut last_sent = tokio::time::Instant::now();
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
                send(WatchMessage::Canceled(reason)).await;
                return;
            }
            Err(e) => {
                send(WatchMessage::Canceled(WatchCanceled::Storage(
                    e.to_string(),
                )))
                .await;
                return;
            }
        };
        let caught_up = page.next_after.is_none() && page.next_from > page.revision;
        if !page.events.is_empty() {
            let events = WatchMessage::Events {
                events: page.events,
                revision: page.revision,
                fragment: page.next_after.is_some(),
            };
            if !send(events).await {
                return;
            }
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
                    return; // The store closed: the node is stopping.
                }
            }
            _ = tokio::time::sleep_until(progress_at.unwrap_or_else(tokio::time::Instant::now)),
                if progress_at.is_some() => {
                if !send(WatchMessage::Progress { revision: seen }).await {
                    return;
                }
                last_sent = tokio::time::Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watch_tasks_run_on_their_own_thread_and_stop_with_their_guard() {
        let held = Arc::new(());
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let guard = {
            let held = held.clone();
            AbortOnDropHandle::new(spawn_watch_task(async move {
                let thread = std::thread::current().name().map(str::to_owned);
                let _ = started_tx.send(thread);
                let _held = held;
                std::future::pending::<()>().await
            }))
        };
        let thread = started.await.expect("the task ran");
        assert_eq!(thread.as_deref(), Some("aspen-watches"));
        assert_eq!(Arc::strong_count(&held), 2, "the task holds its clone");
        drop(guard);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while Arc::strong_count(&held) > 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the task outlived its guard"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
