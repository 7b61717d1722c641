//! `lifeboat check`: the config is valid (it was loaded), every repository can be written,
//! read back, listed and cleaned, conditional create is really honoured, and every job's
//! source is reachable; for physical jobs, that a WAL segment reaches every repository.
//! Reports each item OK or what is wrong.

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use crate::config::{Config, JobConfig, JobSource, Location, PostgresJob, PostgresMode};
use crate::error::{Error, ErrorKind, Result};
use crate::human::human_size;
use crate::layout;
use crate::repository::Repository;
use crate::sources::postgres::{Binaries, Connection, logical, physical};
use crate::sources::redis::RedisServer;
use crate::storage::{self, LockSupport, StoreError};
use crate::wal::WalFile;

#[derive(Debug, Serialize)]
pub struct CheckItem {
    pub what: String,
    pub problem: Option<String>,
    pub notes: Vec<String>,
    /// What works but will not hold the targets: printed as WARNING, not a failure.
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub config: String,
    pub items: Vec<CheckItem>,
}

impl CheckReport {
    pub fn outcome(&self) -> Result<()> {
        let failed: Vec<&str> = self
            .items
            .iter()
            .filter(|i| i.problem.is_some())
            .map(|i| i.what.as_str())
            .collect();
        if failed.is_empty() {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Storage,
            format!("check failed for: {}", failed.join(", ")),
        ))
    }
}

pub async fn run(config: &Config) -> CheckReport {
    let mut items = Vec::new();
    let repositories = Repository::open_all(config).await;
    // Each repository's clock is checked against this host's below; here, against each other.
    let readings = crate::clock::read(&repositories).await;
    let apart: Vec<String> = readings
        .beyond(config.max_clock_skew)
        .into_iter()
        .filter(|problem| problem.starts_with("the clocks of repositories"))
        .collect();
    if let Some(apart) = apart.first() {
        items.push(CheckItem {
            what: "repository clocks".to_string(),
            problem: Some(format!(
                "{apart}, more than max_clock_skew ({}): backups would sort by whichever answers first",
                humantime::format_duration(config.max_clock_skew)
            )),
            notes: Vec::new(),
            warnings: Vec::new(),
        });
    }
    let markers = crate::repository::read_markers(&repositories).await;
    for (index, (repository_config, repository)) in
        config.repositories.iter().zip(&repositories).enumerate()
    {
        let place = (&repositories[..], &markers, index);
        items.push(check_repository(config, repository_config, repository, place).await);
    }
    items.push(memory_item(config));
    if config.encryption.is_some() {
        let (problem, notes) = match check_encryption(config) {
            Ok(notes) => (None, notes),
            Err(e) => (Some(e.chain().join(": ")), Vec::new()),
        };
        items.push(CheckItem {
            what: "encryption (age)".to_string(),
            problem,
            notes,
            warnings: Vec::new(),
        });
    }
    items.extend(signing_item(config));
    if config.jobs.iter().any(|j| j.schedule.is_some())
        || config.schedules.prune.is_some()
        || config.schedules.replicate.is_some()
        || !config.schedules.drills.is_empty()
    {
        let (problem, notes) = match crate::schedule::validate(config) {
            Ok(notes) => (None, notes),
            Err(e) => (
                Some(
                    e.chain()
                        .into_iter()
                        .chain(e.hints().iter().cloned())
                        .collect::<Vec<_>>()
                        .join(": "),
                ),
                Vec::new(),
            ),
        };
        items.push(CheckItem {
            what: "schedules".to_string(),
            problem,
            notes,
            warnings: Vec::new(),
        });
    }
    for job in &config.jobs {
        let (problem, notes) = match check_source(config, job).await {
            Ok(notes) => (None, notes),
            Err(e) => (Some(e.chain().join(": ")), Vec::new()),
        };
        let mut warnings = schedule_against_rpo(config, job);
        if problem.is_none() {
            warnings.extend(heartbeat_warnings(job).await);
        }
        items.push(CheckItem {
            what: format!("job '{}' ({})", job.name, job.kind_name()),
            problem,
            notes,
            warnings,
        });
    }
    CheckReport {
        config: config.path.display().to_string(),
        items,
    }
}

