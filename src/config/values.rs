//! Durations and sizes as the config (and the command line) writes them.

use std::time::Duration;

use super::Problem;

pub(super) fn duration_field(
    field: &str,
    text: Option<&str>,
    default: &str,
) -> Result<Duration, Problem> {
    parse_duration(field, text.unwrap_or(default))
}

pub(super) fn parse_duration(field: &str, text: &str) -> Result<Duration, Problem> {
    match bounded_duration(text) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!(
            "{field}: must be longer than zero (got \"{text}\")"
        )),
        Err(e) => Err(format!("{field}: {e}")),
    }
}

/// The longest duration lifeboat takes anywhere (config, drill files, the command line): a
/// longer one is a typo, and would overflow the time arithmetic it feeds. A year is 365.25
/// days, as humantime reads "100y".
pub const LONGEST_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// A duration as people write them ("4h", "90min", "1h 30min"), at most [`LONGEST_DURATION`].
pub fn bounded_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d <= LONGEST_DURATION => Ok(d),
        Ok(_) => Err(format!("must be at most 100 years (got \"{text}\")")),
        Err(e) => Err(format!(
            "invalid duration \"{text}\" ({e}); write it like \"4h\", \"90min\" or \"1h 30min\""
        )),
    }
}

/// A size as the config writes them: "5 GiB".
pub(super) fn human_bytes(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

/// A size ("64MiB"), or a problem naming `field`.
pub fn parse_size(field: &str, text: &str) -> Result<u64, Problem> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|_| {
            format!("{field}: invalid size \"{text}\"; write it like \"8MiB\" or \"64MiB\"")
        })
}
