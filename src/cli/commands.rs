//! One adapter per command: arguments into the library's options, one call, the report
//! rendered, the outcome into an exit code (and, for commands that change state, metrics).

use std::path::PathBuf;

use lifeboat::config::Config;
use lifeboat::error::exit_code;
use lifeboat::wal_archive as wal;
use lifeboat::{
    Error, Result, backup, check, drill, heartbeat, init, list, metrics, prune, rekey, replicate,
    restore, schedule, show, status, verify,
};

use super::args::{Cli, Command, DrillAction, OutputFormat, ScheduleFormat};
use super::record::{record, record_if_interrupted, record_run};
use super::render::{print_error, report};

/// The commands that need no config: `init`, `keygen`, `wal-fetch --via` (which asks a
/// drill's relay) and `wal-prefetch --clear`. None when the command needs the config.
pub fn without_config(cli: &Cli) -> Result<Option<i32>> {
    match &cli.command {
        Command::Init { force } => {
            let path = init::run(&init::InitOptions {
                path: cli.config.clone(),
                force: *force,
            })?;
            println!(
                "wrote example config '{}'; edit it, then run `lifeboat --config {} check`",
                path.display(),
                path.display()
            );
        }
        Command::Keygen {
            output,
            signing: true,
        } => {
            let public = lifeboat::signing::keygen(output)?;
            eprintln!(
                "wrote signing key '{}' (mode 0600) and its public key '{}.pub'; keep the signing key on backup hosts only, and put the public key in trusted_signers",
                output.display(),
                output.display()
            );
            println!("{public}");
        }
        Command::Keygen { output, .. } => {
            let recipient = lifeboat::keys::keygen(output)?;
            eprintln!(
                "wrote identity '{}' (mode 0600); keep a copy offline, it is the only way to read what is encrypted to it alone",
                output.display()
            );
            println!("{recipient}");
        }
        Command::WalFetch {
            name,
            dest,
            via: Some(socket),
            ..
        } => {
            let fetched = lifeboat::wal_relay::fetch_via(socket, name, dest);
            return Ok(Some(wal_fetch_exit_code(fetched)));
        }
        Command::WalPrefetch {
            spool, clear: true, ..
        } => {
            wal::Spool::at(spool.clone(), String::new())
                .clear()
                .map_err(|e| {
                    Error::new(
                        lifeboat::ErrorKind::Target,
                        format!("unable to remove the WAL spool '{}'", spool.display()),
                    )
                    .with_source(e)
                })?;
        }
        _ => return Ok(None),
    }
    Ok(Some(exit_code::SUCCESS))
}

pub async fn dispatch(config: &Config, command: Command) -> Result<i32> {
    match command {
        Command::Init { .. } | Command::Keygen { .. } => unreachable!("run without a config"),
        Command::Check
        | Command::Schedule { .. }
        | Command::Status { .. }
        | Command::List { .. }
        | Command::Show { .. }
        | Command::Heartbeat { .. }
        | Command::WalFetch { .. }
        | Command::WalPrefetch { .. } => report_state(config, command).await,
        _ => change_state(config, command).await,
    }
}

