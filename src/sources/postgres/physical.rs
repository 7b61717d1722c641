//! What a physical backup asks of the server: that it is set up for base backups and WAL
//! archiving (refused clearly, naming the setting, when it is not), the pg_basebackup
//! command, and what the tar stream itself says about the backup — its `backup_label`
//! (start position and timeline) and its `backup_manifest` (the WAL range to replay).

use std::io::{self, Write};
use std::process::Command;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use super::{Binaries, ChildAuth, Connection, query_error};
use crate::error::{Error, ErrorKind, Result};
use crate::wal::Lsn;

/// The cluster a physical backup is taken of.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    pub version: String,
    pub major: u32,
    pub system_identifier: String,
    pub wal_segment_size: u64,
    pub archive_command: String,
}

fn not_ready(connection: &Connection, problem: String, fix: &str) -> Error {
    Error::new(
        ErrorKind::Source,
        format!(
            "unable to take a physical backup of {}: {problem}",
            connection.describe()
        ),
    )
    .with_hint(fix.to_string())
}

/// Reads what a physical backup needs to know and refuses a cluster that is not set up for
/// one: `wal_level`, `archive_mode`, replication permission, WAL senders, tablespaces.
pub async fn preflight(connection: &Connection, job: &str) -> Result<ClusterInfo> {
    let client = connection.connect().await?;
    let row = client
        .query_one(
            "select current_setting('server_version'), current_setting('server_version_num')::int, \
                    current_setting('wal_level'), current_setting('archive_mode'), \
                    current_setting('archive_command'), current_setting('max_wal_senders')::int, \
                    (select setting::bigint from pg_settings where name = 'wal_segment_size'), \
                    (select rolreplication or rolsuper from pg_roles where rolname = current_user), \
                    (select count(*) from pg_tablespace where spcname not in ('pg_default', 'pg_global'))::int, \
                    pg_is_in_recovery()",
            &[],
        )
        .await
        .map_err(|e| query_error(connection, "read the archiving settings", e))?;
    let version: String = row.get(0);
    let version_num: i32 = row.get(1);
    let wal_level: String = row.get(2);
    let archive_mode: String = row.get(3);
    let archive_command: String = row.get(4);
    let max_wal_senders: i32 = row.get(5);
    let wal_segment_size: i64 = row.get(6);
    let can_replicate: bool = row.get::<_, Option<bool>>(7).unwrap_or(false);
    let tablespaces: i32 = row.get(8);
    let in_recovery: bool = row.get(9);

    let archive_fix = format!(
        "set archive_mode = on and archive_command = 'lifeboat --config /etc/lifeboat/lifeboat.toml wal-push --job {job} %p' in postgresql.conf, then restart PostgreSQL"
    );
    if wal_level == "minimal" {
        return Err(not_ready(
            connection,
            "wal_level is 'minimal', which keeps too little WAL to restore from".into(),
            "set wal_level = replica in postgresql.conf, then restart PostgreSQL",
        ));
    }
    if archive_mode == "off" {
        return Err(not_ready(
            connection,
            "archive_mode is off, so no WAL reaches the archive and the backup could not be brought to a consistent state".into(),
            &archive_fix,
        ));
    }
    if in_recovery && archive_mode != "always" {
        return Err(not_ready(
            connection,
            "the server is a standby with archive_mode = on, which archives nothing until it is promoted".into(),
            "back up the primary, or set archive_mode = always on this standby",
        ));
    }
    if archive_command.trim().is_empty() {
        return Err(not_ready(
            connection,
            "archive_command is empty, so WAL piles up in pg_wal and never reaches the archive"
                .into(),
            &archive_fix,
        ));
    }
    if !can_replicate {
        return Err(not_ready(
            connection,
            format!(
                "the role '{}' may not open replication connections",
                connection.user()
            ),
            &format!(
                "run `ALTER ROLE {} REPLICATION` and allow it in pg_hba.conf (a line for the database `replication`)",
                connection.user()
            ),
        ));
    }
    if max_wal_senders < 1 {
        return Err(not_ready(
            connection,
            "max_wal_senders is 0, so pg_basebackup cannot connect".into(),
            "set max_wal_senders = 10 in postgresql.conf, then restart PostgreSQL",
        ));
    }
    if tablespaces > 0 {
        return Err(not_ready(
            connection,
            format!(
                "it has {tablespaces} tablespace(s) besides pg_default, and a streamed base backup holds one tar"
            ),
            "move the tablespaces' tables into pg_default, or back up this cluster with mode = \"logical\"",
        ));
    }
    if !archive_command.contains("wal-push") {
        tracing::warn!(archive_command = %archive_command, "archive_command does not look like `lifeboat wal-push`; the backup fails unless its WAL reaches the job's archive");
    }
    let system_identifier = client
        .query_one(
            "select system_identifier::text from pg_control_system()",
            &[],
        )
        .await
        .map_err(|e| {
            query_error(connection, "read the system identifier", e)
                .with_hint("grant the backup role pg_monitor (or use a superuser)")
        })?
        .get(0);
    Ok(ClusterInfo {
        version,
        major: (version_num / 10_000) as u32,
        system_identifier,
        wal_segment_size: wal_segment_size as u64,
        archive_command,
    })
}

