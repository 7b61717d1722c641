//! Where things live inside a repository. Identical in every repository:
//!
//! ```text
//! lifeboat.json                                repository marker
//! jobs/JOB/backups/BACKUP_ID/OBJECT            objects, written first
//! jobs/JOB/backups/BACKUP_ID/manifest.json     written last: the commit point
//! jobs/JOB/wal/TIMELINE/FILE.zst               WAL archive (segments, .history, .backup)
//! jobs/JOB/verified/BACKUP_ID.json             the last `verify` that found it intact
//! jobs/JOB/prune.json                          backups a `prune` is removing, until it ends
//! jobs/JOB/cluster.json                        the cluster whose WAL the job archives
//! jobs/JOB/archive-proof.json                  what `verify --archive` proved of the WAL
//! jobs/JOB/sample.json                         where `verify --sample` stands in its rotation
//! drills/DRILL/TIMESTAMP.json                  drill reports, kept with the backups
//! ```

use chrono::{DateTime, NaiveDateTime, Utc};

pub const MARKER_KEY: &str = "lifeboat.json";
/// The key whose request reads a repository's clock: S3 answers a HEAD of it (found or not)
/// with its time; a local repository makes and removes a temp file beside it.
pub const CLOCK_PROBE_KEY: &str = "clock-probe";
pub const MANIFEST_NAME: &str = "manifest.json";
/// The manifest's signature, when backups are signed (see `signing`).
pub const MANIFEST_SIGNATURE_NAME: &str = "manifest.json.minisig";
const ID_FORMAT: &str = "%Y%m%dT%H%M%SZ";

pub fn backups_prefix(job: &str) -> String {
    format!("jobs/{job}/backups/")
}

pub fn backup_prefix(job: &str, id: &str) -> String {
    format!("jobs/{job}/backups/{id}/")
}

/// What a backup is of, and so how it restores. The manifest keeps it as text, so that one
/// written by a later lifeboat with a kind this one does not know still lists, prunes and
/// verifies; only its restore is refused, naming the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupKind {
    Files,
    PostgresLogical,
    PostgresPhysical,
    Redis,
}

impl BackupKind {
    /// As manifests and reports name it.
    pub fn name(self) -> &'static str {
        match self {
            BackupKind::Files => "files",
            BackupKind::PostgresLogical => "postgres-logical",
            BackupKind::PostgresPhysical => "postgres-physical",
            BackupKind::Redis => "redis",
        }
    }

    pub fn parse(name: &str) -> Option<BackupKind> {
        [
            BackupKind::Files,
            BackupKind::PostgresLogical,
            BackupKind::PostgresPhysical,
            BackupKind::Redis,
        ]
        .into_iter()
        .find(|kind| kind.name() == name)
    }
}

/// A files backup's one object: the tar stream of its paths.
pub const FILES_OBJECT: &str = "files.tar.zst";
/// A physical backup's data directory, as a tar stream.
pub const BASE_OBJECT: &str = "base.tar.zst";
/// A logical PostgreSQL backup's roles and tablespaces (pg_dumpall --globals-only).
pub const GLOBALS_OBJECT: &str = "globals.sql.zst";
/// A Redis backup's one object: the RDB file.
pub const RDB_OBJECT: &str = "dump.rdb.zst";

