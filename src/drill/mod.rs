//! `lifeboat drill run FILE`: a scripted restore drill. t0 is the moment the disaster is
//! declared; each phase is timed (find the backup, start the target, restore — download,
//! verify, load — and the checks). RTO is t0 until every check passed; RPO is t0 minus the
//! newest data actually restored (the `rpo_marker` check, else the job's heartbeat row, else
//! the backup's recovery point). PASS only if every check holds and both targets are met.

mod check;
mod file;
mod history;
mod random;
mod report;

use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::{DateTime, Utc};
use tracing::Instrument;

pub use file::{Drill, DrillTarget};
pub use history::{DrillHistory, HistoryRow, history};
pub use report::{CheckResult, DrillReport, Measured, Phase, Projection};

use crate::config::{Config, JobConfig, JobSource, PostgresJob, PostgresMode};
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::Manifest;
use crate::repository::Repository;
use crate::restore::{
    self, PhysicalRestoreOptions, PostgresRestoreOptions, RecoveryTarget, RestoreOptions,
};
use crate::sources::postgres::{Binaries, Connection, ScratchCluster, ScratchDir, Target, logical};
use crate::sources::redis::ScratchRedis;
use crate::wal_relay::{ArchiveEnd, RelaySource, WalRelay};
use file::CheckKind;

pub struct DrillOptions {
    pub file: PathBuf,
    /// Where the JSON, Markdown and HTML reports are written.
    pub report_dir: PathBuf,
    /// Run the drill once per repository holding the backup, each reading from it alone.
    pub each_repository: bool,
    /// The seed of a random drill's draw: the same seed draws the same point from the same
    /// window. None: a new one.
    pub seed: Option<u64>,
}

/// Times the phases of a drill from t0.
struct Clock {
    t0: Instant,
    phases: Vec<Phase>,
}

impl Clock {
    /// The stages a restore reported, one after another from `started`.
    fn stages(&mut self, started: Instant, stages: &[(String, std::time::Duration)]) {
        let mut offset = started.duration_since(self.t0);
        for (name, took) in stages {
            self.phases.push(Phase {
                name: name.clone(),
                started_after: offset.as_secs_f64(),
                seconds: took.as_secs_f64(),
            });
            offset += *took;
        }
    }

    fn phase(&mut self, name: &str, started: Instant) {
        self.phases.push(Phase {
            name: name.to_string(),
            started_after: started.duration_since(self.t0).as_secs_f64(),
            seconds: started.elapsed().as_secs_f64(),
        });
    }
}

/// The reports of one `drill run`: one, or one per repository.
#[derive(Debug, Default, serde::Serialize)]
pub struct DrillRun {
    pub reports: Vec<DrillReport>,
    /// Why runs stopped before they could be judged (each has its FAILED report above).
    #[serde(skip)]
    stopped: Vec<Error>,
}

impl DrillRun {
    /// Ok only if every report passed. A run that stopped before it could be judged fails
    /// with what stopped it (its exit code says what kind of failure it was).
    pub fn into_outcome(self) -> Result<()> {
        let mut stopped = self.stopped.into_iter();
        if let Some(first) = stopped.next() {
            return Err(stopped.fold(first, |error, other| {
                error.with_hint(other.chain().join(": "))
            }));
        }
        self.reports.iter().try_for_each(DrillReport::outcome)
    }

    fn add(&mut self, run: std::result::Result<DrillReport, Stopped>) {
        match run {
            Ok(report) => self.reports.push(report),
            Err(Stopped { report, error }) => {
                self.reports.push(*report);
                self.stopped.push(error);
            }
        }
    }
}

impl std::fmt::Display for DrillRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.reports
            .iter()
            .try_for_each(|report| write!(f, "{report}"))
    }
}

/// A run that failed before it had anything to judge, with the FAILED report it kept.
struct Stopped {
    report: Box<DrillReport>,
    error: Error,
}

pub async fn run(config: &Config, options: &DrillOptions) -> Result<DrillRun> {
    let mut drill = Drill::load(&options.file)?;
    // A drill file that cannot work is refused before any disaster is declared: it leaves
    // no FAIL report in the repositories, which status would read as a failed drill.
    if drill.to_time.is_some() {
        let job = config.job(&drill.job)?;
        if !matches!(&job.source, JobSource::Postgres(p) if p.mode == PostgresMode::Physical) {
            return Err(Error::config(format!(
                "invalid drill file '{}': to_time: job '{}' is a {} job; only a physical job recovers to a moment",
                drill.path.display(),
                job.name,
                job.kind_name()
            )));
        }
    }
    if drill.amcheck {
        let job = config.job(&drill.job)?;
        let postgres = matches!(job.source, JobSource::Postgres(_));
        if !postgres || drill.target != DrillTarget::Scratch {
            return Err(Error::config(format!(
                "invalid drill file '{}': amcheck: only a postgres drill into a scratch cluster runs it (the amcheck extension is created in every restored database, which a server someone uses must not get)",
                drill.path.display()
            )));
        }
    }
    if random::wants_draw(&drill) {
        random::refuse_unprovable(config, &drill)?;
        drill.seed = Some(options.seed.unwrap_or_else(random::new_seed));
    }
    let mut run = DrillRun::default();
    if !options.each_repository {
        run.add(run_once(config, &drill, &options.report_dir, None).await);
        return Ok(run);
    }
    // One draw for every repository; one that fails is drawn again by the run, which fails
    // with a FAILED report saying why.
    if let Some(seed) = drill.seed {
        let job = config.job(&drill.job)?;
        match random::draw(config, &drill, job, seed).await {
            Ok((drawn, _)) => drill = drawn,
            Err(_) => {
                run.add(run_once(config, &drill, &options.report_dir, None).await);
                return Ok(run);
            }
        }
    }
    // The same backup from each repository that holds it, each on its own: one that stops
    // does not keep the others from their proof.
    let manifest = restore::find_backup(config, &drill.job, &drill.backup, None, &[]).await?;
    drill.backup = manifest.id.clone();
    for repository in &config.repositories {
        match restore::find_backup(
            config,
            &drill.job,
            &drill.backup,
            Some(&repository.name),
            &[],
        )
        .await
        {
            Ok(_) => {
                let alone = Drill {
                    from: Some(repository.name.clone()),
                    exclude: Vec::new(),
                    ..drill.clone()
                };
                run.add(
                    run_once(config, &alone, &options.report_dir, Some(&repository.name)).await,
                );
            }
            Err(e) => {
                tracing::warn!(repository = %repository.name, error = %e.chain().join(": "), "the repository does not hold the backup; no drill from it")
            }
        }
    }
    Ok(run)
}

