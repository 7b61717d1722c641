//! `lifeboat backup JOB|--all`: one backup per job, into every repository at once. Objects
//! first, the manifest last. A repository that fails drops out and the others go on; the
//! manifest is committed wherever every object landed, and the report names the
//! repositories that lack it. A source failure, or fewer than `min_repositories` left,
//! commits nothing anywhere.

use std::fmt;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::Instrument;

use crate::claim::{Claim, Claimed};
use crate::config::{Config, JobConfig, JobSource, PostgresMode};
use crate::error::{Error, ErrorKind, Result, exit_code};
use crate::human::{human_duration, human_size};
use crate::layout;
use crate::manifest::{FORMAT, Manifest, ObjectEntry, SourceInfo};
use crate::pipeline::{Digests, EncodeOptions};
use crate::repository::Repository;
use crate::transfer::{store_object, store_precompressed_object};

mod files;
mod physical;
mod postgres;
mod redis;

/// What a backup holds in memory at most, by its settings, and what each term is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryBound {
    /// The program, its runtime and the source's reader.
    pub program: u64,
    /// zstd's workers: their tables and the input and output of the job each compresses.
    pub compression: u64,
    /// The chunks queued for the repositories. Every repository is sent the same chunks in
    /// the same order, so their queues hold the newest ones, counted once.
    pub queued: u64,
    /// `part_size × parts_in_flight` of each S3 repository. Regions that keep pace upload
    /// the same chunks and hold them once; this counts each region's parts as its own, as
    /// when one region lags the others.
    pub parts: u64,
}

impl MemoryBound {
    pub fn total(&self) -> u64 {
        self.program + self.compression + self.queued + self.parts
    }
}

const PROGRAM_MEMORY: u64 = 24 << 20;
/// One zstd worker at level 3: its tables, its 2 MiB job (`pipeline::ZSTD_JOB_SIZE`) and
/// the job's output. Higher levels hold more (zstd's window grows to 8 MiB at level 19).
const MEMORY_PER_COMPRESSION_THREAD: u64 = 6 << 20;

/// Peak memory of a backup into every repository of `config`: a bound from the settings,
/// which `check` prints and the README derives.
pub fn memory_bound(config: &Config) -> MemoryBound {
    let parts = config
        .repositories
        .iter()
        .map(|repository| match &repository.location {
            crate::config::Location::S3(s3) => s3.part_size * s3.parts_in_flight as u64,
            crate::config::Location::Local { .. } => 0,
        })
        .sum();
    MemoryBound {
        program: PROGRAM_MEMORY,
        compression: MEMORY_PER_COMPRESSION_THREAD * u64::from(config.compression.threads.max(1)),
        queued: (crate::pipeline::CHANNEL_BOUND as u64 + 1) * crate::pipeline::CHUNK_SIZE as u64,
        parts,
    }
}

/// What one job's source stored, for its manifest.
struct Captured {
    objects: Vec<ObjectEntry>,
    source: SourceInfo,
    /// The newest moment whose data the backup holds; the start of the run when the source
    /// cannot say more precisely.
    recovery_point: Option<DateTime<Utc>>,
    /// What the run says about how it read the source, beyond what the manifest records.
    notes: Vec<String>,
}

/// The repositories one backup goes to, and those it lost on the way (with the cause).
struct Destinations {
    repositories: Vec<Repository>,
    min: usize,
    lost: Mutex<Vec<Option<Error>>>,
}

impl Destinations {
    fn new(repositories: &[Repository], min: usize) -> Destinations {
        Destinations {
            repositories: repositories.to_vec(),
            min,
            lost: Mutex::new(repositories.iter().map(|_| None).collect()),
        }
    }

    fn live(&self) -> Vec<Repository> {
        let lost = self.lost.lock().expect("destinations lock");
        self.repositories
            .iter()
            .zip(lost.iter())
            .filter(|(_, lost)| lost.is_none())
            .map(|(repository, _)| repository.clone())
            .collect()
    }

    /// Drops `repository` from this backup; fails once fewer than `min` are left.
    fn lose(&self, job: &str, repository: &str, cause: Error) -> Result<()> {
        tracing::warn!(job = %job, repository = %repository, error = %cause.chain().join(": "), "repository dropped out of this backup");
        let mut lost = self.lost.lock().expect("destinations lock");
        if let Some(index) = self.repositories.iter().position(|r| r.name == repository) {
            lost[index].get_or_insert(cause);
        }
        let live = lost.iter().filter(|l| l.is_none()).count();
        if live >= self.min {
            return Ok(());
        }
        let mut error = Error::new(
            ErrorKind::Storage,
            format!(
                "unable to back up job '{job}': {live} of {} repositories can take it and min_repositories is {}",
                self.repositories.len(),
                self.min
            ),
        );
        for (repository, cause) in self.repositories.iter().zip(lost.iter()) {
            if let Some(cause) = cause {
                error = error.with_hint(format!(
                    "repository '{}': {}",
                    repository.name,
                    cause.chain().join(": ")
                ));
            }
        }
        Err(error)
    }

