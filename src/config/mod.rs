//! The config file: parsed from TOML into raw structs that mirror what users write, then
//! validated into [`Config`], whose values are ready to use. Every validation error names the
//! file, the field and the value. Depends only on `error`.

mod raw;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/lifeboat/lifeboat.toml";
pub const EXAMPLE: &str = include_str!("example.toml");

const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;
const DEFAULT_PART_SIZE: u64 = 8 * 1024 * 1024;
const DEFAULT_PARTS_IN_FLIGHT: usize = 4;
/// The most a backup's uploads hold in memory at once: `part_size × parts_in_flight`,
/// summed over the S3 repositories it writes to at the same time.
const MAX_UPLOAD_MEMORY: u64 = 8 * 1024 * 1024 * 1024;
const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// How far a host's clock may be from its repositories' unless the config says otherwise.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(120);
/// Below this, a reading's own error (S3's `Date` has whole seconds) would count as skew.
const MIN_MAX_CLOCK_SKEW: Duration = Duration::from_secs(2);
/// Beyond this, "tolerated" skew would let a backup dated a year ahead pass as the newest.
const MAX_MAX_CLOCK_SKEW: Duration = Duration::from_secs(86_400);

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub targets: Targets,
    pub compression: Compression,
    /// age encryption of every stored object, when configured.
    pub encryption: Option<Encryption>,
    /// Signed manifests: the key this host signs with, and the keys readers accept.
    pub signing: Signing,
    pub repositories: Vec<RepositoryConfig>,
    /// How many repositories must hold a backup for it to count at all.
    pub min_repositories: usize,
    /// How far this host's clock may be from a repository's before runs that record times
    /// refuse.
    pub max_clock_skew: Duration,
    /// Where the per-job run locks live: a local directory, never a network file system.
    pub lock_dir: PathBuf,
    /// A Redis server holding the job locks too, for jobs that several hosts may run.
    pub shared_lock: Option<RedisJob>,
    /// Where Prometheus textfile metrics go (node_exporter's textfile collector directory).
    pub metrics_dir: Option<PathBuf>,
    /// When the maintenance commands and drills run, for `lifeboat schedule`.
    pub schedules: Schedules,
    pub jobs: Vec<JobConfig>,
}

/// age encryption: who can read what is stored, and where this host's own identity is
/// (only restores and drills need one).
#[derive(Debug, Clone)]
pub struct Encryption {
    /// Public keys (`age1…`) every object is encrypted to, in the order configured.
    pub recipients: crate::keys::Recipients,
    pub identity_file: Option<PathBuf>,
}

/// `[signing]`: see `signing`.
#[derive(Debug, Clone, Default)]
pub struct Signing {
    /// The secret key this host signs manifests with (backup hosts only).
    pub key_file: Option<PathBuf>,
    /// The public keys whose signatures readers accept; empty: none required.
    pub trust: crate::signing::Trust,
}

impl Signing {
    /// The key this host signs with, when it has one; refused when `trusted_signers` would
    /// refuse what it signs.
    pub fn signer(&self) -> crate::error::Result<Option<crate::signing::Signer>> {
        let Some(path) = &self.key_file else {
            return Ok(None);
        };
        let signer = crate::signing::Signer::load(path)?;
        if self.trust.required() && !self.trust.trusts(&signer.public_key()) {
            return Err(crate::error::Error::usage(format!(
                "signing.key_file '{}' (key {}) is not among signing.trusted_signers: what it signs would be refused",
                path.display(),
                signer.key_id()
            ))
            .with_hint(format!(
                "add its public key \"{}\" to trusted_signers",
                signer.public_key()
            )));
        }
        Ok(Some(signer))
    }
}

/// Calendar expressions in systemd's OnCalendar syntax (`hourly`, `*-*-* 03:00:00`).
#[derive(Debug, Clone, Default)]
pub struct Schedules {
    pub prune: Option<String>,
    pub replicate: Option<String>,
    /// Drill files, each with its own `schedule`.
    pub drills: Vec<PathBuf>,
    /// `verify JOB --backup latest` of each job with a backup schedule; None: no verify timer.
    pub verify: Option<String>,
    /// `status` (rewriting lifeboat.prom where metrics_dir is set); None: no status timer.
    pub status: Option<String>,
    /// The user (and group of that name) the units run as; None: root.
    pub user: Option<String>,
    /// Read by every unit for credentials (`AWS_*`, `LIFEBOAT_IDENTITY_FILE`, …) when it exists.
    pub environment_file: PathBuf,
    /// A program the failure hook runs with the failed unit's name as its one argument.
    pub on_failure: Option<String>,
}

pub const DEFAULT_VERIFY_SCHEDULE: &str = "weekly";
pub const DEFAULT_STATUS_SCHEDULE: &str = "*:0/15";
pub const DEFAULT_UNIT_USER: &str = "lifeboat";
pub const DEFAULT_ENVIRONMENT_FILE: &str = "/etc/lifeboat/environment";
/// Written for `verify`/`status` to say there is no such timer.
const NO_SCHEDULE: &str = "off";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Targets {
    pub rto: Duration,
    pub rpo: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    pub level: i32,
    /// zstd worker threads; at least 1.
    pub threads: u32,
}

#[derive(Debug, Clone)]
pub struct RepositoryConfig {
    pub name: String,
    pub location: Location,
}

#[derive(Debug, Clone)]
pub enum Location {
    Local { path: PathBuf },
    S3(Box<S3Settings>),
}

impl Location {
    /// Whether two locations are one storage: the same bucket and prefix at the same
    /// endpoint, or the same directory however it is spelled (and, where both exist, after
    /// symlinks).
    pub fn same_storage(&self, other: &Location) -> bool {
        match (self, other) {
            (Location::Local { path: a }, Location::Local { path: b }) => {
                a.components().eq(b.components())
                    || matches!(
                        (std::fs::canonicalize(a), std::fs::canonicalize(b)),
                        (Ok(a), Ok(b)) if a == b
                    )
            }
            (Location::S3(a), Location::S3(b)) => {
                let endpoint = |s: &S3Settings| {
                    s.endpoint
                        .as_deref()
                        .map(|e| e.trim_end_matches('/').to_ascii_lowercase())
                };
                let prefix = |s: &S3Settings| {
                    s.prefix
                        .split('/')
                        .filter(|part| !part.is_empty())
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                };
                a.bucket == b.bucket
                    && prefix(a) == prefix(b)
                    && endpoint(a) == endpoint(b)
                    && (a.endpoint.is_some() || a.region == b.region)
            }
            _ => false,
        }
    }

