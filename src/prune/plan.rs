//! What a prune of one job will do, decided from what the repositories hold before anything
//! is removed: per repository the backups that go, the leftovers, the stale uploads and
//! claims, and the rule WAL goes by. `--dry-run` shows the plan; `apply` carries it out.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};

use super::journal::{self, Journals};
use super::report::{BackupOutcome, JobPrune, Leftover, StaleClaim, StaleUpload};
use super::wal::{self, Floors};
use super::{CLAIM_MIN_AGE, Proof, decide, merge, verified_ids};
use crate::config::{JobConfig, JobSource, PostgresMode};
use crate::inventory::{self, Holding, Survey};
use crate::layout;
use crate::repository::Repository;
use crate::retention::Decision;
use crate::storage::IncompleteUpload;

/// One job's prune, decided.
pub struct JobPlan {
    pub job: String,
    pub unreachable: Vec<(String, String)>,
    /// Why nothing is removed for this job, when so.
    pub refused: Option<String>,
    /// Every backup any listed repository holds, newest first, kept or not and why.
    pub backups: Vec<BackupOutcome>,
    /// Per listed repository, in the order they were listed.
    pub repositories: Vec<RepositoryPlan>,
    /// For physical jobs: where replay starts for the kept backups (WAL below it goes), or
    /// why WAL is left alone.
    pub wal: Option<Result<Floors, String>>,
    /// The backup ids each repository held, for the removal records.
    pub held_ids: BTreeSet<String>,
}

/// What goes from one repository.
pub struct RepositoryPlan {
    pub repository: Repository,
    /// Backups the repository's own plan lets go, with what it holds of each.
    pub removals: Vec<(String, Holding)>,
    pub leftovers: Vec<(Leftover, Holding)>,
    pub stale_uploads: Vec<IncompleteUpload>,
    pub stale_claims: Vec<(StaleClaim, String)>,
    /// Listings that failed while planning; nothing they would have found is removed.
    pub failures: Vec<String>,
    /// Journals of earlier prunes whose work this one finishes.
    pub earlier_journals: Vec<String>,
}

impl JobPlan {
    /// The report of this plan before anything is done: what a dry run prints.
    pub fn report(&self) -> JobPrune {
        let mut report = JobPrune::new(&self.job, self.unreachable.clone());
        report.refused = self.refused.clone();
        report.backups = self.backups.clone();
        for planned in &self.repositories {
            let name = &planned.repository.name;
            for (id, _) in &planned.removals {
                if let Some(backup) = report.backups.iter_mut().find(|b| &b.id == id) {
                    backup.removed_from.push(name.clone());
                }
            }
            report
                .leftovers
                .extend(planned.leftovers.iter().map(|(l, _)| l.clone()));
            report
                .stale_uploads
                .extend(planned.stale_uploads.iter().map(|upload| StaleUpload {
                    repository: name.clone(),
                    key: upload.key.clone(),
                    initiated: upload.initiated,
                    aborted: false,
                }));
            report
                .stale_claims
                .extend(planned.stale_claims.iter().map(|(c, _)| c.clone()));
            report.failures.extend(planned.failures.iter().cloned());
        }
        if let Some(Err(why)) = &self.wal {
            report.wal_skipped = Some(why.clone());
        }
        report
    }
}

/// What a job's plan is decided by besides what the repositories hold.
pub(super) struct Rules<'a> {
    /// Passing drills, whose backups are kept.
    pub proofs: &'a [Proof],
    pub now: DateTime<Utc>,
    /// How old an uncommitted directory or upload must be to count as abandoned.
    pub grace: chrono::Duration,
    pub max_clock_skew: std::time::Duration,
}

