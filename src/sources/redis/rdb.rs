//! Checks an RDB payload as it streams by: the `REDIS` magic and a version up front, the EOF
//! opcode and (unless the server has `rdbchecksum no`) the CRC-64 over everything before
//! it at the end. A payload cut short fails here, not at restore time.

use crc::{CRC_64_REDIS, Crc, Digest, Table};

/// Slice-by-16 tables: several times the bytewise table's speed, which keeps the check off
/// the critical path of a multi-GiB RDB.
static CRC64: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_REDIS);

/// The RDB opcode that ends the data; the 8-byte checksum follows it.
const EOF_OPCODE: u8 = 0xFF;
const CHECKSUM_LEN: usize = 8;
const HEADER_LEN: usize = 9;

/// The opcode of an auxiliary field (`redis-ver`, `ctime`, …), which come first.
const AUX_OPCODE: u8 = 0xFA;

/// How much of an RDB's start is kept to read its auxiliary fields from: they are a few
/// dozen bytes, before the first key.
pub const HEAD_LEN: usize = 4096;

/// When the server began writing this RDB: its `ctime` auxiliary field (seconds since the
/// epoch, the server's clock), read from the RDB's first bytes `head`. None when the
/// fields do not hold one (an RDB from before Redis 4).
pub fn saved_at(head: &[u8]) -> Option<i64> {
    let mut at = HEADER_LEN;
    while *head.get(at)? == AUX_OPCODE {
        at += 1;
        let (key, next) = rdb_string(head, at)?;
        let (value, next) = rdb_string(head, next)?;
        at = next;
        if key == RdbString::Bytes(b"ctime") {
            return match value {
                RdbString::Int(seconds) => Some(seconds),
                RdbString::Bytes(text) => std::str::from_utf8(text).ok()?.parse().ok(),
            };
        }
    }
    None
}

#[derive(Debug, PartialEq, Eq)]
enum RdbString<'a> {
    Bytes(&'a [u8]),
    Int(i64),
}

/// The RDB string at `at` in `bytes` (length-prefixed, or an integer encoding), and where
/// the next item starts; None when it runs past `bytes` or is compressed.
fn rdb_string(bytes: &[u8], at: usize) -> Option<(RdbString<'_>, usize)> {
    let first = *bytes.get(at)?;
    let (length, at) = match first >> 6 {
        0b00 => ((first & 0x3f) as usize, at + 1),
        0b01 => (
            (((first & 0x3f) as usize) << 8) | *bytes.get(at + 1)? as usize,
            at + 2,
        ),
        0b10 if first == 0x80 => (
            u32::from_be_bytes(bytes.get(at + 1..at + 5)?.try_into().ok()?) as usize,
            at + 5,
        ),
        0b10 => return None,
        _ => {
            let width = match first & 0x3f {
                0 => 1,
                1 => 2,
                2 => 4,
                _ => return None,
            };
            let raw = bytes.get(at + 1..at + 1 + width)?;
            let mut le = [0u8; 8];
            le[..width].copy_from_slice(raw);
            // Sign-extend what the server wrote as int8, int16 or int32.
            let shift = 64 - 8 * width as u32;
            let value = (i64::from_le_bytes(le) << shift) >> shift;
            return Some((RdbString::Int(value), at + 1 + width));
        }
    };
    let text = bytes.get(at..at.checked_add(length)?)?;
    Some((RdbString::Bytes(text), at + length))
}

pub struct RdbCheck {
    header: Vec<u8>,
    /// The first [`HEAD_LEN`] bytes, for [`saved_at`].
    head: Vec<u8>,
    digest: Digest<'static, u64, Table<16>>,
    /// The last bytes seen, not yet in the digest: they may be the checksum.
    held: Vec<u8>,
    last_digested: Option<u8>,
    size: u64,
}

impl Default for RdbCheck {
    fn default() -> Self {
        RdbCheck {
            header: Vec::with_capacity(HEADER_LEN),
            head: Vec::new(),
            digest: CRC64.digest(),
            held: Vec::with_capacity(2 * CHECKSUM_LEN),
            last_digested: None,
            size: 0,
        }
    }
}