    /// Where it is, for messages: a path, or `s3://bucket/prefix`.
    pub fn describe(&self) -> String {
        match self {
            Location::Local { path } => format!("'{}'", path.display()),
            Location::S3(s3) => format!("s3://{}/{}", s3.bucket, s3.prefix),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestChecksums {
    /// Only the checksums lifeboat computes itself (sha256 per part) are sent.
    WhenRequired,
    /// Also the SDK's default checksum trailers; some S3-compatible servers reject these.
    WhenSupported,
}

#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    /// Empty, or ends without a slash: keys are `PREFIX/...`.
    pub prefix: String,
    pub region: String,
    pub endpoint: Option<String>,
    pub path_style: bool,
    pub profile: Option<String>,
    pub part_size: u64,
    pub parts_in_flight: usize,
    pub max_attempts: u32,
    /// How long one attempt of a request may take, its body included, before it is retried.
    pub attempt_timeout: Duration,
    /// How long a download may receive nothing before it is abandoned as stalled.
    pub stall_timeout: Duration,
    pub request_checksums: RequestChecksums,
    /// Backups and WAL written with a retain-until date, so that a stolen credential cannot
    /// delete or overwrite them before it passes.
    pub object_lock: Option<ObjectLock>,
    /// Server-side encryption asked of S3 for every object written.
    pub sse: Option<ServerSideEncryption>,
}

/// S3 server-side encryption, passed through as `x-amz-server-side-encryption` (and the
/// KMS key id): the bucket's keys at rest, on top of (or instead of) lifeboat's own age.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSideEncryption {
    /// "AES256", "aws:kms" or "aws:kms:dsse".
    pub algorithm: String,
    pub kms_key_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectLockMode {
    /// Users with `s3:BypassGovernanceRetention` can still remove objects.
    Governance,
    /// Nobody, not even the account root, can remove objects before the date.
    Compliance,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    pub mode: ObjectLockMode,
    pub days: u32,
}

#[derive(Debug, Clone)]
pub struct JobConfig {
    pub name: String,
    pub schedule: Option<String>,
    pub retention: Option<Retention>,
    pub source: JobSource,
}

#[derive(Debug, Clone)]
pub enum JobSource {
    Files(FilesJob),
    Postgres(PostgresJob),
    Redis(RedisJob),
}

/// A Redis server, backed up over a replication connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisJob {
    /// `redis://host:port[/db]`: never a password.
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    /// Else REDISCLI_AUTH, else no AUTH.
    pub password_file: Option<PathBuf>,
    pub heartbeat: bool,
    /// Where the server writes its RDB file, for servers that refuse SYNC: lifeboat then
    /// asks for BGSAVE and reads this file once LASTSAVE moves.
    pub rdb_path: Option<PathBuf>,
    /// The primary of a replica `url` names (`primary_url`), same credentials: where the
    /// heartbeat is written when the server backed up is a read-only replica.
    pub primary: Option<(String, u16)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostgresMode {
    /// pg_dump per database plus the globals.
    Logical,
    /// A pg_basebackup tar stream, with WAL archived continuously by `wal-push`.
    Physical,
}

/// Where and how to reach a PostgreSQL server. Either a `dsn` (URL or key=value) or the
/// separate fields; the password never comes from here but from `password_file`,
/// PGPASSWORD or a passfile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostgresConnection {
    pub dsn: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub dbname: Option<String>,
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct PostgresJob {
    pub mode: PostgresMode,
    pub connection: PostgresConnection,
    /// None: every database that accepts connections and is not a template.
    pub databases: Option<Vec<String>>,
    pub bin_dir: Option<PathBuf>,
    pub heartbeat: bool,
}

#[derive(Debug, Clone)]
pub struct FilesJob {
    /// As written: a trailing '/' says a symlink in the path's place is followed.
    pub paths: Vec<PathBuf>,
    /// Every path's symlink is followed, trailing '/' or not.
    pub follow: bool,
    /// What lifeboat writes itself (local repositories, the lock directory), by what it is:
    /// passed over where a path holds it.
    pub lifeboats_own: Vec<(String, PathBuf)>,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

impl FilesJob {
    /// Whether a symlink at the configured `path` is stored as the directory (or file) it
    /// points to, under the path's own name, rather than as the link: a trailing '/', as
    /// tar and rsync read it, or `follow = true`.
    pub fn follows(&self, path: &Path) -> bool {
        self.follow || FilesJob::ends_with_slash(path)
    }

    /// Whether `path` ends with '/' or '/.' (not '/' itself): to tar and the kernel, the
    /// directory a symlink there points to.
    pub fn ends_with_slash(path: &Path) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let bytes = path.as_os_str().as_bytes();
        path.components()
            .any(|c| matches!(c, std::path::Component::Normal(_)))
            && (bytes.ends_with(b"/") || bytes.ends_with(b"/."))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    pub keep_within: Option<Duration>,
}

impl Config {
    /// The recipients of `[encryption]`, or None when objects are stored unencrypted.
    pub fn recipients(&self) -> Option<crate::keys::Recipients> {
        self.encryption.as_ref().map(|e| e.recipients.clone())
    }

    /// The identities that open stored objects: `LIFEBOAT_IDENTITY_FILE` if set, else
    /// `[encryption] identity_file`, else none.
    pub fn keyring(&self) -> crate::keys::Keyring {
        crate::keys::Keyring::from_env_or(
            self.encryption
                .as_ref()
                .and_then(|e| e.identity_file.clone()),
        )
    }

    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let mut err = Error::config(format!("unable to read config file '{}'", path.display()))
                .with_source(e);
            if !path.exists() {
                err = err.with_hint(format!(
                    "run `lifeboat --config {} init` to write an example config",
                    path.display()
                ));
            }
            err
        })?;
        Config::parse(&text, path)
    }

    /// Parses config text; `path` is only used to name the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| {
            Error::config(format!(
                "unable to parse config file '{}': {}",
                path.display(),
                e.to_string().trim_end()
            ))
        })?;
        validate(raw, path).map_err(|problem| {
            Error::config(format!(
                "invalid config file '{}': {problem}",
                path.display()
            ))
        })
    }

    pub fn job(&self, name: &str) -> Result<&JobConfig> {
        self.jobs.iter().find(|j| j.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.jobs.iter().map(|j| j.name.as_str()).collect();
            Error::usage(format!(
                "unable to find job '{name}' in config file '{}'",
                self.path.display()
            ))
            .with_hint(format!("configured jobs: {}", known.join(", ")))
        })
    }

    pub fn repository(&self, name: &str) -> Result<&RepositoryConfig> {
        self.repositories
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self.repositories.iter().map(|r| r.name.as_str()).collect();
                Error::usage(format!(
                    "unable to find repository '{name}' in config file '{}'",
                    self.path.display()
                ))
                .with_hint(format!("configured repositories: {}", known.join(", ")))
            })
    }
}

impl JobConfig {
    pub fn kind_name(&self) -> &'static str {
        match self.source {
            JobSource::Files(_) => "files",
            JobSource::Postgres(PostgresJob {
                mode: PostgresMode::Logical,
                ..
            }) => "postgres-logical",
            JobSource::Postgres(PostgresJob {
                mode: PostgresMode::Physical,
                ..
            }) => "postgres-physical",
            JobSource::Redis(_) => "redis",
        }
    }
}

/// A validation problem: the dotted field path and what is wrong with its value.
type Problem = String;

