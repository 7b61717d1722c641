//! Metrics after a command that changed state (when `metrics_dir` is set): each run's
//! outcome, then the state of every job as the repositories now show it.

use lifeboat::config::Config;
use lifeboat::error::exit_code;
use lifeboat::{Result, metrics, status};

/// Best effort: the command succeeded or failed whatever happens here, so a failure is a
/// warning, not its outcome.
pub async fn record(config: &Config, runs: &[metrics::RunRecord<'_>]) {
    let Some(dir) = &config.metrics_dir else {
        return;
    };
    // A signal came while the run was ending (its failure may be the signal's doing: an
    // upload the cleanup aborted): the cleanup records the run as the signal ended it, and
    // this one must not write over that with its own code.
    lifeboat::interrupt::end_if_interrupted().await;
    let runs_written = metrics::write_runs(dir, runs);
    let status_written = match status::run(config, &status::StatusOptions { job: None }).await {
        Ok(report) => metrics::write_status(dir, &report),
        Err(e) => Err(e),
    };
    if let Err(e) = runs_written.and(status_written) {
        tracing::warn!(error = %e.chain().join(": "), "metrics not written");
    }
}

/// One command's run on one job (or "all"), however it ended.
pub async fn record_run(
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
    record(config, &[run]).await;
}

/// A run a signal stops ends in the interrupt's cleanup, never back here: its run files are
/// written there (exit 130/143/129), so that a timeout that kills every night's backup shows.
pub fn record_if_interrupted(
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

pub fn exit_code_of(outcome: &Result<()>) -> i32 {
    match outcome {
        Ok(()) => exit_code::SUCCESS,
        Err(e) => e.kind().exit_code(),
    }
}
