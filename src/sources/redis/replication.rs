//! Reads a Redis server's RDB over a replication connection, as `redis-cli --rdb` does:
//! AUTH, `REPLCONF capa eof` (so a diskless server may send its `EOF:<mark>` form),
//! `REPLCONF rdb-only 1` (the server closes after the RDB instead of streaming commands),
//! `SYNC`, then the payload — `$<length>` followed by that many bytes, or `$EOF:<40-byte mark>`
//! followed by the bytes and the mark again. Nothing is needed on the Redis host's disk.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::rdb::RdbCheck;

const MARK_LEN: usize = 40;
/// While it prepares the RDB the server sends a newline every second; this long without a
/// byte means it is gone.
const SILENCE: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_CHUNK: usize = 256 * 1024;

/// How the server framed the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadForm {
    /// `$<length>`: the server wrote the RDB to its disk first.
    Sized,
    /// `$EOF:<mark>`: diskless replication, streamed as it is produced.
    Delimited,
}

#[derive(Debug)]
pub struct Synced {
    pub size: u64,
    pub form: PayloadForm,
    pub rdb_version: u32,
    /// When the server began writing the RDB (its `ctime` field), by the server's clock.
    pub saved_at: Option<i64>,
}

/// Why a sync failed, in the terms the caller words its error with.
#[derive(Debug)]
pub enum SyncError {
    Connect(io::Error),
    /// AUTH was refused: wrong password or user.
    Auth(String),
    /// The server refused SYNC (managed services, ACLs without the permission).
    Refused(String),
    /// A replica refused SYNC because its own link to its primary is down: what it holds
    /// may be stale, and no other way of reading it would make it fresh.
    CutOff(String),
    /// The connection failed or closed before the payload was whole.
    Stream(String),
    /// The payload arrived but does not hold together as an RDB.
    Invalid(String),
    /// Writing the payload out failed (a repository stopped).
    Output(io::Error),
}

impl std::fmt::Display for SyncError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyncError::Connect(e) => write!(f, "cannot connect: {e}"),
            SyncError::Auth(reply) => write!(f, "AUTH was refused: {reply}"),
            SyncError::Refused(reply) => write!(f, "SYNC was refused: {reply}"),
            SyncError::CutOff(reply) => write!(
                f,
                "the server is a replica cut off from its primary, so its data may be stale: {reply}"
            ),
            SyncError::Stream(why) => write!(f, "{why}"),
            SyncError::Invalid(why) => write!(f, "the RDB payload is not valid: {why}"),
            SyncError::Output(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for SyncError {}

fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn read_line(reader: &mut impl BufRead) -> Result<String, SyncError> {
    let mut line = Vec::new();
    let read = reader
        .read_until(b'\n', &mut line)
        .map_err(|e| SyncError::Stream(format!("reading the server's reply failed: {e}")))?;
    if read == 0 {
        return Err(SyncError::Stream(
            "the server closed the connection before it replied".into(),
        ));
    }
    Ok(String::from_utf8_lossy(&line)
        .trim_end_matches(['\r', '\n'])
        .to_string())
}

/// Streams the server's RDB into `out`, checked; `auth` is (user, password).
pub fn sync_rdb(
    host: &str,
    port: u16,
    auth: Option<(Option<&str>, &str)>,
    out: &mut dyn Write,
) -> Result<Synced, SyncError> {
    let address = (host, port)
        .to_socket_addrs()
        .map_err(SyncError::Connect)?
        .next()
        .ok_or_else(|| SyncError::Connect(io::Error::new(io::ErrorKind::NotFound, "no address")))?;
    let stream =
        TcpStream::connect_timeout(&address, CONNECT_TIMEOUT).map_err(SyncError::Connect)?;
    stream
        .set_read_timeout(Some(SILENCE))
        .map_err(SyncError::Connect)?;
    let mut writer = stream.try_clone().map_err(SyncError::Connect)?;
    let mut reader = BufReader::with_capacity(READ_CHUNK, stream);
    let mut send = |args: &[&[u8]]| {
        writer
            .write_all(&command(args))
            .map_err(|e| SyncError::Stream(format!("sending to the server failed: {e}")))
    };

    if let Some((user, password)) = auth {
        match user {
            Some(user) => send(&[b"AUTH", user.as_bytes(), password.as_bytes()])?,
            None => send(&[b"AUTH", password.as_bytes()])?,
        }
        let reply = read_line(&mut reader)?;
        if !reply.starts_with('+') {
            return Err(SyncError::Auth(reply.trim_start_matches('-').to_string()));
        }
    }
    send(&[b"REPLCONF", b"capa", b"eof"])?;
    let reply = read_line(&mut reader)?;
    if reply.starts_with("-NOAUTH") || reply.starts_with("-NOPERM") {
        return Err(SyncError::Refused(
            reply.trim_start_matches('-').to_string(),
        ));
    }
    // Older servers do not know rdb-only; they then stream commands after the RDB, which
    // the payload framing tells apart.
    send(&[b"REPLCONF", b"rdb-only", b"1"])?;
    read_line(&mut reader)?;
    send(&[b"SYNC"])?;

    // Newlines keep the connection alive while the server prepares the RDB.
    let header = loop {
        let line = read_line(&mut reader)?;
        if !line.is_empty() {
            break line;
        }
    };
    if let Some(reply) = header.strip_prefix('-') {
        if reply.starts_with("NOMASTERLINK") {
            return Err(SyncError::CutOff(reply.to_string()));
        }
        return Err(SyncError::Refused(reply.to_string()));
    }
    let Some(header) = header.strip_prefix('$') else {
        return Err(SyncError::Stream(format!(
            "the server answered SYNC with '{header}' instead of a payload header"
        )));
    };
    let mut check = RdbCheck::default();
    let (size, form) = if let Some(mark) = header.strip_prefix("EOF:") {
        let mark: [u8; MARK_LEN] = mark.as_bytes().try_into().map_err(|_| {
            SyncError::Stream(format!("the EOF mark '{mark}' is not {MARK_LEN} bytes"))
        })?;
        (
            copy_delimited(&mut reader, &mark, &mut check, out)?,
            PayloadForm::Delimited,
        )
    } else {
        let length: u64 = header.parse().map_err(|_| {
            SyncError::Stream(format!("the payload header '${header}' has no length"))
        })?;
        copy_sized(&mut reader, length, &mut check, out)?;
        (length, PayloadForm::Sized)
    };
    let saved_at = check.saved_at();
    let rdb_version = check.finish().map_err(SyncError::Invalid)?;
    Ok(Synced {
        size,
        form,
        rdb_version,
        saved_at,
    })
}

fn read_some(reader: &mut impl Read, buf: &mut [u8], received: u64) -> Result<usize, SyncError> {
    loop {
        match reader.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(SyncError::Stream(format!(
                    "no byte of the payload arrived for {} s after {received} bytes: the server stopped sending",
                    SILENCE.as_secs()
                )));
            }
            Err(e) => {
                return Err(SyncError::Stream(format!(
                    "the connection failed after {received} bytes of the payload: {e}"
                )));
            }
        }
    }
}

