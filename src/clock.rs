//! Time lifeboat can trust. Backup ids, "latest", retention and RPO all rest on time, and a
//! host's clock can be wrong: an hour behind, stepped back between two runs, two hours fast.
//! A run reads each repository's own clock (an S3 server's `Date`, the time a file system
//! gives a file it makes) and compares. Beyond `max_clock_skew`, `backup` and `prune` refuse
//! and `status` is CRITICAL. Within it, the run takes its times from the first repository that
//! answered, so backups made by hosts whose clocks disagree still sort as they happened.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::{Error, ErrorKind, Result};
use crate::layout;
use crate::repository::Repository;
use crate::storage::ClockReading;

/// A smaller difference is the reading's own error (S3's `Date` has whole seconds, and the
/// request takes time): the host's clock is taken as it is.
const RESOLUTION: chrono::Duration = chrono::Duration::seconds(2);

/// Where a run takes its times from: this host's clock, moved by what it was found to be off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    offset: chrono::Duration,
}

impl Clock {
    /// This host's clock as it is.
    pub const LOCAL: Clock = Clock {
        offset: chrono::Duration::zero(),
    };

    pub fn now(&self) -> DateTime<Utc> {
        self.correct(Utc::now())
    }

    /// A time this host's clock gave, as the repositories' clock would have given it.
    pub fn correct(&self, local: DateTime<Utc>) -> DateTime<Utc> {
        local + self.offset
    }

    /// How far the repositories' clock is ahead of this host's.
    pub fn offset(&self) -> chrono::Duration {
        self.offset
    }
}

/// The clocks of a run's repositories, in config order.
#[derive(Debug, Default)]
pub struct Readings {
    pub read: Vec<(String, ClockReading)>,
    /// Repositories whose clock could not be read, with why.
    pub unread: Vec<(String, String)>,
}

/// Reads the clock of every repository; one request each.
pub async fn read(repositories: &[Repository]) -> Readings {
    let mut readings = Readings::default();
    for repository in repositories {
        match repository.store.clock(layout::CLOCK_PROBE_KEY).await {
            Ok(Some(reading)) => readings.read.push((repository.name.clone(), reading)),
            Ok(None) => {}
            Err(e) => readings.unread.push((
                repository.name.clone(),
                repository.error("read the clock", e).chain().join(": "),
            )),
        }
    }
    readings
}

impl Readings {
    /// The clock a run takes its times from: the first repository's that answered.
    pub fn clock(&self) -> Clock {
        match self.read.first() {
            Some((_, reading)) if reading.skew().abs() >= RESOLUTION + reading.uncertainty => {
                Clock {
                    offset: reading.skew(),
                }
            }
            _ => Clock::LOCAL,
        }
    }

    /// Each repository whose clock is more than `max` from this host's, described.
    /// And repositories whose clocks are more than `max` apart: times taken from whichever
    /// answers first would not sort with those taken from the other.
    pub fn beyond(&self, max: Duration) -> Vec<String> {
        let max = chrono::Duration::from_std(max).unwrap_or(chrono::Duration::MAX);
        let mut beyond: Vec<String> = self
            .read
            .iter()
            .filter(|(_, reading)| reading.skew().abs() - reading.uncertainty > max)
            .map(|(name, reading)| describe(name, reading))
            .collect();
        let slowest = self.read.iter().min_by_key(|(_, r)| r.skew());
        let fastest = self.read.iter().max_by_key(|(_, r)| r.skew());
        if let (Some((slow, slow_reading)), Some((fast, fast_reading))) = (slowest, fastest)
            && fast_reading.skew()
                - slow_reading.skew()
                - fast_reading.uncertainty
                - slow_reading.uncertainty
                > max
        {
            beyond.push(format!(
                "the clocks of repositories '{fast}' and '{slow}' are {} apart",
                human(fast_reading.skew() - slow_reading.skew())
            ));
        }
        beyond
    }

    /// The clock to take times from, or an error naming each repository whose clock is more
    /// than `max` from this host's: `what` (`back up job 'db'`) would record wrong times.
    pub fn trusted(&self, max: Duration, what: &str) -> Result<Clock> {
        let beyond = self.beyond(max);
        if beyond.is_empty() {
            return Ok(self.clock());
        }
        let mut error = Error::new(
            ErrorKind::Clock,
            format!(
                "unable to {what}: {}, more than max_clock_skew ({})",
                beyond.join("; "),
                humantime::format_duration(max)
            ),
        );
        error = error.with_hint(
            "fix this host's time (`timedatectl status`; chrony or systemd-timesyncd must be synchronised), or, where two repositories disagree, the clock of the one that is wrong; then run it again",
        );
        Err(error.with_hint(
            "if the repository's clock is the wrong one, raise max_clock_skew in the config: lifeboat then takes its times from the first repository",
        ))
    }
}

