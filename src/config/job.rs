//! `[[job]]`: what is backed up (files, PostgreSQL, Redis), and how long it is kept.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::values::parse_duration;
use super::{Problem, raw, validate_name};
use crate::layout::BackupKind;

/// Segments fetched ahead of replay unless `wal_prefetch` says otherwise.
pub const DEFAULT_WAL_PREFETCH: u32 = 8;
/// The most: the spool holds this many segments (a GiB of 16 MiB ones).
pub const MAX_WAL_PREFETCH: u32 = 64;

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
    /// Physical: how many segments after the one `wal-fetch` served it fetches ahead, in
    /// the background; 0: none.
    pub wal_prefetch: u32,
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

impl Retention {
    /// How far back the policy keeps backups once it has run that long: the longest of its
    /// time rules (`keep_daily = 7` keeps one a day back to six days ago). None for a
    /// policy that keeps by count alone, which promises no span of time.
    pub fn promise(&self) -> Option<Duration> {
        const HOUR: u64 = 3600;
        let span = |count: Option<u32>, period: u64| {
            count
                .filter(|count| *count > 1)
                .map(|count| Duration::from_secs(u64::from(count - 1) * period))
        };
        [
            span(self.keep_hourly, HOUR),
            span(self.keep_daily, 24 * HOUR),
            span(self.keep_weekly, 7 * 24 * HOUR),
            span(self.keep_monthly, 30 * 24 * HOUR),
            span(self.keep_yearly, 365 * 24 * HOUR),
            self.keep_within,
        ]
        .into_iter()
        .flatten()
        .max()
    }
}

impl JobConfig {
    /// The kind of backup the job makes.
    pub fn backup_kind(&self) -> BackupKind {
        match self.source {
            JobSource::Files(_) => BackupKind::Files,
            JobSource::Postgres(PostgresJob {
                mode: PostgresMode::Logical,
                ..
            }) => BackupKind::PostgresLogical,
            JobSource::Postgres(PostgresJob {
                mode: PostgresMode::Physical,
                ..
            }) => BackupKind::PostgresPhysical,
            JobSource::Redis(_) => BackupKind::Redis,
        }
    }

    pub fn kind_name(&self) -> &'static str {
        self.backup_kind().name()
    }
}

/// Every `[[job]]`, each valid and named once; a files job is told what lifeboat itself
/// writes (`own`), which it never backs up.
pub(super) fn validate_all(
    raw: Vec<raw::RawJob>,
    own: &[(String, PathBuf)],
) -> Result<Vec<JobConfig>, Problem> {
    let mut names = HashSet::new();
    let mut jobs = Vec::new();
    for (index, job) in raw.into_iter().enumerate() {
        let mut job = validate_job(index, job)?;
        if let JobSource::Files(files) = &mut job.source {
            files.lifeboats_own = own.to_vec();
        }
        if !names.insert(job.name.clone()) {
            return Err(format!(
                "job[{index}].name: duplicate job name \"{}\"",
                job.name
            ));
        }
        jobs.push(job);
    }

    Ok(jobs)
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
        ("wal_prefetch", job.wal_prefetch.is_some()),
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
    if let Some(depth) = job.wal_prefetch {
        if mode != PostgresMode::Physical {
            return Err(format!(
                "{}: only valid for mode = \"physical\", whose WAL is fetched by restore_command",
                at("wal_prefetch")
            ));
        }
        if depth > MAX_WAL_PREFETCH {
            return Err(format!(
                "{}: must be between 0 (off) and {MAX_WAL_PREFETCH} (got {depth})",
                at("wal_prefetch")
            ));
        }
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
        wal_prefetch: job.wal_prefetch.unwrap_or(DEFAULT_WAL_PREFETCH),
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
pub(super) fn parse_redis_url(field: &str, url: &str) -> Result<(String, u16), Problem> {
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
