//! Per-job run locks, so that a slow backup and the next timer never overlap, nor a prune
//! and a replicate of the same job. The lock is an advisory `flock` on a file per job: the
//! kernel releases it when the holder exits, however it exits, so a killed run never blocks
//! the next one and there is no stale lock to clean up. The file also names its holder (pid,
//! host, command, start), for the message of whoever finds the lock taken.
//!
//! Where several hosts may run the same jobs, `lock = "redis://..."` adds a lock in Redis:
//! `SET key HOLDER NX PX ttl`, renewed while the run lasts and released only by the holder
//! that set it (compare-and-delete in one script). A holder killed on another host blocks
//! until the key expires (one TTL); one killed on this host is seen to be gone (its pid no
//! longer exists) and its key is taken over at once.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::sources::redis::RedisServer;

/// How long a Redis lock lives without renewal; renewed every third of it.
const SHARED_TTL: Duration = Duration::from_secs(60);

/// Held while alive; dropping it (or the process ending) releases the lock.
#[derive(Debug)]
pub struct JobLock {
    _file: File,
    _shared: Option<SharedLock>,
}

#[derive(Debug)]
struct SharedLock {
    server: RedisServer,
    key: String,
    token: String,
    renewer: tokio::task::JoinHandle<()>,
}

impl Drop for SharedLock {
    fn drop(&mut self) {
        self.renewer.abort();
        // Synchronous, as Drop cannot wait on the runtime: one short round trip.
        if let Err(e) = release_blocking(&self.server, &self.key, &self.token) {
            tracing::warn!(key = %self.key, error = %e, "unable to release the Redis lock; it expires by itself");
        }
    }
}

const RENEW: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end";
const RELEASE: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

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

/// Takes the lock of `job` for `command` (`backup`, `prune`, ...) on this host and, when
/// configured, in Redis; or fails at once with `ErrorKind::Locked` naming the holder.
pub async fn acquire(config: &Config, job: &str, command: &str) -> Result<JobLock> {
    let file = acquire_file(config, job, command)?;
    let shared = match &config.shared_lock {
        Some(redis) => Some(acquire_shared(RedisServer::from_job(redis)?, job, command).await?),
        None => None,
    };
    Ok(JobLock {
        _file: file,
        _shared: shared,
    })
}

fn acquire_file(config: &Config, job: &str, command: &str) -> Result<File> {
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
            let holder = read_holder(&mut file);
            return Err(Error::new(
                ErrorKind::Locked,
                format!("job '{job}' is locked by another run: {}", describe(holder.as_ref())),
            )
            .with_hint(format!(
                "nothing was done; wait for that run to end (its lock is '{}' and is released when it exits, even if killed)",
                path.display()
            )));
        }
        Err(TryLockError::Error(e)) => return Err(fail("lock", e)),
    }
    let record = serde_json::to_vec(&Holder::me(command)).expect("holder serializes");
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(&record))
        .map_err(|e| fail("write", e))?;
    Ok(file)
}

/// The holder's record. It writes it right after taking the lock, so a run that finds the
/// lock taken a moment after gives it a little time before calling it unnamed.
fn read_holder(file: &mut File) -> Option<Holder> {
    for _ in 0..50 {
        let mut text = String::new();
        let holder = file
            .rewind()
            .and_then(|()| file.read_to_string(&mut text))
            .ok()
            .and_then(|_| serde_json::from_str::<Holder>(&text).ok());
        if holder.is_some() {
            return holder;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

impl Holder {
    fn me(command: &str) -> Holder {
        Holder {
            pid: std::process::id(),
            host: crate::host::name(),
            command: command.to_string(),
            started_at: Utc::now(),
        }
    }

    /// A holder on this host whose process no longer exists.
    fn is_gone(&self) -> bool {
        if self.host != crate::host::name() {
            return false;
        }
        let Ok(pid) = libc::pid_t::try_from(self.pid) else {
            return false;
        };
        // Signal 0 checks existence; EPERM means it exists under another user.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        !alive
    }
}

async fn acquire_shared(server: RedisServer, job: &str, command: &str) -> Result<SharedLock> {
    let key = format!("lifeboat:lock:{job}");
    let token = serde_json::to_string(&Holder::me(command)).expect("holder serializes");
    let mut connection = server.connect().await?;
    let failed = |e: redis::RedisError| {
        Error::new(
            ErrorKind::Source,
            format!(
                "unable to take the lock '{key}' on Redis at {}",
                server.describe()
            ),
        )
        .with_source(e)
    };
    let ttl = SHARED_TTL.as_millis() as u64;
    for attempt in 0..2 {
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ttl)
            .query_async(&mut connection)
            .await
            .map_err(failed)?;
        if set.is_some() {
            break;
        }
        let current: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .map_err(failed)?;
        let holder = current
            .as_deref()
            .and_then(|text| serde_json::from_str::<Holder>(text).ok());
        if attempt == 0
            && let (Some(text), Some(gone)) = (&current, holder.as_ref().filter(|h| h.is_gone()))
        {
            tracing::warn!(key = %key, pid = gone.pid, "taking over the Redis lock of a run that no longer exists");
            let _: i64 = eval(RELEASE, &key, &[text])
                .query_async(&mut connection)
                .await
                .map_err(failed)?;
            continue;
        }
        return Err(Error::new(
            ErrorKind::Locked,
            format!(
                "job '{job}' is locked in Redis at {} by another run: {}",
                server.describe(),
                describe(holder.as_ref())
            ),
        )
        .with_hint(format!(
            "nothing was done; the lock '{key}' is released when that run ends, or expires {} s after its host stops renewing it",
            SHARED_TTL.as_secs()
        )));
    }
    let renewer = {
        let (server, key, token) = (server.clone(), key.clone(), token.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SHARED_TTL / 3).await;
                let renewed = async {
                    let mut connection = server.connect().await.ok()?;
                    eval(RENEW, &key, &[&token, &ttl.to_string()])
                        .query_async::<i64>(&mut connection)
                        .await
                        .ok()
                }
                .await;
                if renewed != Some(1) {
                    tracing::error!(key = %key, "the Redis lock could not be renewed; another host may start this job");
                }
            }
        })
    };
    Ok(SharedLock {
        server,
        key,
        token,
        renewer,
    })
}

fn release_blocking(server: &RedisServer, key: &str, token: &str) -> redis::RedisResult<()> {
    let mut connection = server.connect_blocking()?;
    let _: i64 = eval(RELEASE, key, &[token]).query(&mut connection)?;
    Ok(())
}

/// `EVAL script 1 key args...`: the check and the change in one step on the server.
fn eval(script: &str, key: &str, args: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(1).arg(key);
    for arg in args {
        cmd.arg(*arg);
    }
    cmd
}

fn describe(holder: Option<&Holder>) -> String {
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
