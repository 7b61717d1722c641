//! Backup direction: a `Write` that the source writes its raw bytes into.

use std::io::{self, Write};

use bytes::BytesMut;

use super::{BlockHasher, CHUNK_SIZE, Digests, Tally};
use crate::keys::Recipients;
use crate::storage::PartSender;

#[derive(Debug, Clone)]
pub struct EncodeOptions {
    pub level: i32,
    pub threads: u32,
    /// Encrypt the compressed stream to these recipients (age), or store it as it is.
    pub recipients: Option<Recipients>,
}

/// Compresses and checksums everything written into it and sends the stored bytes to every
/// repository's channel. A repository that stops receiving (its store failed) drops out and
/// the others go on; writing fails only when none is left. Call [`ObjectWriter::finish`];
/// dropping it instead abandons the uploads, which the stores then abort.
pub struct ObjectWriter {
    mode: Mode,
}

enum Mode {
    /// Raw bytes in: compressed here.
    Encode {
        encoder: zstd::stream::write::Encoder<'static, Sealed>,
        raw: Tally,
    },
    /// A zstd stream in (compressed by the source): stored as it comes, and decoded on
    /// another thread for the raw digests.
    Store { sink: Sealed, decoder: RawDecoder },
}

/// The compressed stream on its way to the stores: as it is, or encrypted with age.
enum Sealed {
    Plain(StoredSink),
    Age(BackgroundSeal),
}

impl Sealed {
    fn new(sink: StoredSink, recipients: Option<&Recipients>) -> io::Result<Sealed> {
        Ok(match recipients {
            None => Sealed::Plain(sink),
            Some(recipients) => {
                Sealed::Age(BackgroundSeal::start(sink, recipients.encryptor(None)?))
            }
        })
    }

    fn finish(self) -> io::Result<StoredSink> {
        match self {
            Sealed::Plain(sink) => Ok(sink),
            Sealed::Age(seal) => seal.finish(),
        }
    }
}

impl Write for Sealed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sealed::Plain(sink) => sink.write(buf),
            Sealed::Age(seal) => seal.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// age encryption (and the stored checksum, and the hand-off to the stores) on a thread of
/// its own, fed batches of the compressed stream: it overlaps compression instead of adding
/// to the thread that drives it.
struct BackgroundSeal {
    pending: Vec<u8>,
    sender: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    worker: Option<std::thread::JoinHandle<io::Result<StoredSink>>>,
}

impl BackgroundSeal {
    fn start(sink: StoredSink, encryptor: age::Encryptor) -> BackgroundSeal {
        let (sender, batches) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let worker = std::thread::spawn(move || {
            let mut writer = encryptor.wrap_output(sink)?;
            for batch in batches {
                writer.write_all(&batch)?;
            }
            writer.finish()
        });
        BackgroundSeal {
            pending: Vec::with_capacity(CHUNK_SIZE),
            sender: Some(sender),
            worker: Some(worker),
        }
    }

    fn send_pending(&mut self) -> io::Result<()> {
        let batch = std::mem::replace(&mut self.pending, Vec::with_capacity(CHUNK_SIZE));
        let sender = self.sender.as_ref().ok_or_else(every_repository_gone)?;
        if sender.send(batch).is_err() {
            // The worker stopped: its own error says why.
            self.sender = None;
            return Err(self.join().err().unwrap_or_else(every_repository_gone));
        }
        Ok(())
    }

    fn join(&mut self) -> io::Result<StoredSink> {
        let worker = self.worker.take().ok_or_else(every_repository_gone)?;
        worker
            .join()
            .map_err(|_| io::Error::other("the encrypting thread panicked"))?
    }

    fn finish(mut self) -> io::Result<StoredSink> {
        if !self.pending.is_empty() {
            self.send_pending()?;
        }
        self.sender = None;
        self.join()
    }
}

impl Write for BackgroundSeal {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        if self.pending.len() >= CHUNK_SIZE {
            self.send_pending()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The input each zstd worker compresses at a time. zstd's own choice (four windows: 8 MiB
/// at level 3) makes multi-threaded compression hold about 40 MiB of input in its round
/// buffer; with 2 MiB jobs a 650 MB logical backup peaked at 146 MiB RSS instead of 194 (one
/// S3 region), as fast, and stored 0.2% smaller.
pub const ZSTD_JOB_SIZE: u32 = 2 << 20;

impl ObjectWriter {
    pub fn new(options: &EncodeOptions, senders: Vec<PartSender>) -> io::Result<ObjectWriter> {
        let sink = Sealed::new(StoredSink::new(senders), options.recipients.as_ref())?;
        let mut encoder = zstd::stream::write::Encoder::new(sink, options.level)?;
        // The frame checksum lets plain `zstd -d` detect damage too, without lifeboat.
        encoder.include_checksum(true)?;
        if options.threads > 1 {
            encoder.multithread(options.threads)?;
            encoder.set_parameter(zstd::zstd_safe::CParameter::JobSize(ZSTD_JOB_SIZE))?;
        }
        Ok(ObjectWriter {
            mode: Mode::Encode {
                encoder,
                raw: Tally::default(),
            },
        })
    }

