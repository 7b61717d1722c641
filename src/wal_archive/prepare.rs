//! What `wal-push` stores: the WAL file read once, checked to be what its name says,
//! compressed, hashed and (for segments, when configured) encrypted.
//!
//! A segment streams through a few reused 256 KiB buffers: reading it whole into fresh
//! memory cost a 16 MiB segment more in page faults than compressing it, and held 16 MiB
//! for nothing. Two workers each read every other buffer and compress it as a zstd frame of
//! its own, straight from the buffer (a stream's window copies and wraps, which made it half
//! as fast); the calling thread takes the buffers back in order, checks and hashes them. The
//! frames, concatenated, decode as one stream (`zstd -d` too) and cost 0.8% in size on
//! pgbench WAL. zstd's own workers would copy each job into fresh buffers of their own,
//! which costs one segment more than the second core gains.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use bytes::Bytes;

use crate::keys::{Recipients, WalNote};
use crate::pipeline::Tally;
use crate::wal::{self, SegmentHeader, WalFile, WalFileKind};

const PIECE: usize = 256 * 1024;

pub(super) struct Prepared {
    /// The bytes to store.
    pub body: Bytes,
    pub raw_size: u64,
    pub raw_sha256: String,
    /// The segment's header, for the cluster check; None for history and backup files.
    pub header: Option<SegmentHeader>,
}

pub(super) enum Trouble {
    Read(io::Error),
    /// The file is not what its name says.
    Refused(String),
    Compress(io::Error),
}

pub(super) fn prepare(
    path: &Path,
    file: &WalFile,
    level: i32,
    recipients: Option<&Recipients>,
) -> Result<Prepared, Trouble> {
    let (compressed, raw_size, raw_sha256, header) = match file.kind {
        WalFileKind::Segment | WalFileKind::Partial => {
            let (compressed, raw_size, raw_sha256, header) = stream_segment(path, file, level)?;
            (compressed, raw_size, raw_sha256, Some(header))
        }
        WalFileKind::History | WalFileKind::BackupLabel => {
            let raw = std::fs::read(path).map_err(Trouble::Read)?;
            if file.kind == WalFileKind::History {
                wal::check_history(file.timeline, &raw).map_err(|problem| {
                    Trouble::Refused(format!("it is no timeline history: {problem}"))
                })?;
            }
            let mut tally = Tally::default();
            tally.update(&raw);
            let (raw_size, raw_sha256) = tally.finish();
            let compressed = compress_whole(&raw, level).map_err(Trouble::Compress)?;
            (compressed, raw_size, raw_sha256, None)
        }
    };
    let body = match recipients {
        None => Bytes::from(compressed),
        Some(recipients) => {
            Bytes::from(seal(&compressed, &raw_sha256, recipients).map_err(Trouble::Compress)?)
        }
    };
    Ok(Prepared {
        body,
        raw_size,
        raw_sha256,
        header,
    })
}

fn compress_whole(raw: &[u8], level: i32) -> io::Result<Vec<u8>> {
    let mut compressor = zstd::bulk::Compressor::new(level)?;
    compressor.include_checksum(true)?;
    compressor.compress(raw)
}

/// What a worker made of piece `index`: the piece and its frame, or why it could not.
struct Done {
    index: u64,
    worker: usize,
    outcome: Result<(Vec<u8>, Vec<u8>), Trouble>,
}

