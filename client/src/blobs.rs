//! Blobs through the SDK: upload to a node, read what the cluster knows, and download with
//! verified streaming.
//!
//! An upload is one `BlobAdd` frame followed by the raw bytes on the same stream; the client
//! hashes what it sends and checks the node stored the same BLAKE3 hash. A download speaks
//! iroh-blobs' own protocol to a member that holds the blob, so every chunk is checked against
//! the hash (BLAKE3 verified streaming) before it is written.

use std::path::{Path, PathBuf};

use aspen_blobs::limits::MAX_BLOB_BYTES;
use aspen_blobs::{hash_hex, BlobError, BlobHash, TagName};
use futures::StreamExt;
use iroh_blobs::get::request::GetBlobItem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::protocol::{
    BlobInfo, BlobRequest, BlobResponse, BlobStoreStats, BlobTagSummary, ClientRequest,
    ClientResponse, Consistency, MAX_CLIENT_FRAME,
};
use crate::{addr_of, wire, Client, ClientError, NodeTicket};

/// Bytes read from the file per write to the stream.
const UPLOAD_CHUNK: usize = 1 << 20;
/// Bytes of a download buffered before a write to the file.
const DOWNLOAD_BUFFER: usize = 1 << 20;

/// A stored blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobAdded {
    pub hash: BlobHash,
    pub size: u64,
    /// What the tag named before, if it named something.
    pub previous: Option<BlobHash>,
    /// The node that stored it.
    pub node: NodeTicket,
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> ClientError {
    ClientError::Io(format!("{what} {}: {e}", path.display()))
}

