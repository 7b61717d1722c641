//! Drill files (`drills/*.toml`): what to restore, from where, into what, the targets, and
//! the checks. Every error names the file, the line and the field.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use toml::Spanned;

use super::check::{Expectation, PathExpectation};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Drill {
    pub path: PathBuf,
    pub name: String,
    pub description: Option<String>,
    /// The runbook section this drill proves.
    pub runbook: Option<String>,
    pub job: String,
    /// Restore from this repository alone (to play the loss of the others).
    pub from: Option<String>,
    /// Restore from any repository but these.
    pub exclude: Vec<String>,
    /// Decrypt with this identity alone (the escrow key from the safe), relative to the
    /// drill file; else as `restore` would.
    pub identity_file: Option<PathBuf>,
    /// "latest" or a backup id.
    pub backup: String,
    pub target: DrillTarget,
    /// For `postgres` jobs: the database to restore and check (default: every database).
    pub database: Option<String>,
    /// With a DSN target: keep the databases the drill restored there (by default they are
    /// dropped when it ends).
    pub keep: bool,
    pub rto: Duration,
    pub rpo: Duration,
    /// When `lifeboat schedule` runs it: a systemd calendar expression (`quarterly`).
    pub schedule: Option<String>,
    /// Physical jobs: recover to this moment instead of the end of the archive.
    pub to_time: Option<DrillTime>,
    /// Run `pg_amcheck --heapallindexed` on every restored database (scratch targets).
    pub amcheck: bool,
    pub checks: Vec<Check>,
    /// The seed a run draws `backup = "random"` or `to_time = "random"` from, and what it
    /// drew.
    pub seed: Option<u64>,
    pub drawn: Option<Draw>,
}

/// `backup = "random"`: a random complete backup of the restorable window.
pub const RANDOM: &str = "random";

/// What a random drill drew, and from what.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct Draw {
    pub seed: u64,
    /// The repository whose window the draw was made in.
    pub repository: String,
    pub window_from: DateTime<Utc>,
    pub window_to: DateTime<Utc>,
    /// The backup drawn, when `backup = "random"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// The moment drawn, when `to_time = "random"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_time: Option<DateTime<Utc>>,
}

impl Draw {
    pub fn describe(&self) -> String {
        let mut text = format!(
            "random draw (seed {}) in the window of repository '{}', {} to {}",
            self.seed,
            self.repository,
            crate::window::human_time(self.window_from),
            crate::window::human_time(self.window_to)
        );
        if let Some(backup) = &self.backup {
            text.push_str(&format!(": backup {backup}"));
        }
        if let Some(at) = self.to_time {
            text.push_str(&format!(
                ": recovery to {}",
                at.format("%Y-%m-%d %H:%M:%S%.3f UTC")
            ));
        }
        text
    }
}

/// The moment a physical drill recovers to: a fixed one, or one that moves with the backup
/// drilled, so that a scheduled drill proves a point inside the archive, not only its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrillTime {
    At(chrono::DateTime<chrono::Utc>),
    AfterBackup(Duration),
    /// A random moment of the restorable window, drawn from the run's seed.
    Random,
}

impl DrillTime {
    fn parse(text: &str) -> std::result::Result<DrillTime, String> {
        if text.trim() == RANDOM {
            return Ok(DrillTime::Random);
        }
        if let Some(after) = text.trim().strip_suffix("after the backup") {
            return crate::config::bounded_duration(after.trim())
                .map(DrillTime::AfterBackup)
                .map_err(|e| format!("\"{text}\": {e}"));
        }
        chrono::DateTime::parse_from_rfc3339(text.trim())
            .map(|at| DrillTime::At(at.to_utc()))
            .map_err(|_| {
                format!(
                    "\"{text}\" is neither an RFC 3339 time (2026-12-07T14:01:00Z) nor \"DURATION after the backup\" (\"90s after the backup\")"
                )
            })
    }