/// Reads, checks, compresses and hashes a segment in one pass. Two workers each read every
/// other piece and compress it; this thread takes the pieces back in order, checks and
/// hashes them, and appends their frames. A worker's failure counts where it happened: the
/// pieces before it are judged first, so the verdict does not depend on which thread ran
/// ahead.
fn stream_segment(
    path: &Path,
    file: &WalFile,
    level: i32,
) -> Result<(Vec<u8>, u64, String, SegmentHeader), Trouble> {
    let reader = std::fs::File::open(path).map_err(Trouble::Read)?;
    let stop = AtomicBool::new(false);
    let mut check = wal::SegmentCheck::new(file);
    let mut tally = Tally::default();
    let mut compressed = Vec::new();
    let collected = std::thread::scope(|scope| {
        // Every piece a worker sends holds one of its buffers, and a worker sends once more
        // at most when it fails: a send never waits.
        let (done, finished) = mpsc::sync_channel::<Done>(WORKERS * (PIECES_PER_WORKER + 1));
        let mut give_back = Vec::with_capacity(WORKERS);
        for worker in 0..WORKERS {
            let (free, buffers) = mpsc::sync_channel::<Vec<u8>>(PIECES_PER_WORKER);
            for _ in 0..PIECES_PER_WORKER {
                free.send(vec![0; PIECE])
                    .expect("the channel holds every buffer");
            }
            give_back.push(free);
            let done = done.clone();
            let (reader, stop) = (&reader, &stop);
            std::thread::Builder::new()
                .spawn_scoped(scope, move || {
                    compress_pieces(reader, stop, worker, level, &buffers, &done);
                })
                .map_err(Trouble::Compress)?;
        }
        drop(done);
        let mut waiting = BTreeMap::new();
        let mut next = 0u64;
        let outcome = 'collect: loop {
            let Ok(arrived) = finished.recv() else {
                break 'collect Err(Trouble::Compress(io::Error::other(
                    "the compressing threads stopped before the end of the file",
                )));
            };
            waiting.insert(arrived.index, (arrived.worker, arrived.outcome));
            while let Some((worker, outcome)) = waiting.remove(&next) {
                next += 1;
                let (piece, frame) = match outcome {
                    Ok(made) => made,
                    Err(trouble) => break 'collect Err(trouble),
                };
                if piece.is_empty() {
                    break 'collect Ok(());
                }
                check.feed(&piece);
                if check.settled() {
                    // Refused whatever follows (a file longer than a segment, /dev/zero
                    // linked into pg_wal): not read on.
                    let length = reader.metadata().map_or(0, |m| m.len());
                    check.stopped_at(length);
                    break 'collect Ok(());
                }
                tally.update(&piece);
                compressed.extend_from_slice(&frame);
                let last = piece.len() < PIECE;
                // A worker that stopped takes nothing back.
                let _ = give_back[worker].send(piece);
                if last {
                    break 'collect Ok(());
                }
            }
        };
        stop.store(true, Ordering::Relaxed);
        // Returning drops the channels: a worker waiting on one of them ends.
        outcome
    });
    collected?;
    let header = check.finish().map_err(Trouble::Refused)?;
    let (raw_size, raw_sha256) = tally.finish();
    Ok((compressed, raw_size, raw_sha256, header))
}

const WORKERS: usize = 2;
const PIECES_PER_WORKER: usize = 2;

/// One worker: pieces `worker`, `worker + WORKERS`, … read and compressed, each as a frame,
/// until the file ends, a piece fails, or the collector stops. Every piece it takes on is
/// answered, a panic included, so the collector never waits for a piece that cannot come.
fn compress_pieces(
    reader: &std::fs::File,
    stop: &AtomicBool,
    worker: usize,
    level: i32,
    buffers: &mpsc::Receiver<Vec<u8>>,
    done: &mpsc::SyncSender<Done>,
) {
    let mut index = worker as u64;
    let mut compressor = match compressor(level) {
        Ok(compressor) => compressor,
        Err(e) => {
            let outcome = Err(Trouble::Compress(e));
            let _ = done.send(Done {
                index,
                worker,
                outcome,
            });
            return;
        }
    };
    let mut frame = Vec::with_capacity(zstd::zstd_safe::compress_bound(PIECE));
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut piece) = buffers.recv() else {
            return;
        };
        let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            read_and_compress(reader, &mut compressor, &mut piece, &mut frame, index)
        }))
        .unwrap_or_else(|_| {
            Err(Trouble::Compress(io::Error::other(
                "a compressing thread panicked",
            )))
        });
        let (outcome, last) = match made {
            Ok(frame) => {
                let last = piece.len() < PIECE;
                (Ok((piece, frame)), last)
            }
            Err(trouble) => (Err(trouble), true),
        };
        if done
            .send(Done {
                index,
                worker,
                outcome,
            })
            .is_err()
            || last
        {
            return;
        }
        index += WORKERS as u64;
    }
}

fn compressor(level: i32) -> io::Result<zstd::bulk::Compressor<'static>> {
    let mut compressor = zstd::bulk::Compressor::new(level)?;
    // The frame checksum lets plain `zstd -d` detect damage too, without lifeboat.
    compressor.include_checksum(true)?;
    Ok(compressor)
}

