//! The `lifeboat` binary: parses the command line, sets up logging, calls the library once,
//! prints the report or the error chain, and turns the outcome into a stable exit code.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod terminal;

use lifeboat::commands::{
    backup, check, drill, heartbeat, init, list, prune, rekey, replicate, restore, schedule, show,
    status, verify, wal,
};
use lifeboat::config::{Config, DEFAULT_CONFIG_PATH};
use lifeboat::error::exit_code;
use lifeboat::metrics;
use lifeboat::{Error, Result};

// Everything printed goes through `emit`: a reader that went away (`lifeboat show … | head`)
// ends the output, never the process with a panic, and the exit code still says how the
// command went.
macro_rules! print {
    ($($arg:tt)*) => { emit(format_args!($($arg)*)) };
}
macro_rules! println {
    ($($arg:tt)*) => { emit(format_args!("{}\n", format_args!($($arg)*))) };
}
// And stderr: a reader of the log that went away must not stop a backup halfway.
macro_rules! eprintln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

fn emit(text: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_fmt(text).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("error: unable to write to stdout: {e}");
        }
        _ => {}
    }
}

#[derive(Parser)]
#[command(
    name = "lifeboat",
    version,
    about = "Disaster-recovery backups that prove they restore"
)]
struct Cli {
    /// Config file.
    #[arg(long, global = true, env = "LIFEBOAT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScheduleFormat {
    Systemd,
    Cron,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Write a commented example config to --config.
    Init {
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Validate the config and reach every repository and source.
    Check,
    /// Take a backup now.
    Backup {
        /// The job to back up.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        job: Option<String>,
        /// Back up every configured job; each failure is reported and the rest go on.
        #[arg(long)]
        all: bool,
    },
    /// List backups, newest first, with their presence per repository.
    List {
        job: Option<String>,
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
    },
    /// Show one backup's manifest.
    Show {
        /// Backup id (or "latest" with --job).
        backup: String,
        #[arg(long)]
        job: Option<String>,
        /// Repository to read from (default: the first in the config).
        #[arg(long)]
        from: Option<String>,
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
    },
    /// Restore a backup: files into a new or empty directory, databases into a server.
    Restore {
        job: String,
        /// Backup id, or "latest".
        #[arg(long, default_value = "latest")]
        backup: String,
        /// Repository to read from (default: the first in the config).
        #[arg(long)]
        from: Option<String>,
        /// files jobs: directory to restore into, new or empty; redis jobs: the RDB file to
        /// write, which must not exist.
        #[arg(long)]
        into: Option<PathBuf>,
        /// redis jobs: load the RDB into a throw-away redis-server on a free loopback port,
        /// left running; prints its address.
        #[arg(long, conflicts_with = "into")]
        start_scratch: bool,
        #[command(flatten)]
        postgres: PostgresRestoreArgs,
        #[command(flatten)]
        physical: PhysicalRestoreArgs,
    },
    /// Re-read every object and check both checksums, reading on from the next repository holding it.
    Verify {
        job: Option<String>,
        /// Only this backup id (or "latest").
        #[arg(long)]
        backup: Option<String>,
        /// Repository to verify (default: the first in the config).
        #[arg(long)]
        from: Option<String>,
        /// Also decrypt encrypted objects and check what they hold; needs an identity
        /// (LIFEBOAT_IDENTITY_FILE or identity_file in [encryption]).
        #[arg(long)]
        deep: bool,
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
    },
    /// Restore drills: restore into a throw-away target, run checks, measure RTO and RPO.
    Drill {
        #[command(subcommand)]
        action: DrillAction,
    },
    /// Copy into each repository the backups (or objects) it lacks, from one that holds them.
    Replicate {
        /// Only this job's backups.
        job: Option<String>,
        /// Print what would be copied; copy nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also read every object each repository holds and replace damaged ones.
        #[arg(long)]
        verify: bool,
        /// Also fill a repository that lacks its marker while others hold theirs (wiped, or
        /// new): copy every backup into it, then write its marker.
        #[arg(long)]
        reseed: bool,
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
    },
    /// Write a new age identity (mode 0600) and print its recipient (public key); with
    /// --signing, a manifest signing key (and FILE.pub) and print its public key.
    Keygen {
        /// The key file to create; never replaced.
        #[arg(long, short)]
        output: PathBuf,
        /// An Ed25519 signing key in minisign's format, for `[signing] key_file`; its public
        /// key goes in `trusted_signers` (and `minisign -P`).
        #[arg(long)]
        signing: bool,
    },
    /// Re-encrypt stored backups and WAL to the config's recipients plus --add-recipient,
    /// minus --remove-recipient (needs an identity that opens them).
    Rekey {
        /// Only this job's backups.
        job: Option<String>,
        /// A public key (age1…) to encrypt to as well (repeatable).
        #[arg(long = "add-recipient")]
        add: Vec<String>,
        /// A public key no object may stay encrypted to (repeatable).
        #[arg(long = "remove-recipient")]
        remove: Vec<String>,
        /// Say what would be re-encrypted; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Rekey even when no configured identity would open the result.
        #[arg(long)]
        force: bool,
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
    },
    /// Print (or install) systemd timers or crontab lines for the schedules in the config.
    Schedule {
        #[arg(value_enum)]
        format: ScheduleFormat,
        /// systemd: write the units into --unit-dir; in /etc/systemd/system also enable and
        /// start the timers.
        #[arg(long)]
        install: bool,
        #[arg(long, default_value = schedule::SYSTEMD_UNIT_DIR, requires = "install")]
        unit_dir: PathBuf,
    },
    /// Are we inside our targets now: backup age against the RPO, drills, projected RTO.
    /// Nagios exit codes: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
    Status {
        /// Only this job.
        job: Option<String>,
        /// Also rewrite lifeboat.prom in metrics_dir, as the status timer does: the state
        /// then stays fresh on a host where nothing else runs for a day.
        #[arg(long)]
        write_metrics: bool,
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
    },
    /// Apply each job's retention policy in every repository, and clear leftovers.
    Prune {
        /// Only this job.
        job: Option<String>,
        /// Print the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Age after which a backup directory without a manifest, or an unfinished upload,
        /// counts as abandoned (a running backup is younger).
        #[arg(long, default_value = "24h", value_parser = lifeboat::config::bounded_duration)]
        grace: std::time::Duration,
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
    },
    /// Write the job's heartbeat row on its server (for physical jobs, every minute from a timer).
    Heartbeat { job: String },
    /// Archive one WAL file into every repository: PostgreSQL's archive_command.
    #[command(name = "wal-push")]
    WalPush {
        /// The file PostgreSQL passes as %p.
        path: PathBuf,
        /// The physical job archiving it (default: the only physical job).
        #[arg(long)]
        job: Option<String>,
    },
    /// Fetch one archived WAL file: PostgreSQL's restore_command. Exits 1 when the archive
    /// lacks it, 255 when no repository could tell (PostgreSQL then stops recovery).
    #[command(name = "wal-fetch")]
    WalFetch {
        /// The file name PostgreSQL passes as %f.
        name: String,
        /// Where to write it, as PostgreSQL passes %p.
        dest: PathBuf,
        /// The physical job (default: the only physical job).
        #[arg(long)]
        job: Option<String>,
        /// Read only from this repository.
        #[arg(long)]
        from: Option<String>,
        /// Never read from this repository (repeatable).
        #[arg(long)]
        exclude: Vec<String>,
        /// Decrypt with this identity file (default: LIFEBOAT_IDENTITY_FILE, else the
        /// config's identity_file).
        #[arg(long)]
        identity_file: Option<PathBuf>,
        /// Fetch through a drill's WAL relay socket instead, reading no config and holding
        /// no credential (what a drill writes into its scratch server's restore_command).
        #[arg(long, value_name = "SOCKET", conflicts_with_all = ["job", "from", "exclude", "identity_file"])]
        via: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DrillAction {
    /// Run a drill file; exit 0 only if every check passes and RTO and RPO meet their targets.
    Run {
        /// The drill file (drills/*.toml).
        file: PathBuf,
        /// Where to write the JSON, Markdown and HTML reports.
        #[arg(long, default_value = "drill-reports")]
        report_dir: PathBuf,
        /// Run the drill once per repository holding the backup, each reading from it alone.
        #[arg(long)]
        each_repository: bool,
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
    },
    /// Past drills, newest first, from the reports kept in the repositories.
    History {
        /// Only this drill.
        name: Option<String>,
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
    },
}

/// Restore options for postgres jobs.
#[derive(clap::Args)]
struct PostgresRestoreArgs {
    /// postgres jobs: DSN of the server to restore into (password from PGPASSWORD or ~/.pgpass).
    #[arg(long)]
    target: Option<String>,
    /// Only this database of the backup.
    #[arg(long)]
    database: Option<String>,
    /// Restore the one --database under this name.
    #[arg(long = "as", value_name = "NAME", requires = "database")]
    rename_to: Option<String>,
    /// Parallel pg_restore jobs: table loads, then index and constraint builds.
    #[arg(long, default_value_t = 2)]
    jobs: u32,
    /// Stage each dump decompressed for pg_restore --jobs to read: one decode instead of
    /// one per job, but room for the uncompressed dumps (by default the data streams from
    /// the compressed copy).
    #[arg(long)]
    parallel_data: bool,
    /// Also restore roles and tablespaces (before the databases).
    #[arg(long)]
    globals: bool,
    /// With --globals from a backup without role passwords: create its login roles able
    /// to log in anyway (by default they are created NOLOGIN until given a password).
    #[arg(long, requires = "globals")]
    keep_login: bool,
    /// Replace a database that already holds tables: the backup is loaded into a new
    /// database beside it and the two swap names once it loaded, the old one kept as
    /// NAME_before_<time> (see --drop-previous).
    #[arg(long)]
    clean: bool,
    /// With --clean: drop the replaced database once the swap is done instead of keeping it.
    #[arg(long, requires = "clean")]
    drop_previous: bool,
    /// With --clean on the very server the backup was taken from: replace its databases,
    /// losing what was written since the backup. Refused without this.
    #[arg(long, requires = "clean")]
    yes_this_is_the_source: bool,
    /// End the sessions still connected to a database being replaced, when the swap comes.
    #[arg(long)]
    terminate_sessions: bool,
    /// How long the swap waits for the sessions on a database being replaced to end.
    #[arg(long, default_value = "30s", value_parser = lifeboat::config::bounded_duration)]
    swap_wait: std::time::Duration,
    /// Do not restore ownership and privileges.
    #[arg(long)]
    no_owner: bool,
    /// Where to stage the verified dumps (default $TMPDIR, else /var/tmp).
    #[arg(long)]
    staging_dir: Option<PathBuf>,
}

/// A moment given on the command line: RFC 3339, with its offset. One without an offset
/// is refused saying what to add: lifeboat never guesses the zone an operator meant.
fn parse_moment(text: &str) -> Result<chrono::DateTime<chrono::FixedOffset>, String> {
    if let Ok(moment) = text.parse::<chrono::DateTime<chrono::FixedOffset>>() {
        return Ok(moment);
    }
    let naive = [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ]
    .iter()
    .find_map(|format| chrono::NaiveDateTime::parse_from_str(text, format).ok());
    Err(match naive {
        Some(naive) => {
            let at = naive.format("%Y-%m-%dT%H:%M:%S");
            format!("it has no time zone: write {at}Z for UTC, or {at}+02:00 for an offset")
        }
        None => "expected a moment in RFC 3339, such as 2026-11-26T14:01:00Z".to_string(),
    })
}

/// Restore options for physical postgres jobs.
#[derive(clap::Args)]
struct PhysicalRestoreArgs {
    /// physical postgres jobs: the data directory to restore into; must be new or empty.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Recover to this moment (RFC 3339, e.g. 2026-11-26T14:01:00Z) instead of the end of the archive.
    #[arg(long, conflicts_with = "to_lsn", requires = "data_dir", value_parser = parse_moment)]
    to_time: Option<chrono::DateTime<chrono::FixedOffset>>,
    /// Recover to this WAL position (e.g. 0/3000100).
    #[arg(long, requires = "data_dir")]
    to_lsn: Option<String>,
    /// Start the restored server and wait until recovery has finished.
    #[arg(long, requires = "data_dir")]
    start: bool,
    /// The port the restored server listens on.
    #[arg(long, requires = "data_dir")]
    port: Option<u16>,
    /// Keep archive_mode as the backup had it (by default the restored server does not archive).
    #[arg(long, requires = "data_dir")]
    keep_archiving: bool,
    /// Recover to a gap in the WAL archive (a segment no repository holds, with later ones
    /// archived) and lose what was written after it; without it such a restore is refused.
    #[arg(long, requires = "data_dir", conflicts_with_all = ["to_time", "to_lsn"])]
    accept_gap: bool,
    /// The timeline to recover along: `latest` (the newest archived, the default), `current`
    /// (the backup's own), or a number; a target on an older timeline after a branch needs
    /// that timeline's number.
    #[arg(long, requires = "data_dir", value_parser = parse_timeline, default_value = "latest")]
    timeline: lifeboat::continuity::TimelineChoice,
}

fn parse_timeline(text: &str) -> std::result::Result<lifeboat::continuity::TimelineChoice, String> {
    use lifeboat::continuity::TimelineChoice;
    match text {
        "latest" => Ok(TimelineChoice::Latest),
        "current" => Ok(TimelineChoice::Current),
        number => match number.parse::<u32>() {
            Ok(timeline) if timeline > 0 => Ok(TimelineChoice::Numbered(timeline)),
            _ => Err("expected latest, current or a timeline number such as 2".to_string()),
        },
    }
}

impl PhysicalRestoreArgs {
    fn options(self) -> Result<Option<restore::PhysicalRestoreOptions>> {
        let Some(data_dir) = self.data_dir else {
            return Ok(None);
        };
        let target = match (self.to_time, self.to_lsn) {
            (Some(at), _) => restore::RecoveryTarget::Time(at.to_utc()),
            (None, Some(lsn)) => {
                restore::RecoveryTarget::Lsn(lifeboat::wal::Lsn::parse(&lsn).ok_or_else(|| {
                    Error::usage(format!(
                        "--to-lsn '{lsn}' is not a WAL position such as 0/3000100"
                    ))
                })?)
            }
            (None, None) => restore::RecoveryTarget::EndOfArchive,
        };
        Ok(Some(restore::PhysicalRestoreOptions {
            data_dir,
            target,
            start: self.start,
            port: self.port,
            keep_archiving: self.keep_archiving,
            accept_gap: self.accept_gap,
            timeline: self.timeline,
            from: None,
            exclude: Vec::new(),
            bin_dir: None,
            wal_relay: None,
        }))
    }
}

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let command_name = matches.subcommand_name().unwrap_or("lifeboat").to_string();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            return report_error(
                &Error::new(lifeboat::ErrorKind::Source, "unable to start the runtime")
                    .with_source(e),
            );
        }
    };
    let outcome = runtime.block_on(async {
        // Before any work: a run stopped at any moment cleans up after itself.
        lifeboat::interrupt::install(command_name);
        run(cli).await
    });
    lifeboat::interrupt::exit_if_interrupted();
    let code = match outcome {
        Ok(code) => code,
        Err(e) => return report_error(&e),
    };
    ExitCode::from(code as u8)
}