    /// The moment itself, for a backup whose data is from `recovery_point`; None for a
    /// random one, which the run draws before it restores.
    pub fn resolve(
        &self,
        recovery_point: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        match self {
            DrillTime::At(at) => Some(*at),
            DrillTime::AfterBackup(after) => Some(
                recovery_point
                    + chrono::Duration::from_std(*after).unwrap_or(chrono::Duration::zero()),
            ),
            DrillTime::Random => None,
        }
    }
}

/// In a check's SQL, replaced by the moment a `to_time` drill recovered to (RFC 3339, UTC).
pub const RECOVERY_TARGET_PLACEHOLDER: &str = "{recovery_target}";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrillTarget {
    /// A throw-away cluster (or directory, for `files` jobs) made for the drill and removed
    /// after it.
    Scratch,
    /// An existing server, for `postgres` jobs.
    Dsn(String),
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub kind: CheckKind,
}

impl Check {
    /// Whether the drill's RPO is measured from what this check returns.
    pub fn is_rpo_marker(&self) -> bool {
        matches!(
            self.kind,
            CheckKind::Sql {
                rpo_marker: true,
                ..
            } | CheckKind::Redis {
                rpo_marker: true,
                ..
            }
        )
    }
}

/// The Redis commands a check may run: they read keys or the server's state and write
/// nothing, reach no other host and touch no file (not CONFIG, SAVE, REPLICAOF, MIGRATE,
/// MODULE, DEBUG, EVAL or anything that writes a key).
const READ_ONLY_REDIS: &[&str] = &[
    "BITCOUNT",
    "DBSIZE",
    "EXISTS",
    "GET",
    "GETRANGE",
    "HEXISTS",
    "HGET",
    "HGETALL",
    "HKEYS",
    "HLEN",
    "HMGET",
    "HSTRLEN",
    "HVALS",
    "INFO",
    "LASTSAVE",
    "LINDEX",
    "LLEN",
    "LRANGE",
    "MGET",
    "PING",
    "PTTL",
    "SCARD",
    "SISMEMBER",
    "SMEMBERS",
    "SMISMEMBER",
    "STRLEN",
    "TTL",
    "TYPE",
    "XLEN",
    "ZCARD",
    "ZCOUNT",
    "ZRANGE",
    "ZRANK",
    "ZSCORE",
];

fn is_read_only(command: &str) -> bool {
    READ_ONLY_REDIS
        .iter()
        .any(|allowed| allowed.eq_ignore_ascii_case(command))
}