/// The commands that change what repositories (or a data directory) hold.
async fn change_state(config: &Config, command: Command) -> Result<i32> {
    match command {
        Command::Backup { job, all: _ } => return backup(config, job).await,
        Command::Drill {
            action:
                DrillAction::Run {
                    file,
                    report_dir,
                    each_repository,
                    seed,
                    format,
                },
        } => {
            let options = drill::DrillOptions {
                file,
                report_dir,
                each_repository,
                seed,
            };
            drill_run(config, options, format).await?;
        }
        Command::Drill {
            action: DrillAction::History { name, format },
        } => report(&drill::history(config, name.as_deref()).await?, format),
        Command::Replicate {
            job,
            dry_run,
            verify,
            reseed,
            format,
        } => {
            let options = replicate::ReplicateOptions {
                job,
                dry_run,
                verify,
                reseed,
            };
            replicate(config, options, format).await?;
        }
        Command::Prune {
            job,
            dry_run,
            grace,
            format,
        } => {
            let options = prune::PruneOptions {
                job,
                dry_run,
                grace,
            };
            prune(config, options, format).await?;
        }
        Command::Rekey {
            job,
            add,
            remove,
            dry_run,
            force,
            format,
        } => {
            let options = rekey::RekeyOptions {
                job,
                add,
                remove,
                dry_run,
                force,
            };
            let rekeyed = rekey::run(config, &options).await?;
            report(&rekeyed, format);
            rekeyed.outcome()?;
        }
        Command::Restore {
            job,
            backup,
            from,
            into,
            start_scratch,
            postgres,
            physical,
        } => {
            let options = restore::RestoreOptions {
                job,
                backup,
                from,
                exclude: Vec::new(),
                into,
                postgres: postgres.options(),
                physical: physical.options()?,
                start_scratch,
                identity_file: None,
            };
            println!("{}", restore::run(config, &options).await?);
        }
        Command::WalPush { path, job } => {
            wal_push(config, wal::WalPushOptions { path, job }).await?
        }
        Command::Verify {
            job,
            from,
            deep,
            sample: Some(percent),
            format,
            ..
        } => {
            let options = verify::sample::SampleOptions {
                job,
                from,
                percent,
                deep,
            };
            recorded_verify(
                config,
                ("verify-sample", options.job.as_deref()),
                format,
                verify::sample::run(config, &options),
                verify::sample::SampleReport::outcome,
            )
            .await?;
        }
        Command::Verify {
            job,
            from,
            deep,
            archive: true,
            full,
            format,
            ..
        } => {
            let options = verify::archive::ArchiveOptions {
                job,
                from,
                deep,
                full,
            };
            recorded_verify(
                config,
                ("verify-archive", options.job.as_deref()),
                format,
                verify::archive::run(config, &options),
                verify::archive::ArchiveReport::outcome,
            )
            .await?;
        }
        Command::Verify {
            job,
            backup,
            from,
            deep,
            format,
            ..
        } => {
            let options = verify::VerifyOptions {
                job,
                backup,
                from,
                deep,
            };
            recorded_verify(
                config,
                ("verify", options.job.as_deref()),
                format,
                verify::run(config, &options),
                verify::VerifyReport::outcome,
            )
            .await?;
        }
        _ => unreachable!("dispatched by state"),
    }
    Ok(exit_code::SUCCESS)
}

/// The commands that read and report (and heartbeat, schedule, wal-fetch, which write
/// outside the repositories' backups).
async fn report_state(config: &Config, command: Command) -> Result<i32> {
    match command {
        Command::Check => {
            let report = check::run(config).await;
            print!("{report}");
            report.outcome()?;
        }
        Command::Schedule {
            format,
            install,
            unit_dir,
        } => schedule(config, format, install, unit_dir).await?,
        Command::Status {
            job,
            write_metrics,
            format,
        } => return Ok(status(config, job, write_metrics, format).await),
        Command::List { job, format } => report(
            &list::run(config, &list::ListOptions { job }).await?,
            format,
        ),
        Command::Show {
            backup,
            job,
            from,
            format,
        } => {
            let shown = show::run(config, &show::ShowOptions { backup, job, from }).await?;
            match format {
                OutputFormat::Text => print!("{shown}"),
                OutputFormat::Json => {
                    print!("{}", String::from_utf8_lossy(&shown.manifest.to_json()))
                }
            }
        }
        Command::Heartbeat { job } => {
            let at = heartbeat::run(config, &job).await?;
            println!("heartbeat {job}: {}", at.to_rfc3339());
        }
        Command::WalFetch {
            name,
            dest,
            source,
            via: _,
        } => {
            let options = wal::WalFetchOptions {
                name,
                dest: wal::WalDestination::Path(dest),
                source: source.into(),
            };
            return Ok(wal_fetch_exit_code(
                wal::fetch_ahead(config, &options).await,
            ));
        }
        Command::WalPrefetch {
            spool,
            depth,
            source,
            clear: _,
        } => {
            let source = wal::WalSourceOptions::from(source);
            let depth = depth.unwrap_or_default();
            let key = wal::source_key(&config.path, &source);
            wal::run_pass(config, &wal::Spool::at(spool, key), &source, depth).await?;
        }
        _ => unreachable!("dispatched by state"),
    }
    Ok(exit_code::SUCCESS)
}

