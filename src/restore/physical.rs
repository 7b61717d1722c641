//! Restoring a physical backup: the base backup unpacked into an empty data directory, set
//! up to replay WAL from the archive (`restore_command = lifeboat wal-fetch`) up to a time,
//! an LSN, or the end of the archive, then promote. With `--start` the server is started
//! and lifeboat waits until recovery has finished.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::extract::{Ownership, give_to};
use super::files::{Target, target_error, unpack};
use super::{RestoreReport, Selected};
use crate::config::Config;
use crate::continuity::{self, ArchiveListing, Point, TimelineChoice};
use crate::error::{Error, ErrorKind, Result};
use crate::layout::BASE_OBJECT;
use crate::manifest::Manifest;
use crate::repository::Repository;
use crate::sources::postgres::Binaries;
use crate::wal::{self, Lsn};

/// Where recovery stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// Replay everything the archive holds.
    EndOfArchive,
    Time(DateTime<Utc>),
    Lsn(Lsn),
}

impl RecoveryTarget {
    /// Whether a backup that ends at `manifest`'s stop can reach this target: recovery
    /// cannot stop before the backup is consistent.
    pub fn reachable_from(&self, manifest: &Manifest) -> bool {
        match self {
            RecoveryTarget::EndOfArchive => true,
            RecoveryTarget::Time(at) => manifest.recovery_point <= *at,
            RecoveryTarget::Lsn(lsn) => manifest
                .source
                .stop_lsn
                .as_deref()
                .and_then(Lsn::parse)
                .is_some_and(|stop| stop <= *lsn),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            RecoveryTarget::EndOfArchive => "the end of the WAL archive".to_string(),
            RecoveryTarget::Time(at) => at.to_rfc3339(),
            RecoveryTarget::Lsn(lsn) => format!("LSN {lsn}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct PhysicalRestoreOptions {
    pub data_dir: PathBuf,
    pub target: RecoveryTarget,
    /// Start the server and wait until recovery has finished.
    pub start: bool,
    /// `port` for the restored server.
    pub port: Option<u16>,
    /// Leave `archive_mode` as the backup had it; by default the restored server does not
    /// archive, so a test restore never writes a new timeline into the production archive.
    pub keep_archiving: bool,
    /// Recover to a gap in the archive rather than refuse (`--accept-gap`).
    pub accept_gap: bool,
    /// The timeline recovery follows (`--timeline`).
    pub timeline: TimelineChoice,
    /// Read WAL (and the backup) from this repository only.
    pub from: Option<String>,
    /// Never read WAL from these repositories (a drill playing their loss).
    pub exclude: Vec<String>,
    pub bin_dir: Option<PathBuf>,
    /// Fetch WAL through this relay socket (a drill's, see `wal_relay`) rather than with
    /// this binary, config and credentials.
    pub wal_relay: Option<PathBuf>,
}

impl PhysicalRestoreOptions {
    pub fn target_description(&self) -> String {
        self.target.describe()
    }
}

/// How the restored cluster fetches its WAL: this very binary and config.
pub struct WalSource {
    pub config_path: PathBuf,
    pub job: String,
    /// The identity file that decrypts the archive, if the restore was given one.
    pub identity_file: Option<PathBuf>,
}

/// What the archive lets this restore reach, known before anything is written: the
/// segment recovery will end with and what the report says of it.
#[derive(Debug, Default)]
pub(super) struct ReplayPlan {
    /// For a restore to the end of the archive: the last segment recovery can replay, which
    /// it must reach.
    end_of_archive: Option<Point>,
    notes: Vec<String>,
    warnings: Vec<String>,
}

/// Lists the archive in the repositories this restore reads WAL from and refuses what
/// would stop short in silence: a segment the backup needs to be consistent missing, a
/// restore to the end (without `--accept-gap`) or to a target past a gap, a target LSN past
/// the archived WAL.
pub(super) async fn plan_replay(
    config: &Config,
    manifest: &Manifest,
    options: &PhysicalRestoreOptions,
    listed: Option<ArchiveListing>,
) -> Result<ReplayPlan> {
    let job = &manifest.job;
    let repositories =
        Repository::readable(config, options.from.as_deref(), &options.exclude).await?;
    let names = repositories
        .iter()
        .map(|r| format!("'{}'", r.name))
        .collect::<Vec<_>>()
        .join(", ");
    let Some((reach, listing, last)) =
        continuity::reach_of_manifest(&repositories, manifest, options.timeline, listed).await?
    else {
        return Ok(ReplayPlan {
            warnings: vec![format!(
                "backup '{job}/{}' does not record its WAL range, so the archive's continuity was not checked",
                manifest.id
            )],
            ..ReplayPlan::default()
        });
    };
    let unreachable = |error: Error| {
        listing
            .unreachable
            .iter()
            .fold(error, |error, (name, cause)| {
                error.with_hint(format!(
                    "repository '{name}' could not be listed and may hold it: {cause}"
                ))
            })
    };
    let end = reach.gap_free_end.clone();
    if end.as_ref().is_none_or(|end| end.segment < last) {
        return Err(unreachable(Error::new(
            ErrorKind::Verification,
            format!(
                "unable to restore backup '{job}/{}': WAL segment {} it needs to be consistent is in none of the repositories {names}",
                manifest.id, reach.first_missing
            ),
        ))
        .with_hint(format!(
            "pick an older backup with --backup (`lifeboat list {job}`), or copy the segment into a repository from wherever it survives"
        )));
    }
    let end = end.expect("checked above");
    let reached = format!(
        "the archive reaches the end of {} (stored {})",
        end.name,
        continuity::describe_time(end.stored_at)
    );
    let gap = |target: &str| {
        unreachable(Error::new(
            ErrorKind::Verification,
            format!(
                "unable to restore job '{job}' to {target}: WAL segment {} is in none of the repositories {names}, and the archive goes on after it ({}); recovery would stop at the end of {} (stored {}) and lose the rest",
                reach.first_missing,
                reach.lost_range().unwrap_or_default(),
                end.name,
                continuity::describe_time(end.stored_at)
            ),
        ))
        .with_hint(format!(
            "copy {} into a repository from wherever it survives (`lifeboat replicate {job}` fills one region in from another), then run the restore again",
            reach.first_missing
        ))
    };
    // Only `latest` promises the newest timeline; a timeline it cannot find would be left
    // behind in silence.
    if options.timeline == TimelineChoice::Latest
        && let Some(unfollowed) = &reach.unfollowed
    {
        let timeline = &unfollowed[..8];
        return Err(unreachable(Error::new(
            ErrorKind::Verification,
            format!(
                "unable to restore job '{job}' to {}: WAL of a later timeline is archived (from {unfollowed}) but the history file {timeline}.history, or one before it, is in none of the repositories {names}, so recovery cannot follow it and would end with {}",
                options.target.describe(),
                end.name
            ),
        ))
        .with_hint(format!(
            "copy {timeline}.history into a repository from wherever it survives, or say --timeline current to recover along the backup's own timeline and leave the later one behind"
        )));
    }
    let mut plan = check_target(job, options, &reach, &end, &gap, &unreachable)?;
    plan.notes.push(reached);
    Ok(plan)
}

/// What the recovery target asks of the archive the backup is carried by (`reach`, ending
/// gap-free at `end`): refused when it lies past a gap or past the archived WAL.
fn check_target(
    job: &str,
    options: &PhysicalRestoreOptions,
    reach: &continuity::Reach,
    end: &Point,
    gap: &dyn Fn(&str) -> Error,
    unreachable: &dyn Fn(Error) -> Error,
) -> Result<ReplayPlan> {
    let mut plan = ReplayPlan::default();
    match options.target {
        RecoveryTarget::EndOfArchive if reach.resumes_at.is_some() => {
            if !options.accept_gap {
                return Err(gap(&options.target.describe()).with_hint(format!(
                    "or add --accept-gap to recover to the end of {} and lose what was written after it",
                    end.name
                )));
            }
            plan.warnings.push(format!(
                "--accept-gap: recovering to the gap: WAL segment {} is in no repository, so recovery ends with {} (stored {}); the WAL archived after it, {}, is not replayed",
                reach.first_missing,
                end.name,
                continuity::describe_time(end.stored_at),
                reach.lost_range().unwrap_or_default()
            ));
            plan.end_of_archive = Some(end.clone());
        }
        RecoveryTarget::EndOfArchive => plan.end_of_archive = Some(end.clone()),
        RecoveryTarget::Time(at) => {
            let past_gap = end.stored_at.is_none_or(|stored| at > stored);
            if reach.resumes_at.is_some() && past_gap {
                return Err(gap(&options.target.describe()).with_hint(format!(
                    "a target at or before {} is reachable",
                    continuity::describe_time(end.stored_at)
                )));
            }
        }
        RecoveryTarget::Lsn(lsn) => {
            let end_lsn = reach.end_lsn().expect("a gap-free end");
            if lsn > end_lsn {
                if reach.resumes_at.is_some() {
                    return Err(gap(&options.target.describe())
                        .with_hint(format!("a target up to LSN {end_lsn} is reachable")));
                }
                return Err(unreachable(Error::new(
                    ErrorKind::Verification,
                    format!(
                        "unable to restore job '{job}' to LSN {lsn}: the archived WAL ends at LSN {end_lsn}, with {} (stored {})",
                        end.name,
                        continuity::describe_time(end.stored_at)
                    ),
                ))
                .with_hint("a target up to that LSN is reachable, or wait until the server has archived the segment holding it"));
            }
        }
    }
    Ok(plan)
}

pub(super) async fn restore(
    selected: Selected,
    options: &PhysicalRestoreOptions,
    source: &WalSource,
    plan: ReplayPlan,
) -> Result<RestoreReport> {
    let into = &options.data_dir;
    let binaries = server_binaries(&selected.manifest, options.bin_dir.as_deref())?;
    let target = Target::prepare(into)?;
    let mut stages = Vec::new();
    let clock = Instant::now();
    let (bytes, transfer, owner, inherited) = target
        .undo_on_error(async {
            // Private before anything is moved into it, as PostgreSQL wants it anyway.
            rustix::fs::fchmod(target.dir.fd(), rustix::fs::Mode::from_raw_mode(0o700))
                .map_err(|e| target_error(into, e.into()))?;
            let owner = data_dir_owner(&target)?;
            let ownership = match owner {
                Some((uid, gid)) => Ownership::Fixed(uid, gid),
                None => Ownership::Unpacker,
            };
            let (unpacked, transfer) = unpack(&selected, BASE_OBJECT, &target, ownership).await?;
            // A data directory that cannot be set up is no restore: it is removed again.
            let inherited = configure_recovery(&target, options, source, owner)?;
            Ok((unpacked.bytes, transfer, owner, inherited))
        })
        .await?;
    stages.push(("download, verify and unpack".to_string(), clock.elapsed()));

    let mut warnings = target.warnings();
    warnings.extend(plan.warnings);
    warnings.extend(setup_warnings(options, source, &inherited));
    let mut restored = vec![format!(
        "base backup {} replaying to {}",
        selected.manifest.id,
        options.target.describe()
    )];
    restored.extend(plan.notes);
    if options.start {
        let clock = Instant::now();
        let redo_done = start_and_wait(&binaries, into, owner).await?;
        stages.push(("WAL replay".to_string(), clock.elapsed()));
        match stopped_where(
            redo_done,
            plan.end_of_archive.as_ref(),
            &selected.manifest,
            into,
            &into.join("lifeboat-recovery.log"),
        ) {
            Ok(stopped) => restored.push(stopped),
            Err(e) => {
                // Short of what was asked: no server keeps running with that data.
                let stop = pg_ctl(&binaries, into, owner, &["stop", "--mode=fast", "--wait"]);
                return Err(match stop {
                    Ok(()) => e.with_hint(format!(
                        "lifeboat stopped the server; '{}' holds the data as far as it got",
                        into.display()
                    )),
                    Err(stop) => e.with_hint(format!(
                        "stop the server, which is still running: {}",
                        stop.chain().join(": ")
                    )),
                });
            }
        }
        restored.push("recovery finished, server running".to_string());
        // Promoted: the recovery settings have done their work. Left in place, every base
        // backup of this cluster (it may become the primary) would carry them.
        match forget_recovery_settings(&target, owner) {
            Ok(()) => {
                restored.push(
                    "recovery settings removed from postgresql.auto.conf after promotion"
                        .to_string(),
                );
                if options.keep_archiving {
                    pg_ctl(&binaries, into, owner, &["reload"])?;
                    restored.push(
                        "archiving resumed: the new timeline goes to the job's archive".to_string(),
                    );
                }
            }
            Err(e) => warnings.push(format!(
                "unable to remove the recovery settings from '{}' after promotion ({e}): remove the lines below \"{RESTORE_MARK}\" before this cluster's base backups are taken",
                into.join("postgresql.auto.conf").display()
            )),
        }
    } else {
        restored.push(format!(
            "start it with `pg_ctl -D {} start`",
            into.display()
        ));
        warnings.push(format!(
            "once the server has promoted, remove the recovery settings below \"{RESTORE_MARK}\" in '{}': every base backup of this cluster carries them",
            into.join("postgresql.auto.conf").display()
        ));
    }
    let mut report = selected.report(
        format!("data directory '{}'", into.display()),
        restored,
        bytes,
        warnings,
        stages,
    );
    report.archive_end = plan.end_of_archive;
    report.transfer = Some(transfer);
    Ok(report)
}

/// What the operator must know about the restored cluster's setup: settings replaced, who
/// fetches WAL with which credentials, archiving off.
fn setup_warnings(
    options: &PhysicalRestoreOptions,
    source: &WalSource,
    inherited: &[String],
) -> Vec<String> {
    let mut warnings = Vec::new();
    if !inherited.is_empty() {
        warnings.push(format!(
            "removed recovery settings the base backup carried (this restore sets its own): {}",
            inherited.join(", ")
        ));
    }
    if options.wal_relay.is_none() {
        warnings.push(format!(
            "the restored server fetches WAL with `lifeboat wal-fetch` as its own user: that user needs to read '{}'{} and the repositories' credentials",
            source.config_path.display(),
            match &source.identity_file {
                Some(identity) => format!(
                    ", the identity file '{}' (its own, mode 0600)",
                    identity.display()
                ),
                None => String::new(),
            }
        ));
    }
    if !options.keep_archiving {
        warnings.push(
            "archive_mode is off in the restored cluster; when it becomes the primary, turn it on with its own job".to_string(),
        );
    }
    warnings
}

/// The server binaries of the backup's major version: a data directory only starts with
/// those.
fn server_binaries(manifest: &Manifest, bin_dir: Option<&Path>) -> Result<Binaries> {
    let major = manifest.server_major().ok_or_else(|| {
        Error::new(
            ErrorKind::Verification,
            format!(
                "unable to restore backup '{}/{}': its manifest has no server version",
                manifest.job, manifest.id
            ),
        )
    })?;
    let binaries = Binaries::find(bin_dir, major)?;
    if binaries.major != major || !binaries.dir.join("postgres").is_file() {
        return Err(Error::new(
            ErrorKind::Target,
            format!(
                "unable to restore backup '{}/{}': it is a PostgreSQL {major} data directory and the PostgreSQL {major} server binaries were not found",
                manifest.job, manifest.id
            ),
        )
        .with_hint(format!("install postgresql-{major}, or set bin_dir on the job")));
    }
    Ok(binaries)
}

/// Who the restored files must belong to: as root, the owner of the directory when it was
/// made ready beforehand (`install -d -o postgres -m 700 DIR`), else `postgres`; otherwise
/// whoever restores.
fn data_dir_owner(target: &Target) -> Result<Option<(u32, u32)>> {
    let into = &target.path;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let meta = rustix::fs::fstat(target.dir.fd()).map_err(|e| target_error(into, e.into()))?;
    if meta.st_uid != 0 {
        return Ok(Some((meta.st_uid, meta.st_gid)));
    }
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam with a valid C string; the entry is read at once.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(Error::new(
            ErrorKind::Target,
            format!(
                "unable to restore into '{}' as root: PostgreSQL will not run as root and there is no 'postgres' user to own the data",
                into.display()
            ),
        )
        .with_hint("create the directory owned by the server's user first: install -d -o USER -m 700 DIR"));
    }
    // SAFETY: a non-null entry from getpwnam.
    Ok(Some(unsafe { ((*entry).pw_uid, (*entry).pw_gid) }))
}

/// Shell-quotes one word for `restore_command`, which PostgreSQL runs with /bin/sh.
fn shell_word(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// A value in postgresql.conf syntax.
fn conf_string(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Appends the recovery settings to `postgresql.auto.conf` (they override postgresql.conf)
/// and creates `recovery.signal`.
/// The settings a restore owns. One the base backup carries (a cluster restored to a target
/// and promoted keeps its `recovery_target_time` in `postgresql.auto.conf`, and so does every
/// base backup of it) would stop this restore's replay where that earlier one stopped.
const RECOVERY_SETTINGS: [&str; 15] = [
    "restore_command",
    "recovery_end_command",
    "archive_cleanup_command",
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_inclusive",
    "recovery_target_action",
    "recovery_target_timeline",
    "primary_conninfo",
    "primary_slot_name",
    "promote_trigger_file",
    "standby_mode",
];

/// The recovery targets: those this restore does not set are set empty, which overrides a
/// value in `postgresql.conf` or a file it includes.
const RECOVERY_TARGETS: [&str; 5] = [
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
];

/// `postgresql.auto.conf` without the lines setting what a restore owns, and the names of
/// the settings removed (not their values: `primary_conninfo` may hold a password).
fn without_recovery_settings(auto_conf: &str) -> (String, Vec<String>) {
    let mut kept = String::new();
    let mut removed = Vec::new();
    for line in auto_conf.lines() {
        let name = line
            .split(['=', ' ', '\t'])
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if RECOVERY_SETTINGS.contains(&name.as_str()) {
            if !removed.contains(&name) {
                removed.push(name);
            }
        } else {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    (kept, removed)
}

/// The comment above the settings a restore writes into `postgresql.auto.conf`.
const RESTORE_MARK: &str = "# Written by lifeboat restore";

/// What archives nothing, and fails so that PostgreSQL keeps the files for later.
const HELD_ARCHIVE_COMMAND: &str = "false";

/// Rewrites `postgresql.auto.conf` of a promoted cluster without the recovery settings and
/// the restore's comment; what else it sets (port, archive_mode, the backup's own lines)
/// stays.
fn forget_recovery_settings(target: &Target, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    use rustix::fs::OFlags;
    let dir = &target.dir;
    let auto_conf = Path::new("postgresql.auto.conf");
    let existing = std::io::read_to_string(std::fs::File::from(
        dir.open_file(auto_conf, OFlags::RDONLY)?,
    ))?;
    let (kept, _) = without_recovery_settings(&existing);
    let held = format!("archive_command = {}", conf_string(HELD_ARCHIVE_COMMAND));
    let kept: String = kept
        .lines()
        .filter(|line| !line.starts_with(RESTORE_MARK) && *line != held)
        .flat_map(|line| [line, "\n"])
        .collect();
    let staged = Path::new("postgresql.auto.conf.lifeboat");
    let _ = rustix::fs::unlinkat(dir.fd(), staged, rustix::fs::AtFlags::empty());
    let mut file =
        std::fs::File::from(dir.open_file(staged, OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL)?);
    std::io::Write::write_all(&mut file, kept.as_bytes())?;
    file.sync_all()?;
    give_to(&file, owner)?;
    rustix::fs::renameat(dir.fd(), staged, dir.fd(), auto_conf)?;
    Ok(())
}

/// `lifeboat wal-fetch` with this restore's config, job, repositories and identity: the
/// server fetches WAL long after this process is gone, without its environment.
fn fetch_command(exe: &Path, options: &PhysicalRestoreOptions, source: &WalSource) -> String {
    let mut fetch = format!(
        "{} --config {} wal-fetch --job {}",
        shell_word(&exe.to_string_lossy()),
        shell_word(&source.config_path.to_string_lossy()),
        shell_word(&source.job)
    );
    if let Some(from) = &options.from {
        write!(fetch, " --from {}", shell_word(from)).expect("writing to a String");
    }
    for excluded in &options.exclude {
        write!(fetch, " --exclude {}", shell_word(excluded)).expect("writing to a String");
    }
    if let Some(identity) = &source.identity_file {
        let identity = std::path::absolute(identity).unwrap_or_else(|_| identity.clone());
        write!(
            fetch,
            " --identity-file {}",
            shell_word(&identity.to_string_lossy())
        )
        .expect("writing to a String");
    }
    fetch
}

/// The lines appended to `postgresql.auto.conf`: how to fetch WAL (`fetch`), where to stop,
/// and what the restored server does with WAL of its own.
fn recovery_settings(options: &PhysicalRestoreOptions, fetch: &str, end: Option<&str>) -> String {
    let mut settings = format!(
        "\n{RESTORE_MARK} at {}: replay WAL from the archive, then promote.\n",
        Utc::now().to_rfc3339()
    );
    let mut set = |name: &str, value: String| {
        writeln!(settings, "{name} = {value}").expect("writing to a String");
    };
    set("restore_command", conf_string(fetch));
    if let Some(end) = end {
        set("recovery_end_command", conf_string(end));
    }
    let chosen = match options.target {
        RecoveryTarget::EndOfArchive => None,
        RecoveryTarget::Time(_) => Some("recovery_target_time"),
        RecoveryTarget::Lsn(_) => Some("recovery_target_lsn"),
    };
    // First: PostgreSQL applies settings in the order written, and emptying a target after
    // another was set is "multiple recovery targets specified".
    for unused in RECOVERY_TARGETS.iter().filter(|t| Some(**t) != chosen) {
        set(unused, conf_string(""));
    }
    match options.target {
        RecoveryTarget::EndOfArchive => {}
        RecoveryTarget::Time(at) => {
            set(
                "recovery_target_time",
                conf_string(&at.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()),
            );
            set("recovery_target_action", conf_string("promote"));
        }
        RecoveryTarget::Lsn(lsn) => {
            set("recovery_target_lsn", conf_string(&lsn.to_string()));
            set("recovery_target_action", conf_string("promote"));
        }
    }
    set(
        "recovery_target_timeline",
        conf_string(&options.timeline.setting()),
    );
    if !options.keep_archiving {
        set("archive_mode", conf_string("off"));
    } else if options.start {
        // Held until lifeboat has checked where replay ended: a promotion short of the end
        // must not put its new timeline into the job's archive, where every later restore
        // would follow it. PostgreSQL keeps what it could not archive and sends it once the
        // real command is back (`forget_recovery_settings`, then a reload).
        set("archive_command", conf_string(HELD_ARCHIVE_COMMAND));
    }
    if let Some(port) = options.port {
        set("port", port.to_string());
    }
    settings
}

/// Writes the recovery settings into the restored data directory, replacing any the base
/// backup carried; returns what it removed (settings, and a `standby.signal`).
fn configure_recovery(
    target: &Target,
    options: &PhysicalRestoreOptions,
    source: &WalSource,
    owner: Option<(u32, u32)>,
) -> Result<Vec<String>> {
    let exe = std::env::current_exe().map_err(|e| {
        Error::new(
            ErrorKind::Target,
            "unable to find the lifeboat binary for restore_command",
        )
        .with_source(e)
    })?;
    let mut fetch = match &options.wal_relay {
        Some(socket) => format!(
            "{} wal-fetch --via {}",
            shell_word(&exe.to_string_lossy()),
            shell_word(&socket.to_string_lossy())
        ),
        None => fetch_command(&exe, options, source),
    };
    fetch.push_str(" %f %p");
    // What wal-fetch fetched ahead of replay and recovery did not ask for (see
    // `wal_archive::prefetch`); the spool is in pg_wal, and the command runs in the data
    // directory.
    let clear_spool = options.wal_relay.is_none().then(|| {
        format!(
            "{} wal-prefetch --clear --spool {}",
            shell_word(&exe.to_string_lossy()),
            shell_word(&format!("pg_wal/{}", crate::wal_archive::SPOOL_NAME))
        )
    });
    let settings = recovery_settings(options, &fetch, clear_spool.as_deref());
    // Through handles beneath the data directory, never through a symlink the base backup
    // may hold in their place.
    let into = &target.path;
    let write = || -> std::io::Result<Vec<String>> {
        use rustix::fs::OFlags;
        let dir = &target.dir;
        let give = |fd: &dyn std::os::fd::AsFd| give_to(fd, owner).map_err(std::io::Error::from);
        let auto_conf = Path::new("postgresql.auto.conf");
        let existing = match dir.open_file(auto_conf, OFlags::RDONLY) {
            Ok(fd) => std::io::read_to_string(std::fs::File::from(fd))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let (kept, mut removed) = without_recovery_settings(&existing);
        // A new file renamed over the old: a restore stopped here leaves one or the other.
        let staged = Path::new("postgresql.auto.conf.lifeboat");
        let _ = rustix::fs::unlinkat(dir.fd(), staged, rustix::fs::AtFlags::empty());
        let mut auto = std::fs::File::from(
            dir.open_file(staged, OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL)?,
        );
        std::io::Write::write_all(&mut auto, kept.as_bytes())?;
        std::io::Write::write_all(&mut auto, settings.as_bytes())?;
        give(&auto)?;
        rustix::fs::renameat(dir.fd(), staged, dir.fd(), auto_conf)?;
        // A standby's signal would make the restored cluster a standby that never promotes.
        match rustix::fs::unlinkat(dir.fd(), "standby.signal", rustix::fs::AtFlags::empty()) {
            Ok(()) => removed.push("standby.signal".to_string()),
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
        give(&dir.open_file(
            Path::new("recovery.signal"),
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC,
        )?)?;
        // pg_basebackup leaves pg_wal empty (or out, when it is a symlink elsewhere).
        give(&dir.create_directory(Path::new("pg_wal"))?)?;
        give(&dir.create_directory(Path::new("pg_wal/archive_status"))?)?;
        // Packaged clusters keep their config outside the data directory.
        give(&dir.open_file(
            Path::new("postgresql.conf"),
            OFlags::WRONLY | OFlags::CREATE,
        )?)?;
        rustix::fs::fchmod(dir.fd(), rustix::fs::Mode::from_raw_mode(0o700))?;
        give_to(dir.fd(), owner)?;
        Ok(removed)
    };
    write().map_err(|e| {
        Error::new(
            ErrorKind::Target,
            format!("unable to set up recovery in '{}'", into.display()),
        )
        .with_source(e)
    })
}

/// Starts the restored server with pg_ctl (it keeps running after lifeboat exits) and waits
/// until recovery has finished: `recovery.signal` gone and the control file "in production".
async fn start_and_wait(
    binaries: &Binaries,
    into: &Path,
    owner: Option<(u32, u32)>,
) -> Result<Option<Lsn>> {
    let log = into.join("lifeboat-recovery.log");
    let mut pg_ctl = binaries.server_command("pg_ctl");
    // The restored server runs `lifeboat wal-fetch` (and with --keep-archiving, wal-push).
    crate::sources::process::pass_storage_credentials(&mut pg_ctl);
    pg_ctl
        .arg("start")
        .arg("--pgdata")
        .arg(into)
        .arg("--log")
        .arg(&log)
        // pg_ctl notices a server that dies while starting; how long replay until it accepts
        // connections takes is the data's business, not a timeout's.
        .args(["--wait", "--timeout=2147483"])
        .env("LC_MESSAGES", "C");
    if let Some((uid, gid)) = owner {
        use std::os::unix::process::CommandExt;
        pg_ctl.uid(uid).gid(gid);
        // The server's wal-fetch then reads its user's own files (`~/.aws`), not root's,
        // which it may not read: each try warned into the recovery log, pushing the cause
        // of a failure out of the lines a failed restore shows.
        match home_of(uid) {
            Some(home) => pg_ctl.env("HOME", home),
            None => pg_ctl.env_remove("HOME"),
        };
    }
    let started = tokio::task::spawn_blocking(move || {
        crate::sources::process::run(pg_ctl, "start the restored server with pg_ctl")
    })
    .await
    .map_err(|e| {
        Error::new(ErrorKind::Target, "unable to start the restored server").with_source(e)
    })?;
    let failed = |why: &str| {
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = log_text.lines().rev().take(20).collect();
        Error::new(
            ErrorKind::Target,
            format!("the restored server in '{}' {why}", into.display()),
        )
        .with_hint(format!(
            "its log '{}' ends with:\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ))
        .with_hint(format!(
            "'{}' holds the base backup part-way through recovery: fix what the log names and start it again as its owner (`pg_ctl -D {} start`; replay goes on from where it stopped), or empty it and run the restore again; once it has promoted, remove the lines below \"{RESTORE_MARK}\" in its postgresql.auto.conf (with --keep-archiving they hold archiving with archive_command = 'false') and reload it",
            into.display(),
            into.display()
        ))
    };
    if let Err(e) = started {
        let hint = failed("did not start").hints().join("\n");
        return Err(e.with_hint(hint));
    }
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let pid_file = std::fs::read_to_string(into.join("postmaster.pid")).ok();
        let alive = pid_file
            .as_deref()
            .and_then(|text| text.lines().next())
            .and_then(|pid| pid.trim().parse::<i32>().ok())
            // SAFETY: signal 0 only checks that the process exists.
            .is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0);
        if !alive {
            return Err(failed("stopped during recovery"));
        }
        if alive && !into.join("recovery.signal").exists() && in_production(binaries, into) {
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            return Ok(redo_done_at(&log_text));
        }
    }
}

/// Runs `pg_ctl ARGS --pgdata DIR` as the data directory's owner.
fn pg_ctl(
    binaries: &Binaries,
    into: &Path,
    owner: Option<(u32, u32)>,
    args: &[&str],
) -> Result<()> {
    let mut command = binaries.server_command("pg_ctl");
    command.args(args).arg("--pgdata").arg(into);
    if let Some((uid, gid)) = owner {
        use std::os::unix::process::CommandExt;
        command.uid(uid).gid(gid);
    }
    crate::sources::process::run(command, &format!("run pg_ctl {}", args[0])).map(|_| ())
}

/// Where replay ended, from the server's log: `redo done at 0/5000110`, the last one.
pub(crate) fn redo_done_at(log: &str) -> Option<Lsn> {
    log.lines()
        .rev()
        .find_map(|line| line.split_once("redo done at ").map(|(_, rest)| rest))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(Lsn::parse)
}

/// Says where recovery stopped, and fails when a restore to the end of the archive stopped
/// before the last segment the archive holds without a gap: a segment that could not be
/// read reads as the end of WAL to PostgreSQL.
pub(crate) fn stopped_where(
    redo_done: Option<Lsn>,
    end_of_archive: Option<&Point>,
    manifest: &Manifest,
    into: &Path,
    log: &Path,
) -> Result<String> {
    let Some(redo_done) = redo_done else {
        return Ok(
            "recovery ended where its log does not say (no \"redo done at\" line)".to_string(),
        );
    };
    let Some(segment_size) = manifest.source.wal_segment_size else {
        return Ok(format!("replayed WAL up to LSN {redo_done}"));
    };
    let stopped_in = wal::segment_of(redo_done, segment_size);
    // The last archived segment ends with a WAL switch, or with a record that goes on into
    // the next: either way the last record replayed begins in it. Zeros where records were
    // (a damaged disk) look like the end of a switched segment to every check before
    // replay, and show only here.
    if let Some(end) = end_of_archive
        && stopped_in < end.segment
    {
        return Err(Error::new(
            ErrorKind::Target,
            format!(
                "the restored server in '{}' stopped replaying at LSN {redo_done}, short of the end of the archive, {} (stored {}): it took the WAL after that point (from segment {} on) for the end and promoted",
                into.display(),
                end.name,
                continuity::describe_time(end.stored_at),
                wal::segment_name(manifest.source.timeline.unwrap_or(1), stopped_in + 1, segment_size),
            ),
        )
        .with_hint(format!(
            "its log '{}' says why replay ended there (a segment that did not decode, or that wal-fetch could not read): fix the archive, empty the directory and restore again",
            log.display()
        )));
    }
    Ok(format!("replayed WAL up to LSN {redo_done}"))
}

/// The home directory of the user `uid`, from the password database.
fn home_of(uid: u32) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: getpwuid returns null or an entry in static storage, whose directory is
    // copied out before any other call.
    unsafe {
        let entry = libc::getpwuid(uid);
        if entry.is_null() || (*entry).pw_dir.is_null() {
            return None;
        }
        let dir = std::ffi::CStr::from_ptr((*entry).pw_dir);
        Some(PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes())))
    }
}

fn in_production(binaries: &Binaries, into: &Path) -> bool {
    binaries
        .command("pg_controldata")
        .arg(into)
        .env("LC_MESSAGES", "C")
        .output()
        .is_ok_and(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.starts_with("Database cluster state:") && l.ends_with("in production"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_redo_done_line_says_where_replay_ended() {
        let log = "2026-12-06 10:00:00 UTC [1] LOG:  redo starts at 0/2000028\n\
            2026-12-06 10:00:01 UTC [1] LOG:  redo done at 0/5000110 system usage: CPU: user: 0.01 s\n\
            2026-12-06 10:00:01 UTC [1] LOG:  selected new timeline ID: 2\n";
        assert_eq!(redo_done_at(log), Some(Lsn(0x5000110)));
        assert_eq!(
            redo_done_at("LOG:  redo done at 0/3000100\n"),
            Some(Lsn(0x3000100))
        );
        assert_eq!(redo_done_at("LOG:  database system is ready\n"), None);
    }

    #[test]
    fn inherited_recovery_settings_are_removed_and_named_without_their_values() {
        let auto_conf = "# Do not edit this file manually!\n\
            shared_buffers = '1GB'\n\
            recovery_target_time = '2026-11-26 14:01:00+00'\n\
            Recovery_Target_Action='promote'\n\
            primary_conninfo = 'host=db-1 password=secret'\n\
            restore_command = 'old'\n\
            restore_command = 'older'\n";
        let (kept, removed) = without_recovery_settings(auto_conf);
        assert_eq!(
            kept,
            "# Do not edit this file manually!\nshared_buffers = '1GB'\n"
        );
        assert_eq!(
            removed,
            [
                "recovery_target_time",
                "recovery_target_action",
                "primary_conninfo",
                "restore_command"
            ]
        );
        assert!(!removed.concat().contains("secret"));
    }
}
