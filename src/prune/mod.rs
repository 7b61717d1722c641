//! `lifeboat prune [JOB] [--dry-run]`: applies each job's retention policy in every
//! repository. The plan comes from `retention::plan` plus protections that no policy can
//! override: the newest backup that passed `verify`, every backup a passing drill proved in
//! the last 100 days, and — for physical jobs with `keep_within` — the base backup that
//! point-in-time recovery to the start of that window replays from. A plan that would remove
//! every backup is refused. Removal, per repository: a journal naming what goes, then for
//! each backup its manifest (so no manifest ever points to a removed object), its objects and
//! its verify record; then leftovers of interrupted backups, stale multipart uploads, and WAL
//! that no kept physical backup needs. Objects under Object Lock are left and reported.

mod apply;
mod delete;
mod journal;
mod plan;
mod report;
mod wal;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::Instrument;

use crate::config::{Config, JobConfig, JobSource, PostgresMode, Retention};
use crate::error::Result;
use crate::inventory::Survey;
use crate::layout;
use crate::repository::Repository;
use crate::retention::{self, Candidate, Decision};

pub use plan::{JobPlan, RepositoryPlan};
pub use report::{
    BackupOutcome, JobPrune, Leftover, PruneReport, Retained, StaleClaim, StaleUpload, WalFloor,
    WalPrune, WalRepositoryPrune,
};

/// A drill that passed proves its backup restores: that backup is kept this long.
pub const DRILL_PROOF_DAYS: i64 = 100;
/// How long a removal record outlives the last copy of its backup in the repositories
/// prune can list: one out of reach for longer is re-seeded, not trusted.
pub const TOMBSTONE_DAYS: i64 = 90;
/// Leftovers younger than this may belong to a backup still running.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
/// However short `--grace`, a claim younger than this stays: its run may still be writing
/// (the claim is all that keeps another run out of its backup).
const CLAIM_MIN_AGE: chrono::Duration = chrono::Duration::hours(1);

pub struct PruneOptions {
    pub job: Option<String>,
    pub dry_run: bool,
    /// How old a backup directory without a manifest, or an incomplete upload, must be
    /// before it counts as abandoned.
    pub grace: Duration,
}

/// A passing drill of a backup, from the drill reports in the repositories.
#[derive(Debug, Clone)]
pub(super) struct Proof {
    job: String,
    backup: String,
    drill: String,
    declared_at: DateTime<Utc>,
}

/// A prune, prepared: the jobs (their locks held until it is applied or dropped), the
/// repositories to prune, and the moment retention counts back from. Each job's plan — what
/// goes from which repository and why — is decided by [`PrunePlan::plan_job`] from what the
/// repositories hold just before it is carried out: `--dry-run` prints it, `apply` carries
/// out the same.
pub struct PrunePlan {
    jobs: Vec<JobConfig>,
    repositories: Vec<Repository>,
    /// Repositories without their marker, and why: nothing is removed from them.
    unmarked: Vec<(String, String)>,
    proofs: Vec<Proof>,
    now: DateTime<Utc>,
    grace: chrono::Duration,
    max_clock_skew: Duration,
    _locks: Vec<crate::lock::JobLock>,
}

pub async fn run(config: &Config, options: &PruneOptions) -> Result<PruneReport> {
    let plan = plan(config, options).await?;
    Ok(match options.dry_run {
        true => plan.preview().await,
        false => plan.apply().await,
    })
}