/// One repository: reachable, writable, its Object Lock, clock, versioning and marker.
async fn check_repository(
    config: &Config,
    repository_config: &crate::config::RepositoryConfig,
    repository: &Repository,
    (repositories, markers, index): (&[Repository], &crate::repository::Markers, usize),
) -> CheckItem {
    let what = format!(
        "repository '{}' ({})",
        repository.name,
        repository.store.location()
    );
    let lock_wanted =
        matches!(&repository_config.location, Location::S3(s3) if s3.object_lock.is_some());
    let probed = match probe(repository).await {
        Ok(notes) => probe_lock(repository, lock_wanted).await.map(|lock| {
            let mut notes = notes;
            notes.extend(lock);
            notes
        }),
        Err(e) => Err(e),
    };
    let probed = match probed {
        Ok(notes) => clock_of(repository, config.max_clock_skew)
            .await
            .map(|clock| notes.into_iter().chain(clock).collect::<Vec<String>>()),
        Err(e) => Err(e),
    };
    let probed = match probed {
        Ok(mut notes) => {
            notes.extend(versioning_of(repository, lock_wanted).await);
            Ok(notes)
        }
        Err(e) => Err(e),
    };
    let wiped = markers.wiped(repositories, index);
    let probed = probed.and_then(
        |mut notes: Vec<String>| match (&markers.held[index], wiped) {
            (_, Some(wiped)) => Err(format!("{wiped}; {}", wiped.hints().join("; "))),
            (Ok(true), None) => Ok(notes),
            (Ok(false), None) => {
                notes.push(format!(
                    "no marker '{}' yet: the first backup writes it",
                    layout::MARKER_KEY
                ));
                Ok(notes)
            }
            (Err(e), None) => Err(e.chain().join(": ")),
        },
    );
    let (problem, notes) = match probed {
        Ok(notes) => (None, notes),
        Err(e) => (Some(e), Vec::new()),
    };
    CheckItem {
        what,
        problem,
        notes,
        warnings: Vec::new(),
    }
}

/// The signing key and trusted signers, when either is set.
/// What a backup of this config holds in memory at most, term by term, so that a host's
/// memory limit (a systemd `MemoryMax=`, a container's) can be set from it.
fn memory_item(config: &Config) -> CheckItem {
    let bound = crate::backup::memory_bound(config);
    let s3: Vec<String> = config
        .repositories
        .iter()
        .filter_map(|r| match &r.location {
            Location::S3(s3) => Some(format!(
                "{} × {} ('{}')",
                human_size(s3.part_size),
                s3.parts_in_flight,
                r.name
            )),
            Location::Local { .. } => None,
        })
        .collect();
    let parts = if s3.is_empty() {
        String::new()
    } else {
        format!(
            " + {} of S3 parts ({})",
            human_size(bound.parts),
            s3.join(" + ")
        )
    };
    let reads = config
        .repositories
        .iter()
        .filter_map(|r| match &r.location {
            Location::S3(s3) => Some(format!(
                "a restore from '{}' holds at most about {}: {} + {} × {} ranges read ahead",
                r.name,
                human_size(crate::restore::memory_bound(r)),
                human_size(crate::restore::RESTORE_MEMORY),
                human_size(s3.part_size),
                s3.download_concurrency
            )),
            Location::Local { .. } => None,
        });
    CheckItem {
        what: format!(
            "memory: a backup holds at most about {}",
            human_size(bound.total())
        ),
        problem: None,
        notes: vec![format!(
            "{} program + {} zstd ({} thread(s) at level {}) + {} queued chunks{parts}",
            human_size(bound.program),
            human_size(bound.compression),
            config.compression.threads,
            config.compression.level,
            human_size(bound.queued),
        )]
        .into_iter()
        .chain(reads)
        .collect(),
        warnings: Vec::new(),
    }
}

