//! Digests of an object's stored bytes block by block, so a reader can check each stretch as
//! it arrives and hand it on at once, instead of waiting for the whole object's sha256: a
//! restore unpacks what was checked while the rest still downloads, and nothing it unpacks
//! was unchecked.
//!
//! The stored bytes are cut into blocks of `block_size`; each block's sha256 is taken, and
//! every `blocks_per_digest` consecutive block digests (32 raw bytes each) are hashed again
//! into one recorded digest. A backup knows its size only at its end, so it keeps every block
//! digest and groups them then, so that a manifest never records more than [`MAX_DIGESTS`]
//! (about 68 KB of hex however large the object). Fixed block sizes and the object's size in
//! the manifest make the list as binding as one sha256 of the whole.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The block an object's stored bytes are cut into: the part size of uploads and ranges.
pub const BLOCK_SIZE: u64 = 8 << 20;
/// The most digests one object records.
pub const MAX_DIGESTS: u64 = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockDigests {
    pub block_size: u64,
    pub blocks_per_digest: u64,
    /// One per `blocks_per_digest` blocks, in order; the last may cover fewer.
    pub sha256: Vec<String>,
}

impl BlockDigests {
    /// The bytes one recorded digest covers.
    pub fn stretch(&self) -> u64 {
        self.block_size.saturating_mul(self.blocks_per_digest)
    }

    /// Whether these digests can be those of an object of `size` stored bytes; says what
    /// does not fit. Checked when a manifest is read, so a reader never trusts a list that
    /// leaves bytes unchecked.
    pub fn check_shape(&self, size: u64) -> Result<(), String> {
        if !(64 << 10..=1 << 30).contains(&self.block_size) {
            return Err(format!(
                "block_size {} is not between 64 KiB and 1 GiB",
                self.block_size
            ));
        }
        if self.blocks_per_digest == 0 {
            return Err("blocks_per_digest is 0".to_string());
        }
        if size <= self.block_size {
            return Err(format!(
                "an object of {size} bytes is one block of {}, which takes no block digests",
                self.block_size
            ));
        }
        let blocks = size.div_ceil(self.block_size);
        let digests = blocks.div_ceil(self.blocks_per_digest);
        if digests > MAX_DIGESTS {
            return Err(format!(
                "{digests} block digests of {} blocks each would be needed, more than the {MAX_DIGESTS} lifeboat records",
                self.blocks_per_digest
            ));
        }
        if self.sha256.len() as u64 != digests {
            return Err(format!(
                "{} block digests do not cover {size} bytes in blocks of {} ({} per digest)",
                self.sha256.len(),
                self.block_size,
                self.blocks_per_digest
            ));
        }
        if let Some(bad) = self
            .sha256
            .iter()
            .find(|d| d.len() != 64 || !d.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        {
            return Err(format!(
                "block digest '{bad}' is not a sha256 in lower-case hex"
            ));
        }
        Ok(())
    }
}

/// Takes block digests of bytes as they are written.
#[derive(Debug, Clone)]
pub(crate) struct BlockHasher {
    block_size: u64,
    block: Sha256,
    filled: u64,
    blocks: Vec<[u8; 32]>,
}

impl Default for BlockHasher {
    fn default() -> BlockHasher {
        BlockHasher::of_blocks(BLOCK_SIZE)
    }
}

impl BlockHasher {
    fn of_blocks(block_size: u64) -> BlockHasher {
        BlockHasher {
            block_size,
            block: Sha256::new(),
            filled: 0,
            blocks: Vec::new(),
        }
    }

    pub(crate) fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = (self.block_size - self.filled) as usize;
            let (now, later) = data.split_at(room.min(data.len()));
            self.block.update(now);
            self.filled += now.len() as u64;
            data = later;
            if self.filled == self.block_size {
                self.blocks
                    .push(std::mem::take(&mut self.block).finalize().into());
                self.filled = 0;
            }
        }
    }

    /// The digests to record, or None for an object of one block (its sha256 says it all).
    pub(crate) fn finish(mut self) -> Option<BlockDigests> {
        if self.filled > 0 {
            self.blocks.push(self.block.finalize().into());
        }
        let count = self.blocks.len() as u64;
        if count <= 1 {
            return None;
        }
        let blocks_per_digest = count.div_ceil(MAX_DIGESTS);
        let sha256 = self
            .blocks
            .chunks(blocks_per_digest as usize)
            .map(digest_of_blocks)
            .collect();
        Some(BlockDigests {
            block_size: self.block_size,
            blocks_per_digest,
            sha256,
        })
    }
}

fn digest_of_blocks(blocks: &[[u8; 32]]) -> String {
    let mut hasher = Sha256::new();
    for block in blocks {
        hasher.update(block);
    }
    hex::encode(hasher.finalize())
}

/// Checks bytes read in order against recorded block digests, saying how far they are
/// checked.
#[derive(Debug)]
pub(crate) struct BlockCheck {
    expected: BlockDigests,
    size: u64,
    block: Sha256,
    filled: u64,
    /// Digests of the blocks of the stretch being read.
    blocks: Vec<[u8; 32]>,
    read: u64,
    checked: u64,
    failure: Option<String>,
}