/// One drill run; its log lines carry the drill and the job.
async fn run_once(
    config: &Config,
    drill: &Drill,
    report_dir: &Path,
    only_from: Option<&str>,
) -> std::result::Result<DrillReport, Stopped> {
    let span = tracing::info_span!("drill", drill = %drill.name, job = %drill.job);
    run_drill(config, drill, report_dir, only_from)
        .instrument(span)
        .await
}

/// Runs the drill; one that fails before it has anything to judge (no backup, a target
/// that refuses, a restore that fails) still leaves a FAILED report saying why, kept like
/// any other, and then fails.
async fn run_drill(
    config: &Config,
    drill: &Drill,
    report_dir: &Path,
    only_from: Option<&str>,
) -> std::result::Result<DrillReport, Stopped> {
    let declared_at = Utc::now();
    let started = Instant::now();
    // What the attempt got to before it failed goes into the FAILED report.
    let mut clock = Clock {
        t0: started,
        phases: Vec::new(),
    };
    let mut found = None;
    let err =
        match attempt_drill(config, drill, report_dir, only_from, &mut clock, &mut found).await {
            Ok(report) => return Ok(report),
            Err(e) => e,
        };
    // An interrupted drill ends as interrupted; there is nothing to judge.
    crate::interrupt::end_if_interrupted().await;
    let secrets = configured_secrets(config);
    let why = report::kept_text(&err.chain().join(": "), &secrets);
    let mut report = DrillReport {
        run_id: DrillReport::new_run_id(declared_at),
        drill: drill.name.clone(),
        description: drill
            .description
            .as_deref()
            .map(|d| report::kept_text(d, &secrets)),
        runbook: drill.runbook.clone(),
        file: drill.path.display().to_string(),
        job: drill.job.clone(),
        kind: found.as_ref().map(|m| m.kind.clone()).unwrap_or_else(|| {
            config
                .job(&drill.job)
                .map(|job| job.kind_name().to_string())
                .unwrap_or_default()
        }),
        backup: found
            .as_ref()
            .map(|m| m.id.clone())
            .unwrap_or_else(|| drill.backup.clone()),
        repositories: Vec::new(),
        target: match clock.phases.last() {
            None => "none: the drill stopped before it restored".to_string(),
            Some(phase) => format!(
                "none: the drill stopped after its phase '{}' (see failure)",
                phase.name
            ),
        },
        declared_at,
        finished_at: Utc::now(),
        // Nothing was recovered that could be judged: the RTO was not met, whatever the time.
        rto: Measured {
            met: false,
            ..Measured::new(drill.rto, started.elapsed())
        },
        rpo: Measured {
            target_seconds: drill.rpo.as_secs_f64(),
            measured_seconds: 0.0,
            met: false,
        },
        rpo_marker: declared_at,
        rpo_marker_source: "none: nothing was restored".to_string(),
        phases: std::mem::take(&mut clock.phases),
        checks: Vec::new(),
        restored_bytes: 0,
        restore_seconds: 0.0,
        projection: None,
        stored_bytes: found.as_ref().map(Manifest::stored_size).unwrap_or(0),
        server_version: found.as_ref().and_then(|m| m.source.server_version.clone()),
        lifeboat_version: env!("CARGO_PKG_VERSION").to_string(),
        host: crate::host::name(),
        passed: false,
        only_from: only_from.map(str::to_string),
        written: Vec::new(),
        stored_in: Vec::new(),
        warnings: Vec::new(),
        failure: Some(why),
        random: drill.drawn.clone(),
    };
    store_everywhere(config, &mut report).await;
    if let Err(e) = report.write(report_dir) {
        tracing::warn!(error = %e.chain().join(": "), "unable to write the failed drill's report");
    }
    let error = err.with_hint(format!(
        "the FAILED report: {}",
        report.written.first().cloned().unwrap_or_default()
    ));
    Err(Stopped {
        report: Box::new(report),
        error,
    })
}