#[derive(Debug, Clone)]
pub enum CheckKind {
    Sql {
        sql: String,
        database: Option<String>,
        expect: Expectation,
        /// Its result is the newest data actually recovered (a timestamp).
        rpo_marker: bool,
    },
    Path {
        /// Relative to the restored tree; a leading `/` is the source's absolute path.
        path: PathBuf,
        expect: PathExpectation,
    },
    /// A Redis command (`DBSIZE`, `GET key`, `TTL key`) against the restored server.
    Redis {
        command: Vec<String>,
        expect: Expectation,
        rpo_marker: bool,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDrill {
    name: Spanned<String>,
    description: Option<String>,
    runbook: Option<String>,
    job: Spanned<String>,
    from: Option<Spanned<String>>,
    #[serde(default)]
    exclude: Vec<String>,
    identity_file: Option<PathBuf>,
    backup: Option<Spanned<String>>,
    target: Option<Spanned<String>>,
    database: Option<Spanned<String>>,
    #[serde(default)]
    keep: bool,
    rto: Option<Spanned<String>>,
    rpo: Option<Spanned<String>>,
    schedule: Option<Spanned<String>>,
    to_time: Option<Spanned<String>>,
    #[serde(default)]
    amcheck: bool,
    #[serde(default)]
    check: Vec<Spanned<RawCheck>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    name: Spanned<String>,
    sql: Option<Spanned<String>>,
    database: Option<String>,
    expect: Option<Spanned<String>>,
    #[serde(default)]
    rpo_marker: bool,
    path: Option<Spanned<String>>,
    redis: Option<Spanned<String>>,
    exists: Option<bool>,
    sha256: Option<Spanned<String>>,
    contains: Option<String>,
}

/// Reads the source text, to turn spans into line numbers.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn line(&self, span: Range<usize>) -> usize {
        self.text[..span.start.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    fn error(&self, span: Range<usize>, field: &str, problem: impl std::fmt::Display) -> Error {
        Error::config(format!(
            "invalid drill file '{}', line {}: {field}: {problem}",
            self.path.display(),
            self.line(span)
        ))
    }
}

fn duration(
    source: &Source,
    field: &str,
    value: Option<&Spanned<String>>,
    default: &str,
) -> Result<Duration> {
    let Some(value) = value else {
        return Ok(humantime::parse_duration(default).expect("default durations parse"));
    };
    match crate::config::bounded_duration(value.get_ref()) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(source.error(value.span(), field, "must be longer than zero")),
        Err(e) => Err(source.error(value.span(), field, e)),
    }
}

impl Drill {
    pub fn load(path: &Path) -> Result<Drill> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::config(format!("unable to read drill file '{}'", path.display())).with_source(e)
        })?;
        Drill::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Drill> {
        let source = Source { path, text };
        let raw: RawDrill = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| source.line(span)).unwrap_or(1);
            Error::config(format!(
                "invalid drill file '{}', line {line}: {}",
                path.display(),
                e.message().trim_end()
            ))
        })?;
        crate::config::validate_name("name", raw.name.get_ref()).map_err(|problem| {
            source.error(
                raw.name.span(),
                "name",
                problem.trim_start_matches("name: "),
            )
        })?;
        let target = match raw.target.as_ref().map(|t| t.get_ref().as_str()) {
            None | Some("scratch") => DrillTarget::Scratch,
            Some(dsn) if dsn.contains('=') || dsn.starts_with("postgres") => {
                DrillTarget::Dsn(dsn.to_string())
            }
            Some(other) => {
                return Err(source.error(
                    raw.target.as_ref().expect("matched").span(),
                    "target",
                    format!("must be \"scratch\" or a PostgreSQL DSN (got \"{other}\")"),
                ));
            }
        };
        let mut checks = Vec::new();
        let mut markers = 0;
        for (index, spanned) in raw.check.iter().enumerate() {
            let check = parse_check(&source, index, spanned)?;
            markers += check.is_rpo_marker() as usize;
            checks.push(check);
        }
        let to_time = match &raw.to_time {
            None => None,
            Some(text) => Some(
                DrillTime::parse(text.get_ref())
                    .map_err(|problem| source.error(text.span(), "to_time", problem))?,
            ),
        };
        let placeholder_without_target = checks.iter().find(|c| {
            matches!(&c.kind, CheckKind::Sql { sql, .. } if sql.contains(RECOVERY_TARGET_PLACEHOLDER))
        });
        if let (None, Some(check)) = (&to_time, placeholder_without_target) {
            return Err(Error::config(format!(
                "invalid drill file '{}': check '{}': {RECOVERY_TARGET_PLACEHOLDER} is the moment `to_time` recovers to, and the drill sets no to_time",
                path.display(),
                check.name
            )));
        }
        if markers > 1 {
            return Err(Error::config(format!(
                "invalid drill file '{}': check: only one check may be the rpo_marker ({markers} are)",
                path.display()
            )));
        }
        Ok(Drill {
            path: path.to_path_buf(),
            name: raw.name.get_ref().clone(),
            description: raw.description,
            runbook: raw.runbook,
            job: raw.job.get_ref().clone(),
            from: raw.from.map(|f| f.into_inner()),
            exclude: raw.exclude,
            identity_file: raw
                .identity_file
                .map(|f| path.parent().unwrap_or(Path::new(".")).join(f)),
            backup: raw
                .backup
                .map(|b| b.into_inner())
                .unwrap_or_else(|| "latest".to_string()),
            target,
            database: raw.database.map(|d| d.into_inner()),
            keep: raw.keep,
            rto: duration(&source, "rto", raw.rto.as_ref(), "4h")?,
            rpo: duration(&source, "rpo", raw.rpo.as_ref(), "1h")?,
            schedule: match raw.schedule {
                Some(schedule) if schedule.get_ref().trim().is_empty() => {
                    return Err(source.error(schedule.span(), "schedule", "must not be empty"));
                }
                schedule => schedule.map(|s| s.into_inner()),
            },
            to_time,
            amcheck: raw.amcheck,
            checks,
            seed: None,
            drawn: None,
        })
    }
}

