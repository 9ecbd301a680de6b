//! Misbehaving blob providers, for the negative controls of the blob tests only (hidden flags
//! `--unsafe-test-fault corrupt-blob-sends` and `stall-blob-sends`).
//!
//! They answer iroh-blobs get requests for single blobs like the real provider, except that
//! one byte in the middle of every response is flipped (a fetcher that did not verify would
//! store corrupt data), or only the first half of every response is sent and the stream is
//! then held open (a server that stalls mid-transfer). Real nodes never run them.

use iroh::endpoint::Connection;
use iroh::protocol::{AcceptError, ProtocolHandler};
use iroh_blobs::protocol::GetRequest;

/// Largest request accepted (requests are small: a hash and chunk ranges).
const MAX_REQUEST: usize = 64 * 1024;
/// `RequestType::Get` on the wire.
const GET: u8 = 0;

/// How a [`FaultyProvider`] misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Corrupt,
    Stall,
}

#[derive(Debug, Clone)]
pub struct FaultyProvider {
    pub store: iroh_blobs::api::Store,
    pub fault: Fault,
}

impl ProtocolHandler for FaultyProvider {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let store = self.store.clone();
            let fault = self.fault;
            tokio::spawn(async move {
                let Ok(request) = recv.read_to_end(MAX_REQUEST).await else {
                    return;
                };
                let Some((&GET, body)) = request.split_first() else {
                    return;
                };
                let Ok(request) = postcard::from_bytes::<GetRequest>(body) else {
                    return;
                };
                let Some(ranges) = request.ranges.iter_infinite().next() else {
                    return;
                };
                let Ok(mut encoded) = store
                    .export_bao(request.hash, ranges.clone())
                    .bao_to_vec()
                    .await
                else {
                    return;
                };
                match fault {
                    Fault::Corrupt => {
                        // Past the 8-byte size header: a parent hash or leaf byte, either is
                        // caught.
                        if encoded.len() > 8 {
                            let at = 8 + (encoded.len() - 8) / 2;
                            encoded[at] ^= 0x5a;
                        }
                        tracing::warn!(hash = %request.hash, "test fault: sending a corrupted blob");
                        let _ = send.write_all(&encoded).await;
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    }
                    Fault::Stall => {
                        tracing::warn!(hash = %request.hash, "test fault: sending half a blob, then stalling");
                        let _ = send.write_all(&encoded[..encoded.len() / 2]).await;
                        // Held open, sending nothing, until the peer gives up or this node
                        // is killed.
                        let _ = send.stopped().await;
                    }
                }
            });
        }
        Ok(())
    }
}