/// Decides one job's prune; reads only.
pub(super) async fn plan_job(
    job: &JobConfig,
    repositories: &[Repository],
    rules: Rules<'_>,
) -> JobPlan {
    let Rules {
        proofs,
        now,
        grace,
        max_clock_skew,
    } = rules;
    let survey = inventory::survey(repositories, &job.name).await;
    let mut plan = JobPlan {
        job: job.name.clone(),
        unreachable: survey.unreachable.clone(),
        refused: None,
        backups: Vec::new(),
        repositories: Vec::new(),
        wal: None,
        held_ids: survey
            .listed
            .iter()
            .flat_map(|(_, held)| held.keys().cloned())
            .collect(),
    };
    if survey.listed.is_empty() {
        plan.refused = Some("no repository could be listed".to_string());
        return plan;
    }
    let (decisions, refusals) = decisions(job, &survey, proofs, now, max_clock_skew).await;
    if !refusals.is_empty() {
        plan.refused = Some(refusals.join("; "));
    }
    plan.backups = merge(&survey, &decisions);
    let journals = journal::read(&survey, &job.name).await;
    let abandoned = Abandoned {
        committed: survey.committed_ids().into_iter().collect(),
        journal: journals
            .values()
            .flat_map(|j| j.removing.iter().cloned())
            .collect(),
        now,
        grace,
    };
    for ((repository, held), decisions) in survey.listed.iter().zip(&decisions) {
        let live = live_claims(repository, &job.name, now).await;
        let own_journal = journals.get(&repository.name).cloned().unwrap_or_default();
        let mut planned = RepositoryPlan {
            repository: (*repository).clone(),
            removals: decisions
                .iter()
                .filter(|d| !d.keep)
                .map(|d| (d.id.clone(), held[&d.id].clone()))
                .collect(),
            leftovers: abandoned.leftovers(repository, held, &own_journal, &live),
            stale_uploads: Vec::new(),
            stale_claims: Vec::new(),
            failures: Vec::new(),
            earlier_journals: own_journal.keys().to_vec(),
        };
        match stale_uploads(repository, &job.name, now - grace, &live).await {
            Ok(uploads) => planned.stale_uploads = uploads,
            Err(e) => planned.failures.push(e),
        }
        match stale_claims(repository, &job.name, now - grace).await {
            Ok(claims) => planned.stale_claims = claims,
            Err(e) => planned.failures.push(e),
        }
        plan.repositories.push(planned);
    }
    if let JobSource::Postgres(postgres) = &job.source
        && postgres.mode == PostgresMode::Physical
    {
        plan.wal = Some(wal::floors(&survey, &job.name, &plan.backups).await);
    }
    plan
}

/// Each repository's own decisions, in `survey.listed` order, and the refusals among them.
/// Each repository by what it holds itself: one that missed the newest backups (it was
/// down) keeps its own newest, never losing them because others hold newer ones.
async fn decisions(
    job: &JobConfig,
    survey: &Survey<'_>,
    proofs: &[Proof],
    now: DateTime<Utc>,
    max_clock_skew: std::time::Duration,
) -> (Vec<Vec<Decision>>, Vec<String>) {
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
    // A backup dated after now would be the newest to every rule, and push out the backups
    // really made since: it is kept, and counts for none.
    let future = |id: &str| {
        layout::parse_backup_id(id)
            .is_some_and(|at| crate::clock::in_the_future(at, now, max_clock_skew))
    };
    let kept = |id: &String, why: String| Decision {
        id: id.clone(),
        at: layout::parse_backup_id(id).unwrap_or_default(),
        keep: true,
        reasons: vec![why],
    };
    let mut plans = Vec::with_capacity(survey.listed.len());
    let mut refusals = Vec::new();
    for (repository, held) in &survey.listed {
        let with_manifest = || held.iter().filter(|(_, h)| h.manifest).map(|(id, _)| id);
        let ids: Vec<String> = with_manifest()
            .filter(|id| !damaged.contains(id) && !future(id))
            .cloned()
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
            with_manifest()
                .filter(|id| future(id) && !damaged.contains(id))
                .map(|id| {
                    kept(id, format!(
                        "dated in the future (now {}): kept, counted by no rule; see `lifeboat status {}`",
                        now.format("%Y-%m-%d %H:%M:%S UTC"),
                        job.name
                    ))
                }),
        );
        decisions.extend(with_manifest().filter(|id| damaged.contains(id)).map(|id| {
            kept(id, format!(
                "damaged: no repository holds a readable manifest of it; kept for `lifeboat verify {}`",
                job.name
            ))
        }));
        plans.push(decisions);
    }
    (plans, refusals)
}

/// What tells a leftover from a backup: the ids committed anywhere, those earlier prunes
/// were removing anywhere, and how old an uncommitted directory must be.
struct Abandoned {
    committed: BTreeSet<String>,
    journal: BTreeSet<String>,
    now: DateTime<Utc>,
    grace: chrono::Duration,
}

