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
/// repository's channel. A repository that stops receiving (its store failed) drops out and
/// the others go on; writing fails only when none is left. Call [`ObjectWriter::finish`];
/// dropping it instead abandons the uploads, which the stores then abort.
pub struct ObjectWriter {
    encoder: zstd::stream::write::Encoder<'static, StoredSink>,
    raw: Tally,
}

struct StoredSink {
    tally: Tally,
    pending: BytesMut,
    /// One per repository, None once that repository stopped receiving.
    senders: Vec<Option<PartSender>>,
}

impl ObjectWriter {
    pub fn new(options: EncodeOptions, senders: Vec<PartSender>) -> io::Result<ObjectWriter> {
        let sink = StoredSink {
            tally: Tally::default(),
            pending: BytesMut::with_capacity(CHUNK_SIZE),
            senders: senders.into_iter().map(Some).collect(),
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
        // A store that stops now reports it through its own upload's result.
        for sender in sink.senders.into_iter().flatten() {
            let _ = sender.blocking_finish();
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

fn every_repository_gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "every repository stopped receiving the upload",
    )
}

impl StoredSink {
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
        };
        let mut writer = ObjectWriter::new(options, vec![kept_sender, lost_sender]).unwrap();
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

    #[test]
    fn writing_fails_once_no_repository_is_left() {
        let (sender, stream) = PartStream::channel(1024);
        let options = EncodeOptions {
            level: 1,
            threads: 1,
        };
        let mut writer = ObjectWriter::new(options, vec![sender]).unwrap();
        drop(stream);
        let err = writer
            .write_all(&incompressible(4 * CHUNK_SIZE))
            .and_then(|()| writer.finish().map(|_| ()))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