/// Piece `index` read into `piece` (cut to what the file holds) and its frame.
fn read_and_compress(
    reader: &std::fs::File,
    compressor: &mut zstd::bulk::Compressor<'static>,
    piece: &mut Vec<u8>,
    frame: &mut Vec<u8>,
    index: u64,
) -> Result<Vec<u8>, Trouble> {
    piece.resize(PIECE, 0);
    let filled = fill_at(reader, piece, index * PIECE as u64).map_err(Trouble::Read)?;
    piece.truncate(filled);
    if filled == 0 {
        return Ok(Vec::new());
    }
    compressor
        .compress_to_buffer(&piece[..], frame)
        .map_err(Trouble::Compress)?;
    Ok(frame.clone())
}

/// Reads from `offset` until `buffer` is full or the file ends; how much it holds.
fn fill_at(reader: &std::fs::File, buffer: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read_at(&mut buffer[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The compressed file encrypted to `recipients`, with the note of its raw sha256 that lets
/// a host without the key tell a retry of the same file from another one.
fn seal(compressed: &[u8], raw_sha256: &str, recipients: &Recipients) -> io::Result<Vec<u8>> {
    let note = WalNote {
        raw_sha256: raw_sha256.to_string(),
        fingerprint: recipients.fingerprint(),
    };
    let mut sealed = Vec::with_capacity(compressed.len() + 1024);
    let mut writer = recipients
        .encryptor(Some(&note))?
        .wrap_output(&mut sealed)?;
    writer.write_all(compressed)?;
    writer.finish()?;
    Ok(sealed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::tests::segment_bytes;

    fn prepared(bytes: &[u8], name: &str) -> Result<Prepared, Trouble> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        prepare(&path, &WalFile::parse(name).unwrap(), 3, None)
    }

    #[test]
    fn a_segment_is_stored_as_frames_that_decode_to_it_with_its_sha256() {
        let name = "000000010000000000000006";
        let mut segment = segment_bytes(1, 6, 42, 16 << 20);
        // Bytes zstd cannot shrink in some pages, so that frames differ in size.
        let mut state = 7u64;
        for byte in &mut segment[(5 << 20) + 64..(5 << 20) + 8000] {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            *byte = (state >> 56) as u8;
        }
        let Ok(prepared) = prepared(&segment, name) else {
            panic!("a good segment is refused");
        };
        assert_eq!(prepared.raw_size, segment.len() as u64);
        let mut tally = Tally::default();
        tally.update(&segment);
        assert_eq!(prepared.raw_sha256, tally.finish().1);
        assert_eq!(prepared.header.map(|h| h.system_identifier), Some(42));
        assert_eq!(zstd::decode_all(&prepared.body[..]).unwrap(), segment);
    }

    #[test]
    fn a_file_that_cannot_be_read_fails_as_a_read_without_waiting_forever() {
        // A directory opens, and every read of it fails (EISDIR), in both workers at once.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("000000010000000000000006");
        std::fs::create_dir(&path).unwrap();
        let file = WalFile::parse("000000010000000000000006").unwrap();
        assert!(matches!(
            prepare(&path, &file, 3, None),
            Err(Trouble::Read(_))
        ));
        assert!(
            matches!(prepared(&[], "000000010000000000000006"), Err(Trouble::Refused(p)) if p.contains("0 bytes long"))
        );
    }

    #[test]
    fn a_damaged_or_overlong_segment_is_refused_as_whole_checking_refuses_it() {
        let name = "000000010000000000000006";
        let good = segment_bytes(1, 6, 42, 16 << 20);
        let mut damaged = good.clone();
        damaged[(9 << 20)..(9 << 20) + 8192].fill(0x77);
        let mut overlong = good.clone();
        overlong.extend_from_slice(&[0; 300_000]);
        for (bytes, name) in [
            (&damaged[..], name),
            (&overlong[..], name),
            (&good[..3 << 20], name),
            (&good[..10], name),
            (&overlong[..], "000000010000000000000006.partial"),
        ] {
            let file = WalFile::parse(name).unwrap();
            let whole = wal::check_segment(&file, bytes).unwrap_err();
            match prepared(bytes, name) {
                Err(Trouble::Refused(problem)) => assert_eq!(problem, whole),
                _ => panic!("{name} of {} bytes was not refused", bytes.len()),
            }
        }
    }
}
