//! A `redis` job: the server's RDB, read over a replication connection, as `dump.rdb.zst`.
//! Where the server refuses SYNC and the job names `rdb_path`, BGSAVE and that file instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::Utc;

use super::{Captured, Context};
use crate::config::RedisJob;
use crate::error::{Error, ErrorKind, Result};
use crate::layout::RDB_OBJECT;
use crate::manifest::SourceInfo;
use crate::sources::redis::{RedisServer, SyncError, copy_rdb_file};

pub(super) async fn capture(context: &Context<'_>, job: &RedisJob) -> Result<Captured> {
    let server = RedisServer::from_job(job)?;
    let mut notes = Vec::new();
    let replica_of = server.replica_of().await?;
    if let Some(stale) = replica_of.as_ref().and_then(|r| r.cut_off(&server)) {
        return Err(stale);
    }
    if job.heartbeat {
        notes.extend(heartbeat(&server, replica_of.as_ref(), job, context.job_name).await?);
    }
    let info = server.info().await?;
    // The RDB holds the data as of the fork the server makes on SYNC, which comes after this;
    // a replica's data is as of its primary's last contact.
    let mut recovery_point = Utc::now();
    if let Some(replica) = &replica_of {
        let behind = replica.last_io_seconds.unwrap_or(0);
        recovery_point -= chrono::Duration::seconds(behind);
        notes.push(format!(
            "Redis at {} is a replica of {}: the recovery point is its primary's last contact, {behind} s before the backup started",
            server.describe(),
            replica.primary
        ));
    }
    tracing::info!(server = %server.describe(), version = %info.version, keys = info.keys, "reading the RDB over a replication connection");
    let refused = Arc::new(AtomicBool::new(false));
    let cut = Arc::new(AtomicBool::new(false));
    let syncing = server.clone();
    let (saw_refusal, saw_cut) = (refused.clone(), cut.clone());
    let synced = context
        .store(RDB_OBJECT, move |out| {
            syncing.sync_rdb(out).map_err(|e| {
                match e {
                    SyncError::Refused(_) => saw_refusal.store(true, Ordering::SeqCst),
                    SyncError::Stream(_) => saw_cut.store(true, Ordering::SeqCst),
                    _ => {}
                }
                syncing.sync_error(e)
            })
        })
        .await;
    // A connection the server closed is most often a save it could not make: say why.
    let synced = match synced {
        Err(e) if cut.load(Ordering::SeqCst) => match server.last_save_failure().await {
            Some(reason) => Err(e.with_hint(reason)),
            None => Err(e),
        },
        other => other,
    };
    let entry = match (synced, &job.rdb_path) {
        (Ok((entry, synced)), _) => {
            tracing::info!(form = ?synced.form, rdb_version = synced.rdb_version, bytes = synced.size, "RDB received");
            // A save the server began before lifeboat asked (SYNC joins a save already
            // running for another replica) holds nothing newer than its own start.
            if let Some(saved) = synced
                .saved_at
                .filter(|saved| {
                    let lag = chrono::Duration::from_std(crate::sources::redis::COARSE_CLOCK_LAG)
                        .unwrap_or_default();
                    *saved < (recovery_point - lag).timestamp()
                })
                .and_then(|saved| chrono::DateTime::from_timestamp(saved - 1, 0))
            {
                recovery_point = recovery_point.min(saved);
                notes.push(format!(
                    "the server sent a save it began before lifeboat asked (in the second after {}): the recovery point is that save's start",
                    saved.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ));
            }
            entry
        }
        (Err(e), Some(rdb_path)) if refused.load(Ordering::SeqCst) => {
            tracing::warn!(error = %e.chain().join(": "), rdb_path = %rdb_path.display(), "SYNC refused; falling back to BGSAVE and the RDB file");
            let file = server.bgsave_rdb(rdb_path).await?;
            let path = rdb_path.clone();
            let (entry, _) = context
                .store(RDB_OBJECT, move |out| {
                    copy_rdb_file(file, out).map_err(|e| {
                        let kind = if e.kind() == std::io::ErrorKind::InvalidData {
                            ErrorKind::Source
                        } else {
                            ErrorKind::Storage
                        };
                        Error::new(
                            kind,
                            format!("unable to back up the RDB file '{}'", path.display()),
                        )
                        .with_source(e)
                    })
                })
                .await?;
            entry
        }
        (Err(e), _) => return Err(e),
    };
    Ok(Captured {
        objects: vec![entry],
        source: SourceInfo {
            server_version: Some(info.version),
            keys: Some(info.keys),
            ..SourceInfo::default()
        },
        recovery_point: Some(recovery_point),
        notes,
    })
}

/// Writes the heartbeat the backup's recovery point is read from: into the server itself,
/// or, for a replica, into the primary it follows (checked to be that primary). What the
/// report should say about it is returned.
async fn heartbeat(
    server: &RedisServer,
    replica_of: Option<&crate::sources::redis::ReplicaOf>,
    job: &RedisJob,
    job_name: &str,
) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    match (replica_of, &job.primary) {
        (None, primary) => {
            if primary.is_some() {
                notes.push(format!(
                    "primary_url is not used: Redis at {} is a primary, and the heartbeat is written there",
                    server.describe()
                ));
            }
            server.write_heartbeat(job_name).await?;
        }
        (Some(replica), Some((host, port))) => {
            let primary = server.at(host, *port);
            // The heartbeat must reach this replica: primary_url must be what it follows.
            let (primary_of, replication_id) = primary.replication_id().await?;
            if primary_of.is_some() || replication_id != replica.replication_id {
                return Err(Error::new(
                    ErrorKind::Source,
                    format!(
                        "primary_url names Redis at {}, which is not the primary Redis at {} follows ({}): {}",
                        primary.describe(),
                        server.describe(),
                        replica.primary,
                        if primary_of.is_some() {
                            "it is a replica itself"
                        } else {
                            "their replication ids differ"
                        }
                    ),
                )
                .with_hint("set primary_url to the replica's primary (INFO replication on the replica: master_host, master_port)"));
            }
            let written = primary.write_heartbeat(job_name).await?;
            if !server.has_heartbeat(job_name, written).await? {
                notes.push(format!(
                    "the heartbeat written to the primary {} had not reached this replica after {} s; the backup may not hold it",
                    primary.describe(),
                    crate::sources::redis::HEARTBEAT_WAIT.as_secs()
                ));
            }
        }
        (Some(replica), None) => notes.push(format!(
            "no heartbeat written: Redis at {} is a read-only replica of {}; set primary_url on the job to write it there",
            server.describe(),
            replica.primary
        )),
    }
    Ok(notes)
}
