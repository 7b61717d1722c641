//! `lifeboat restore JOB`, by stage: select the backup (here), then the kind's own fetch,
//! verify and write stages (`files`, `postgres`). Nothing reaches the target before the
//! stored checksum of what it is built from matched; what is decoded into a target as it
//! streams is checked again at its end, and a mismatch undoes what the restore created.

mod extract;
mod files;
mod physical;
mod postgres;
mod redis;
mod staging;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::Instrument;

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::human::{human_duration, human_size};
use crate::keys::Keyring;
use crate::layout;
use crate::manifest::{BackupKind, Manifest};
use crate::repository::Repository;
use crate::transfer::StoredObject;

pub use extract::ExtractSummary;
/// The tar restore path on its own: what the fuzz tests drive.
pub use extract::extract as extract_tar;
pub use physical::{PhysicalRestoreOptions, RecoveryTarget};
pub(crate) use physical::{redo_done_at, stopped_where};

pub struct RestoreOptions {
    pub job: String,
    /// A backup id, or "latest".
    pub backup: String,
    pub from: Option<String>,
    /// Repositories not to read from (a drill playing their loss).
    pub exclude: Vec<String>,
    /// `files` jobs: the directory to restore into.
    pub into: Option<PathBuf>,
    pub postgres: PostgresRestoreOptions,
    /// Physical postgres jobs: where and how far to recover.
    pub physical: Option<PhysicalRestoreOptions>,
    /// Redis jobs: load the RDB into a throw-away redis-server left running.
    pub start_scratch: bool,
    /// Decrypt with this identity file instead of `LIFEBOAT_IDENTITY_FILE` or the config's
    /// (a drill proving the escrow key).
    pub identity_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default)]
pub struct PostgresRestoreOptions {
    /// DSN of the server to restore into.
    pub target: Option<String>,
    /// Only this database of the backup.
    pub database: Option<String>,
    /// Restore the one `database` under this name.
    pub rename_to: Option<String>,
    /// pg_restore --jobs: for indexes and constraints, and table data with `parallel_data`.
    pub jobs: u32,
    /// Stage the dumps decompressed, so pg_restore loads tables in parallel too.
    pub parallel_data: bool,
    /// Also restore roles and tablespaces, first.
    pub globals: bool,
    /// Replace an existing database that holds objects: load beside it, then swap names.
    pub clean: bool,
    /// Drop the replaced database after the swap instead of keeping it.
    pub drop_previous: bool,
    /// With `clean`: the target is the very server the backup was taken from, and replacing
    /// its databases (losing what was written since) is intended.
    pub yes_this_is_the_source: bool,
    /// End the sessions on a database being replaced when the swap comes.
    pub terminate_sessions: bool,
    /// How long the swap waits for those sessions to end (zero: the default, 30 s).
    pub swap_wait: Duration,
    /// Globals without passwords: create their login roles LOGIN anyway (not NOLOGIN).
    pub keep_login: bool,
    pub no_owner: bool,
    /// Where to stage the verified dumps; default $TMPDIR or /var/tmp.
    pub staging_dir: Option<PathBuf>,
    /// The job's `bin_dir`, if it has one.
    pub bin_dir: Option<PathBuf>,
}

