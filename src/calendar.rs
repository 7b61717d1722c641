//! systemd calendar expressions: how long a schedule may go between two runs, and the cron
//! line that says the same where cron can.

use std::process::Command;
use std::time::Duration;

/// How many planned runs are read to find the longest gap: a week of runs every five
/// minutes, so that a weekend pause shows.
const GAP_ITERATIONS: usize = 3000;

/// How often a calendar runs, at worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gap {
    /// At least this often.
    Every(Duration),
    /// Once more at most (a date), or never again (a date gone by).
    AtMostOnce,
    /// Repeats, but no more after this moment (a year or a day named in it).
    Ends(chrono::NaiveDateTime),
}

/// The longest time between two planned runs of `calendar`, as systemd computes them; for
/// the named expressions without systemd-analyze too. None when it cannot be known here.
pub fn longest_gap(calendar: &str) -> Option<Gap> {
    every(calendar).map(|gap| match gap {
        Planned::Repeats(gap) => Gap::Every(gap),
        Planned::Ends(last) => Gap::Ends(last),
        Planned::Once => Gap::AtMostOnce,
    })
}

enum Planned {
    Repeats(Duration),
    Ends(chrono::NaiveDateTime),
    Once,
}

/// systemd plans no run after 2199: a schedule that reaches it repeats for good.
const SYSTEMD_LAST_YEAR: i32 = 2190;

/// `Some(None)`: systemd plans at most one more run.
fn every(calendar: &str) -> Option<Planned> {
    let named = |days: u64| Some(Duration::from_secs(days * 86_400));
    let fallback = match calendar.trim() {
        "minutely" => Some(Duration::from_secs(60)),
        "hourly" => Some(Duration::from_secs(3600)),
        "daily" => named(1),
        "weekly" => named(7),
        "monthly" => named(31),
        "quarterly" => named(92),
        "semiannually" => named(184),
        "yearly" | "annually" => named(366),
        _ => None,
    };
    let output = Command::new("systemd-analyze")
        .env("TZ", "UTC")
        .args([
            "calendar",
            &format!("--iterations={GAP_ITERATIONS}"),
            calendar,
        ])
        .output();
    let Ok(output) = output
        .map_err(|_| ())
        .and_then(|o| match o.status.success() {
            true => Ok(o),
            false => Err(()),
        })
    else {
        return fallback.map(Planned::Repeats);
    };
    let elapses: Vec<chrono::NaiveDateTime> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(": ")?;
            let key = key.trim();
            if key != "Next elapse" && !key.starts_with("Iter.") {
                return None;
            }
            let mut words = value.split_whitespace().skip(1);
            let (date, time) = (words.next()?, words.next()?);
            chrono::NaiveDateTime::parse_from_str(&format!("{date} {time}"), "%Y-%m-%d %H:%M:%S")
                .ok()
        })
        .collect();
    use chrono::Datelike;
    match elapses.as_slice() {
        // A date: one more run, or none (it has passed).
        [] | [_] => Some(Planned::Once),
        [.., last] if elapses.len() < GAP_ITERATIONS && last.year() < SYSTEMD_LAST_YEAR => {
            Some(Planned::Ends(*last))
        }
        _ => elapses
            .windows(2)
            .filter_map(|pair| (pair[1] - pair[0]).to_std().ok())
            .max()
            .map(Planned::Repeats),
    }
}

/// The cron fields (minute hour day-of-month month day-of-week) for the OnCalendar
/// expressions cron can say exactly; None for the others.
pub fn cron_fields(calendar: &str) -> Option<String> {
    let named = match calendar.trim() {
        "minutely" => Some("* * * * *"),
        "hourly" => Some("0 * * * *"),
        "daily" => Some("0 0 * * *"),
        "weekly" => Some("0 0 * * 1"),
        "monthly" => Some("0 0 1 * *"),
        "quarterly" => Some("0 0 1 1,4,7,10 *"),
        "yearly" | "annually" => Some("0 0 1 1 *"),
        _ => None,
    };
    if let Some(fields) = named {
        return Some(fields.to_string());
    }
    let mut parts: Vec<&str> = calendar.split_whitespace().collect();
    let weekday = match parts.as_slice() {
        [day, _, _] | [day, _] if day.chars().all(|c| c.is_ascii_alphabetic()) => {
            let number = match day.to_ascii_lowercase().get(..3)? {
                "sun" => 0,
                "mon" => 1,
                "tue" => 2,
                "wed" => 3,
                "thu" => 4,
                "fri" => 5,
                "sat" => 6,
                _ => return None,
            };
            parts.remove(0);
            number.to_string()
        }
        _ => "*".to_string(),
    };
    let (date, time) = match parts.as_slice() {
        [date, time] => (*date, *time),
        [time] if time.contains(':') => ("*-*-*", *time),
        _ => return None,
    };
    if date != "*-*-*" {
        return None;
    }
    let mut time = time.split(':');
    let (hour, minute, second) = (time.next()?, time.next()?, time.next().unwrap_or("00"));
    if time.next().is_some() || !matches!(second, "0" | "00") {
        return None;
    }
    // systemd's `START/STEP` repeats within the field's range, as cron's `START-MAX/STEP`
    // does (`*/STEP` from 0): `*:0/15` is `*/15`.
    let number = |text: &str, max: u32| -> Option<String> {
        if text == "*" {
            return Some("*".to_string());
        }
        let single = |text: &str| text.parse::<u32>().ok().filter(|n| *n <= max);
        if let Some((start, step)) = text.split_once('/') {
            let (start, step) = (single(start)?, single(step).filter(|s| *s > 0)?);
            return Some(match start {
                0 => format!("*/{step}"),
                _ => format!("{start}-{max}/{step}"),
            });
        }
        single(text).map(|n| n.to_string())
    };
    let minute = number(minute, 59).filter(|m| m != "*")?;
    let hour = number(hour, 23)?;
    Some(format!("{minute} {hour} * * {weekday}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_gets_the_expressions_it_can_say_exactly() {
        for (calendar, fields) in [
            ("hourly", "0 * * * *"),
            ("daily", "0 0 * * *"),
            ("quarterly", "0 0 1 1,4,7,10 *"),
            ("*-*-* 03:00:00", "0 3 * * *"),
            ("*-*-* 03:15", "15 3 * * *"),
            ("*-*-* *:30:00", "30 * * * *"),
            ("Mon *-*-* 04:00:00", "0 4 * * 1"),
            ("sunday 23:45", "45 23 * * 0"),
            ("*:0/15", "*/15 * * * *"),
            ("*-*-* *:5/20:00", "5-59/20 * * * *"),
            ("*-*-* 0/6:30", "30 */6 * * *"),
        ] {
            assert_eq!(cron_fields(calendar).as_deref(), Some(fields), "{calendar}");
        }
        for calendar in [
            "*-*-* 03:00:30",
            "*-*-01 03:00:00",
            "Mon..Fri 04:00",
            "*-*-* 25:00",
            "*:0/0",
            "*:0/75",
            "every day",
        ] {
            assert_eq!(cron_fields(calendar), None, "{calendar}");
        }
    }
}
