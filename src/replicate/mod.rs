//! `lifeboat replicate [JOB]`: makes every reachable repository hold every committed backup.
//! What a repository lacks (or, with `--verify`, holds damaged) is copied from another
//! that holds it intact, its sha256 checked while it streams; the manifest is written last,
//! so a repository never shows a backup before it holds all of it. Uploads left open under
//! a backup that is committed are aborted: nobody is writing them any more. Archived WAL
//! a repository lacks is copied too, checked by decoding it on the way.

mod apply;
mod plan;

use std::fmt;

use serde::Serialize;
use tracing::Instrument;

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::human::human_size;
use crate::repository::Repository;

pub use plan::{BackupFill, JobCopies, ManifestCopy, ObjectCopy, SignatureCopy, WalCopy};

pub struct ReplicateOptions {
    pub job: Option<String>,
    /// Print the plan; copy nothing.
    pub dry_run: bool,
    /// Also read every object a repository holds and replace those whose sha256 is wrong.
    pub verify: bool,
    /// Also fill repositories that lack their marker while others hold theirs, and write
    /// their marker once every backup is in.
    pub reseed: bool,
}

/// One thing done (or, in a dry run, to be done) to a repository.
#[derive(Debug, Clone, Serialize)]
pub struct Action {
    pub job: String,
    pub id: String,
    /// An object name, or "manifest.json".
    pub object: String,
    pub bytes: u64,
    pub from: Option<String>,
    pub to: String,
    pub what: ActionKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    Copy,
    Replace,
    AbortUpload,
}

#[derive(Debug, Serialize)]
pub struct ReplicateReport {
    pub dry_run: bool,
    pub actions: Vec<Action>,
    /// What could not be done, each naming the backup, object and repository.
    pub failures: Vec<String>,
    /// Repositories that could not be listed, with the reason.
    pub unreachable: Vec<(String, String)>,
    /// Backups a repository still holds that were not copied, and why: prune removed them.
    pub not_copied: Vec<NotCopied>,
    /// Removal records not honoured, and why.
    pub ignored_records: Vec<String>,
    /// Repositories without a marker that were filled (`--reseed`), and whether the marker
    /// was written (not in a dry run, nor after a failure).
    pub reseeded: Vec<(String, bool)>,
}

/// A backup `replicate` leaves where it is.
#[derive(Debug, Clone, Serialize)]
pub struct NotCopied {
    pub job: String,
    pub id: String,
    pub why: String,
}

impl ReplicateReport {
    /// Ok when every reachable repository now holds every backup and all were reachable.
    pub fn outcome(&self) -> Result<()> {
        if self.failures.is_empty() && self.unreachable.is_empty() {
            return Ok(());
        }
        let mut error = Error::new(
            ErrorKind::Storage,
            format!(
                "replication incomplete: {} failure(s), {} unreachable repository(ies)",
                self.failures.len(),
                self.unreachable.len()
            ),
        );
        for (name, reason) in &self.unreachable {
            error = error.with_hint(format!("repository '{name}': {reason}"));
        }
        Err(error.with_hint("run `lifeboat replicate` again once every repository is reachable"))
    }
}

/// A replication, prepared: the jobs (their locks held until it is applied or dropped), the
/// repositories to fill, and those left alone. Each job's copies are decided by
/// [`ReplicatePlan::plan_job`] from what the repositories hold at that moment, just before
/// they are made: `--dry-run` prints them, `apply` makes them.
pub struct ReplicatePlan {
    pub jobs: Vec<String>,
    repositories: Vec<Repository>,
    /// Repositories without their marker that are filled (`--reseed`); their marker is
    /// written once every copy succeeded.
    pub reseed: Vec<Repository>,
    /// Repositories left alone, and why (wiped, and no `--reseed`).
    pub refused: Vec<String>,
    /// Read every object a repository holds and replace the damaged (`--verify`).
    verify: bool,
    _locks: Vec<crate::lock::JobLock>,
}

pub async fn run(config: &Config, options: &ReplicateOptions) -> Result<ReplicateReport> {
    let plan = plan(config, options).await?;
    Ok(match options.dry_run {
        true => plan.preview().await,
        false => plan.apply().await,
    })
}

/// Takes the jobs' locks and sorts the repositories; reads only.
pub async fn plan(config: &Config, options: &ReplicateOptions) -> Result<ReplicatePlan> {
    let jobs: Vec<String> = match &options.job {
        Some(name) => vec![config.job(name)?.name.clone()],
        None => config.jobs.iter().map(|j| j.name.clone()).collect(),
    };
    let mut locks = Vec::with_capacity(jobs.len());
    for job in &jobs {
        locks.push(crate::lock::acquire(config, job, "replicate").await?);
    }
    // A repository without its marker while others hold theirs was wiped (or is new, or
    // misconfigured): filled only when the operator says so.
    let all = Repository::open_all(config).await;
    let markers = crate::repository::read_markers(&all).await;
    let mut repositories = Vec::with_capacity(all.len());
    let (mut reseed, mut refused) = (Vec::new(), Vec::new());
    for (index, repository) in all.iter().enumerate() {
        match markers.wiped(&all, index) {
            Some(wiped) if !options.reseed => {
                refused.push(format!("{wiped}; {}", wiped.hints().join("; ")))
            }
            Some(_) => {
                reseed.push(repository.clone());
                repositories.push(repository.clone());
            }
            None => repositories.push(repository.clone()),
        }
    }
    Ok(ReplicatePlan {
        jobs,
        repositories,
        reseed,
        refused,
        verify: options.verify,
        _locks: locks,
    })
}