/// A database a `--clean` restore replaced, kept beside the restored one.
#[derive(Debug, Clone, Serialize)]
pub struct KeptDatabase {
    pub database: String,
    pub kept_as: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableRows {
    pub database: String,
    pub table: String,
    pub rows: i64,
}

#[derive(Debug, Serialize)]
pub struct RestoreReport {
    pub job: String,
    pub id: String,
    /// The repository that served it (the first, when a copy had to be read elsewhere).
    pub repository: String,
    /// Every repository that served part of it, in the order used.
    pub repositories: Vec<String>,
    /// Each object and the repository it was read from.
    pub served: Vec<(String, String)>,
    /// How long each stage took, in order (download and verify, load, ...).
    pub stages: Vec<(String, Duration)>,
    /// The directory or the server restored into.
    pub target: String,
    /// What was restored: a count of entries, or database names.
    pub restored: Vec<String>,
    /// The databases this restore created on the target server (a drill drops them again).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub created_databases: Vec<String>,
    /// The databases a `--clean` restore replaced, kept under these names.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kept_databases: Vec<KeptDatabase>,
    /// Every restored table with its row count, as counted before the swap.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<TableRows>,
    pub bytes: u64,
    pub duration: Duration,
    pub warnings: Vec<String>,
    /// A physical restore's last segment of the archive as listed when it began: where
    /// replay to the end must get to (a drill checks it, and ends replay there).
    #[serde(skip)]
    pub archive_end: Option<crate::continuity::Point>,
    /// Of `warnings`, the objects a repository could not serve that another one then did:
    /// a drill's report names them.
    #[serde(skip)]
    pub passed_over: Vec<String>,
    /// How the download and unpacking of a tar object went: what a drill's RTO projection
    /// scales.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer: Option<crate::rto_model::Transfer>,
}

impl fmt::Display for RestoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for warning in &self.warnings {
            writeln!(f, "warning: {warning}")?;
        }
        write!(
            f,
            "restored {}/{} from repository {} into {}: {}, {} in {}",
            self.job,
            self.id,
            self.repositories
                .iter()
                .map(|r| format!("'{r}'"))
                .collect::<Vec<_>>()
                .join(" and "),
            self.target,
            self.restored.join(", "),
            human_size(self.bytes),
            human_duration(self.duration)
        )
    }
}

/// The backup chosen for a restore, and the repositories holding it, in the order they are
/// read from: `--from` alone, else config order.
struct Selected {
    sources: Vec<Repository>,
    manifest: Manifest,
    started: Instant,
    /// Which repository served each object, and what failed on the way.
    served: Mutex<Vec<(String, String)>>,
    warnings: Mutex<Vec<String>>,
    /// The identities that decrypt the backup's objects, if they are encrypted.
    keyring: Keyring,
}

impl Selected {
    /// Runs `attempt` against each repository holding the backup until one succeeds. A
    /// failure of a repository's copy (missing, unreadable, damaged) moves on to the next;
    /// a failure of the restore target does not.
    async fn read_from_any<T>(
        &self,
        object: &str,
        mut attempt: impl AsyncFnMut(&Repository) -> Result<T>,
    ) -> Result<T> {
        let mut failures: Vec<(String, Error)> = Vec::new();
        for (index, repository) in self.sources.iter().enumerate() {
            let next = self.sources.get(index + 1);
            match attempt(repository).await {
                Ok(value) => {
                    if !failures.is_empty() {
                        self.warnings.lock().expect("warnings lock").push(format!(
                            "{object}: served by repository '{}' after {}",
                            repository.name,
                            failures
                                .iter()
                                .map(|(name, e)| format!(
                                    "'{name}' failed: {}",
                                    e.chain().join(": ")
                                ))
                                .collect::<Vec<_>>()
                                .join("; ")
                        ));
                    }
                    self.served
                        .lock()
                        .expect("served lock")
                        .push((object.to_string(), repository.name.clone()));
                    return Ok(value);
                }
                // The target, or the key, would fail the same way with any other copy.
                Err(e) if matches!(e.kind(), ErrorKind::Target | ErrorKind::Key) => return Err(e),
                Err(e) => {
                    if let Some(next) = next {
                        tracing::warn!(object = %object, repository = %repository.name, error = %e.chain().join(": "), "reading from repository '{}', which holds it too", next.name);
                    }
                    failures.push((repository.name.clone(), e));
                }
            }
        }
        let mut failures = failures.into_iter();
        let (_, first) = failures.next().expect("a backup has at least one source");
        Err(failures.fold(first, |error, (name, e)| {
            error.with_hint(format!(
                "repository '{name}' failed too: {}",
                e.chain().join(": ")
            ))
        }))
    }

    /// Fails before anything is restored when the backup is encrypted and the keyring
    /// holds no identity that opens it (read from the first object's header alone).
    async fn check_key(&self) -> Result<()> {
        let Some(object) = self.manifest.objects.iter().find(|o| o.is_encrypted()) else {
            return Ok(());
        };
        // An identity file that cannot be used is the same for every repository.
        self.keyring.identities(&format!(
            "backup '{}/{}'",
            self.manifest.job, self.manifest.id
        ))?;
        self.read_from_any(&object.name, async |repository| {
            let stored = StoredObject {
                repository,
                manifest: &self.manifest,
                object,
            };
            stored.check_key(&self.keyring).await
        })
        .await?;
        self.served.lock().expect("served lock").clear();
        self.warnings.lock().expect("warnings lock").clear();
        Ok(())
    }

