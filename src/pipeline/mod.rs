//! The streaming pipeline, declared in one place.
//!
//! Backup:  source bytes → raw sha256 + size → zstd (multi-threaded) → stored sha256 + size
//!          → fixed-size chunks → one bounded channel per repository.
//! Restore: stored bytes → stored sha256 + size → zstd decode → raw sha256 + size → consumer.
//!
//! zstd and sha2 are synchronous, so both directions run on a blocking thread; the channels'
//! bounds are the backpressure, which keeps memory bounded whatever the size of the stream.
//! Depends on `storage::parts` only.

mod blocks;
mod decode;
mod encode;
mod follow;

pub use blocks::{BLOCK_SIZE, BlockDigests};
pub(crate) use blocks::{BlockCheck, BlockHasher};

pub use decode::{
    DecodeError, StoredCheck, copy_stored, copy_unsealed, decode, decode_checking, decode_unchecked,
};
pub use encode::{EncodeOptions, ObjectWriter, ZSTD_JOB_SIZE};
pub use follow::{Arrived, Checked, FollowingReader};

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
    /// The stored bytes' digests block by block, for objects of more than one block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_digests: Option<BlockDigests>,
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
