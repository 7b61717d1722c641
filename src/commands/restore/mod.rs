//! `lifeboat restore JOB`, by stage: select the backup (here), then the kind's own fetch,
//! verify and write stages (`files`, `postgres`). Nothing reaches the target before the
//! stored checksum of what it is built from matched; what is decoded into a target as it
//! streams is checked again at its end, and a mismatch undoes what the restore created.

mod extract;
mod files;
mod postgres;
mod staging;

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{human_duration, human_size};
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::Manifest;
use crate::repository::Repository;

pub use extract::ExtractSummary;

pub struct RestoreOptions {
    pub job: String,
    /// A backup id, or "latest".
    pub backup: String,
    pub from: Option<String>,
    /// `files` jobs: the directory to restore into.
    pub into: Option<PathBuf>,
    pub postgres: PostgresRestoreOptions,
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
    /// Restore into an existing database that holds objects, dropping them first.
    pub clean: bool,
    pub no_owner: bool,
    /// Where to stage the verified dumps; default $TMPDIR or /var/tmp.
    pub staging_dir: Option<PathBuf>,
    /// The job's `bin_dir`, if it has one.
    pub bin_dir: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct RestoreReport {
    pub job: String,
    pub id: String,
    pub repository: String,
    /// The directory or the server restored into.
    pub target: String,
    /// What was restored: a count of entries, or database names.
    pub restored: Vec<String>,
    pub bytes: u64,
    pub duration: Duration,
    pub warnings: Vec<String>,
}

impl fmt::Display for RestoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for warning in &self.warnings {
            writeln!(f, "warning: {warning}")?;
        }
        write!(
            f,
            "restored {}/{} from repository '{}' into {}: {}, {} in {}",
            self.job,
            self.id,
            self.repository,
            self.target,
            self.restored.join(", "),
            human_size(self.bytes),
            human_duration(self.duration)
        )
    }
}

/// The backup chosen for a restore, and where it is read from.
struct Selected {
    repository: Repository,
    manifest: Manifest,
    started: Instant,
}

impl Selected {
    fn report(
        self,
        target: String,
        restored: Vec<String>,
        bytes: u64,
        warnings: Vec<String>,
    ) -> RestoreReport {
        RestoreReport {
            job: self.manifest.job.clone(),
            id: self.manifest.id.clone(),
            repository: self.repository.name.clone(),
            target,
            restored,
            bytes,
            duration: self.started.elapsed(),
            warnings,
        }
    }
}

pub async fn run(config: &Config, options: &RestoreOptions) -> Result<RestoreReport> {
    let started = Instant::now();
    let job = config.job(&options.job)?;
    let repository = Repository::choose(config, options.from.as_deref()).await?;
    let id = repository
        .resolve_backup(&job.name, &options.backup)
        .await?;
    let manifest = repository.read_manifest(&job.name, &id).await?;
    tracing::info!(job = %job.name, id = %id, repository = %repository.name, "restoring");
    let selected = Selected {
        repository,
        manifest,
        started,
    };
    match selected.manifest.kind.as_str() {
        "files" => {
            let into = options.into.as_deref().ok_or_else(|| {
                Error::usage(format!(
                    "restoring the files job '{}' needs --into DIR",
                    job.name
                ))
            })?;
            files::restore(selected, into).await
        }
        "postgres-logical" => {
            let mut postgres_options = options.postgres.clone();
            if let crate::config::JobSource::Postgres(job) = &job.source {
                postgres_options.bin_dir = job.bin_dir.clone();
            }
            postgres::restore(selected, &postgres_options).await
        }
        other => Err(Error::new(
            ErrorKind::Verification,
            format!(
                "unable to restore backup '{}/{id}': lifeboat {} cannot restore kind '{other}'",
                job.name,
                env!("CARGO_PKG_VERSION")
            ),
        )),
    }
}