/// Ends the current WAL segment so the archiver ships it; returns its name. A restore point
/// first makes sure there is WAL to end, as an idle server has none.
pub async fn switch_wal(connection: &Connection) -> Result<String> {
    let client = connection.connect().await?;
    let _ = client
        .query_one("select pg_create_restore_point('lifeboat check')", &[])
        .await;
    let row = client
        .query_one("select pg_walfile_name(pg_switch_wal())", &[])
        .await
        .map_err(|e| {
            query_error(connection, "switch to a new WAL segment", e).with_hint(format!(
                "run `GRANT EXECUTE ON FUNCTION pg_switch_wal() TO {}` (and pg_create_restore_point) as a superuser",
                connection.user()
            ))
        })?;
    Ok(row.get(0))
}

/// `pg_basebackup` writing one tar stream to stdout after a fast checkpoint. WAL is not
/// included: it comes from the archive, and pg_basebackup waits until the last segment the
/// backup needs has been archived before it ends.
///
/// With `server_zstd` (level, workers; PostgreSQL 15 and newer) the server compresses the
/// stream with zstd itself, in parallel, which is what makes a single-stream base backup as
/// fast as a tool that reads the data files directly; the tar then carries no
/// backup_manifest (it cannot be injected into a compressed stream), and the backup's stop
/// comes from its `.backup` history file in the archive instead.
pub fn basebackup_command(
    binaries: &Binaries,
    connection: &Connection,
    label: &str,
    auth: &ChildAuth,
    server_zstd: Option<(i32, u32)>,
) -> Command {
    let mut command = binaries.command("pg_basebackup");
    command.args(["--pgdata=-", "--format=tar", "--wal-method=none"]);
    if let Some((level, workers)) = server_zstd {
        let mut spec = format!("--compress=server-zstd:level={level}");
        if workers > 1 {
            spec.push_str(&format!(",workers={workers}"));
        }
        command.arg(spec).arg("--no-manifest");
    }
    command
        .arg("--checkpoint=fast")
        .arg(format!("--label={label}"))
        .arg("--no-password")
        .arg(format!("--dbname={}", connection.conninfo()))
        // Its messages are quoted in errors; keep them in one language.
        .env("LC_MESSAGES", "C");
    auth.apply(&mut command);
    command
}

const BLOCK: usize = 512;
const LABEL_LIMIT: usize = 64 * 1024;
const MANIFEST_TAIL: usize = 64 * 1024;

