//! Redis: lifeboat's connection for ordinary commands (the `redis` crate: AUTH, INFO, the
//! heartbeat, BGSAVE), the replication connection that streams the RDB, the RDB check, and
//! throw-away servers for restores and drills.
//!
//! The password comes from `password_file`, else REDISCLI_AUTH; it never reaches argv or a
//! log line.

mod rdb;
mod replication;
mod scratch;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};

pub use rdb::RdbCheck;
pub use replication::{PayloadForm, SyncError, Synced};
pub use scratch::{
    PASSWORD_FILE as SCRATCH_PASSWORD_FILE, ScratchRedis, stop_all as stop_all_scratch_servers,
};

use crate::config::RedisJob;
use crate::error::{Error, ErrorKind, Result};

const AUTH_HINT: &str = "check username and password_file (or REDISCLI_AUTH) for this job";

/// The key each backup sets to its start time when `heartbeat = true`.
pub fn heartbeat_key(job: &str) -> String {
    format!("lifeboat:heartbeat:{job}")
}

#[derive(Clone)]
pub struct RedisServer {
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        write!(f, "RedisServer({})", self.describe())
    }
}

#[derive(Debug, Clone)]
pub struct RedisInfo {
    pub version: String,
    /// Keys in every database, from INFO keyspace.
    pub keys: u64,
}