async fn backup(config: &Config, job: Option<String>) -> Result<i32> {
    let started_at = chrono::Utc::now();
    let jobs: Vec<String> = match &job {
        Some(job) => vec![job.clone()],
        None => config.jobs.iter().map(|j| j.name.clone()).collect(),
    };
    let _recorded = record_if_interrupted(config, "backup", jobs, started_at);
    let options = backup::BackupOptions {
        jobs: job.into_iter().collect(),
    };
    let summary = backup::run(config, &options).await?;
    for (_, outcome) in &summary.outcomes {
        match outcome {
            Ok(report) => println!("{report}"),
            Err(e) => print_error(e),
        }
    }
    let finished_at = chrono::Utc::now();
    let runs: Vec<metrics::RunRecord> = summary
        .outcomes
        .iter()
        .map(|(job, outcome)| metrics::RunRecord {
            command: "backup",
            job,
            exit_code: match outcome {
                Ok(report) if report.missing.is_empty() => exit_code::SUCCESS,
                Ok(_) => exit_code::DEGRADED,
                Err(e) => e.kind().exit_code(),
            },
            started_at,
            finished_at,
        })
        .collect();
    record(config, &runs).await;
    Ok(summary.exit_code())
}

async fn drill_run(
    config: &Config,
    options: drill::DrillOptions,
    format: OutputFormat,
) -> Result<()> {
    let started_at = chrono::Utc::now();
    // A drill that cannot even start is recorded under the job its file names.
    let job = drill::Drill::load(&options.file)
        .ok()
        .map(|drill| drill.job);
    let _recorded =
        record_if_interrupted(config, "drill", job.iter().cloned().collect(), started_at);
    let drilled = drill::run(config, &options).await;
    let job = match &drilled {
        Ok(drilled) => drilled.reports.first().map(|r| r.job.clone()).or(job),
        Err(_) => job,
    };
    let outcome = drilled.and_then(|drilled| {
        report(&drilled, format);
        drilled.into_outcome()
    });
    if let Some(job) = job {
        record_run(config, "drill", &job, started_at, &outcome).await;
    }
    outcome
}

async fn replicate(
    config: &Config,
    options: replicate::ReplicateOptions,
    format: OutputFormat,
) -> Result<()> {
    let started_at = chrono::Utc::now();
    let label = options.job.clone().unwrap_or_else(|| "all".to_string());
    let dry_run = options.dry_run;
    let _recorded = (!dry_run)
        .then(|| record_if_interrupted(config, "replicate", vec![label.clone()], started_at));
    let outcome = replicate::run(config, &options)
        .await
        .and_then(|replicated| {
            report(&replicated, format);
            replicated.outcome()
        });
    if !dry_run {
        record_run(config, "replicate", &label, started_at, &outcome).await;
    }
    outcome
}

async fn schedule(
    config: &Config,
    format: ScheduleFormat,
    install: bool,
    unit_dir: PathBuf,
) -> Result<()> {
    let format = match format {
        ScheduleFormat::Systemd => schedule::Format::Systemd,
        ScheduleFormat::Cron => schedule::Format::Cron,
    };
    if install && format == schedule::Format::Cron {
        return Err(Error::usage(
            "--install is for systemd; give the cron lines to `crontab -e`",
        ));
    }
    let options = schedule::ScheduleOptions {
        format,
        install,
        unit_dir,
    };
    print!("{}", schedule::run(config, &options).await?);
    Ok(())
}