fn validate(raw: raw::RawConfig, path: &Path) -> Result<Config, Problem> {
    let targets = raw.targets.unwrap_or_default();
    let targets = Targets {
        rto: duration_field("targets.rto", targets.rto.as_deref(), "4h")?,
        rpo: duration_field("targets.rpo", targets.rpo.as_deref(), "1h")?,
    };

    let compression = raw.compression.unwrap_or_default();
    let level = compression.level.unwrap_or(3);
    if !(1..=19).contains(&level) {
        return Err(format!(
            "compression.level: must be between 1 and 19 (got {level})"
        ));
    }
    let threads = match compression.threads.unwrap_or(0) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        n if n <= 256 => n,
        n => {
            return Err(format!(
                "compression.threads: must be at most 256 (got {n})"
            ));
        }
    };

    if raw.repository.is_empty() {
        return Err("repository: at least one [[repository]] is required".into());
    }
    let mut names = HashSet::new();
    let mut repositories = Vec::new();
    for (index, repo) in raw.repository.into_iter().enumerate() {
        let repository = validate_repository(index, repo)?;
        if !names.insert(repository.name.clone()) {
            return Err(format!(
                "repository[{index}].name: duplicate repository name \"{}\"",
                repository.name
            ));
        }
        repositories.push(repository);
    }

    // One storage under two names would count one copy as two, and every backup would
    // report the second as missing.
    for (index, repository) in repositories.iter().enumerate() {
        for earlier in &repositories[..index] {
            if earlier.location.same_storage(&repository.location) {
                return Err(format!(
                    "repository[{index}] ({}): stores where repository '{}' stores ({}); one storage listed twice would count one copy as two: keep one",
                    repository.name,
                    earlier.name,
                    repository.location.describe()
                ));
            }
        }
    }
    let held: Vec<(String, u64, usize)> = repositories
        .iter()
        .filter_map(|r| match &r.location {
            Location::S3(s3) => Some((r.name.clone(), s3.part_size, s3.parts_in_flight)),
            Location::Local { .. } => None,
        })
        .collect();
    let total: u64 = held
        .iter()
        .map(|(_, size, count)| size.saturating_mul(*count as u64))
        .sum();
    if total > MAX_UPLOAD_MEMORY {
        let terms: Vec<String> = held
            .iter()
            .map(|(name, size, count)| format!("{} × {count} ('{name}')", human_bytes(*size)))
            .collect();
        return Err(format!(
            "repository: part_size × parts_in_flight over the S3 repositories is {} = {}, more than the {} a backup may hold in memory for its uploads; lower part_size or parts_in_flight",
            terms.join(" + "),
            human_bytes(total),
            human_bytes(MAX_UPLOAD_MEMORY)
        ));
    }

    let min_repositories = match raw.min_repositories.unwrap_or(1) {
        n if n >= 1 && n as usize <= repositories.len() => n as usize,
        n => {
            return Err(format!(
                "min_repositories: must be between 1 and the number of repositories, {} (got {n})",
                repositories.len()
            ));
        }
    };

    let max_clock_skew = match &raw.max_clock_skew {
        Some(text) => match parse_duration("max_clock_skew", text)? {
            skew if skew < MIN_MAX_CLOCK_SKEW => {
                return Err(format!(
                    "max_clock_skew: must be at least 2s, the error of reading a clock (got \"{text}\")"
                ));
            }
            skew if skew > MAX_MAX_CLOCK_SKEW => {
                return Err(format!(
                    "max_clock_skew: must be at most 1day; a clock further off is to be fixed, not tolerated (got \"{text}\")"
                ));
            }
            skew => skew,
        },
        None => DEFAULT_MAX_CLOCK_SKEW,
    };
    let lock_dir = match raw.lock_dir {
        Some(dir) if dir.is_absolute() => dir,
        Some(dir) => {
            return Err(format!(
                "lock_dir: must be an absolute path (got \"{}\")",
                dir.display()
            ));
        }
        None => default_lock_dir(),
    };
    let shared_lock = match &raw.lock {
        Some(url) => {
            let (host, port) = parse_redis_url("lock", url)?;
            if let Some(path) = raw.lock_password_file.as_ref().filter(|p| !p.is_absolute()) {
                return Err(format!(
                    "lock_password_file: must be an absolute path (got \"{}\")",
                    path.display()
                ));
            }
            Some(RedisJob {
                host,
                port,
                username: raw.lock_username.clone(),
                password_file: raw.lock_password_file.clone(),
                heartbeat: false,
                rdb_path: None,
                primary: None,
            })
        }
        None if raw.lock_username.is_some() || raw.lock_password_file.is_some() => {
            return Err(
                "lock_username, lock_password_file: only valid with lock = \"redis://...\""
                    .to_string(),
            );
        }
        None => None,
    };
    if let Some(dir) = raw.metrics_dir.as_ref().filter(|d| !d.is_absolute()) {
        return Err(format!(
            "metrics_dir: must be an absolute path (got \"{}\")",
            dir.display()
        ));
    }

    let raw_schedule = raw.schedule.unwrap_or_default();
    for (field, value) in [
        ("schedule.prune", &raw_schedule.prune),
        ("schedule.replicate", &raw_schedule.replicate),
        ("schedule.verify", &raw_schedule.verify),
        ("schedule.status", &raw_schedule.status),
        ("schedule.user", &raw_schedule.user),
        ("schedule.on_failure", &raw_schedule.on_failure),
    ] {
        if value.as_ref().is_some_and(|v| v.trim().is_empty()) {
            return Err(format!("{field}: must not be empty"));
        }
    }
    // A number would be a uid to systemd (`User=0` is root), not a name.
    if let Some(user) = &raw_schedule.user
        && (!user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            || !user.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'))
    {
        return Err(format!(
            "schedule.user: \"{user}\" is not a user name (a letter or '_', then letters, digits, '-', '_', '.')"
        ));
    }
    if let Some(file) = raw_schedule
        .environment_file
        .as_ref()
        .filter(|f| !f.is_absolute())
    {
        return Err(format!(
            "schedule.environment_file: must be an absolute path (got \"{}\")",
            file.display()
        ));
    }
    if let Some(command) = &raw_schedule.on_failure
        && !command.starts_with('/')
    {
        return Err(format!(
            "schedule.on_failure: must start with the program's absolute path (got \"{command}\")"
        ));
    }
    let off_or = |value: Option<String>, default: &str| match value {
        Some(v) if v.trim() == NO_SCHEDULE => None,
        Some(v) => Some(v),
        None => Some(default.to_string()),
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let schedules = Schedules {
        prune: raw_schedule.prune,
        replicate: raw_schedule.replicate,
        drills: raw_schedule.drills.iter().map(|d| base.join(d)).collect(),
        verify: off_or(raw_schedule.verify, DEFAULT_VERIFY_SCHEDULE),
        status: off_or(raw_schedule.status, DEFAULT_STATUS_SCHEDULE),
        user: match raw_schedule.user {
            Some(user) if user == "root" => None,
            Some(user) => Some(user),
            None => Some(DEFAULT_UNIT_USER.to_string()),
        },
        environment_file: raw_schedule
            .environment_file
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ENVIRONMENT_FILE)),
        on_failure: raw_schedule.on_failure,
    };

    let encryption = raw
        .encryption
        .map(|encryption| validate_encryption(encryption, base))
        .transpose()?;

    let signing = match raw.signing {
        None => Signing::default(),
        Some(raw) => {
            let mut keys = Vec::new();
            for (index, text) in raw.trusted_signers.iter().enumerate() {
                keys.push(
                    crate::signing::parse_public_key(text)
                        .map_err(|e| format!("signing.trusted_signers[{index}]: {e}"))?,
                );
            }
            if raw.key_file.is_none() && keys.is_empty() {
                return Err("signing: set key_file (to sign), trusted_signers (to require signatures), or both; `lifeboat keygen --signing --output FILE` makes a key".into());
            }
            Signing {
                key_file: raw.key_file.map(|f| base.join(f)),
                trust: crate::signing::Trust::new(keys),
            }
        }
    };

    let mut names = HashSet::new();
    let mut jobs = Vec::new();
    // What lifeboat itself writes is never part of a files job: a local repository or the
    // lock directory beneath a path would otherwise hold every earlier backup again.
    let own: Vec<(String, PathBuf)> = repositories
        .iter()
        .filter_map(|r| match &r.location {
            Location::Local { path } => Some((format!("repository '{}'", r.name), path.clone())),
            Location::S3(_) => None,
        })
        .chain([("the lock directory".to_string(), lock_dir.clone())])
        .collect();
    for (index, job) in raw.job.into_iter().enumerate() {
        let mut job = validate_job(index, job)?;
        if let JobSource::Files(files) = &mut job.source {
            files.lifeboats_own = own.clone();
        }
        if !names.insert(job.name.clone()) {
            return Err(format!(
                "job[{index}].name: duplicate job name \"{}\"",
                job.name
            ));
        }
        jobs.push(job);
    }

    Ok(Config {
        path: path.to_path_buf(),
        targets,
        compression: Compression { level, threads },
        encryption,
        signing,
        repositories,
        min_repositories,
        max_clock_skew,
        lock_dir,
        shared_lock,
        metrics_dir: raw.metrics_dir,
        schedules,
        jobs,
    })
}

