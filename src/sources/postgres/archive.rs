//! pg_dump's custom archive format, as far as restores need it. pg_dump writing to a pipe —
//! which is how lifeboat streams it — cannot go back and record where each table's data
//! starts. Two ways around that live here:
//! - `toc_only` copies the header and table of contents alone: an archive with no data that
//!   `pg_restore --section=post-data --jobs N` reads to build indexes and constraints in
//!   parallel, while the data itself was streamed into a sequential pg_restore.
//! - `fill_data_offsets` scans a fully staged archive once and fills the offsets in, exactly
//!   where pg_dump itself would have written them, so `pg_restore --jobs N` seeks straight to
//!   each table's data instead of scanning the file for every table.
//!
//! Anything unexpected leaves the caller to fall back: pg_restore still reads the archive,
//! only slower.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

const fn version(major: u32, minor: u32) -> u32 {
    (major << 16) | (minor << 8)
}

const FORMAT_CUSTOM: u8 = 1;
const BLOCK_DATA: u8 = 1;
const BLOCK_LARGE_OBJECTS: u8 = 3;
const OFFSET_NOT_SET: u8 = 1;
const OFFSET_SET: u8 = 2;

/// Where the archive's bytes come from: a staged file, skipped over by seeking, or a stream
/// being copied, skipped over by reading (and so copying) the bytes.
trait Input: Read {
    fn skip(&mut self, bytes: u64) -> io::Result<()>;
}

impl Input for BufReader<File> {
    fn skip(&mut self, bytes: u64) -> io::Result<()> {
        self.seek_relative(bytes as i64)
    }
}

/// Reads `inner`, writing every byte read to `copy`.
struct Copying<R, W> {
    inner: R,
    copy: W,
}

impl<R: Read, W: Write> Read for Copying<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