impl BlockCheck {
    /// For an object of `size` stored bytes; `expected` passed [`BlockDigests::check_shape`].
    pub(crate) fn new(expected: BlockDigests, size: u64) -> BlockCheck {
        BlockCheck {
            expected,
            size,
            block: Sha256::new(),
            filled: 0,
            blocks: Vec::new(),
            read: 0,
            checked: 0,
            failure: None,
        }
    }

    /// How many bytes from the start have matched their digest.
    pub(crate) fn checked(&self) -> u64 {
        self.checked
    }

    /// The first mismatch, worded for a message.
    pub(crate) fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Takes the next bytes; once one fails, the rest are not looked at.
    pub(crate) fn update(&mut self, mut data: &[u8]) {
        let block_size = self.expected.block_size;
        while !data.is_empty() && self.failure.is_none() {
            if self.read == self.size {
                self.failure = Some(format!("it has more than the {} bytes", self.size));
                return;
            }
            let block_end = (self.size - self.read).min(block_size - self.filled);
            let (now, later) = data.split_at((block_end as usize).min(data.len()));
            self.block.update(now);
            self.filled += now.len() as u64;
            self.read += now.len() as u64;
            data = later;
            if self.filled == block_size || self.read == self.size {
                self.blocks
                    .push(std::mem::take(&mut self.block).finalize().into());
                self.filled = 0;
                if self.blocks.len() as u64 == self.expected.blocks_per_digest
                    || self.read == self.size
                {
                    self.close_stretch();
                }
            }
        }
    }

    fn close_stretch(&mut self) {
        let index = (self.checked / self.expected.stretch()) as usize;
        let digest = digest_of_blocks(&self.blocks);
        self.blocks.clear();
        if self.expected.sha256.get(index) == Some(&digest) {
            self.checked = self.read;
        } else {
            self.failure = Some(format!(
                "the {} bytes from byte {} do not match block digest {} of {}",
                self.read - self.checked,
                self.checked,
                index + 1,
                self.expected.sha256.len()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn digests_of(data: &[u8]) -> Option<BlockDigests> {
        let mut hasher = BlockHasher::default();
        for piece in data.chunks(100_003) {
            hasher.update(piece);
        }
        hasher.finish()
    }

    fn check(expected: &BlockDigests, data: &[u8], piece: usize) -> (u64, Option<String>) {
        let mut check = BlockCheck::new(expected.clone(), data.len() as u64);
        for piece in data.chunks(piece) {
            check.update(piece);
        }
        (check.checked(), check.failure().map(str::to_string))
    }

    #[test]
    fn one_block_records_nothing() {
        assert_eq!(digests_of(&bytes(BLOCK_SIZE as usize)), None);
        assert_eq!(digests_of(&[]), None);
    }

    #[test]
    fn every_byte_is_checked_and_a_flipped_one_stops_the_stretch_it_is_in() {
        let mut data = bytes(2 * BLOCK_SIZE as usize + 12_345);
        let digests = digests_of(&data).unwrap();
        assert_eq!((digests.blocks_per_digest, digests.sha256.len()), (1, 3));
        digests.check_shape(data.len() as u64).unwrap();
        for piece in [1 << 20, 4_096_001, data.len()] {
            assert_eq!(check(&digests, &data, piece), (data.len() as u64, None));
        }
        data[BLOCK_SIZE as usize + 5] ^= 1;
        let (checked, failure) = check(&digests, &data, 1 << 20);
        assert_eq!(checked, BLOCK_SIZE);
        assert!(failure.unwrap().contains("block digest 2 of 3"));
    }

    #[test]
    fn large_objects_group_blocks_so_the_list_stays_short() {
        const SMALL: u64 = 64 << 10;
        let mut hasher = BlockHasher::of_blocks(SMALL);
        let block = bytes(SMALL as usize);
        for _ in 0..MAX_DIGESTS + 1 {
            hasher.update(&block);
        }
        hasher.update(&block[..10]);
        let digests = hasher.finish().unwrap();
        assert_eq!(digests.blocks_per_digest, 2);
        assert_eq!(digests.sha256.len() as u64, MAX_DIGESTS / 2 + 1);
        let size = (MAX_DIGESTS + 1) * SMALL + 10;
        digests.check_shape(size).unwrap();
        let mut check = BlockCheck::new(digests, size);
        for _ in 0..MAX_DIGESTS + 1 {
            check.update(&block);
        }
        check.update(&block[..10]);
        assert_eq!((check.checked(), check.failure()), (size, None));
    }

    #[test]
    fn lists_that_leave_bytes_unchecked_are_refused() {
        let data = bytes(3 * BLOCK_SIZE as usize);
        let digests = digests_of(&data).unwrap();
        assert!(digests.check_shape(4 * BLOCK_SIZE).is_err());
        assert!(digests.check_shape(2 * BLOCK_SIZE).is_err());
        let mut grouped = digests.clone();
        grouped.blocks_per_digest = 0;
        assert!(grouped.check_shape(3 * BLOCK_SIZE).is_err());
        let mut tiny = digests.clone();
        tiny.block_size = 1;
        assert!(tiny.check_shape(3 * BLOCK_SIZE).is_err());
        let mut longer = BlockCheck::new(digests, data.len() as u64);
        longer.update(&data);
        longer.update(&[0]);
        assert_eq!(longer.checked(), data.len() as u64);
        assert!(longer.failure().unwrap().contains("more than"));
    }
}