    fn missing(&self) -> Vec<MissingFrom> {
        let lost = self.lost.lock().expect("destinations lock");
        self.repositories
            .iter()
            .zip(lost.iter())
            .filter_map(|(repository, cause)| {
                cause.as_ref().map(|cause| MissingFrom {
                    repository: repository.name.clone(),
                    cause: cause.chain().join(": "),
                    hints: cause.hints().to_vec(),
                })
            })
            .collect()
    }
}

/// What every source needs to store its objects.
struct Context<'a> {
    destinations: &'a Destinations,
    job_name: &'a str,
    id: &'a str,
    /// Set where some repository could not make the id this run's alone: objects are then
    /// stored under names unique to the run (see `claim`).
    tag: Option<&'a str>,
    options: EncodeOptions,
}

impl Context<'_> {
    fn object_key(&self, object: &str) -> String {
        layout::object_key(self.job_name, self.id, object)
    }

    /// Stores `object` in every repository still taking this backup (see `store_object`),
    /// under its stored name (`.age` added when encrypted); returns its manifest entry.
    async fn store<T, F>(&self, object: &str, produce: F) -> Result<(ObjectEntry, T)>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Write) -> Result<T> + Send + 'static,
    {
        let live = self.destinations.live();
        let name = self.stored_name(object);
        let stored = store_object(
            &live,
            &self.object_key(&name),
            self.options.clone(),
            produce,
        )
        .await?;
        self.drop_failed(&live, stored.failed)?;
        Ok((self.entry(object, &stored.digests), stored.value))
    }

    fn stored_name(&self, object: &str) -> String {
        self.entry(object, &Digests::default()).name
    }

    fn entry(&self, object: &str, digests: &Digests) -> ObjectEntry {
        ObjectEntry::stored_as(object, self.tag, digests, self.options.recipients.as_ref())
    }
}

impl Context<'_> {
    /// Like `store`, for a source that writes a zstd stream itself (see
    /// `transfer::store_precompressed_object`).
    async fn store_precompressed<T, F>(
        &self,
        object: &str,
        inspect: Box<dyn Write + Send>,
        produce: F,
    ) -> Result<(ObjectEntry, T)>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Write) -> Result<T> + Send + 'static,
    {
        let live = self.destinations.live();
        let key = self.object_key(&self.stored_name(object));
        let recipients = self.options.recipients.clone();
        let stored = store_precompressed_object(&live, &key, recipients, inspect, produce).await?;
        self.drop_failed(&live, stored.failed)?;
        Ok((self.entry(object, &stored.digests), stored.value))
    }

    fn drop_failed(&self, live: &[Repository], failed: Vec<(usize, Error)>) -> Result<()> {
        for (index, cause) in failed {
            self.destinations
                .lose(self.job_name, &live[index].name, cause)?;
        }
        Ok(())
    }
}