async fn attempt_drill(
    config: &Config,
    drill: &Drill,
    report_dir: &Path,
    only_from: Option<&str>,
    clock: &mut Clock,
    found: &mut Option<Manifest>,
) -> Result<DrillReport> {
    let job = config.job(&drill.job).map_err(|e| {
        Error::config(format!(
            "invalid drill file '{}': job: {}",
            drill.path.display(),
            e.message()
        ))
    })?;
    // Drawn before the disaster is declared: the draw is no part of the RTO. One that
    // cannot be made (no window, no room in it) fails the drill like a missing backup.
    let drawn;
    let drill = match (drill.seed, &drill.drawn) {
        (Some(seed), None) => {
            drawn = random::draw(config, drill, job, seed).await?.0;
            &drawn
        }
        _ => drill,
    };
    if let Some(draw) = &drill.drawn {
        tracing::info!(drill = %drill.name, "{}", draw.describe());
    }
    let warnings = heartbeat_before_t0(job).await;
    let declared_at = Utc::now();
    clock.t0 = Instant::now();
    tracing::info!(drill = %drill.name, job = %drill.job, "drill started");

    let started = Instant::now();
    let manifest = restore::find_backup(
        config,
        &job.name,
        &drill.backup,
        drill.from.as_deref(),
        &drill.exclude,
    )
    .await?;
    clock.phase("find backup", started);
    *found = Some(manifest.clone());

    let outcome = restore_and_check(config, drill, job, &manifest, clock).await?;
    let rto = clock.t0.elapsed();
    let projection = project(config, &job.name, &manifest, &outcome, rto, drill.rto).await;

    let marked = outcome.marker.is_some();
    let (rpo_marker, marker_source) = match outcome.marker {
        Some((at, source)) => (at, source),
        None => (
            manifest.recovery_point,
            "the backup's recovery_point".to_string(),
        ),
    };
    let rpo = (outcome.rpo_to.unwrap_or(declared_at) - rpo_marker)
        .to_std()
        .unwrap_or_default();
    let mut checks = outcome.checks;
    // A recovery to a moment proves that moment only if nothing written after it came
    // back: the newest data must be at or before it (and within the RPO of it, above).
    if let Some(to) = outcome.rpo_to.filter(|_| !marked && drill.drawn.is_some()) {
        checks.push(CheckResult {
            name: "recovered to the moment, not past it".to_string(),
            passed: false,
            expected: format!(
                "the heartbeat row or an rpo_marker check at or before {}",
                to.format("%Y-%m-%d %H:%M:%S%.6f UTC")
            ),
            returned: "neither was restored: where recovery stopped is unknown".to_string(),
        });
    }
    if let Some(to) = outcome.rpo_to.filter(|_| marked) {
        checks.push(CheckResult {
            name: "recovered to the moment, not past it".to_string(),
            passed: rpo_marker <= to,
            expected: format!(
                "{marker_source} at or before {}",
                to.format("%Y-%m-%d %H:%M:%S%.6f UTC")
            ),
            returned: rpo_marker.format("%Y-%m-%d %H:%M:%S%.6f UTC").to_string(),
        });
    }
    let checks_pass = checks.iter().all(|c| c.passed);
    let secrets = configured_secrets(config);
    let report = DrillReport {
        run_id: DrillReport::new_run_id(declared_at),
        drill: drill.name.clone(),
        description: drill
            .description
            .as_deref()
            .map(|d| report::kept_text(d, &secrets)),
        runbook: drill.runbook.clone(),
        file: drill.path.display().to_string(),
        job: job.name.clone(),
        kind: manifest.kind.clone(),
        backup: manifest.id.clone(),
        repositories: outcome.repositories,
        target: outcome.target,
        declared_at,
        finished_at: Utc::now(),
        rto: Measured::new(drill.rto, rto),
        rpo: Measured::new(drill.rpo, rpo),
        rpo_marker,
        rpo_marker_source: marker_source,
        phases: std::mem::take(&mut clock.phases),
        checks: checks
            .into_iter()
            .map(|check| check.kept(&secrets))
            .collect(),
        restored_bytes: manifest.raw_size(),
        restore_seconds: outcome.restore_seconds,
        projection,
        stored_bytes: manifest.stored_size(),
        server_version: manifest.source.server_version.clone(),
        lifeboat_version: env!("CARGO_PKG_VERSION").to_string(),
        host: crate::host::name(),
        passed: false,
        only_from: only_from.map(str::to_string),
        written: Vec::new(),
        stored_in: Vec::new(),
        warnings,
        failure: None,
        random: drill.drawn.clone(),
    };
    let mut report = report.judged(checks_pass);
    report.warnings.extend(outcome.warnings);
    store_everywhere(config, &mut report).await;
    report.write(report_dir)?;
    Ok(report)
}

/// The newest heartbeat the archive delivers is the real data loss of the WAL pipeline at
/// t0: a physical job's drill writes one now, as the minutely timer would. What failed is a
/// warning for the report.
async fn heartbeat_before_t0(job: &JobConfig) -> Vec<String> {
    let mut warnings = Vec::new();
    if let JobSource::Postgres(postgres) = &job.source
        && postgres.mode == PostgresMode::Physical
        && postgres.heartbeat
    {
        let written =
            match Connection::from_settings(&format!("job '{}'", job.name), &postgres.connection) {
                Ok(server) => logical::write_heartbeat(&server, &job.name)
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            };
        if let Err(e) = written {
            warnings.push(format!(
                "unable to write a heartbeat to the source before t0: {}",
                e.chain().join(": ")
            ));
        }
    }
    warnings
}