/// One `[[check]]`: SQL or a Redis command (each with what it must return), or a path.
fn parse_check(source: &Source<'_>, index: usize, spanned: &Spanned<RawCheck>) -> Result<Check> {
    let field = |name: &str| format!("check[{index}].{name}");
    let check = spanned.get_ref();
    let expectation = || match &check.expect {
        None => Ok(Expectation::NonEmpty),
        Some(text) => Expectation::parse(text.get_ref())
            .map_err(|problem| source.error(text.span(), &field("expect"), problem)),
    };
    let kind = match (&check.sql, &check.path, &check.redis) {
        (None, None, Some(command)) => {
            let expect = expectation()?;
            let command: Vec<String> = command
                .get_ref()
                .split_whitespace()
                .map(str::to_string)
                .collect();
            let span = check.redis.as_ref().expect("matched").span();
            let Some(name) = command.first() else {
                return Err(source.error(span, &field("redis"), "is empty"));
            };
            if !is_read_only(name) {
                return Err(source.error(
                    span,
                    &field("redis"),
                    format!(
                        "'{name}' is not a read-only command; a check reads what was restored and changes nothing (one of: {})",
                        READ_ONLY_REDIS.join(", ")
                    ),
                ));
            }
            CheckKind::Redis {
                command,
                expect,
                rpo_marker: check.rpo_marker,
            }
        }
        (Some(sql), None, None) => {
            let expect = expectation()?;
            if sql.get_ref().trim().is_empty() {
                return Err(source.error(sql.span(), &field("sql"), "is empty"));
            }
            CheckKind::Sql {
                sql: sql.get_ref().clone(),
                database: check.database.clone(),
                expect,
                rpo_marker: check.rpo_marker,
            }
        }
        (None, Some(path), None) => {
            let expect = path_expectation(source, check, path, &field("sha256"), &field("path"))?;
            CheckKind::Path {
                path: PathBuf::from(path.get_ref()),
                expect,
            }
        }
        _ => {
            return Err(source.error(
                spanned.span(),
                &format!("check[{index}]"),
                "needs one of sql, redis (each with expect) or path",
            ));
        }
    };
    Ok(Check {
        name: check.name.get_ref().clone(),
        kind,
    })
}