/// Logs go to stderr. On a terminal, long transfers also show progress bars there; under a
/// timer or a pipe nothing but the log lines is written.
fn init_logging(cli: &Cli) {
    let default = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) => "lifeboat=info,warn",
        (false, 1) => "lifeboat=debug,info",
        (false, _) => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LIFEBOAT_LOG")
        .unwrap_or_else(|_| default.into());
    let on_terminal = std::io::stderr().is_terminal();
    // A log write that fails (stderr a closed pipe) is dropped: the tracing crate's own
    // report of it would panic writing to the same stderr.
    use tracing_subscriber::fmt::writer::MakeWriterExt;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(on_terminal)
        .log_internal_errors(false);
    let progress = (on_terminal && !cli.quiet).then(terminal::TerminalProgress::new);
    match (cli.log_format, progress) {
        (LogFormat::Text, Some(progress)) => {
            lifeboat::progress::install(Box::new(progress.clone()));
            builder
                .with_target(false)
                .with_writer(terminal::Escaping(
                    progress.with_filter(|_| lifeboat::interrupt::may_log()),
                ))
                .init()
        }
        (LogFormat::Text, None) => builder
            .with_target(false)
            .with_writer(terminal::Escaping(
                std::io::stderr.with_filter(|_| lifeboat::interrupt::may_log()),
            ))
            .init(),
        // One object per line, the span fields (job, backup) flattened into each.
        (LogFormat::Json, _) => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_writer(std::io::stderr.with_filter(|_| lifeboat::interrupt::may_log()))
            .init(),
    }
}