/// Restores the backup the way its job's kind restores, and runs the drill's checks.
async fn restore_and_check(
    config: &Config,
    drill: &Drill,
    job: &JobConfig,
    manifest: &Manifest,
    clock: &mut Clock,
) -> Result<Outcome> {
    Ok(match &job.source {
        JobSource::Postgres(postgres) if postgres.mode == PostgresMode::Physical => {
            run_physical(config, drill, manifest, postgres, clock).await?
        }
        JobSource::Postgres(postgres) => {
            run_postgres(
                config,
                drill,
                manifest,
                postgres.bin_dir.as_deref(),
                postgres.heartbeat,
                clock,
            )
            .await?
        }
        JobSource::Files(_) => run_files(config, drill, clock).await?,
        JobSource::Redis(redis) => {
            run_redis(config, drill, manifest, redis.heartbeat, clock).await?
        }
    })
}

/// The secrets lifeboat was given, to keep out of reports: the passwords in the environment
/// and in every password file the config names, and the storage credentials.
fn configured_secrets(config: &Config) -> Vec<String> {
    let mut secrets: Vec<String> = [
        "PGPASSWORD",
        "REDISCLI_AUTH",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ]
    .iter()
    .filter_map(|name| std::env::var(name).ok())
    .collect();
    let mut files = Vec::new();
    for job in &config.jobs {
        match &job.source {
            JobSource::Postgres(postgres) => {
                files.extend(postgres.connection.password_file.clone())
            }
            JobSource::Redis(redis) => files.extend(redis.password_file.clone()),
            JobSource::Files(_) => {}
        }
    }
    if let Some(lock) = &config.shared_lock {
        files.extend(lock.password_file.clone());
    }
    secrets.extend(
        files
            .iter()
            .filter_map(|file| crate::sources::read_password_file(file).ok()),
    );
    secrets.retain(|s| !s.trim().is_empty());
    secrets
}

/// What the measured restore means for a full restore of the job's newest backup: a drill
/// on an old or small backup still says whether production would meet the RTO. A files or
/// physical restore measured its download and unpacking apart from the rest, and the model
/// scales only those (see `rto_model`); a logical one scales its whole restore time.
async fn project(
    config: &Config,
    job: &str,
    restored: &Manifest,
    outcome: &Outcome,
    rto: std::time::Duration,
    target: std::time::Duration,
) -> Option<Projection> {
    let restore_seconds = outcome.restore_seconds;
    if restore_seconds <= 0.0 || restored.raw_size() == 0 {
        return None;
    }
    let rate = restored.raw_size() as f64 / restore_seconds;
    let newest = restore::find_backup(config, job, "latest", None, &[])
        .await
        .ok()?;
    let rates = outcome.transfer.as_ref().map(|transfer| {
        let read_ahead = outcome
            .repositories
            .first()
            .and_then(|name| config.repositories.iter().find(|r| &r.name == name))
            .map(restore::read_ahead)
            .unwrap_or(crate::storage::ReadAhead {
                streams: 1,
                range_bytes: 0,
            });
        crate::rto_model::RestoreRates::measured(
            rto.as_secs_f64(),
            transfer,
            read_ahead.streams,
            read_ahead.range_bytes,
        )
    });
    let rto_seconds = match &rates {
        Some(rates) => rates.project(newest.stored_size(), newest.raw_size())?,
        None => rto.as_secs_f64() - restore_seconds + newest.raw_size() as f64 / rate,
    };
    Some(Projection {
        raw_bytes: newest.raw_size(),
        stored_bytes: newest.stored_size(),
        backup: newest.id,
        bytes_per_second: rate,
        rto_seconds,
        meets_target: rto_seconds <= target.as_secs_f64(),
        rates,
    })
}

/// Keeps the report with the backups, in every repository: a failure is a warning in the
/// report, not a failed drill.
async fn store_everywhere(config: &Config, report: &mut DrillReport) {
    let key = crate::layout::drill_report_key(&report.drill, &report.report_id());
    let body =
        bytes::Bytes::from(serde_json::to_vec_pretty(&*report).expect("the report serializes"));
    // Signed where this host holds a signing key (a drill host usually does not: reports
    // are not required to be signed).
    let signature = match config.signing.signer() {
        Ok(Some(signer)) => signer.sign(&body, &key).ok().map(bytes::Bytes::from),
        _ => None,
    };
    for repository in Repository::open_all(config).await {
        if let Some(signature) = &signature {
            let _ = crate::storage::put_bytes(
                repository.store.as_ref(),
                &crate::signing::signature_key(&key),
                signature.clone(),
            )
            .await;
        }
        // Run ids differ per run; created only if absent all the same, so that no report
        // ever replaces another.
        match repository.store.create_if_absent(&key, body.clone()).await {
            Ok(()) => report.stored_in.push(repository.name.clone()),
            Err(e) => report.warnings.push(
                repository
                    .error(&format!("store the drill report '{key}'"), e)
                    .chain()
                    .join(": "),
            ),
        }
    }
}

/// What restoring and checking produced.
struct Outcome {
    repositories: Vec<String>,
    /// A files or physical restore's download and unpacking, measured.
    transfer: Option<crate::rto_model::Transfer>,
    /// Seconds the restore itself took (download, verify, load).
    restore_seconds: f64,
    target: String,
    checks: Vec<CheckResult>,
    /// The newest data restored, and how it was found.
    marker: Option<(DateTime<Utc>, String)>,
    /// What the RPO is measured to: the moment a `to_time` drill recovered to (data after
    /// it was not asked for), else the disaster's declaration.
    rpo_to: Option<DateTime<Utc>>,
    warnings: Vec<String>,
}

