//! A `redis` job: the server's RDB, read over a replication connection, as `dump.rdb.zst`.
//! Where the server refuses SYNC and the job names `rdb_path`, BGSAVE and that file instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::Utc;

use super::{Captured, Context};
use crate::config::RedisJob;
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::SourceInfo;
use crate::sources::redis::{RedisServer, SyncError, copy_rdb_file};

pub const RDB_OBJECT: &str = "dump.rdb.zst";

pub(super) async fn capture(context: &Context<'_>, job: &RedisJob) -> Result<Captured> {
    let server = RedisServer::from_job(job)?;
    if job.heartbeat {
        server.write_heartbeat(context.job_name).await?;
    }
    let info = server.info().await?;
    // The RDB holds the data as of the fork the server makes on SYNC, which comes after this.
    let recovery_point = Utc::now();
    tracing::info!(server = %server.describe(), version = %info.version, keys = info.keys, "reading the RDB over a replication connection");
    let refused = Arc::new(AtomicBool::new(false));
    let syncing = server.clone();
    let saw_refusal = refused.clone();
    let synced = context
        .store(RDB_OBJECT, move |out| {
            syncing.sync_rdb(out).map_err(|e| {
                if matches!(e, SyncError::Refused(_)) {
                    saw_refusal.store(true, Ordering::SeqCst);
                }
                syncing.sync_error(e)
            })
        })
        .await;
    let entry = match (synced, &job.rdb_path) {
        (Ok((entry, synced)), _) => {
            tracing::info!(form = ?synced.form, rdb_version = synced.rdb_version, bytes = synced.size, "RDB received");
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
        notes: Vec::new(),
    })
}