impl RdbCheck {
    pub fn update(&mut self, data: &[u8]) {
        self.size += data.len() as u64;
        if self.header.len() < HEADER_LEN {
            let n = (HEADER_LEN - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..n]);
        }
        if self.head.len() < HEAD_LEN {
            let n = (HEAD_LEN - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..n]);
        }
        if data.len() >= CHECKSUM_LEN {
            let held = std::mem::take(&mut self.held);
            self.digest_bytes(&held);
            let (body, tail) = data.split_at(data.len() - CHECKSUM_LEN);
            self.digest_bytes(body);
            self.held.extend_from_slice(tail);
        } else {
            self.held.extend_from_slice(data);
            if self.held.len() > CHECKSUM_LEN {
                let excess = self.held.len() - CHECKSUM_LEN;
                let older: Vec<u8> = self.held.drain(..excess).collect();
                self.digest_bytes(&older);
            }
        }
    }

    fn digest_bytes(&mut self, bytes: &[u8]) {
        if let Some(&last) = bytes.last() {
            self.digest.update(bytes);
            self.last_digested = Some(last);
        }
    }

    /// When the server began writing the RDB, as [`saved_at`] reads it.
    pub fn saved_at(&self) -> Option<i64> {
        saved_at(&self.head)
    }

    /// The RDB version, once the whole payload has been seen and holds together.
    pub fn finish(self) -> Result<u32, String> {
        if self.header.len() < HEADER_LEN || !self.header.starts_with(b"REDIS") {
            return Err(format!(
                "it does not start with the REDIS magic (first bytes {:?})",
                String::from_utf8_lossy(&self.header)
            ));
        }
        let version: u32 = std::str::from_utf8(&self.header[5..])
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                format!(
                    "its version '{}' is not a number",
                    String::from_utf8_lossy(&self.header[5..])
                )
            })?;
        if self.size < (HEADER_LEN + 1 + CHECKSUM_LEN) as u64 {
            return Err(format!("it is only {} bytes long", self.size));
        }
        if self.last_digested != Some(EOF_OPCODE) {
            return Err("it does not end with the EOF opcode: it was cut short".into());
        }
        let stored = u64::from_le_bytes(self.held[..].try_into().expect("8 bytes held"));
        let computed = self.digest.finalize();
        // A zero checksum means the server runs with `rdbchecksum no`.
        if stored != 0 && stored != computed {
            return Err(format!(
                "its CRC-64 is {computed:016x} but it ends with {stored:016x}: damaged or cut short"
            ));
        }
        Ok(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal RDB: header, one string key, EOF, checksum (or zeros).
    fn rdb(with_checksum: bool) -> Vec<u8> {
        let mut bytes = b"REDIS0010".to_vec();
        bytes.extend_from_slice(&[0xFE, 0x00, 0xFB, 0x01, 0x00]); // db 0, resize hints
        bytes.extend_from_slice(&[0x00, 0x03, b'k', b'e', b'y', 0x01, b'v']);
        bytes.push(EOF_OPCODE);
        let checksum = if with_checksum {
            CRC64.checksum(&bytes)
        } else {
            0
        };
        bytes.extend_from_slice(&checksum.to_le_bytes());
        bytes
    }

    fn check(bytes: &[u8], chunk: usize) -> Result<u32, String> {
        let mut check = RdbCheck::default();
        for piece in bytes.chunks(chunk) {
            check.update(piece);
        }
        check.finish()
    }

    #[test]
    fn the_save_time_is_read_from_the_auxiliary_fields() {
        let mut head = b"REDIS0010".to_vec();
        head.extend_from_slice(&[0xFA, 9]);
        head.extend_from_slice(b"redis-ver");
        head.extend_from_slice(&[6]);
        head.extend_from_slice(b"7.0.15");
        head.extend_from_slice(&[0xFA, 5]);
        head.extend_from_slice(b"ctime");
        head.push(0xC2);
        head.extend_from_slice(&1_764_160_000u32.to_le_bytes());
        head.extend_from_slice(&[0xFE, 0x00]);
        assert_eq!(saved_at(&head), Some(1_764_160_000));
        assert_eq!(
            saved_at(&head[..head.len() - 4]),
            None,
            "cut inside the field"
        );
        assert_eq!(saved_at(&rdb(true)), None, "no auxiliary fields");
    }

    #[test]
    fn the_redis_crc64_is_the_one_redis_uses() {
        // The check value from Redis' own crc64 test.
        assert_eq!(CRC64.checksum(b"123456789"), 0xe9c6d914c4b8d9ca);
    }

    #[test]
    fn a_whole_payload_passes_in_any_chunking() {
        let bytes = rdb(true);
        for chunk in [1, 2, 7, 8, 9, 13, bytes.len()] {
            assert_eq!(check(&bytes, chunk), Ok(10), "chunk {chunk}");
        }
        assert_eq!(check(&rdb(false), 3), Ok(10));
    }

    #[test]
    fn a_cut_or_damaged_payload_fails() {
        let bytes = rdb(true);
        for cut in [0, 5, 12, bytes.len() - 9, bytes.len() - 1] {
            assert!(check(&bytes[..cut], 4).is_err(), "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[12] ^= 0x01;
        let problem = check(&flipped, 5).unwrap_err();
        assert!(problem.contains("CRC-64"), "{problem}");
        assert!(
            check(b"NOTREDIS0010\xff\0\0\0\0\0\0\0\0", 4)
                .unwrap_err()
                .contains("magic")
        );
    }
}
