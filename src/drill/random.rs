//! Random-point drills: `backup = "random"` drills a random complete backup of the
//! restorable window, `to_time = "random"` (physical jobs) recovers to a random moment of
//! it. A drill that always restores the newest backup to the end of the archive proves one
//! point; drawing the point proves, over many runs, that any moment restores (AWS Backup's
//! restore testing calls this RANDOM_WITHIN_WINDOW). The draw comes from a seed the report
//! keeps; `drill run --seed N` draws the same point from the same window.

use chrono::{DateTime, Duration, Utc};

use super::file::{Draw, Drill, DrillTime, RANDOM};
use crate::config::{Config, JobConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::layout::BackupKind;
use crate::repository::Repository;
use crate::window::{self, Window};

/// Whether `drill` asks for a draw.
pub fn wants_draw(drill: &Drill) -> bool {
    drill.backup == RANDOM || drill.to_time == Some(DrillTime::Random)
}

/// A seed for a run that was not given one.
pub fn new_seed() -> u64 {
    let mut bytes = [0u8; 8];
    // Without the system's randomness, the clock still draws a different point each run.
    if getrandom::fill(&mut bytes).is_err() {
        return Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64;
    }
    u64::from_le_bytes(bytes)
}

/// How far before the end of the window a drawn moment stays: recovery to a moment after
/// the last commit archived fails ("recovery ended before configured recovery target was
/// reached"), and the newest segment's stored time is later than its last commit by up to
/// the server's archive_timeout. A tenth of the window, from 5 s to 5 min.
fn end_margin(span: Duration) -> Duration {
    (span / 10).clamp(Duration::seconds(5), Duration::minutes(5))
}

/// A random moment is proven only by what the restore brought back: the heartbeat row
/// (`heartbeat = true` on the job) or an `rpo_marker` check must say where recovery stopped.
pub fn refuse_unprovable(config: &Config, drill: &Drill) -> Result<()> {
    if drill.to_time != Some(DrillTime::Random) {
        return Ok(());
    }
    let job = config.job(&drill.job)?;
    let heartbeat = matches!(&job.source, crate::config::JobSource::Postgres(p) if p.heartbeat);
    if heartbeat || drill.checks.iter().any(|check| check.is_rpo_marker()) {
        return Ok(());
    }
    Err(Error::config(format!(
        "invalid drill file '{}': to_time = \"random\" needs to see where recovery stopped: set heartbeat = true on job '{}', or mark a check rpo_marker = true",
        drill.path.display(),
        job.name
    )))
}

/// Draws what `drill` leaves to chance, from `seed`, in the window of the first repository
/// the drill reads from that has one; returns the drill to run, with the draw in place.
pub async fn draw(
    config: &Config,
    drill: &Drill,
    job: &JobConfig,
    seed: u64,
) -> Result<(Drill, Draw)> {
    let repositories = Repository::readable(config, drill.from.as_deref(), &drill.exclude).await?;
    let mut problems = Vec::new();
    for repository in &repositories {
        match window::of_repository(repository, &job.name, job.backup_kind()).await {
            Ok((window, _)) if window.earliest.is_some() && window.latest.is_some() => {
                match window::complete_backups(repository, &job.name).await {
                    Ok(backups) => return draw_in(drill, job, seed, &window, &backups),
                    Err(e) => problems.push(e.chain().join(": ")),
                }
            }
            Ok(_) => problems.push(format!(
                "repository '{}' has nothing restorable of job '{}'",
                repository.name, job.name
            )),
            Err(e) => problems.push(e.chain().join(": ")),
        }
    }
    let mut error = Error::new(
        ErrorKind::NotFound,
        format!(
            "unable to draw a random point for drill '{}' (seed {seed}): no repository it reads has a restorable window of job '{}'",
            drill.name, job.name
        ),
    );
    for problem in problems {
        error = error.with_hint(problem);
    }
    Err(error)
}

fn draw_in(
    drill: &Drill,
    job: &JobConfig,
    seed: u64,
    window: &Window,
    backups: &[crate::manifest::Manifest],
) -> Result<(Drill, Draw)> {
    let (from, to) = (
        window.earliest.expect("checked"),
        window.latest.expect("checked"),
    );
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut drawn = drill.clone();
    let mut draw = Draw {
        seed,
        repository: window.repository.clone(),
        window_from: from,
        window_to: to,
        backup: None,
        to_time: None,
    };
    let moment = drill.to_time == Some(DrillTime::Random);
    if moment && job.backup_kind() != BackupKind::PostgresPhysical {
        return Err(Error::config(format!(
            "invalid drill file '{}': to_time: only a physical job recovers to a moment",
            drill.path.display()
        )));
    }
    let latest = to - end_margin(to - from);
    // The backups inside the window: a physical one whose WAL is broken is not in it; with a
    // moment to draw too, only one that leaves room for it after.
    let inside: Vec<&crate::manifest::Manifest> = backups
        .iter()
        .filter(|m| m.recovery_point >= from && m.recovery_point <= to)
        .filter(|m| !moment || m.recovery_point < latest)
        .filter(|m| {
            !window
                .gaps
                .iter()
                .any(|gap| gap.backups_broken.contains(&m.id))
        })
        .collect();
    let mut earliest = from;
    if drill.backup == RANDOM {
        if inside.is_empty() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "unable to draw a random backup of job '{}' in repository '{}' (seed {seed}): no complete backup lies in its window",
                    job.name, window.repository
                ),
            ));
        }
        let chosen = inside[rng.usize(..inside.len())];
        drawn.backup = chosen.id.clone();
        draw.backup = Some(chosen.id.clone());
        earliest = chosen.recovery_point;
    } else if let Some(fixed) = backups.iter().find(|m| m.id == drill.backup) {
        earliest = fixed.recovery_point.max(from);
    }
    if moment {
        let at = draw_moment(&mut rng, (earliest, latest), window).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "unable to draw a random moment for drill '{}' (seed {seed}): the window of repository '{}' ({} to {}) leaves no restorable room after {}",
                    drill.name,
                    window.repository,
                    window::human_time(from),
                    window::human_time(to),
                    window::human_time(earliest)
                ),
            )
            .with_hint("archive more WAL after the backup (the heartbeat timer writes some every minute), or give to_time a moment")
        })?;
        drawn.to_time = Some(DrillTime::At(at));
        draw.to_time = Some(at);
        // The newest backup consistent by then is the one a point-in-time restore starts
        // from (`latest` would be one made after the moment).
        if drill.backup == "latest"
            && let Some(before) = inside
                .iter()
                .filter(|m| m.recovery_point <= at)
                .max_by_key(|m| m.recovery_point)
        {
            drawn.backup = before.id.clone();
        }
    }
    drawn.drawn = Some(draw.clone());
    Ok((drawn, draw))
}

/// A moment in `(earliest, latest)` that no gap of `window` cuts out: the same for the same
/// generator state. None when there is no room, or every try lands in a gap.
fn draw_moment(
    rng: &mut fastrand::Rng,
    (earliest, latest): (DateTime<Utc>, DateTime<Utc>),
    window: &Window,
) -> Option<DateTime<Utc>> {
    if latest <= earliest {
        return None;
    }
    let span = (latest - earliest).num_milliseconds().max(1) as u64;
    (0..100)
        .map(|_| earliest + Duration::milliseconds(rng.u64(..span) as i64))
        .find(|at| {
            !window.gaps.iter().any(|gap| {
                gap.lost_from.is_none_or(|from| from <= *at)
                    && gap.lost_to.is_none_or(|to| *at < to)
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_margin_is_a_tenth_of_the_window_within_bounds() {
        assert_eq!(end_margin(Duration::seconds(20)), Duration::seconds(5));
        assert_eq!(end_margin(Duration::seconds(600)), Duration::seconds(60));
        assert_eq!(end_margin(Duration::days(30)), Duration::minutes(5));
    }

    #[test]
    fn one_seed_draws_one_point() {
        let draw = |seed| fastrand::Rng::with_seed(seed).u64(..1_000_000);
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }
}
