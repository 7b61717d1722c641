//! The body of a `put`: a bounded channel of byte chunks that must be closed explicitly.
//! A sender dropped without `finish` (an error, a panic, a cancelled task) is seen by the store
//! as an abandoned upload, so a failing producer can never make a store commit a truncated
//! object.

use bytes::Bytes;
use tokio::sync::mpsc;

use super::StoreError;

enum Part {
    Data(Bytes),
    End,
}

/// The receiving end, handed to `Store::put`.
pub struct PartStream {
    rx: mpsc::Receiver<Part>,
    ended: bool,
}

/// The producing end. The channel's bound is the backpressure: a slow store blocks the
/// producer instead of growing memory.
#[derive(Debug)]
pub struct PartSender {
    tx: mpsc::Sender<Part>,
}

/// The store stopped receiving (it failed or was cancelled).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the store stopped receiving")]
pub struct ReceiverGone;

impl PartStream {
    pub fn channel(bound: usize) -> (PartSender, PartStream) {
        let (tx, rx) = mpsc::channel(bound.max(1));
        (PartSender { tx }, PartStream { rx, ended: false })
    }

    pub fn from_bytes(body: Bytes) -> PartStream {
        let (tx, rx) = mpsc::channel(2);
        // Both sends fit the channel's capacity, so they cannot fail.
        let _ = tx.try_send(Part::Data(body));
        let _ = tx.try_send(Part::End);
        PartStream { rx, ended: false }
    }

    /// The next chunk; `Ok(None)` once the sender finished; `Abandoned` if the sender
    /// went away without finishing.
    pub async fn next(&mut self, key: &str) -> Result<Option<Bytes>, StoreError> {
        if self.ended {
            return Ok(None);
        }
        match self.rx.recv().await {
            Some(Part::Data(bytes)) => Ok(Some(bytes)),
            Some(Part::End) => {
                self.ended = true;
                Ok(None)
            }
            None => Err(StoreError::Abandoned {
                key: key.to_string(),
            }),
        }
    }
}

impl PartSender {
    pub async fn send(&self, data: Bytes) -> Result<(), ReceiverGone> {
        self.tx
            .send(Part::Data(data))
            .await
            .map_err(|_| ReceiverGone)
    }

    /// For producers on a blocking thread (the zstd pipeline); never call from async code.
    pub fn blocking_send(&self, data: Bytes) -> Result<(), ReceiverGone> {
        self.tx
            .blocking_send(Part::Data(data))
            .map_err(|_| ReceiverGone)
    }

    pub async fn finish(self) -> Result<(), ReceiverGone> {
        self.tx.send(Part::End).await.map_err(|_| ReceiverGone)
    }

    pub fn blocking_finish(self) -> Result<(), ReceiverGone> {
        self.tx.blocking_send(Part::End).map_err(|_| ReceiverGone)
    }
}