    /// For a source whose output already is a zstd stream. Its raw bytes, decoded on the
    /// way, also go to `inspect` (which reads what the source itself says, e.g. a tar's
    /// headers). A stream that does not decode fails the object at `finish`.
    pub fn precompressed(
        senders: Vec<PartSender>,
        recipients: Option<&Recipients>,
        inspect: Box<dyn Write + Send>,
    ) -> io::Result<ObjectWriter> {
        Ok(ObjectWriter {
            mode: Mode::Store {
                sink: Sealed::new(StoredSink::new(senders), recipients)?,
                decoder: RawDecoder::start(inspect),
            },
        })
    }

    /// Ends the zstd frame, sends the last chunk and the end marker, and returns the digests.
    pub fn finish(self) -> io::Result<Digests> {
        let (mut sink, (raw_size, raw_sha256)) = match self.mode {
            Mode::Encode { encoder, raw } => (encoder.finish()?.finish()?, raw.finish()),
            Mode::Store { sink, decoder } => {
                let raw = decoder.finish()?;
                (sink.finish()?, raw)
            }
        };
        sink.send_pending()?;
        // A store that stops now reports it through its own upload's result.
        for sender in sink.senders.into_iter().flatten() {
            let _ = sender.blocking_finish();
        }
        let (size, sha256) = sink.tally.finish();
        Ok(Digests {
            size,
            sha256,
            raw_size,
            raw_sha256,
            block_digests: sink.blocks.finish(),
        })
    }
}

impl Write for ObjectWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.mode {
            Mode::Encode { encoder, raw } => {
                let written = encoder.write(buf)?;
                raw.update(&buf[..written]);
                Ok(written)
            }
            Mode::Store { sink, decoder } => {
                decoder.feed(buf);
                sink.write_all(buf)?;
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        // Flushing would end a zstd block early and cost ratio; the stream is flushed by
        // `finish`.
        Ok(())
    }
}

/// Decodes a zstd stream fed in batches on its own thread: raw sha256 and size, and the
/// raw bytes handed to an inspector.
struct RawDecoder {
    pending: Vec<u8>,
    sender: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    worker: std::thread::JoinHandle<io::Result<(u64, String)>>,
}

const DECODE_BATCH: usize = 1024 * 1024;

/// The batches a `RawDecoder` is fed, as a `Read`.
struct Batches {
    receiver: std::sync::mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    offset: usize,
}

impl io::Read for Batches {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.offset == self.current.len() {
            match self.receiver.recv() {
                Ok(batch) => {
                    self.current = batch;
                    self.offset = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.offset);
        buf[..n].copy_from_slice(&self.current[self.offset..self.offset + n]);
        self.offset += n;
        Ok(n)
    }
}

/// Counts, hashes and inspects decoded bytes.
struct RawTally {
    tally: Tally,
    inspect: Box<dyn Write + Send>,
}

impl Write for RawTally {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tally.update(buf);
        self.inspect.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl RawDecoder {
    fn start(inspect: Box<dyn Write + Send>) -> RawDecoder {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
        let worker = std::thread::spawn(move || {
            let batches = Batches {
                receiver,
                current: Vec::new(),
                offset: 0,
            };
            let mut raw = RawTally {
                tally: Tally::default(),
                inspect,
            };
            let decoded = zstd::stream::copy_decode(batches, &mut raw).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the source's zstd stream does not decode: {e}"),
                )
            });
            decoded.map(|()| raw.tally.finish())
        });
        RawDecoder {
            pending: Vec::with_capacity(DECODE_BATCH),
            sender: Some(sender),
            worker,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
        if self.pending.len() >= DECODE_BATCH {
            let batch = std::mem::replace(&mut self.pending, Vec::with_capacity(DECODE_BATCH));
            // A decoder that stopped has failed; `finish` reports why.
            if let Some(sender) = &self.sender
                && sender.send(batch).is_err()
            {
                self.sender = None;
            }
        }
    }

    fn finish(mut self) -> io::Result<(u64, String)> {
        // Taking the sender drops it: the decoder sees the end of the stream.
        if let Some(sender) = self.sender.take()
            && !self.pending.is_empty()
        {
            let _ = sender.send(std::mem::take(&mut self.pending));
        }
        self.worker
            .join()
            .map_err(|_| io::Error::other("the decoding thread panicked"))?
    }
}

struct StoredSink {
    tally: Tally,
    blocks: Box<BlockHasher>,
    pending: BytesMut,
    /// One per repository, None once that repository stopped receiving.
    senders: Vec<Option<PartSender>>,
}

fn every_repository_gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "every repository stopped receiving the upload",
    )
}