pub struct BackupOptions {
    /// Empty means every configured job.
    pub jobs: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct BackupReport {
    pub job: String,
    pub id: String,
    pub objects: usize,
    pub raw_size: u64,
    pub stored_size: u64,
    pub duration: Duration,
    /// Where the backup was committed.
    pub repositories: Vec<String>,
    /// Where it was not, and why: a degraded backup, for `lifeboat replicate` to complete.
    pub missing: Vec<MissingFrom>,
    /// Files jobs: the sockets, FIFOs and device nodes passed over (how many, and the
    /// first of them), as the manifest records them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_stored: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_stored_entries: Vec<crate::manifest::NotStored>,
    /// What the backup lacks by design (databases not dumped, role passwords), as the
    /// manifest records it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct MissingFrom {
    pub repository: String,
    pub cause: String,
    /// What to do, where the cause says more than "replicate once it is back".
    pub hints: Vec<String>,
}

/// The outcome of every job asked for; one failure does not stop the others.
#[derive(Debug)]
pub struct BackupSummary {
    pub outcomes: Vec<(String, Result<BackupReport>)>,
}

impl BackupSummary {
    pub fn exit_code(&self) -> i32 {
        self.outcomes
            .iter()
            .map(|(_, outcome)| match outcome {
                Ok(report) if report.missing.is_empty() => exit_code::SUCCESS,
                Ok(_) => exit_code::DEGRADED,
                Err(e) => e.kind().exit_code(),
            })
            .max_by_key(|code| match *code {
                exit_code::FAILURE => 4,
                exit_code::LOCKED => 3,
                exit_code::USAGE => 2,
                exit_code::DEGRADED => 1,
                _ => 0,
            })
            .unwrap_or(exit_code::SUCCESS)
    }
}

impl fmt::Display for BackupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "backup {}/{} done: {} object(s), {} read, {} stored, in {} (repositories: {})",
            self.job,
            self.id,
            self.objects,
            human_size(self.raw_size),
            human_size(self.stored_size),
            human_duration(self.duration),
            self.repositories.join(", ")
        )?;
        for missing in &self.missing {
            write!(
                f,
                "\nwarning: repository '{}' lacks backup {}/{}: {}",
                missing.repository, self.job, self.id, missing.cause
            )?;
            match missing.hints.as_slice() {
                [] => write!(
                    f,
                    "\n  run `lifeboat replicate {}` once it is reachable again",
                    self.job
                )?,
                hints => {
                    for hint in hints {
                        write!(f, "\n  {hint}")?;
                    }
                }
            }
        }
        if let Some(count) = self.not_stored {
            write!(
                f,
                "\nnote: {}",
                crate::manifest::describe_not_stored(count, &self.not_stored_entries)
            )?;
        }
        for note in &self.notes {
            write!(f, "\nnote: {note}")?;
        }
        Ok(())
    }
}

pub async fn run(config: &Config, options: &BackupOptions) -> Result<BackupSummary> {
    let jobs: Vec<&JobConfig> = if options.jobs.is_empty() {
        if config.jobs.is_empty() {
            return Err(
                Error::usage(format!("no jobs configured in '{}'", config.path.display()))
                    .with_hint("add a [[job]] section; `lifeboat init` writes an example"),
            );
        }
        config.jobs.iter().collect()
    } else {
        options
            .jobs
            .iter()
            .map(|name| config.job(name))
            .collect::<Result<_>>()?
    };
    let repositories = Repository::open_all(config).await;
    let mut outcomes = Vec::with_capacity(jobs.len());
    for job in jobs {
        // Every log line of the run carries the job, and the backup id once it is chosen.
        let span = tracing::info_span!("backup", job = %job.name, backup = tracing::field::Empty);
        let outcome = match crate::lock::acquire(config, &job.name, "backup").await {
            Ok(_lock) => {
                backup_job(config, &repositories, job)
                    .instrument(span)
                    .await
            }
            Err(e) => Err(e),
        };
        match &outcome {
            Ok(report) => tracing::info!(job = %report.job, id = %report.id, "backup committed"),
            Err(e) => {
                tracing::error!(job = %job.name, error = %e.chain().join(": "), "backup failed")
            }
        }
        outcomes.push((job.name.clone(), outcome));
    }
    Ok(BackupSummary { outcomes })
}

async fn backup_job(
    config: &Config,
    repositories: &[Repository],
    job: &JobConfig,
) -> Result<BackupReport> {
    let timer = Instant::now();
    let signer = config.signing.signer()?;
    let destinations = Destinations::new(repositories, config.min_repositories);
    let prepared = crate::repository::prepare_markers(repositories).await;
    for (repository, prepared) in repositories.iter().zip(prepared) {
        if let Err(cause) = prepared {
            destinations.lose(&job.name, &repository.name, cause)?;
        }
    }
    // Ids and times come from the repositories' clock, so that "latest" and retention see
    // backups in the order they were made whichever host made them.
    let clock = crate::clock::read(&destinations.live()).await.trusted(
        config.max_clock_skew,
        &format!("back up job '{}'", job.name),
    )?;
    let started_at = clock.now();
    let id = unused_backup_id(&destinations, &job.name, started_at, config.max_clock_skew).await?;
    // Held until the claim's release is registered: an interrupt while a claim is being
    // written waits for the answer, then releases it, instead of leaving it behind.
    let Some(claiming) = crate::interrupt::creating() else {
        return Err(Error::new(
            ErrorKind::Storage,
            format!("back up job '{}': the run is being interrupted", job.name),
        ));
    };
    let (claim, claimed) = claim_backup_id(&destinations, &job.name, &id, &clock).await?;
    let id = claim.id.clone();
    let _release_on_interrupt = {
        let (won, claim, job) = (claimed.won.clone(), claim.clone(), job.name.clone());
        crate::interrupt::undo_async_on_interrupt("claim(s) released", move || {
            Box::pin(async move {
                for repository in &won {
                    repository.release_claim(&job, &claim).await;
                }
            })
        })
    };
    drop(claiming);
    tracing::Span::current().record("backup", tracing::field::display(&id));
    let outcome = write_backup(
        config,
        job,
        &destinations,
        (&clock, started_at),
        (&claim, &claimed),
        signer.as_ref(),
    )
    .await;
    for repository in &claimed.won {
        repository.release_claim(&job.name, &claim).await;
    }
    let (manifest, committed, run_notes) = outcome?;
    Ok(BackupReport {
        job: job.name.clone(),
        id,
        objects: manifest.objects.len(),
        raw_size: manifest.raw_size(),
        stored_size: manifest.stored_size(),
        duration: timer.elapsed(),
        repositories: committed.iter().map(|r| r.name.clone()).collect(),
        missing: destinations.missing(),
        not_stored: manifest.source.not_stored,
        not_stored_entries: manifest.source.not_stored_entries.clone(),
        notes: run_notes
            .into_iter()
            .chain(crate::manifest::source_notes(&manifest.source))
            .collect(),
    })
}

