//! A physical `postgres` job: one pg_basebackup tar stream as `base.tar.zst`, compressed by
//! the server itself where it can (PostgreSQL 15+), else here. The backup is only as good
//! as the WAL that makes it consistent, so it commits only in repositories that hold every
//! segment from its start to its stop.

use chrono::{DateTime, Utc};

use super::{Captured, Context};
use crate::config::PostgresJob;
use crate::error::{Error, ErrorKind, Result};
use crate::layout;
use crate::manifest::SourceInfo;
use crate::sources::postgres::physical::{self, SharedScanner, TarWatch};
use crate::sources::postgres::{Binaries, Connection, logical};
use crate::sources::process;
use crate::storage::{self, StoreError};
use crate::wal::{self, ClusterRecord, Lsn, WalFile};

use crate::layout::BASE_OBJECT;

pub(super) async fn capture(context: &Context<'_>, job: &PostgresJob) -> Result<Captured> {
    let what = format!("job '{}'", context.job_name);
    let server = Connection::from_settings(&what, &job.connection)?;
    let cluster = physical::preflight(&server, context.job_name).await?;
    same_cluster(context, &cluster).await?;
    let binaries = Binaries::find(job.bin_dir.as_deref(), cluster.major)?;
    let auth = server.child_auth()?;
    if job.heartbeat {
        logical::write_heartbeat(&server, context.job_name).await?;
    }
    tracing::info!(server = %server.describe(), version = %cluster.version, "taking a base backup with pg_basebackup");

    let label = format!("lifeboat-{}", context.id);
    let action = "take a base backup with pg_basebackup";
    let scanner = SharedScanner::default();
    let (entry, _) = if cluster.major >= SERVER_ZSTD_SINCE {
        let level = context.options.level.min(MAX_SERVER_ZSTD_LEVEL);
        let command = physical::basebackup_command(
            &binaries,
            &server,
            &label,
            &auth,
            Some((level, context.options.threads)),
        );
        context
            .store_precompressed(BASE_OBJECT, Box::new(scanner.clone()), move |out| {
                process::stream_stdout(command, action, out)
            })
            .await?
    } else {
        let command = physical::basebackup_command(&binaries, &server, &label, &auth, None);
        let watched = scanner.clone();
        context
            .store(BASE_OBJECT, move |out| {
                process::stream_stdout(command, action, &mut TarWatch::new(out, watched))
            })
            .await?
    };
    let streamed_until = Utc::now();
    let findings = scanner.findings();
    let unreadable = |problem: String| {
        Error::new(
            ErrorKind::Source,
            format!("unable to read the base backup of {what}: {problem}"),
        )
    };
    let (start_lsn, start_timeline) = findings.start().map_err(unreadable)?;
    let (stop_lsn, stop_timeline, recovery_point) = match findings.stop() {
        Some(stop) => {
            let (lsn, timeline) = stop.map_err(unreadable)?;
            (
                lsn,
                timeline,
                findings.manifest_started_at.unwrap_or(streamed_until),
            )
        }
        None => {
            let history =
                physical::backup_history_name(start_lsn, start_timeline, cluster.wal_segment_size);
            let (lsn, timeline, stopped) =
                read_backup_history(context, &history, &cluster.archive_command).await?;
            // STOP TIME is in whole seconds: its end bounds the moment the backup stopped.
            let stopped = (stopped + chrono::Duration::seconds(1)).min(streamed_until);
            (lsn, timeline, stopped)
        }
    };
    let range = physical::WalRange {
        start_lsn,
        start_timeline,
        stop_lsn,
        stop_timeline,
    };
    let (first, last) =
        wal::segments_needed(range.start_lsn, range.stop_lsn, cluster.wal_segment_size);
    let first_wal = wal::segment_name(range.start_timeline, first, cluster.wal_segment_size);
    let last_wal = wal::segment_name(range.stop_timeline, last, cluster.wal_segment_size);
    let mut needed = Vec::new();
    for segment in first..=last {
        let timeline = if segment == first {
            range.start_timeline
        } else {
            range.stop_timeline
        };
        needed.push(wal::segment_name(
            timeline,
            segment,
            cluster.wal_segment_size,
        ));
    }
    require_wal(context, &needed, &cluster.archive_command).await?;
    warn_if_branched_off(context, &range).await;

    Ok(Captured {
        objects: vec![entry],
        source: SourceInfo {
            server_version: Some(cluster.version),
            system_identifier: Some(cluster.system_identifier),
            start_lsn: Some(range.start_lsn.to_string()),
            stop_lsn: Some(range.stop_lsn.to_string()),
            timeline: Some(range.start_timeline),
            first_wal: Some(first_wal),
            last_wal: Some(last_wal),
            wal_segment_size: Some(cluster.wal_segment_size),
            ..SourceInfo::default()
        },
        recovery_point: Some(recovery_point),
        notes: Vec::new(),
    })
}