impl StoredSink {
    fn new(senders: Vec<PartSender>) -> StoredSink {
        StoredSink {
            tally: Tally::default(),
            blocks: Box::default(),
            pending: BytesMut::with_capacity(CHUNK_SIZE),
            senders: senders.into_iter().map(Some).collect(),
        }
    }

    fn send_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let chunk = self.pending.split().freeze();
        for slot in &mut self.senders {
            if let Some(sender) = slot
                && sender.blocking_send(chunk.clone()).is_err()
            {
                *slot = None;
            }
        }
        if self.senders.iter().all(Option::is_none) {
            return Err(every_repository_gone());
        }
        Ok(())
    }
}

impl Write for StoredSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tally.update(buf);
        self.blocks.update(buf);
        // Chunks are cut at exactly CHUNK_SIZE: one allocation each, never grown by a copy.
        let mut rest = buf;
        while !rest.is_empty() {
            let room = CHUNK_SIZE - self.pending.len();
            let (now, later) = rest.split_at(room.min(rest.len()));
            self.pending.extend_from_slice(now);
            rest = later;
            if self.pending.len() == CHUNK_SIZE {
                self.send_pending()?;
                self.pending.reserve(CHUNK_SIZE);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::PartStream;

    fn incompressible(len: usize) -> Vec<u8> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    #[test]
    fn a_repository_that_stops_receiving_drops_out_and_the_others_go_on() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (kept_sender, mut kept) = PartStream::channel(1024);
        let (lost_sender, lost) = PartStream::channel(1024);
        let options = EncodeOptions {
            level: 1,
            threads: 1,
            recipients: None,
        };
        let mut writer = ObjectWriter::new(&options, vec![kept_sender, lost_sender]).unwrap();
        drop(lost);
        let raw = incompressible(4 * CHUNK_SIZE);
        writer.write_all(&raw).unwrap();
        let digests = writer.finish().unwrap();
        let received = runtime.block_on(async {
            let mut received = 0u64;
            while let Some(chunk) = kept.next("k").await.unwrap() {
                received += chunk.len() as u64;
            }
            received
        });
        assert_eq!(received, digests.size);
        assert_eq!(digests.raw_size, raw.len() as u64);
    }

    /// Collects what it is given, for a test to read after the writer is gone.
    #[derive(Clone, Default)]
    struct Seen(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Seen {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn drain(mut stream: PartStream) -> Vec<u8> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut received = Vec::new();
            while let Some(chunk) = stream.next("k").await.unwrap() {
                received.extend_from_slice(&chunk);
            }
            received
        })
    }

    #[test]
    fn a_precompressed_stream_is_stored_as_it_comes_with_the_digests_of_what_it_decodes_to() {
        let raw: Vec<u8> = incompressible(3 * CHUNK_SIZE)
            .into_iter()
            .chain(std::iter::repeat_n(7u8, 5 * CHUNK_SIZE))
            .collect();
        let compressed = zstd::encode_all(&raw[..], 3).unwrap();
        let (sender, stream) = PartStream::channel(1024);
        let seen = Seen::default();
        let mut writer =
            ObjectWriter::precompressed(vec![sender], None, Box::new(seen.clone())).unwrap();
        for piece in compressed.chunks(100_000) {
            writer.write_all(piece).unwrap();
        }
        let digests = writer.finish().unwrap();
        assert_eq!(drain(stream), compressed);
        assert_eq!(*seen.0.lock().unwrap(), raw);
        let mut raw_tally = Tally::default();
        raw_tally.update(&raw);
        let mut stored_tally = Tally::default();
        stored_tally.update(&compressed);
        assert_eq!((digests.raw_size, digests.raw_sha256), raw_tally.finish());
        assert_eq!((digests.size, digests.sha256), stored_tally.finish());
    }

    #[test]
    fn a_precompressed_stream_that_does_not_decode_fails_the_object() {
        let mut compressed = zstd::encode_all(&incompressible(CHUNK_SIZE)[..], 3).unwrap();
        let middle = compressed.len() / 2;
        compressed.truncate(middle);
        let (sender, _stream) = PartStream::channel(1024);
        let mut writer =
            ObjectWriter::precompressed(vec![sender], None, Box::new(io::sink())).unwrap();
        writer.write_all(&compressed).unwrap();
        let err = writer.finish().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[test]
    fn writing_fails_once_no_repository_is_left() {
        let (sender, stream) = PartStream::channel(1024);
        let options = EncodeOptions {
            level: 1,
            threads: 1,
            recipients: None,
        };
        let mut writer = ObjectWriter::new(&options, vec![sender]).unwrap();
        drop(stream);
        let err = writer
            .write_all(&incompressible(4 * CHUNK_SIZE))
            .and_then(|()| writer.finish().map(|_| ()))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
