//! Restore direction: stored bytes in, verified raw bytes handed to a consumer. Nothing the
//! consumer produced may be used unless `decode` returns Ok: the checksums are only known at
//! the end of the stream, so consumers write into staging and the caller moves it into place.

use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use super::{BlockCheck, Checked, Digests, Tally};
use crate::keys::{self, Identity, OpenError};

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unable to download the object: {0}")]
    Download(io::Error),
    #[error("stored bytes do not match the manifest: {0}")]
    StoredMismatch(String),
    #[error("decompressed bytes do not match the manifest: {0}")]
    RawMismatch(String),
    /// The stored bytes are intact, and none of the identities opens them.
    #[error("{0}")]
    Key(OpenError),
    #[error("{0}")]
    Consumer(io::Error),
}

/// The stored stream with a running tally, shared so the rest can be drained after the
/// decoder stops (a damaged object must still be recognised as damaged, not as a zstd error).
struct Tap<R> {
    inner: R,
    /// None when the stored bytes were checked before (a staged copy being decoded).
    tally: Option<Tally>,
    blocks: Option<BlockCheck>,
    error: Option<String>,
}

impl<R> Tap<R> {
    fn new(inner: R, expected: &Digests, stored_check: StoredCheck) -> Tap<R> {
        let check = stored_check == StoredCheck::Check;
        Tap {
            inner,
            tally: check.then(Tally::default),
            blocks: check.then(|| block_check(expected)).flatten(),
            error: None,
        }
    }

    fn update(&mut self, data: &[u8]) {
        if let Some(tally) = &mut self.tally {
            tally.update(data);
        }
        if let Some(blocks) = &mut self.blocks {
            blocks.update(data);
        }
    }
}

fn block_check(expected: &Digests) -> Option<BlockCheck> {
    let blocks = expected.block_digests.clone()?;
    Some(BlockCheck::new(blocks, expected.size))
}

struct TapReader<R>(Arc<Mutex<Tap<R>>>);

impl<R: Read> Read for TapReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut tap = self.0.lock().expect("tap lock");
        match tap.inner.read(buf) {
            Ok(n) => {
                tap.update(&buf[..n]);
                Ok(n)
            }
            Err(e) => {
                tap.error.get_or_insert_with(|| e.to_string());
                Err(e)
            }
        }
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

/// Decoded chunks waiting for the consumer, and consumed ones waiting to be hashed.
const DECODED_AHEAD: usize = 4;
/// Every buffer in circulation: waiting for the consumer or the hashing, being filled,
/// read and hashed. A fixed set, so memory is bounded and no buffer is faulted in twice.
const BUFFERS: usize = 2 * DECODED_AHEAD + 3;