fn signing_item(config: &Config) -> Option<CheckItem> {
    if config.signing.key_file.is_none() && !config.signing.trust.required() {
        return None;
    }
    let (problem, notes) = match config.signing.signer() {
        Ok(signer) => (
            None,
            signer
                .map(|signer| format!("signs manifests with key {}", signer.key_id()))
                .into_iter()
                .chain(config.signing.trust.required().then(|| {
                    "trusted_signers set: manifests not signed by one of them are refused"
                        .to_string()
                }))
                .collect(),
        ),
        Err(e) => (Some(e.chain().join(": ")), Vec::new()),
    };
    Some(CheckItem {
        what: "signing".to_string(),
        problem,
        notes,
        warnings: Vec::new(),
    })
}

/// A schedule whose runs are further apart than the RPO keeps the job in breach between
/// them: found here, not by the alert a day later. Physical jobs are exempt: their RPO is
/// the WAL archive's.
fn schedule_against_rpo(config: &Config, job: &JobConfig) -> Vec<String> {
    use crate::calendar::{Gap, longest_gap};
    use crate::schedule::BACKUP_RANDOMIZED_DELAY;
    let physical =
        matches!(&job.source, JobSource::Postgres(p) if p.mode == PostgresMode::Physical);
    let Some(calendar) = job.schedule.as_deref().filter(|_| !physical) else {
        return Vec::new();
    };
    let rpo = config.targets.rpo;
    let human = |d: Duration| humantime::format_duration(d).to_string();
    let gap = match longest_gap(calendar) {
        None => return Vec::new(),
        Some(Gap::AtMostOnce) => {
            return vec![format!(
                "schedule \"{calendar}\" runs at most once more (a date, not a repetition): after that the newest backup only ages past the RPO of {}; write a repetition such as \"*:0/30\" or \"daily\"",
                human(rpo)
            )];
        }
        Some(Gap::Ends(last)) => {
            return vec![format!(
                "schedule \"{calendar}\" stops: its last run is {} UTC, and the newest backup only ages past the RPO of {} after it; leave the year or the day out",
                last.format("%Y-%m-%d %H:%M"),
                human(rpo)
            )];
        }
        Some(Gap::Every(gap)) => gap,
    };
    if gap + BACKUP_RANDOMIZED_DELAY <= rpo {
        return Vec::new();
    }
    let advice = match rpo.checked_sub(BACKUP_RANDOMIZED_DELAY) {
        Some(room) if room >= Duration::from_secs(60) => format!(
            "schedule the job at least every {}, or raise [targets] rpo",
            human(room)
        ),
        _ => format!(
            "no timer meets an RPO that short (the timers add up to {} of randomized delay): raise [targets] rpo, or for PostgreSQL use a physical job, whose WAL archiving holds the RPO",
            human(BACKUP_RANDOMIZED_DELAY)
        ),
    };
    vec![format!(
        "schedule \"{calendar}\" leaves up to {} between backups (plus up to {} of randomized delay), longer than the RPO of {}: the newest backup outgrows the RPO before each run, and `status` and the RPO alert say so; {advice}",
        human(gap),
        human(BACKUP_RANDOMIZED_DELAY),
        human(rpo),
    )]
}

