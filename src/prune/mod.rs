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
mod report;
mod wal;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::Instrument;

use crate::config::{Config, JobConfig, JobSource, PostgresMode, Retention};
use crate::error::Result;
use crate::inventory::{self, Survey};
use crate::layout;
use crate::repository::{Repository, Tombstone};
use crate::retention::{self, Candidate, Decision};

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

pub struct PruneOptions {
    pub job: Option<String>,
    pub dry_run: bool,
    /// How old a backup directory without a manifest, or an incomplete upload, must be
    /// before it counts as abandoned.
    pub grace: Duration,
}

/// A passing drill of a backup, from the drill reports in the repositories.
#[derive(Debug, Clone)]
struct Proof {
    job: String,
    backup: String,
    drill: String,
    declared_at: DateTime<Utc>,
}

pub async fn run(config: &Config, options: &PruneOptions) -> Result<PruneReport> {
    let jobs: Vec<&JobConfig> = match &options.job {
        Some(name) => vec![config.job(name)?],
        None => config.jobs.iter().collect(),
    };
    // Every job's lock first: a backup or replicate of a job must not run while its
    // backups are being removed.
    let mut held_locks = Vec::with_capacity(jobs.len());
    for job in &jobs {
        held_locks.push(crate::lock::acquire(config, &job.name, "prune").await?);
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
    let proofs = drill_proofs(config, now).await?;
    let mut report = PruneReport {
        dry_run: options.dry_run,
        jobs: Vec::new(),
    };
    for job in jobs {
        let span = tracing::info_span!("prune", job = %job.name);
        let mut pruned = prune_job(job, &repositories, &proofs, now, config, options)
            .instrument(span)
            .await;
        pruned.unreachable.extend(unmarked.iter().cloned());
        report.jobs.push(pruned);
    }
    Ok(report)
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

async fn prune_job(
    job: &JobConfig,
    repositories: &[Repository],
    proofs: &[Proof],
    now: DateTime<Utc>,
    config: &Config,
    options: &PruneOptions,
) -> JobPrune {
    let survey = inventory::survey(repositories, &job.name).await;
    let mut outcome = JobPrune::new(&job.name, survey.unreachable.clone());
    if survey.listed.is_empty() {
        outcome.refused = Some("no repository could be listed".to_string());
        return outcome;
    }
    let committed = survey.committed_ids();
    // A manifest no repository can read is damage to report, not an old backup to remove
    // (what its objects hold may still be recovered), nor one that takes a retention slot
    // from a backup that restores.
    let readable = survey.manifests(&job.name, &committed).await;
    let damaged: BTreeSet<&String> = committed
        .iter()
        .zip(&readable)
        .filter(|(_, manifest)| manifest.is_none())
        .map(|(id, _)| id)
        .collect();
    // Each repository by what it holds itself: one that missed the newest backups (it was
    // down) keeps its own newest, never losing them because others hold newer ones.
    let mut plans: Vec<Vec<Decision>> = Vec::with_capacity(survey.listed.len());
    let mut refusals: Vec<String> = Vec::new();
    for (repository, held) in &survey.listed {
        // A backup dated after now would be the newest to every rule, and push out the
        // backups really made since: it is kept, and counts for none.
        let future = |id: &str| {
            layout::parse_backup_id(id)
                .is_some_and(|at| crate::clock::in_the_future(at, now, config.max_clock_skew))
        };
        let ids: Vec<String> = held
            .iter()
            .filter(|(id, holding)| holding.manifest && !damaged.contains(id) && !future(id))
            .map(|(id, _)| id.clone())
            .collect();
        let verified = verified_ids(repository, &job.name).await;
        let mut decisions = decide(job, &ids, &verified, proofs, now);
        if !ids.is_empty() && decisions.iter().all(|d| !d.keep) {
            refusals.push(format!(
                "the plan would remove all {} backup(s) repository '{}' holds; nothing was removed there",
                ids.len(),
                repository.name
            ));
            for decision in &mut decisions {
                decision.keep = true;
                decision.reasons = vec!["kept: the plan would remove every backup here".into()];
            }
        }
        decisions.extend(
            held.iter()
                .filter(|(id, holding)| holding.manifest && future(id) && !damaged.contains(id))
                .map(|(id, _)| Decision {
                    id: id.clone(),
                    at: layout::parse_backup_id(id).unwrap_or_default(),
                    keep: true,
                    reasons: vec![format!(
                        "dated in the future (now {}): kept, counted by no rule; see `lifeboat status {}`",
                        now.format("%Y-%m-%d %H:%M:%S UTC"),
                        job.name
                    )],
                }),
        );
        decisions.extend(
            held.iter()
                .filter(|(id, holding)| holding.manifest && damaged.contains(id))
                .map(|(id, _)| Decision {
                    id: id.clone(),
                    at: layout::parse_backup_id(id).unwrap_or_default(),
                    keep: true,
                    reasons: vec![format!(
                        "damaged: no repository holds a readable manifest of it; kept for `lifeboat verify {}`",
                        job.name
                    )],
                }),
        );
        plans.push(decisions);
    }
    if !refusals.is_empty() {
        outcome.refused = Some(refusals.join("; "));
    }
    outcome.backups = merge(&survey, &plans);
    let journals = apply::read_journal(&survey, &job.name).await;
    let journal: BTreeSet<&String> = journals.values().flat_map(|j| &j.removing).collect();
    let no_journal = apply::Journals::default();
    let run = crate::layout::run_tag();
    let committed_set: BTreeSet<&String> = committed.iter().collect();
    let grace = chrono::Duration::from_std(options.grace).unwrap_or(chrono::Duration::MAX);

    if !options.dry_run {
        record_intent(&survey, &job.name, now, &plans, &mut outcome).await;
    }
    for ((repository, held), decisions) in survey.listed.iter().zip(&plans) {
        // What an interrupted prune was removing here stays this repository's to finish,
        // even where another repository still holds the backup (its own plan keeps it).
        let own_journal = journals.get(&repository.name).unwrap_or(&no_journal);
        let live = apply::live_claims(repository, &job.name, now).await;
        let leftovers: Vec<Leftover> = held
            .iter()
            .filter(|(id, _)| !live.contains(*id))
            .filter(|(id, holding)| {
                !committed_set.contains(id)
                    || (!holding.manifest && own_journal.removing.contains(*id))
            })
            .filter_map(|(id, holding)| {
                let why = if journal.contains(id) {
                    "left by an interrupted prune".to_string()
                } else {
                    let started = layout::parse_backup_id(id)?;
                    let written = holding.newest.unwrap_or(started).max(started);
                    if now - written < grace {
                        return None;
                    }
                    format!(
                        "no manifest, last written {}",
                        written.format("%Y-%m-%d %H:%M:%S UTC")
                    )
                };
                Some(Leftover {
                    repository: repository.name.clone(),
                    id: id.clone(),
                    objects: holding.objects.len(),
                    why,
                    removed: false,
                    retained: Vec::new(),
                })
            })
            .collect();
        let held_removals: Vec<&String> = decisions
            .iter()
            .filter(|d| !d.keep)
            .map(|d| &d.id)
            .collect();
        apply::remove_from(
            repository,
            &job.name,
            apply::Removing {
                held,
                removals: &held_removals,
                leftovers,
                run: &run,
                earlier_journals: own_journal.keys(),
            },
            options.dry_run,
            &mut outcome,
        )
        .await;
        apply::abort_stale_uploads(
            repository,
            &job.name,
            (now - grace, &live),
            options.dry_run,
            &mut outcome,
        )
        .await;
        apply::remove_stale_claims(
            repository,
            &job.name,
            now - grace,
            options.dry_run,
            &mut outcome,
        )
        .await;
    }

    if !options.dry_run {
        record_removals(&survey, &job.name, now, &mut outcome).await;
    }

    if let JobSource::Postgres(postgres) = &job.source
        && postgres.mode == PostgresMode::Physical
    {
        match wal::floors(&survey, &job.name, &outcome.backups).await {
            Ok(floors) => {
                let pruned = wal::prune(
                    &survey,
                    &job.name,
                    floors,
                    options.dry_run,
                    &mut outcome.failures,
                )
                .await;
                outcome.wal = Some(pruned);
            }
            Err(why) => outcome.wal_skipped = Some(why),
        }
    }
    outcome
}

/// Writes into every listed repository a removal record of each backup this run removed
/// anywhere, so `replicate` never copies it back from a repository that was out of reach
/// (or whose own plan keeps it); and drops records older than [`TOMBSTONE_DAYS`] of backups
/// no listed repository holds any more.
async fn record_removals(
    survey: &Survey<'_>,
    job: &str,
    now: DateTime<Utc>,
    outcome: &mut JobPrune,
) {
    let removed: Vec<Tombstone> = outcome
        .backups
        .iter()
        .filter(|b| !b.removed_from.is_empty())
        .map(|b| Tombstone {
            id: b.id.clone(),
            removed_at: now,
            host: crate::host::name(),
            removed_from: b.removed_from.clone(),
        })
        .collect();
    // What the plan removed nowhere (Object Lock kept it, a delete failed) is not removed:
    // its record of intent (`record_intent`) goes.
    let not_removed: Vec<String> = outcome
        .backups
        .iter()
        .filter(|b| !b.keep && b.removed_from.is_empty())
        .map(|b| b.id.clone())
        .collect();
    let expiry = now - chrono::Duration::days(TOMBSTONE_DAYS);
    for (repository, _) in &survey.listed {
        for tombstone in &removed {
            match repository.write_tombstone(job, tombstone).await {
                Ok(()) => outcome.recorded += 1,
                Err(e) => outcome.failures.push(e.chain().join(": ")),
            }
        }
        for id in &not_removed {
            let key = layout::removed_key(job, id);
            if let Err(e) = repository.store.delete_unless_retained(&key).await {
                outcome.failures.push(
                    repository
                        .error(&format!("remove the removal record '{key}'"), e)
                        .chain()
                        .join(": "),
                );
            }
        }
        let Ok(tombstones) = repository.tombstones(job).await else {
            continue;
        };
        for (id, written) in tombstones {
            let still_held = survey.listed.iter().any(|(_, held)| held.contains_key(&id));
            if still_held || written.is_none_or(|at| at > expiry) {
                continue;
            }
            let key = layout::removed_key(job, &id);
            if let Err(e) = repository.store.delete(&key).await {
                outcome.failures.push(
                    repository
                        .error(&format!("remove the removal record '{key}'"), e)
                        .chain()
                        .join(": "),
                );
            }
        }
    }
}

/// Before anything is removed, records in every listed repository each backup the plans
/// remove somewhere: a prune stopped halfway (a signal, a crash) has then already told
/// `replicate` not to copy back what it had removed from one repository and not yet from
/// another. `record_removals` rewrites the records with what was done.
async fn record_intent(
    survey: &Survey<'_>,
    job: &str,
    now: DateTime<Utc>,
    plans: &[Vec<crate::retention::Decision>],
    outcome: &mut JobPrune,
) {
    let mut removing: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for ((repository, _), decisions) in survey.listed.iter().zip(plans) {
        for decision in decisions.iter().filter(|d| !d.keep) {
            removing
                .entry(&decision.id)
                .or_default()
                .push(repository.name.clone());
        }
    }
    for (id, removed_from) in removing {
        let tombstone = Tombstone {
            id: id.to_string(),
            removed_at: now,
            host: crate::host::name(),
            removed_from,
        };
        for (repository, _) in &survey.listed {
            if let Err(e) = repository.write_tombstone(job, &tombstone).await {
                outcome.failures.push(e.chain().join(": "));
            }
        }
    }
}

/// Ids with a verify record in `repository`: verify found them intact there.
async fn verified_ids(repository: &Repository, job: &str) -> BTreeSet<String> {
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
fn merge(survey: &Survey<'_>, plans: &[Vec<Decision>]) -> Vec<BackupOutcome> {
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
fn decide(
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