impl<R: Read, W: Write> Input for Copying<R, W> {
    fn skip(&mut self, bytes: u64) -> io::Result<()> {
        let skipped = io::copy(&mut self.take(bytes), &mut io::sink())?;
        if skipped < bytes {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
}

struct Reader<I> {
    inner: I,
    position: u64,
    version: u32,
    int_size: usize,
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

impl<I: Input> Reader<I> {
    fn byte(&mut self) -> io::Result<u8> {
        let mut byte = [0u8];
        self.inner.read_exact(&mut byte)?;
        self.position += 1;
        Ok(byte[0])
    }

    /// pg_dump's integer: a sign byte, then `int_size` little-endian bytes.
    fn int(&mut self) -> io::Result<i64> {
        let negative = self.byte()? != 0;
        let mut value: i64 = 0;
        for shift in 0..self.int_size {
            value |= (self.byte()? as i64) << (8 * shift);
        }
        Ok(if negative { -value } else { value })
    }

    /// A length-prefixed string; a negative length is NULL.
    fn skip_string(&mut self) -> io::Result<bool> {
        let length = self.int()?;
        if length < 0 {
            return Ok(false);
        }
        self.skip(length as u64)?;
        Ok(true)
    }

    fn skip(&mut self, bytes: u64) -> io::Result<()> {
        self.inner.skip(bytes)?;
        self.position += bytes;
        Ok(())
    }

    fn new(inner: I) -> Reader<I> {
        Reader {
            inner,
            position: 0,
            version: 0,
            int_size: 4,
        }
    }
}

/// Where one TOC entry's offset field is, for the entry with this dump id.
struct OffsetField {
    dump_id: i64,
    position: u64,
}

/// Fills in the data offsets of a staged custom-format archive. Returns how many entries
/// were filled in (0 when pg_dump had already written them, or the file is not one lifeboat
/// understands).
pub fn fill_data_offsets(path: &Path) -> io::Result<usize> {
    let (fields, offset_size, blocks) = {
        let mut reader = Reader::new(BufReader::with_capacity(64 * 1024, File::open(path)?));
        let Some(offset_size) = read_header(&mut reader)? else {
            return Ok(0);
        };
        let fields = read_toc(&mut reader, offset_size)?;
        if fields.is_empty() {
            return Ok(0);
        }
        let blocks = scan_data_blocks(&mut reader)?;
        (fields, offset_size, blocks)
    };

    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut filled = 0;
    for field in &fields {
        let Some((_, block)) = blocks.iter().find(|(id, _)| *id == field.dump_id) else {
            continue;
        };
        let mut encoded = vec![OFFSET_SET];
        encoded.extend((0..offset_size).map(|i| (block >> (8 * i)) as u8));
        file.seek(SeekFrom::Start(field.position))?;
        file.write_all(&encoded)?;
        filled += 1;
    }
    // No fsync: the staged file is scratch, read back at once from the page cache.
    Ok(filled)
}

/// Copies the header and table of contents of the archive `input` to `out`, stopping where
/// the data begins. Returns false, having copied only part of it, when `input` is not a
/// custom-format archive this code knows.
pub fn toc_only(input: impl Read, out: impl Write) -> io::Result<bool> {
    let mut reader = Reader::new(Copying {
        inner: io::BufReader::with_capacity(64 * 1024, input),
        copy: io::BufWriter::new(out),
    });
    let Some(offset_size) = read_header(&mut reader)? else {
        return Ok(false);
    };
    read_toc(&mut reader, offset_size)?;
    reader.inner.copy.flush()?;
    Ok(true)
}

/// Checks the header and returns the archive's offset size, or None for an archive that is
/// not a custom-format one this code knows.
fn read_header(reader: &mut Reader<impl Input>) -> io::Result<Option<usize>> {
    let mut magic = [0u8; 5];
    reader.inner.read_exact(&mut magic)?;
    reader.position += 5;
    if &magic != b"PGDMP" {
        return Ok(None);
    }
    let (major, minor, _revision) = (reader.byte()?, reader.byte()?, reader.byte()?);
    reader.version = version(major as u32, minor as u32);
    // 1.12 (PostgreSQL 9.5) to 1.16 (PostgreSQL 17/18): the versions whose layout is known here.
    if reader.version < version(1, 12) || reader.version > version(1, 16) {
        return Ok(None);
    }
    reader.int_size = reader.byte()? as usize;
    let offset_size = reader.byte()? as usize;
    if !(1..=8).contains(&reader.int_size) || !(1..=8).contains(&offset_size) {
        return Err(corrupt("implausible integer sizes in the archive header"));
    }
    if reader.byte()? != FORMAT_CUSTOM {
        return Ok(None);
    }
    if reader.version >= version(1, 15) {
        reader.byte()?; // compression algorithm
    } else {
        reader.int()?; // compression level
    }
    for _ in 0..7 {
        reader.int()?; // creation time: sec, min, hour, mday, mon, year, isdst
    }
    reader.skip_string()?; // database name
    reader.skip_string()?; // server version
    reader.skip_string()?; // pg_dump version
    Ok(Some(offset_size))
}

/// Reads the TOC and returns the offset fields that pg_dump left unset.
fn read_toc(reader: &mut Reader<impl Input>, offset_size: usize) -> io::Result<Vec<OffsetField>> {
    let count = reader.int()?;
    if count < 0 {
        return Err(corrupt("negative TOC entry count"));
    }
    let mut fields = Vec::new();
    for _ in 0..count {
        let dump_id = reader.int()?;
        reader.int()?; // had dumper
        reader.skip_string()?; // table oid
        reader.skip_string()?; // oid
        reader.skip_string()?; // tag
        reader.skip_string()?; // desc
        reader.int()?; // section
        for _ in 0..6 {
            reader.skip_string()?; // defn, drop, copy, namespace, tablespace, table access method
        }
        if reader.version >= version(1, 16) {
            reader.int()?; // relkind
        }
        reader.skip_string()?; // owner
        reader.skip_string()?; // "with oids", always "false"
        while reader.skip_string()? {} // dependencies, ended by NULL
        let position = reader.position;
        let state = reader.byte()?;
        reader.skip(offset_size as u64)?;
        if state == OFFSET_NOT_SET {
            fields.push(OffsetField { dump_id, position });
        }
    }
    Ok(fields)
}

/// Walks the data blocks after the TOC: (dump id, position of the block).
fn scan_data_blocks(reader: &mut Reader<impl Input>) -> io::Result<Vec<(i64, u64)>> {
    let mut blocks = Vec::new();
    loop {
        let position = reader.position;
        let kind = match reader.byte() {
            Ok(kind) => kind,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(blocks),
            Err(e) => return Err(e),
        };
        let dump_id = reader.int()?;
        match kind {
            BLOCK_DATA => skip_chunks(reader)?,
            BLOCK_LARGE_OBJECTS => {
                while reader.int()? != 0 {
                    skip_chunks(reader)?;
                }
            }
            _ => return Err(corrupt("unknown data block type")),
        }
        blocks.push((dump_id, position));
    }
}

fn skip_chunks(reader: &mut Reader<impl Input>) -> io::Result<()> {
    loop {
        let length = reader.int()?;
        if length == 0 {
            return Ok(());
        }
        if length < 0 {
            return Err(corrupt("negative data chunk length"));
        }
        reader.skip(length as u64)?;
    }
}