/// Takes the jobs' locks, sorts the repositories and reads the time; reads only.
pub async fn plan(config: &Config, options: &PruneOptions) -> Result<PrunePlan> {
    let jobs: Vec<&JobConfig> = match &options.job {
        Some(name) => vec![config.job(name)?],
        None => config.jobs.iter().collect(),
    };
    // Every job's lock first: a backup or replicate of a job must not run while its
    // backups are being removed.
    let mut locks = Vec::with_capacity(jobs.len());
    for job in &jobs {
        locks.push(crate::lock::acquire(config, &job.name, "prune").await?);
    }
    let all = Repository::open_all(config).await;
    // A repository without its marker while others hold theirs was wiped: what it lacks is
    // for `replicate --reseed`, and nothing is removed from it.
    let markers = crate::repository::read_markers(&all).await;
    let mut repositories = Vec::with_capacity(all.len());
    let mut unmarked = Vec::new();
    for (index, repository) in all.iter().enumerate() {
        match markers.wiped(&all, index) {
            Some(wiped) => unmarked.push((repository.name.clone(), wiped.to_string())),
            None => repositories.push(repository.clone()),
        }
    }
    // Retention counts back from now: with this host's clock wrong, it would keep the wrong
    // backups.
    let now = crate::clock::read(&repositories)
        .await
        .trusted(config.max_clock_skew, "prune")?
        .now();
    Ok(PrunePlan {
        jobs: jobs.into_iter().cloned().collect(),
        proofs: drill_proofs(config, now).await?,
        repositories,
        unmarked,
        now,
        grace: chrono::Duration::from_std(options.grace).unwrap_or(chrono::Duration::MAX),
        max_clock_skew: config.max_clock_skew,
        _locks: locks,
    })
}

impl PrunePlan {
    /// What goes of one job, from what the repositories hold now; reads only.
    pub async fn plan_job(&self, job: &JobConfig) -> JobPlan {
        let span = tracing::info_span!("prune", job = %job.name);
        let rules = plan::Rules {
            proofs: &self.proofs,
            now: self.now,
            grace: self.grace,
            max_clock_skew: self.max_clock_skew,
        };
        let mut planned = plan::plan_job(job, &self.repositories, rules)
            .instrument(span)
            .await;
        planned.unreachable.extend(self.unmarked.iter().cloned());
        planned
    }

    /// What applying the plan would do, changing nothing: the WAL files the plan's floors
    /// leave behind are counted, a page at a time.
    pub async fn preview(self) -> PruneReport {
        let mut jobs = Vec::with_capacity(self.jobs.len());
        for job in &self.jobs {
            let plan = self.plan_job(job).await;
            let mut report = plan.report();
            if let Some(Ok(floors)) = &plan.wal {
                let repositories: Vec<_> =
                    plan.repositories.iter().map(|p| &p.repository).collect();
                let counted = wal::prune(
                    &repositories,
                    &plan.job,
                    floors,
                    wal::Mode::Count,
                    &mut report.failures,
                )
                .await;
                report.wal = Some(counted);
            }
            jobs.push(report);
        }
        PruneReport {
            dry_run: true,
            jobs,
        }
    }

    /// Plans and carries out each job in turn, and reports what each item came to.
    pub async fn apply(self) -> PruneReport {
        let mut jobs = Vec::with_capacity(self.jobs.len());
        for job in &self.jobs {
            let plan = self.plan_job(job).await;
            let span = tracing::info_span!("prune", job = %plan.job);
            jobs.push(apply::apply(plan, self.now).instrument(span).await);
        }
        PruneReport {
            dry_run: false,
            jobs,
        }
    }
}

async fn drill_proofs(config: &Config, now: DateTime<Utc>) -> Result<Vec<Proof>> {
    let since = now - chrono::Duration::days(DRILL_PROOF_DAYS);
    let history = crate::drill::history(config, None).await?;
    Ok(history
        .rows
        .into_iter()
        .filter(|row| row.passed && row.declared_at > since)
        .map(|row| Proof {
            job: row.job,
            backup: row.backup,
            drill: row.drill,
            declared_at: row.declared_at,
        })
        .collect())
}