/// The exit code is the state a monitor reads: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
async fn status(
    config: &Config,
    job: Option<String>,
    write_metrics: bool,
    format: OutputFormat,
) -> i32 {
    let unknown = status::State::Unknown.exit_code();
    let metrics_dir = match (write_metrics, &job, &config.metrics_dir) {
        (false, _, _) => None,
        (true, Some(_), _) => {
            print_error(&Error::usage(
                "--write-metrics rewrites every job's state; leave out the job",
            ));
            return unknown;
        }
        (true, None, None) => {
            print_error(
                &Error::usage(format!(
                    "--write-metrics: '{}' sets no metrics_dir",
                    config.path.display()
                ))
                .with_hint("set `metrics_dir` (node_exporter's textfile directory)"),
            );
            return unknown;
        }
        (true, None, Some(dir)) => Some(dir.clone()),
    };
    let state = match status::run(config, &status::StatusOptions { job }).await {
        Ok(state) => state,
        Err(e) => {
            print_error(&e);
            return unknown;
        }
    };
    report(&state, format);
    if let Some(dir) = metrics_dir
        && let Err(e) = metrics::write_status(&dir, &state)
    {
        // Unwritten metrics make the state UNKNOWN: the collector will see nothing new.
        print_error(&e);
        return unknown.max(state.state.exit_code());
    }
    state.state.exit_code()
}

async fn prune(config: &Config, options: prune::PruneOptions, format: OutputFormat) -> Result<()> {
    let started_at = chrono::Utc::now();
    let label = options.job.clone().unwrap_or_else(|| "all".to_string());
    let dry_run = options.dry_run;
    let _recorded =
        (!dry_run).then(|| record_if_interrupted(config, "prune", vec![label.clone()], started_at));
    let outcome = prune::run(config, &options).await.and_then(|pruned| {
        report(&pruned, format);
        pruned.outcome()
    });
    if !dry_run {
        record_run(config, "prune", &label, started_at, &outcome).await;
    }
    outcome
}

async fn wal_push(config: &Config, options: wal::WalPushOptions) -> Result<()> {
    let archived_for = wal::physical_job(config, options.job.as_deref())
        .map(|j| j.name.clone())
        .ok();
    let pushed = wal::push(config, &options).await;
    if let Some(job) = archived_for {
        metrics::record_wal_push(config, &job, pushed.is_ok(), chrono::Utc::now());
    }
    println!("{}", pushed?);
    Ok(())
}

/// PostgreSQL's terms: 1 is the end of the archive, anything else stops recovery.
fn wal_fetch_exit_code(fetched: Result<wal::WalFetchOutcome>) -> i32 {
    match fetched {
        Ok(wal::WalFetchOutcome::Fetched {
            repository,
            passed_over,
            ..
        }) => {
            // Into the server's log, where an operator looks when replay was slow.
            for problem in passed_over {
                eprintln!("warning: {problem}; served by repository '{repository}'");
            }
            exit_code::SUCCESS
        }
        Ok(wal::WalFetchOutcome::NotArchived) => exit_code::FAILURE,
        Err(e) => {
            print_error(&e);
            exit_code::STOP_RECOVERY
        }
    }
}

/// Runs one of verify's engines as `command` for `job` (all jobs when None): its metrics
/// are recorded however it ends, its report printed, and its judgement returned.
async fn recorded_verify<R: std::fmt::Display + serde::Serialize>(
    config: &Config,
    (command, job): (&'static str, Option<&str>),
    format: OutputFormat,
    run: impl std::future::Future<Output = Result<R>>,
    judge: impl FnOnce(&R) -> Result<()>,
) -> Result<()> {
    let started_at = chrono::Utc::now();
    let label = job.unwrap_or("all").to_string();
    let _recorded = record_if_interrupted(config, command, vec![label.clone()], started_at);
    let outcome = run.await.and_then(|verified| {
        report(&verified, format);
        judge(&verified)
    });
    record_run(config, command, &label, started_at, &outcome).await;
    outcome
}