/// Recipients from the config and from `recipients_file` (one per line, `#` comments, as
/// `age -R` reads them), each checked; relative paths are relative to the config file.
fn validate_encryption(raw: raw::RawEncryption, base: &Path) -> Result<Encryption, Problem> {
    let mut recipients = Vec::new();
    for (index, text) in raw.recipients.iter().enumerate() {
        crate::keys::parse_recipient(text)
            .map_err(|e| format!("encryption.recipients[{index}]: {e}"))?;
        recipients.push(text.trim().to_string());
    }
    if let Some(file) = &raw.recipients_file {
        let file = base.join(file);
        let text = std::fs::read_to_string(&file).map_err(|e| {
            format!(
                "encryption.recipients_file: unable to read '{}': {e}",
                file.display()
            )
        })?;
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            crate::keys::parse_recipient(line).map_err(|e| {
                format!(
                    "encryption.recipients_file: '{}' line {}: {e}",
                    file.display(),
                    number + 1
                )
            })?;
            recipients.push(line.to_string());
        }
    }
    if recipients.is_empty() {
        return Err("encryption: at least one recipient is required (recipients = [\"age1…\"] or recipients_file); `lifeboat keygen --output FILE` makes a key pair".into());
    }
    let mut seen = HashSet::new();
    recipients.retain(|r| seen.insert(r.clone()));
    Ok(Encryption {
        // Each one was parsed above, naming where it was written.
        recipients: crate::keys::Recipients::parse(&recipients)
            .map_err(|e| format!("encryption.recipients: {e}"))?,
        identity_file: raw.identity_file.map(|f| base.join(f)),
    })
}

/// /run/lock/lifeboat where the system has /run/lock (a tmpfs: nothing stale survives a
/// reboot), else a directory under the temp dir.
fn default_lock_dir() -> PathBuf {
    let run_lock = Path::new("/run/lock");
    if run_lock.is_dir() {
        run_lock.join("lifeboat")
    } else {
        std::env::temp_dir().join("lifeboat-locks")
    }
}

pub(crate) fn validate_name(field: &str, name: &str) -> Result<(), Problem> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{field}: must be 1-64 characters of letters, digits, '-', '_' or '.', not starting with '.' (got \"{name}\")"
        ))
    }
}

fn validate_repository(
    index: usize,
    repo: raw::RawRepository,
) -> Result<RepositoryConfig, Problem> {
    let at = |field: &str| match &repo.name {
        Some(name) => format!("repository[{index}] ({name}).{field}"),
        None => format!("repository[{index}].{field}"),
    };
    let name = repo
        .name
        .clone()
        .ok_or_else(|| format!("{}: is required", at("name")))?;
    validate_name(&at("name"), &name)?;
    let kind = repo
        .r#type
        .as_deref()
        .ok_or_else(|| format!("{}: is required (\"s3\" or \"local\")", at("type")))?;

    let s3_only = [
        ("bucket", repo.bucket.is_some()),
        ("prefix", repo.prefix.is_some()),
        ("region", repo.region.is_some()),
        ("endpoint", repo.endpoint.is_some()),
        ("path_style", repo.path_style.is_some()),
        ("profile", repo.profile.is_some()),
        ("part_size", repo.part_size.is_some()),
        ("parts_in_flight", repo.parts_in_flight.is_some()),
        ("max_attempts", repo.max_attempts.is_some()),
        ("attempt_timeout", repo.attempt_timeout.is_some()),
        ("stall_timeout", repo.stall_timeout.is_some()),
        ("request_checksums", repo.request_checksums.is_some()),
        ("object_lock", repo.object_lock.is_some()),
        ("sse", repo.sse.is_some()),
        ("sse_kms_key_id", repo.sse_kms_key_id.is_some()),
    ];
    let location = match kind {
        "local" => {
            if let Some((field, _)) = s3_only.iter().find(|(_, set)| *set) {
                return Err(format!("{}: only valid for type = \"s3\"", at(field)));
            }
            let path = repo
                .path
                .ok_or_else(|| format!("{}: is required for type = \"local\"", at("path")))?;
            if !path.is_absolute() {
                return Err(format!(
                    "{}: must be an absolute path (got \"{}\")",
                    at("path"),
                    path.display()
                ));
            }
            // A file where the repository should be: every write would fail deep in a run.
            if std::fs::metadata(&path).is_ok_and(|meta| meta.is_file()) {
                return Err(format!(
                    "{}: '{}' is a file, not a directory",
                    at("path"),
                    path.display()
                ));
            }
            Location::Local { path }
        }
        "s3" => {
            if repo.path.is_some() {
                return Err(format!("{}: only valid for type = \"local\"", at("path")));
            }
            let bucket = repo
                .bucket
                .ok_or_else(|| format!("{}: is required for type = \"s3\"", at("bucket")))?;
            if bucket.trim().is_empty() {
                return Err(format!("{}: must not be empty", at("bucket")));
            }
            let region = repo
                .region
                .ok_or_else(|| format!("{}: is required for type = \"s3\"", at("region")))?;
            if region.trim().is_empty() {
                return Err(format!("{}: must not be empty", at("region")));
            }
            let prefix = repo
                .prefix
                .unwrap_or_default()
                .trim_matches('/')
                .to_string();
            if prefix.split('/').any(|part| part == ".." || part == ".") {
                return Err(format!(
                    "{}: must not contain '.' or '..' segments (got \"{prefix}\")",
                    at("prefix")
                ));
            }
            if let Some(endpoint) = &repo.endpoint {
                validate_endpoint(&at("endpoint"), endpoint)?;
            }
            let part_size = match repo.part_size.as_deref() {
                None => DEFAULT_PART_SIZE,
                Some(text) => parse_size(&at("part_size"), text)?,
            };
            if part_size < MIN_PART_SIZE {
                return Err(format!(
                    "{}: must be at least 5 MiB (got {part_size})",
                    at("part_size")
                ));
            }
            if part_size > MAX_PART_SIZE {
                return Err(format!(
                    "{}: must be at most 5 GiB (got {part_size})",
                    at("part_size")
                ));
            }
            let parts_in_flight = repo.parts_in_flight.unwrap_or(DEFAULT_PARTS_IN_FLIGHT);
            if !(1..=64).contains(&parts_in_flight) {
                return Err(format!(
                    "{}: must be between 1 and 64 (got {parts_in_flight})",
                    at("parts_in_flight")
                ));
            }
            let max_attempts = repo.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
            if !(1..=20).contains(&max_attempts) {
                return Err(format!(
                    "{}: must be between 1 and 20 (got {max_attempts})",
                    at("max_attempts")
                ));
            }
            // A part of 5 GiB at 20 MiB/s takes over four minutes.
            let attempt_timeout = duration_field(
                &at("attempt_timeout"),
                repo.attempt_timeout.as_deref(),
                "5min",
            )?;
            let stall_timeout =
                duration_field(&at("stall_timeout"), repo.stall_timeout.as_deref(), "2min")?;
            let request_checksums = match repo.request_checksums.as_deref() {
                None | Some("when_required") => RequestChecksums::WhenRequired,
                Some("when_supported") => RequestChecksums::WhenSupported,
                Some(other) => {
                    return Err(format!(
                        "{}: must be \"when_required\" or \"when_supported\" (got \"{other}\")",
                        at("request_checksums")
                    ));
                }
            };
            let object_lock = repo
                .object_lock
                .map(|lock| validate_object_lock(&at("object_lock"), lock))
                .transpose()?;
            let sse = match (repo.sse, repo.sse_kms_key_id) {
                (None, None) => None,
                (None, Some(_)) => {
                    return Err(format!(
                        "{}: only valid with sse = \"aws:kms\" or \"aws:kms:dsse\"",
                        at("sse_kms_key_id")
                    ));
                }
                (Some(algorithm), kms_key_id) => {
                    if !["AES256", "aws:kms", "aws:kms:dsse"].contains(&algorithm.as_str()) {
                        return Err(format!(
                            "{}: must be \"AES256\", \"aws:kms\" or \"aws:kms:dsse\" (got \"{algorithm}\")",
                            at("sse")
                        ));
                    }
                    if kms_key_id.is_some() && algorithm == "AES256" {
                        return Err(format!(
                            "{}: only valid with sse = \"aws:kms\" or \"aws:kms:dsse\"",
                            at("sse_kms_key_id")
                        ));
                    }
                    Some(ServerSideEncryption {
                        algorithm,
                        kms_key_id,
                    })
                }
            };
            Location::S3(Box::new(S3Settings {
                bucket,
                prefix,
                region,
                endpoint: repo.endpoint,
                path_style: repo.path_style.unwrap_or(false),
                profile: repo.profile,
                part_size,
                parts_in_flight,
                max_attempts,
                attempt_timeout,
                stall_timeout,
                request_checksums,
                object_lock,
                sse,
            }))
        }
        other => {
            return Err(format!(
                "{}: must be \"s3\" or \"local\" (got \"{other}\")",
                at("type")
            ));
        }
    };
    Ok(RepositoryConfig { name, location })
}

