//! Prometheus metrics in node_exporter's textfile format, for alerting: what the repositories
//! say (from `status`: newest backup, its presence per repository, WAL, the restorable point,
//! last drill, projected RTO) in `lifeboat.prom`, how each command's last run on this host
//! ended in `lifeboat-COMMAND-JOB.prom`, and how archiving goes in `lifeboat-wal-JOB.prom`
//! (rewritten by every `wal-push`). Files are replaced atomically (written beside, then
//! renamed), so the collector never reads half a file.
//!
//! Every moment is exported as a timestamp, never as an age: an age is only as fresh as the
//! last run that wrote it, so rules compute ages with `time()`, and they go on growing when
//! the timers, or the host, stop.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use chrono::{DateTime, Utc};

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::status::StatusReport;

/// Metrics text under construction: each family's HELP and TYPE once, then its samples.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, help: &str, samples: &[(Vec<(&str, &str)>, f64)]) {
        if samples.is_empty() {
            return;
        }
        writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} gauge")
            .expect("writing to a String");
        for (labels, value) in samples {
            let labels: Vec<String> = labels
                .iter()
                .map(|(key, value)| format!("{key}=\"{}\"", escape(value)))
                .collect();
            match labels.is_empty() {
                true => writeln!(self.text, "{name} {value}"),
                false => writeln!(self.text, "{name}{{{}}} {value}", labels.join(",")),
            }
            .expect("writing to a String");
        }
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn seconds(at: DateTime<Utc>) -> f64 {
    at.timestamp_micros() as f64 / 1e6
}

type Samples<'a> = Vec<(Vec<(&'a str, &'a str)>, f64)>;

/// Each job's last drill: when, whether it passed, what it measured.
fn drill_families(out: &mut Exposition, report: &StatusReport) {
    let drill = |value: &dyn Fn(&crate::status::LastDrill) -> f64| -> Samples {
        report
            .jobs
            .iter()
            .filter_map(|job| {
                let last = job.last_drill.as_ref()?;
                Some((
                    vec![("job", job.job.as_str()), ("drill", last.drill.as_str())],
                    value(last),
                ))
            })
            .collect()
    };
    out.family(
        "lifeboat_drill_last_timestamp_seconds",
        "When the job's last drill declared its disaster.",
        &drill(&|d| seconds(d.declared_at)),
    );
    out.family(
        "lifeboat_drill_last_passed",
        "1 if the job's last drill passed, 0 if it failed.",
        &drill(&|d| if d.passed { 1.0 } else { 0.0 }),
    );
    out.family(
        "lifeboat_drill_last_rto_seconds",
        "RTO measured by the job's last drill.",
        &drill(&|d| d.rto_seconds),
    );
    out.family(
        "lifeboat_drill_last_rpo_seconds",
        "RPO measured by the job's last drill.",
        &drill(&|d| d.rpo_seconds),
    );
}

