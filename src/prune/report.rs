//! What `prune` decided and did, per job: for people (`Display`) and machines (`Serialize`).

use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::retention::Decision;

#[derive(Debug, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub jobs: Vec<JobPrune>,
}

/// An object prune left in place because Object Lock still protects it.
#[derive(Debug, Clone, Serialize)]
pub struct Retained {
    pub repository: String,
    pub key: String,
    pub until: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupOutcome {
    pub id: String,
    pub keep: bool,
    pub reasons: Vec<String>,
    /// Repositories whose own plan keeps it.
    pub kept_in: Vec<String>,
    /// Repositories it was removed from (or would be, in a dry run).
    pub removed_from: Vec<String>,
    /// Where Object Lock kept it (the whole backup stays, manifest and objects).
    pub retained: Vec<Retained>,
}

impl BackupOutcome {
    pub(super) fn planned(decision: Decision) -> BackupOutcome {
        BackupOutcome {
            id: decision.id,
            keep: decision.keep,
            reasons: decision.reasons,
            kept_in: Vec::new(),
            removed_from: Vec::new(),
            retained: Vec::new(),
        }
    }
}

/// Keys under a backup id that no repository has a manifest for.
#[derive(Debug, Clone, Serialize)]
pub struct Leftover {
    pub repository: String,
    pub id: String,
    pub objects: usize,
    pub why: String,
    pub removed: bool,
    pub retained: Vec<Retained>,
}

/// A multipart upload (or a local temp file) started before the grace period and never
/// finished.
#[derive(Debug, Serialize)]
pub struct StaleUpload {
    pub repository: String,
    pub key: String,
    pub initiated: Option<DateTime<Utc>>,
    pub aborted: bool,
}

/// A claim on a backup id (see `claim`) older than the grace period: its run was killed.
#[derive(Debug, Clone, Serialize)]
pub struct StaleClaim {
    pub repository: String,
    pub id: String,
    pub written: Option<DateTime<Utc>>,
    pub removed: bool,
}

#[derive(Debug, Serialize)]
pub struct JobPrune {
    pub job: String,
    /// Why nothing was done for this job, when so.
    pub refused: Option<String>,
    /// Newest first.
    pub backups: Vec<BackupOutcome>,
    pub leftovers: Vec<Leftover>,
    pub stale_uploads: Vec<StaleUpload>,
    pub stale_claims: Vec<StaleClaim>,
    pub wal: Option<WalPrune>,
    /// Why WAL was left alone, when it was.
    pub wal_skipped: Option<String>,
    pub unreachable: Vec<(String, String)>,
    /// Removal records written (one per removed backup and listed repository).
    pub recorded: usize,
    /// Stored versions removed with the backups and leftovers, where a bucket keeps
    /// versions (WAL's are counted in `wal`).
    pub versions_removed: u64,
    /// Removals that failed; the next prune retries them.
    pub failures: Vec<String>,
}

impl JobPrune {
    pub(super) fn new(job: &str, unreachable: Vec<(String, String)>) -> JobPrune {
        JobPrune {
            job: job.to_string(),
            refused: None,
            backups: Vec::new(),
            leftovers: Vec::new(),
            stale_uploads: Vec::new(),
            stale_claims: Vec::new(),
            wal: None,
            wal_skipped: None,
            unreachable,
            recorded: 0,
            versions_removed: 0,
            failures: Vec::new(),
        }
    }