async fn run_postgres(
    config: &Config,
    drill: &Drill,
    manifest: &Manifest,
    bin_dir: Option<&Path>,
    heartbeat: bool,
    clock: &mut Clock,
) -> Result<Outcome> {
    let started = Instant::now();
    let mut warnings = Vec::new();
    let (mut scratch, dsn) = match &drill.target {
        DrillTarget::Scratch => {
            let binaries = Binaries::find(bin_dir, manifest.server_major().unwrap_or(0))?;
            let cluster = ScratchCluster::start(&binaries).await?;
            let dsn = cluster.dsn("postgres");
            (Some((cluster, binaries)), dsn)
        }
        DrillTarget::Dsn(dsn) => {
            warnings.extend(refuse_the_source(drill, manifest, dsn).await?);
            refuse_existing_databases(drill, manifest, dsn).await?;
            (None, dsn.clone())
        }
    };
    clock.phase("start target", started);

    let started = Instant::now();
    let restored = restore::run(
        config,
        &RestoreOptions {
            postgres: PostgresRestoreOptions {
                target: Some(dsn.clone()),
                database: drill.database.clone(),
                jobs: 2,
                globals: scratch.is_some(),
                ..PostgresRestoreOptions::default()
            },
            ..restore_options(drill, &manifest.id)
        },
    )
    .await?;
    clock.stages(started, &restored.stages);
    warnings.extend(restored.passed_over.iter().cloned());

    let started = Instant::now();
    let default_database = drill
        .database
        .clone()
        .or_else(|| {
            manifest
                .source
                .databases
                .iter()
                .find(|d| *d != "postgres")
                .cloned()
        })
        .unwrap_or_else(|| "postgres".to_string());
    // On a scratch cluster the checks run as a role that reads everything and is no
    // superuser; on a DSN target, as the drill's own user.
    let mut amchecked = Vec::new();
    let check_dsn = match scratch.as_mut() {
        Some((cluster, binaries)) => {
            warnings.extend(cluster.add_reader().await?);
            amchecked = amcheck_phase(drill, cluster, binaries, clock).await?;
            cluster.check_dsn("postgres")
        }
        None => dsn.clone(),
    };
    // The amcheck phase is timed on its own; the checks' starts after it.
    let started = if drill.amcheck {
        Instant::now()
    } else {
        started
    };
    let checked = sql_checks(drill, &check_dsn, &default_database, heartbeat, None)
        .await
        .map(|(mut checks, marker)| {
            checks.extend(amchecked);
            (checks, marker)
        });
    clock.phase("checks", started);
    drop(scratch);
    if let DrillTarget::Dsn(_) = &drill.target {
        let restored_databases: Vec<String> = manifest
            .objects
            .iter()
            .filter_map(|o| o.database.clone())
            .filter(|d| drill.database.as_ref().is_none_or(|wanted| wanted == d))
            .collect();
        for database in restored_databases {
            if !restored.created_databases.contains(&database) {
                warnings.push(format!(
                    "restored into the existing database '{database}' on the target, which the drill did not create and leaves as it is now"
                ));
            }
        }
        if drill.keep {
            if !restored.created_databases.is_empty() {
                warnings.push(format!(
                    "kept the restored database(s) {} on the target (keep = true): drop them when done",
                    restored.created_databases.join(", ")
                ));
            }
        } else {
            warnings.extend(drop_restored(&dsn, &restored.created_databases).await);
        }
    }
    let (checks, marker) = checked?;
    Ok(Outcome {
        transfer: restored.transfer.clone(),
        restore_seconds: restored.stages.iter().map(|(_, d)| d.as_secs_f64()).sum(),
        repositories: restored.repositories,
        target: match &drill.target {
            DrillTarget::Scratch => "a scratch PostgreSQL cluster (removed after the drill)".into(),
            DrillTarget::Dsn(_) => restored.target,
        },
        checks,
        marker,
        rpo_to: None,
        warnings,
    })
}

/// Refuses a drill whose DSN target is the job's own source server: a drill restores into a
/// throw-away target, and its checks and its cleanup must never reach production. Told by
/// the system identifier the backup recorded; a target that will not say its own is
/// restored into, since a fresh server that is not the source is the common case.
async fn refuse_the_source(
    drill: &Drill,
    manifest: &Manifest,
    dsn: &str,
) -> Result<Option<String>> {
    let cannot_tell = |why: &str| {
        Some(format!(
            "could not tell whether the target is the job's own source server: {why}"
        ))
    };
    let Some(source) = &manifest.source.system_identifier else {
        return Ok(cannot_tell("the backup recorded no system identifier"));
    };
    let target = Target::open(&Connection::from_dsn(dsn)?).await?;
    let Some(identifier) = target.system_identifier().await else {
        return Ok(cannot_tell(
            "the drill's role may not read pg_control_system() on the target",
        ));
    };
    if &identifier == source {
        return Err(Error::config(format!(
            "invalid drill file '{}': target: it is the job's own source server (system identifier {source}); a drill restores into a throw-away server",
            drill.path.display()
        ))
        .with_hint("leave target out to restore into a scratch cluster, or name a server that is not the source"));
    }
    Ok(None)
}

/// Refuses a DSN target that already has a database the drill would restore, empty or
/// not: a drill creates what it restores and drops it again, and never replaces or drops
/// what was there (the restore's own advice, `--as` and `--clean`, is no drill setting).
async fn refuse_existing_databases(drill: &Drill, manifest: &Manifest, dsn: &str) -> Result<()> {
    let target = Target::open(&Connection::from_dsn(dsn)?).await?;
    let databases = manifest
        .objects
        .iter()
        .filter_map(|o| o.database.as_deref())
        .filter(|d| drill.database.as_deref().is_none_or(|wanted| wanted == *d));
    for database in databases {
        if target.database_exists(database).await? {
            return Err(Error::new(
                ErrorKind::Target,
                format!(
                    "unable to run drill '{}' (drill file '{}'): on its target, database '{database}' exists already, and a drill restores only into databases it creates (and drops again)",
                    drill.name,
                    drill.path.display()
                ),
            )
            .with_hint(format!(
                "drop '{database}' on that server first, name a server without it, or leave target out to restore into a scratch cluster"
            )));
        }
    }
    Ok(())
}

