//! Restore direction: stored bytes in, verified raw bytes handed to a consumer. Nothing the
//! consumer produced may be used unless `decode` returns Ok: the checksums are only known at
//! the end of the stream, so consumers write into staging and the caller moves it into place.

use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use super::{BackgroundTally, Digests, Tally};

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unable to download the object: {0}")]
    Download(io::Error),
    #[error("stored bytes do not match the manifest: {0}")]
    StoredMismatch(String),
    #[error("decompressed bytes do not match the manifest: {0}")]
    RawMismatch(String),
    #[error("{0}")]
    Consumer(io::Error),
}

/// The stored stream with a running tally, shared so the rest can be drained after the
/// decoder stops (a damaged object must still be recognised as damaged, not as a zstd error).
struct Tap<R> {
    inner: R,
    tally: Tally,
    error: Option<String>,
}

struct TapReader<R>(Arc<Mutex<Tap<R>>>);

impl<R: Read> Read for TapReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut tap = self.0.lock().expect("tap lock");
        match tap.inner.read(buf) {
            Ok(n) => {
                tap.tally.update(&buf[..n]);
                Ok(n)
            }
            Err(e) => {
                tap.error.get_or_insert_with(|| e.to_string());
                Err(e)
            }
        }
    }
}

/// The decompressed stream. Its sha256 runs on a thread of its own, so hashing overlaps
/// decompression and the consumer's writes instead of adding to them (restore time is RTO).
struct RawReader<R> {
    inner: R,
    tally: BackgroundTally,
}

impl<R: Read> Read for RawReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.tally.update(&buf[..n]);
        Ok(n)
    }
}

fn compare(what: &str, expected_size: u64, expected_sha: &str, tally: Tally) -> Result<(), String> {
    let (size, sha) = tally.finish();
    if size != expected_size {
        return Err(format!(
            "{what} size is {size} bytes, the manifest says {expected_size}"
        ));
    }
    if sha != expected_sha {
        return Err(format!(
            "{what} sha256 is {sha}, the manifest says {expected_sha}"
        ));
    }
    Ok(())
}

/// Decodes `stored` and hands the raw stream to `consume`; then drains and checks both
/// checksums against `expected`. A mismatch of the stored bytes is reported before anything
/// else, because it explains every other symptom.
pub fn decode<R, T>(
    stored: R,
    expected: &Digests,
    consume: impl FnOnce(&mut dyn Read) -> io::Result<T>,
) -> Result<T, DecodeError>
where
    R: Read,
{
    let tap = Arc::new(Mutex::new(Tap {
        inner: stored,
        tally: Tally::default(),
        error: None,
    }));
    let consumed = (|| -> io::Result<(T, Tally)> {
        let decoder = zstd::stream::read::Decoder::new(TapReader(tap.clone()))?;
        let mut raw = RawReader {
            inner: decoder,
            tally: BackgroundTally::start(),
        };
        let value = consume(&mut raw)?;
        io::copy(&mut raw, &mut io::sink())?;
        Ok((value, raw.tally.finish()))
    })();

    // Drain whatever the decoder left unread, so trailing damage is seen too.
    let mut tap = match Arc::try_unwrap(tap) {
        Ok(mutex) => mutex.into_inner().expect("tap lock"),
        Err(_) => unreachable!("the decoder that shared the tap has been dropped"),
    };
    if tap.error.is_none()
        && let Err(e) = io::copy(&mut TapReaderOwned(&mut tap), &mut io::sink())
    {
        tap.error.get_or_insert_with(|| e.to_string());
    }
    if let Some(error) = tap.error.take() {
        return Err(DecodeError::Download(io::Error::other(error)));
    }
    compare("stored", expected.size, &expected.sha256, tap.tally)
        .map_err(DecodeError::StoredMismatch)?;
    let (value, raw_tally) = consumed.map_err(DecodeError::Consumer)?;
    compare(
        "decompressed",
        expected.raw_size,
        &expected.raw_sha256,
        raw_tally,
    )
    .map_err(DecodeError::RawMismatch)?;
    Ok(value)
}