fn copy_sized(
    reader: &mut impl Read,
    length: u64,
    check: &mut RdbCheck,
    out: &mut dyn Write,
) -> Result<(), SyncError> {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut received = 0u64;
    while received < length {
        let want = (length - received).min(buf.len() as u64) as usize;
        let n = read_some(reader, &mut buf[..want], received)?;
        if n == 0 {
            return Err(SyncError::Stream(format!(
                "the server closed the connection after {received} of {length} bytes of the payload"
            )));
        }
        check.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(SyncError::Output)?;
        received += n as u64;
    }
    Ok(())
}

/// Copies until the mark; the last `MARK_LEN - 1` bytes are held back until it is clear
/// they are not the start of it.
fn copy_delimited(
    reader: &mut impl Read,
    mark: &[u8; MARK_LEN],
    check: &mut RdbCheck,
    out: &mut dyn Write,
) -> Result<u64, SyncError> {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut window: Vec<u8> = Vec::with_capacity(READ_CHUNK + MARK_LEN);
    let mut written = 0u64;
    let finder = memchr::memmem::Finder::new(mark);
    loop {
        let n = read_some(reader, &mut buf, written + window.len() as u64)?;
        if n == 0 {
            return Err(SyncError::Stream(format!(
                "the server closed the connection after {} bytes of the payload, before its end mark",
                written + window.len() as u64
            )));
        }
        window.extend_from_slice(&buf[..n]);
        if let Some(at) = finder.find(&window) {
            check.update(&window[..at]);
            out.write_all(&window[..at]).map_err(SyncError::Output)?;
            return Ok(written + at as u64);
        }
        let keep = (MARK_LEN - 1).min(window.len());
        let ready = window.len() - keep;
        check.update(&window[..ready]);
        out.write_all(&window[..ready]).map_err(SyncError::Output)?;
        written += ready as u64;
        window.drain(..ready);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_split_across_reads_ends_the_payload_exactly() {
        let mark = [b'a'; MARK_LEN];
        let mut payload = b"REDIS0010".to_vec();
        payload.extend(std::iter::repeat_n(7u8, 1000));
        let mut stream = payload.clone();
        stream.extend_from_slice(&mark);
        stream.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
        // A reader that hands out 13 bytes at a time, so the mark straddles reads.
        struct Trickle(std::io::Cursor<Vec<u8>>);
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(13);
                self.0.read(&mut buf[..n])
            }
        }
        let mut out = Vec::new();
        let mut check = RdbCheck::default();
        let size = copy_delimited(
            &mut Trickle(std::io::Cursor::new(stream)),
            &mark,
            &mut check,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, payload);
        assert_eq!(size, payload.len() as u64);
    }

    #[test]
    fn a_payload_without_its_end_is_an_error() {
        let mark = [b'b'; MARK_LEN];
        let mut out = Vec::new();
        let err = copy_delimited(
            &mut std::io::Cursor::new(b"REDIS0010 and then nothing".to_vec()),
            &mark,
            &mut RdbCheck::default(),
            &mut out,
        )
        .unwrap_err();
        assert!(err.to_string().contains("before its end mark"), "{err}");
        let err = copy_sized(
            &mut std::io::Cursor::new(vec![1u8; 10]),
            100,
            &mut RdbCheck::default(),
            &mut out,
        )
        .unwrap_err();
        assert!(err.to_string().contains("after 10 of 100 bytes"), "{err}");
    }
}
