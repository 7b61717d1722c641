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
pub use scratch::{PASSWORD_FILE as SCRATCH_PASSWORD_FILE, ScratchRedis};

use crate::config::RedisJob;
use crate::error::{Error, ErrorKind, Result};

const AUTH_HINT: &str = "check username and password_file (or REDISCLI_AUTH) for this job";

/// How far the kernel's coarse clock (file times, the `time()` Redis records) may lag the
/// clock lifeboat reads: a tick, and some room.
pub const COARSE_CLOCK_LAG: Duration = Duration::from_millis(20);

/// How long a replica is given to receive the heartbeat written to its primary.
pub const HEARTBEAT_WAIT: Duration = Duration::from_secs(10);

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

/// A replica's view of its primary, from INFO replication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaOf {
    /// "host:port" of the primary.
    pub primary: String,
    pub link_up: bool,
    /// Seconds since the primary was last heard from, while the link is up.
    pub last_io_seconds: Option<i64>,
    /// Seconds since the link went down, while it is down.
    pub down_seconds: Option<i64>,
    /// `master_replid`: the replication id it shares with its primary.
    pub replication_id: String,
}

impl ReplicaOf {
    /// The error for backing up `server`, this replica, while its link is down.
    pub fn cut_off(&self, server: &RedisServer) -> Option<Error> {
        if self.link_up {
            return None;
        }
        let since = self
            .down_seconds
            .map(|s| format!(" for {s} s"))
            .unwrap_or_default();
        Some(
            Error::new(
                ErrorKind::Source,
                format!(
                    "Redis at {} is a replica whose link to its primary {} is down{since}: its data may be stale, so it is not backed up as if it were current",
                    server.describe(),
                    self.primary
                ),
            )
            .with_hint(CUT_OFF_HINT),
        )
    }
}

const CUT_OFF_HINT: &str = "back up the primary (or a replica whose link is up: INFO replication, master_link_status:up), or restore this replica's link first";