/// Drops the databases a drill restored into its DSN target, now that it has ended; says
/// what it dropped, or what it could not.
async fn drop_restored(dsn: &str, databases: &[String]) -> Vec<String> {
    if databases.is_empty() {
        return Vec::new();
    }
    let target = match Connection::from_dsn(dsn) {
        Ok(server) => Target::open(&server).await,
        Err(e) => Err(e),
    };
    let mut said = Vec::new();
    for database in databases {
        let dropped = match &target {
            Ok(target) => target.drop_database(database).await,
            Err(e) => Err(Error::new(e.kind(), e.chain().join(": "))),
        };
        said.push(match dropped {
            Ok(()) => format!("dropped the restored database '{database}' from the target"),
            Err(e) => format!(
                "unable to drop the restored database '{database}' from the target: {}; drop it by hand",
                e.chain().join(": ")
            ),
        });
    }
    said
}

/// `amcheck = true`: pg_amcheck over every restored database, as its own timed phase; each
/// corrupt relation it names is a failed check.
async fn amcheck_phase(
    drill: &Drill,
    cluster: &ScratchCluster,
    binaries: &Binaries,
    clock: &mut Clock,
) -> Result<Vec<CheckResult>> {
    if !drill.amcheck {
        return Ok(Vec::new());
    }
    let started = Instant::now();
    let findings = cluster.amcheck(binaries).await?;
    clock.phase("amcheck", started);
    let expected = "no corruption (pg_amcheck --heapallindexed)".to_string();
    if findings.is_empty() {
        return Ok(vec![CheckResult {
            name: "amcheck".to_string(),
            passed: true,
            expected,
            returned: "no corruption in any database".to_string(),
        }]);
    }
    Ok(findings
        .into_iter()
        .map(|finding| CheckResult {
            name: "amcheck".to_string(),
            passed: false,
            expected: expected.clone(),
            returned: finding,
        })
        .collect())
}

/// Runs a postgres drill's SQL checks against `dsn`; also finds the RPO marker: the check
/// marked as one, else (with `heartbeat`) the job's heartbeat row.
async fn sql_checks(
    drill: &Drill,
    dsn: &str,
    default_database: &str,
    heartbeat: bool,
    recovery_target: Option<DateTime<Utc>>,
) -> Result<(Vec<CheckResult>, Option<(DateTime<Utc>, String)>)> {
    let server = Connection::from_dsn(dsn)?;
    let mut checks = Vec::new();
    let mut marker = None;
    for check in &drill.checks {
        let CheckKind::Sql {
            sql,
            database,
            expect,
            rpo_marker,
        } = &check.kind
        else {
            checks.push(CheckResult::failed(
                check,
                "a path check in a postgres drill".into(),
            ));
            continue;
        };
        let database = database.as_deref().unwrap_or(default_database);
        let sql = match recovery_target {
            Some(at) => sql.replace(
                file::RECOVERY_TARGET_PLACEHOLDER,
                &at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            ),
            None => sql.clone(),
        };
        // The check's own names are the restored database's: its search_path.
        let value =
            match Target::open(&server.with_database(database).with_users_search_path()).await {
                Ok(target) => target.first_value(&sql).await,
                Err(e) => Err(e),
            };
        checks.push(judge(
            check,
            expect,
            *rpo_marker,
            value,
            "NULL (no row)",
            &mut marker,
        ));
    }
    if marker.is_none() && heartbeat {
        let sql = format!(
            "select at from lifeboat.heartbeat where job = '{}'",
            drill.job.replace('\'', "''")
        );
        if let Ok(target) = Target::open(&server.with_database(default_database)).await
            && let Ok(Some(at)) = target.first_value(&sql).await
            && let Some(at) = parse_timestamp(&at)
        {
            marker = Some((at, format!("the heartbeat row in '{default_database}'")));
        }
    }
    Ok((checks, marker))
}