/// `lifeboat.prom`: the state of every job as the repositories show it.
pub fn render_status(report: &StatusReport) -> String {
    let mut out = Exposition::default();
    let per_job = |value: &dyn Fn(&crate::status::JobStatus) -> Option<f64>| -> Samples {
        report
            .jobs
            .iter()
            .filter_map(|job| value(job).map(|v| (vec![("job", job.job.as_str())], v)))
            .collect()
    };
    out.family(
        "lifeboat_status",
        "Nagios state of the job: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.",
        &per_job(&|job| Some(f64::from(job.state.exit_code()))),
    );
    out.family(
        "lifeboat_backup_newest_timestamp_seconds",
        "Recovery point of the job's newest committed backup.",
        &per_job(&|job| job.recovery_point.map(seconds)),
    );
    out.family(
        "lifeboat_backup_newest_duration_seconds",
        "How long the newest backup took.",
        &per_job(&|job| job.newest_duration_seconds),
    );
    out.family(
        "lifeboat_backup_newest_raw_bytes",
        "Size of the newest backup before compression.",
        &per_job(&|job| job.newest_raw_bytes.map(|b| b as f64)),
    );
    out.family(
        "lifeboat_backup_newest_stored_bytes",
        "Size of the newest backup as stored.",
        &per_job(&|job| job.newest_stored_bytes.map(|b| b as f64)),
    );
    let presence: Samples = report
        .jobs
        .iter()
        .flat_map(|job| {
            let present = job.present_in.iter().map(move |r| (r, 1.0));
            let missing = job.missing_from.iter().map(move |r| (r, 0.0));
            present.chain(missing).map(move |(repository, value)| {
                (
                    vec![
                        ("job", job.job.as_str()),
                        ("repository", repository.as_str()),
                    ],
                    value,
                )
            })
        })
        .collect();
    out.family(
        "lifeboat_backup_newest_present",
        "1 if the repository holds the job's newest backup completely, 0 if not.",
        &presence,
    );
    out.family(
        "lifeboat_wal_newest_timestamp_seconds",
        "When the newest archived WAL file of a physical job was stored.",
        &per_job(&|job| job.newest_wal_at.map(seconds)),
    );
    out.family(
        "lifeboat_wal_restorable_timestamp_seconds",
        "When the newest WAL segment recovery from the newest backup reaches without a gap was stored.",
        &per_job(&|job| job.gap_free_wal_at.map(seconds)),
    );
    out.family(
        "lifeboat_restorable_timestamp_seconds",
        "The newest point the job can be restored to: its newest complete backup's recovery point, or for physical jobs the end of the WAL recovery from it reaches without a gap. Alert on time() minus this.",
        &per_job(&|job| job.restorable_point.map(seconds)),
    );
    out.family(
        "lifeboat_rpo_exposure_seconds",
        "Data (as time) a disaster now would lose: age of the newest restorable point.",
        &per_job(&|job| job.exposure_seconds),
    );
    out.family(
        "lifeboat_rpo_target_seconds",
        "The RPO target.",
        &per_job(&|job| Some(job.rpo_target_seconds)),
    );
    out.family(
        "lifeboat_rto_target_seconds",
        "The RTO target.",
        &per_job(&|job| Some(job.rto_target_seconds)),
    );
    out.family(
        "lifeboat_rto_projected_seconds",
        "RTO of a restore of the newest backup at the last drill's restore rate.",
        &per_job(&|job| job.projected_rto_seconds),
    );
    window_families(&mut out, report);
    drill_families(&mut out, report);
    out.family(
        "lifeboat_status_timestamp_seconds",
        "When these metrics were read from the repositories.",
        &[(vec![], seconds(report.now))],
    );
    out.text
}

/// Each repository's restorable window of each job.
fn window_families(out: &mut Exposition, report: &StatusReport) {
    let per_window = |value: &dyn Fn(&crate::window::Window) -> Option<f64>| -> Samples {
        report
            .jobs
            .iter()
            .flat_map(|job| {
                job.windows.iter().filter_map(move |window| {
                    value(window).map(|v| {
                        (
                            vec![
                                ("job", job.job.as_str()),
                                ("repository", window.repository.as_str()),
                            ],
                            v,
                        )
                    })
                })
            })
            .collect()
    };
    out.family(
        "lifeboat_window_start_timestamp_seconds",
        "The earliest point the repository alone restores the job to: its oldest complete backup (physical: whose WAL is whole).",
        &per_window(&|w| w.earliest.map(seconds)),
    );
    out.family(
        "lifeboat_window_end_timestamp_seconds",
        "The latest point the repository alone restores the job to: its newest complete backup, or the end of the WAL reached without a gap.",
        &per_window(&|w| w.latest.map(seconds)),
    );
    out.family(
        "lifeboat_window_gaps",
        "Gaps in the repository's restorable window: runs of missing WAL or missing timeline history files. Alert when above 0.",
        &per_window(&|w| Some(w.gaps.len() as f64)),
    );
    out.family(
        "lifeboat_archive_verified_timestamp_seconds",
        "When `lifeboat verify --archive` last found the repository's WAL archive of the job continuous and intact; 0 if never.",
        &per_window(&|w| w.segments.map(|_| w.verified_at.map_or(0.0, seconds))),
    );
    let promises: Samples = report
        .jobs
        .iter()
        .filter_map(|job| {
            job.retention_promise_seconds
                .map(|promise| (vec![("job", job.job.as_str())], promise))
        })
        .collect();
    out.family(
        "lifeboat_retention_promise_seconds",
        "How far back the retention policy keeps backups (its longest time rule); compare with the window's length.",
        &promises,
    );
}

/// How one run of a command on this host ended.
pub struct RunRecord<'a> {
    pub command: &'a str,
    pub job: &'a str,
    /// The exit code the run ended with, as the README's table gives them: alerts tell a
    /// lock held by another run (75) from a failure.
    pub exit_code: i32,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// `lifeboat-COMMAND-JOB.prom`: the last run's outcome, which the repositories cannot tell
