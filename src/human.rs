//! Sizes and durations as people read them in reports.

use std::time::Duration;

use bytesize::ByteSize;

pub fn human_size(bytes: u64) -> String {
    ByteSize(bytes).display().iec().to_string()
}

pub fn human_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs < 60 {
        format!("{:.1}s", duration.as_secs_f64())
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else if secs < 86_400 {
        format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
    } else {
        format!("{}d{:02}h", secs / 86_400, (secs % 86_400) / 3600)
    }
}