fn validate_object_lock(field: &str, lock: raw::RawObjectLock) -> Result<ObjectLock, Problem> {
    let mode = match lock.mode.as_deref() {
        Some("governance") => ObjectLockMode::Governance,
        Some("compliance") => ObjectLockMode::Compliance,
        Some(other) => {
            return Err(format!(
                "{field}.mode: must be \"governance\" or \"compliance\" (got \"{other}\")"
            ));
        }
        None => {
            return Err(format!(
                "{field}.mode: is required (\"governance\" or \"compliance\")"
            ));
        }
    };
    let days = lock
        .days
        .ok_or_else(|| format!("{field}.days: is required (days each backup stays locked)"))?;
    if !(1..=36_500).contains(&days) {
        return Err(format!(
            "{field}.days: must be between 1 and 36500 (got {days})"
        ));
    }
    Ok(ObjectLock {
        mode,
        days: days as u32,
    })
}

/// TLS is not optional off this machine: plain http is accepted for loopback endpoints only,
/// which is where S3-compatible test servers and local gateways live. The endpoint is read
/// with a URL parser, as the HTTP client reads it, so that the host judged is the host
/// connected to: `http://127.0.0.1:9000@192.0.2.2` names 192.0.2.2, with a user and password
/// before it. Credentials never go in the endpoint (the AWS chain supplies them).
fn validate_endpoint(field: &str, endpoint: &str) -> Result<(), Problem> {
    // Echoed in errors only when nothing in it can be a password.
    let shown = match endpoint.contains(['@', '?', '#']) {
        true => "an endpoint with '@', '?' or '#' in it, not repeated here: it may hold a secret"
            .to_string(),
        false => format!("\"{endpoint}\""),
    };
    let url = url::Url::parse(endpoint).map_err(|e| {
        format!("{field}: must be a URL such as \"https://s3.example.com\" (got {shown}: {e})")
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        // Named without what stands before '@': it may be a secret.
        let mut shown = url.clone();
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        return Err(format!(
            "{field}: must not hold a user or password (it holds something before '@', and would reach \"{shown}\", whose host is \"{}\"); the AWS credential chain supplies credentials",
            url.host_str().unwrap_or_default()
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{field}: must not have a query or fragment (got {shown})"
        ));
    }
    let Some(host) = url.host() else {
        return Err(format!("{field}: has no host (got \"{endpoint}\")"));
    };
    let loopback = match host {
        url::Host::Domain(name) => name == "localhost",
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(format!(
            "{field}: plain http is only allowed for loopback endpoints; use https (got \"{endpoint}\")"
        )),
        _ => Err(format!(
            "{field}: scheme must be https (got \"{endpoint}\")"
        )),
    }
}

fn validate_job(index: usize, job: raw::RawJob) -> Result<JobConfig, Problem> {
    let at = |field: &str| match &job.name {
        Some(name) => format!("job[{index}] ({name}).{field}"),
        None => format!("job[{index}].{field}"),
    };
    let name = job
        .name
        .clone()
        .ok_or_else(|| format!("{}: is required", at("name")))?;
    validate_name(&at("name"), &name)?;
    let kind = job.kind.as_deref().ok_or_else(|| {
        format!(
            "{}: is required (\"files\", \"postgres\" or \"redis\")",
            at("kind")
        )
    })?;
    let retention = job
        .retention
        .as_ref()
        .map(|r| -> Result<Retention, Problem> {
            Ok(Retention {
                keep_last: r.keep_last,
                keep_hourly: r.keep_hourly,
                keep_daily: r.keep_daily,
                keep_weekly: r.keep_weekly,
                keep_monthly: r.keep_monthly,
                keep_yearly: r.keep_yearly,
                keep_within: r
                    .keep_within
                    .as_deref()
                    .map(|text| parse_duration(&at("retention.keep_within"), text))
                    .transpose()?,
            })
        })
        .transpose()?;
    if let Some(schedule) = &job.schedule
        && schedule.trim().is_empty()
    {
        return Err(format!("{}: must not be empty", at("schedule")));
    }
    let postgres_only = [
        ("mode", job.mode.is_some()),
        ("dsn", job.dsn.is_some()),
        ("host", job.host.is_some()),
        ("port", job.port.is_some()),
        ("user", job.user.is_some()),
        ("dbname", job.dbname.is_some()),
        ("databases", job.databases.is_some()),
        ("bin_dir", job.bin_dir.is_some()),
    ];
    let server_fields = [
        ("password_file", job.password_file.is_some()),
        ("heartbeat", job.heartbeat.is_some()),
    ];
    let redis_only = [
        ("url", job.url.is_some()),
        ("username", job.username.is_some()),
        ("rdb_path", job.rdb_path.is_some()),
        ("primary_url", job.primary_url.is_some()),
    ];
    let files_fields = [
        ("paths", !job.paths.is_empty()),
        ("include", !job.include.is_empty()),
        ("exclude", !job.exclude.is_empty()),
        ("follow", job.follow.is_some()),
    ];
    let refuse_fields = |fields: &[(&str, bool)], kind: &str| -> Result<(), Problem> {
        match fields.iter().find(|(_, set)| *set) {
            Some((field, _)) => Err(format!("{}: not valid for kind = \"{kind}\"", at(field))),
            None => Ok(()),
        }
    };
    let source = match kind {
        "files" => {
            refuse_fields(&postgres_only, "files")?;
            refuse_fields(&server_fields, "files")?;
            refuse_fields(&redis_only, "files")?;
            JobSource::Files(validate_files_job(
                &at,
                job.paths,
                job.follow.unwrap_or(false),
                job.include,
                job.exclude,
            )?)
        }
        "postgres" => {
            refuse_fields(&files_fields, "postgres")?;
            refuse_fields(&redis_only, "postgres")?;
            JobSource::Postgres(validate_postgres_job(&at, &job)?)
        }
        "redis" => {
            refuse_fields(&files_fields, "redis")?;
            refuse_fields(&postgres_only, "redis")?;
            JobSource::Redis(validate_redis_job(&at, &job)?)
        }
        other => {
            return Err(format!(
                "{}: unknown kind \"{other}\" (supported: \"files\", \"postgres\", \"redis\")",
                at("kind")
            ));
        }
    };
    Ok(JobConfig {
        name,
        schedule: job.schedule,
        retention,
        source,
    })
}

fn validate_files_job(
    at: &dyn Fn(&str) -> String,
    paths: Vec<PathBuf>,
    follow: bool,
    include: Vec<String>,
    exclude: Vec<String>,
) -> Result<FilesJob, Problem> {
    if paths.is_empty() {
        return Err(format!(
            "{}: at least one path is required for kind = \"files\"",
            at("paths")
        ));
    }
    for path in &paths {
        if !path.is_absolute() {
            return Err(format!(
                "{}: must be absolute paths (got \"{}\")",
                at("paths"),
                path.display()
            ));
        }
        if path
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(format!(
                "{}: \"{}\" holds '..', which names another place once a symlink is on the way; write the path it means",
                at("paths"),
                path.display()
            ));
        }
    }
    for globs in [("include", &include), ("exclude", &exclude)] {
        let (field, globs) = globs;
        for glob in globs {
            globset::Glob::new(glob)
                .map_err(|e| format!("{}: invalid glob \"{glob}\": {e}", at(field)))?;
        }
    }
    Ok(FilesJob {
        paths,
        follow,
        lifeboats_own: Vec::new(),
        include,
        exclude,
    })
}