/// Where this run holds its claim, and whether any repository let it be claimed twice.
struct ClaimedIn {
    won: Vec<Repository>,
    /// The repositories that do not honour conditional create (see `claim`).
    shared: Vec<String>,
}

/// Writes the objects and commits the manifest; returns the manifest, where it was
/// committed, and the run's notes.
async fn write_backup(
    config: &Config,
    job: &JobConfig,
    destinations: &Destinations,
    (clock, started_at): (&crate::clock::Clock, DateTime<Utc>),
    (claim, claimed): (&Claim, &ClaimedIn),
    signer: Option<&crate::signing::Signer>,
) -> Result<(Manifest, Vec<Repository>, Vec<String>)> {
    let id = &claim.id;
    let options = EncodeOptions {
        level: config.compression.level,
        threads: config.compression.threads,
        recipients: config.recipients(),
    };
    tracing::info!(job = %job.name, id = %id, "backup started");

    let context = Context {
        destinations,
        job_name: &job.name,
        id,
        tag: (!claimed.shared.is_empty()).then_some(claim.run.as_str()),
        options,
    };
    let captured = match &job.source {
        JobSource::Files(files_job) => files::capture(&context, files_job).await?,
        JobSource::Postgres(postgres_job) => match postgres_job.mode {
            PostgresMode::Logical => postgres::capture(&context, postgres_job).await?,
            PostgresMode::Physical => physical::capture(&context, postgres_job).await?,
        },
        JobSource::Redis(redis_job) => redis::capture(&context, redis_job).await?,
    };
    let finished_at = clock.now();
    let manifest = Manifest {
        format: FORMAT,
        id: id.clone(),
        job: job.name.clone(),
        kind: job.kind_name().to_string(),
        started_at,
        finished_at,
        recovery_point: captured
            .recovery_point
            .map_or(started_at, |at| clock.correct(at)),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        host: claim.host.clone(),
        source: captured.source,
        objects: captured.objects,
    };
    let mut committed: Vec<Repository> = Vec::new();
    for repository in destinations.live() {
        let outcome = match commit(&repository, &manifest, claim, claimed, signer).await {
            Ok(()) => {
                committed.push(repository);
                Ok(())
            }
            Err(cause) => destinations.lose(&job.name, &repository.name, cause),
        };
        if let Err(error) = outcome {
            // Too few repositories hold it for the backup to count: it counts nowhere.
            for repository in &committed {
                let key = layout::manifest_key(&job.name, id);
                if let Err(e) = repository.store.delete(&key).await {
                    tracing::error!(repository = %repository.name, key = %key, error = %e, "unable to withdraw the manifest");
                }
            }
            return Err(error);
        }
    }
    crate::interrupt::done(format!(
        "backup {}/{id} committed in {}",
        job.name,
        committed
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok((manifest, committed, captured.notes))
}

/// Commits `manifest` to one repository. Where the repository does not honour conditional
/// create, the claim is read before and the manifest after: another run that took the id
/// there at the same time makes this a conflict, never a backup that silently is not.
async fn commit(
    repository: &Repository,
    manifest: &Manifest,
    claim: &Claim,
    claimed: &ClaimedIn,
    signer: Option<&crate::signing::Signer>,
) -> Result<()> {
    let shared = claimed.shared.contains(&repository.name);
    let lost = |by: Option<Claim>| {
        crate::claim::conflict(&manifest.job, &manifest.id, &repository.name, by.as_ref())
    };
    let key = layout::manifest_key(&manifest.job, &manifest.id);
    if shared
        && (!repository.still_claimed(&manifest.job, claim).await
            || repository.store.head(&key).await.is_ok())
    {
        return Err(lost(
            repository.read_claim(&manifest.job, &manifest.id).await,
        ));
    }
    repository.commit_manifest(manifest, signer).await?;
    if shared {
        let stored = crate::storage::get_bytes(repository.store.as_ref(), &key).await;
        if stored.ok().as_deref() != Some(manifest.to_json().as_slice()) {
            return Err(lost(
                repository.read_claim(&manifest.job, &manifest.id).await,
            ));
        }
    }
    Ok(())
}

/// Claims the first id from `first` on that every live repository lets this run have (see
/// `claim`): another run's claim, or anything stored under an id, moves it to the next second.
async fn claim_backup_id(
    destinations: &Destinations,
    job: &str,
    first: &str,
    clock: &crate::clock::Clock,
) -> Result<(Claim, ClaimedIn)> {
    let run = crate::layout::run_tag();
    let host = crate::host::name();
    let mut candidate = layout::parse_backup_id(first).expect("ids parse");
    for _ in 0..120 {
        let claim = Claim::new(&layout::backup_id(candidate), &host, &run, clock.now());
        let mut claimed = ClaimedIn {
            won: Vec::new(),
            shared: Vec::new(),
        };
        let mut taken = false;
        for repository in destinations.live() {
            match repository.claim(job, &claim).await {
                Ok(Claimed::Won { exclusive }) => {
                    if !exclusive {
                        claimed.shared.push(repository.name.clone());
                    }
                    claimed.won.push(repository);
                }
                Ok(Claimed::Taken { by }) => {
                    if let Some(by) = by {
                        tracing::info!(job = %job, id = %claim.id, host = %by.host, run = %by.run, "backup id claimed by another run; trying the next second");
                    }
                    taken = true;
                    break;
                }
                Err(cause) => destinations.lose(job, &repository.name, cause)?,
            }
        }
        if !taken {
            return Ok((claim, claimed));
        }
        for repository in &claimed.won {
            repository.release_claim(job, &claim).await;
        }
        candidate += chrono::Duration::seconds(1);
    }
    Err(Error::new(
        ErrorKind::Storage,
        format!("unable to claim a backup id for job '{job}' near {first}"),
    )
    .with_hint("another run is claiming every id; look for runs of this job on other hosts"))
}

/// The first id for a backup started at `at`: its UTC second, moved past any backup a
/// repository already holds under a later id within `max_skew` of it (made by a host or a
/// repository whose clock ran ahead, within the limit: this backup is newer and must sort
/// so). A later id beyond `max_skew` is a backup dated in the future: `status` names it, and
/// it is not followed. Whether the id is free is for its claim to find out.
async fn unused_backup_id(
    destinations: &Destinations,
    job: &str,
    at: chrono::DateTime<Utc>,
    max_skew: Duration,
) -> Result<String> {
    let horizon = chrono::Duration::from_std(max_skew)
        .ok()
        .and_then(|skew| at.checked_add_signed(skew))
        .unwrap_or(chrono::DateTime::<Utc>::MAX_UTC);
    let prefix = layout::backups_prefix(job);
    let mut candidate = at;
    for _ in 0..120 {
        // '0' sorts after '/': the first key past every key of the candidate's id.
        let past = format!("{prefix}{}0", layout::backup_id(candidate));
        let mut later: Option<chrono::DateTime<Utc>> = None;
        for repository in destinations.live() {
            match repository.store.list_page(&prefix, Some(&past), 1).await {
                Ok(page) => {
                    let held = page.first().and_then(|object| {
                        let id = object.key.strip_prefix(&prefix)?.split('/').next()?;
                        layout::parse_backup_id(id)
                    });
                    later = later.max(held.filter(|held| *held <= horizon));
                }
                Err(e) => {
                    let cause = repository.error(&format!("list backups of job '{job}'"), e);
                    destinations.lose(job, &repository.name, cause)?;
                }
            }
        }
        match later {
            Some(later) => candidate = later + chrono::Duration::seconds(1),
            None => break,
        }
    }
    Ok(layout::backup_id(candidate))
}
