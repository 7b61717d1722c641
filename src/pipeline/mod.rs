//! The streaming pipeline, declared in one place.
//!
//! Backup:  source bytes → raw sha256 + size → zstd (multi-threaded) → stored sha256 + size
//!          → fixed-size chunks → one bounded channel per repository.
//! Restore: stored bytes → stored sha256 + size → zstd decode → raw sha256 + size → consumer.
//!
//! zstd and sha2 are synchronous, so both directions run on a blocking thread; the channels'
//! bounds are the backpressure, which keeps memory bounded whatever the size of the stream.
//! Depends on `storage::parts` only.

mod decode;
mod encode;

pub use decode::{DecodeError, copy_stored, copy_unsealed, decode, decode_unchecked};
pub use encode::{EncodeOptions, ObjectWriter};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Chunks handed to the stores; they regroup them into their own part size.
pub const CHUNK_SIZE: usize = 1024 * 1024;
/// Chunks queued per repository before the producer waits.
pub const CHANNEL_BOUND: usize = 8;

/// Sizes and checksums of one object, on both sides of compression.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digests {
    pub size: u64,
    pub sha256: String,
    pub raw_size: u64,
    pub raw_sha256: String,
}

/// A running SHA-256 and byte count.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tally {
    hasher: Sha256,
    size: u64,
}

impl Tally {
    pub(crate) fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.size += data.len() as u64;
    }

    pub(crate) fn finish(self) -> (u64, String) {
        (self.size, hex::encode(self.hasher.finalize()))
    }
}

/// A `Tally` computed on its own thread from batches of the stream.
pub(crate) struct BackgroundTally {
    pending: Vec<u8>,
    sender: std::sync::mpsc::SyncSender<Vec<u8>>,
    worker: std::thread::JoinHandle<Tally>,
}

const TALLY_BATCH: usize = 1024 * 1024;

impl BackgroundTally {
    pub(crate) fn start() -> BackgroundTally {
        // A few batches in flight: enough to keep the hashing thread busy, bounded in memory.
        let (sender, batches) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let worker = std::thread::spawn(move || {
            let mut tally = Tally::default();
            for batch in batches {
                tally.update(&batch);
            }
            tally
        });
        BackgroundTally {
            pending: Vec::with_capacity(TALLY_BATCH),
            sender,
            worker,
        }
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
        if self.pending.len() >= TALLY_BATCH {
            let batch = std::mem::replace(&mut self.pending, Vec::with_capacity(TALLY_BATCH));
            // The worker only stops when the sender is dropped, so this cannot fail.
            let _ = self.sender.send(batch);
        }
    }

    pub(crate) fn finish(self) -> Tally {
        if !self.pending.is_empty() {
            let _ = self.sender.send(self.pending);
        }
        drop(self.sender);
        self.worker
            .join()
            .expect("the hashing thread does not panic")
    }
}