/// Refuses to put a backup of one cluster among another's: each repository's record of the
/// job's cluster (made by the first backup or wal-push, and made here if missing) must name
/// this server's. A repository that cannot be asked drops out of the backup.
async fn same_cluster(context: &Context<'_>, cluster: &physical::ClusterInfo) -> Result<()> {
    let record = ClusterRecord {
        system_identifier: cluster.system_identifier.clone(),
        wal_segment_size: cluster.wal_segment_size,
        wal_page_magic: wal::page_magic_of(cluster.major),
        learned_from: format!("backup {}", context.id),
        learned_at: Utc::now(),
    };
    for repository in context.destinations.live() {
        let held = match repository
            .keep_cluster_record(context.job_name, &record)
            .await
        {
            Ok(held) => held,
            Err(e) if e.kind() == ErrorKind::Verification => return Err(e),
            Err(e) => {
                context
                    .destinations
                    .lose(context.job_name, &repository.name, e)?;
                continue;
            }
        };
        if held.system_identifier != record.system_identifier
            || held.wal_segment_size != record.wal_segment_size
        {
            return Err(Error::new(
                ErrorKind::Verification,
                format!(
                    "refusing to back up job '{}': the server is the cluster with system identifier {} ({}-byte WAL segments), and repository '{}' holds this job's backups and WAL of the cluster {} ({}-byte segments, learned from {})",
                    context.job_name,
                    record.system_identifier,
                    record.wal_segment_size,
                    repository.name,
                    held.system_identifier,
                    held.wal_segment_size,
                    held.learned_from
                ),
            )
            .with_hint(format!(
                "the record is '{}'; a cluster made by initdb or pg_upgrade is a new cluster: back it up and archive its WAL as a job of its own (a new `[[job]]` name, and the same name in archive_command)",
                layout::cluster_record_key(context.job_name)
            )));
        }
    }
    Ok(())
}

/// Says so when a later timeline in the job's archive branched off this backup's before it
/// stopped: the server is an old primary that kept running after a failover (split brain),
/// and restores following the newest timeline will pass this backup by.
async fn warn_if_branched_off(context: &Context<'_>, range: &physical::WalRange) {
    let live = context.destinations.live();
    let position = (range.stop_timeline, range.stop_lsn);
    match crate::continuity::branched_off(&live, context.job_name, position).await {
        Ok(Some((newer, switched_at))) => tracing::warn!(
            job = %context.job_name,
            "split brain: timeline {newer} branched off this server's timeline {} at {switched_at}, before this backup stopped at {}; this server is an old primary that kept running after a failover, and restores along the newest timeline will pass this backup by (stop it, or give it a job of its own)",
            range.stop_timeline,
            range.stop_lsn
        ),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(job = %context.job_name, error = %e.chain().join(": "), "unable to check the job's timelines for a split brain")
        }
    }
}

/// PostgreSQL 15 is the first whose pg_basebackup can have the server compress with zstd.
const SERVER_ZSTD_SINCE: u32 = 15;
/// The highest level PostgreSQL accepts for server-side zstd without `long` tuning.
const MAX_SERVER_ZSTD_LEVEL: i32 = 19;

/// Reads the backup's `.backup` history file from the archive: PostgreSQL archives it
/// before pg_basebackup returns, through `lifeboat wal-push`.
async fn read_backup_history(
    context: &Context<'_>,
    name: &str,
    archive_command: &str,
) -> Result<(Lsn, u32, DateTime<Utc>)> {
    let file = WalFile::parse(name).expect("history names are valid");
    // History files are never encrypted (see `wal_archive::encrypts`).
    let key = layout::wal_key(context.job_name, &file, false);
    let mut last_error = None;
    for repository in context.destinations.live() {
        let stored = match storage::get_bytes(repository.store.as_ref(), &key).await {
            Ok(stored) => stored,
            Err(e) => {
                last_error =
                    Some(repository.error(&format!("read the backup history file '{key}'"), e));
                continue;
            }
        };
        let text = crate::wal::decode_limited(&stored[..], crate::continuity::HISTORY_LIMIT)
            .map(|raw| String::from_utf8_lossy(&raw).into_owned());
        if let Some(stop) = text
            .ok()
            .as_deref()
            .and_then(physical::parse_backup_history)
        {
            return Ok(stop);
        }
        last_error = Some(Error::new(
            ErrorKind::Verification,
            format!(
                "unable to read the backup history file '{key}' in repository '{}': it has no STOP WAL LOCATION, STOP TIMELINE and STOP TIME",
                repository.name
            ),
        ));
    }
    Err(last_error
        .unwrap_or_else(|| {
            Error::new(
                ErrorKind::Storage,
                "no repository is left to read the backup history file from",
            )
        })
        .with_hint(format!(
            "archive_command is '{archive_command}'; it must be `lifeboat wal-push --job {} %p` for this job's backups to restore",
            context.job_name
        )))
}

/// Drops from this backup every repository that lacks one of the `needed` segments: there
/// it could not be restored. pg_basebackup has already waited for the archiver, so a
/// segment missing everywhere means WAL is going somewhere else.
async fn require_wal(
    context: &Context<'_>,
    needed: &[String],
    archive_command: &str,
) -> Result<()> {
    for repository in context.destinations.live() {
        for name in needed {
            let file = WalFile::parse(name).expect("segment names are valid");
            let [key, other] = layout::wal_keys(
                context.job_name,
                &file,
                context.options.recipients.is_some(),
            );
            let mut found = repository.store.head(&key).await;
            if found.as_ref().is_err_and(StoreError::is_not_found) {
                found = repository.store.head(&other).await;
            }
            let missing = match found {
                Ok(_) => continue,
                Err(e) if e.is_not_found() => Error::new(
                    ErrorKind::Source,
                    format!("the WAL segment {name} this backup needs is not in its archive"),
                )
                .with_hint(format!(
                    "archive_command is '{archive_command}'; it must be `lifeboat wal-push --job {} %p` for this job's backups to restore",
                    context.job_name
                )),
                Err(e) => repository.error(&format!("look up WAL segment '{key}'"), e),
            };
            context
                .destinations
                .lose(context.job_name, &repository.name, missing)?;
            break;
        }
    }
    Ok(())
}