/// What INFO replication says of the server's role: None for a primary.
fn parse_replication(text: &str) -> Option<ReplicaOf> {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.trim().to_string())
    };
    if field("role:").as_deref() != Some("slave") {
        return None;
    }
    Some(ReplicaOf {
        primary: format!(
            "{}:{}",
            field("master_host:").unwrap_or_default(),
            field("master_port:").unwrap_or_default()
        ),
        link_up: field("master_link_status:").as_deref() == Some("up"),
        last_io_seconds: field("master_last_io_seconds_ago:")
            .and_then(|s| s.parse().ok())
            .filter(|s: &i64| *s >= 0),
        down_seconds: field("master_link_down_since_seconds:")
            .and_then(|s| s.parse().ok())
            .filter(|s: &i64| *s >= 0),
        replication_id: field("master_replid:").unwrap_or_default(),
    })
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

    /// The server at `host:port` with this one's credentials (a replica's primary).
    pub fn at(&self, host: &str, port: u16) -> RedisServer {
        RedisServer {
            host: host.to_string(),
            port,
            ..self.clone()
        }
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

    /// Whether the server is a replica, and how its link to its primary is.
    pub async fn replica_of(&self) -> Result<Option<ReplicaOf>> {
        Ok(self.replication_id().await?.0)
    }

    /// Whether the server is a replica, and its replication id (`master_replid`).
    pub async fn replication_id(&self) -> Result<(Option<ReplicaOf>, String)> {
        let mut connection = self.connect().await?;
        let text: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut connection)
            .await
            .map_err(|e| error(self, "run INFO replication", e))?;
        let id = text
            .lines()
            .find_map(|line| line.strip_prefix("master_replid:"))
            .unwrap_or_default()
            .trim()
            .to_string();
        Ok((parse_replication(&text), id))
    }

    /// Why the server's last save failed, when it did: the status INFO persistence keeps,
    /// for an error that would otherwise say only that the connection closed.
    pub async fn last_save_failure(&self) -> Option<String> {
        let mut connection = self.connect().await.ok()?;
        let text: String = redis::cmd("INFO")
            .arg("persistence")
            .query_async(&mut connection)
            .await
            .ok()?;
        let persistence = parse_persistence(&text);
        (!persistence.last_ok).then(|| {
            "the server's last save failed (INFO persistence: rdb_last_bgsave_status:err); its log says why, often \"Can't save in background: fork: Cannot allocate memory\" (see vm.overcommit_memory) or a full or read-only disk".to_string()
        })
    }

    /// The file the server saves its RDB to (`CONFIG GET dir` and `dbfilename`); None where
    /// CONFIG is not allowed.
    pub async fn rdb_file(&self) -> Result<Option<std::path::PathBuf>> {
        let mut connection = self.connect().await?;
        let mut get = async |name: &str| -> Option<String> {
            let reply: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query_async(&mut connection)
                .await;
            reply.ok()?.get(1).cloned()
        };
        let Some(dir) = get("dir").await else {
            return Ok(None);
        };
        let Some(file) = get("dbfilename").await else {
            return Ok(None);
        };
        Ok(Some(Path::new(&dir).join(file)))
    }

    /// Sets the heartbeat key to now; returns the moment written.
    pub async fn write_heartbeat(&self, job: &str) -> Result<DateTime<Utc>> {
        let mut connection = self.connect().await?;
        // As precise as it is written, so that reading it back compares equal.
        let now = chrono::SubsecRound::trunc_subsecs(Utc::now(), 6);
        let _: () = redis::cmd("SET")
            .arg(heartbeat_key(job))
            .arg(now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
            .query_async(&mut connection)
            .await
            .map_err(|e| error(self, "write the heartbeat key", e))?;
        Ok(now)
    }

    /// Whether the heartbeat key holds the moment `written` (or a later one), waiting up to
    /// [`HEARTBEAT_WAIT`] for replication to bring it.
    pub async fn has_heartbeat(&self, job: &str, written: DateTime<Utc>) -> Result<bool> {
        let mut connection = self.connect().await?;
        let started = Instant::now();
        loop {
            let value: Option<String> = redis::cmd("GET")
                .arg(heartbeat_key(job))
                .query_async(&mut connection)
                .await
                .map_err(|e| error(self, "read the heartbeat key", e))?;
            let at = value.and_then(|v| DateTime::parse_from_rfc3339(&v).ok());
            if at.is_some_and(|at| at >= written) {
                return Ok(true);
            }
            if started.elapsed() > HEARTBEAT_WAIT {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
            SyncError::CutOff(_) => Some(CUT_OFF_HINT),
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

    /// Runs a BGSAVE of its own (after a save already running ends) and waits until it has
    /// finished: when it was asked for, and the LASTSAVE it finished at.
    async fn bgsave(&self) -> Result<(std::time::SystemTime, i64)> {
        let mut connection = self.connect().await?;
        let persistence = async |connection: &mut redis::aio::MultiplexedConnection| {
            let text: String = redis::cmd("INFO")
                .arg("persistence")
                .query_async(connection)
                .await
                .map_err(|e| error(self, "run INFO persistence", e))?;
            Ok::<_, Error>(parse_persistence(&text))
        };
        let started = Instant::now();
        let too_long = || {
            (started.elapsed() > Duration::from_secs(6 * 3600))
                .then(|| error(self, "wait for BGSAVE", "it did not finish in 6 hours"))
        };
        // A save already running (a schedule, a replica's sync) is waited for: it is not
        // this one, and BGSAVE would be refused meanwhile.
        let (before, asked_at) = loop {
            let before = persistence(&mut connection).await?;
            if before.in_progress {
                if let Some(e) = too_long() {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let asked_at = std::time::SystemTime::now();
            let asked: redis::RedisResult<redis::Value> =
                redis::cmd("BGSAVE").query_async(&mut connection).await;
            match asked {
                Ok(_) => break (before, asked_at),
                // Another save, or an AOF rewrite, holds the one child Redis forks.
                Err(e)
                    if e.to_string().contains("already in progress")
                        || e.to_string().contains("Another child process is active") =>
                {
                    if let Some(e) = too_long() {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(error(self, "run BGSAVE", e)),
            }
        };
        // LASTSAVE has whole seconds, so a save that ends within the second it started
        // changes nothing there; the count of saves (Redis 7), or the save seen in progress,
        // tells.
        let mut saw_progress = false;
        let last_save = loop {
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
                break now.last_save;
            }
            if let Some(e) = too_long() {
                return Err(e);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Ok((asked_at, last_save))
    }

    /// The fallback where SYNC is refused: BGSAVE (after a save already running ends), wait
    /// until it has finished, then the server's RDB file at `rdb_path`, opened for the
    /// caller to copy (and check). The open file must be the one the server saves to, where
    /// CONFIG says which, and written by this BGSAVE (its time, and the save time the RDB
    /// itself records): a stale file at a wrong path would otherwise pass for a fresh backup.
    pub async fn bgsave_rdb(&self, rdb_path: &Path) -> Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        let refused = |what: String| Error::new(ErrorKind::Source, what);
        let (asked_at, last_save) = self.bgsave().await?;
        let unreadable = |e: std::io::Error| {
            Error::new(
                ErrorKind::Source,
                format!(
                    "unable to read the RDB file '{}' of Redis at {}",
                    rdb_path.display(),
                    self.describe()
                ),
            )
            .with_source(e)
        };
        // Without blocking: a FIFO at the path would wait for a writer forever.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(rdb_path)
            .map_err(unreadable)?;
        let opened = file.metadata().map_err(unreadable)?;
        if !opened.is_file() {
            return Err(refused(format!(
                "rdb_path '{}' is not a regular file, so it is not the RDB Redis at {} saves",
                rdb_path.display(),
                self.describe()
            )));
        }
        // The file the server saved, asked now that it has: `dbfilename` may have changed.
        let server_path = self.rdb_file().await?;
        match &server_path {
            Some(saved) => match same_rdb_file(saved, rdb_path, Some(&opened)) {
                Some(true) => {}
                Some(false) => return Err(not_the_saved_file(self, rdb_path, saved)),
                None => tracing::warn!(
                    rdb_path = %rdb_path.display(),
                    server_path = %saved.display(),
                    "the server saves in a directory this host does not have (a container?); the RDB file is judged by its times alone"
                ),
            },
            None => tracing::warn!(
                rdb_path = %rdb_path.display(),
                "CONFIG GET is not allowed; the RDB file is judged by its times alone"
            ),
        }
        let at = |time: DateTime<Utc>| time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let lastsave = DateTime::<Utc>::from_timestamp(last_save, 0).unwrap_or_default();
        let server_named = server_path
            .map(|p| format!(" (CONFIG names '{}')", p.display()))
            .unwrap_or_default();
        let stale = |written: DateTime<Utc>, how: &str| {
            refused(format!(
                "the RDB file '{}' {how} {}, before the BGSAVE lifeboat asked for at {} (the server finished it at {}, LASTSAVE): it is not the file Redis at {} saves{server_named}, so backing it up would pass old data for new",
                rdb_path.display(),
                at(written),
                at(asked_at.into()),
                at(lastsave),
                self.describe()
            ))
            .with_hint("set rdb_path to the file named by the server's dir and dbfilename (CONFIG GET dir, CONFIG GET dbfilename)")
        };
        // File times, and the `time()` Redis writes as `ctime`, come from the kernel's coarse
        // clock, which lags the one lifeboat reads by up to a tick.
        let modified = opened.modified().map_err(unreadable)?;
        if modified + COARSE_CLOCK_LAG < asked_at {
            return Err(stale(modified.into(), "was last written at"));
        }
        let mut head = vec![0; rdb::HEAD_LEN];
        let read = std::os::unix::fs::FileExt::read_at(&file, &mut head, 0).map_err(unreadable)?;
        let asked_second = DateTime::<Utc>::from(asked_at - COARSE_CLOCK_LAG).timestamp();
        if let Some(saved) = rdb::saved_at(&head[..read]).filter(|saved| *saved < asked_second) {
            return Err(stale(
                DateTime::<Utc>::from_timestamp(saved, 0).unwrap_or_default(),
                "says (its ctime field) it was saved at",
            ));
        }
        Ok(file)
    }
}

/// Whether `rdb_path` (`ours`, its metadata where it exists) is the file `saved` the server
/// saves to: by device and inode where both exist, by name where neither does yet; None
/// where the server's directory is not on this host (Redis in a container).
fn same_rdb_file(saved: &Path, rdb_path: &Path, ours: Option<&std::fs::Metadata>) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(saved), ours) {
        (Ok(server), Some(ours)) => Some((server.dev(), server.ino()) == (ours.dev(), ours.ino())),
        (Err(_), _) if !saved.parent().is_some_and(Path::exists) => None,
        (Err(_), None) => Some(saved.components().eq(rdb_path.components())),
        _ => Some(false),
    }
}

fn not_the_saved_file(server: &RedisServer, rdb_path: &Path, saved: &Path) -> Error {
    Error::new(
        ErrorKind::Source,
        format!(
            "rdb_path '{}' is not the file Redis at {} saves its RDB to: CONFIG GET dir and dbfilename say '{}'",
            rdb_path.display(),
            server.describe(),
            saved.display()
        ),
    )
    .with_hint("set rdb_path to the file the server saves (or the server's dir and dbfilename to rdb_path's)")
}

/// What `check` says of a job's `rdb_path`: the file the server saves to, where CONFIG tells;
/// an error where it is another file.
pub async fn check_rdb_path(server: &RedisServer, rdb_path: &Path) -> Result<String> {
    let Some(saved) = server.rdb_file().await? else {
        return Ok(format!(
            "rdb_path '{}': CONFIG GET is not allowed, so a backup judges the file by its times alone",
            rdb_path.display()
        ));
    };
    match same_rdb_file(&saved, rdb_path, std::fs::metadata(rdb_path).ok().as_ref()) {
        Some(true) => {}
        Some(false) => return Err(not_the_saved_file(server, rdb_path, &saved)),
        None => {
            return Ok(format!(
                "rdb_path '{}': the server saves to '{}', in a directory this host does not have (a container?), so a backup judges the file by its times alone",
                rdb_path.display(),
                saved.display()
            ));
        }
    }
    Ok(format!(
        "rdb_path '{}': the file the server saves to",
        rdb_path.display()
    ))
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
    fn info_replication_tells_a_replica_and_its_link() {
        assert_eq!(
            super::parse_replication("# Replication\r\nrole:master\r\nconnected_slaves:1\r\n"),
            None
        );
        let up = super::parse_replication(
            "role:slave\r\nmaster_host:10.0.0.5\r\nmaster_port:6380\r\nmaster_link_status:up\r\nmaster_last_io_seconds_ago:4\r\n",
        )
        .unwrap();
        assert_eq!(
            (up.primary.as_str(), up.link_up, up.last_io_seconds),
            ("10.0.0.5:6380", true, Some(4))
        );
        let down = super::parse_replication(
            "role:slave\r\nmaster_host:h\r\nmaster_port:1\r\nmaster_link_status:down\r\nmaster_last_io_seconds_ago:-1\r\nmaster_link_down_since_seconds:93\r\n",
        )
        .unwrap();
        assert_eq!(
            (down.link_up, down.last_io_seconds, down.down_seconds),
            (false, None, Some(93))
        );
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
