//! `lifeboat schedule systemd|cron`: timer units or crontab lines from the schedules in the
//! config — each job's `schedule` (backup) and a verify of its newest backup
//! (`[schedule] verify`), a minutely heartbeat for each physical job with `heartbeat = true`,
//! `[schedule] prune` and `replicate`, the `schedule` of each drill file listed in
//! `[schedule] drills`, and a status run (`[schedule] status`) that refreshes the metrics and
//! fails its unit when a job is CRITICAL. Calendar expressions use systemd's OnCalendar
//! syntax and are checked with `systemd-analyze calendar` where it is installed; cron gets
//! the expressions it can say exactly, and an error for the rest.
//!
//! The services run as `[schedule] user` (not root), read credentials from
//! `[schedule] environment_file`, may write only what lifeboat writes (local repositories,
//! metrics, locks, their state directory), and start the failure hook
//! `lifeboat-failure@.service` when they fail.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::calendar::cron_fields;
use crate::config::{Config, JobSource, Location, PostgresMode};
use crate::drill::Drill;
use crate::error::{Error, ErrorKind, Result};

pub const SYSTEMD_UNIT_DIR: &str = "/etc/systemd/system";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Systemd,
    Cron,
}

pub struct ScheduleOptions {
    pub format: Format,
    /// Write the units into `unit_dir` instead of printing them; in the system's unit
    /// directory they are also enabled and started.
    pub install: bool,
    pub unit_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Work {
    /// Reads the sources: runs gently beside production.
    Backup,
    Maintenance,
    Drill,
    /// Every minute, on time: an idle database still archives WAL.
    Heartbeat,
    /// `status`: reads the repositories, fails its unit on CRITICAL.
    Monitor,
}

/// The failure hook every service names in `OnFailure=`: a template, one instance per
/// failed unit.
pub const FAILURE_HOOK: &str = "lifeboat-failure@";

/// One scheduled command.
#[derive(Debug, Clone, Serialize)]
pub struct Scheduled {
    /// The unit name without suffix: `lifeboat-backup-maindb`.
    pub name: String,
    pub description: String,
    /// Arguments after `lifeboat --config FILE`.
    pub args: Vec<String>,
    /// Where the expression came from, for errors: `job 'maindb' schedule`.
    pub origin: String,
    pub calendar: String,
    pub work: Work,
    /// Reads files other users own (files jobs' backups): CAP_DAC_READ_SEARCH, nothing more.
    pub reads_everything: bool,
}

#[derive(Debug, Serialize)]
pub struct ScheduleReport {
    pub format: &'static str,
    /// The files written, when installing.
    pub written: Vec<String>,
    /// Printed output (units or crontab), when not installing.
    pub text: String,
}

impl fmt::Display for ScheduleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)?;
        for path in &self.written {
            writeln!(f, "wrote {path}")?;
        }
        Ok(())
    }
}