/// A physical job's RPO is read from the archive: an idle database archives nothing, and
/// reads as a breach, unless a heartbeat timer writes a row every minute.
async fn heartbeat_warnings(job: &JobConfig) -> Vec<String> {
    let JobSource::Postgres(postgres) = &job.source else {
        return Vec::new();
    };
    if postgres.mode != PostgresMode::Physical {
        return Vec::new();
    }
    let timer = format!("lifeboat-heartbeat-{}.timer", job.name);
    if !postgres.heartbeat {
        return vec![format!(
            "no heartbeat: an idle database archives no WAL, so its RPO reads as breached; set `heartbeat = true` and install the heartbeat timer ({timer}, from `lifeboat schedule systemd`)"
        )];
    }
    let Ok(server) =
        Connection::from_settings(&format!("job '{}'", job.name), &postgres.connection)
    else {
        return Vec::new();
    };
    match logical::heartbeat_age(&server, &job.name).await {
        Ok(Some(age)) if age <= HEARTBEAT_MAX_AGE.as_secs_f64() => Vec::new(),
        Ok(Some(age)) => vec![format!(
            "the newest heartbeat is {} old: the heartbeat timer ({timer}) is not running; `lifeboat schedule systemd --install` makes it",
            humantime::format_duration(Duration::from_secs(age.max(0.0) as u64))
        )],
        Ok(None) => vec![format!(
            "no heartbeat written yet: install the heartbeat timer ({timer}, from `lifeboat schedule systemd --install`), which writes one every minute"
        )],
        Err(e) => vec![format!(
            "the heartbeat could not be read: {}",
            e.chain().join(": ")
        )],
    }
}

/// The heartbeat timer fires every minute; this leaves room for a late run or two.
const HEARTBEAT_MAX_AGE: Duration = Duration::from_secs(5 * 60);

/// The recipients parse, and an identity configured on this host (if any) opens what is
/// encrypted to them: found now, not at the restore that needs it.
fn check_encryption(config: &Config) -> Result<Vec<String>> {
    let Some(recipients) = config.recipients() else {
        return Ok(Vec::new());
    };
    let mut notes = vec![format!(
        "encrypting to {} recipient(s): {}",
        recipients.texts().len(),
        recipients.texts().join(", ")
    )];
    let keyring = config.keyring();
    if !keyring.has_identity() {
        notes.push(format!(
            "no identity here: restores, drills and verify --deep need {} (a backup-only host needs none)",
            crate::keys::IDENTITY_ENV
        ));
        return Ok(notes);
    }
    let identities = keyring.identities("the probe")?;
    let mut sealed = Vec::new();
    let opened = (|| -> std::io::Result<bool> {
        use std::io::{Read, Write};
        let mut writer = recipients.encryptor(None)?.wrap_output(&mut sealed)?;
        writer.write_all(b"lifeboat check")?;
        writer.finish()?;
        let mut plain = Vec::new();
        Ok(match crate::keys::open(&sealed[..], &identities) {
            Ok(mut reader) => reader.read_to_end(&mut plain).is_ok() && plain == b"lifeboat check",
            Err(_) => false,
        })
    })()
    .map_err(|e| Error::new(ErrorKind::Config, "unable to encrypt a probe").with_source(e))?;
    if !opened {
        return Err(Error::new(
            ErrorKind::Key,
            format!(
                "the key in {} matches none of the recipients: restores with it would fail",
                keyring.describe()
            ),
        ));
    }
    notes.push(format!(
        "{} opens what is encrypted to them",
        keyring.describe()
    ));
    Ok(notes)
}

