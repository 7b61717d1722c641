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

pub struct RdbCheck {
    header: Vec<u8>,
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