/// Ids with a verify record in `repository`: verify found them intact there.
pub(super) async fn verified_ids(repository: &Repository, job: &str) -> BTreeSet<String> {
    let prefix = layout::verified_prefix(job);
    let Ok(records) = repository.store.list(&prefix).await else {
        return BTreeSet::new();
    };
    records
        .iter()
        .filter_map(|record| {
            let name = record.key.strip_prefix(&prefix)?.strip_suffix(".json")?;
            layout::parse_backup_id(name).map(|_| name.to_string())
        })
        .collect()
}

/// One row per backup any repository holds, newest first, from the repositories' own plans
/// (in `survey.listed` order): kept where any plan keeps it, with the reasons of the first
/// that does and the repositories that keep it.
pub(super) fn merge(survey: &Survey<'_>, plans: &[Vec<Decision>]) -> Vec<BackupOutcome> {
    let mut rows: BTreeMap<String, BackupOutcome> = BTreeMap::new();
    for ((repository, _), decisions) in survey.listed.iter().zip(plans) {
        for decision in decisions {
            let row = rows
                .entry(decision.id.clone())
                .or_insert_with(|| BackupOutcome::planned(decision.clone()));
            if decision.keep {
                if !row.keep {
                    row.keep = true;
                    row.reasons = decision.reasons.clone();
                }
                row.kept_in.push(repository.name.clone());
            }
        }
    }
    rows.into_values().rev().collect()
}

/// The retention plan with the protections no policy overrides, newest first.
pub(super) fn decide(
    job: &JobConfig,
    committed: &[String],
    verified: &BTreeSet<String>,
    proofs: &[Proof],
    now: DateTime<Utc>,
) -> Vec<Decision> {
    let candidates: Vec<Candidate> = committed
        .iter()
        .filter_map(|id| {
            Some(Candidate {
                id: id.clone(),
                at: layout::parse_backup_id(id)?,
            })
        })
        .collect();
    let policy = job.retention.clone().unwrap_or_default();
    let mut decisions = retention::plan(&candidates, now, &policy);
    let mut protect = |id: &str, reason: String| {
        if let Some(decision) = decisions.iter_mut().find(|d| d.id == id) {
            if !decision.keep {
                decision.reasons.clear();
                decision.keep = true;
            }
            decision.reasons.push(reason);
        }
    };
    if let Some(newest) = committed.iter().rev().find(|id| verified.contains(*id)) {
        protect(newest, "newest verified".to_string());
    }
    for proof in proofs.iter().filter(|p| p.job == job.name) {
        protect(
            &proof.backup,
            format!(
                "proved by drill {} on {}",
                proof.drill,
                proof.declared_at.format("%Y-%m-%d")
            ),
        );
    }
    if let Some(base) = pitr_base(job, &policy, &candidates, now) {
        protect(
            &base.id,
            format!(
                "base for PITR to {}",
                (now - base.within).format("%Y-%m-%d %H:%M UTC")
            ),
        );
    }
    decisions
}

struct PitrBase {
    id: String,
    within: chrono::Duration,
}

