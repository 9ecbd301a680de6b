//! etcd's Watch service: one gRPC stream carries any number of watches.
//!
//! Each watch runs as the Aspen protocol's watches do (`server/watch.rs`: a task that reads
//! the store's history and waits for the revision to move); this module turns etcd's create,
//! cancel and progress requests into those tasks and their messages into etcd's responses.
//! The same bounds hold: [`MAX_WATCHES_PER_CONNECTION`] watches per stream, and a client that
//! leaves its responses unread for [`WATCH_SEND_TIMEOUT`] loses the stream (its watches end;
//! nothing is skipped).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use aspen_client::protocol::{
    WatchCanceled, WatchMessage, WatchRequest as StoreWatch, MAX_WATCHES_PER_CONNECTION,
};
use aspen_etcd_api::pb::etcdserverpb::watch_request::RequestUnion;
use aspen_etcd_api::pb::etcdserverpb::{watch_server::Watch, WatchRequest, WatchResponse};
use aspen_etcd_api::revision::to_etcd;
use aspen_etcd_api::watch::{to_pb_event, WatchPlan};
use aspen_etcd_api::EtcdError;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::super::auth::Caller;
use super::super::watch::{admit, run_watch, WATCH_SEND_TIMEOUT};
use super::super::NodeState;
use super::{from_rpc, EtcdApi};

/// The responses of one watch stream.
type WatchAnswers = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send + 'static>>;

/// Messages queued from all watches of a stream, and responses queued for the client.
const QUEUE: usize = 64;

/// etcd's id for a response that belongs to no watch (a progress answer to the stream).
const NO_WATCH: i64 = -1;

#[tonic::async_trait]
impl Watch for EtcdApi {
    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<WatchAnswers>, Status> {
        let node = self.node()?;
        let caller = match self.caller(&node, request.metadata()) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                node.cluster.metrics.etcd_refused.inc();
                return Err(e.status());
            }
        };
        let (answers, rx) = mpsc::channel(QUEUE);
        tokio::spawn(serve(node, caller, request.into_inner(), answers));
        Ok(Response::new(Box::pin(
            tokio_stream_of(rx).map(Ok::<WatchResponse, Status>),
        )))
    }
}

/// The receiver as a stream.
fn tokio_stream_of(mut rx: mpsc::Receiver<WatchResponse>) -> impl Stream<Item = WatchResponse> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// One running watch of the stream.
struct Running {
    plan: WatchPlan,
    task: tokio::task::JoinHandle<()>,
    /// Events of a revision that came in fragments, held until its last fragment (for a
    /// client that did not ask for fragments).
    held: Vec<aspen_etcd_api::pb::mvccpb::Event>,
    metrics: Arc<super::super::metrics::NodeMetrics>,
    open: Arc<AtomicUsize>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.metrics.watches.dec();
    }
}

/// Serves one watch stream until the client closes it or stops reading.
async fn serve(
    node: Arc<NodeState>,
    caller: Arc<Caller>,
    mut requests: Streaming<WatchRequest>,
    answers: mpsc::Sender<WatchResponse>,
) {
    let (out, mut queued) = mpsc::channel::<(u64, WatchMessage)>(QUEUE);
    let open = Arc::new(AtomicUsize::new(0));
    let mut running: HashMap<i64, Running> = HashMap::new();
    let mut next_id: i64 = 0;
    loop {
        let answer = tokio::select! {
            request = requests.next() => {
                let Some(Ok(request)) = request else {
                    return; // The client closed the stream (or broke it).
                };
                match request.request_union {
                    Some(RequestUnion::CreateRequest(create)) => {
                        let id = if create.watch_id != 0 {
                            create.watch_id
                        } else {
                            while running.contains_key(&next_id) {
                                next_id += 1;
                            }
                            next_id
                        };
                        match start(&node, &caller, &open, &create, id, &running, &out).await {
                            Ok(watch) => {
                                running.insert(id, watch);
                                continue; // Its task sends `created`.
                            }
                            Err(e) => Some(WatchResponse {
                                header: Some(node.etcd_header(node.applied_revision()).await),
                                watch_id: id,
                                created: true,
                                canceled: true,
                                cancel_reason: e.to_string(),
                                ..Default::default()
                            }),
                        }
                    }
                    Some(RequestUnion::CancelRequest(cancel)) => {
                        running.remove(&cancel.watch_id).map(|_| WatchResponse {
                            watch_id: cancel.watch_id,
                            canceled: true,
                            ..Default::default()
                        })
                    }
                    Some(RequestUnion::ProgressRequest(_)) => Some(WatchResponse {
                        header: Some(node.etcd_header(node.applied_revision()).await),
                        watch_id: NO_WATCH,
                        ..Default::default()
                    }),
                    None => None,
                }
            }
            Some((id, message)) = queued.recv() => {
                let id = id as i64;
                let Some(watch) = running.get_mut(&id) else {
                    continue; // Cancelled meanwhile.
                };
                let (answer, ended) = respond(&node, id, watch, message).await;
                if ended {
                    running.remove(&id);
                }
                answer
            }
        };
        if let Some(answer) = answer {
            match tokio::time::timeout(WATCH_SEND_TIMEOUT, answers.send(answer)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return, // The client went away.
                Err(_) => {
                    tracing::debug!("etcd watch stream ended: its reader stopped reading");
                    return;
                }
            }
        }
    }
}

