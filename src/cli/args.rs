//! The command line: what clap parses, and how it becomes the library's options. The
//! library never sees a clap type.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use lifeboat::config::DEFAULT_CONFIG_PATH;
use lifeboat::{Error, Result, restore, schedule};

#[derive(Parser)]
#[command(
    name = "lifeboat",
    version,
    about = "Disaster-recovery backups that prove they restore"
)]
pub struct Cli {
    /// Config file.
    #[arg(long, global = true, env = "LIFEBOAT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ScheduleFormat {
    Systemd,
    Cron,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
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
        /// Physical jobs: prove the WAL archive of each repository continuous from every
        /// kept base backup to its end, naming each gap and the recovery range it cuts,
        /// and read the WAL files the last run did not prove.
        #[arg(long, conflicts_with = "backup")]
        archive: bool,
        /// With --archive: read every WAL file again, not only the new ones.
        #[arg(long, requires = "archive", conflicts_with = "sample")]
        full: bool,
        /// Read the next P% slice of every repository's objects (backups and WAL), so that
        /// each object is read once every 100/P runs; the rotation is kept in the repository.
        #[arg(long, value_name = "P%", value_parser = lifeboat::verify::sample::parse_percent, conflicts_with_all = ["backup", "archive"])]
        sample: Option<u32>,
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
        #[command(flatten)]
        source: WalSourceArgs,
        /// Fetch through a drill's WAL relay socket instead, reading no config and holding
        /// no credential (what a drill writes into its scratch server's restore_command).
        #[arg(long, value_name = "SOCKET", conflicts_with_all = ["job", "from", "exclude", "identity_file"])]
        via: Option<PathBuf>,
    },
    /// Fetches the WAL segments after the one wal-fetch served last into its spool (started
    /// by wal-fetch itself), or removes the spool once recovery ends (--clear, the
    /// recovery_end_command a restore writes).
    #[command(name = "wal-prefetch", hide = true)]
    WalPrefetch {
        /// The spool directory.
        #[arg(long)]
        spool: PathBuf,
        /// How many segments to fetch ahead.
        #[arg(long, required_unless_present = "clear")]
        depth: Option<u32>,
        #[command(flatten)]
        source: WalSourceArgs,
        /// Remove the spool, after the pass that may be running.
        #[arg(long, conflicts_with_all = ["depth", "job", "from", "exclude", "identity_file"])]
        clear: bool,
    },
}

/// Where `wal-fetch` (and the prefetch it starts) reads WAL from.
#[derive(clap::Args)]
pub struct WalSourceArgs {
    /// The physical job (default: the only physical job).
    #[arg(long)]
    pub job: Option<String>,
    /// Read only from this repository.
    #[arg(long)]
    pub from: Option<String>,
    /// Never read from this repository (repeatable).
    #[arg(long)]
    pub exclude: Vec<String>,
    /// Decrypt with this identity file (default: LIFEBOAT_IDENTITY_FILE, else the
    /// config's identity_file).
    #[arg(long)]
    pub identity_file: Option<PathBuf>,
}

impl From<WalSourceArgs> for lifeboat::wal_archive::WalSourceOptions {
    fn from(args: WalSourceArgs) -> Self {
        lifeboat::wal_archive::WalSourceOptions {
            job: args.job,
            from: args.from,
            exclude: args.exclude,
            identity_file: args.identity_file,
        }
    }
}