/// Every scheduled command the config asks for.
pub fn plan(config: &Config) -> Result<Vec<Scheduled>> {
    let mut planned = Vec::new();
    for job in &config.jobs {
        if let Some(calendar) = &job.schedule {
            planned.push(Scheduled {
                name: format!("lifeboat-backup-{}", job.name),
                description: format!("lifeboat backup of job {}", job.name),
                args: vec!["backup".to_string(), job.name.clone()],
                origin: format!("job '{}' schedule", job.name),
                calendar: calendar.clone(),
                work: Work::Backup,
                reads_everything: matches!(job.source, JobSource::Files(_)),
            });
            if let Some(verify) = &config.schedules.verify {
                planned.push(Scheduled {
                    name: format!("lifeboat-verify-{}", job.name),
                    description: format!(
                        "lifeboat verify of the newest backup of job {}",
                        job.name
                    ),
                    args: vec![
                        "verify".to_string(),
                        job.name.clone(),
                        "--backup".to_string(),
                        "latest".to_string(),
                    ],
                    origin: "schedule.verify".to_string(),
                    calendar: verify.clone(),
                    work: Work::Maintenance,
                    reads_everything: false,
                });
                // What is new in the WAL archive since the last run, and every gap.
                if job.backup_kind() == crate::layout::BackupKind::PostgresPhysical {
                    planned.push(Scheduled {
                        name: format!("lifeboat-verify-archive-{}", job.name),
                        description: format!(
                            "lifeboat verify of the WAL archive of job {}",
                            job.name
                        ),
                        args: vec![
                            "verify".to_string(),
                            "--archive".to_string(),
                            job.name.clone(),
                        ],
                        origin: "schedule.verify".to_string(),
                        calendar: verify.clone(),
                        work: Work::Maintenance,
                        reads_everything: false,
                    });
                }
            }
        }
        if matches!(&job.source, JobSource::Postgres(p) if p.mode == PostgresMode::Physical && p.heartbeat)
        {
            planned.push(Scheduled {
                name: format!("lifeboat-heartbeat-{}", job.name),
                description: format!("lifeboat heartbeat of job {}", job.name),
                args: vec!["heartbeat".to_string(), job.name.clone()],
                origin: format!("job '{}' heartbeat", job.name),
                calendar: "minutely".to_string(),
                work: Work::Heartbeat,
                reads_everything: false,
            });
        }
    }
    for (command, calendar) in [
        ("prune", &config.schedules.prune),
        ("replicate", &config.schedules.replicate),
    ] {
        if let Some(calendar) = calendar {
            planned.push(Scheduled {
                name: format!("lifeboat-{command}"),
                description: format!("lifeboat {command} of every job"),
                args: vec![command.to_string()],
                origin: format!("schedule.{command}"),
                calendar: calendar.clone(),
                work: Work::Maintenance,
                reads_everything: false,
            });
        }
    }
    for path in &config.schedules.drills {
        let drill = Drill::load(path)?;
        let Some(calendar) = drill.schedule else {
            return Err(Error::config(format!(
                "drill file '{}' is listed in schedule.drills of '{}' but has no `schedule`",
                path.display(),
                config.path.display()
            ))
            .with_hint("add e.g. `schedule = \"quarterly\"` to the drill file"));
        };
        planned.push(Scheduled {
            name: format!("lifeboat-drill-{}", drill.name),
            description: format!("lifeboat drill {}", drill.name),
            args: vec![
                "drill".to_string(),
                "run".to_string(),
                absolute(path).display().to_string(),
            ],
            origin: format!("drill file '{}' schedule", path.display()),
            calendar,
            work: Work::Drill,
            reads_everything: false,
        });
    }
    // Only beside something else scheduled: a config with no timer is run by hand.
    if let Some(calendar) = config
        .schedules
        .status
        .as_ref()
        .filter(|_| !planned.is_empty())
    {
        let mut args = vec!["status".to_string()];
        if config.metrics_dir.is_some() {
            args.push("--write-metrics".to_string());
        }
        planned.push(Scheduled {
            name: "lifeboat-status".to_string(),
            description: "lifeboat status of every job".to_string(),
            args,
            origin: "schedule.status".to_string(),
            calendar: calendar.clone(),
            work: Work::Monitor,
            reads_everything: false,
        });
    }
    Ok(planned)
}

fn absolute(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

/// Every schedule the config asks for, checked as `lifeboat schedule` checks it before it
/// writes a unit: for `check`, so that a bad expression is found before the timers are made.
pub fn validate(config: &Config) -> Result<Vec<String>> {
    let planned = plan(config)?;
    let mut checked_by_systemd = 0;
    for scheduled in &planned {
        checked_by_systemd += usize::from(systemd_accepts(scheduled)?);
    }
    let mut notes = Vec::new();
    if !planned.is_empty() {
        notes.push(match checked_by_systemd {
            0 => format!(
                "{} schedule(s); systemd-analyze is not installed, so systemd's reading of them is not checked",
                planned.len()
            ),
            n => format!("{n} schedule(s), each accepted by systemd-analyze calendar"),
        });
    }
    Ok(notes)
}

/// Asks `systemd-analyze calendar` whether systemd accepts `calendar`; Ok(false) when the
/// tool is not installed.
fn systemd_accepts(scheduled: &Scheduled) -> Result<bool> {
    let output = match Command::new("systemd-analyze")
        .args(["calendar", &scheduled.calendar])
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(
                Error::new(ErrorKind::Source, "unable to run systemd-analyze").with_source(e),
            );
        }
    };
    if output.status.success() {
        return Ok(true);
    }
    Err(Error::config(format!(
        "{}: \"{}\" is not a valid systemd calendar expression: {}",
        scheduled.origin,
        scheduled.calendar,
        String::from_utf8_lossy(&output.stderr).trim()
    ))
    .with_hint("see `man systemd.time`, e.g. \"hourly\", \"*-*-* 03:00:00\", \"Mon *-*-* 04:00\""))
}