/// Reaches the job's source the way a backup would, without taking one.
async fn check_source(config: &Config, job: &JobConfig) -> Result<Vec<String>> {
    match &job.source {
        JobSource::Postgres(postgres) if postgres.mode == PostgresMode::Physical => {
            check_archiving(config, job, postgres).await
        }
        JobSource::Redis(redis) => {
            let server = RedisServer::from_job(redis)?;
            let info = server.info().await?;
            let mut lines = vec![format!(
                "Redis {} at {}, {} key(s)",
                info.version,
                server.describe(),
                info.keys
            )];
            if let Some(replica) = server.replica_of().await? {
                if let Some(stale) = replica.cut_off(&server) {
                    return Err(stale);
                }
                lines.push(format!(
                    "a replica of {}, last heard from {} s ago: its backups' recovery point is that contact",
                    replica.primary,
                    replica.last_io_seconds.unwrap_or(0)
                ));
            }
            if let Some(rdb_path) = &redis.rdb_path {
                lines.push(crate::sources::redis::check_rdb_path(&server, rdb_path).await?);
            }
            Ok(lines)
        }
        JobSource::Files(files) => {
            let roots = crate::sources::files::roots(files);
            crate::sources::files::check_roots(&job.name, &roots)?;
            let mut lines = roots
                .roots
                .iter()
                .map(|root| crate::sources::files::describe(&job.name, root))
                .collect::<Result<Vec<_>>>()?;
            lines.extend(roots.notes.iter().map(|note| format!("note: {note}")));
            Ok(lines)
        }
        JobSource::Postgres(postgres) => {
            let server =
                Connection::from_settings(&format!("job '{}'", job.name), &postgres.connection)?;
            let (info, found) = logical::discover(&server).await?;
            let databases = found.dumpable;
            let skipped: Vec<String> = found
                .skipped
                .iter()
                .map(|s| format!("database '{}' cannot be backed up: {}", s.name, s.reason))
                .collect();
            let binaries = Binaries::find(postgres.bin_dir.as_deref(), info.major)?;
            let mut lines = vec![
                format!(
                    "PostgreSQL {} at {}, {} database(s)",
                    info.version,
                    server.describe(),
                    databases.len()
                ),
                format!(
                    "client binaries: {} (version {})",
                    binaries.dir.display(),
                    binaries.major
                ),
            ];
            if postgres.databases.is_none() {
                lines.extend(skipped);
            }
            if !info.is_superuser {
                lines.push(
                    "the role is not a superuser: backups hold the roles without their passwords"
                        .to_string(),
                );
            }
            Ok(lines)
        }
    }
}

