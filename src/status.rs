//! `lifeboat status [JOB]`: are we inside our targets right now? Per job, read from the
//! repositories: how old the newest restorable point is against the RPO (for physical jobs
//! the newest archived WAL counts), which repositories lack the newest backup, the last drill,
//! and the RTO the last drill's restore rate projects for the newest backup. Nagios states and
//! exit codes: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{Config, JobConfig, JobSource, PostgresMode};
use crate::drill::{HistoryRow, history};
use crate::error::Result;
use crate::human::human_duration;
use crate::inventory::{self, Presence, Survey};
use crate::layout;
use crate::manifest::Manifest;
use crate::repository::Repository;
use crate::storage::{self, ObjectMeta};
use crate::window::Window;

/// Share of a target that turns OK into WARNING.
const WARN_AT: f64 = 0.8;
/// A drill older than this is a WARNING: quarterly drills, with a few days' grace.
const DRILL_MAX_AGE_DAYS: i64 = 92;

/// Nagios states, declared from least to most severe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum State {
    Ok,
    Warning,
    Unknown,
    Critical,
}

impl State {
    pub fn exit_code(self) -> i32 {
        match self {
            State::Ok => 0,
            State::Warning => 1,
            State::Critical => 2,
            State::Unknown => 3,
        }
    }

    fn label(self) -> &'static str {
        match self {
            State::Ok => "OK",
            State::Warning => "WARNING",
            State::Critical => "CRITICAL",
            State::Unknown => "UNKNOWN",
        }
    }
}

