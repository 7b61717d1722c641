//! `lifeboat verify [JOB]`: re-reads every object of every committed backup (or one), checks
//! the stored and the decompressed checksum, and reports each damaged one.

use std::fmt;

use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::repository::Repository;
use crate::transfer::read_object;

pub struct VerifyOptions {
    pub job: Option<String>,
    pub backup: Option<String>,
    pub from: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ObjectCheck {
    pub job: String,
    pub backup: String,
    /// The object's name, or "manifest.json" when the manifest itself is unreadable.
    pub object: String,
    pub problem: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub repository: String,
    pub backups: usize,
    pub checks: Vec<ObjectCheck>,
}

impl VerifyReport {
    pub fn damaged(&self) -> impl Iterator<Item = &ObjectCheck> {
        self.checks.iter().filter(|c| c.problem.is_some())
    }

    /// Ok if nothing is damaged; otherwise the error that decides the exit code.
    pub fn outcome(&self) -> Result<()> {
        let damaged = self.damaged().count();
        if damaged == 0 {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Verification,
            format!(
                "{damaged} damaged object(s) in repository '{}'",
                self.repository
            ),
        )
        .with_hint("restore from another repository with `--from`, and take a new backup"))
    }
}

pub async fn run(config: &Config, options: &VerifyOptions) -> Result<VerifyReport> {
    let repository = Repository::choose(config, options.from.as_deref()).await?;
    let jobs: Vec<String> = match &options.job {
        Some(name) => vec![config.job(name)?.name.clone()],
        None => config.jobs.iter().map(|j| j.name.clone()).collect(),
    };
    let mut checks = Vec::new();
    let mut backups = 0;
    for job in &jobs {
        let ids = match &options.backup {
            Some(wanted) => vec![repository.resolve_backup(job, wanted).await?],
            None => repository.backup_ids(job).await?,
        };
        for id in ids {
            backups += 1;
            let manifest = match repository.read_manifest(job, &id).await {
                Ok(manifest) => manifest,
                Err(e) => {
                    checks.push(ObjectCheck {
                        job: job.clone(),
                        backup: id.clone(),
                        object: crate::layout::MANIFEST_NAME.to_string(),
                        problem: Some(e.chain().join(": ")),
                    });
                    continue;
                }
            };
            for object in &manifest.objects {
                let result = read_object(&repository, &manifest, object, |raw| {
                    std::io::copy(raw, &mut std::io::sink())
                })
                .await;
                if let Err(e) = &result {
                    tracing::error!(job = %job, backup = %id, object = %object.name, error = %e, "damaged object");
                }
                checks.push(ObjectCheck {
                    job: job.clone(),
                    backup: id.clone(),
                    object: object.name.clone(),
                    problem: result.err().map(|e| e.chain().join(": ")),
                });
            }
        }
    }
    Ok(VerifyReport {
        repository: repository.name.clone(),
        backups,
        checks,
    })
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for check in &self.checks {
            let key = format!(
                "jobs/{}/backups/{}/{}",
                check.job, check.backup, check.object
            );
            match &check.problem {
                None => writeln!(f, "ok       {key}")?,
                Some(problem) => writeln!(f, "DAMAGED  {key}: {problem}")?,
            }
        }
        let damaged = self.damaged().count();
        writeln!(
            f,
            "verified {} backup(s), {} object(s) in repository '{}': {} damaged",
            self.backups,
            self.checks.len(),
            self.repository,
            damaged
        )
    }
}
