//! Per-job run locks, so that a slow backup and the next timer never overlap, nor a prune
//! and a replicate of the same job. The lock is an advisory `flock` on a file per job: the
//! kernel releases it when the holder exits, however it exits, so a killed run never blocks
//! the next one and there is no stale lock to clean up. The file also names its holder (pid,
//! host, command, start), for the message of whoever finds the lock taken.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};

/// Held while alive; dropping it (or the process ending) releases the lock.
#[derive(Debug)]
pub struct JobLock {
    _file: File,
}

#[derive(Debug, Serialize, Deserialize)]
struct Holder {
    pid: u32,
    host: String,
    command: String,
    started_at: DateTime<Utc>,
}

/// The lock file of `job` under `config`: one per config file and job, so that two configs
/// that happen to share a job name do not block each other.
pub fn lock_path(config: &Config, job: &str) -> PathBuf {
    let canonical = config
        .path
        .canonicalize()
        .unwrap_or_else(|_| config.path.clone());
    let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    let tag: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    config.lock_dir.join(format!("{job}-{tag}.lock"))
}

/// Takes the lock of `job` for `command` (`backup`, `prune`, ...), or fails at once with
/// `ErrorKind::Locked` naming the run that holds it.
pub fn acquire(config: &Config, job: &str, command: &str) -> Result<JobLock> {
    let path = lock_path(config, job);
    let fail = |action: &str, e: std::io::Error| {
        Error::new(
            ErrorKind::Source,
            format!("unable to {action} lock file '{}'", path.display()),
        )
        .with_source(e)
        .with_hint("set `lock_dir` in the config to a local directory lifeboat can write")
    };
    create_lock_dir(&config.lock_dir).map_err(|e| fail("create the directory of", e))?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .map_err(|e| fail("open", e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(Error::new(
                ErrorKind::Locked,
                format!(
                    "job '{job}' is locked by another run: {}",
                    describe_holder(&mut file)
                ),
            )
            .with_hint(format!(
                "nothing was done; wait for that run to end (its lock is '{}' and is released when it exits, even if killed)",
                path.display()
            )));
        }
        Err(TryLockError::Error(e)) => return Err(fail("lock", e)),
    }
    let holder = Holder {
        pid: std::process::id(),
        host: crate::commands::backup::host_name(),
        command: command.to_string(),
        started_at: Utc::now(),
    };
    let record = serde_json::to_vec(&holder).expect("holder serializes");
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(&record))
        .map_err(|e| fail("write", e))?;
    Ok(JobLock { _file: file })
}

fn describe_holder(file: &mut File) -> String {
    let mut text = String::new();
    let holder = file
        .rewind()
        .and_then(|()| file.read_to_string(&mut text))
        .ok()
        .and_then(|_| serde_json::from_str::<Holder>(&text).ok());
    match holder {
        Some(h) => format!(
            "`lifeboat {}`, pid {} on host {}, started {}",
            h.command,
            h.pid,
            h.host,
            h.started_at.format("%Y-%m-%d %H:%M:%S UTC")
        ),
        // It took the lock a moment ago and has not written its name yet.
        None => "a run that has just started".to_string(),
    }
}

/// Creates the lock directory writable by everyone with the sticky bit, like /tmp: runs
/// under different users must be able to lock jobs, and not remove each other's files.
fn create_lock_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777))
}