pub struct StatusOptions {
    pub job: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LastDrill {
    pub drill: String,
    pub declared_at: DateTime<Utc>,
    pub passed: bool,
    pub backup: String,
    pub rto_seconds: f64,
    pub rpo_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct JobStatus {
    pub job: String,
    pub kind: &'static str,
    pub state: State,
    /// Why the state is not OK, worst first.
    pub problems: Vec<(State, String)>,
    pub newest_backup: Option<String>,
    pub recovery_point: Option<DateTime<Utc>>,
    /// The newest backup's size before and after compression, and how long it took.
    pub newest_raw_bytes: Option<u64>,
    pub newest_stored_bytes: Option<u64>,
    pub newest_duration_seconds: Option<f64>,
    /// Physical jobs: when the newest archived WAL file was stored.
    pub newest_wal_at: Option<DateTime<Utc>>,
    /// Physical jobs: when the newest segment recovery from the newest backup reaches
    /// without a gap was stored; RPO counts from here.
    pub gap_free_wal_at: Option<DateTime<Utc>>,
    /// Physical jobs: the first segment no repository holds, when the archive goes on after
    /// it.
    pub wal_gap: Option<String>,
    /// The newest point a restore reaches: the recovery point of the newest complete backup,
    /// or, for physical jobs, the end of the WAL recovery from it replays without a gap.
    pub restorable_point: Option<DateTime<Utc>>,
    /// How much data (as time) a disaster now would lose.
    pub exposure_seconds: Option<f64>,
    pub rpo_target_seconds: f64,
    pub present_in: Vec<String>,
    pub missing_from: Vec<String>,
    pub unreachable: Vec<String>,
    pub last_drill: Option<LastDrill>,
    pub projected_rto_seconds: Option<f64>,
    pub rto_target_seconds: f64,
    /// What each repository restores the job to, judged by what it holds alone.
    pub windows: Vec<Window>,
    /// How far back the retention policy keeps backups, as time (the longest of its
    /// time-based rules); None when it keeps by count only.
    pub retention_promise_seconds: Option<f64>,
}

impl JobStatus {
    fn flag(&mut self, state: State, problem: String) {
        self.state = self.state.max(state);
        self.problems.push((state, problem));
    }
}

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub now: DateTime<Utc>,
    pub state: State,
    /// This host's clock against each repository's, where they disagree beyond
    /// `max_clock_skew`: every time this host records or compares is wrong by as much.
    pub clock_problems: Vec<String>,
    pub jobs: Vec<JobStatus>,
}

pub async fn run(config: &Config, options: &StatusOptions) -> Result<StatusReport> {
    let jobs: Vec<&JobConfig> = match &options.job {
        Some(name) => vec![config.job(name)?],
        None => config.jobs.iter().collect(),
    };
    let repositories = Repository::open_all(config).await;
    let clocks = crate::clock::read(&repositories).await;
    let clock_problems = clocks.beyond(config.max_clock_skew);
    let now = clocks.clock().now();
    let markers = crate::repository::read_markers(&repositories).await;
    let unmarked: Vec<(String, String)> = (0..repositories.len())
        .filter_map(|index| {
            markers
                .wiped(&repositories, index)
                .map(|wiped| (repositories[index].name.clone(), wiped.to_string()))
        })
        .collect();
    // A drill report that cannot be read leaves the drill columns empty, not the status.
    let drills = history(config, None)
        .await
        .map(|h| h.rows)
        .unwrap_or_default();
    let mut report = StatusReport {
        now,
        state: match clock_problems.is_empty() {
            true => State::Ok,
            false => State::Critical,
        },
        clock_problems,
        jobs: Vec::new(),
    };
    for job in jobs {
        let status = job_status(config, job, &repositories, &unmarked, &drills, now).await;
        report.state = report.state.max(status.state);
        report.jobs.push(status);
    }
    Ok(report)
}

impl JobStatus {
    /// Nothing known yet: OK until a check flags a problem.
    fn new(job: &JobConfig, config: &Config) -> JobStatus {
        JobStatus {
            job: job.name.clone(),
            kind: job.kind_name(),
            state: State::Ok,
            problems: Vec::new(),
            newest_backup: None,
            recovery_point: None,
            newest_raw_bytes: None,
            newest_stored_bytes: None,
            newest_duration_seconds: None,
            newest_wal_at: None,
            gap_free_wal_at: None,
            wal_gap: None,
            restorable_point: None,
            exposure_seconds: None,
            rpo_target_seconds: config.targets.rpo.as_secs_f64(),
            present_in: Vec::new(),
            missing_from: Vec::new(),
            unreachable: Vec::new(),
            last_drill: None,
            projected_rto_seconds: None,
            rto_target_seconds: config.targets.rto.as_secs_f64(),
            windows: Vec::new(),
            retention_promise_seconds: job
                .retention
                .as_ref()
                .and_then(|retention| retention.promise())
                .map(|promise| promise.as_secs_f64()),
        }
    }
}

async fn job_status(
    config: &Config,
    job: &JobConfig,
    repositories: &[Repository],
    unmarked: &[(String, String)],
    drills: &[HistoryRow],
    now: DateTime<Utc>,
) -> JobStatus {
    let mut status = JobStatus::new(job, config);
    let survey = inventory::survey(repositories, &job.name).await;
    status.unreachable = survey.unreachable.iter().map(|(n, _)| n.clone()).collect();
    for (name, reason) in &survey.unreachable {
        status.flag(
            State::Warning,
            format!("repository '{name}' could not be listed: {reason}"),
        );
    }
    if survey.listed.is_empty() {
        status.flag(State::Unknown, "no repository could be listed".to_string());
        return status;
    }
    judge_windows(&mut status, &survey, job).await;
    let committed = survey.committed_ids();
    for (name, why) in unmarked {
        let held = survey
            .listed
            .iter()
            .find(|(r, _)| &r.name == name)
            .map_or(0, |(_, held)| held.values().filter(|h| h.manifest).count());
        status.flag(
            State::Critical,
            format!(
                "{why}; it holds {held} of the {} backup(s) of this job the repositories hold (`lifeboat replicate --reseed` copies them back)",
                committed.len()
            ),
        );
    }
    if committed.is_empty() {
        status.flag(State::Critical, "no backup in any repository".to_string());
        return status;
    }
    let Some((newest, manifest)) = newest_complete(&survey, &job.name, &mut status).await else {
        return status;
    };
    if !status.missing_from.is_empty() {
        status.flag(
            State::Warning,
            format!(
                "newest backup {newest} is missing from {} (run `lifeboat replicate {}`)",
                status.missing_from.join(", "),
                job.name
            ),
        );
    }
    let dated = layout::parse_backup_id(&newest)
        .unwrap_or(manifest.finished_at)
        .max(manifest.finished_at)
        .max(manifest.recovery_point);
    if crate::clock::in_the_future(dated, now, config.max_clock_skew) {
        status.flag(
            State::Critical,
            format!(
                "newest backup {newest} is dated in the future ({}, now {}): host '{}' made it with a clock running fast (or a repository's clock stepped back), and it sorts as newer than every backup made since",
                dated.format("%Y-%m-%d %H:%M:%S UTC"),
                now.format("%Y-%m-%d %H:%M:%S UTC"),
                manifest.host
            ),
        );
    }
    status.newest_backup = Some(newest.clone());
    status.recovery_point = Some(manifest.recovery_point);
    status.newest_raw_bytes = Some(manifest.raw_size());
    status.newest_stored_bytes = Some(manifest.objects.iter().map(|o| o.size).sum());
    status.newest_duration_seconds = Some(
        (manifest.finished_at - manifest.started_at)
            .to_std()
            .unwrap_or_default()
            .as_secs_f64(),
    );
    let mut restorable = manifest.recovery_point;
    if matches!(&job.source, JobSource::Postgres(p) if p.mode == PostgresMode::Physical) {
        restorable = wal_reach(&survey, &job.name, &newest, &manifest, &mut status).await;
    }
    status.restorable_point = Some(restorable);
    // A WAL file stored with a clock running fast would hold the exposure at zero, and the
    // RPO alert silent, until that time came.
    if restorable > manifest.recovery_point
        && crate::clock::in_the_future(restorable, now, config.max_clock_skew)
    {
        status.flag(
            State::Critical,
            format!(
                "the newest restorable point is dated in the future ({}, now {}): WAL stored by a clock running fast (a repository's, or a host's writing into a local one); the exposure cannot be measured until it is replaced",
                restorable.format("%Y-%m-%d %H:%M:%S UTC"),
                now.format("%Y-%m-%d %H:%M:%S UTC")
            ),
        );
    }
    let exposure = (now - restorable).to_std().unwrap_or_default();
    status.exposure_seconds = Some(exposure.as_secs_f64());
    judge_against(
        &mut status,
        "RPO",
        exposure,
        config.targets.rpo,
        "newest restorable point is",
    );

    judge_drill(
        &mut status,
        drills.iter().find(|row| row.job == job.name),
        &manifest,
        config,
        now,
    );
    status
}

/// Each repository's restorable window: a gap in one is CRITICAL even while another holds
/// what it lacks, because it may be the region that survives.
async fn judge_windows(status: &mut JobStatus, survey: &Survey<'_>, job: &JobConfig) {
    for (repository, _) in &survey.listed {
        match crate::window::of_repository(repository, &job.name, job.backup_kind()).await {
            Ok((window, _)) => {
                for gap in &window.gaps {
                    status.flag(
                        State::Critical,
                        format!(
                            "{} (`lifeboat replicate {}` copies it from a repository that holds it; runbooks/archive-gap.md)",
                            gap.describe(&window.repository),
                            job.name
                        ),
                    );
                }
                for problem in &window.problems {
                    status.flag(
                        State::Warning,
                        format!("repository '{}': {problem}", window.repository),
                    );
                }
                status.windows.push(window);
            }
            Err(e) => status.flag(
                State::Unknown,
                format!(
                    "the restorable window in repository '{}' could not be read: {}",
                    repository.name,
                    e.chain().join(": ")
                ),
            ),
        }
    }
}

/// The newest backup complete in some repository, with the repositories it is complete
/// in; the newer ones that restore nowhere are flagged.
async fn newest_complete(
    survey: &Survey<'_>,
    job: &str,
    status: &mut JobStatus,
) -> Option<(String, Manifest)> {
    let committed = survey.committed_ids();
    // A backup counts from the newest one complete somewhere: one whose object is missing or
    // at the wrong size in every repository restores nowhere, and RPO is measured past it.
    let mut incomplete: Vec<String> = Vec::new();
    let mut unreadable: Vec<String> = Vec::new();
    let mut chosen = None;
    for id in committed.iter().rev() {
        let Some((manifest, _, _)) = survey.manifest(job, id).await else {
            // Damaged everywhere, or (with trusted_signers) not signed by a trusted key.
            unreadable.push(id.clone());
            continue;
        };
        let expected = inventory::object_sizes(&manifest);
        let (mut present_in, mut missing_from) = (Vec::new(), Vec::new());
        for (repository, held) in &survey.listed {
            let presence = match held.get(id) {
                Some(holding) => {
                    inventory::Survey::presence_in(
                        repository,
                        holding,
                        job,
                        id,
                        &expected,
                        Some(&manifest),
                    )
                    .await
                }
                None => Presence::Missing,
            };
            match presence {
                Presence::Complete => present_in.push(repository.name.clone()),
                _ => missing_from.push(repository.name.clone()),
            }
        }
        if present_in.is_empty() {
            incomplete.push(id.clone());
            continue;
        }
        status.present_in = present_in;
        status.missing_from = missing_from;
        chosen = Some((id.clone(), manifest));
        break;
    }
    if !incomplete.is_empty() {
        status.flag(
            State::Critical,
            format!(
                "backup(s) {} complete in no repository (an object missing or at the wrong size): they restore nowhere{}",
                incomplete.join(", "),
                match &chosen {
                    Some((id, _)) => format!("; RPO is measured from {id}, the newest backup complete somewhere"),
                    None => String::new(),
                }
            ),
        );
    }
    if !unreadable.is_empty() {
        status.flag(
            State::Critical,
            format!(
                "backup(s) {}: no repository holds a manifest that reads (damaged, or not signed by a trusted key); run `lifeboat verify {}`",
                unreadable.join(", "),
                job
            ),
        );
    }
    if chosen.is_none() {
        status.flag(
            State::Critical,
            "no backup is complete in any repository".to_string(),
        );
    }
    chosen
}

/// How far the WAL archive carries the newest backup of a physical job: the restorable
/// point, with gaps and unfollowable timelines flagged.
async fn wal_reach(
    survey: &Survey<'_>,
    job: &str,
    newest: &str,
    manifest: &Manifest,
    status: &mut JobStatus,
) -> DateTime<Utc> {
    let mut restorable = manifest.recovery_point;
    status.newest_wal_at = newest_wal(survey, job).await;
    let listed: Vec<Repository> = survey.listed.iter().map(|(r, _)| (*r).clone()).collect();
    match crate::continuity::reach_of_manifest(&listed, manifest, Default::default(), None).await {
        Ok(Some((reach, _, _))) => {
            status.gap_free_wal_at = reach.gap_free_end.as_ref().and_then(|end| end.stored_at);
            if let Some(lost) = reach.lost_range() {
                let end = reach.gap_free_end.as_ref();
                status.flag(
                    State::Critical,
                    format!(
                        "WAL archive gap: segment {} is in no repository, so recovery from {newest} stops at the end of {} (stored {}) and the WAL archived after it, {lost}, cannot be replayed",
                        reach.first_missing,
                        end.map_or("its first segment", |end| end.name.as_str()),
                        crate::continuity::describe_time(end.and_then(|end| end.stored_at))
                    ),
                );
                status.wal_gap = Some(reach.first_missing.clone());
            }
            if let Some(unfollowed) = &reach.unfollowed {
                status.flag(
                    State::Critical,
                    format!(
                        "WAL of a later timeline is archived (from {unfollowed}) but its history file, {}.history, or one before it, is in no repository: recovery cannot follow it",
                        &unfollowed[..8]
                    ),
                );
            }
            restorable = restorable.max(status.gap_free_wal_at.unwrap_or(restorable));
        }
        Ok(None) => {
            restorable = restorable.max(status.newest_wal_at.unwrap_or(restorable));
        }
        // What the archive holds contradicts the backup: that is known, not unknown.
        Err(e) if e.kind() == crate::error::ErrorKind::Verification => status.flag(
            State::Critical,
            format!(
                "the newest backup {newest} cannot be recovered along the archive: {}",
                e.chain().join(": ")
            ),
        ),
        Err(e) => status.flag(
            State::Unknown,
            format!(
                "the WAL archive's continuity could not be checked: {}",
                e.chain().join(": ")
            ),
        ),
    }
    restorable
}

/// The last drill of the job: how old, whether it passed, and the restore time it projects
/// for the newest backup.
fn judge_drill(
    status: &mut JobStatus,
    drill: Option<&HistoryRow>,
    manifest: &Manifest,
    config: &Config,
    now: DateTime<Utc>,
) {
    let Some(drill) = drill else {
        status.flag(
            State::Warning,
            "no drill on record: these backups are not proven to restore".to_string(),
        );
        return;
    };
    status.last_drill = Some(LastDrill {
        drill: drill.drill.clone(),
        declared_at: drill.declared_at,
        passed: drill.passed,
        backup: drill.backup.clone(),
        rto_seconds: drill.rto_seconds,
        rpo_seconds: drill.rpo_seconds,
    });
    let age = now - drill.declared_at;
    if !drill.passed {
        status.flag(
            State::Critical,
            format!(
                "last drill '{}' FAILED on {}",
                drill.drill,
                drill.declared_at.format("%Y-%m-%d %H:%M UTC")
            ),
        );
    } else if age > chrono::Duration::days(DRILL_MAX_AGE_DAYS) {
        status.flag(
            State::Warning,
            format!(
                "last drill '{}' is {} days old (drill at least every {DRILL_MAX_AGE_DAYS})",
                drill.drill,
                age.num_days()
            ),
        );
    }
    // A files or physical drill's rates scale the bytes apart from its fixed time; a logical
    // drill (or a report from before rates) scales its whole restore time.
    let projected = match &drill.rates {
        Some(rates) => {
            let projected = rates.project(manifest.stored_size(), manifest.raw_size());
            if projected.is_none() {
                status.flag(
                    State::Warning,
                    format!(
                        "last drill '{}' restored too little to measure a download rate: the RTO of the newest backup ({} stored) is not projected; drill a larger backup",
                        drill.drill,
                        crate::human::human_size(manifest.stored_size())
                    ),
                );
            }
            projected
        }
        None if drill.restore_seconds > 0.0 && drill.restored_bytes > 0 => {
            let rate = drill.restored_bytes as f64 / drill.restore_seconds;
            Some(drill.rto_seconds - drill.restore_seconds + manifest.raw_size() as f64 / rate)
        }
        None => None,
    };
    if let Some(projected) = projected {
        status.projected_rto_seconds = Some(projected);
        judge_against(
            status,
            "RTO",
            Duration::from_secs_f64(projected.max(0.0)),
            config.targets.rto,
            "projected restore of the newest backup takes",
        );
    }
}

/// CRITICAL past the target, WARNING past 80% of it.
fn judge_against(
    status: &mut JobStatus,
    target_name: &str,
    measured: Duration,
    target: Duration,
    what: &str,
) {
    let used = measured.as_secs_f64() / target.as_secs_f64().max(f64::MIN_POSITIVE);
    let problem = format!(
        "{what} {} against the {target_name} of {} ({:.0}% of it)",
        human_duration(measured),
        human_duration(target),
        used * 100.0
    );
    if used > 1.0 {
        status.flag(
            State::Critical,
            format!("{target_name} breached: {problem}"),
        );
    } else if used > WARN_AT {
        status.flag(State::Warning, problem);
    }
}

/// When the newest archived WAL file was stored, in any repository; paged, as WAL can be
/// long.
async fn newest_wal(survey: &inventory::Survey<'_>, job: &str) -> Option<DateTime<Utc>> {
    let prefix = layout::wal_prefix(job);
    let mut newest: Option<DateTime<Utc>> = None;
    for (repository, _) in &survey.listed {
        // A repository that cannot be listed just has no say in the newest time.
        let _ = storage::for_each_page(
            repository.store.as_ref(),
            &prefix,
            crate::wal_archive::WAL_PAGE,
            async |page: Vec<ObjectMeta>| {
                newest = newest.max(page.iter().filter_map(|o| o.last_modified).max());
            },
        )
        .await;
    }
    newest
}

impl fmt::Display for StatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let age = |at: DateTime<Utc>| human_duration((self.now - at).to_std().unwrap_or_default());
        for problem in &self.clock_problems {
            writeln!(f, "{:<8} clock: {problem}", State::Critical.label())?;
        }
        for job in &self.jobs {
            write!(f, "{:<8} {}", job.state.label(), job.job)?;
            match (&job.newest_backup, job.exposure_seconds) {
                (Some(id), Some(exposure)) => write!(
                    f,
                    ": newest {id}, exposure {} (RPO {}), in {}",
                    human_duration(Duration::from_secs_f64(exposure)),
                    human_duration(Duration::from_secs_f64(job.rpo_target_seconds)),
                    if job.present_in.is_empty() {
                        "no repository completely".to_string()
                    } else {
                        job.present_in.join(", ")
                    }
                )?,
                _ => write!(f, ": no backup")?,
            }
            if let Some(at) = job.newest_wal_at {
                write!(f, "; newest WAL {} ago", age(at))?;
            }
            if let Some(drill) = &job.last_drill {
                write!(
                    f,
                    "; drill {} {} {} ago",
                    drill.drill,
                    if drill.passed { "PASS" } else { "FAIL" },
                    age(drill.declared_at)
                )?;
            }
            if let Some(rto) = job.projected_rto_seconds {
                write!(
                    f,
                    "; projected RTO {} (target {})",
                    human_duration(Duration::from_secs_f64(rto.max(0.0))),
                    human_duration(Duration::from_secs_f64(job.rto_target_seconds))
                )?;
            }
            writeln!(f)?;
            for window in &job.windows {
                writeln!(f, "  {}", window.summary())?;
            }
            let mut problems: Vec<&(State, String)> = job.problems.iter().collect();
            problems.sort_by_key(|(state, _)| std::cmp::Reverse(*state));
            for (state, problem) in problems {
                writeln!(f, "  {}: {problem}", state.label())?;
            }
        }
        writeln!(f, "status: {}", self.state.label())
    }
}
