//! `lifeboat restore JOB --into DIR`, by stage: select the backup, fetch and verify it into
//! staging beside the target, then move it into place. The target is touched only after every
//! checksum matched, so a damaged object leaves no file behind.

mod extract;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::backup::FILES_OBJECT;
use super::{human_duration, human_size};
use crate::config::{Config, JobSource};
use crate::error::{Error, ErrorKind, Result};
use crate::repository::Repository;
use crate::transfer::read_object;

pub use extract::ExtractSummary;

pub struct RestoreOptions {
    pub job: String,
    /// A backup id, or "latest".
    pub backup: String,
    pub from: Option<String>,
    pub into: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct RestoreReport {
    pub job: String,
    pub id: String,
    pub repository: String,
    pub into: PathBuf,
    pub entries: u64,
    pub bytes: u64,
    pub duration: Duration,
}

impl fmt::Display for RestoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "restored {}/{} from repository '{}' into '{}': {} entries, {} in {}",
            self.job,
            self.id,
            self.repository,
            self.into.display(),
            self.entries,
            human_size(self.bytes),
            human_duration(self.duration)
        )
    }
}

pub async fn run(config: &Config, options: &RestoreOptions) -> Result<RestoreReport> {
    let clock = Instant::now();
    let job = config.job(&options.job)?;
    let JobSource::Files(_) = &job.source;
    check_target(&options.into)?;

    // Select.
    let repository = Repository::choose(config, options.from.as_deref()).await?;
    let id = repository
        .resolve_backup(&job.name, &options.backup)
        .await?;
    let manifest = repository.read_manifest(&job.name, &id).await?;
    let object = manifest
        .objects
        .iter()
        .find(|o| o.name == FILES_OBJECT)
        .cloned()
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Verification,
                format!("unable to restore backup '{}/{id}': its manifest has no object '{FILES_OBJECT}'", job.name),
            )
        })?;
    tracing::info!(job = %job.name, id = %id, repository = %repository.name, "restoring");

    // Fetch, verify and write into staging on the target's filesystem.
    let parent = parent_of(&options.into);
    std::fs::create_dir_all(&parent).map_err(|e| target_error(&options.into, e))?;
    let staging = tempfile::Builder::new()
        .prefix(".lifeboat-restore-")
        .tempdir_in(&parent)
        .map_err(|e| target_error(&options.into, e))?;
    let staging_root = staging.path().to_path_buf();
    let summary = read_object(&repository, &manifest, &object, move |raw| {
        extract::extract(raw, &staging_root)
    })
    .await?;

    // Move into place.
    move_into_place(staging.path(), &options.into).map_err(|e| target_error(&options.into, e))?;
    Ok(RestoreReport {
        job: job.name.clone(),
        id,
        repository: repository.name.clone(),
        into: options.into.clone(),
        entries: summary.entries,
        bytes: summary.bytes,
        duration: clock.elapsed(),
    })
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn target_error(into: &Path, err: std::io::Error) -> Error {
    Error::new(
        ErrorKind::Target,
        format!("unable to restore into '{}'", into.display()),
    )
    .with_source(err)
}

/// lifeboat never overwrites files in place: the target must be new or an empty directory.
fn check_target(into: &Path) -> Result<()> {
    match std::fs::symlink_metadata(into) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(target_error(into, e)),
        Ok(meta) if !meta.is_dir() => Err(Error::new(
            ErrorKind::Target,
            format!(
                "unable to restore into '{}': it exists and is not a directory",
                into.display()
            ),
        )),
        Ok(_) => {
            let mut entries = std::fs::read_dir(into).map_err(|e| target_error(into, e))?;
            if entries.next().is_some() {
                return Err(Error::new(
                    ErrorKind::Target,
                    format!("unable to restore into '{}': the directory is not empty", into.display()),
                )
                .with_hint("restore into a new or empty directory, compare, then copy what you need into place"));
            }
            Ok(())
        }
    }
}

fn move_into_place(staging: &Path, into: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(into)?;
    for entry in std::fs::read_dir(staging)? {
        let entry = entry?;
        std::fs::rename(entry.path(), into.join(entry.file_name()))?;
    }
    Ok(())
}
