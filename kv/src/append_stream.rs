//! How AppendEntries requests to one member go out: a commit does not hold back the next
//! entries.
//!
//! openraft 0.10 hands each member's replication to the network as a stream of
//! AppendEntries requests (`RaftNetworkV2::stream_append`) and expects the answers in the
//! same order. Its default sends one request and waits for the answer before the next. When
//! the leader's commit index moves and no new entries wait, openraft sends an entry-less
//! request to carry the commit to the member. With a lone client that is every write: the
//! entry is committed, the client is answered, and its next write, arriving a moment later,
//! waited for the member's answer to the commit before its entries could go out.
//!
//! [`stream_append_overlapping`] sends a request while every request in flight carries no
//! entries, so the next entries go out at once; a request carrying entries is still the
//! only one in flight until answered (as before), so the member never sees entries out of
//! order. Reordering an entry-less request with the entries after it is harmless: both name
//! the same previous log id, a member never truncates its log for an entry-less request,
//! and commit indexes only move forward. Answers are yielded in request order; the stream
//! ends after an error, a conflict, a higher vote, or an answer covering only part of its
//! request (requests still in flight are dropped, as openraft resends from what was
//! acknowledged).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt};
use openraft::error::RPCError;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, StreamAppendResult};

use crate::raft_types::{LogId, TypeConfig};

/// Most requests in flight to one member at once (all but the newest without entries).
pub const MAX_APPENDS_IN_FLIGHT: usize = 8;

/// The answer to one request, as openraft's stream takes it.
pub type AppendAnswer = Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>;

/// A request sent, until its answer.
type Sent = Pin<Box<dyn Future<Output = Done> + Send + 'static>>;

/// A request's range `(prev, last]` and whether it carried entries, with its answer.
struct Done {
    carried_entries: bool,
    prev: Option<LogId>,
    last: Option<LogId>,
    answer: Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>>,
}

/// The answers to `input`'s requests, each sent with `send` (see the module docs).
pub fn stream_append_overlapping<S, F, Fut>(
    input: S,
    send: F,
) -> impl Stream<Item = AppendAnswer> + Send + 'static
where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    F: FnMut(AppendEntriesRequest<TypeConfig>) -> Fut + Send + Unpin + 'static,
    Fut: Future<Output = Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>>>
        + Send
        + 'static,
{
    Overlapping {
        input: Some(input),
        send,
        in_flight: FuturesOrdered::new(),
        entries_in_flight: 0,
        ended: false,
    }
}

struct Overlapping<S, F> {
    /// `None` once it has ended.
    input: Option<S>,
    send: F,
    in_flight: FuturesOrdered<Sent>,
    /// How many requests in flight carry entries (0 or 1).
    entries_in_flight: usize,
    ended: bool,
}