/// What the tar stream of a base backup said about itself.
#[derive(Debug, Default, Clone)]
pub struct TarFindings {
    pub backup_label: Option<String>,
    /// The end of `backup_manifest`, where its WAL ranges are.
    pub manifest_tail: Vec<u8>,
    /// When the manifest began to arrive: the server had stopped the backup by then.
    pub manifest_started_at: Option<DateTime<Utc>>,
    pub entries: u64,
}

/// Reads a tar stream's headers as it goes by, keeping `backup_label` and the end of
/// `backup_manifest`; the data itself is skipped.
#[derive(Debug, Default)]
pub struct TarScanner {
    header: Vec<u8>,
    /// Bytes left of the current entry's data, then of its padding.
    data_left: u64,
    padding_left: u64,
    capture: Capture,
    pub findings: TarFindings,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Capture {
    #[default]
    Nothing,
    Label,
    Manifest,
}

impl TarScanner {
    pub fn observe(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.data_left > 0 {
                let n = (self.data_left.min(data.len() as u64)) as usize;
                self.keep(&data[..n]);
                self.data_left -= n as u64;
                data = &data[n..];
                continue;
            }
            if self.padding_left > 0 {
                let n = (self.padding_left.min(data.len() as u64)) as usize;
                self.padding_left -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (BLOCK - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.header.len() == BLOCK {
                self.start_entry();
                self.header.clear();
            }
        }
    }

    fn start_entry(&mut self) {
        self.capture = Capture::Nothing;
        if self.header.iter().all(|&b| b == 0) {
            return;
        }
        let header = tar::Header::from_byte_slice(&self.header);
        let size = header.entry_size().unwrap_or(0);
        self.data_left = size;
        self.padding_left = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        self.findings.entries += 1;
        self.capture = match &*header.path_bytes() {
            b"backup_label" => Capture::Label,
            b"backup_manifest" => {
                self.findings.manifest_started_at = Some(Utc::now());
                Capture::Manifest
            }
            _ => Capture::Nothing,
        };
    }

    fn keep(&mut self, data: &[u8]) {
        match self.capture {
            Capture::Nothing => {}
            Capture::Label => {
                let label = self.findings.backup_label.get_or_insert_with(String::new);
                if label.len() < LABEL_LIMIT {
                    label.push_str(&String::from_utf8_lossy(data));
                }
            }
            Capture::Manifest => {
                let tail = &mut self.findings.manifest_tail;
                tail.extend_from_slice(data);
                if tail.len() > 2 * MANIFEST_TAIL {
                    tail.drain(..tail.len() - MANIFEST_TAIL);
                }
            }
        }
    }
}

/// A scanner shared with whoever reads its findings afterwards: a `Write` that only scans.
#[derive(Debug, Clone, Default)]
pub struct SharedScanner(pub Arc<Mutex<TarScanner>>);

impl SharedScanner {
    pub fn findings(&self) -> TarFindings {
        self.0.lock().expect("scanner lock").findings.clone()
    }
}

impl Write for SharedScanner {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("scanner lock").observe(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Passes a tar stream through to `inner` unchanged, scanning it on the way.
pub struct TarWatch<'w> {
    inner: &'w mut dyn Write,
    scanner: SharedScanner,
}

impl<'w> TarWatch<'w> {
    pub fn new(inner: &'w mut dyn Write, scanner: SharedScanner) -> TarWatch<'w> {
        TarWatch { inner, scanner }
    }
}

impl Write for TarWatch<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.scanner.write_all(&buf[..written])?;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Where a base backup starts and ends in the WAL, from its own files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRange {
    pub start_lsn: Lsn,
    pub start_timeline: u32,
    pub stop_lsn: Lsn,
    pub stop_timeline: u32,
}

impl TarFindings {
    /// Where the backup starts: from its backup_label.
    pub fn start(&self) -> std::result::Result<(Lsn, u32), String> {
        let label = self
            .backup_label
            .as_deref()
            .ok_or("the tar stream has no backup_label")?;
        parse_backup_label(label)
            .ok_or_else(|| "its backup_label has no START WAL LOCATION or START TIMELINE".into())
    }