#[derive(Subcommand)]
pub enum DrillAction {
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
        /// The seed of a random drill (`backup = "random"`, `to_time = "random"`): the
        /// report gives each run's; the same seed draws the same point from the same window.
        #[arg(long)]
        seed: Option<u64>,
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
pub struct PostgresRestoreArgs {
    /// postgres jobs: DSN of the server to restore into (password from PGPASSWORD or ~/.pgpass).
    #[arg(long)]
    pub target: Option<String>,
    /// Only this database of the backup.
    #[arg(long)]
    pub database: Option<String>,
    /// Restore the one --database under this name.
    #[arg(long = "as", value_name = "NAME", requires = "database")]
    pub rename_to: Option<String>,
    /// Parallel pg_restore jobs: table loads, then index and constraint builds.
    #[arg(long, default_value_t = 2)]
    pub jobs: u32,
    /// Stage each dump decompressed for pg_restore --jobs to read: one decode instead of
    /// one per job, but room for the uncompressed dumps (by default the data streams from
    /// the compressed copy).
    #[arg(long)]
    pub parallel_data: bool,
    /// Also restore roles and tablespaces (before the databases).
    #[arg(long)]
    pub globals: bool,
    /// With --globals from a backup without role passwords: create its login roles able
    /// to log in anyway (by default they are created NOLOGIN until given a password).
    #[arg(long, requires = "globals")]
    pub keep_login: bool,
    /// Replace a database that already holds tables: the backup is loaded into a new
    /// database beside it and the two swap names once it loaded, the old one kept as
    /// NAME_before_<time> (see --drop-previous).
    #[arg(long)]
    pub clean: bool,
    /// With --clean: drop the replaced database once the swap is done instead of keeping it.
    #[arg(long, requires = "clean")]
    pub drop_previous: bool,
    /// With --clean on the very server the backup was taken from: replace its databases,
    /// losing what was written since the backup. Refused without this.
    #[arg(long, requires = "clean")]
    pub yes_this_is_the_source: bool,
    /// End the sessions still connected to a database being replaced, when the swap comes.
    #[arg(long)]
    pub terminate_sessions: bool,
    /// How long the swap waits for the sessions on a database being replaced to end.
    #[arg(long, default_value = "30s", value_parser = lifeboat::config::bounded_duration)]
    pub swap_wait: std::time::Duration,
    /// Do not restore ownership and privileges.
    #[arg(long)]
    pub no_owner: bool,
    /// Where to stage the verified dumps (default $TMPDIR, else /var/tmp).
    #[arg(long)]
    pub staging_dir: Option<PathBuf>,
}

/// A moment given on the command line: RFC 3339, with its offset. One without an offset
/// is refused saying what to add: lifeboat never guesses the zone an operator meant.
impl PostgresRestoreArgs {
    pub fn options(self) -> restore::PostgresRestoreOptions {
        restore::PostgresRestoreOptions {
            target: self.target,
            database: self.database,
            rename_to: self.rename_to,
            jobs: self.jobs,
            globals: self.globals,
            clean: self.clean,
            drop_previous: self.drop_previous,
            yes_this_is_the_source: self.yes_this_is_the_source,
            keep_login: self.keep_login,
            terminate_sessions: self.terminate_sessions,
            swap_wait: self.swap_wait,
            parallel_data: self.parallel_data,
            no_owner: self.no_owner,
            staging_dir: self.staging_dir,
            bin_dir: None,
        }
    }
}

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
pub struct PhysicalRestoreArgs {
    /// physical postgres jobs: the data directory to restore into; must be new or empty.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Recover to this moment (RFC 3339, e.g. 2026-11-26T14:01:00Z) instead of the end of the archive.
    #[arg(long, conflicts_with = "to_lsn", requires = "data_dir", value_parser = parse_moment)]
    pub to_time: Option<chrono::DateTime<chrono::FixedOffset>>,
    /// Recover to this WAL position (e.g. 0/3000100).
    #[arg(long, requires = "data_dir")]
    pub to_lsn: Option<String>,
    /// Start the restored server and wait until recovery has finished.
    #[arg(long, requires = "data_dir")]
    pub start: bool,
    /// The port the restored server listens on.
    #[arg(long, requires = "data_dir")]
    pub port: Option<u16>,
    /// Keep archive_mode as the backup had it (by default the restored server does not archive).
    #[arg(long, requires = "data_dir")]
    pub keep_archiving: bool,
    /// Recover to a gap in the WAL archive (a segment no repository holds, with later ones
    /// archived) and lose what was written after it; without it such a restore is refused.
    #[arg(long, requires = "data_dir", conflicts_with_all = ["to_time", "to_lsn"])]
    pub accept_gap: bool,
    /// The timeline to recover along: `latest` (the newest archived, the default), `current`
    /// (the backup's own), or a number; a target on an older timeline after a branch needs
    /// that timeline's number.
    #[arg(long, requires = "data_dir", value_parser = parse_timeline, default_value = "latest")]
    pub timeline: lifeboat::continuity::TimelineChoice,
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
    pub fn options(self) -> Result<Option<restore::PhysicalRestoreOptions>> {
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