/// `app` → `app.dump.zst`; bytes outside `[A-Za-z0-9_.-]` (and a leading '.') are
/// percent-encoded, so any database name makes a safe object name.
pub fn database_object_name(database: &str) -> String {
    let mut name = String::new();
    for (index, byte) in database.bytes().enumerate() {
        let plain = byte.is_ascii_alphanumeric()
            || byte == b'_'
            || byte == b'-'
            || (byte == b'.' && index > 0);
        if plain {
            name.push(byte as char);
        } else {
            name.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("{name}.dump.zst")
}

/// Whether the object of this logical name is a tar stream, which a restore unpacks.
pub fn holds_tar(logical_name: &str) -> bool {
    logical_name == FILES_OBJECT || logical_name == BASE_OBJECT
}

pub fn object_key(job: &str, id: &str, object: &str) -> String {
    format!("jobs/{job}/backups/{id}/{object}")
}

pub fn manifest_key(job: &str, id: &str) -> String {
    object_key(job, id, MANIFEST_NAME)
}

pub fn wal_prefix(job: &str) -> String {
    format!("jobs/{job}/wal/")
}

/// Backup objects, manifests and WAL: what Object Lock makes immutable. Records that are
/// replaced or removed as a matter of course (verify records, the prune journal, drill
/// reports) are not.
pub fn is_backup_data(key: &str) -> bool {
    let mut parts = key.split('/');
    parts.next() == Some("jobs")
        && parts.next().is_some()
        && matches!(parts.next(), Some("backups" | "wal"))
}

pub fn verified_prefix(job: &str) -> String {
    format!("jobs/{job}/verified/")
}

pub fn verified_key(job: &str, id: &str) -> String {
    format!("jobs/{job}/verified/{id}.json")
}

/// Where a run claims a backup id before it writes anything under it (see `claim`).
pub fn claims_prefix(job: &str) -> String {
    format!("jobs/{job}/claims/")
}

pub fn claim_key(job: &str, id: &str) -> String {
    format!("jobs/{job}/claims/{id}.json")
}

/// Where prune records a backup it removed, so that `replicate` never brings it back from
/// a repository that was out of reach when it went.
pub fn removed_prefix(job: &str) -> String {
    format!("jobs/{job}/removed/")
}

pub fn removed_key(job: &str, id: &str) -> String {
    format!("jobs/{job}/removed/{id}.json")
}

/// What `verify --archive` last proved of this repository's WAL archive of `job`.
pub fn archive_proof_key(job: &str) -> String {
    format!("jobs/{job}/archive-proof.json")
}

/// Where `verify --sample`'s rotation through this repository's objects of `job` stands.
pub fn sample_state_key(job: &str) -> String {
    format!("jobs/{job}/sample.json")
}

pub fn cluster_record_key(job: &str) -> String {
    format!("jobs/{job}/cluster.json")
}

/// Where each prune run keeps its journal: one key per run, so two hosts pruning at once
/// never replace or remove each other's.
pub fn prune_journals_prefix(job: &str) -> String {
    format!("jobs/{job}/prune/")
}

pub fn prune_journal_key(job: &str, run: &str) -> String {
    format!("jobs/{job}/prune/{run}.json")
}

/// The one journal of repositories written before journals were kept per run.
pub fn legacy_prune_journal_key(job: &str) -> String {
    format!("jobs/{job}/prune.json")
}

/// Where the archived WAL file `file` of `job` is kept: under its timeline, as
/// `NAME.zst`, or `NAME.zst.age` when `encrypted`.
pub fn wal_key(job: &str, file: &crate::wal::WalFile, encrypted: bool) -> String {
    let suffix = if encrypted { ".zst.age" } else { ".zst" };
    format!("jobs/{job}/wal/{:08X}/{}{suffix}", file.timeline, file.name)
}

/// Both keys the WAL file `file` may be archived under, the `encrypted` form first: a
/// file archived before encryption was turned on (or after it was turned off) is still
/// found.
pub fn wal_keys(job: &str, file: &crate::wal::WalFile, encrypted: bool) -> [String; 2] {
    [
        wal_key(job, file, encrypted),
        wal_key(job, file, !encrypted),
    ]
}

/// The WAL file a key under `wal_prefix(job)` holds, if it is one.
pub fn wal_file_of_key(job: &str, key: &str) -> Option<crate::wal::WalFile> {
    let rest = key.strip_prefix(&wal_prefix(job))?;
    let (timeline, name) = rest.split_once('/')?;
    let name = name.strip_suffix(".age").unwrap_or(name);
    let file = crate::wal::WalFile::parse(name.strip_suffix(".zst")?)?;
    (timeline == format!("{:08X}", file.timeline)).then_some(file)
}

pub const DRILLS_PREFIX: &str = "drills/";

/// Where the report `report_id` (its t0, as a backup id; see `DrillReport::report_id`) of
/// `drill` is kept.
pub fn drill_report_key(drill: &str, report_id: &str) -> String {
    format!("{DRILLS_PREFIX}{drill}/{report_id}.json")
}

/// Backup ids sort by time: `20261126T030000Z`.
pub fn backup_id(at: DateTime<Utc>) -> String {
    at.format(ID_FORMAT).to_string()
}

pub fn parse_backup_id(id: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(id, ID_FORMAT)
        .ok()
        .map(|naive| naive.and_utc())
}

/// The backup id of a manifest key under `backups_prefix(job)`, if it is one.
pub fn manifest_backup_id<'k>(job: &str, key: &'k str) -> Option<&'k str> {
    let rest = key
        .strip_prefix("jobs/")?
        .strip_prefix(job)?
        .strip_prefix("/backups/")?;
    let (id, name) = rest.split_once('/')?;
    (name == MANIFEST_NAME && parse_backup_id(id).is_some()).then_some(id)
}