/// Reads `reader` to its end in `CHUNK_SIZE` pieces into `chunks`; stops at the first error
/// (handed on) or when the consumer is gone. Buffers come back through `spare` once hashed;
/// with [`BUFFERS`] out, it waits for one: a fresh 1 MiB buffer per chunk cost a page fault
/// per 4 KiB, and when hashing was the slowest step every chunk needed a fresh one.
fn read_ahead(
    mut reader: impl Read,
    chunks: std::sync::mpsc::SyncSender<io::Result<Vec<u8>>>,
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
) {
    let mut allocated = 0;
    loop {
        let mut chunk = match spare.try_recv() {
            Ok(chunk) => chunk,
            Err(_) if allocated < BUFFERS => {
                allocated += 1;
                Vec::new()
            }
            Err(_) => match spare.recv() {
                Ok(chunk) => chunk,
                // The hashing thread is gone, so is the consumer.
                Err(_) => return,
            },
        };
        chunk.resize(super::CHUNK_SIZE, 0);
        let mut filled = 0;
        let outcome = loop {
            match reader.read(&mut chunk[filled..]) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    filled += n;
                    if filled == chunk.len() {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        chunk.truncate(filled);
        let end = filled == 0 || outcome.is_err();
        if filled > 0 && chunks.send(Ok(chunk)).is_err() {
            return;
        }
        if let Err(e) = outcome {
            let _ = chunks.send(Err(e));
        }
        if end {
            return;
        }
    }
}

/// The consumer's side of [`read_ahead`]. Each chunk the consumer is done with goes whole,
/// in order, to the hashing thread ([`hash_done`]): the raw sha256 overlaps decompression
/// and the consumer's writes, and the decoded bytes are never copied just to be hashed.
struct Decoded {
    receiver: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    done: std::sync::mpsc::SyncSender<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl Decoded {
    /// Moves on to the next chunk; false at the end of the stream.
    fn advance(&mut self) -> io::Result<bool> {
        let next = match self.receiver.recv() {
            Ok(next) => next?,
            // The reading thread finished: the end of the stream.
            Err(_) => return Ok(false),
        };
        let used = std::mem::replace(&mut self.chunk, next);
        self.at = 0;
        if !used.is_empty() {
            // The hashing thread only stops when this sender is dropped.
            let _ = self.done.send(used);
        }
        Ok(true)
    }

    /// Hashes what the consumer left unread, without copying it anywhere.
    fn drain(mut self) -> io::Result<()> {
        while self.advance()? {}
        let last = std::mem::take(&mut self.chunk);
        if !last.is_empty() {
            let _ = self.done.send(last);
        }
        Ok(())
    }
}

impl Read for Decoded {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            if !self.advance()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Hashes the chunks the consumer is done with, then hands each back to [`read_ahead`].
fn hash_done(
    done: std::sync::mpsc::Receiver<Vec<u8>>,
    spare: std::sync::mpsc::SyncSender<Vec<u8>>,
) -> Tally {
    let mut tally = Tally::default();
    for chunk in done {
        tally.update(&chunk);
        let _ = spare.try_send(chunk);
    }
    tally
}

/// The zstd stream inside a stored object: the object itself, or what age decrypts it to.
enum Unsealed<R> {
    Plain(R),
    Age(age::stream::StreamReader<R>),
}

impl<R: Read> Unsealed<R> {
    fn open(stored: R, identities: Option<&[Identity]>) -> Result<Unsealed<R>, OpenError> {
        Ok(match identities {
            None => Unsealed::Plain(stored),
            Some(identities) => Unsealed::Age(keys::open(stored, identities)?),
        })
    }
}

impl<R: Read> Read for Unsealed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Unsealed::Plain(reader) => reader.read(buf),
            Unsealed::Age(reader) => reader.read(buf),
        }
    }
}

enum Failure {
    Key(OpenError),
    Io(io::Error),
}

impl Failure {
    fn into_decode_error(self) -> DecodeError {
        match self {
            Failure::Key(e) => DecodeError::Key(e),
            Failure::Io(e) => DecodeError::Consumer(e),
        }
    }
}

/// Drains whatever the reader left unread of the stored stream, so trailing damage is seen
/// too, and checks its size and sha256.
fn finish_tap<R: Read>(tap: Arc<Mutex<Tap<R>>>, expected: &Digests) -> Result<(), DecodeError> {
    let mut tap = match Arc::try_unwrap(tap) {
        Ok(mutex) => mutex.into_inner().expect("tap lock"),
        Err(_) => unreachable!("the reader that shared the tap has been dropped"),
    };
    if tap.error.is_none()
        && let Err(e) = io::copy(&mut TapReaderOwned(&mut tap), &mut io::sink())
    {
        tap.error.get_or_insert_with(|| e.to_string());
    }
    if let Some(error) = tap.error.take() {
        return Err(DecodeError::Download(io::Error::other(error)));
    }
    if let Some(tally) = tap.tally {
        compare("stored", expected.size, &expected.sha256, tally)
            .map_err(DecodeError::StoredMismatch)?;
    }
    match tap.blocks.as_ref().and_then(BlockCheck::failure) {
        Some(failure) => Err(DecodeError::StoredMismatch(failure.to_string())),
        None => Ok(()),
    }
}

/// Copies the zstd stream inside `stored` (decrypted with `identities` when given) into
/// `out` without decompressing it, checking the stored size and sha256: re-encrypting an
/// object to other recipients.
pub fn copy_unsealed<R: Read>(
    stored: R,
    expected: &Digests,
    identities: Option<&[Identity]>,
    out: &mut dyn io::Write,
) -> Result<(), DecodeError> {
    let tap = Arc::new(Mutex::new(Tap::new(stored, expected, StoredCheck::Check)));
    let copied = (|| -> Result<(), Failure> {
        let mut unsealed =
            Unsealed::open(TapReader(tap.clone()), identities).map_err(Failure::Key)?;
        io::copy(&mut unsealed, out)?;
        Ok(())
    })();
    finish_tap(tap, expected)?;
    copied.map_err(Failure::into_decode_error)
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Io(e)
    }
}

/// Decodes `stored` (decrypting it with `identities` when given: the object is age) and
/// hands the raw stream to `consume`; then drains and checks both checksums against
/// `expected`. A mismatch of the stored bytes is reported before anything else, because it
/// explains every other symptom; a key that does not open the object comes next, and then
/// `consume` has not been called.
pub fn decode<R, T>(
    stored: R,
    expected: &Digests,
    identities: Option<&[Identity]>,
    consume: impl FnOnce(&mut dyn Read) -> io::Result<T>,
) -> Result<T, DecodeError>
where
    R: Read + Send,
{
    decode_checking(stored, expected, StoredCheck::Check, identities, consume)
}