impl ReplicatePlan {
    /// What one job's repositories get, from what they hold now. `read_objects`: read every
    /// object a repository holds to find the damaged ones (`--verify`, when applying).
    pub async fn plan_job(&self, job: &str, read_objects: bool) -> JobCopies {
        let span = tracing::info_span!("replicate", job = %job);
        plan::plan_job(job, &self.repositories, read_objects)
            .instrument(span)
            .await
    }

    fn report(&self, dry_run: bool) -> ReplicateReport {
        ReplicateReport {
            dry_run,
            actions: Vec::new(),
            failures: self.refused.clone(),
            unreachable: Vec::new(),
            not_copied: Vec::new(),
            ignored_records: Vec::new(),
            reseeded: self
                .reseed
                .iter()
                .map(|r| (r.name.clone(), false))
                .collect(),
        }
    }

    /// Every copy and abort the plan makes, job by job, changing nothing. Objects are not
    /// read for damage (`--verify`): a dry run stays a matter of listings.
    pub async fn preview(self) -> ReplicateReport {
        let mut report = self.report(true);
        for job in &self.jobs {
            let copies = self.plan_job(job, false).await;
            report.actions.extend(copies.actions());
            copies.findings_into(&mut report);
        }
        report
    }

    /// Plans and makes each job's copies in turn; a reseeded repository gets its marker
    /// only if nothing failed.
    pub async fn apply(self) -> ReplicateReport {
        let mut report = self.report(false);
        for job in &self.jobs {
            let copies = self.plan_job(job, self.verify).await;
            copies.findings_into(&mut report);
            let span = tracing::info_span!("replicate", job = %job);
            apply::apply(job, copies, &mut report)
                .instrument(span)
                .await;
        }
        let failed = !report.failures.is_empty() || !report.unreachable.is_empty();
        for (repository, (_, marked)) in self.reseed.iter().zip(&mut report.reseeded) {
            if failed {
                break;
            }
            match repository.write_marker().await {
                Ok(()) => *marked = true,
                Err(e) => report.failures.push(e.chain().join(": ")),
            }
        }
        report
    }
}

impl fmt::Display for ReplicateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = |kind: ActionKind| match (self.dry_run, kind) {
            (false, ActionKind::Copy) => "copied",
            (false, ActionKind::Replace) => "replaced damaged",
            (false, ActionKind::AbortUpload) => "aborted open upload of",
            (true, ActionKind::Copy) => "would copy",
            (true, ActionKind::Replace) => "would replace damaged",
            (true, ActionKind::AbortUpload) => "would abort open upload of",
        };
        for action in &self.actions {
            let from = action
                .from
                .as_ref()
                .map(|from| format!(" from '{from}'"))
                .unwrap_or_default();
            writeln!(
                f,
                "{} {}/{}/{} ({}){from} into '{}'",
                verb(action.what),
                action.job,
                action.id,
                crate::error::escape_controls(&action.object),
                human_size(action.bytes),
                action.to
            )?;
        }
        for (name, marked) in &self.reseeded {
            match (marked, self.dry_run) {
                (true, _) => writeln!(f, "reseeded repository '{name}': marker written")?,
                (false, true) => {
                    writeln!(f, "would reseed repository '{name}' and write its marker")?
                }
                (false, false) => writeln!(
                    f,
                    "repository '{name}' not reseeded whole: its marker was not written (see the failures above; a 'lifeboat.json' that is not lifeboat's must be looked at and removed by hand); then run `lifeboat replicate --reseed` again"
                )?,
            }
        }
        for ignored in &self.ignored_records {
            writeln!(f, "warning: removal record {ignored}")?;
        }
        for skipped in &self.not_copied {
            writeln!(f, "{}/{}: {}", skipped.job, skipped.id, skipped.why)?;
        }
        for failure in &self.failures {
            writeln!(f, "failed: {failure}")?;
        }
        for (name, reason) in &self.unreachable {
            writeln!(
                f,
                "warning: repository '{name}' could not be listed: {reason}"
            )?;
        }
        if self.actions.is_empty() && self.failures.is_empty() && self.not_copied.is_empty() {
            writeln!(
                f,
                "nothing to copy: every reachable repository holds every backup"
            )?;
        }
        Ok(())
    }
}