/// Starts watch `id`, if the caller may read its range and the stream has room.
async fn start(
    node: &Arc<NodeState>,
    caller: &Caller,
    open: &Arc<AtomicUsize>,
    create: &aspen_etcd_api::pb::etcdserverpb::WatchCreateRequest,
    id: i64,
    running: &HashMap<i64, Running>,
    out: &mpsc::Sender<(u64, WatchMessage)>,
) -> Result<Running, EtcdError> {
    if running.contains_key(&id) || id < 0 {
        return Err(EtcdError::InvalidArgument(format!(
            "watch id {id} is in use on this stream"
        )));
    }
    let plan = WatchPlan::new(create)?;
    let request = StoreWatch {
        start: plan.start.clone(),
        end: plan.end.clone(),
        from: plan.from,
        after: None,
        prev_kv: plan.prev_kv,
        progress_every_ms: plan.progress_every_ms,
    };
    if open.load(Ordering::Relaxed) >= MAX_WATCHES_PER_CONNECTION {
        return Err(EtcdError::ResourceExhausted(format!(
            "this stream already has {MAX_WATCHES_PER_CONNECTION} watches; open another"
        )));
    }
    admit(node, caller, open, &request)
        .await
        .map_err(from_rpc)?;
    open.fetch_add(1, Ordering::Relaxed);
    node.cluster.metrics.watches.inc();
    let task = super::super::watch::spawn_watch_task(run_watch(
        node.cluster.clone(),
        id as u64,
        request,
        out.clone(),
    ));
    Ok(Running {
        plan,
        task,
        held: Vec::new(),
        metrics: node.cluster.metrics.clone(),
        open: open.clone(),
    })
}

/// etcd's response to one message of watch `id` (none while a revision's fragments are
/// held), and whether the watch ended.
async fn respond(
    node: &NodeState,
    id: i64,
    watch: &mut Running,
    message: WatchMessage,
) -> (Option<WatchResponse>, bool) {
    let header = |revision| async move { Some(node.etcd_header(revision).await) };
    match message {
        WatchMessage::Created { revision, .. } => (
            Some(WatchResponse {
                header: header(revision).await,
                watch_id: id,
                created: true,
                ..Default::default()
            }),
            false,
        ),
        WatchMessage::Events {
            events,
            revision,
            fragment,
        } => {
            // etcd's header carries the revision of the last event.
            let last = events.last().map_or(revision, |e| e.kv.mod_revision);
            let mut events: Vec<_> = events
                .into_iter()
                .filter(|e| watch.plan.wants(e))
                .map(to_pb_event)
                .collect();
            if fragment && !watch.plan.fragment {
                watch.held.append(&mut events);
                return (None, false);
            }
            if !watch.held.is_empty() {
                let mut all = std::mem::take(&mut watch.held);
                all.append(&mut events);
                events = all;
            }
            if events.is_empty() {
                return (None, false);
            }
            (
                Some(WatchResponse {
                    header: header(last).await,
                    watch_id: id,
                    fragment: fragment && watch.plan.fragment,
                    events,
                    ..Default::default()
                }),
                false,
            )
        }
        WatchMessage::Progress { revision } => (
            Some(WatchResponse {
                header: header(revision).await,
                watch_id: id,
                ..Default::default()
            }),
            false,
        ),
        WatchMessage::Canceled(why) => {
            let (compact_revision, reason) = match why {
                // etcd says why with the compaction revision alone (no reason text).
                WatchCanceled::Compacted { compacted, .. } => (to_etcd(compacted), String::new()),
                other => (0, other.to_string()),
            };
            (
                Some(WatchResponse {
                    header: header(node.applied_revision()).await,
                    watch_id: id,
                    canceled: true,
                    compact_revision,
                    cancel_reason: reason,
                    ..Default::default()
                }),
                true,
            )
        }
        WatchMessage::Refused(e) => (
            Some(WatchResponse {
                header: header(node.applied_revision()).await,
                watch_id: id,
                created: true,
                canceled: true,
                cancel_reason: from_rpc(e).to_string(),
                ..Default::default()
            }),
            true,
        ),
    }
}