/// Whether [`decode_checking`] checks the stored bytes too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredCheck {
    Check,
    /// A staged copy, read only as far as its download checked it: only the decompressed
    /// bytes are checked.
    AlreadyChecked,
}

/// [`decode`], checking the stored bytes or not as `stored_check` says.
pub fn decode_checking<R, T>(
    stored: R,
    expected: &Digests,
    stored_check: StoredCheck,
    identities: Option<&[Identity]>,
    consume: impl FnOnce(&mut dyn Read) -> io::Result<T>,
) -> Result<T, DecodeError>
where
    R: Read + Send,
{
    let tap = Arc::new(Mutex::new(Tap::new(stored, expected, stored_check)));
    let consumed = (|| -> Result<(T, Tally), Failure> {
        let unsealed = Unsealed::open(TapReader(tap.clone()), identities).map_err(Failure::Key)?;
        let decoder = AtMost {
            inner: zstd::stream::read::Decoder::new(unsealed)?,
            left: expected.raw_size,
        };
        // Decompression runs on a thread of its own, ahead of the consumer: unpacking a base
        // backup writes as fast as one core can, and decoding on the same core came first.
        std::thread::scope(|scope| {
            let (chunks, receiver) = std::sync::mpsc::sync_channel(DECODED_AHEAD);
            let (done, to_hash) = std::sync::mpsc::sync_channel(DECODED_AHEAD);
            // Room for every buffer, so handing one back never waits.
            let (spare, spares) = std::sync::mpsc::sync_channel(BUFFERS);
            scope.spawn(move || read_ahead(decoder, chunks, spares));
            let hashing = scope.spawn(move || hash_done(to_hash, spare));
            let mut raw = Decoded {
                receiver,
                done,
                chunk: Vec::new(),
                at: 0,
            };
            let value = consume(&mut raw)?;
            raw.drain()?;
            let tally = hashing.join().expect("the hashing thread does not panic");
            Ok((value, tally))
        })
    })();

    finish_tap(tap, expected)?;
    let (value, raw_tally) = consumed.map_err(Failure::into_decode_error)?;
    compare(
        "decompressed",
        expected.raw_size,
        &expected.raw_sha256,
        raw_tally,
    )
    .map_err(DecodeError::RawMismatch)?;
    Ok(value)
}

/// A decoded stream that may not grow past the size its manifest gives: a small object that
/// decompresses to far more (a zstd bomb) fails as soon as it passes it, before it fills the
/// disk it is unpacked on.
struct AtMost<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for AtMost<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "it decompresses to more bytes than its manifest's raw_size",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// The decompressed stream of `stored`, with no checksum checked: for reading the start of
/// an object whose stored checksum has already been checked.
pub fn decode_unchecked<R: Read>(
    stored: R,
    identities: Option<&[Identity]>,
) -> io::Result<impl Read> {
    let unsealed = Unsealed::open(stored, identities).map_err(io::Error::other)?;
    zstd::stream::read::Decoder::new(unsealed)
}

/// Copies `stored` into `out` as it is, checking its size and sha256 against `expected`, and
/// its block digests when it has them, stopping at the first block that does not match: the
/// download half of decoding, for a restore that stages the compressed object first.
/// `checked` is told how far what reached `out` (flushed) is checked, and that all of it is
/// at the end; a reader following it may then decode while the rest downloads. Once its
/// reader gave up, the copy stops.
pub fn copy_stored<R: Read>(
    stored: R,
    expected: &Digests,
    out: &mut dyn io::Write,
    checked: &Checked,
) -> Result<u64, DecodeError> {
    let copied = copy_checking(stored, expected, out, checked);
    match &copied {
        Ok(size) => checked.complete(*size),
        Err(_) => checked.fail(),
    }
    copied
}

