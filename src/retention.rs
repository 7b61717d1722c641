//! Which backups a retention policy keeps: a pure function of the backups, the time now and
//! the policy, with the reasons for each decision. restic's and borg's semantics: a backup
//! kept by any rule is kept; `keep_last N` keeps the N newest; `keep_hourly N` (daily, weekly,
//! monthly, yearly alike) keeps the newest backup of each of the N most recent hours that
//! have one; `keep_within D` keeps every backup taken less than D before now. Calendar
//! buckets are UTC; weeks are ISO weeks (Monday to Sunday).

use chrono::{DateTime, Datelike, Timelike, Utc};

use crate::config::Retention;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub id: String,
    pub at: DateTime<Utc>,
    pub keep: bool,
    /// The rules that keep it (`daily 2026-11-25`), or why it goes.
    pub reasons: Vec<String>,
}

type Bucket = fn(DateTime<Utc>) -> String;

fn hour(at: DateTime<Utc>) -> String {
    format!("{}T{:02}", at.date_naive(), at.hour())
}

fn day(at: DateTime<Utc>) -> String {
    at.date_naive().to_string()
}

fn week(at: DateTime<Utc>) -> String {
    let week = at.iso_week();
    format!("{}-W{:02}", week.year(), week.week())
}

fn month(at: DateTime<Utc>) -> String {
    format!("{}-{:02}", at.year(), at.month())
}

fn year(at: DateTime<Utc>) -> String {
    at.year().to_string()
}

