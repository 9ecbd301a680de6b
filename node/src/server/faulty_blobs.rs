//! Misbehaving blob providers, for the negative controls of the blob tests only (hidden flags
//! `--unsafe-test-fault corrupt-blob-sends` and `stall-blob-sends`).
//!
//! They answer iroh-blobs get requests for single blobs like the real provider, except that
//! one byte in the middle of every response is flipped (a fetcher that did not verify would
//! store corrupt data), or only the first half of every response is sent and the stream is
//! then held open (a server that stalls mid-transfer). Real nodes never run them.

use futures::StreamExt;
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
                tracing::warn!(hash = %request.hash, ?fault, "test fault: answering a blob request");
                // Streamed as the store exports it, like the real provider: a fetcher sees
                // its first bytes at once, however large the blob (buffering 256 MiB first
                // took longer than the fetcher's stall timeout on a loaded machine).
                let stream = store
                    .export_bao(request.hash, ranges.clone())
                    .into_byte_stream();
                tokio::pin!(stream);
                // The stream starts with the blob's 8-byte size; the fault lands at the byte
                // about halfway through the encoding (a parent hash or leaf byte: either is
                // caught by a verifying fetcher).
                let mut at: Option<u64> = None;
                let mut sent = 0u64;
                while let Some(Ok(mut chunk)) = stream.next().await {
                    if sent == 0 && chunk.len() >= 8 {
                        let size = u64::from_le_bytes(chunk[..8].try_into().expect("8 bytes"));
                        at = (size > 0).then_some(8 + size / 2);
                    }
                    let len = chunk.len() as u64;
                    if let Some(at) = at.filter(|at| (sent..sent + len).contains(at)) {
                        let i = (at - sent) as usize;
                        match fault {
                            Fault::Corrupt => {
                                let mut bytes = bytes::BytesMut::from(&chunk[..]);
                                bytes[i] ^= 0x5a;
                                chunk = bytes.freeze();
                            }
                            Fault::Stall => {
                                let _ = send.write_all(&chunk[..i]).await;
                                // Held open, sending nothing, until the peer gives up or
                                // this node is killed.
                                let _ = send.stopped().await;
                                return;
                            }
                        }
                    }
                    if send.write_chunk(chunk).await.is_err() {
                        return;
                    }
                    sent += len;
                }
                let _ = send.finish();
                let _ = send.stopped().await;
            });
        }
        Ok(())
    }
}
