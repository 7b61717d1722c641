//! A physical `postgres` job: one pg_basebackup tar stream as `base.tar.zst`. The backup is
//! only as good as the WAL that makes it consistent, so it commits only in repositories
//! that hold every segment from its start to its stop.

use super::{Captured, Context};
use crate::config::PostgresJob;
use crate::error::{Error, ErrorKind, Result};
use crate::layout;
use crate::manifest::{ObjectEntry, SourceInfo};
use crate::sources::postgres::physical::{self, TarWatch};
use crate::sources::postgres::{Binaries, Connection, logical};
use crate::sources::process;
use crate::wal::{self, WalFile};

pub const BASE_OBJECT: &str = "base.tar.zst";

pub(super) async fn capture(context: &Context<'_>, job: &PostgresJob) -> Result<Captured> {
    let what = format!("job '{}'", context.job_name);
    let server = Connection::from_settings(&what, &job.connection)?;
    let cluster = physical::preflight(&server, context.job_name).await?;
    let binaries = Binaries::find(job.bin_dir.as_deref(), cluster.major)?;
    let auth = server.child_auth()?;
    if job.heartbeat {
        logical::write_heartbeat(&server, context.job_name).await?;
    }
    tracing::info!(server = %server.describe(), version = %cluster.version, "taking a base backup with pg_basebackup");

    let command = physical::basebackup_command(
        &binaries,
        &server,
        &format!("lifeboat-{}", context.id),
        &auth,
    );
    let (digests, findings) = context
        .store(BASE_OBJECT, move |out| {
            let mut watch = TarWatch::new(out);
            process::stream_stdout(command, "take a base backup with pg_basebackup", &mut watch)?;
            Ok(watch.findings)
        })
        .await?;
    let range = findings.wal_range().map_err(|problem| {
        Error::new(
            ErrorKind::Source,
            format!("unable to read the base backup of {what}: {problem}"),
        )
        .with_hint("pg_basebackup of PostgreSQL 13 or newer writes both; check bin_dir")
    })?;
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

    Ok(Captured {
        objects: vec![ObjectEntry::zstd(BASE_OBJECT, &digests)],
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
        recovery_point: findings.manifest_started_at,
    })
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
            let key = layout::wal_key(context.job_name, &file);
            let missing = match repository.store.head(&key).await {
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