/// (a failed backup leaves nothing there).
pub fn render_run(run: &RunRecord) -> String {
    let mut out = Exposition::default();
    let labels = vec![("command", run.command), ("job", run.job)];
    let duration = (run.finished_at - run.started_at)
        .to_std()
        .unwrap_or_default()
        .as_secs_f64();
    out.family(
        "lifeboat_last_run_success",
        "1 if the last run of the command for the job succeeded (exit 0), else 0.",
        &[(labels.clone(), if run.exit_code == 0 { 1.0 } else { 0.0 })],
    );
    out.family(
        "lifeboat_last_run_exit_code",
        "The exit code of the last run of the command for the job (75: another run held the job's lock).",
        &[(labels.clone(), f64::from(run.exit_code))],
    );
    out.family(
        "lifeboat_last_run_timestamp_seconds",
        "When the last run of the command for the job ended.",
        &[(labels.clone(), seconds(run.finished_at))],
    );
    out.family(
        "lifeboat_last_run_duration_seconds",
        "How long the last run of the command for the job took.",
        &[(labels, duration)],
    );
    out.text
}

/// The file `wal-push` keeps for a job.
fn wal_file_name(job: &str) -> String {
    format!("lifeboat-wal-{job}.prom")
}

/// What the previous `wal-push` of the job left in its file; nothing when there is none or
/// it does not read (a run that cannot read it starts the counts again).
fn read_wal_state(dir: &Path, job: &str) -> (Option<f64>, Option<f64>, f64) {
    let text = std::fs::read_to_string(dir.join(wal_file_name(job))).unwrap_or_default();
    let value = |name: &str| -> Option<f64> {
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .find_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let family = series.split('{').next()?;
                (family == name).then(|| value.parse::<f64>().ok())?
            })
            .filter(|v| v.is_finite())
    };
    (
        value("lifeboat_wal_push_last_success_timestamp_seconds"),
        value("lifeboat_wal_push_last_failure_timestamp_seconds"),
        value("lifeboat_wal_push_consecutive_failures").unwrap_or(0.0),
    )
}

/// `lifeboat-wal-JOB.prom` after a `wal-push` that `succeeded` or not at `at`: when archiving
/// last succeeded and failed, and how many pushes in a row failed (PostgreSQL retries the
/// same file until it is archived, so three failures are one segment stuck and pg_wal
/// growing on the server).
pub fn render_wal_push(
    job: &str,
    last_success: Option<f64>,
    last_failure: Option<f64>,
    consecutive_failures: f64,
) -> String {
    let mut out = Exposition::default();
    let labels = vec![("job", job)];
    let some = |value: Option<f64>| -> Vec<(Vec<(&str, &str)>, f64)> {
        value.map(|v| (labels.clone(), v)).into_iter().collect()
    };
    out.family(
        "lifeboat_wal_push_last_success_timestamp_seconds",
        "When wal-push last archived a file of the job (or found it archived already) in every repository.",
        &some(last_success),
    );
    out.family(
        "lifeboat_wal_push_last_failure_timestamp_seconds",
        "When wal-push of the job last failed.",
        &some(last_failure),
    );
    out.family(
        "lifeboat_wal_push_consecutive_failures",
        "wal-push runs of the job that failed since the last that succeeded.",
        &[(labels.clone(), consecutive_failures)],
    );
    out.text
}

/// After every `wal-push`, cheaply: one small file read and replaced. Best effort, as
/// [`record`]: archiving goes on whatever happens here.
pub fn record_wal_push(config: &Config, job: &str, succeeded: bool, at: DateTime<Utc>) {
    if let Some(dir) = &config.metrics_dir {
        record_wal_push_in(dir, job, succeeded, at);
    }
}

/// A `wal-push` whose config does not load (a typo in an edit, a key this version does not
/// know) fails every segment: the failure is counted all the same, in the `metrics_dir` and
/// for the job the file names (its `--job`, else its one physical job), read leniently.
pub fn record_wal_push_unloaded(config_path: &Path, job: Option<&str>, at: DateTime<Utc>) {
    let Ok(text) = std::fs::read_to_string(config_path) else {
        return;
    };
    let (dir, physical) = match text.parse::<toml::Table>() {
        Ok(table) => (
            table
                .get("metrics_dir")
                .and_then(|d| d.as_str())
                .map(str::to_string),
            table
                .get("job")
                .and_then(|jobs| jobs.as_array())
                .into_iter()
                .flatten()
                .filter(|job| job.get("mode").and_then(|m| m.as_str()) == Some("physical"))
                .filter_map(|job| job.get("name").and_then(|n| n.as_str()))
                .map(str::to_string)
                .collect(),
        ),
        // Not even TOML (an unterminated string): line by line, for what can still be read.
        Err(_) => scan_unparsed(&text),
    };
    let Some(dir) = dir
        .map(std::path::PathBuf::from)
        .filter(|d| d.is_absolute())
    else {
        return;
    };
    let job = match (job, physical.as_slice()) {
        (Some(job), _) => job.to_string(),
        (None, [only]) => only.clone(),
        _ => return,
    };
    if crate::config::validate_name("job", &job).is_ok() {
        record_wal_push_in(&dir, &job, false, at);
    }
}