impl Client {
    /// Uploads the file at `path` to one member, which stores it and (with `tag`) references
    /// it through Raft. `progress` is called with the bytes sent so far.
    pub async fn blob_add_file(
        &self,
        path: &Path,
        tag: Option<&str>,
        progress: impl Fn(u64),
    ) -> Result<BlobAdded, ClientError> {
        if let Some(tag) = tag {
            TagName::new(tag)?;
        }
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| io_error("cannot open", path, e))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| io_error("cannot read", path, e))?
            .len();
        if size > MAX_BLOB_BYTES {
            return Err(BlobError::TooLarge {
                size,
                max: MAX_BLOB_BYTES,
            }
            .into());
        }
        let request = ClientRequest::Blob(BlobRequest::Add {
            size,
            tag: tag.map(str::to_string),
        });
        // The connection: the first member that answers.
        let (target, conn) = self.any_connection().await?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| ClientError::Io(format!("open stream: {e}")))?;
        let sent = async {
            wire::write_frame(&mut send, &request, MAX_CLIENT_FRAME)
                .await
                .map_err(|e| e.to_string())?;
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; UPLOAD_CHUNK];
            let mut done = 0u64;
            while done < size {
                let want = (size - done).min(UPLOAD_CHUNK as u64) as usize;
                let n = file
                    .read(&mut buf[..want])
                    .await
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                if n == 0 {
                    return Err(format!(
                        "{} shrank while it was being sent ({done} of {size} bytes)",
                        path.display()
                    ));
                }
                hasher.update(&buf[..n]);
                send.write_all(&buf[..n])
                    .await
                    .map_err(|e| format!("send: {e}"))?;
                done += n as u64;
                progress(done);
            }
            send.finish().map_err(|e| format!("finish: {e}"))?;
            Ok::<_, String>(*hasher.finalize().as_bytes())
        }
        .await;
        // The node may have refused early (bad tag, too large): its answer says why.
        let response = wire::read_frame::<ClientResponse>(&mut recv, MAX_CLIENT_FRAME).await;
        match (sent, response) {
            (_, Ok(ClientResponse::Error(e))) => Err(ClientError::Rpc(e)),
            (Err(e), _) => Err(ClientError::Io(format!("upload failed: {e}"))),
            (
                Ok(sent),
                Ok(ClientResponse::Blob(BlobResponse::Added {
                    hash,
                    size: stored,
                    previous,
                })),
            ) => {
                if hash != sent || stored != size {
                    return Err(BlobError::HashMismatch {
                        stored: hash_hex(&hash),
                        sent: hash_hex(&sent),
                    }
                    .into());
                }
                Ok(BlobAdded {
                    hash,
                    size,
                    previous,
                    node: target,
                })
            }
            (Ok(_), Ok(other)) => Err(ClientError::Protocol(format!("{other:?}"))),
            (Ok(_), Err(e)) => Err(ClientError::Io(format!("no answer to the upload: {e}"))),
        }
    }

    /// What the cluster knows of a blob.
    pub async fn blob_stat(
        &self,
        hash: BlobHash,
        consistency: Consistency,
    ) -> Result<BlobInfo, ClientError> {
        match self
            .request(&ClientRequest::Blob(BlobRequest::Stat {
                hash,
                consistency,
            }))
            .await?
        {
            ClientResponse::Blob(BlobResponse::Info(info)) => Ok(info),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Up to `limit` tags in name order after `start_after`; `true` if more follow.
    pub async fn blob_list(
        &self,
        start_after: Option<String>,
        limit: u32,
        consistency: Consistency,
    ) -> Result<(Vec<BlobTagSummary>, bool), ClientError> {
        let request = ClientRequest::Blob(BlobRequest::List {
            start_after,
            limit,
            consistency,
        });
        match self.request(&request).await? {
            ClientResponse::Blob(BlobResponse::List { tags, more }) => Ok((tags, more)),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Points `tag` at a blob some member holds; returns what it named before.
    pub async fn blob_tag(
        &self,
        tag: &str,
        hash: BlobHash,
    ) -> Result<Option<BlobHash>, ClientError> {
        TagName::new(tag)?;
        let request = ClientRequest::Blob(BlobRequest::Tag {
            tag: tag.to_string(),
            hash,
        });
        match self.request(&request).await? {
            ClientResponse::Blob(BlobResponse::Tagged { previous }) => Ok(previous),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Removes a tag. The blob it named is garbage-collected after the grace period unless
    /// another tag names it.
    pub async fn blob_untag(&self, tag: &str) -> Result<(), ClientError> {
        TagName::new(tag)?;
        let request = ClientRequest::Blob(BlobRequest::Untag {
            tag: tag.to_string(),
        });
        match self.request(&request).await? {
            ClientResponse::Blob(BlobResponse::Done) => Ok(()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// The blob store of the member that answers (use a client of one node to pick it).
    pub async fn blob_stats(&self) -> Result<BlobStoreStats, ClientError> {
        match self
            .request(&ClientRequest::Blob(BlobRequest::Stats))
            .await?
        {
            ClientResponse::Blob(BlobResponse::Stats(stats)) => Ok(stats),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Downloads a blob into `out` (written as `out.part`, renamed once complete and
    /// verified). Holders are tried in turn; a holder that sends bytes not matching the hash
    /// is abandoned. `progress` gets (bytes written, total). Returns the size.
    pub async fn blob_get_to_file(
        &self,
        hash: BlobHash,
        out: &Path,
        progress: impl Fn(u64, u64),
    ) -> Result<u64, ClientError> {
        let info = self.blob_stat(hash, Consistency::Linearizable).await?;
        if info.holders.is_empty() {
            return Err(BlobError::NotFound(hash_hex(&hash)).into());
        }
        let total = info.size.unwrap_or(0);
        if !info
            .holders
            .iter()
            .all(|h| self.members().iter().any(|m| m.node_id() == *h))
        {
            // A client of one node learns the others' addresses from the membership.
            let _ = self.refresh_members().await;
        }
        let members = self.members();
        let part = part_path(out);
        let mut failures = Vec::new();
        for holder in &info.holders {
            let Some(ticket) = members.iter().find(|m| m.node_id() == *holder) else {
                failures.push(format!("{holder:016x}: address unknown"));
                continue;
            };
            match self
                .blob_get_from(ticket, hash, &part, total, &progress)
                .await
            {
                Ok(size) => {
                    tokio::fs::rename(&part, out)
                        .await
                        .map_err(|e| io_error("cannot rename to", out, e))?;
                    return Ok(size);
                }
                Err(e) => failures.push(format!("{holder:016x}: {e}")),
            }
        }
        let _ = tokio::fs::remove_file(&part).await;
        Err(BlobError::Unavailable {
            hash: hash_hex(&hash),
            reason: failures.join("; "),
        }
        .into())
    }

    async fn blob_get_from(
        &self,
        holder: &NodeTicket,
        hash: BlobHash,
        part: &Path,
        total: u64,
        progress: &impl Fn(u64, u64),
    ) -> Result<u64, String> {
        let addr = addr_of(holder)?;
        let conn = tokio::time::timeout(
            self.inner.options.attempt_timeout,
            self.inner.endpoint.connect(addr, iroh_blobs::ALPN),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
        let file = tokio::fs::File::create(part)
            .await
            .map_err(|e| format!("cannot create {}: {e}", part.display()))?;
        // Leaves are 16 KiB; each unbuffered write would be a round trip to a blocking thread.
        let mut file = tokio::io::BufWriter::with_capacity(DOWNLOAD_BUFFER, file);
        let mut items = iroh_blobs::get::request::get_blob(conn.clone(), hash.into());
        let mut written = 0u64;
        let result = loop {
            match items.next().await {
                Some(GetBlobItem::Item(bao_tree::io::BaoContentItem::Leaf(leaf))) => {
                    if leaf.offset != written {
                        break Err(format!(
                            "out-of-order data at {} (expected {written})",
                            leaf.offset
                        ));
                    }
                    if let Err(e) = file.write_all(&leaf.data).await {
                        break Err(format!("cannot write {}: {e}", part.display()));
                    }
                    written += leaf.data.len() as u64;
                    progress(written, total);
                }
                Some(GetBlobItem::Item(_)) => {}
                Some(GetBlobItem::Done(_)) => break Ok(written),
                Some(GetBlobItem::Error(e)) => break Err(format!("{e}")),
                None => break Err("the holder closed the transfer early".into()),
            }
        };
        conn.close(0u32.into(), b"done");
        let size = result?;
        file.flush()
            .await
            .and(file.get_ref().sync_all().await)
            .map_err(|e| format!("cannot write {}: {e}", part.display()))?;
        Ok(size)
    }

    /// A connection to the first member that accepts one.
    async fn any_connection(
        &self,
    ) -> Result<(NodeTicket, iroh::endpoint::Connection), ClientError> {
        let members = self.members();
        let mut last = String::from("no members");
        for _ in 0..members.len() {
            let target = {
                let members = self.inner.members.lock().expect("lock");
                members[self
                    .inner
                    .preferred
                    .load(std::sync::atomic::Ordering::Relaxed)
                    % members.len()]
                .clone()
            };
            match tokio::time::timeout(self.inner.options.attempt_timeout, self.connection(&target))
                .await
            {
                Ok(Ok(conn)) => return Ok((target, conn)),
                Ok(Err(crate::ConnectError::Refused(e))) => return Err(ClientError::Rpc(e)),
                Ok(Err(crate::ConnectError::Transport(e))) => last = e,
                Err(_) => last = format!("connect to {:016x} timed out", target.node_id()),
            }
            self.rotate();
        }
        Err(ClientError::Unavailable {
            attempts: members.len() as u32,
            elapsed: self.inner.options.attempt_timeout * members.len() as u32,
            last,
        })
    }
}

/// Where a download is written until it is complete.
fn part_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    out.with_file_name(name)
}
