//! Backup direction: a `Write` that the source writes its raw bytes into.

use std::io::{self, Write};

use bytes::BytesMut;

use super::{CHUNK_SIZE, Digests, Tally};
use crate::storage::PartSender;

#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions {
    pub level: i32,
    pub threads: u32,
}

/// Compresses and checksums everything written into it and sends the stored bytes to every
/// repository's channel. Call [`ObjectWriter::finish`]; dropping it instead abandons the
/// uploads, which the stores then abort.
pub struct ObjectWriter {
    encoder: zstd::stream::write::Encoder<'static, StoredSink>,
    raw: Tally,
}

struct StoredSink {
    tally: Tally,
    pending: BytesMut,
    senders: Vec<PartSender>,
}

impl ObjectWriter {
    pub fn new(options: EncodeOptions, senders: Vec<PartSender>) -> io::Result<ObjectWriter> {
        let sink = StoredSink {
            tally: Tally::default(),
            pending: BytesMut::with_capacity(CHUNK_SIZE),
            senders,
        };
        let mut encoder = zstd::stream::write::Encoder::new(sink, options.level)?;
        // The frame checksum lets plain `zstd -d` detect damage too, without lifeboat.
        encoder.include_checksum(true)?;
        if options.threads > 1 {
            encoder.multithread(options.threads)?;
        }
        Ok(ObjectWriter {
            encoder,
            raw: Tally::default(),
        })
    }

    /// Ends the zstd frame, sends the last chunk and the end marker, and returns the digests.
    pub fn finish(self) -> io::Result<Digests> {
        let mut sink = self.encoder.finish()?;
        sink.send_pending()?;
        for sender in sink.senders {
            sender.blocking_finish().map_err(|_| repository_gone())?;
        }
        let (size, sha256) = sink.tally.finish();
        let (raw_size, raw_sha256) = self.raw.finish();
        Ok(Digests {
            size,
            sha256,
            raw_size,
            raw_sha256,
        })
    }
}

impl Write for ObjectWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.encoder.write(buf)?;
        self.raw.update(&buf[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Flushing would end a zstd block early and cost ratio; the stream is flushed by
        // `finish`.
        Ok(())
    }
}

fn repository_gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "a repository stopped receiving the upload",
    )
}

impl StoredSink {
    fn send_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let chunk = self.pending.split().freeze();
        for sender in &self.senders {
            sender
                .blocking_send(chunk.clone())
                .map_err(|_| repository_gone())?;
        }
        Ok(())
    }
}

impl Write for StoredSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tally.update(buf);
        self.pending.extend_from_slice(buf);
        if self.pending.len() >= CHUNK_SIZE {
            self.send_pending()?;
            self.pending.reserve(CHUNK_SIZE);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