    /// Where the backup stops, when the stream carries its backup_manifest.
    pub fn stop(&self) -> Option<std::result::Result<(Lsn, u32), String>> {
        self.manifest_started_at?;
        Some(
            parse_manifest_wal_end(&self.manifest_tail)
                .map(|(timeline, lsn)| (lsn, timeline))
                .ok_or_else(|| "its backup_manifest has no WAL-Ranges".into()),
        )
    }

    pub fn wal_range(&self) -> std::result::Result<WalRange, String> {
        let (start_lsn, start_timeline) = self.start()?;
        let (stop_lsn, stop_timeline) = self
            .stop()
            .ok_or("the tar stream has no backup_manifest")??;
        Ok(WalRange {
            start_lsn,
            start_timeline,
            stop_lsn,
            stop_timeline,
        })
    }
}

/// The name of the `.backup` history file PostgreSQL archives for a backup that started at
/// `start` on `timeline`: `SEGMENT.OFFSET.backup`.
pub fn backup_history_name(start: Lsn, timeline: u32, segment_size: u64) -> String {
    format!(
        "{}.{:08X}.backup",
        crate::wal::segment_name(
            timeline,
            crate::wal::segment_of(start, segment_size),
            segment_size
        ),
        start.0 % segment_size
    )
}

/// From a `.backup` history file: `STOP WAL LOCATION`, `STOP TIMELINE` and `STOP TIME`
/// (whole seconds, UTC).
pub fn parse_backup_history(text: &str) -> Option<(Lsn, u32, DateTime<Utc>)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
    };
    let lsn = Lsn::parse(field("STOP WAL LOCATION:")?.split_whitespace().next()?)?;
    let timeline = field("STOP TIMELINE:")?.parse().ok()?;
    let time = field("STOP TIME:")?;
    let stopped =
        chrono::NaiveDateTime::parse_from_str(time.trim_end_matches(" UTC"), "%Y-%m-%d %H:%M:%S")
            .ok()?
            .and_utc();
    time.ends_with(" UTC").then_some((lsn, timeline, stopped))
}

/// `START WAL LOCATION: 0/3000028 (file …)` and `START TIMELINE: 1`.
fn parse_backup_label(label: &str) -> Option<(Lsn, u32)> {
    let field = |name: &str| {
        label
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
    };
    let lsn = Lsn::parse(field("START WAL LOCATION:")?.split_whitespace().next()?)?;
    let timeline = field("START TIMELINE:")?.parse().ok()?;
    Some((lsn, timeline))
}

/// The last entry of `"WAL-Ranges": [ { "Timeline": 1, "Start-LSN": "0/3000028",
/// "End-LSN": "0/3000100" } ]` near the end of a backup manifest: its timeline and end.
fn parse_manifest_wal_end(tail: &[u8]) -> Option<(u32, Lsn)> {
    let text = String::from_utf8_lossy(tail);
    let ranges = &text[text.rfind("\"WAL-Ranges\"")?..];
    let pattern = regex::Regex::new(
        r#"\{\s*"Timeline":\s*(\d+),\s*"Start-LSN":\s*"([0-9A-Fa-f]+/[0-9A-Fa-f]+)",\s*"End-LSN":\s*"([0-9A-Fa-f]+/[0-9A-Fa-f]+)"\s*\}"#,
    )
    .expect("valid pattern");
    let last = pattern.captures_iter(ranges).last()?;
    Some((last[1].parse().ok()?, Lsn::parse(&last[3])?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o600);
            header.set_cksum();
            builder.append_data(&mut header, name, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    const LABEL: &str = "START WAL LOCATION: 0/3000028 (file 000000010000000000000003)\n\
        CHECKPOINT LOCATION: 0/3000060\nBACKUP METHOD: streamed\nLABEL: lifeboat-x\nSTART TIMELINE: 1\n";
    const MANIFEST: &str = "{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [],\n\
        \"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/3000028\", \"End-LSN\": \"0/3000100\" }\n],\n\
        \"Manifest-Checksum\": \"abc\"}\n";

    #[test]
    fn the_watch_passes_every_byte_and_finds_the_wal_range_in_any_chunking() {
        let big = vec![7u8; 5000];
        let stream = tar_of(&[
            ("backup_label", LABEL.as_bytes()),
            ("base/1/1234", &big),
            ("backup_manifest", MANIFEST.as_bytes()),
        ]);
        for chunk in [1, 100, 511, 512, 513, 4096, stream.len()] {
            let mut out = Vec::new();
            let scanner = SharedScanner::default();
            let mut watch = TarWatch::new(&mut out, scanner.clone());
            for piece in stream.chunks(chunk) {
                watch.write_all(piece).unwrap();
            }
            let findings = scanner.findings();
            assert_eq!(out, stream, "chunk {chunk}");
            assert_eq!(findings.entries, 3);
            assert_eq!(
                findings.wal_range().unwrap(),
                WalRange {
                    start_lsn: Lsn(0x3000028),
                    start_timeline: 1,
                    stop_lsn: Lsn(0x3000100),
                    stop_timeline: 1,
                },
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn a_stream_without_its_label_or_manifest_has_no_wal_range() {
        let mut scanner = SharedScanner::default();
        scanner.write_all(&tar_of(&[("base/1/1", b"x")])).unwrap();
        let problem = scanner.findings().wal_range().unwrap_err();
        assert!(problem.contains("backup_label"), "{problem}");

        let mut scanner = SharedScanner::default();
        scanner
            .write_all(&tar_of(&[("backup_label", LABEL.as_bytes())]))
            .unwrap();
        let findings = scanner.findings();
        assert_eq!(findings.start(), Ok((Lsn(0x3000028), 1)));
        assert!(findings.stop().is_none());
        let problem = findings.wal_range().unwrap_err();
        assert!(problem.contains("backup_manifest"), "{problem}");
    }

    #[test]
    fn a_backup_history_file_names_the_stop() {
        let mb16 = 16 * 1024 * 1024;
        assert_eq!(
            backup_history_name(Lsn(0x3000028), 1, mb16),
            "000000010000000000000003.00000028.backup"
        );
        let text = "START WAL LOCATION: 0/3000028 (file 000000010000000000000003)\n\
            STOP WAL LOCATION: 0/3000100 (file 000000010000000000000003)\n\
            CHECKPOINT LOCATION: 0/3000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\n\
            START TIME: 2026-11-26 13:29:32 UTC\nLABEL: lifeboat-X\nSTART TIMELINE: 1\n\
            STOP TIME: 2026-11-26 13:29:33 UTC\nSTOP TIMELINE: 1\n";
        let (lsn, timeline, stopped) = parse_backup_history(text).unwrap();
        assert_eq!((lsn, timeline), (Lsn(0x3000100), 1));
        assert_eq!(stopped.to_rfc3339(), "2026-11-26T13:29:33+00:00");
        assert_eq!(parse_backup_history("STOP TIMELINE: 1\n"), None);
    }

    #[test]
    fn the_last_wal_range_is_where_the_backup_ends() {
        let tail = br#""WAL-Ranges": [
{ "Timeline": 1, "Start-LSN": "0/3000028", "End-LSN": "0/4000000" },
{ "Timeline": 2, "Start-LSN": "0/4000000", "End-LSN": "0/40000D8" }
],"#;
        assert_eq!(parse_manifest_wal_end(tail), Some((2, Lsn(0x40000D8))));
        assert_eq!(parse_manifest_wal_end(b"\"Files\": []"), None);
    }
}