fn validate_postgres_job(
    at: &dyn Fn(&str) -> String,
    job: &raw::RawJob,
) -> Result<PostgresJob, Problem> {
    let mode = match job.mode.as_deref() {
        None | Some("logical") => PostgresMode::Logical,
        Some("physical") => PostgresMode::Physical,
        Some(other) => {
            return Err(format!(
                "{}: must be \"logical\" or \"physical\" (got \"{other}\")",
                at("mode")
            ));
        }
    };
    if let Some(dsn) = &job.dsn {
        if let Some((field, _)) = [
            ("host", job.host.is_some()),
            ("port", job.port.is_some()),
            ("user", job.user.is_some()),
            ("dbname", job.dbname.is_some()),
        ]
        .iter()
        .find(|(_, set)| *set)
        {
            return Err(format!(
                "{}: set either dsn or {field}, not both",
                at(field)
            ));
        }
        if dsn.trim().is_empty() {
            return Err(format!("{}: must not be empty", at("dsn")));
        }
        if dsn_has_password(dsn) {
            return Err(format!(
                "{}: must not contain a password; put it in a file named by password_file, or in PGPASSWORD or a passfile",
                at("dsn")
            ));
        }
    }
    if let Some(path) = &job.password_file
        && !path.is_absolute()
    {
        return Err(format!(
            "{}: must be an absolute path (got \"{}\")",
            at("password_file"),
            path.display()
        ));
    }
    if let Some(path) = &job.bin_dir
        && !path.is_absolute()
    {
        return Err(format!(
            "{}: must be an absolute path (got \"{}\")",
            at("bin_dir"),
            path.display()
        ));
    }
    if mode == PostgresMode::Physical && job.databases.is_some() {
        return Err(format!(
            "{}: not valid for mode = \"physical\", which backs up the whole cluster",
            at("databases")
        ));
    }
    if let Some(databases) = &job.databases {
        if databases.is_empty() {
            return Err(format!(
                "{}: must name at least one database, or be left out for all",
                at("databases")
            ));
        }
        if let Some(empty) = databases.iter().find(|d| d.is_empty()) {
            return Err(format!(
                "{}: database names must not be empty (got \"{empty}\")",
                at("databases")
            ));
        }
    }
    Ok(PostgresJob {
        mode,
        connection: PostgresConnection {
            dsn: job.dsn.clone(),
            host: job.host.clone(),
            port: job.port,
            user: job.user.clone(),
            dbname: job.dbname.clone(),
            password_file: job.password_file.clone(),
        },
        databases: job.databases.clone(),
        bin_dir: job.bin_dir.clone(),
        heartbeat: job.heartbeat.unwrap_or(false),
    })
}

fn validate_redis_job(at: &dyn Fn(&str) -> String, job: &raw::RawJob) -> Result<RedisJob, Problem> {
    let url = job.url.as_deref().ok_or_else(|| {
        format!(
            "{}: is required for kind = \"redis\" (\"redis://host:6379\")",
            at("url")
        )
    })?;
    let (host, port) = parse_redis_url(&at("url"), url)?;
    for (field, path) in [
        ("password_file", &job.password_file),
        ("rdb_path", &job.rdb_path),
    ] {
        if let Some(path) = path
            && !path.is_absolute()
        {
            return Err(format!(
                "{}: must be an absolute path (got \"{}\")",
                at(field),
                path.display()
            ));
        }
    }
    Ok(RedisJob {
        host,
        port,
        username: job.username.clone(),
        password_file: job.password_file.clone(),
        heartbeat: job.heartbeat.unwrap_or(false),
        rdb_path: job.rdb_path.clone(),
        primary: job
            .primary_url
            .as_deref()
            .map(|url| parse_redis_url(&at("primary_url"), url))
            .transpose()?,
    })
}

/// Host and port of `redis://host[:port][/db]`; never credentials, which belong in files.
fn parse_redis_url(field: &str, url: &str) -> Result<(String, u16), Problem> {
    // Echoed in errors only when nothing in it can be a password.
    let shown = match url.contains(['@', '?', '#']) {
        true => {
            "a URL with '@', '?' or '#' in it, not repeated here: it may hold a secret".to_string()
        }
        false => format!("\"{url}\""),
    };
    if url.contains(['?', '#']) {
        return Err(format!(
            "{field}: must be redis://host[:port][/db] (got {shown}); credentials go in the username and password_file fields"
        ));
    }
    let rest = url.strip_prefix("redis://").ok_or_else(|| {
        format!(
            "{field}: must start with redis:// (got {shown}); TLS (rediss://) is not supported yet"
        )
    })?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains('@') {
        return Err(format!(
            "{field}: must not hold a user or password; set the username and password_file fields"
        ));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|_| format!("{field}: invalid port \"{port}\""))?,
        ),
        None => (authority, 6379),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{field}: has no host (got \"{url}\")"));
    }
    Ok((host.to_string(), port))
}

/// A password in a DSN would end up in config backups, logs and child argv.
fn dsn_has_password(dsn: &str) -> bool {
    if let Some((_, rest)) = dsn.split_once("://") {
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let userinfo = authority
            .rsplit_once('@')
            .map(|(userinfo, _)| userinfo)
            .unwrap_or_default();
        return userinfo.contains(':') || rest.contains("password=");
    }
    dsn.split_whitespace()
        .any(|pair| pair.trim_start().starts_with("password"))
}

fn duration_field(field: &str, text: Option<&str>, default: &str) -> Result<Duration, Problem> {
    parse_duration(field, text.unwrap_or(default))
}

fn parse_duration(field: &str, text: &str) -> Result<Duration, Problem> {
    match bounded_duration(text) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!(
            "{field}: must be longer than zero (got \"{text}\")"
        )),
        Err(e) => Err(format!("{field}: {e}")),
    }
}

/// The longest duration lifeboat takes anywhere (config, drill files, the command line): a
/// longer one is a typo, and would overflow the time arithmetic it feeds. A year is 365.25
/// days, as humantime reads "100y".
pub const LONGEST_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// A duration as people write them ("4h", "90min", "1h 30min"), at most [`LONGEST_DURATION`].
pub fn bounded_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d <= LONGEST_DURATION => Ok(d),
        Ok(_) => Err(format!("must be at most 100 years (got \"{text}\")")),
        Err(e) => Err(format!(
            "invalid duration \"{text}\" ({e}); write it like \"4h\", \"90min\" or \"1h 30min\""
        )),
    }
}