    pub fn kept(&self) -> impl Iterator<Item = &BackupOutcome> {
        self.backups.iter().filter(|b| b.keep)
    }
}

impl PruneReport {
    /// Retained objects are success: Object Lock doing its job. A refused plan or a failed
    /// removal is a failure; an unreachable repository leaves the work degraded.
    pub fn outcome(&self) -> Result<()> {
        let refused: Vec<String> = self
            .jobs
            .iter()
            .filter_map(|j| {
                j.refused
                    .as_ref()
                    .map(|why| format!("job '{}': {why}", j.job))
            })
            .collect();
        if !refused.is_empty() {
            return Err(Error::new(
                ErrorKind::Storage,
                format!("prune refused: {}", refused.join("; ")),
            )
            .with_hint("check that backups are still being taken (`lifeboat list`) and the retention policy in the config"));
        }
        let failures: usize = self.jobs.iter().map(|j| j.failures.len()).sum();
        if failures > 0 {
            return Err(Error::new(
                ErrorKind::Storage,
                format!("{failures} removal(s) failed; every manifest left still has its objects"),
            )
            .with_hint("run `lifeboat prune` again once the repository is healthy"));
        }
        let mut unreachable: Vec<&str> = self
            .jobs
            .iter()
            .flat_map(|j| j.unreachable.iter().map(|(name, _)| name.as_str()))
            .collect();
        unreachable.sort_unstable();
        unreachable.dedup();
        if !unreachable.is_empty() {
            return Err(Error::new(
                ErrorKind::Degraded,
                format!(
                    "pruned what could be reached; repository(ies) {} could not be listed",
                    unreachable.join(", ")
                ),
            )
            .with_hint("run `lifeboat prune` again when they are back"));
        }
        Ok(())
    }
}

fn until(retained: &[Retained]) -> String {
    match retained.iter().filter_map(|r| r.until).max() {
        Some(until) => format!("until {}", until.format("%Y-%m-%d %H:%M UTC")),
        None => "by a legal hold or lock".to_string(),
    }
}

/// One backup's line: kept or removed, why, and where.
fn write_backup(
    f: &mut fmt::Formatter<'_>,
    backup: &BackupOutcome,
    (remove, removed): (&str, &str),
) -> fmt::Result {
    let action = if backup.keep { "keep" } else { remove };
    write!(
        f,
        "  {}  {action:<12}  {}",
        backup.id,
        backup.reasons.join(", ")
    )?;
    // Kept in some repositories and not others: each judged by what it holds.
    if backup.keep && !backup.removed_from.is_empty() {
        write!(f, " in {}", backup.kept_in.join(", "))?;
    }
    if !backup.removed_from.is_empty() {
        write!(f, "; {removed} from {}", backup.removed_from.join(", "))?;
    }
    if !backup.retained.is_empty() {
        let mut places: Vec<&str> = backup
            .retained
            .iter()
            .map(|r| r.repository.as_str())
            .collect();
        places.dedup();
        write!(
            f,
            "; RETAINED in {} {} (Object Lock)",
            places.join(", "),
            until(&backup.retained)
        )?;
    }
    writeln!(f)?;
    Ok(())
}

/// What interrupted runs left: backup directories, uploads, claims.
fn write_cleanup(
    f: &mut fmt::Formatter<'_>,
    job: &JobPrune,
    dry_run: bool,
    (removed, abort): (&str, &str),
) -> fmt::Result {
    for leftover in &job.leftovers {
        write!(
            f,
            "  leftover {} in '{}': {} object(s), {}",
            leftover.id, leftover.repository, leftover.objects, leftover.why
        )?;
        match (leftover.retained.is_empty(), leftover.removed || dry_run) {
            (false, _) => writeln!(f, ": RETAINED {}", until(&leftover.retained))?,
            (true, true) => writeln!(f, ": {removed}")?,
            (true, false) => writeln!(f, ": not removed")?,
        }
    }
    for upload in &job.stale_uploads {
        let started = upload
            .initiated
            .map(|at| at.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_else(|| "at an unknown time".to_string());
        let done = if upload.aborted || dry_run {
            abort
        } else {
            "not aborted"
        };
        writeln!(
            f,
            "  incomplete upload of {} in '{}' started {started}: {done}",
            crate::error::escape_controls(&upload.key),
            upload.repository
        )?;
    }
    for claim in &job.stale_claims {
        let done = if claim.removed || dry_run {
            removed
        } else {
            "not removed"
        };
        writeln!(
            f,
            "  claim of backup id {} in '{}' left by a run that did not finish: {done}",
            claim.id, claim.repository
        )?;
    }
    Ok(())
}

impl fmt::Display for PruneReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (remove, removed, abort) = match self.dry_run {
            true => ("would remove", "would be removed", "would abort"),
            false => ("remove", "removed", "aborted"),
        };
        for job in &self.jobs {
            let kept = job.kept().count();
            write!(
                f,
                "job {}: keep {kept}, {remove} {}",
                job.job,
                job.backups.len() - kept
            )?;
            let partly = job.kept().filter(|b| !b.removed_from.is_empty()).count();
            match partly {
                0 => writeln!(f)?,
                _ => writeln!(
                    f,
                    " ({partly} more kept in some repositories and {removed} from others)"
                )?,
            }
            for backup in &job.backups {
                write_backup(f, backup, (remove, removed))?;
            }
            write_cleanup(f, job, self.dry_run, (removed, abort))?;
            if let Some(wal) = &job.wal {
                write!(f, "{}", wal.display(self.dry_run))?;
            }
            let versions = job.versions_removed
                + job.wal.as_ref().map_or(0, |wal| {
                    wal.repositories.iter().map(|r| r.versions).sum::<u64>()
                });
            if versions > 0 {
                writeln!(
                    f,
                    "  removed {versions} stored version(s) of what went: the bucket keeps versions, and a plain delete would only hide them"
                )?;
            }
            if let Some(why) = &job.wal_skipped {
                writeln!(f, "  WAL left alone: {why}")?;
            }
            for (name, reason) in &job.unreachable {
                writeln!(
                    f,
                    "  warning: repository '{name}' could not be listed: {reason}"
                )?;
            }
            for failure in &job.failures {
                writeln!(f, "  FAILED {failure}")?;
            }
            if let Some(why) = &job.refused {
                writeln!(f, "  REFUSED: {why}")?;
            }
        }
        Ok(())
    }
}

