//! What a drill's restore tells about the RTO of a full restore of a larger backup. A drill
//! restores some backup in some time; that time is part fixed (finding the backup, starting a
//! server, replaying the WAL since the backup, the checks) and part proportional to the bytes
//! (downloading the stored object, decoding and unpacking it). Only the second part grows with
//! the backup, so the model keeps them apart: a drill of a tiny backup, whose time is nearly
//! all start-up, projects start-up plus a download at the measured stream rate, not a rate
//! that start-up dragged down.
//!
//! Downloads and unpacking overlap (each block is unpacked while the next downloads), so the
//! per-byte time is the slower of the two. A download goes as fast as one stream times the
//! streams the repository keeps in flight, which a larger object fills where a small one did
//! not.

use serde::{Deserialize, Serialize};

/// A download smaller than this says little about a stream's rate: its time is mostly the
/// first byte's wait.
pub const MIN_MEASURED_BYTES: u64 = 1 << 20;

/// What one restore of a stored object measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Transfer {
    pub stored_bytes: u64,
    pub raw_bytes: u64,
    /// From the first request to the last byte.
    pub download_seconds: f64,
    /// From the first request to the first byte: the part of the download no size changes.
    pub first_byte_seconds: f64,
    /// Streams (ranged GETs) that were in flight at once.
    pub streams: u32,
    /// Time spent decoding and unpacking, not counting waits for the download.
    pub unpack_seconds: f64,
}

/// The per-byte rates a drill measured, and the rest of its RTO.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreRates {
    /// Everything but moving the bytes: finding the backup, first bytes, starting a server,
    /// replay of the WAL since the backup, the checks.
    pub fixed_seconds: f64,
    /// Stored bytes per second through one stream; None when the drill's object was too
    /// small to tell.
    pub stream_bytes_per_second: Option<f64>,
    /// Decoded bytes per second, unpacking and writing them.
    pub unpack_bytes_per_second: Option<f64>,
    /// The drill's own per-byte time: what a backup too small to measure rates on takes.
    pub per_byte_seconds: f64,
    /// What the repository that served the drill reads at once: ranges of `range_bytes`
    /// (0: whole objects), `streams` of them.
    pub streams: u32,
    pub range_bytes: u64,
}

impl RestoreRates {
    /// The rates of a drill whose RTO was `rto_seconds`, whose restore measured `transfer`
    /// from a repository that reads `streams` ranges of `range_bytes` at once.
    pub fn measured(
        rto_seconds: f64,
        transfer: &Transfer,
        streams: u32,
        range_bytes: u64,
    ) -> RestoreRates {
        let moving = transfer.download_seconds - transfer.first_byte_seconds;
        // A rate that is not a positive finite number measured nothing (and would not survive
        // the report's JSON).
        let rate = |bytes: u64, seconds: f64, streams: u32| {
            Some(bytes as f64 / seconds / f64::from(streams.max(1)))
                .filter(|rate| bytes >= MIN_MEASURED_BYTES && rate.is_finite() && *rate > 0.0)
        };
        let stream_bytes_per_second = rate(transfer.stored_bytes, moving, transfer.streams);
        let unpack_bytes_per_second = rate(transfer.raw_bytes, transfer.unpack_seconds, 1);
        let per_byte = moving.max(transfer.unpack_seconds).max(0.0);
        RestoreRates {
            fixed_seconds: (rto_seconds - per_byte).max(0.0),
            stream_bytes_per_second,
            unpack_bytes_per_second,
            per_byte_seconds: per_byte,
            streams,
            range_bytes,
        }
    }

    /// The RTO of restoring a backup of `stored_bytes` (`raw_bytes` decoded) from the same
    /// repository. None when the drill was too small to measure a stream's rate and the
    /// backup is larger than it could tell about.
    pub fn project(&self, stored_bytes: u64, raw_bytes: u64) -> Option<f64> {
        let Some(stream) = self.stream_bytes_per_second else {
            return (stored_bytes < MIN_MEASURED_BYTES)
                .then_some(self.fixed_seconds + self.per_byte_seconds);
        };
        let in_flight = stored_bytes
            .div_ceil(self.range_bytes.max(1))
            .clamp(1, u64::from(self.streams.max(1)));
        let download = stored_bytes as f64 / (stream * in_flight as f64);
        let unpack = self
            .unpack_bytes_per_second
            .map_or(0.0, |rate| raw_bytes as f64 / rate);
        Some(self.fixed_seconds + download.max(unpack))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn start_up_does_not_count_as_slow_bytes() {
        // A 10 MiB drill: 60 s of RTO, of which 1 s moved the bytes at 10 MiB/s.
        let transfer = Transfer {
            stored_bytes: 10 * MIB,
            raw_bytes: 20 * MIB,
            download_seconds: 1.05,
            first_byte_seconds: 0.05,
            streams: 1,
            unpack_seconds: 0.5,
        };
        let rates = RestoreRates::measured(60.0, &transfer, 8, 8 * MIB);
        assert!((rates.fixed_seconds - 59.0).abs() < 1e-9);
        // 100 GiB with 8 streams: 59 s + 100 GiB / 80 MiB/s, not 60 s × 10240.
        let projected = rates.project(100 << 30, 200 << 30).unwrap();
        let download = (100u64 << 30) as f64 / (80 * MIB) as f64;
        let unpack = (200u64 << 30) as f64 / (40 * MIB) as f64;
        assert!((projected - (59.0 + download.max(unpack))).abs() < 1e-6);
        assert!(projected < 60.0 * 10240.0 / 10.0);
    }

    #[test]
    fn a_small_object_uses_as_many_streams_as_it_has_ranges() {
        let rates = RestoreRates {
            fixed_seconds: 0.0,
            stream_bytes_per_second: Some(MIB as f64),
            unpack_bytes_per_second: None,
            per_byte_seconds: 1.0,
            streams: 8,
            range_bytes: 8 * MIB,
        };
        assert_eq!(rates.project(2 * MIB, 0), Some(2.0));
        assert_eq!(rates.project(16 * MIB, 0), Some(8.0));
    }

    #[test]
    fn no_time_measured_is_no_rate() {
        let transfer = Transfer {
            stored_bytes: 10 * MIB,
            raw_bytes: 10 * MIB,
            download_seconds: 0.0,
            first_byte_seconds: 0.0,
            streams: 0,
            unpack_seconds: 0.0,
        };
        let rates = RestoreRates::measured(1.0, &transfer, 1, 0);
        assert_eq!(rates.stream_bytes_per_second, None);
        assert_eq!(rates.unpack_bytes_per_second, None);
        assert!(serde_json::to_string(&rates).is_ok());
    }

    #[test]
    fn a_download_too_small_to_measure_projects_nothing() {
        let transfer = Transfer {
            stored_bytes: 4096,
            raw_bytes: 40960,
            download_seconds: 0.2,
            first_byte_seconds: 0.19,
            streams: 1,
            unpack_seconds: 0.01,
        };
        let rates = RestoreRates::measured(30.0, &transfer, 8, 8 * MIB);
        assert_eq!(rates.stream_bytes_per_second, None);
        assert_eq!(rates.project(1 << 40, 1 << 40), None);
        // A backup as small says the same as the drill.
        assert!((rates.project(8192, 81920).unwrap() - 30.0).abs() < 1e-9);
    }
}