fn copy_checking<R: Read>(
    mut stored: R,
    expected: &Digests,
    out: &mut dyn io::Write,
    checked: &Checked,
) -> Result<u64, DecodeError> {
    let mut tally = Tally::default();
    let mut blocks = block_check(expected);
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
        if let Some(blocks) = &mut blocks {
            let before = blocks.checked();
            blocks.update(&buffer[..n]);
            if let Some(failure) = blocks.failure() {
                return Err(DecodeError::StoredMismatch(failure.to_string()));
            }
            if blocks.checked() > before {
                out.flush().map_err(DecodeError::Consumer)?;
                checked.advance(blocks.checked());
            }
        }
        if checked.is_abandoned() {
            return Err(DecodeError::Consumer(io::Error::other(
                "what reads the object stopped",
            )));
        }
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
        self.0.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Recipients;
    use crate::pipeline::{EncodeOptions, ObjectWriter};
    use crate::storage::PartStream;
    use std::io::Write;

    /// Runs the encode side into memory, returning the stored bytes and digests.
    fn encode(raw: &[u8]) -> (Vec<u8>, Digests) {
        encode_to(raw, None)
    }

    fn encode_to(raw: &[u8], recipients: Option<Recipients>) -> (Vec<u8>, Digests) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (sender, mut stream) = PartStream::channel(1024);
        let mut writer = ObjectWriter::new(
            &EncodeOptions {
                level: 3,
                threads: 2,
                recipients,
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
        decode(&stored[..], &digests, None, |r| r.read_to_end(&mut out)).unwrap();
        assert_eq!(out, raw);
    }

    #[test]
    fn a_flipped_stored_byte_is_a_stored_mismatch() {
        let (mut stored, digests) = encode(&sample());
        let middle = stored.len() / 2;
        stored[middle] ^= 0x01;
        let err = decode(&stored[..], &digests, None, |r| {
            io::copy(r, &mut io::sink())
        })
        .unwrap_err();
        assert!(matches!(err, DecodeError::StoredMismatch(_)), "{err}");
    }

    #[test]
    fn trailing_garbage_is_a_stored_mismatch() {
        let (mut stored, digests) = encode(b"hello");
        stored.extend_from_slice(b"junk");
        let err = decode(&stored[..], &digests, None, |r| {
            io::copy(r, &mut io::sink())
        })
        .unwrap_err();
        assert!(matches!(err, DecodeError::StoredMismatch(_)), "{err}");
    }

    #[test]
    fn copy_stored_checks_the_stored_digest() {
        let (mut stored, digests) = encode(&sample());
        let mut copy = Vec::new();
        assert_eq!(
            copy_stored(&stored[..], &digests, &mut copy, &Checked::default()).unwrap(),
            digests.size
        );
        assert_eq!(copy, stored);
        stored[10] ^= 0x80;
        let err =
            copy_stored(&stored[..], &digests, &mut Vec::new(), &Checked::default()).unwrap_err();
        assert!(matches!(err, DecodeError::StoredMismatch(_)), "{err}");
    }

    #[test]
    fn a_wrong_raw_digest_is_a_raw_mismatch() {
        let (stored, mut digests) = encode(b"hello");
        digests.raw_sha256 = "0".repeat(64);
        let err = decode(&stored[..], &digests, None, |r| {
            io::copy(r, &mut io::sink())
        })
        .unwrap_err();
        assert!(matches!(err, DecodeError::RawMismatch(_)), "{err}");
    }

    fn identity_and_recipients() -> (Vec<Identity>, Recipients) {
        let identity = age::x25519::Identity::generate();
        let recipients = Recipients::parse(&[identity.to_public().to_string()]).unwrap();
        (vec![Box::new(identity) as Identity], recipients)
    }

    #[test]
    fn an_encrypted_object_is_age_over_zstd_and_only_its_identity_reads_it() {
        let raw = sample();
        let (identities, recipients) = identity_and_recipients();
        let (stored, digests) = encode_to(&raw, Some(recipients));
        assert!(crate::keys::is_age(&stored));
        assert!(zstd::decode_all(&stored[..]).is_err(), "zstd alone read it");
        let mut tally = Tally::default();
        tally.update(&stored);
        assert_eq!((digests.size, digests.sha256.clone()), tally.finish());

        let mut out = Vec::new();
        decode(&stored[..], &digests, Some(&identities), |r| {
            r.read_to_end(&mut out)
        })
        .unwrap();
        assert_eq!(out, raw);

        let (strangers, _) = identity_and_recipients();
        let mut called = false;
        let err = decode(&stored[..], &digests, Some(&strangers), |r| {
            called = true;
            io::copy(r, &mut io::sink())
        })
        .unwrap_err();
        assert!(
            matches!(err, DecodeError::Key(crate::keys::OpenError::NoMatchingKey)),
            "{err}"
        );
        assert!(
            !called,
            "the consumer saw bytes of an object it could not open"
        );
    }

    #[test]
    fn a_flipped_byte_of_an_encrypted_object_is_a_stored_mismatch() {
        let (identities, recipients) = identity_and_recipients();
        let (mut stored, digests) = encode_to(&sample(), Some(recipients));
        let middle = stored.len() / 2;
        stored[middle] ^= 0x01;
        let err = decode(&stored[..], &digests, Some(&identities), |r| {
            io::copy(r, &mut io::sink())
        })
        .unwrap_err();
        assert!(matches!(err, DecodeError::StoredMismatch(_)), "{err}");
    }
}
