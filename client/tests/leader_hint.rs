//! A member that does not lead answers "not the leader", naming the leader when it knows one.
//! A hint that names the member that answered is no hint: a restarted leader that has not
//! won an election yet once named itself, and a client that followed such hints asked the same
//! member until its deadline. The client must ask another member instead.
//!
//! Two stand-in members on real iroh endpoints (127.0.0.1, no relay, no lookup) speak the
//! client protocol: `confused` answers every request with a hint naming itself; `leader`
//! points the client at `confused` until `confused` has been asked once (so the client meets
//! the self-naming hint whichever member it dials first), then answers.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aspen_client::endpoint::offline_endpoint;
use aspen_client::protocol::{CLIENT_ALPN, MAX_CLIENT_FRAME};
use aspen_client::wire::{read_frame, write_frame};
use aspen_client::{
    Client, ClientOptions, ClientRequest, ClientResponse, ClusterTicket, KvRequest, KvResponse,
    NodeTicket, RpcError,
};
use aspen_kv::api::RangeResponse;
use iroh::Endpoint;

/// A stand-in member: answers every request on every connection with `answer(request)`.
async fn member(
    answer: impl Fn(ClientRequest) -> ClientResponse + Send + Sync + 'static,
) -> (Endpoint, NodeTicket) {
    let endpoint = offline_endpoint(
        "127.0.0.1:0".parse().expect("an address"),
        None,
        vec![CLIENT_ALPN.to_vec()],
    )
    .await
    .expect("an endpoint on 127.0.0.1");
    let ticket = NodeTicket {
        endpoint_id: *endpoint.id().as_bytes(),
        addrs: endpoint.bound_sockets(),
    };
    let answer = Arc::new(answer);
    let server = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let Ok(request) =
                        read_frame::<ClientRequest>(&mut recv, MAX_CLIENT_FRAME).await
                    else {
                        return;
                    };
                    let response = answer(request);
                    if write_frame(&mut send, &response, MAX_CLIENT_FRAME)
                        .await
                        .is_err()
                        || send.finish().is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (endpoint, ticket)
}

fn is_range(request: &ClientRequest) -> bool {
    matches!(request, ClientRequest::Kv(KvRequest::Range { .. }))
}

#[tokio::test]
async fn a_hint_naming_the_member_that_answered_sends_the_client_elsewhere() {
    // The confused member's own ticket is known only once its endpoint is bound: it answers
    // with the ticket the test stores here.
    let confused_ticket: Arc<std::sync::OnceLock<NodeTicket>> = Arc::default();
    let confused_asked = Arc::new(AtomicU32::new(0));
    let (confused_ep, confused) = member({
        let own = confused_ticket.clone();
        let asked = confused_asked.clone();
        move |request| {
            assert!(is_range(&request), "unexpected request {request:?}");
            asked.fetch_add(1, Ordering::SeqCst);
            ClientResponse::Error(RpcError::NotLeader {
                leader: own.get().cloned(),
            })
        }
    })
    .await;
    confused_ticket.set(confused.clone()).expect("set once");

    let leader_answered = Arc::new(AtomicU32::new(0));
    let (leader_ep, leader) = member({
        let confused = confused.clone();
        let asked = confused_asked.clone();
        let answered = leader_answered.clone();
        move |request| {
            assert!(is_range(&request), "unexpected request {request:?}");
            if asked.load(Ordering::SeqCst) == 0 {
                return ClientResponse::Error(RpcError::NotLeader {
                    leader: Some(confused.clone()),
                });
            }
            answered.fetch_add(1, Ordering::SeqCst);
            ClientResponse::Kv(KvResponse::Range(RangeResponse {
                kvs: Vec::new(),
                more: false,
                revision: 7,
            }))
        }
    })
    .await;

    let options = ClientOptions {
        // Generous: on a loaded machine the dials alone may take a while. A client that
        // followed the self-naming hint would spend all of it asking `confused`.
        deadline: Duration::from_secs(30),
        // No second copy of the request to the other member while the first is slow (a
        // loaded machine): the counts below are of the failover alone.
        hedge_after: Duration::from_secs(30),
        ..ClientOptions::default()
    };
    let client = Client::connect_with(
        ClusterTicket {
            members: vec![confused.clone(), leader.clone()],
        },
        options,
    )
    .await
    .expect("a client");
    let got = client.get(b"key".to_vec()).await;
    assert!(
        matches!(got, Ok(None)),
        "the client should have asked the other member: {got:?}"
    );
    assert_eq!(leader_answered.load(Ordering::SeqCst), 1);
    // Asked once, then never again for this request (a client that trusted its hint would
    // have asked it again and again, with backoff, until the deadline).
    assert_eq!(confused_asked.load(Ordering::SeqCst), 1);

    client.close().await;
    confused_ep.close().await;
    leader_ep.close().await;
}