/// Where one kept backup starts replaying.
#[derive(Debug, Clone, Serialize)]
pub struct WalFloor {
    pub backup: String,
    pub first_wal: String,
    pub timeline: u32,
    #[serde(skip)]
    pub(super) segment: u64,
}

#[derive(Debug, Serialize)]
pub struct WalRepositoryPrune {
    pub repository: String,
    pub removed: usize,
    pub kept: usize,
    /// Files Object Lock kept although no backup needs them.
    pub retained: usize,
    /// Stored versions removed with the files, where the bucket keeps versions.
    pub versions: u64,
}

#[derive(Debug, Serialize)]
pub struct WalPrune {
    /// The oldest start of replay per timeline: everything from there on stays.
    pub floors: Vec<WalFloor>,
    pub repositories: Vec<WalRepositoryPrune>,
}

impl WalPrune {
    pub(super) fn display(&self, dry_run: bool) -> impl fmt::Display + '_ {
        struct Shown<'a>(&'a WalPrune, bool);
        impl fmt::Display for Shown<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let Shown(wal, dry_run) = self;
                let from: Vec<String> = wal
                    .floors
                    .iter()
                    .map(|floor| format!("{} (backup {})", floor.first_wal, floor.backup))
                    .collect();
                writeln!(f, "  WAL needed from {}", from.join(", "))?;
                let removed = if *dry_run { "would remove" } else { "removed" };
                for repo in &wal.repositories {
                    write!(
                        f,
                        "  WAL in '{}': {removed} {}, kept {}",
                        repo.repository, repo.removed, repo.kept
                    )?;
                    if repo.retained > 0 {
                        write!(f, " ({} RETAINED by Object Lock)", repo.retained)?;
                    }
                    writeln!(f)?;
                }
                Ok(())
            }
        }
        Shown(self, dry_run)
    }
}
