//! `lifeboat backup JOB|--all`: one backup per job, into every repository. Objects first,
//! the manifest last; a failure anywhere before the manifest commits nothing.

use std::fmt;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::commands::{human_duration, human_size};
use crate::config::{Config, JobConfig, JobSource};
use crate::error::{Error, ErrorKind, Result, exit_code};
use crate::layout;
use crate::manifest::{FORMAT, Manifest, ObjectEntry, SourceInfo};
use crate::pipeline::EncodeOptions;
use crate::repository::Repository;

mod files;
mod postgres;

pub use files::FILES_OBJECT;
pub use postgres::{GLOBALS_OBJECT, database_object_name};

/// What one job's source stored, for its manifest.
struct Captured {
    objects: Vec<ObjectEntry>,
    source: SourceInfo,
    /// The newest moment whose data the backup holds; the start of the run when the source
    /// cannot say more precisely.
    recovery_point: Option<DateTime<Utc>>,
}

/// What every source needs to store its objects.
struct Context<'a> {
    repositories: &'a [Repository],
    job_name: &'a str,
    id: &'a str,
    options: EncodeOptions,
}

impl Context<'_> {
    fn object_key(&self, object: &str) -> String {
        layout::object_key(self.job_name, self.id, object)
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
    pub repositories: Vec<String>,
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
            .filter_map(|(_, outcome)| outcome.as_ref().err())
            .map(|e| e.kind().exit_code())
            .max_by_key(|code| match *code {
                exit_code::FAILURE => 3,
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
        )
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
        let outcome = backup_job(config, &repositories, job).await;
        match &outcome {
            Ok(report) => tracing::info!(job = %report.job, id = %report.id, "backup committed"),
            Err(e) => tracing::error!(job = %job.name, error = %e, "backup failed"),
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
    let clock = Instant::now();
    for repository in repositories {
        repository.ensure_marker().await?;
    }
    let started_at = Utc::now();
    let id = unused_backup_id(repositories, &job.name, started_at).await?;
    let options = EncodeOptions {
        level: config.compression.level,
        threads: config.compression.threads,
    };
    tracing::info!(job = %job.name, id = %id, "backup started");

    let context = Context {
        repositories,
        job_name: &job.name,
        id: &id,
        options,
    };
    let captured = match &job.source {
        JobSource::Files(files_job) => files::capture(&context, files_job).await?,
        JobSource::Postgres(postgres_job) => postgres::capture(&context, postgres_job).await?,
    };
    let finished_at = Utc::now();
    let manifest = Manifest {
        format: FORMAT,
        id: id.clone(),
        job: job.name.clone(),
        kind: job.kind_name().to_string(),
        started_at,
        finished_at,
        recovery_point: captured.recovery_point.unwrap_or(started_at),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        host: host_name(),
        source: captured.source,
        objects: captured.objects,
    };
    for repository in repositories {
        repository.commit_manifest(&manifest).await?;
    }
    Ok(BackupReport {
        job: job.name.clone(),
        id,
        objects: manifest.objects.len(),
        raw_size: manifest.raw_size(),
        stored_size: manifest.stored_size(),
        duration: clock.elapsed(),
        repositories: repositories.iter().map(|r| r.name.clone()).collect(),
    })
}

/// The id for a backup started at `at`: its UTC second, moved on while any repository
/// already has something under that id (a committed backup or an interrupted attempt).
async fn unused_backup_id(
    repositories: &[Repository],
    job: &str,
    at: chrono::DateTime<Utc>,
) -> Result<String> {
    let mut candidate = at;
    for _ in 0..120 {
        let id = layout::backup_id(candidate);
        let mut taken = false;
        for repository in repositories {
            let existing = repository
                .store
                .list(&layout::backup_prefix(job, &id))
                .await
                .map_err(|e| repository.error(&format!("list backup '{job}/{id}'"), e))?;
            taken |= !existing.is_empty();
        }
        if !taken {
            return Ok(id);
        }
        candidate += chrono::Duration::seconds(1);
    }
    Err(Error::new(
        ErrorKind::Storage,
        format!(
            "unable to find a free backup id for job '{job}' near {}",
            layout::backup_id(at)
        ),
    ))
}

pub(crate) fn host_name() -> String {
    hostname::get()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_else(|| "unknown".to_string())
}