/// Spread over this much after the planned time, so that many hosts do not hit the
/// repositories in the same second.
fn randomized_delay(work: Work) -> Option<&'static str> {
    match work {
        Work::Backup => Some("5min"),
        Work::Maintenance => Some("15min"),
        Work::Drill => Some("1h"),
        Work::Monitor => Some("1min"),
        Work::Heartbeat => None,
    }
}

/// The randomized delay of a backup timer, which the newest backup's age can reach on top of
/// the longest gap between two planned runs.
pub const BACKUP_RANDOMIZED_DELAY: Duration = Duration::from_secs(5 * 60);

/// What every service of one config shares: who runs it, where its credentials are, what
/// it may write.
pub struct UnitSettings {
    pub exe: PathBuf,
    pub config: PathBuf,
    pub user: Option<String>,
    pub environment_file: PathBuf,
    /// Local repositories, metrics_dir, the lock directory: everything else is read-only.
    pub writable: Vec<PathBuf>,
}

impl UnitSettings {
    pub fn of(config: &Config, exe: &Path) -> UnitSettings {
        let mut writable: Vec<PathBuf> = config
            .repositories
            .iter()
            .filter_map(|r| match &r.location {
                Location::Local { path } => Some(path.clone()),
                Location::S3(_) => None,
            })
            .chain(config.metrics_dir.clone())
            // The directory that holds the lock directory: under /run it is made again after
            // each boot, by the first run.
            .chain([config
                .lock_dir
                .parent()
                .unwrap_or(&config.lock_dir)
                .to_path_buf()])
            .collect();
        writable.sort();
        writable.dedup();
        UnitSettings {
            exe: exe.to_path_buf(),
            config: absolute(&config.path),
            user: config.schedules.user.clone(),
            environment_file: config.schedules.environment_file.clone(),
            writable,
        }
    }
}

/// A path in a unit file: systemd reads `%` as a specifier and splits on spaces.
fn unit_path(path: &Path) -> String {
    prefixed_unit_path("", path)
}

/// `prefix` (`-`: ignore if missing) goes inside the quotes systemd unquotes.
fn prefixed_unit_path(prefix: &str, path: &Path) -> String {
    let text = path.display().to_string().replace('%', "%%");
    match text.contains(char::is_whitespace) {
        true => format!("\"{prefix}{text}\""),
        false => format!("{prefix}{text}"),
    }
}

/// A `file://` URL of `path` for `Documentation=`: percent-encoded, the `%` doubled for
/// systemd's specifiers.
fn file_url(path: &Path) -> String {
    let encoded: String = path
        .display()
        .to_string()
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'.' | b'_' | b'~' | b'-' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("file://{}", encoded.replace('%', "%%"))
}

/// One word of an `ExecStart=` line as systemd will split and expand it: `%` is a specifier,
/// `$` a variable, `\\` an escape, whitespace a separator.
fn exec_word(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('%', "%%")
        .replace('$', "$$");
    match escaped.contains(char::is_whitespace) {
        true => format!("\"{escaped}\""),
        false => escaped,
    }
}