    fn report(
        self,
        target: String,
        restored: Vec<String>,
        bytes: u64,
        mut warnings: Vec<String>,
        stages: Vec<(String, Duration)>,
    ) -> RestoreReport {
        let served = self.served.into_inner().expect("served lock");
        let mut repositories: Vec<String> = Vec::new();
        for (_, repository) in &served {
            if !repositories.contains(repository) {
                repositories.push(repository.clone());
            }
        }
        let passed_over = self.warnings.into_inner().expect("warnings lock");
        warnings.extend(passed_over.iter().cloned());
        RestoreReport {
            job: self.manifest.job.clone(),
            id: self.manifest.id.clone(),
            repository: repositories.first().cloned().unwrap_or_default(),
            repositories,
            served,
            stages,
            target,
            restored,
            created_databases: Vec::new(),
            kept_databases: Vec::new(),
            tables: Vec::new(),
            bytes,
            duration: self.started.elapsed(),
            warnings,
            archive_end: None,
            passed_over,
            transfer: None,
        }
    }
}

/// The backup a physical restore uses: its id, the WAL archive's listing when it was read
/// to follow the timelines, and the newer backups passed by as off the timeline's path.
type Chosen = (
    String,
    Option<crate::continuity::ArchiveListing>,
    Vec<String>,
);

/// The newest backup of a physical job from which recovery can reach `target`.
async fn newest_reaching(
    config: &Config,
    job: &str,
    from: Option<&str>,
    exclude: &[String],
    target: RecoveryTarget,
    timeline_choice: crate::continuity::TimelineChoice,
) -> Result<Chosen> {
    let repositories = Repository::readable(config, from, exclude).await?;
    let survey = crate::inventory::survey(&repositories, job).await;
    let mut oldest_end = None;
    let mut listing = None;
    let mut off_path = Vec::new();
    for id in survey.committed_ids().into_iter().rev() {
        if let (RecoveryTarget::Time(at), Some(started)) = (target, layout::parse_backup_id(&id))
            && started > at
        {
            continue;
        }
        let Some((manifest, _, _)) = survey.manifest(job, &id).await else {
            continue;
        };
        if !target.reachable_from(&manifest) {
            oldest_end = Some(manifest.recovery_point);
            continue;
        }
        let source = &manifest.source;
        let (Some(timeline), Some(stop), Some(segment_size)) = (
            source.timeline,
            source.stop_lsn.as_deref().and_then(crate::wal::Lsn::parse),
            source.wal_segment_size,
        ) else {
            return Ok((id, listing, off_path));
        };
        if listing.is_none() {
            listing = Some(
                crate::continuity::ArchiveListing::list(&repositories, job, segment_size).await,
            );
        }
        let listed = listing.as_ref().expect("listed above");
        // A backup off the path to the timeline recovery follows cannot reach the target.
        let path = crate::continuity::path_for(
            &repositories,
            job,
            listed,
            (timeline, stop),
            timeline_choice,
            segment_size,
        )
        .await?;
        if path.is_some() {
            return Ok((id, listing, off_path));
        }
        off_path.push(format!(
            "backup {id} (timeline {timeline}, stopped at {stop}) is not on the path to timeline {}: taken on a timeline after another branched off it (split brain), or not an ancestor",
            timeline_choice.resolve(listed, timeline)
        ));
    }
    if target == RecoveryTarget::EndOfArchive && off_path.is_empty() {
        // No backup at all, or none readable: `select` says which, as for any job.
        return Ok(("latest".to_string(), None, off_path));
    }
    // A target before every backup began skipped them all: the oldest still says how far
    // back a restore can reach.
    if oldest_end.is_none()
        && let Some(oldest) = survey.committed_ids().first()
        && let Some((manifest, _, _)) = survey.manifest(job, oldest).await
    {
        oldest_end = Some(manifest.recovery_point);
    }
    let mut error = Error::new(
        ErrorKind::NotFound,
        format!(
            "unable to find a backup of job '{job}' that ends before {}",
            target.describe()
        ),
    );
    if let Some(end) = oldest_end {
        error = error.with_hint(format!(
            "the oldest backup ends at {}: no restore reaches an earlier moment",
            end.to_rfc3339()
        ));
    }
    for skipped in off_path {
        error = error.with_hint(skipped);
    }
    Err(error.with_hint(format!("run `lifeboat list {job}` to see the backups")))
}