fn report_error(error: &Error) -> ExitCode {
    print_error(error);
    ExitCode::from(error.kind().exit_code() as u8)
}

fn print_error(error: &Error) {
    use lifeboat::error::escape_controls;
    // A run stopped by a signal fails as a consequence; the interrupt's own line tells it.
    if lifeboat::interrupt::is_interrupted() {
        return;
    }
    let mut chain = error.chain().into_iter();
    if let Some(first) = chain.next() {
        eprintln!("error: {}", escape_controls(&first));
    }
    for cause in chain {
        eprintln!("caused by: {}", escape_controls(&cause));
    }
    for hint in error.hints() {
        eprintln!("hint: {}", escape_controls(hint));
    }
}

/// Metrics after a command that changed state (when `metrics_dir` is set), however it ended.
async fn record_run(
    config: &Config,
    command: &str,
    job: &str,
    started_at: chrono::DateTime<chrono::Utc>,
    outcome: &Result<()>,
) {
    let run = metrics::RunRecord {
        command,
        job,
        exit_code: exit_code_of(outcome),
        started_at,
        finished_at: chrono::Utc::now(),
    };
    metrics::record(config, &[run]).await;
}

/// A run a signal stops ends in the interrupt's cleanup, never back here: its run files are
/// written there (exit 130/143/129), so that a timeout that kills every night's backup shows.
fn record_if_interrupted(
    config: &Config,
    command: &'static str,
    jobs: Vec<String>,
    started_at: chrono::DateTime<chrono::Utc>,
) -> Option<lifeboat::interrupt::UndoGuard> {
    let dir = config.metrics_dir.clone()?;
    Some(lifeboat::interrupt::undo_on_interrupt(move || {
        let finished_at = chrono::Utc::now();
        for job in &jobs {
            let run = metrics::RunRecord {
                command,
                job,
                exit_code: lifeboat::interrupt::exit_code(),
                started_at,
                finished_at,
            };
            let name = format!("lifeboat-{command}-{job}.prom");
            let _ = metrics::write_atomic(&dir, &name, &metrics::render_run(&run));
        }
    }))
}