fn error(
    server: &RedisServer,
    what: &str,
    cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> Error {
    Error::new(
        ErrorKind::Source,
        format!("unable to {what} on Redis at {}", server.describe()),
    )
    .with_source(cause)
}

/// A reply as an operator would read it: scalars as themselves, arrays, sets and maps as
/// their elements one per line (`key: value` for maps), never in a debug form that would
/// escape (and so hide from redaction) what they hold.
fn reply_text(value: redis::Value) -> Option<String> {
    let joined = |items: Vec<redis::Value>| {
        items
            .into_iter()
            .map(|item| reply_text(item).unwrap_or_else(|| "(nil)".to_string()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    match value {
        redis::Value::Nil => None,
        redis::Value::Int(n) => Some(n.to_string()),
        redis::Value::BulkString(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        redis::Value::SimpleString(text) => Some(text),
        redis::Value::VerbatimString { text, .. } => Some(text),
        redis::Value::Okay => Some("OK".to_string()),
        redis::Value::Double(d) => Some(d.to_string()),
        redis::Value::Boolean(b) => Some(b.to_string()),
        redis::Value::BigNumber(n) => Some(String::from_utf8_lossy(&n).into_owned()),
        redis::Value::Array(items) | redis::Value::Set(items) => Some(joined(items)),
        redis::Value::Map(pairs) => Some(
            pairs
                .into_iter()
                .map(|(k, v)| {
                    format!(
                        "{}: {}",
                        reply_text(k).unwrap_or_default(),
                        reply_text(v).unwrap_or_else(|| "(nil)".to_string())
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        other => Some(format!("{other:?}")),
    }
}

impl RedisServer {
    pub fn from_job(job: &RedisJob) -> Result<RedisServer> {
        let password = match &job.password_file {
            Some(path) => Some(crate::sources::read_password_file(path)?),
            None => std::env::var("REDISCLI_AUTH")
                .ok()
                .filter(|p| !p.is_empty()),
        };
        Ok(RedisServer {
            host: job.host.clone(),
            port: job.port,
            username: job.username.clone(),
            password,
        })
    }

    /// A server on loopback without a password: a scratch server.
    pub fn local(port: u16, password: Option<String>) -> RedisServer {
        RedisServer {
            host: "127.0.0.1".to_string(),
            port,
            username: None,
            password,
        }
    }

    /// "user@host:port", for messages.
    pub fn describe(&self) -> String {
        match &self.username {
            Some(user) => format!("{user}@{}:{}", self.host, self.port),
            None => format!("{}:{}", self.host, self.port),
        }
    }

    fn client(&self) -> redis::RedisResult<redis::Client> {
        let mut settings = RedisConnectionInfo::default();
        if let Some(user) = &self.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        let info = ConnectionAddr::Tcp(self.host.clone(), self.port)
            .into_connection_info()?
            .set_redis_settings(settings);
        redis::Client::open(info)
    }

    /// A blocking connection, for the few places that cannot await (a lock released in Drop).
    pub fn connect_blocking(&self) -> redis::RedisResult<redis::Connection> {
        self.client()?
            .get_connection_with_timeout(Duration::from_secs(2))
    }

    pub async fn connect(&self) -> Result<redis::aio::MultiplexedConnection> {
        let client = self.client().map_err(|e| error(self, "connect", e))?;
        client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| {
                let text = e.to_string().to_ascii_lowercase();
                let refused = e.kind() == redis::ErrorKind::AuthenticationFailed
                    || text.contains("authentication failed")
                    || text.contains("wrongpass");
                if refused {
                    error(self, "authenticate (wrong username or password)", e).with_hint(AUTH_HINT)
                } else {
                    error(self, "connect", e)
                }
            })
    }

    /// Runs one command and returns its reply as text (or an integer as text).
    pub async fn query(&self, args: &[String]) -> Result<Option<String>> {
        let (name, rest) = args
            .split_first()
            .ok_or_else(|| Error::usage("an empty Redis command"))?;
        let mut connection = self.connect().await?;
        let mut cmd = redis::cmd(name);
        for arg in rest {
            cmd.arg(arg);
        }
        let value: redis::Value = cmd
            .query_async(&mut connection)
            .await
            .map_err(|e| error(self, &format!("run {}", args.join(" ")), e))?;
        Ok(reply_text(value))
    }

    pub async fn info(&self) -> Result<RedisInfo> {
        let mut connection = self.connect().await?;
        let text: String = redis::cmd("INFO")
            .arg("server")
            .arg("keyspace")
            .query_async(&mut connection)
            .await
            .map_err(|e| error(self, "run INFO", e))?;
        Ok(parse_info(&text))
    }

    /// Sets the heartbeat key to now; returns the moment written.
    pub async fn write_heartbeat(&self, job: &str) -> Result<DateTime<Utc>> {
        let mut connection = self.connect().await?;
        let now = Utc::now();
        let _: () = redis::cmd("SET")
            .arg(heartbeat_key(job))
            .arg(now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
            .query_async(&mut connection)
            .await
            .map_err(|e| error(self, "write the heartbeat key", e))?;
        Ok(now)
    }

    /// Streams the RDB over a replication connection into `out` (blocking). The error is
    /// the sync's own, so a caller can tell a refusal; `sync_error` words it.
    pub fn sync_rdb(&self, out: &mut dyn Write) -> std::result::Result<Synced, SyncError> {
        let auth = self
            .password
            .as_deref()
            .map(|password| (self.username.as_deref(), password));
        replication::sync_rdb(&self.host, self.port, auth, out)
    }

    pub fn sync_error(&self, e: SyncError) -> Error {
        let kind = match &e {
            SyncError::Output(_) => ErrorKind::Storage,
            _ => ErrorKind::Source,
        };
        let hint = match &e {
            SyncError::Auth(_) => Some(AUTH_HINT),
            SyncError::Refused(_) => Some(
                "the server (or the user's ACL) does not allow SYNC; set rdb_path on the job to back up through BGSAVE and the server's RDB file instead",
            ),
            _ => None,
        };
        let err = Error::new(
            kind,
            format!(
                "unable to read the RDB of Redis at {} over a replication connection",
                self.describe()
            ),
        )
        .with_source(e);
        match hint {
            Some(hint) => err.with_hint(hint),
            None => err,
        }
    }

    /// The fallback where SYNC is refused: BGSAVE, wait until it has finished, then the
    /// server's RDB file at `rdb_path`, opened for the caller to copy (and check).
    pub async fn bgsave_rdb(&self, rdb_path: &Path) -> Result<std::fs::File> {
        let mut connection = self.connect().await?;
        let persistence = async |connection: &mut redis::aio::MultiplexedConnection| {
            let text: String = redis::cmd("INFO")
                .arg("persistence")
                .query_async(connection)
                .await
                .map_err(|e| error(self, "run INFO persistence", e))?;
            Ok::<_, Error>(parse_persistence(&text))
        };
        let before = persistence(&mut connection).await?;
        let _: redis::Value = redis::cmd("BGSAVE")
            .query_async(&mut connection)
            .await
            .map_err(|e| error(self, "run BGSAVE", e))?;
        // LASTSAVE has whole seconds, so a save that ends within the second it started
        // changes nothing there; the count of saves (Redis 7), or the save seen in progress,
        // tells.
        let started = Instant::now();
        let mut saw_progress = false;
        loop {
            let now = persistence(&mut connection).await?;
            saw_progress |= now.in_progress;
            let finished = match (now.saves, before.saves) {
                (Some(now_saves), Some(saves_before)) => now_saves > saves_before,
                _ => saw_progress || now.last_save > before.last_save,
            };
            if !now.in_progress && finished {
                if !now.last_ok {
                    return Err(error(
                        self,
                        "save the RDB with BGSAVE",
                        "rdb_last_bgsave_status is err; see the server's log",
                    ));
                }
                break;
            }
            if started.elapsed() > Duration::from_secs(6 * 3600) {
                return Err(error(
                    self,
                    "wait for BGSAVE",
                    "it did not finish in 6 hours",
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        std::fs::File::open(rdb_path).map_err(|e| {
            Error::new(
                ErrorKind::Source,
                format!(
                    "unable to read the RDB file '{}' of Redis at {}",
                    rdb_path.display(),
                    self.describe()
                ),
            )
            .with_source(e)
        })
    }
}

/// What INFO persistence says about RDB saves.
struct Persistence {
    in_progress: bool,
    /// `rdb_saves`, from Redis 7 on.
    saves: Option<i64>,
    last_save: i64,
    last_ok: bool,
}

fn parse_persistence(text: &str) -> Persistence {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    Persistence {
        in_progress: field("rdb_bgsave_in_progress:") == "1",
        saves: field("rdb_saves:").parse().ok(),
        last_save: field("rdb_last_save_time:").parse().unwrap_or(0),
        last_ok: field("rdb_last_bgsave_status:") != "err",
    }
}

/// Copies an RDB file into `out`, checking it as it goes.
pub fn copy_rdb_file(mut file: impl Read, out: &mut dyn Write) -> std::io::Result<(u64, u32)> {
    let mut check = RdbCheck::default();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        check.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        size += n as u64;
    }
    let version = check
        .finish()
        .map_err(|why| std::io::Error::new(std::io::ErrorKind::InvalidData, why))?;
    Ok((size, version))
}

/// `redis_version:7.0.15` and `db0:keys=3,expires=1,…` lines.
fn parse_info(text: &str) -> RedisInfo {
    let mut version = String::new();
    let mut keys = 0;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("redis_version:") {
            version = v.trim().to_string();
        } else if line.starts_with("db")
            && let Some((_, fields)) = line.split_once(':')
            && let Some(count) = fields
                .split(',')
                .find_map(|f| f.strip_prefix("keys="))
                .and_then(|n| n.trim().parse::<u64>().ok())
        {
            keys += count;
        }
    }
    RedisInfo { version, keys }
}

#[cfg(test)]
mod tests {
    #[test]
    fn info_persistence_tells_a_finished_save() {
        let p = super::parse_persistence(
            "# Persistence\r\nloading:0\r\nrdb_bgsave_in_progress:0\r\nrdb_last_save_time:1764160000\r\n\
             rdb_last_bgsave_status:ok\r\nrdb_saves:3\r\n",
        );
        assert!(!p.in_progress && p.last_ok);
        assert_eq!((p.saves, p.last_save), (Some(3), 1_764_160_000));
        let old =
            super::parse_persistence("rdb_bgsave_in_progress:1\r\nrdb_last_bgsave_status:err\r\n");
        assert!(old.in_progress && !old.last_ok && old.saves.is_none());
    }

    #[test]
    fn info_gives_the_version_and_the_keys_of_every_database() {
        let info = super::parse_info(
            "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n\r\n# Keyspace\r\n\
             db0:keys=100,expires=3,avg_ttl=0\r\ndb2:keys=5,expires=0,avg_ttl=0\r\n",
        );
        assert_eq!(info.version, "7.0.15");
        assert_eq!(info.keys, 105);
    }
}