/// `metrics_dir = "…"` and the names of the `[[job]]` tables that say `mode = "physical"`,
/// read from the lines of a config that does not parse.
fn scan_unparsed(text: &str) -> (Option<String>, Vec<String>) {
    let value = |line: &str, key: &str| -> Option<String> {
        let (name, rest) = line.split_once('=')?;
        (name.trim() == key).then_some(())?;
        let rest = rest.trim().strip_prefix('"')?;
        Some(rest.split_once('"')?.0.to_string())
    };
    let mut dir = None;
    let mut physical = Vec::new();
    let mut in_job: Option<(Option<String>, bool)> = None;
    let mut in_table = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            if let Some((Some(name), true)) = in_job.take() {
                physical.push(name);
            }
            in_table = true;
            if line == "[[job]]" {
                in_job = Some((None, false));
            }
            continue;
        }
        if !in_table && dir.is_none() {
            dir = value(line, "metrics_dir");
        }
        if let Some((name, mode)) = in_job.as_mut() {
            if let Some(found) = value(line, "name") {
                *name = Some(found);
            }
            if value(line, "mode").as_deref() == Some("physical") {
                *mode = true;
            }
        }
    }
    if let Some((Some(name), true)) = in_job {
        physical.push(name);
    }
    (dir, physical)
}

fn record_wal_push_in(dir: &Path, job: &str, succeeded: bool, at: DateTime<Utc>) {
    let (mut last_success, mut last_failure, mut failures) = read_wal_state(dir, job);
    if succeeded {
        last_success = Some(seconds(at));
        failures = 0.0;
    } else {
        last_failure = Some(seconds(at));
        failures += 1.0;
    }
    let text = render_wal_push(job, last_success, last_failure, failures);
    if let Err(e) = write_atomic(dir, &wal_file_name(job), &text) {
        tracing::warn!(error = %e.chain().join(": "), "metrics not written");
    }
}

/// Replaces `dir/name` with `text` atomically.
pub fn write_atomic(dir: &Path, name: &str, text: &str) -> Result<()> {
    let fail = |e: std::io::Error| {
        Error::new(
            ErrorKind::Target,
            format!(
                "unable to write metrics file '{}'",
                dir.join(name).display()
            ),
        )
        .with_source(e)
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    // A dot name, so that the collector (which reads *.prom) never sees the temp file.
    let mut file = tempfile::Builder::new()
        .prefix(".lifeboat-")
        .tempfile_in(dir)
        .map_err(fail)?;
    let _registered = crate::interrupt::RemovedOnInterrupt::new(file.path());
    file.write_all(text.as_bytes()).map_err(fail)?;
    file.as_file().sync_all().map_err(fail)?;
    // Readable by the collector, which usually runs as another user.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o644)).map_err(fail)?;
    file.persist(dir.join(name)).map_err(|e| fail(e.error))?;
    Ok(())
}

/// Each run's outcome, in its own file (`lifeboat-COMMAND-JOB.prom`).
pub fn write_runs(dir: &Path, runs: &[RunRecord<'_>]) -> Result<()> {
    let mut written = Ok(());
    for run in runs {
        let name = format!("lifeboat-{}-{}.prom", run.command, run.job);
        written = written.and(write_atomic(dir, &name, &render_run(run)));
    }
    written
}

/// `lifeboat.prom` from a status report: what `status --write-metrics` (the status timer)
/// does, so the state is refreshed even on a host where nothing else runs for a day.
pub fn write_status(dir: &Path, report: &StatusReport) -> Result<()> {
    write_atomic(dir, "lifeboat.prom", &render_status(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_that_is_not_even_toml_still_names_its_metrics_dir_and_physical_job() {
        let text = "metrics_dir = \"/var/lib/metrics\"\n[targets]\nrpo = \"1h\n\n[[job]]\nname = \"conf\"\nkind = \"files\"\n\n[[job]]\nname = \"pitr\"\nmode = \"physical\"\nmetrics_dir = \"/elsewhere\"\n";
        assert!(text.parse::<toml::Table>().is_err());
        assert_eq!(
            scan_unparsed(text),
            (
                Some("/var/lib/metrics".to_string()),
                vec!["pitr".to_string()]
            )
        );
    }
}