/// "this host's clock is 1h 0m 2s behind repository 'a' (host 2026-12-06 20:27:39 UTC,
/// repository 2026-12-06 21:27:41 UTC)".
pub fn describe(repository: &str, reading: &ClockReading) -> String {
    let skew = reading.skew();
    let way = if skew > chrono::Duration::zero() {
        "behind"
    } else {
        "ahead of"
    };
    format!(
        "this host's clock is {} {way} repository '{repository}' (host {}, repository {})",
        human(skew.abs()),
        reading.local.format("%Y-%m-%d %H:%M:%S UTC"),
        reading.remote.format("%Y-%m-%d %H:%M:%S UTC")
    )
}

/// To the second, as humantime writes it ("1h 2s"); under a minute to the tenth ("0.4s").
pub fn human(duration: chrono::Duration) -> String {
    let millis = duration.num_milliseconds().max(0);
    if millis < 60_000 {
        return format!("{:.1}s", millis as f64 / 1000.0);
    }
    humantime::format_duration(Duration::from_secs(((millis + 500) / 1000) as u64)).to_string()
}

/// Whether a time a backup records lies ahead of `now` by more than clocks may differ: a
/// host whose clock ran fast made it, or a repository's clock stepped back. Two clocks may
/// each be `max_skew` from this host's, and a new id moves past one held ahead within that
/// (ids of backups started within one second also run a few seconds ahead): so twice it.
pub fn in_the_future(at: DateTime<Utc>, now: DateTime<Utc>, max_skew: Duration) -> bool {
    let tolerance = chrono::Duration::from_std(max_skew)
        .ok()
        .and_then(|skew| skew.checked_mul(2))
        .unwrap_or(chrono::Duration::MAX)
        .max(RESOLUTION);
    at.signed_duration_since(now) > tolerance
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_MAX_CLOCK_SKEW;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    fn readings(skews: &[(&str, i64)]) -> Readings {
        let local = at("2026-12-06T20:00:00Z");
        Readings {
            read: skews
                .iter()
                .map(|(name, seconds)| {
                    (
                        name.to_string(),
                        ClockReading {
                            local,
                            remote: local + chrono::Duration::seconds(*seconds),
                            uncertainty: chrono::Duration::zero(),
                        },
                    )
                })
                .collect(),
            unread: Vec::new(),
        }
    }

    #[test]
    fn a_host_behind_its_repository_is_refused_beyond_the_limit_and_corrected_within() {
        let hour_behind = readings(&[("a", 3600)]);
        let refused = hour_behind
            .trusted(DEFAULT_MAX_CLOCK_SKEW, "back up job 'db'")
            .unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Clock);
        assert!(
            refused.to_string().contains(
                "this host's clock is 1h behind repository 'a' (host 2026-12-06 20:00:00 UTC, repository 2026-12-06 21:00:00 UTC)"
            ),
            "{refused}"
        );
        let clock = hour_behind
            .trusted(Duration::from_secs(7200), "back up job 'db'")
            .unwrap();
        assert_eq!(
            clock.correct(at("2026-12-06T20:00:00Z")),
            at("2026-12-06T21:00:00Z")
        );
    }

    #[test]
    fn the_first_repository_that_answered_gives_the_time_and_a_small_skew_is_none() {
        assert_eq!(readings(&[("a", 1), ("b", 30)]).clock(), Clock::LOCAL);
        let clock = readings(&[("a", -30), ("b", 0)]).clock();
        assert_eq!(clock.offset(), chrono::Duration::seconds(-30));
        let fast = readings(&[("a", -7200)]);
        assert!(fast.beyond(DEFAULT_MAX_CLOCK_SKEW)[0].contains("2h ahead of repository 'a'"));
    }

    #[test]
    fn a_time_more_than_the_allowed_skew_ahead_is_in_the_future() {
        let now = at("2026-12-06T20:00:00Z");
        let max = DEFAULT_MAX_CLOCK_SKEW;
        assert!(!in_the_future(
            now + chrono::Duration::seconds(240),
            now,
            max
        ));
        assert!(in_the_future(
            now + chrono::Duration::seconds(241),
            now,
            max
        ));
    }

    #[test]
    fn repositories_whose_clocks_disagree_are_named() {
        let apart = readings(&[("a", 110), ("b", -20)]);
        let beyond = apart.beyond(DEFAULT_MAX_CLOCK_SKEW);
        assert_eq!(
            beyond,
            ["the clocks of repositories 'a' and 'b' are 2m 10s apart"]
        );
        assert!(apart.trusted(DEFAULT_MAX_CLOCK_SKEW, "prune").is_err());
    }
}