/// Every value a unit file is made of is one line of it: a control character (a newline
/// above all) in a path, a calendar or a command would start a directive of its own —
/// `ExecStartPre=` in a service, `Unit=` in a timer. Such a value is refused, named.
fn refuse_unit_injection(
    planned: &[Scheduled],
    settings: &UnitSettings,
    config: &Config,
) -> Result<()> {
    let mut values: Vec<(String, String)> = vec![
        (
            "the config path".to_string(),
            settings.config.display().to_string(),
        ),
        (
            "the lifeboat binary's path".to_string(),
            settings.exe.display().to_string(),
        ),
        (
            "schedule.environment_file".to_string(),
            settings.environment_file.display().to_string(),
        ),
    ];
    values.extend(
        settings
            .user
            .iter()
            .map(|u| ("schedule.user".to_string(), u.clone())),
    );
    values.extend(
        config
            .schedules
            .on_failure
            .iter()
            .map(|c| ("schedule.on_failure".to_string(), c.clone())),
    );
    values.extend(settings.writable.iter().map(|p| {
        (
            "a local repository, metrics_dir or lock_dir".to_string(),
            p.display().to_string(),
        )
    }));
    for scheduled in planned {
        values.push((scheduled.origin.clone(), scheduled.calendar.clone()));
        values.extend(
            scheduled
                .args
                .iter()
                .map(|a| (scheduled.origin.clone(), a.clone())),
        );
    }
    // A path in ReadWritePaths= or EnvironmentFile= cannot hold a quote, and a backslash at
    // the end of a line joins the next one to it.
    let paths = settings
        .writable
        .iter()
        .map(|p| ("a local repository, metrics_dir or lock_dir", p))
        .chain([("schedule.environment_file", &settings.environment_file)]);
    for (what, path) in paths {
        let text = path.display().to_string();
        if text.contains(['"', '\\']) {
            return Err(Error::config(format!(
                "{what}: {text:?} holds a quote or a backslash, which a unit file's path cannot"
            )));
        }
    }
    for (what, value) in values {
        if value.chars().any(char::is_control) {
            return Err(Error::config(format!(
                "{what}: {value:?} holds a control character, which would end its line of a unit file"
            )));
        }
    }
    if settings
        .environment_file
        .display()
        .to_string()
        .contains(char::is_whitespace)
    {
        return Err(Error::config(format!(
            "schedule.environment_file: '{}' holds a space, which EnvironmentFile= cannot take",
            settings.environment_file.display()
        )));
    }
    Ok(())
}

pub fn service_unit(scheduled: &Scheduled, settings: &UnitSettings) -> String {
    let mut unit = format!(
        "[Unit]\nDescription={}\nDocumentation={}\nWants=network-online.target\nAfter=network-online.target\nOnFailure={FAILURE_HOOK}%n.service\n\n\
         [Service]\nType=oneshot\nExecStart={} --config {} {}\n",
        scheduled.description,
        file_url(&settings.config),
        exec_word(&settings.exe.display().to_string()),
        exec_word(&settings.config.display().to_string()),
        scheduled
            .args
            .iter()
            .map(|a| exec_word(a))
            .collect::<Vec<_>>()
            .join(" ")
    );
    // 75: another run of the job holds its lock and does the work. For status, 1 is
    // WARNING: only CRITICAL and UNKNOWN start the failure hook.
    unit.push_str(match scheduled.work {
        Work::Monitor => "SuccessExitStatus=1\n",
        Work::Heartbeat => "",
        _ => "SuccessExitStatus=75\n",
    });
    // A drill runs as root so that its scratch cluster runs as `lifeboat-scratch`: code in
    // the restored data then reaches neither this user's keys nor the production servers.
    if let Some(user) = settings
        .user
        .as_ref()
        .filter(|_| scheduled.work != Work::Drill)
    {
        unit.push_str(&format!("User={user}\nGroup={user}\n"));
    }
    // `-`: a host whose credentials come from an instance role has no such file.
    unit.push_str(&format!(
        "EnvironmentFile=-{}\n",
        unit_path(&settings.environment_file)
    ));
    if scheduled.work == Work::Backup {
        unit.push_str("Nice=10\nIOSchedulingClass=best-effort\nIOSchedulingPriority=7\n");
    }
    // Drill reports are written relative to the working directory: a state directory that
    // systemd creates, not the root of the file system.
    unit.push_str("StateDirectory=lifeboat\nWorkingDirectory=/var/lib/lifeboat\nUMask=0077\n");
    for path in &settings.writable {
        unit.push_str(&format!(
            "ReadWritePaths={}\n",
            prefixed_unit_path("-", path)
        ));
    }
    let capabilities = match (scheduled.work, scheduled.reads_everything) {
        // The drill's root makes the scratch cluster's directory, hands it to the scratch
        // user, starts the server as that user and kills what it leaves behind; a files
        // drill restores owners, modes and file capabilities.
        (Work::Drill, _) => {
            "CAP_CHOWN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER CAP_SETUID CAP_SETGID CAP_KILL CAP_SETFCAP"
        }
        // A files job's paths belong to other users; reading them is all it needs of root.
        (_, true) => "CAP_DAC_READ_SEARCH",
        (_, false) => "",
    };
    unit.push_str(&format!("CapabilityBoundingSet={capabilities}\n"));
    if scheduled.work != Work::Drill {
        unit.push_str(&format!("AmbientCapabilities={capabilities}\n"));
    }
    unit.push_str(HARDENING);
    unit
}

