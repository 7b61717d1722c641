//! The config file: parsed from TOML into raw structs that mirror what users write, then
//! validated into [`Config`], whose values are ready to use. Every validation error names the
//! file, the field and the value. Depends only on `error`.

mod job;
mod raw;
mod repository;
mod values;

use job::parse_redis_url;
pub use job::{
    DEFAULT_WAL_PREFETCH, FilesJob, JobConfig, JobSource, MAX_WAL_PREFETCH, PostgresConnection,
    PostgresJob, PostgresMode, RedisJob, Retention,
};
pub use repository::{
    Location, ObjectLock, ObjectLockMode, RepositoryConfig, RequestChecksums, S3Settings,
    ServerSideEncryption,
};
pub use values::{LONGEST_DURATION, bounded_duration, parse_size};
use values::{duration_field, parse_duration};

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// `compression.threads = 0`: one per core, up to this many.
pub const DEFAULT_MAX_THREADS: usize = 4;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/lifeboat/lifeboat.toml";
pub const EXAMPLE: &str = include_str!("example.toml");

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
        // More workers than this compress faster than pg_dump, a tar or a network feeds
        // them, and each one holds about 6 MiB (see `backup::memory_bound`).
        0 => std::thread::available_parallelism()
            .map_or(1, |n| n.get().min(DEFAULT_MAX_THREADS) as u32),
        n if n <= 256 => n,
        n => {
            return Err(format!(
                "compression.threads: must be at most 256 (got {n})"
            ));
        }
    };

    let repositories = repository::validate_all(raw.repository)?;

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
    let shared_lock = validate_shared_lock(&raw.lock, &raw.lock_username, &raw.lock_password_file)?;
    if let Some(dir) = raw.metrics_dir.as_ref().filter(|d| !d.is_absolute()) {
        return Err(format!(
            "metrics_dir: must be an absolute path (got \"{}\")",
            dir.display()
        ));
    }

    let base = path.parent().unwrap_or(Path::new("."));
    let schedules = validate_schedules(raw.schedule.unwrap_or_default(), base)?;

    let encryption = raw
        .encryption
        .map(|encryption| validate_encryption(encryption, base))
        .transpose()?;

    let signing = validate_signing(raw.signing, base)?;

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
    let jobs = job::validate_all(raw.job, &own)?;

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

/// `[schedule]`: the calendars of the maintenance timers, and who the units run as.
fn validate_schedules(raw_schedule: raw::RawSchedule, base: &Path) -> Result<Schedules, Problem> {
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
    Ok(Schedules {
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
    })
}

/// `lock = "redis://…"`: the lock shared by hosts that back up one job.
fn validate_shared_lock(
    lock: &Option<String>,
    username: &Option<String>,
    password_file: &Option<PathBuf>,
) -> Result<Option<RedisJob>, Problem> {
    Ok(match lock {
        Some(url) => {
            let (host, port) = parse_redis_url("lock", url)?;
            if let Some(path) = password_file.as_ref().filter(|p| !p.is_absolute()) {
                return Err(format!(
                    "lock_password_file: must be an absolute path (got \"{}\")",
                    path.display()
                ));
            }
            Some(RedisJob {
                host,
                port,
                username: username.clone(),
                password_file: password_file.clone(),
                heartbeat: false,
                rdb_path: None,
                primary: None,
            })
        }
        None if username.is_some() || password_file.is_some() => {
            return Err(
                "lock_username, lock_password_file: only valid with lock = \"redis://...\""
                    .to_string(),
            );
        }
        None => None,
    })
}

/// `[signing]`: the key this host signs with, and whose signatures it requires.
fn validate_signing(raw: Option<raw::RawSigning>, base: &Path) -> Result<Signing, Problem> {
    Ok(match raw {
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
    fn download_concurrency_is_bounded_and_only_for_s3() {
        let s3 = "[[repository]]\nname = \"dr\"\ntype = \"s3\"\nbucket = \"b\"\nregion = \"r\"\n";
        for (value, refused) in [("0", true), ("65", true), ("1", false), ("64", false)] {
            let outcome = parse(&format!("{s3}download_concurrency = {value}\n"));
            match refused {
                true => assert!(
                    outcome.as_ref().unwrap_err().message().contains(&format!(
                        "repository[0] (dr).download_concurrency: must be between 1 and 64 (got {value})"
                    )),
                    "{value}"
                ),
                false => assert!(outcome.is_ok(), "{value}"),
            }
        }
        let local = parse(
            "[[repository]]\nname = \"l\"\ntype = \"local\"\npath = \"/srv/b\"\ndownload_concurrency = 8\n",
        );
        assert!(
            local
                .unwrap_err()
                .message()
                .contains("repository[0] (l).download_concurrency: only valid for type = \"s3\"")
        );
    }

    #[test]
    fn wal_prefetch_is_bounded_and_only_for_physical_jobs() {
        let job = "[[job]]\nname = \"db\"\nkind = \"postgres\"\ndsn = \"host=db1\"\n";
        let physical = format!("{LOCAL}{job}mode = \"physical\"\n");
        let depth_of = |config: &Config| match &config.jobs[0].source {
            JobSource::Postgres(postgres) => postgres.wal_prefetch,
            _ => unreachable!(),
        };
        assert_eq!(depth_of(&parse(&physical).unwrap()), DEFAULT_WAL_PREFETCH);
        for (value, refused) in [("65", true), ("0", false), ("64", false)] {
            let outcome = parse(&format!("{physical}wal_prefetch = {value}\n"));
            match refused {
                true => assert!(
                    outcome.as_ref().unwrap_err().message().contains(&format!(
                        "job[0] (db).wal_prefetch: must be between 0 (off) and 64 (got {value})"
                    )),
                    "{value}"
                ),
                false => assert_eq!(depth_of(&outcome.unwrap()), value.parse::<u32>().unwrap()),
            }
        }
        let logical = parse(&format!("{LOCAL}{job}wal_prefetch = 8\n"));
        assert!(
            logical
                .unwrap_err()
                .message()
                .contains("job[0] (db).wal_prefetch: only valid for mode = \"physical\""),
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