fn exit_code_of(outcome: &Result<()>) -> i32 {
    match outcome {
        Ok(()) => exit_code::SUCCESS,
        Err(e) => e.kind().exit_code(),
    }
}

/// Prints a report. A reader that went away (`lifeboat list | head`) is no error of the
/// command's: its exit code still says how the command went.
fn print<T: std::fmt::Display + serde::Serialize>(report: &T, format: OutputFormat) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let written = match format {
        OutputFormat::Text => write!(out, "{report}"),
        OutputFormat::Json => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(report).expect("reports serialize")
        ),
    };
    match written.and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("error: unable to write the report to stdout: {e}");
        }
        _ => {}
    }
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

async fn run(cli: Cli) -> Result<i32> {
    if let Command::Init { force } = cli.command {
        let path = init::run(&init::InitOptions {
            path: cli.config,
            force,
        })?;
        println!(
            "wrote example config '{}'; edit it, then run `lifeboat --config {} check`",
            path.display(),
            path.display()
        );
        return Ok(exit_code::SUCCESS);
    }
    if let Command::Keygen {
        output,
        signing: true,
    } = &cli.command
    {
        let public = lifeboat::signing::keygen(output)?;
        eprintln!(
            "wrote signing key '{}' (mode 0600) and its public key '{}.pub'; keep the signing key on backup hosts only, and put the public key in trusted_signers",
            output.display(),
            output.display()
        );
        println!("{public}");
        return Ok(exit_code::SUCCESS);
    }
    if let Command::Keygen { output, .. } = &cli.command {
        let recipient = lifeboat::keys::keygen(output)?;
        eprintln!(
            "wrote identity '{}' (mode 0600); keep a copy offline, it is the only way to read what is encrypted to it alone",
            output.display()
        );
        println!("{recipient}");
        return Ok(exit_code::SUCCESS);
    }
    if let Command::WalFetch {
        name,
        dest,
        via: Some(socket),
        ..
    } = &cli.command
    {
        let fetched = lifeboat::commands::wal_relay::fetch_via(socket, name, dest);
        return Ok(wal_fetch_exit_code(fetched));
    }
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        // PostgreSQL must not read a broken config as "the archive ends here".
        Err(e) if matches!(cli.command, Command::WalFetch { .. }) => {
            print_error(&e);
            return Ok(exit_code::STOP_RECOVERY);
        }
        // Every segment fails from now on: the archiving alert must hear of it.
        Err(e) if matches!(cli.command, Command::WalPush { .. }) => {
            if let Command::WalPush { job, .. } = &cli.command {
                metrics::record_wal_push_unloaded(&cli.config, job.as_deref(), chrono::Utc::now());
            }
            return Err(e);
        }
        // A monitoring system reads 2 as CRITICAL; a status that cannot even be read is UNKNOWN.
        Err(e) if matches!(cli.command, Command::Status { .. }) => {
            print_error(&e);
            return Ok(status::State::Unknown.exit_code());
        }
        Err(e) => return Err(e),
    };
    match cli.command {
        Command::Init { .. } | Command::Keygen { .. } => unreachable!("handled above"),
        Command::Check => {
            let report = check::run(&config).await;
            print!("{report}");
            report.outcome()?;
        }
        Command::Backup { job, all: _ } => {
            let started_at = chrono::Utc::now();
            let jobs: Vec<String> = match &job {
                Some(job) => vec![job.clone()],
                None => config.jobs.iter().map(|j| j.name.clone()).collect(),
            };
            let _recorded = record_if_interrupted(&config, "backup", jobs, started_at);
            let summary = backup::run(
                &config,
                &backup::BackupOptions {
                    jobs: job.into_iter().collect(),
                },
            )
            .await?;
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
            metrics::record(&config, &runs).await;
            return Ok(summary.exit_code());
        }
        Command::Drill {
            action:
                DrillAction::Run {
                    file,
                    report_dir,
                    each_repository,
                    format,
                },
        } => {
            let started_at = chrono::Utc::now();
            // A drill that cannot even start is recorded under the job its file names.
            let job = drill::Drill::load(&file).ok().map(|drill| drill.job);
            let _recorded =
                record_if_interrupted(&config, "drill", job.iter().cloned().collect(), started_at);
            let report = drill::run(
                &config,
                &drill::DrillOptions {
                    file,
                    report_dir,
                    each_repository,
                },
            )
            .await;
            let job = match &report {
                Ok(report) => report.reports.first().map(|r| r.job.clone()).or(job),
                Err(_) => job,
            };
            let outcome = report.and_then(|report| {
                print(&report, format);
                report.into_outcome()
            });
            if let Some(job) = job {
                record_run(&config, "drill", &job, started_at, &outcome).await;
            }
            outcome?;
        }
        Command::Drill {
            action: DrillAction::History { name, format },
        } => {
            let history = drill::history(&config, name.as_deref()).await?;
            print(&history, format);
        }
        Command::Replicate {
            job,
            dry_run,
            verify,
            reseed,
            format,
        } => {
            let started_at = chrono::Utc::now();
            let label = job.clone().unwrap_or_else(|| "all".to_string());
            let _recorded = (!dry_run).then(|| {
                record_if_interrupted(&config, "replicate", vec![label.clone()], started_at)
            });
            let outcome = replicate::run(
                &config,
                &replicate::ReplicateOptions {
                    job,
                    dry_run,
                    verify,
                    reseed,
                },
            )
            .await
            .and_then(|report| {
                print(&report, format);
                report.outcome()
            });
            if !dry_run {
                record_run(&config, "replicate", &label, started_at, &outcome).await;
            }
            outcome?;
        }
        Command::Schedule {
            format,
            install,
            unit_dir,
        } => {
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
            print!("{}", schedule::run(&config, &options).await?);
        }
        Command::Status {
            job,
            write_metrics,
            format,
        } => {
            let metrics_dir = match (write_metrics, &job, &config.metrics_dir) {
                (false, _, _) => None,
                (true, Some(_), _) => {
                    print_error(&Error::usage(
                        "--write-metrics rewrites every job's state; leave out the job",
                    ));
                    return Ok(status::State::Unknown.exit_code());
                }
                (true, None, None) => {
                    print_error(
                        &Error::usage(format!(
                            "--write-metrics: '{}' sets no metrics_dir",
                            config.path.display()
                        ))
                        .with_hint("set `metrics_dir` (node_exporter's textfile directory)"),
                    );
                    return Ok(status::State::Unknown.exit_code());
                }
                (true, None, Some(dir)) => Some(dir.clone()),
            };
            let report = match status::run(&config, &status::StatusOptions { job }).await {
                Ok(report) => report,
                Err(e) => {
                    print_error(&e);
                    return Ok(status::State::Unknown.exit_code());
                }
            };
            print(&report, format);
            if let Some(dir) = metrics_dir
                && let Err(e) = metrics::write_status(&dir, &report)
            {
                // The state is what a monitor reads from the exit code; unwritten metrics
                // make it UNKNOWN, as the collector will see nothing new.
                print_error(&e);
                return Ok(status::State::Unknown
                    .exit_code()
                    .max(report.state.exit_code()));
            }
            return Ok(report.state.exit_code());
        }
        Command::Prune {
            job,
            dry_run,
            grace,
            format,
        } => {
            let started_at = chrono::Utc::now();
            let label = job.clone().unwrap_or_else(|| "all".to_string());
            let _recorded = (!dry_run)
                .then(|| record_if_interrupted(&config, "prune", vec![label.clone()], started_at));
            let options = prune::PruneOptions {
                job,
                dry_run,
                grace,
            };
            let outcome = prune::run(&config, &options).await.and_then(|report| {
                print(&report, format);
                report.outcome()
            });
            if !dry_run {
                record_run(&config, "prune", &label, started_at, &outcome).await;
            }
            outcome?;
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
            let report = rekey::run(&config, &options).await?;
            print(&report, format);
            report.outcome()?;
        }
        Command::List { job, format } => {
            let report = list::run(&config, &list::ListOptions { job }).await?;
            print(&report, format);
        }
        Command::Show {
            backup,
            job,
            from,
            format,
        } => {
            let report = show::run(&config, &show::ShowOptions { backup, job, from }).await?;
            match format {
                OutputFormat::Text => print!("{report}"),
                OutputFormat::Json => {
                    print!("{}", String::from_utf8_lossy(&report.manifest.to_json()))
                }
            }
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
            let postgres = restore::PostgresRestoreOptions {
                target: postgres.target,
                database: postgres.database,
                rename_to: postgres.rename_to,
                jobs: postgres.jobs,
                globals: postgres.globals,
                clean: postgres.clean,
                drop_previous: postgres.drop_previous,
                yes_this_is_the_source: postgres.yes_this_is_the_source,
                keep_login: postgres.keep_login,
                terminate_sessions: postgres.terminate_sessions,
                swap_wait: postgres.swap_wait,
                parallel_data: postgres.parallel_data,
                no_owner: postgres.no_owner,
                staging_dir: postgres.staging_dir,
                bin_dir: None,
            };
            let options = restore::RestoreOptions {
                job,
                backup,
                from,
                exclude: Vec::new(),
                into,
                postgres,
                physical: physical.options()?,
                start_scratch,
                identity_file: None,
            };
            let report = restore::run(&config, &options).await?;
            println!("{report}");
        }
        Command::Heartbeat { job } => {
            let at = heartbeat::run(&config, &job).await?;
            println!("heartbeat {job}: {}", at.to_rfc3339());
        }
        Command::WalPush { path, job } => {
            let archived_for = wal::physical_job(&config, job.as_deref())
                .map(|j| j.name.clone())
                .ok();
            let pushed = wal::push(&config, &wal::WalPushOptions { path, job }).await;
            if let Some(job) = archived_for {
                metrics::record_wal_push(&config, &job, pushed.is_ok(), chrono::Utc::now());
            }
            println!("{}", pushed?);
        }
        Command::WalFetch {
            name,
            dest,
            job,
            from,
            exclude,
            identity_file,
            via: _,
        } => {
            let options = wal::WalFetchOptions {
                name,
                dest: wal::WalDestination::Path(dest),
                job,
                from,
                exclude,
                identity_file,
            };
            return Ok(wal_fetch_exit_code(wal::fetch(&config, &options).await));
        }
        Command::Verify {
            job,
            backup,
            from,
            deep,
            format,
        } => {
            let started_at = chrono::Utc::now();
            let label = job.clone().unwrap_or_else(|| "all".to_string());
            let _recorded =
                record_if_interrupted(&config, "verify", vec![label.clone()], started_at);
            let options = verify::VerifyOptions {
                job,
                backup,
                from,
                deep,
            };
            let outcome = verify::run(&config, &options).await.and_then(|report| {
                print(&report, format);
                report.outcome()
            });
            record_run(&config, "verify", &label, started_at, &outcome).await;
            outcome?;
        }
    }
    Ok(exit_code::SUCCESS)
}