/// A physical drill: the base backup restored into a scratch data directory, WAL replayed
/// from the archive to its end, then the checks. Replay is its own phase: it is most of a
/// physical restore's RTO.
async fn run_physical(
    config: &Config,
    drill: &Drill,
    manifest: &Manifest,
    job: &PostgresJob,
    clock: &mut Clock,
) -> Result<Outcome> {
    if drill.to_time == Some(file::DrillTime::Random) {
        return Err(Error::new(
            ErrorKind::Usage,
            format!(
                "drill '{}': to_time = \"random\" reached the restore without a moment drawn",
                drill.name
            ),
        ));
    }
    if drill.target != DrillTarget::Scratch {
        return Err(Error::config(format!(
            "invalid drill file '{}': target: a physical backup restores into a scratch cluster only; leave target out",
            drill.path.display()
        )));
    }
    let server = Connection::from_settings(&format!("job '{}'", drill.job), &job.connection)?;
    let binaries = Binaries::find(job.bin_dir.as_deref(), manifest.server_major().unwrap_or(0))?;
    let scratch = ScratchDir::create()?;
    // The scratch server replays WAL through lifeboat: the credentials stay here.
    let relay = WalRelay::bind(scratch.path(), scratch.owner())?;
    let recovery_target = drill
        .to_time
        .as_ref()
        .and_then(|to| to.resolve(manifest.recovery_point));
    let started = Instant::now();
    let restored = restore::run(
        config,
        &RestoreOptions {
            physical: Some(scratch_recovery(&scratch, &relay, recovery_target)),
            ..restore_options(drill, &manifest.id)
        },
    )
    .await?;
    clock.stages(started, &restored.stages);

    let relay_source = relay_source(drill, manifest, restored.archive_end.as_ref());
    let started = Instant::now();
    // The relay serves until the server has promoted: nothing after that (a check least of
    // all) fetches WAL.
    let mut cluster = tokio::select! {
        started = ScratchCluster::start_restored(scratch, &binaries, server.user()) => started?,
        never = relay.serve(config, &relay_source) => match never {},
    };
    let relayed = relay.take_log();
    drop(relay);
    let replay = started.elapsed();
    clock.phase("WAL replay", started);
    // Where replay ended, against the archive as listed: a segment that did not decode or
    // could not be read reads as the end of WAL to PostgreSQL, which then promotes.
    let log = cluster.dir().join("postgres.log");
    let replayed = restore::stopped_where(
        restore::redo_done_at(&std::fs::read_to_string(&log).unwrap_or_default()),
        restored.archive_end.as_ref(),
        manifest,
        &cluster.dir().join("data"),
        &log,
    )
    .map_err(|e| {
        relayed
            .warnings
            .iter()
            .fold(e, |e, warning| e.with_hint(warning.clone()))
    })?;
    let mut warnings = restored.passed_over.clone();
    warnings.extend(relayed.warnings);
    warnings.extend(cluster.add_reader().await?);
    let amchecked = amcheck_phase(drill, &cluster, &binaries, clock).await?;

    let started = Instant::now();
    let default_database = drill
        .database
        .clone()
        .unwrap_or_else(|| server.database().to_string());
    let (mut checks, marker) = sql_checks(
        drill,
        &cluster.check_dsn("postgres"),
        &default_database,
        job.heartbeat,
        recovery_target,
    )
    .await?;
    clock.phase("checks", started);
    checks.extend(amchecked);
    drop(cluster);
    let mut repositories = restored.repositories;
    for repository in relayed.repositories {
        if !repositories.contains(&repository) {
            repositories.push(repository);
        }
    }
    Ok(Outcome {
        transfer: restored.transfer.clone(),
        restore_seconds: restored
            .stages
            .iter()
            .map(|(_, d)| d.as_secs_f64())
            .sum::<f64>()
            + replay.as_secs_f64(),
        repositories,
        target: match recovery_target {
            Some(at) => format!(
                "a scratch PostgreSQL cluster recovered to {}, {replayed} (removed after the drill)",
                at.format("%Y-%m-%d %H:%M:%S%.6f UTC")
            ),
            None => format!(
                "a scratch PostgreSQL cluster recovered to the end of the WAL archive as listed at the start, {replayed} (removed after the drill)"
            ),
        },
        checks,
        marker,
        rpo_to: recovery_target,
        warnings,
    })
}

/// What the drill's relay serves the scratch server: this drill's repositories and keys,
/// up to the end of the archive the restore planned to reach.
fn relay_source(
    drill: &Drill,
    manifest: &Manifest,
    archive_end: Option<&crate::continuity::Point>,
) -> RelaySource {
    RelaySource {
        job: Some(drill.job.clone()),
        from: drill.from.clone(),
        exclude: drill.exclude.clone(),
        identity_file: drill.identity_file.clone(),
        archive_end: archive_end.and_then(|end| {
            Some(ArchiveEnd {
                name: end.name.clone(),
                segment: end.segment,
                timeline: crate::wal::WalFile::parse(&end.name)?.timeline,
                segment_size: manifest.source.wal_segment_size?,
            })
        }),
    }
}

/// A physical restore into the scratch directory, fetching WAL through the drill's relay,
/// to `recovery_target` or the end of the archive; the drill starts the server itself.
fn scratch_recovery(
    scratch: &ScratchDir,
    relay: &WalRelay,
    recovery_target: Option<DateTime<Utc>>,
) -> PhysicalRestoreOptions {
    PhysicalRestoreOptions {
        data_dir: scratch.data_dir(),
        target: match recovery_target {
            Some(at) => RecoveryTarget::Time(at),
            None => RecoveryTarget::EndOfArchive,
        },
        start: false,
        port: None,
        keep_archiving: false,
        accept_gap: false,
        timeline: Default::default(),
        from: None,
        exclude: Vec::new(),
        bin_dir: None,
        wal_relay: Some(relay.socket().to_path_buf()),
    }
}

