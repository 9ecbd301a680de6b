//! Shares one leadership confirmation among concurrent linearizable reads.
//!
//! A ReadIndex costs a heartbeat round to a quorum. Readers that arrive while a round is in
//! flight wait for the NEXT round, which starts after they arrived, so every reader still gets
//! a read index confirmed after its read began (linearizable), and N concurrent readers cost
//! about two rounds instead of N.

use aspen_client::RpcError;
use tokio::sync::{mpsc, oneshot};

type Reply = oneshot::Sender<Result<Option<u64>, RpcError>>;

/// Handle to the coalescing task.
#[derive(Clone)]
pub struct ReadIndexBatcher {
    tx: mpsc::UnboundedSender<Reply>,
}

impl ReadIndexBatcher {
    /// `confirm` performs one leadership confirmation and returns the read index.
    pub fn spawn<F, Fut>(confirm: F) -> Self
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<Option<u64>, RpcError>> + Send,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Everyone already waiting arrived before this round starts.
                let mut waiting = vec![first];
                while let Ok(next) = rx.try_recv() {
                    waiting.push(next);
                }
                let result = confirm().await;
                for w in waiting {
                    let _ = w.send(result.clone());
                }
            }
        });
        ReadIndexBatcher { tx }
    }

    /// A read index confirmed after this call began.
    pub async fn read_index(&self) -> Result<Option<u64>, RpcError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(reply)
            .map_err(|_| RpcError::Unavailable("node is shutting down".into()))?;
        rx.await
            .map_err(|_| RpcError::Unavailable("node is shutting down".into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn concurrent_readers_share_rounds_and_never_reuse_an_older_one() {
        let rounds = Arc::new(AtomicU64::new(0));
        let r = rounds.clone();
        let batcher = ReadIndexBatcher::spawn(move || {
            let r = r.clone();
            async move {
                tokio::task::yield_now().await;
                Ok(Some(r.fetch_add(1, Ordering::SeqCst) + 1))
            }
        });
        // A reader arriving after a round completed gets a newer round.
        let a = batcher.read_index().await.unwrap().unwrap();
        let b = batcher.read_index().await.unwrap().unwrap();
        assert!(b > a);
        // Many concurrent readers: fewer rounds than readers.
        let before = rounds.load(Ordering::SeqCst);
        let handles: Vec<_> = (0..100)
            .map(|_| {
                let b = batcher.clone();
                tokio::spawn(async move { b.read_index().await.unwrap().unwrap() })
            })
            .collect();
        for h in handles {
            assert!(h.await.unwrap() > before);
        }
        assert!(rounds.load(Ordering::SeqCst) - before < 100);
    }
}