/// For a physical job with `keep_within`, the newest backup taken at or before the start of
/// the window: without it, no time early in the window could be recovered to.
fn pitr_base(
    job: &JobConfig,
    policy: &Retention,
    candidates: &[Candidate],
    now: DateTime<Utc>,
) -> Option<PitrBase> {
    let JobSource::Postgres(postgres) = &job.source else {
        return None;
    };
    if postgres.mode != PostgresMode::Physical {
        return None;
    }
    let within = chrono::Duration::from_std(policy.keep_within?).ok()?;
    let start = now - within;
    candidates
        .iter()
        .filter(|c| c.at <= start)
        .max_by_key(|c| c.at)
        .map(|c| PitrBase {
            id: c.id.clone(),
            within,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FilesJob, PostgresJob};

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    fn job(source: JobSource, retention: Retention) -> JobConfig {
        JobConfig {
            name: "db".to_string(),
            schedule: None,
            retention: Some(retention),
            source,
        }
    }

    fn files() -> JobSource {
        JobSource::Files(FilesJob {
            paths: Vec::new(),
            follow: false,
            lifeboats_own: Vec::new(),
            include: Vec::new(),
            exclude: Vec::new(),
        })
    }

    fn physical() -> JobSource {
        JobSource::Postgres(PostgresJob {
            mode: PostgresMode::Physical,
            connection: Default::default(),
            databases: None,
            bin_dir: None,
            heartbeat: false,
            wal_prefetch: 0,
        })
    }

    /// Daily backups at 03:00 from the 1st to the 10th of November 2026.
    fn ten_days() -> Vec<String> {
        (1..=10).map(|d| format!("202611{d:02}T030000Z")).collect()
    }

    fn kept(decisions: &[Decision]) -> Vec<&str> {
        decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.id.as_str())
            .collect()
    }

    #[test]
    fn the_newest_verified_backup_and_drilled_backups_are_kept_whatever_the_policy() {
        let now = at("2026-11-10T12:00:00Z");
        let policy = Retention {
            keep_last: Some(1),
            ..Retention::default()
        };
        let verified: BTreeSet<String> = ["20261102T030000Z", "20261104T030000Z"]
            .map(String::from)
            .into();
        let proofs = vec![
            Proof {
                job: "db".to_string(),
                backup: "20261101T030000Z".to_string(),
                drill: "quarterly".to_string(),
                declared_at: at("2026-11-05T10:00:00Z"),
            },
            // Another job's drill of a backup with the same id proves nothing here.
            Proof {
                job: "other".to_string(),
                backup: "20261107T030000Z".to_string(),
                drill: "quarterly".to_string(),
                declared_at: at("2026-11-08T10:00:00Z"),
            },
        ];
        let decisions = decide(&job(files(), policy), &ten_days(), &verified, &proofs, now);
        assert_eq!(
            kept(&decisions),
            ["20261110T030000Z", "20261104T030000Z", "20261101T030000Z"]
        );
        let reasons = |id: &str| {
            decisions
                .iter()
                .find(|d| d.id == id)
                .unwrap()
                .reasons
                .join(", ")
        };
        assert_eq!(reasons("20261104T030000Z"), "newest verified");
        assert_eq!(
            reasons("20261101T030000Z"),
            "proved by drill quarterly on 2026-11-05"
        );
        assert_eq!(reasons("20261102T030000Z"), "no rule keeps it");
    }

    #[test]
    fn a_physical_job_keeps_the_base_backup_of_its_recovery_window() {
        let now = at("2026-11-10T12:00:00Z");
        let policy = Retention {
            keep_within: Some(Duration::from_secs(3 * 86_400)),
            ..Retention::default()
        };
        let none = BTreeSet::new();
        // Within three days: the 8th, 9th and 10th. Recovering to the window's start (7th,
        // 12:00) replays from the backup of the 7th.
        let decisions = decide(
            &job(physical(), policy.clone()),
            &ten_days(),
            &none,
            &[],
            now,
        );
        assert_eq!(
            kept(&decisions),
            [
                "20261110T030000Z",
                "20261109T030000Z",
                "20261108T030000Z",
                "20261107T030000Z"
            ]
        );
        assert!(decisions[3].reasons[0].starts_with("base for PITR to 2026-11-07 12:00"));
        // A logical job has no recovery window to keep a base for.
        let decisions = decide(&job(files(), policy), &ten_days(), &none, &[], now);
        assert_eq!(kept(&decisions).len(), 3);
    }

    #[test]
    fn a_window_with_no_backup_in_it_keeps_nothing_and_prune_refuses() {
        let now = at("2026-12-31T00:00:00Z");
        let policy = Retention {
            keep_within: Some(Duration::from_secs(86_400)),
            ..Retention::default()
        };
        let decisions = decide(
            &job(files(), policy),
            &ten_days(),
            &BTreeSet::new(),
            &[],
            now,
        );
        assert!(decisions.iter().all(|d| !d.keep));
    }
}