/// Decisions for `backups`, newest first. A policy without any rule keeps everything.
pub fn plan(backups: &[Candidate], now: DateTime<Utc>, policy: &Retention) -> Vec<Decision> {
    let mut ordered: Vec<&Candidate> = backups.iter().collect();
    ordered.sort_by(|a, b| b.at.cmp(&a.at).then_with(|| b.id.cmp(&a.id)));
    let mut decisions: Vec<Decision> = ordered
        .iter()
        .map(|c| Decision {
            id: c.id.clone(),
            at: c.at,
            keep: false,
            reasons: Vec::new(),
        })
        .collect();

    let rules: [(&str, Option<u32>, Bucket); 5] = [
        ("hourly", policy.keep_hourly, hour),
        ("daily", policy.keep_daily, day),
        ("weekly", policy.keep_weekly, week),
        ("monthly", policy.keep_monthly, month),
        ("yearly", policy.keep_yearly, year),
    ];
    let any_rule = policy.keep_last.is_some()
        || policy.keep_within.is_some()
        || rules.iter().any(|(_, n, _)| n.is_some());
    if !any_rule {
        for decision in &mut decisions {
            decision.keep = true;
            decision.reasons.push("no retention policy".to_string());
        }
        return decisions;
    }

    if let Some(n) = policy.keep_last {
        for (rank, decision) in decisions.iter_mut().take(n as usize).enumerate() {
            decision.reasons.push(format!("last {}/{n}", rank + 1));
        }
    }
    for (name, count, bucket_of) in rules {
        let Some(count) = count else { continue };
        let mut left = count;
        let mut previous: Option<String> = None;
        for decision in &mut decisions {
            if left == 0 {
                break;
            }
            let bucket = bucket_of(decision.at);
            if previous.as_ref() != Some(&bucket) {
                decision.reasons.push(format!("{name} {bucket}"));
                previous = Some(bucket);
                left -= 1;
            }
        }
    }
    if let Some(within) = policy.keep_within {
        let since = chrono::Duration::from_std(within)
            .ok()
            .and_then(|within| now.checked_sub_signed(within))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        for decision in decisions.iter_mut().filter(|d| d.at > since) {
            decision
                .reasons
                .push(format!("within {}", humantime::format_duration(within)));
        }
    }
    for decision in &mut decisions {
        decision.keep = !decision.reasons.is_empty();
        if !decision.keep {
            decision.reasons.push("no rule keeps it".to_string());
        }
    }
    decisions
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    /// Two years of hourly backups at half past each hour, the last at 2026-11-25 23:30;
    /// "now" is 2026-11-26 00:00 (a Thursday).
    fn two_years_hourly() -> (Vec<Candidate>, DateTime<Utc>) {
        let first = at("2024-11-26T00:30:00Z");
        let backups = (0..2 * 365 * 24)
            .map(|h| {
                let at = first + chrono::Duration::hours(h);
                Candidate {
                    id: crate::layout::backup_id(at),
                    at,
                }
            })
            .collect::<Vec<_>>();
        assert_eq!(backups.last().unwrap().at, at("2026-11-25T23:30:00Z"));
        (backups, at("2026-11-26T00:00:00Z"))
    }

    fn kept(policy: Retention) -> Vec<String> {
        let (backups, now) = two_years_hourly();
        let mut kept: Vec<String> = plan(&backups, now, &policy)
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| d.at.format("%Y-%m-%dT%H:%M").to_string())
            .collect();
        kept.sort();
        kept
    }

    fn times(list: &[&str]) -> Vec<String> {
        let mut list: Vec<String> = list.iter().map(|t| t.to_string()).collect();
        list.sort();
        list
    }

    #[test]
    fn keep_last_keeps_the_newest() {
        let policy = Retention {
            keep_last: Some(3),
            ..Retention::default()
        };
        assert_eq!(
            kept(policy),
            times(&["2026-11-25T21:30", "2026-11-25T22:30", "2026-11-25T23:30"])
        );
    }

    #[test]
    fn keep_daily_keeps_the_newest_of_each_recent_day() {
        let policy = Retention {
            keep_daily: Some(7),
            ..Retention::default()
        };
        assert_eq!(
            kept(policy),
            times(&[
                "2026-11-19T23:30",
                "2026-11-20T23:30",
                "2026-11-21T23:30",
                "2026-11-22T23:30",
                "2026-11-23T23:30",
                "2026-11-24T23:30",
                "2026-11-25T23:30",
            ])
        );
    }

    #[test]
    fn weekly_buckets_are_iso_weeks_ending_on_sunday() {
        let policy = Retention {
            keep_weekly: Some(4),
            ..Retention::default()
        };
        // 2026-11-25 is a Wednesday; the weeks before end on the Sundays 22nd, 15th, 8th.
        assert_eq!(
            kept(policy),
            times(&[
                "2026-11-08T23:30",
                "2026-11-15T23:30",
                "2026-11-22T23:30",
                "2026-11-25T23:30",
            ])
        );
    }

    #[test]
    fn monthly_and_yearly_keep_the_last_backup_of_each() {
        let monthly = Retention {
            keep_monthly: Some(3),
            ..Retention::default()
        };
        assert_eq!(
            kept(monthly),
            times(&["2026-09-30T23:30", "2026-10-31T23:30", "2026-11-25T23:30"])
        );
        // Only three calendar years have backups at all.
        let yearly = Retention {
            keep_yearly: Some(5),
            ..Retention::default()
        };
        assert_eq!(
            kept(yearly),
            times(&["2024-12-31T23:30", "2025-12-31T23:30", "2026-11-25T23:30"])
        );
    }

    #[test]
    fn keep_within_counts_back_from_now() {
        let policy = Retention {
            keep_within: Some(Duration::from_secs(2 * 3600)),
            ..Retention::default()
        };
        assert_eq!(
            kept(policy),
            times(&["2026-11-25T22:30", "2026-11-25T23:30"])
        );
    }

    #[test]
    fn rules_overlap_and_a_backup_kept_by_any_is_kept() {
        let policy = Retention {
            keep_hourly: Some(3),
            keep_daily: Some(2),
            ..Retention::default()
        };
        // The newest backup is the newest hour and the newest day at once.
        assert_eq!(
            kept(policy),
            times(&[
                "2026-11-24T23:30",
                "2026-11-25T21:30",
                "2026-11-25T22:30",
                "2026-11-25T23:30"
            ])
        );
    }

    #[test]
    fn a_typical_policy_keeps_exactly_its_calendar() {
        let policy = Retention {
            keep_daily: Some(7),
            keep_weekly: Some(4),
            keep_monthly: Some(12),
            ..Retention::default()
        };
        assert_eq!(
            kept(policy),
            times(&[
                // daily
                "2026-11-19T23:30",
                "2026-11-20T23:30",
                "2026-11-21T23:30",
                "2026-11-22T23:30",
                "2026-11-23T23:30",
                "2026-11-24T23:30",
                "2026-11-25T23:30",
                // weekly, beyond the days
                "2026-11-08T23:30",
                "2026-11-15T23:30",
                // monthly, beyond those
                "2025-12-31T23:30",
                "2026-01-31T23:30",
                "2026-02-28T23:30",
                "2026-03-31T23:30",
                "2026-04-30T23:30",
                "2026-05-31T23:30",
                "2026-06-30T23:30",
                "2026-07-31T23:30",
                "2026-08-31T23:30",
                "2026-09-30T23:30",
                "2026-10-31T23:30",
            ])
        );
    }

    #[test]
    fn every_decision_says_why() {
        let (backups, now) = two_years_hourly();
        let policy = Retention {
            keep_last: Some(1),
            keep_daily: Some(1),
            ..Retention::default()
        };
        let decisions = plan(&backups, now, &policy);
        assert_eq!(decisions.len(), backups.len());
        assert_eq!(
            decisions[0].reasons,
            vec!["last 1/1".to_string(), "daily 2026-11-25".to_string()]
        );
        assert!(!decisions[1].keep);
        assert_eq!(decisions[1].reasons, vec!["no rule keeps it".to_string()]);
    }

    #[test]
    fn no_policy_keeps_everything() {
        let (backups, now) = two_years_hourly();
        assert!(
            plan(&backups, now, &Retention::default())
                .iter()
                .all(|d| d.keep)
        );
    }
}