/// A size as the config writes them: "5 GiB".
fn human_bytes(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

/// A size ("64MiB"), or a problem naming `field`.
pub fn parse_size(field: &str, text: &str) -> Result<u64, Problem> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|_| {
            format!("{field}: invalid size \"{text}\"; write it like \"8MiB\" or \"64MiB\"")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("/etc/lifeboat/test.toml"))
    }

    const LOCAL: &str =
        "[[repository]]\nname = \"local\"\ntype = \"local\"\npath = \"/var/backups\"\n";

    #[test]
    fn unit_settings_default_to_a_user_and_refuse_what_systemd_would_misread() {
        let config = parse(LOCAL).unwrap();
        assert_eq!(config.schedules.user.as_deref(), Some(DEFAULT_UNIT_USER));
        assert_eq!(config.schedules.verify.as_deref(), Some("weekly"));
        let config = parse(&format!(
            "[schedule]\nuser = \"root\"\nverify = \"off\"\nstatus = \"off\"\n{LOCAL}"
        ))
        .unwrap();
        assert_eq!(
            (
                config.schedules.user,
                config.schedules.verify,
                config.schedules.status
            ),
            (None, None, None)
        );
        for (setting, wanted) in [
            (
                "user = \"life boat\"",
                "schedule.user: \"life boat\" is not a user name",
            ),
            (
                "on_failure = \"page-oncall\"",
                "schedule.on_failure: must start with the program's absolute path",
            ),
            (
                "environment_file = \"env\"",
                "schedule.environment_file: must be an absolute path",
            ),
            ("verify = \"\"", "schedule.verify: must not be empty"),
            ("user = \"0\"", "schedule.user: \"0\" is not a user name"),
            ("user = \"-0\"", "schedule.user: \"-0\" is not a user name"),
        ] {
            let err = parse(&format!("[schedule]\n{setting}\n{LOCAL}")).unwrap_err();
            assert!(
                err.message().contains(wanted),
                "{setting}: {}",
                err.message()
            );
        }
    }

    #[test]
    fn one_storage_listed_twice_is_refused_naming_both() {
        for (first, second) in [
            (
                "type = \"local\"\npath = \"/var/backups\"",
                "type = \"local\"\npath = \"/var//backups/\"",
            ),
            (
                "type = \"s3\"\nbucket = \"b\"\nregion = \"r\"\nprefix = \"p\"",
                "type = \"s3\"\nbucket = \"b\"\nregion = \"r\"\nprefix = \"p/\"",
            ),
        ] {
            let err = parse(&format!(
                "[[repository]]\nname = \"one\"\n{first}\n[[repository]]\nname = \"two\"\n{second}\n"
            ))
            .unwrap_err();
            assert!(
                err.message()
                    .contains("repository[1] (two): stores where repository 'one' stores"),
                "{}",
                err.message()
            );
        }
        parse(
            "[[repository]]\nname = \"one\"\ntype = \"s3\"\nbucket = \"b\"\nregion = \"r\"\nprefix = \"p\"\n\
             [[repository]]\nname = \"two\"\ntype = \"s3\"\nbucket = \"b\"\nregion = \"r\"\nprefix = \"q\"\n",
        )
        .unwrap();
    }

    #[test]
    fn upload_memory_over_the_bound_is_refused_naming_the_product() {
        let s3 = |name: &str, size: &str, count: usize| {
            format!(
                "[[repository]]\nname = \"{name}\"\ntype = \"s3\"\nbucket = \"{name}\"\nregion = \"r\"\npart_size = \"{size}\"\nparts_in_flight = {count}\n"
            )
        };
        let err = parse(&s3("big", "5GiB", 64)).unwrap_err();
        assert!(
            err.message().contains("5.0 GiB × 64 ('big')")
                && err.message().contains("= 320.0 GiB")
                && err.message().contains("lower part_size or parts_in_flight"),
            "{}",
            err.message()
        );
        let err = parse(&format!("{}{}", s3("a", "1GiB", 4), s3("b", "1GiB", 5))).unwrap_err();
        assert!(err.message().contains("= 9.0 GiB"), "{}", err.message());
        parse(&format!(
            "{}{}{LOCAL}",
            s3("a", "1GiB", 4),
            s3("b", "1GiB", 4)
        ))
        .unwrap();
        parse(&s3("one", "5GiB", 1)).unwrap();
    }

    #[test]
    fn example_config_is_valid() {
        let config = parse(EXAMPLE).expect("the example written by `init` must parse");
        assert_eq!(config.targets.rto, Duration::from_secs(4 * 3600));
        assert_eq!(config.targets.rpo, Duration::from_secs(3600));
        assert_eq!(config.jobs.len(), 1);
    }

    #[test]
    fn encryption_recipients_are_checked_where_they_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("lifeboat.toml");
        let parse_here = |text: &str| Config::parse(text, &config_path);
        let recipient = crate::keys::keygen(&dir.path().join("ops.key")).unwrap();
        let escrow = crate::keys::keygen(&dir.path().join("escrow.key")).unwrap();
        std::fs::write(
            dir.path().join("escrow.pub"),
            format!("# escrow\n\n{escrow}\n{recipient}\n"),
        )
        .unwrap();
        let config = parse_here(&format!(
            "[encryption]\nrecipients = [\"{recipient}\"]\nrecipients_file = \"escrow.pub\"\nidentity_file = \"ops.key\"\n{LOCAL}"
        ))
        .unwrap();
        let encryption = config.encryption.unwrap();
        assert_eq!(encryption.recipients.texts(), [recipient.clone(), escrow]);
        assert_eq!(encryption.identity_file, Some(dir.path().join("ops.key")));

        let err = parse_here(&format!(
            "[encryption]\nrecipients = [\"{recipient}\", \"age1nope\"]\n{LOCAL}"
        ))
        .unwrap_err();
        assert!(
            err.message()
                .contains("encryption.recipients[1]: not an age recipient (\"age1nope\")"),
            "{}",
            err.message()
        );
        std::fs::write(dir.path().join("bad.pub"), "age1nope\n").unwrap();
        let err = parse_here(&format!(
            "[encryption]\nrecipients_file = \"bad.pub\"\n{LOCAL}"
        ))
        .unwrap_err();
        assert!(
            err.message()
                .contains("bad.pub' line 1: not an age recipient"),
            "{}",
            err.message()
        );
        let err = parse_here(&format!("[encryption]\n{LOCAL}")).unwrap_err();
        assert!(
            err.message().contains("encryption: at least one recipient"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn unknown_key_names_the_key_and_file() {
        let err = parse(&format!("{LOCAL}buket = \"x\"\n")).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Config);
        assert!(err.message().contains("buket"), "{}", err.message());
        assert!(
            err.message().contains("/etc/lifeboat/test.toml"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn bad_duration_names_field_and_value() {
        let err = parse(&format!("[targets]\nrto = \"4 fortnights\"\n{LOCAL}")).unwrap_err();
        assert!(err.message().contains("targets.rto"), "{}", err.message());
        assert!(err.message().contains("4 fortnights"), "{}", err.message());
    }

    #[test]
    fn s3_without_bucket_names_the_field() {
        let err = parse("[[repository]]\nname = \"dr\"\ntype = \"s3\"\nregion = \"eu-west-1\"\n")
            .unwrap_err();
        assert!(
            err.message()
                .contains("repository[0] (dr).bucket: is required"),
            "{}",
            err.message()
        );
        let err = parse("[[repository]]\nname = \"dr\"\ntype = \"s3\"\nbucket = \" \"\nregion = \"eu-west-1\"\n").unwrap_err();
        assert!(
            err.message()
                .contains("repository[0] (dr).bucket: must not be empty"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn a_duration_longer_than_a_century_is_refused_naming_its_field() {
        let text = "[[repository]]\nname = \"local\"\ntype = \"local\"\npath = \"/r\"\n\
                    [[job]]\nname = \"conf\"\nkind = \"files\"\npaths = [\"/etc\"]\n\
                    retention = { keep_within = \"99999999999years\" }\n";
        let err = parse(text).unwrap_err();
        assert!(
            err.message().contains(
                "job[0] (conf).retention.keep_within: must be at most 100 years (got \"99999999999years\")"
            ),
            "{}",
            err.message()
        );
        // A year as humantime reads it: 365.25 days.
        assert_eq!(bounded_duration("100years").unwrap(), LONGEST_DURATION);
        assert!(bounded_duration("100y").is_ok());
        assert!(bounded_duration("100years 1s").is_err());
        assert!(bounded_duration("36525days 1s").is_err());
    }

    #[test]
    fn max_clock_skew_lies_between_a_readings_error_and_a_day() {
        let repo = "[[repository]]\nname = \"local\"\ntype = \"local\"\npath = \"/r\"\n";
        for (text, problem) in [
            ("500ms", "must be at least 2s"),
            ("2days", "must be at most 1day"),
            ("99999999999years", "must be at most 100 years"),
        ] {
            let err = parse(&format!("max_clock_skew = \"{text}\"\n{repo}")).unwrap_err();
            assert!(err.message().contains(problem), "{text}: {}", err.message());
        }
        let config = parse(&format!("max_clock_skew = \"10min\"\n{repo}")).unwrap();
        assert_eq!(config.max_clock_skew, Duration::from_secs(600));
    }

    #[test]
    fn lock_dir_must_be_absolute_and_object_lock_complete() {
        let repo = "[[repository]]\nname = \"local\"\ntype = \"local\"\npath = \"/r\"\n";
        let err = parse(&format!("lock_dir = \"locks\"\n{repo}")).unwrap_err();
        assert!(
            err.message()
                .contains("lock_dir: must be an absolute path (got \"locks\")"),
            "{}",
            err.message()
        );
        let s3 = "[[repository]]\nname = \"dr\"\ntype = \"s3\"\nbucket = \"b\"\nregion = \"r\"\n";
        let err = parse(&format!("{s3}object_lock = {{ mode = \"governance\" }}\n")).unwrap_err();
        assert!(
            err.message()
                .contains("repository[0] (dr).object_lock.days: is required"),
            "{}",
            err.message()
        );
        let err = parse(&format!(
            "{s3}object_lock = {{ mode = \"strict\", days = 7 }}\n"
        ))
        .unwrap_err();
        assert!(
            err.message().contains(
                "object_lock.mode: must be \"governance\" or \"compliance\" (got \"strict\")"
            ),
            "{}",
            err.message()
        );
        let err = parse(&format!(
            "{repo}object_lock = {{ mode = \"governance\", days = 7 }}\n"
        ))
        .unwrap_err();
        assert!(
            err.message()
                .contains("object_lock: only valid for type = \"s3\""),
            "{}",
            err.message()
        );
    }

    #[test]
    fn small_part_size_is_refused_with_the_value() {
        let err = parse("[[repository]]\nname = \"dr\"\ntype = \"s3\"\nbucket = \"b\"\nregion = \"r\"\npart_size = \"1MiB\"\n").unwrap_err();
        assert!(
            err.message()
                .contains("repository[0] (dr).part_size: must be at least 5 MiB (got 1048576)"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn duplicate_names_are_refused() {
        let err = parse(&format!("{LOCAL}{LOCAL}")).unwrap_err();
        assert!(
            err.message()
                .contains("duplicate repository name \"local\""),
            "{}",
            err.message()
        );
    }

    #[test]
    fn postgres_dsn_must_not_hold_a_password() {
        let job = |dsn: &str| {
            format!("{LOCAL}[[job]]\nname = \"db\"\nkind = \"postgres\"\ndsn = \"{dsn}\"\n")
        };
        assert!(parse(&job("postgresql://backup@db1:5432/postgres")).is_ok());
        assert!(parse(&job("host=db1 user=backup dbname=postgres")).is_ok());
        for dsn in [
            "postgresql://backup:secret@db1/postgres",
            "host=db1 password=secret",
            "postgresql://db1/postgres?password=secret",
        ] {
            let err = parse(&job(dsn)).unwrap_err();
            assert!(
                err.message()
                    .contains("job[0] (db).dsn: must not contain a password"),
                "{}",
                err.message()
            );
        }
    }

    #[test]
    fn files_paths_a_restore_could_not_make_are_refused() {
        let err = parse(&format!(
            "{LOCAL}[[job]]\nname = \"conf\"\nkind = \"files\"\npaths = [\"/opt/app/../etc\"]\n"
        ))
        .unwrap_err();
        assert!(
            err.message().contains("job[0] (conf).paths: ") && err.message().contains("holds '..'"),
            "{}",
            err.message()
        );
        // Overlapping paths are merged when the archive is written; follow = true makes
        // the trailing '/' moot.
        for paths in [
            r#"["/etc", "/etc/nginx/"]"#,
            r#"["/etc", "/etc"]"#,
            r#"["/etc/app", "/etc/app/"]"#,
            r#"["/etc", "/etcetera"]"#,
        ] {
            parse(&format!(
                "{LOCAL}[[job]]\nname = \"conf\"\nkind = \"files\"\npaths = {paths}\n"
            ))
            .unwrap();
        }
        let config = parse(&format!(
            "{LOCAL}[[job]]\nname = \"conf\"\nkind = \"files\"\nfollow = true\npaths = [\"/opt/app\", \"/opt/app/\"]\n"
        ))
        .unwrap();
        let JobSource::Files(job) = &config.jobs[0].source else {
            panic!("a files job")
        };
        assert!(job.follows(Path::new("/opt/app")));
    }

    #[test]
    fn fields_of_another_kind_are_refused() {
        let err = parse(&format!(
            "{LOCAL}[[job]]\nname = \"db\"\nkind = \"postgres\"\npaths = [\"/etc\"]\n"
        ))
        .unwrap_err();
        assert!(
            err.message()
                .contains("job[0] (db).paths: not valid for kind = \"postgres\""),
            "{}",
            err.message()
        );
    }

    #[test]
    fn plain_http_is_only_for_loopback() {
        let repo = |endpoint: &str| {
            format!(
                "[[repository]]\nname = \"s\"\ntype = \"s3\"\nbucket = \"b\"\nregion = \"r\"\nendpoint = \"{endpoint}\"\n"
            )
        };
        assert!(parse(&repo("http://127.0.0.1:8333")).is_ok());
        assert!(parse(&repo("http://localhost:8333")).is_ok());
        assert!(parse(&repo("http://[::1]:8333")).is_ok());
        assert!(parse(&repo("https://s3.example.com")).is_ok());
        let err = parse(&repo("http://10.0.0.5:8333")).unwrap_err();
        assert!(
            err.message()
                .contains("plain http is only allowed for loopback"),
            "{}",
            err.message()
        );
        // The host connected to is the one after the userinfo, whatever precedes it.
        for (endpoint, problem) in [
            (
                "http://127.0.0.1:9000@192.0.2.2",
                "must not hold a user or password (it holds something before '@', and would reach \"http://192.0.2.2/\", whose host is \"192.0.2.2\")",
            ),
            (
                "https://key:secret@s3.example.com",
                "must not hold a user or password",
            ),
            (
                "http://localhost.example.com:8333",
                "plain http is only allowed for loopback",
            ),
            (
                "http://127.0.0.1:8333/?x=1",
                "must not have a query or fragment",
            ),
            ("ftp://127.0.0.1", "scheme must be https"),
            ("127.0.0.1:8333", "must be a URL"),
            ("http://", "must be a URL"),
        ] {
            let err = parse(&repo(endpoint)).unwrap_err();
            assert!(
                err.message().contains(problem),
                "{endpoint}: {}",
                err.message()
            );
        }
        assert!(parse(&repo("http://LOCALHOST:8333")).is_ok());
    }

    #[test]
    fn redis_jobs_take_a_url_without_credentials() {
        let job = |extra: &str| {
            format!(
                "[[repository]]\nname = \"l\"\ntype = \"local\"\npath = \"/b\"\n[[job]]\nname = \"s\"\nkind = \"redis\"\n{extra}\n"
            )
        };
        let config = parse(&job("url = \"redis://10.0.0.5\"\nheartbeat = true")).unwrap();
        let JobSource::Redis(redis) = &config.jobs[0].source else {
            panic!("not a redis job")
        };
        assert_eq!(
            (redis.host.as_str(), redis.port, redis.heartbeat),
            ("10.0.0.5", 6379, true)
        );
        for (extra, problem) in [
            ("", "url: is required"),
            (
                "url = \"redis://:pw@h:6379\"",
                "must not hold a user or password",
            ),
            ("url = \"rediss://h:6380\"", "must start with redis://"),
            ("url = \"redis://h:port\"", "invalid port"),
            (
                "url = \"redis://h\"\ndsn = \"x\"",
                "dsn: not valid for kind = \"redis\"",
            ),
            (
                "url = \"redis://h\"\nrdb_path = \"dump.rdb\"",
                "rdb_path: must be an absolute path",
            ),
        ] {
            let err = parse(&job(extra)).unwrap_err();
            assert!(
                err.message().contains(problem),
                "{extra}: {}",
                err.message()
            );
        }
        let err = parse(
            &job("url = \"redis://h\"")
                .replace("kind = \"redis\"", "kind = \"files\"\npaths = [\"/etc\"]"),
        )
        .unwrap_err();
        assert!(
            err.message()
                .contains("url: not valid for kind = \"files\""),
            "{}",
            err.message()
        );
    }
}