/// A Redis drill: the RDB restored and loaded into a scratch redis-server on loopback,
/// then the checks; RPO from the heartbeat key when the job writes one.
async fn run_redis(
    config: &Config,
    drill: &Drill,
    manifest: &Manifest,
    heartbeat: bool,
    clock: &mut Clock,
) -> Result<Outcome> {
    if drill.target != DrillTarget::Scratch {
        return Err(Error::config(format!(
            "invalid drill file '{}': target: a Redis backup restores into a scratch redis-server only; leave target out",
            drill.path.display()
        )));
    }
    let (dir, rdb) = ScratchRedis::prepare()?;
    let started = Instant::now();
    let restored = restore::run(
        config,
        &RestoreOptions {
            into: Some(rdb),
            ..restore_options(drill, &manifest.id)
        },
    )
    .await?;
    clock.stages(started, &restored.stages);
    let started = Instant::now();
    let scratch = ScratchRedis::start(dir).await?;
    let load = started.elapsed();
    clock.phase("load into redis-server", started);

    let started = Instant::now();
    let server = scratch.server();
    let mut checks = Vec::new();
    let mut marker = None;
    for check in &drill.checks {
        let CheckKind::Redis {
            command,
            expect,
            rpo_marker,
        } = &check.kind
        else {
            checks.push(CheckResult::failed(
                check,
                "an SQL or path check in a Redis drill".into(),
            ));
            continue;
        };
        let value = server.query(command).await;
        checks.push(judge(check, expect, *rpo_marker, value, "nil", &mut marker));
    }
    if marker.is_none() && heartbeat {
        let key = crate::sources::redis::heartbeat_key(&drill.job);
        if let Ok(Some(at)) = server.query(&["GET".to_string(), key.clone()]).await
            && let Some(at) = parse_timestamp(&at)
        {
            marker = Some((at, format!("the heartbeat key '{key}'")));
        }
    }
    clock.phase("checks", started);
    drop(scratch);
    Ok(Outcome {
        transfer: restored.transfer.clone(),
        restore_seconds: restored
            .stages
            .iter()
            .map(|(_, d)| d.as_secs_f64())
            .sum::<f64>()
            + load.as_secs_f64(),
        repositories: restored.repositories,
        target: "a scratch redis-server on loopback (removed after the drill)".into(),
        checks,
        marker,
        rpo_to: None,
        warnings: restored.passed_over,
    })
}

async fn run_files(config: &Config, drill: &Drill, clock: &mut Clock) -> Result<Outcome> {
    let scratch = crate::interrupt::make_dir_removed_on_interrupt(
        || tempfile::Builder::new().prefix("lifeboat-drill-").tempdir(),
        |dir| dir.path().to_path_buf(),
    )
    .map_err(|e| {
        Error::new(ErrorKind::Target, "unable to create a scratch directory").with_source(e)
    })?;
    let into = scratch.path().join("restored");
    let started = Instant::now();
    let restored = restore::run(
        config,
        &RestoreOptions {
            into: Some(into.clone()),
            ..restore_options(drill, &drill.backup)
        },
    )
    .await?;
    clock.stages(started, &restored.stages);
    let started = Instant::now();
    let mut checks = Vec::new();
    for check in &drill.checks {
        let CheckKind::Path { path, expect } = &check.kind else {
            checks.push(CheckResult::failed(
                check,
                "an SQL check in a files drill".into(),
            ));
            continue;
        };
        let (passed, returned) = expect.check(&into, path);
        checks.push(CheckResult {
            name: check.name.clone(),
            passed,
            expected: format!("{} {expect}", path.display()),
            returned,
        });
    }
    clock.phase("checks", started);
    crate::interrupt::forget(scratch.path());
    Ok(Outcome {
        transfer: restored.transfer.clone(),
        restore_seconds: restored.stages.iter().map(|(_, d)| d.as_secs_f64()).sum(),
        repositories: restored.repositories,
        target: "a scratch directory (removed after the drill)".into(),
        checks,
        marker: None,
        rpo_to: None,
        warnings: restored.passed_over,
    })
}

/// The result of a query check: passed if `expect` holds for what came back (`absent` names
/// no value); a check marked `rpo_marker` also sets the marker from its timestamp.
fn judge(
    check: &file::Check,
    expect: &check::Expectation,
    rpo_marker: bool,
    value: Result<Option<String>>,
    absent: &str,
    marker: &mut Option<(DateTime<Utc>, String)>,
) -> CheckResult {
    let value = match value {
        Ok(value) => value,
        Err(e) => return CheckResult::failed(check, e.chain().join(": ")),
    };
    if rpo_marker {
        *marker = value
            .as_deref()
            .and_then(parse_timestamp)
            .map(|at| (at, format!("check '{}'", check.name)));
    }
    CheckResult {
        name: check.name.clone(),
        passed: expect.holds(value.as_deref()),
        expected: expect.to_string(),
        returned: value.unwrap_or_else(|| absent.to_string()),
    }
}

/// Restore options that read `backup` the way the drill says (`from`, `exclude`); the
/// kind's own options are left at their defaults for the caller to set.
fn restore_options(drill: &Drill, backup: &str) -> RestoreOptions {
    RestoreOptions {
        job: drill.job.clone(),
        backup: backup.to_string(),
        from: drill.from.clone(),
        exclude: drill.exclude.clone(),
        into: None,
        postgres: PostgresRestoreOptions::default(),
        physical: None,
        start_scratch: false,
        identity_file: drill.identity_file.clone(),
    }
}

/// A timestamp as PostgreSQL prints one (`2026-11-26 03:00:00.123+00`), or RFC 3339.
fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    DateTime::parse_from_rfc3339(text)
        .ok()
        .or_else(|| DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z").ok())
        .map(|at| at.to_utc())
}

#[cfg(test)]
mod tests {
    #[test]
    fn postgres_timestamps_parse() {
        let at = super::parse_timestamp("2026-11-26 03:00:00.25+00").unwrap();
        assert_eq!(at.to_rfc3339(), "2026-11-26T03:00:00.250+00:00");
        assert!(super::parse_timestamp("2026-11-26 04:00:00+01").is_some());
        assert!(super::parse_timestamp("2026-11-26T03:00:00Z").is_some());
        assert!(super::parse_timestamp("yesterday").is_none());
    }
}