/// The decompressed stream of `stored`, with no checksum checked: for reading the start of
/// an object whose stored checksum has already been checked.
pub fn decode_unchecked<R: Read>(stored: R) -> io::Result<impl Read> {
    zstd::stream::read::Decoder::new(stored)
}

/// Copies `stored` into `out` as it is, checking its size and sha256 against `expected`:
/// the download half of decoding, for a restore that stages the compressed object first.
pub fn copy_stored<R: Read>(
    mut stored: R,
    expected: &Digests,
    out: &mut dyn io::Write,
) -> Result<u64, DecodeError> {
    let mut tally = Tally::default();
    let mut buffer = vec![0u8; super::CHUNK_SIZE];
    loop {
        let n = match stored.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DecodeError::Download(e)),
        };
        tally.update(&buffer[..n]);
        out.write_all(&buffer[..n]).map_err(DecodeError::Consumer)?;
    }
    out.flush().map_err(DecodeError::Consumer)?;
    compare("stored", expected.size, &expected.sha256, tally)
        .map_err(DecodeError::StoredMismatch)?;
    Ok(expected.size)
}

struct TapReaderOwned<'a, R>(&'a mut Tap<R>);

impl<R: Read> Read for TapReaderOwned<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.0.inner.read(buf)?;
        self.0.tally.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{EncodeOptions, ObjectWriter};
    use crate::storage::PartStream;
    use std::io::Write;

    /// Runs the encode side into memory, returning the stored bytes and digests.
    fn encode(raw: &[u8]) -> (Vec<u8>, Digests) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (sender, mut stream) = PartStream::channel(1024);
        let mut writer = ObjectWriter::new(
            EncodeOptions {
                level: 3,
                threads: 2,
            },
            vec![sender],
        )
        .unwrap();
        writer.write_all(raw).unwrap();
        let digests = writer.finish().unwrap();
        let stored = runtime.block_on(async {
            let mut stored = Vec::new();
            while let Some(chunk) = stream.next("k").await.unwrap() {
                stored.extend_from_slice(&chunk);
            }
            stored
        });
        (stored, digests)
    }

    fn sample() -> Vec<u8> {
        (0..3_000_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn round_trip_reproduces_raw_bytes_and_digests() {
        let raw = sample();
        let (stored, digests) = encode(&raw);
        assert_eq!(digests.raw_size, raw.len() as u64);
        assert_eq!(digests.size, stored.len() as u64);
        let mut out = Vec::new();
        decode(&stored[..], &digests, |r| r.read_to_end(&mut out)).unwrap();
        assert_eq!(out, raw);
    }

    #[test]
    fn a_flipped_stored_byte_is_a_stored_mismatch() {
        let (mut stored, digests) = encode(&sample());
        let middle = stored.len() / 2;
        stored[middle] ^= 0x01;
        let err = decode(&stored[..], &digests, |r| io::copy(r, &mut io::sink())).unwrap_err();
        assert!(matches!(err, DecodeError::StoredMismatch(_)), "{err}");
    }

    #[test]
    fn trailing_garbage_is_a_stored_mismatch() {
        let (mut stored, digests) = encode(b"hello");
        stored.extend_from_slice(b"junk");
        let err = decode(&stored[..], &digests, |r| io::copy(r, &mut io::sink())).unwrap_err();
        assert!(matches!(err, DecodeError::StoredMismatch(_)), "{err}");
    }

    #[test]
    fn copy_stored_checks_the_stored_digest() {
        let (mut stored, digests) = encode(&sample());
        let mut copy = Vec::new();
        assert_eq!(
            copy_stored(&stored[..], &digests, &mut copy).unwrap(),
            digests.size
        );
        assert_eq!(copy, stored);
        stored[10] ^= 0x80;
        let err = copy_stored(&stored[..], &digests, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, DecodeError::StoredMismatch(_)), "{err}");
    }

    #[test]
    fn a_wrong_raw_digest_is_a_raw_mismatch() {
        let (stored, mut digests) = encode(b"hello");
        digests.raw_sha256 = "0".repeat(64);
        let err = decode(&stored[..], &digests, |r| io::copy(r, &mut io::sink())).unwrap_err();
        assert!(matches!(err, DecodeError::RawMismatch(_)), "{err}");
    }
}