/// What every unit forgoes, beyond its user and its writable paths.
const HARDENING: &str = "ProtectSystem=strict\nProtectHome=read-only\nPrivateTmp=true\nPrivateDevices=true\n\
    NoNewPrivileges=true\nProtectKernelTunables=true\nProtectKernelModules=true\nProtectKernelLogs=true\n\
    ProtectControlGroups=true\nProtectClock=true\nProtectHostname=true\nProtectProc=invisible\n\
    RestrictSUIDSGID=true\nRestrictRealtime=true\nRestrictNamespaces=true\nLockPersonality=true\n\
    RemoveIPC=true\nPrivateMounts=true\nSystemCallArchitectures=native\nSystemCallFilter=@system-service\n\
    SystemCallErrorNumber=EPERM\nRestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\n";

pub fn timer_unit(scheduled: &Scheduled) -> String {
    let mut unit = format!(
        "[Unit]\nDescription={} ({})\n\n[Timer]\nOnCalendar={}\n",
        scheduled.description, scheduled.calendar, scheduled.calendar,
    );
    match randomized_delay(scheduled.work) {
        Some(delay) => unit.push_str(&format!(
            "Persistent=true\nRandomizedDelaySec={delay}\nAccuracySec=1min\n"
        )),
        // A missed heartbeat is not made up at boot; it is simply the next minute's.
        None => unit.push_str("AccuracySec=1s\n"),
    }
    unit.push_str("\n[Install]\nWantedBy=timers.target\n");
    unit
}

/// `lifeboat-failure@.service`: started by a failed service with its name as the instance.
/// It runs `[schedule] on_failure` with that name, or logs an error line for the journal's
/// watchers; either way the metrics have recorded the run.
pub fn failure_hook_unit(config: &Config, settings: &UnitSettings) -> String {
    let exec = match &config.schedules.on_failure {
        Some(command) => format!("{} %i", command.replace('%', "%%")),
        None => {
            "/usr/bin/logger --priority daemon.err --tag lifeboat \"%i failed: journalctl -u %i\""
                .to_string()
        }
    };
    let mut unit = format!(
        "[Unit]\nDescription=lifeboat: report that %i failed\nDocumentation={}\n\n\
         [Service]\nType=oneshot\nExecStart={exec}\n",
        file_url(&settings.config)
    );
    if let Some(user) = &settings.user {
        unit.push_str(&format!("User={user}\nGroup={user}\n"));
    }
    // No EnvironmentFile: the hook is handed no storage credential or key it does not need.
    unit.push_str("UMask=0077\nCapabilityBoundingSet=\nAmbientCapabilities=\n");
    unit.push_str(HARDENING);
    unit
}