impl Abandoned {
    /// Directories of backups that never committed (or whose removal an earlier prune
    /// began) in one repository, older than the grace period and claimed by no live run.
    fn leftovers(
        &self,
        repository: &Repository,
        held: &BTreeMap<String, Holding>,
        own_journal: &Journals,
        live: &BTreeSet<String>,
    ) -> Vec<(Leftover, Holding)> {
        // What an interrupted prune was removing here stays this repository's to finish,
        // even where another repository still holds the backup (its own plan keeps it).
        let removing_here =
            |id: &String, holding: &Holding| !holding.manifest && own_journal.removing.contains(id);
        held.iter()
            .filter(|(id, holding)| {
                !live.contains(*id) && (!self.committed.contains(*id) || removing_here(id, holding))
            })
            .filter_map(|(id, holding)| {
                let why = if self.journal.contains(id) {
                    "left by an interrupted prune".to_string()
                } else {
                    let started = layout::parse_backup_id(id)?;
                    let written = holding.newest.unwrap_or(started).max(started);
                    if self.now - written < self.grace {
                        return None;
                    }
                    format!(
                        "no manifest, last written {}",
                        written.format("%Y-%m-%d %H:%M:%S UTC")
                    )
                };
                let leftover = Leftover {
                    repository: repository.name.clone(),
                    id: id.clone(),
                    objects: holding.objects.len(),
                    why,
                    removed: false,
                    retained: Vec::new(),
                };
                Some((leftover, holding.clone()))
            })
            .collect()
    }
}

/// The backup ids of `job` a run claimed in `repository` less than [`CLAIM_MIN_AGE`] ago:
/// that run may still be writing them, whatever `--grace` says.
async fn live_claims(repository: &Repository, job: &str, now: DateTime<Utc>) -> BTreeSet<String> {
    let prefix = layout::claims_prefix(job);
    let this_host = crate::host::name();
    let mut live = BTreeSet::new();
    for (key, written) in repository.claims(job).await.unwrap_or_default() {
        let Some(id) = key
            .strip_prefix(&prefix)
            .and_then(|name| name.strip_suffix(".json"))
        else {
            continue;
        };
        if written.is_some_and(|at| at <= now - CLAIM_MIN_AGE) {
            continue;
        }
        // A run of this host that was killed (SIGKILL, a crash) holds nothing.
        if repository
            .read_claim(job, id)
            .await
            .is_some_and(|claim| claim.run_is_gone(&this_host))
        {
            continue;
        }
        live.insert(id.to_string());
    }
    live
}

/// Uploads of `job` started before `before`: a backup still running is younger, and one
/// whose id is claimed (`live`) is left to its run.
async fn stale_uploads(
    repository: &Repository,
    job: &str,
    before: DateTime<Utc>,
    live: &BTreeSet<String>,
) -> Result<Vec<IncompleteUpload>, String> {
    let uploads = repository
        .store
        .list_incomplete(&format!("jobs/{job}/"))
        .await
        .map_err(|e| {
            format!(
                "listing incomplete uploads in repository '{}': {e}",
                repository.name
            )
        })?;
    let claimed = |key: &str| {
        live.iter()
            .any(|id| key.starts_with(&layout::backup_prefix(job, id)))
    };
    Ok(uploads
        .into_iter()
        .filter(|u| u.initiated.is_some_and(|at| at < before) && !claimed(&u.key))
        .collect())
}

/// The claims on backup ids (see `claim`) written before `before` and at least
/// [`CLAIM_MIN_AGE`] ago, with their keys: a run still claiming is younger, and a finished
/// run removed its own. Only claims named as lifeboat names them (`ID.json`, a regular
/// object) are touched.
async fn stale_claims(
    repository: &Repository,
    job: &str,
    before: DateTime<Utc>,
) -> Result<Vec<(StaleClaim, String)>, String> {
    let claims = repository
        .claims(job)
        .await
        .map_err(|e| e.chain().join(": "))?;
    let prefix = layout::claims_prefix(job);
    let this_host = crate::host::name();
    let floor = Utc::now() - CLAIM_MIN_AGE;
    let mut stale = Vec::new();
    for (key, written) in claims {
        let Some(id) = key
            .strip_prefix(&prefix)
            .and_then(|name| name.strip_suffix(".json"))
            .filter(|id| layout::parse_backup_id(id).is_some())
            .map(str::to_string)
        else {
            continue;
        };
        let claimed_at = written.or_else(|| layout::parse_backup_id(&id));
        if claimed_at.is_none_or(|at| at >= before) {
            continue;
        }
        // Younger than the floor, only a claim whose run is known to be gone goes.
        if claimed_at.is_some_and(|at| at > floor)
            && !repository
                .read_claim(job, &id)
                .await
                .is_some_and(|claim| claim.run_is_gone(&this_host))
        {
            continue;
        }
        let claim = StaleClaim {
            repository: repository.name.clone(),
            id,
            written,
            removed: false,
        };
        stale.push((claim, key));
    }
    Ok(stale)
}