/// A tag unique to this run: `run` and 16 hex digits, from the system's random source.
pub fn run_tag() -> String {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // Without a random source, the time in nanoseconds and the pid still differ per run.
        let nanos = Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64;
        bytes = (nanos ^ (u64::from(std::process::id()) << 40)).to_be_bytes();
    }
    format!("run{}", hex::encode(bytes))
}

/// Whether `text` is a tag `run_tag` makes.
pub fn is_run_tag(text: &str) -> bool {
    text.strip_prefix("run")
        .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_sort_by_time() {
        let at = DateTime::parse_from_rfc3339("2026-11-26T03:00:00Z")
            .unwrap()
            .to_utc();
        assert_eq!(backup_id(at), "20261126T030000Z");
        assert_eq!(parse_backup_id("20261126T030000Z"), Some(at));
        assert!(backup_id(at) < backup_id(at + chrono::Duration::seconds(1)));
    }

    #[test]
    fn only_backup_data_is_locked() {
        assert!(is_backup_data(
            "jobs/db/backups/20261126T030000Z/app.dump.zst"
        ));
        assert!(is_backup_data(
            "jobs/db/backups/20261126T030000Z/manifest.json"
        ));
        assert!(is_backup_data(
            "jobs/db/wal/00000001/000000010000000000000003.zst"
        ));
        assert!(!is_backup_data(&verified_key("db", "20261126T030000Z")));
        assert!(!is_backup_data(&prune_journal_key("db", "run0")));
        assert!(!is_backup_data(&drill_report_key("q", "20261126T030000Z")));
        assert!(!is_backup_data(MARKER_KEY));
    }

    #[test]
    fn only_manifest_keys_name_backups() {
        assert_eq!(
            manifest_backup_id("db", "jobs/db/backups/20261126T030000Z/manifest.json"),
            Some("20261126T030000Z")
        );
        assert_eq!(
            manifest_backup_id("db", "jobs/db/backups/20261126T030000Z/app.dump.zst"),
            None
        );
        assert_eq!(
            manifest_backup_id("db", "jobs/dbx/backups/20261126T030000Z/manifest.json"),
            None
        );
        assert_eq!(
            manifest_backup_id("db", "jobs/db/backups/x/manifest.json"),
            None
        );
    }

    #[test]
    fn run_tags_are_recognised_and_differ() {
        let (a, b) = (run_tag(), run_tag());
        assert!(is_run_tag(&a) && is_run_tag(&b), "{a} {b}");
        assert_ne!(a, b);
        assert!(!is_run_tag("run0123"));
        assert!(!is_run_tag("20261126T030000Z"));
        assert!(!is_run_tag("runzzzzzzzzzzzzzzzz"));
    }
}