pub async fn run(config: &Config, options: &ScheduleOptions) -> Result<ScheduleReport> {
    let planned = plan(config)?;
    if planned.is_empty() {
        return Err(Error::usage(format!(
            "nothing is scheduled in '{}'",
            config.path.display()
        ))
        .with_hint("set `schedule` on a job, or `[schedule] prune`/`replicate`/`drills`"));
    }
    let exe = std::env::current_exe().map_err(|e| {
        Error::new(ErrorKind::Source, "unable to find the lifeboat binary").with_source(e)
    })?;
    let settings = UnitSettings::of(config, &exe);
    let mut report = ScheduleReport {
        format: match options.format {
            Format::Systemd => "systemd",
            Format::Cron => "cron",
        },
        written: Vec::new(),
        text: String::new(),
    };
    refuse_unit_injection(&planned, &settings, config)?;
    for scheduled in &planned {
        systemd_accepts(scheduled)?;
    }
    match options.format {
        Format::Cron => {
            report.text.push_str(&format!(
                "# lifeboat schedules; install with `crontab -u {} -e`\n",
                settings.user.as_deref().unwrap_or("root")
            ));
            for scheduled in &planned {
                let fields = cron_fields(&scheduled.calendar).ok_or_else(|| {
                    Error::usage(format!(
                        "{}: \"{}\" has no exact cron equivalent",
                        scheduled.origin, scheduled.calendar
                    ))
                    .with_hint("use `lifeboat schedule systemd`, or a simpler expression such as \"*-*-* 03:00:00\"")
                })?;
                report.text.push_str(&format!(
                    "{fields} {} --config {} -q {}\n",
                    exe.display(),
                    settings.config.display(),
                    scheduled.args.join(" ")
                ));
            }
        }
        Format::Systemd if !options.install => {
            for scheduled in &planned {
                report.text.push_str(&format!(
                    "# {0}.service\n{1}\n# {0}.timer\n{2}\n",
                    scheduled.name,
                    service_unit(scheduled, &settings),
                    timer_unit(scheduled)
                ));
            }
            report.text.push_str(&format!(
                "# {FAILURE_HOOK}.service\n{}",
                failure_hook_unit(config, &settings)
            ));
        }
        Format::Systemd => install(config, &planned, &settings, options, &mut report)?,
    }
    Ok(report)
}

fn install(
    config: &Config,
    planned: &[Scheduled],
    settings: &UnitSettings,
    options: &ScheduleOptions,
    report: &mut ScheduleReport,
) -> Result<()> {
    let write = |path: &Path, text: &str| {
        std::fs::write(path, text).map_err(|e| {
            Error::new(
                ErrorKind::Target,
                format!("unable to write unit file '{}'", path.display()),
            )
            .with_source(e)
        })
    };
    for scheduled in planned {
        let service = options.unit_dir.join(format!("{}.service", scheduled.name));
        let timer = options.unit_dir.join(format!("{}.timer", scheduled.name));
        write(&service, &service_unit(scheduled, settings))?;
        write(&timer, &timer_unit(scheduled))?;
        report.written.push(service.display().to_string());
        report.written.push(timer.display().to_string());
    }
    let hook = options.unit_dir.join(format!("{FAILURE_HOOK}.service"));
    write(&hook, &failure_hook_unit(config, settings))?;
    report.written.push(hook.display().to_string());
    if options.unit_dir != Path::new(SYSTEMD_UNIT_DIR) {
        return Ok(());
    }
    systemctl(&["daemon-reload"])?;
    for scheduled in planned {
        systemctl(&["enable", "--now", &format!("{}.timer", scheduled.name)])?;
    }
    Ok(())
}

fn systemctl(args: &[&str]) -> Result<()> {
    let output = Command::new("systemctl")
        .args(args)
        .output()
        .map_err(|e| Error::new(ErrorKind::Source, "unable to run systemctl").with_source(e))?;
    if output.status.success() {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Source,
        format!(
            "`systemctl {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    ))
}