impl<S, F, Fut> Stream for Overlapping<S, F>
where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    F: FnMut(AppendEntriesRequest<TypeConfig>) -> Fut + Send + Unpin + 'static,
    Fut: Future<Output = Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>>>
        + Send
        + 'static,
{
    type Item = AppendAnswer;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<AppendAnswer>> {
        // Every field is Unpin (the futures are boxed).
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        // Send what may go now: nothing behind a request with entries.
        while this.entries_in_flight == 0 && this.in_flight.len() < MAX_APPENDS_IN_FLIGHT {
            let Some(input) = this.input.as_mut() else {
                break;
            };
            match input.poll_next_unpin(cx) {
                Poll::Ready(Some(request)) => {
                    let carried_entries = !request.entries.is_empty();
                    let prev = request.prev_log_id;
                    let last = request.entries.last().map(|e| e.log_id).or(prev);
                    if carried_entries {
                        this.entries_in_flight += 1;
                    }
                    let answer = (this.send)(request);
                    this.in_flight.push_back(Box::pin(async move {
                        Done {
                            carried_entries,
                            prev,
                            last,
                            answer: answer.await,
                        }
                    }));
                }
                Poll::Ready(None) => this.input = None,
                Poll::Pending => break,
            }
        }
        debug_assert!(this.entries_in_flight <= 1);
        // The oldest request's answer.
        match this.in_flight.poll_next_unpin(cx) {
            Poll::Ready(Some(done)) => {
                if done.carried_entries {
                    this.entries_in_flight -= 1;
                }
                let (item, go_on) = match done.answer {
                    Ok(response) => {
                        // An answer for part of the request stops the stream, as openraft's
                        // own sequential stream does: openraft sends the rest next.
                        let whole = match &response {
                            AppendEntriesResponse::PartialSuccess(upto) => *upto == done.last,
                            _ => true,
                        };
                        let result = response.into_stream_result(done.prev, done.last);
                        let go_on = whole && result.is_ok();
                        (Ok(result), go_on)
                    }
                    Err(e) => (Err(e), false),
                };
                if !go_on {
                    this.ended = true;
                    this.input = None;
                    this.in_flight = FuturesOrdered::new();
                }
                Poll::Ready(Some(item))
            }
            // Nothing in flight: done once the input is.
            Poll::Ready(None) if this.input.is_none() => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use openraft::raft::StreamAppendError;
    use openraft::EntryPayload;
    use proptest::prelude::*;
    use tokio::sync::oneshot;

    use super::*;
    use crate::raft_types::{log_id, Entry, Vote};

    type Reply = Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>>;

    /// What the fake network saw: each request sent (prev index, entry count) with the
    /// sender of its answer, in the order sent.
    #[derive(Default)]
    struct Wire {
        sent: VecDeque<(u64, usize, Option<oneshot::Sender<Reply>>)>,
    }

    fn request(prev: u64, entries: usize) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: Some(log_id(1, 1, prev)),
            leader_commit: Some(log_id(1, 1, prev)),
            entries: (1..=entries as u64)
                .map(|i| Entry {
                    log_id: log_id(1, 1, prev + i),
                    payload: EntryPayload::Blank,
                })
                .collect(),
        }
    }

    /// The stream over `requests` (fed through a channel the test controls) and the wire.
    fn overlapping(
        wire: &Arc<Mutex<Wire>>,
    ) -> (
        futures::channel::mpsc::UnboundedSender<AppendEntriesRequest<TypeConfig>>,
        impl Stream<Item = AppendAnswer> + Unpin,
    ) {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let wire = wire.clone();
        let answers =
            stream_append_overlapping(rx, move |req: AppendEntriesRequest<TypeConfig>| {
                let (reply, answer) = oneshot::channel();
                wire.lock().unwrap().sent.push_back((
                    req.prev_log_id.unwrap().index,
                    req.entries.len(),
                    Some(reply),
                ));
                async move { answer.await.expect("answered") }
            });
        (tx, Box::pin(answers))
    }

    fn now<T>(f: impl Future<Output = T>) -> Option<T> {
        futures::FutureExt::now_or_never(f)
    }

    fn answer(wire: &Arc<Mutex<Wire>>, nth: usize, reply: Reply) {
        let sender = wire.lock().unwrap().sent[nth]
            .2
            .take()
            .expect("not answered yet");
        sender.send(reply).ok();
    }

    fn sent(wire: &Arc<Mutex<Wire>>) -> Vec<(u64, usize)> {
        let wire = wire.lock().unwrap();
        wire.sent.iter().map(|(p, n, _)| (*p, *n)).collect()
    }

    #[test]
    fn entries_go_out_while_a_commit_is_in_flight() {
        let wire = Arc::default();
        let (input, mut answers) = overlapping(&wire);
        input.unbounded_send(request(5, 0)).unwrap();
        assert!(now(answers.next()).is_none());
        assert_eq!(sent(&wire), vec![(5, 0)]);
        input.unbounded_send(request(5, 1)).unwrap();
        assert!(now(answers.next()).is_none());
        assert_eq!(sent(&wire), vec![(5, 0), (5, 1)], "sent without waiting");
        // Answered out of order, yielded in order.
        answer(&wire, 1, Ok(AppendEntriesResponse::Success));
        assert!(now(answers.next()).is_none());
        answer(&wire, 0, Ok(AppendEntriesResponse::Success));
        let first = now(answers.next()).unwrap().unwrap().unwrap();
        assert_eq!(first, Ok(Some(log_id(1, 1, 5))));
        let second = now(answers.next()).unwrap().unwrap().unwrap();
        assert_eq!(second, Ok(Some(log_id(1, 1, 6))));
    }

    #[test]
    fn nothing_goes_out_behind_entries() {
        let wire = Arc::default();
        let (input, mut answers) = overlapping(&wire);
        input.unbounded_send(request(5, 2)).unwrap();
        input.unbounded_send(request(7, 0)).unwrap();
        input.unbounded_send(request(7, 1)).unwrap();
        assert!(now(answers.next()).is_none());
        assert_eq!(sent(&wire), vec![(5, 2)]);
        answer(&wire, 0, Ok(AppendEntriesResponse::Success));
        assert_eq!(
            now(answers.next()).unwrap().unwrap().unwrap(),
            Ok(Some(log_id(1, 1, 7)))
        );
        assert!(now(answers.next()).is_none());
        assert_eq!(sent(&wire), vec![(5, 2), (7, 0), (7, 1)]);
    }

    #[test]
    fn a_conflict_ends_the_stream_and_drops_what_is_in_flight() {
        let wire = Arc::default();
        let (input, mut answers) = overlapping(&wire);
        input.unbounded_send(request(5, 0)).unwrap();
        input.unbounded_send(request(5, 1)).unwrap();
        assert!(now(answers.next()).is_none());
        answer(&wire, 0, Ok(AppendEntriesResponse::Conflict));
        let first = now(answers.next()).unwrap().unwrap().unwrap();
        assert!(matches!(first, Err(StreamAppendError::Conflict(c)) if c == log_id(1, 1, 5)));
        assert!(now(answers.next()).unwrap().is_none(), "ended");
        assert!(
            input.unbounded_send(request(6, 1)).is_err(),
            "input dropped"
        );
        assert!(now(answers.next()).unwrap().is_none(), "stays ended");
        assert_eq!(sent(&wire).len(), 2);
    }

    #[test]
    fn a_partial_answer_ends_the_stream() {
        let wire = Arc::default();
        let (input, mut answers) = overlapping(&wire);
        input.unbounded_send(request(5, 3)).unwrap();
        assert!(now(answers.next()).is_none());
        answer(
            &wire,
            0,
            Ok(AppendEntriesResponse::PartialSuccess(Some(log_id(1, 1, 6)))),
        );
        assert_eq!(
            now(answers.next()).unwrap().unwrap().unwrap(),
            Ok(Some(log_id(1, 1, 6)))
        );
        assert!(now(answers.next()).unwrap().is_none());
    }

    #[test]
    fn the_stream_ends_when_its_input_does_and_all_is_answered() {
        let wire = Arc::default();
        let (input, mut answers) = overlapping(&wire);
        input.unbounded_send(request(5, 0)).unwrap();
        drop(input);
        assert!(now(answers.next()).is_none());
        answer(&wire, 0, Ok(AppendEntriesResponse::Success));
        assert!(now(answers.next()).unwrap().unwrap().is_ok());
        assert!(now(answers.next()).unwrap().is_none());
    }

    proptest! {
        /// Whatever the requests and the order answers come in: answers are yielded in
        /// request order, one per request; a request goes out only when every request in
        /// flight carries no entries, and never more than the bound.
        #[test]
        fn answers_keep_request_order_and_entries_go_out_alone(
            entries in proptest::collection::vec(prop_oneof![Just(0usize), 1usize..4], 1..40),
            picks in proptest::collection::vec(any::<prop::sample::Index>(), 40),
        ) {
            let wire = Arc::default();
            let (input, mut answers) = overlapping(&wire);
            let mut prev = 0;
            for &n in &entries {
                input.unbounded_send(request(prev, n)).unwrap();
                prev += n as u64;
            }
            drop(input);
            let mut yielded = Vec::new();
            let mut picks = picks.into_iter().cycle();
            loop {
                match now(answers.next()) {
                    Some(None) => break,
                    Some(Some(answer)) => yielded.push(answer.unwrap().unwrap()),
                    None => {
                        // Check what is in flight, then answer one of them.
                        let open: Vec<usize> = {
                            let wire = wire.lock().unwrap();
                            wire.sent.iter().enumerate()
                                .filter(|(_, s)| s.2.is_some())
                                .map(|(i, _)| i)
                                .collect()
                        };
                        prop_assert!(!open.is_empty(), "waiting with nothing in flight");
                        prop_assert!(open.len() <= MAX_APPENDS_IN_FLIGHT);
                        let sent = sent(&wire);
                        for &i in &open[..open.len() - 1] {
                            prop_assert_eq!(sent[i].1, 0, "a request went out behind entries");
                        }
                        let i = open[picks.next().unwrap().index(open.len())];
                        answer(&wire, i, Ok(AppendEntriesResponse::Success));
                    }
                }
            }
            let expected: Vec<_> = {
                let mut prev = 0;
                entries.iter().map(|&n| { prev += n as u64; Some(log_id(1, 1, prev)) }).collect()
            };
            prop_assert_eq!(yielded, expected);
            prop_assert_eq!(sent(&wire).len(), entries.len());
        }
    }
}