/// The manifest of the backup a restore with these arguments would use (see `select`).
/// What a restore holds in memory besides its reads: the program, the decoders and the
/// pipeline, measured at 35-40 MiB for every kind of restore.
pub const RESTORE_MEMORY: u64 = 40 << 20;

/// The most a restore reading from `repository` holds: its own memory, and from an S3
/// repository the ranges read ahead of the one being handed on.
pub fn memory_bound(repository: &crate::config::RepositoryConfig) -> u64 {
    RESTORE_MEMORY
        + match &repository.location {
            crate::config::Location::S3(s3) => s3.part_size * s3.download_concurrency as u64,
            crate::config::Location::Local { .. } => 0,
        }
}

/// How a restore from `repository` reads a large object: how many ranges of which size.
pub fn read_ahead(repository: &crate::config::RepositoryConfig) -> crate::storage::ReadAhead {
    match &repository.location {
        crate::config::Location::S3(s3) => crate::storage::ReadAhead {
            streams: u32::try_from(s3.download_concurrency).unwrap_or(u32::MAX),
            range_bytes: s3.part_size,
        },
        crate::config::Location::Local { .. } => crate::storage::ReadAhead {
            streams: 1,
            range_bytes: 0,
        },
    }
}

pub async fn find_backup(
    config: &Config,
    job: &str,
    wanted: &str,
    from: Option<&str>,
    exclude: &[String],
) -> Result<Manifest> {
    Ok(select(config, job, wanted, from, exclude).await?.manifest)
}

/// Finds the backup: `--from` alone, else every repository in config order (one that
/// cannot be listed is passed over with a warning). "latest" is the newest backup any of
/// them holds.
async fn select(
    config: &Config,
    job: &str,
    wanted: &str,
    from: Option<&str>,
    exclude: &[String],
) -> Result<Selected> {
    let candidates = Repository::readable(config, from, exclude).await?;
    if candidates.is_empty() {
        return Err(Error::usage(format!(
            "unable to restore job '{job}': every repository is excluded"
        )));
    }
    let mut holders: Vec<(Repository, Vec<String>)> = Vec::new();
    let mut unreachable: Vec<Error> = Vec::new();
    for repository in candidates {
        match repository.backup_ids(job).await {
            Ok(ids) => holders.push((repository, ids)),
            Err(e) => {
                tracing::warn!(repository = %repository.name, error = %e.chain().join(": "), "passing over a repository that cannot be listed");
                unreachable.push(e);
            }
        }
    }
    let id = if wanted == "latest" {
        holders
            .iter()
            .filter_map(|(_, ids)| ids.first())
            .max()
            .cloned()
    } else {
        holders
            .iter()
            .any(|(_, ids)| ids.iter().any(|id| id == wanted))
            .then(|| wanted.to_string())
    };
    let Some(id) = id else {
        if holders.is_empty()
            && let Some(first) = unreachable.into_iter().next()
        {
            return Err(first);
        }
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("unable to find backup '{wanted}' of job '{job}' in any reachable repository"),
        )
        .with_hint(format!(
            "run `lifeboat list {job}` to see the backups each repository holds"
        )));
    };
    let sources: Vec<Repository> = holders
        .into_iter()
        .filter(|(_, ids)| ids.contains(&id))
        .map(|(repository, _)| repository)
        .collect();
    let mut manifest_error = None;
    let mut manifest = None;
    for (index, repository) in sources.iter().enumerate() {
        match repository.read_manifest(job, &id).await {
            Ok(found) => {
                manifest = Some(found);
                break;
            }
            Err(e) => {
                if let Some(next) = sources.get(index + 1) {
                    tracing::warn!(repository = %repository.name, error = %e.chain().join(": "), "unable to read the manifest; trying repository '{}'", next.name);
                }
                manifest_error.get_or_insert(e);
            }
        }
    }
    let Some(manifest) = manifest else {
        return Err(manifest_error.expect("a source was tried"));
    };
    Ok(Selected {
        sources,
        manifest,
        started: Instant::now(),
        served: Mutex::new(Vec::new()),
        warnings: Mutex::new(Vec::new()),
        keyring: Keyring::default(),
    })
}

