//! One module per user command. Each takes the validated config and an `XxxOptions`, and
//! returns an `XxxReport` that implements `Display` for people and `Serialize` for machines.

pub mod backup;
pub mod check;
pub mod drill;
pub mod heartbeat;
pub mod init;
pub mod list;
pub mod prune;
pub mod rekey;
pub mod replicate;
pub mod restore;
pub mod schedule;
pub mod show;
pub mod status;
pub mod verify;
pub mod wal;
pub mod wal_relay;

use std::time::Duration;

use bytesize::ByteSize;

pub(crate) fn human_size(bytes: u64) -> String {
    ByteSize(bytes).display().iec().to_string()
}

pub(crate) fn human_duration(duration: Duration) -> String {
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