/// What a path check expects: a sha256, some text, or that it exists (or not).
fn path_expectation(
    source: &Source<'_>,
    check: &RawCheck,
    path: &Spanned<String>,
    sha_field: &str,
    path_field: &str,
) -> Result<PathExpectation> {
    Ok(match (&check.sha256, &check.contains, check.exists) {
        (Some(sha), None, None | Some(true)) => {
            let hex = sha.get_ref().to_ascii_lowercase();
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(source.error(sha.span(), sha_field, "must be 64 hex digits"));
            }
            PathExpectation::Sha256(hex)
        }
        (None, Some(text), None | Some(true)) => PathExpectation::Contains(text.clone()),
        (None, None, exists) => PathExpectation::Exists(exists.unwrap_or(true)),
        _ => {
            return Err(source.error(
                path.span(),
                path_field,
                "takes one of sha256, contains or exists",
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Drill> {
        Drill::parse(text, Path::new("drills/x.toml"))
    }

    #[test]
    fn a_full_drill_parses_with_defaults() {
        let drill = parse(
            "name = \"region-loss\"\njob = \"maindb\"\nfrom = \"dr\"\n\n[[check]]\nname = \"orders\"\nsql = \"select count(*) from orders\"\nexpect = \">= 1000\"\n\n[[check]]\nname = \"fresh\"\nsql = \"select max(at) from t\"\nrpo_marker = true\n",
        )
        .unwrap();
        assert_eq!(drill.backup, "latest");
        assert_eq!(drill.target, DrillTarget::Scratch);
        assert_eq!(drill.rto, Duration::from_secs(4 * 3600));
        assert_eq!(drill.rpo, Duration::from_secs(3600));
        assert_eq!(drill.checks.len(), 2);
    }

    #[test]
    fn to_time_is_a_moment_or_a_duration_after_the_backup() {
        let drill = |to_time: &str| {
            parse(&format!(
                "name = \"pitr\"\njob = \"db\"\nto_time = \"{to_time}\"\n\n[[check]]\nname = \"c\"\nsql = \"select count(*) from t where at > '{{recovery_target}}'\"\nexpect = \"= 0\"\n"
            ))
        };
        let backup = chrono::DateTime::parse_from_rfc3339("2026-12-07T03:00:00Z")
            .unwrap()
            .to_utc();
        let after = drill("90s after the backup").unwrap().to_time.unwrap();
        assert_eq!(drill("random").unwrap().to_time, Some(DrillTime::Random));
        assert_eq!(after, DrillTime::AfterBackup(Duration::from_secs(90)));
        assert_eq!(
            after.resolve(backup).unwrap().to_rfc3339(),
            "2026-12-07T03:01:30+00:00"
        );
        let at = drill("2026-12-07T14:01:00Z").unwrap().to_time.unwrap();
        assert_eq!(
            at.resolve(backup).unwrap().to_rfc3339(),
            "2026-12-07T14:01:00+00:00"
        );
        let err = drill("yesterday").unwrap_err();
        assert!(
            err.message()
                .contains("line 3: to_time: \"yesterday\" is neither"),
            "{}",
            err.message()
        );
        // The placeholder needs a target to stand for.
        let err = parse("name = \"x\"\njob = \"db\"\n\n[[check]]\nname = \"c\"\nsql = \"select '{recovery_target}'\"\n").unwrap_err();
        assert!(
            err.message().contains("the drill sets no to_time"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn errors_name_the_file_line_and_field() {
        let err = parse("name = \"x\"\njob = \"db\"\n\n[[check]]\nname = \"c\"\nsql = \"select 1\"\nexpect = \"about 3\"\n").unwrap_err();
        assert!(
            err.message()
                .starts_with("invalid drill file 'drills/x.toml', line 7: check[0].expect:"),
            "{}",
            err.message()
        );
        let err = parse("name = \"x\"\njob = \"db\"\nrto = \"soon\"\n").unwrap_err();
        assert!(
            err.message().contains("line 3: rto: invalid duration"),
            "{}",
            err.message()
        );
        let err = parse("name = \"x\"\njob = \"db\"\ncolour = \"red\"\n").unwrap_err();
        assert!(
            err.message().contains("line 3") && err.message().contains("colour"),
            "{}",
            err.message()
        );
        let err = parse("name = \"x\"\n").unwrap_err();
        assert!(err.message().contains("job"), "{}", err.message());
    }

    #[test]
    fn a_redis_check_that_would_change_the_server_is_refused_by_name() {
        let check = |command: &str| {
            parse(&format!(
                "name = \"x\"\njob = \"sessions\"\n\n[[check]]\nname = \"c\"\nredis = \"{command}\"\n"
            ))
        };
        for refused in [
            "CONFIG SET dir /root/.ssh",
            "save",
            "REPLICAOF 10.0.0.1 6379",
            "FLUSHALL",
            "SET k v",
            "EVAL \\\"return 1\\\" 0",
        ] {
            let err = check(refused).unwrap_err();
            assert!(
                err.message().contains("line 6: check[0].redis:")
                    && err.message().contains("is not a read-only command"),
                "{refused}: {}",
                err.message()
            );
        }
        for allowed in ["DBSIZE", "get session:42", "TTL k", "hget h f"] {
            check(allowed).unwrap_or_else(|e| panic!("{allowed}: {e}"));
        }
    }

    #[test]
    fn the_shipped_drills_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("drills");
        let mut parsed = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let drill =
                    Drill::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                if let Some(runbook) = &drill.runbook {
                    let file = runbook.split('#').next().unwrap();
                    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
                    assert!(
                        root.join(file).is_file(),
                        "{}: no runbook {file}",
                        path.display()
                    );
                }
                parsed += 1;
            }
        }
        assert!(parsed >= 2);
    }
}