pub async fn run(config: &Config, options: &RestoreOptions) -> Result<RestoreReport> {
    let started = Instant::now();
    let job = config.job(&options.job)?;
    let (wanted, listed, passed_by) = match &options.physical {
        Some(physical) if options.backup == "latest" => {
            newest_reaching(
                config,
                &job.name,
                options.from.as_deref(),
                &options.exclude,
                physical.target,
                physical.timeline,
            )
            .await?
        }
        _ => (options.backup.clone(), None, Vec::new()),
    };
    let mut selected = select(
        config,
        &job.name,
        &wanted,
        options.from.as_deref(),
        &options.exclude,
    )
    .await?;
    selected.started = started;
    selected.keyring = match &options.identity_file {
        Some(path) => Keyring::from_file(path.clone(), "the drill's identity_file"),
        None => config.keyring(),
    };
    selected.check_key().await?;
    selected
        .warnings
        .lock()
        .expect("warnings lock")
        .extend(passed_by.into_iter().map(|why| format!("passed by: {why}")));
    let id = selected.manifest.id.clone();
    tracing::info!(job = %job.name, id = %id, "restoring");
    // Every log line of the restore carries the job and the backup id.
    let span = tracing::info_span!("restore", job = %job.name, backup = %id);
    restore_selected(config, options, job, selected, (&id, listed))
        .instrument(span)
        .await
}

/// Restores `selected` (backup `id`); `listed` is the WAL archive's listing when choosing
/// the backup read it.
async fn restore_selected(
    config: &Config,
    options: &RestoreOptions,
    job: &crate::config::JobConfig,
    selected: Selected,
    (id, listed): (&str, Option<crate::continuity::ArchiveListing>),
) -> Result<RestoreReport> {
    let kind = selected.manifest.backup_kind();
    match kind {
        Some(BackupKind::Files) => {
            let into = options.into.as_deref().ok_or_else(|| {
                Error::usage(format!(
                    "restoring the files job '{}' needs --into DIR",
                    job.name
                ))
            })?;
            files::restore(selected, into).await
        }
        Some(BackupKind::PostgresLogical) => {
            let mut postgres_options = options.postgres.clone();
            if let crate::config::JobSource::Postgres(job) = &job.source {
                postgres_options.bin_dir = job.bin_dir.clone();
            }
            postgres::restore(selected, &postgres_options).await
        }
        Some(BackupKind::Redis) => {
            redis::restore(selected, options.into.as_deref(), options.start_scratch).await
        }
        Some(BackupKind::PostgresPhysical) => {
            let mut physical_options = options.physical.clone().ok_or_else(|| {
                Error::usage(format!(
                    "restoring the physical postgres job '{}' needs --data-dir DIR",
                    job.name
                ))
                .with_hint("a new or empty directory; add --to-time TS for point-in-time recovery and --start to start the server")
            })?;
            if let crate::config::JobSource::Postgres(job) = &job.source {
                physical_options.bin_dir = job.bin_dir.clone();
            }
            physical_options.from = options.from.clone();
            physical_options.exclude = options.exclude.clone();
            if !physical_options.target.reachable_from(&selected.manifest) {
                return Err(Error::usage(format!(
                    "unable to recover backup '{}/{id}' to {}: the backup ends later ({})",
                    job.name,
                    physical_options.target_description(),
                    selected.manifest.recovery_point.to_rfc3339()
                ))
                .with_hint(
                    "leave out --backup to pick the newest backup that ends before the target",
                ));
            }
            let source = physical::WalSource {
                config_path: std::path::absolute(&config.path)
                    .unwrap_or_else(|_| config.path.clone()),
                job: job.name.clone(),
                identity_file: selected.keyring.path().map(Path::to_path_buf),
            };
            let plan = physical::plan_replay(config, &selected.manifest, &physical_options, listed)
                .await?;
            physical::restore(selected, &physical_options, &source, plan).await
        }
        None => Err(Error::new(
            ErrorKind::Verification,
            format!(
                "unable to restore backup '{}/{id}': lifeboat {} cannot restore kind '{}'",
                job.name,
                env!("CARGO_PKG_VERSION"),
                selected.manifest.kind
            ),
        )),
    }
}