/// Like `pgbackrest check`: the cluster is set up for physical backups, and a WAL segment
/// it is made to end reaches every repository.
async fn check_archiving(
    config: &Config,
    job: &JobConfig,
    postgres: &PostgresJob,
) -> Result<Vec<String>> {
    let server = Connection::from_settings(&format!("job '{}'", job.name), &postgres.connection)?;
    let cluster = physical::preflight(&server, &job.name).await?;
    let binaries = Binaries::find(postgres.bin_dir.as_deref(), cluster.major)?;
    let clock = Instant::now();
    let segment = physical::switch_wal(&server).await?;
    let file = WalFile::parse(&segment).ok_or_else(|| {
        Error::new(
            ErrorKind::Source,
            format!("the server named its WAL segment '{segment}', which is not a segment name"),
        )
    })?;
    let keys = layout::wal_keys(
        &job.name,
        &file,
        crate::wal_archive::encrypts(config, &file),
    );
    let mut waiting = Repository::open_all(config).await;
    while !waiting.is_empty() && clock.elapsed() < ARCHIVE_WAIT {
        let mut still = Vec::new();
        for repository in waiting {
            let mut archived = false;
            for key in &keys {
                archived = archived || repository.store.head(key).await.is_ok();
            }
            if !archived {
                still.push(repository);
            }
        }
        waiting = still;
        if !waiting.is_empty() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    if !waiting.is_empty() {
        let names: Vec<&str> = waiting.iter().map(|r| r.name.as_str()).collect();
        return Err(Error::new(
            ErrorKind::Source,
            format!(
                "WAL archiving does not work end to end: segment {segment} did not reach repository {} within {} s",
                names.join(", "),
                ARCHIVE_WAIT.as_secs()
            ),
        )
        .with_hint(format!(
            "archive_command is '{}'; see pg_stat_archiver (last_failed_wal) and the server log for the archiver's errors",
            cluster.archive_command
        )));
    }
    // The switch this check made wrote to the end of that segment.
    if let Some(number) = file.segment(cluster.wal_segment_size) {
        let position = crate::wal::Lsn((number + 1) * cluster.wal_segment_size);
        let repositories = Repository::open_all(config).await;
        if let Some((newer, switched_at)) =
            crate::continuity::branched_off(&repositories, &job.name, (file.timeline, position))
                .await?
        {
            return Err(Error::new(
                ErrorKind::Source,
                format!(
                    "split brain: timeline {newer} in job '{}''s archive branched off this server's timeline {} at {switched_at}, and the server has written on past it (to {position})",
                    job.name, file.timeline
                ),
            )
            .with_hint("this server is an old primary that kept running after a failover: stop it, or give it a job of its own; restores along the newest timeline pass its WAL and backups by"));
        }
    }
    Ok(vec![
        format!(
            "PostgreSQL {} at {}, system {}",
            cluster.version,
            server.describe(),
            cluster.system_identifier
        ),
        format!(
            "client binaries: {} (version {})",
            binaries.dir.display(),
            binaries.major
        ),
        format!(
            "WAL archiving: segment {segment} reached every repository in {:.1}s",
            clock.elapsed().as_secs_f64()
        ),
    ])
}

/// How long `check` waits for a switched segment to be archived everywhere.
const ARCHIVE_WAIT: Duration = Duration::from_secs(60);

/// Writes, reads back, lists and deletes a probe object, and tests whether conditional
/// create is enforced (some S3-compatible servers silently ignore If-None-Match).
async fn probe(repository: &Repository) -> Result<Vec<String>, String> {
    let store = repository.store.as_ref();
    let token = format!(
        "{}-{}-{}",
        crate::host::name(),
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
    );
    let key = format!("check/probe-{token}");
    let body = Bytes::from(format!("lifeboat check {token}\n"));
    let fail =
        |action: &str, e: StoreError| format!("unable to {action} probe object '{key}': {e}");

    storage::put_bytes(store, &key, body.clone())
        .await
        .map_err(|e| fail("write", e))?;
    let cleanup = async {
        let read = storage::get_bytes(store, &key).await.map_err(|e| fail("read", e))?;
        if read != body {
            return Err(format!("probe object '{key}' read back different bytes than were written"));
        }
        let listed = store.list("check/").await.map_err(|e| fail("list", e))?;
        if !listed.iter().any(|o| o.key == key) {
            return Err(format!("probe object '{key}' was written but is not listed"));
        }
        let conditional = format!("{key}.conditional");
        let mut notes = Vec::new();
        store.create_if_absent(&conditional, body.clone()).await.map_err(|e| fail("create", e))?;
        match store.create_if_absent(&conditional, body.clone()).await {
            Err(StoreError::AlreadyExists { .. }) => notes.push("conditional create: enforced".to_string()),
            Ok(()) => notes.push(
                "conditional create: NOT enforced by this server (If-None-Match ignored); two runs of one job in the same second store under names unique to each run and the later one may fail with a conflict"
                    .to_string(),
            ),
            Err(e) => return Err(fail("create", e)),
        }
        store.delete_unless_retained(&conditional).await.map_err(|e| fail("delete", e))?;
        Ok(notes)
    }
    .await;
    store
        .delete_unless_retained(&key)
        .await
        .map_err(|e| fail("delete", e))?;
    let notes = cleanup?;
    match store.head(&key).await {
        Err(StoreError::NotFound { .. }) => Ok(notes),
        Ok(_) => Err(format!("probe object '{key}' is still there after delete")),
        Err(e) => Err(fail("stat", e)),
    }
}

/// The repository's clock against this host's: a failure beyond `max_skew`, for backups
/// would record wrong times and prune would keep the wrong ones.
async fn clock_of(repository: &Repository, max_skew: Duration) -> Result<Option<String>, String> {
    let readings = crate::clock::read(std::slice::from_ref(repository)).await;
    if let Some((_, why)) = readings.unread.first() {
        return Err(why.clone());
    }
    if let Some(beyond) = readings.beyond(max_skew).pop() {
        return Err(format!(
            "{beyond}, more than max_clock_skew ({}); fix this host's time sync (`timedatectl status`)",
            humantime::format_duration(max_skew)
        ));
    }
    Ok(Some(match readings.read.first() {
        Some((_, reading)) => format!(
            "clock: {} from this host's (max_clock_skew {})",
            crate::clock::human(reading.skew().abs()),
            humantime::format_duration(max_skew)
        ),
        None => "clock: this repository gives no time to compare with (no Date header); backups take this host's".to_string(),
    }))
}

/// Whether the bucket keeps versions: prune then removes every version of what it deletes,
/// and records lifeboat replaces keep their old versions unless a lifecycle rule expires
/// them.
async fn versioning_of(repository: &Repository, locked: bool) -> Vec<String> {
    let versioning = match repository.store.versioning().await {
        Ok(Some(versioning)) => versioning,
        Ok(None) => return Vec::new(),
        Err(e) => return vec![format!("versioning: could not be read ({e})")],
    };
    let mut notes = vec![format!(
        "versioning: {} (prune removes every stored version of what it deletes)",
        versioning.status
    )];
    if !locked {
        match versioning.noncurrent_expire {
            Some(true) => notes.push("lifecycle: a rule expires noncurrent versions".to_string()),
            Some(false) => notes.push(
                "lifecycle: NO rule expires noncurrent versions, so records lifeboat replaces (verify records, the prune journal, manifests rekey rewrites) keep every old version; add one (README, \"Retention and prune\")"
                    .to_string(),
            ),
            None => notes.push("lifecycle: the bucket's rules could not be read".to_string()),
        }
    }
    notes
}

/// Whether backups in this repository are really immutable: a failure when `object_lock`
/// is configured and the bucket does not enforce it, a note otherwise.
async fn probe_lock(repository: &Repository, wanted: bool) -> Result<Option<String>, String> {
    let key = format!(
        "check/lock-probe-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
    );
    let support = repository
        .store
        .probe_lock(&key)
        .await
        .map_err(|e| format!("unable to probe Object Lock: {e}"))?;
    match (support, wanted) {
        (LockSupport::Unsupported, false) => Ok(None),
        (LockSupport::Unsupported, true) => Err("object_lock is set but this repository cannot lock objects".to_string()),
        (LockSupport::NotImplemented, false) => Ok(Some("Object Lock: not available (the server does not implement it; backups can be deleted with the repository's credentials)".to_string())),
        (LockSupport::NotImplemented, true) => Err("object_lock is set but this S3 server does not implement Object Lock (it answered NotImplemented): backups are NOT immutable here".to_string()),
        (LockSupport::NotEnabled, false) => Ok(Some("Object Lock: not enabled on the bucket (backups can be deleted with the repository's credentials)".to_string())),
        (LockSupport::NotEnabled, true) => Err("object_lock is set but the bucket does not have Object Lock enabled: backups are NOT immutable; create the bucket with Object Lock enabled".to_string()),
        (LockSupport::NotEnforced, false) => Ok(Some("Object Lock: the bucket says enabled but a locked probe could be deleted; this server does not enforce it".to_string())),
        (LockSupport::NotEnforced, true) => Err("the server accepts Object Lock settings but let a locked probe be deleted: backups are NOT immutable on this server".to_string()),
        (LockSupport::Enforced, true) => Ok(Some("Object Lock: enforced (a locked probe could not be deleted before its date)".to_string())),
        (LockSupport::Enforced, false) => Ok(Some("Object Lock: enabled and enforced on the bucket, but object_lock is not set, so backups are written without a retain-until date".to_string())),
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "ok       config '{}'", self.config)?;
        for item in &self.items {
            match &item.problem {
                None if item.warnings.is_empty() => writeln!(f, "ok       {}", item.what)?,
                None => writeln!(f, "WARNING  {}", item.what)?,
                Some(problem) => writeln!(f, "FAILED   {}: {problem}", item.what)?,
            }
            for warning in &item.warnings {
                writeln!(f, "         warning: {warning}")?;
            }
            for note in &item.notes {
                writeln!(f, "         {note}")?;
            }
        }
        Ok(())
    }
}
