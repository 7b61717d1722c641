//! Prometheus metrics in node_exporter's textfile format, for alerting: what the repositories
//! say (from `status`: newest backup, its presence per repository, WAL, RPO exposure, last
//! drill, projected RTO) in `lifeboat.prom`, and how each command's last run on this host
//! ended in `lifeboat-COMMAND-JOB.prom`. Files are replaced atomically (written beside, then
//! renamed), so the collector never reads half a file.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use chrono::{DateTime, Utc};

use crate::commands::status::{self, StatusReport};
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};

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

/// `lifeboat.prom`: the state of every job as the repositories show it.
pub fn render_status(report: &StatusReport) -> String {
    let mut out = Exposition::default();
    type Samples<'a> = Vec<(Vec<(&'a str, &'a str)>, f64)>;
    let per_job = |value: &dyn Fn(&crate::commands::status::JobStatus) -> Option<f64>| -> Samples {
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
    let drill = |value: &dyn Fn(&crate::commands::status::LastDrill) -> f64| -> Samples {
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
    out.family(
        "lifeboat_status_timestamp_seconds",
        "When these metrics were read from the repositories.",
        &[(vec![], seconds(report.now))],
    );
    out.text
}

/// How one run of a command on this host ended.
pub struct RunRecord<'a> {
    pub command: &'a str,
    pub job: &'a str,
    pub success: bool,
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
        &[(labels.clone(), if run.success { 1.0 } else { 0.0 })],
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

/// After a command that changed state: each run's outcome, then the state of every job as
/// the repositories now show it. Best effort: the command succeeded or failed whatever
/// happens here, so a failure is a warning, not its outcome. Nothing without `metrics_dir`.
pub async fn record(config: &Config, runs: &[RunRecord<'_>]) {
    let Some(dir) = &config.metrics_dir else {
        return;
    };
    let mut written = Ok(());
    for run in runs {
        let name = format!("lifeboat-{}-{}.prom", run.command, run.job);
        written = written.and(write_atomic(dir, &name, &render_run(run)));
    }
    let options = status::StatusOptions { job: None };
    written = match status::run(config, &options).await {
        Ok(report) => written.and(write_atomic(dir, "lifeboat.prom", &render_status(&report))),
        Err(e) => written.and(Err(e)),
    };
    if let Err(e) = written {
        tracing::warn!(error = %e.chain().join(": "), "metrics not written");
    }
}
