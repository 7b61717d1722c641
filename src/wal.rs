//! PostgreSQL's WAL vocabulary as lifeboat needs it: LSNs, timelines, segment names, and the
//! files `archive_command` hands over (segments, `.history`, `.backup`, `.partial`).
//! Pure functions, no I/O.

use std::fmt;

/// A WAL position, written `X/Y` in hex as PostgreSQL does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lsn(pub u64);

impl Lsn {
    pub fn parse(text: &str) -> Option<Lsn> {
        let (high, low) = text.trim().split_once('/')?;
        let valid = |part: &str| {
            !part.is_empty() && part.len() <= 8 && part.chars().all(|c| c.is_ascii_hexdigit())
        };
        if !valid(high) || !valid(low) {
            return None;
        }
        let high = u64::from_str_radix(high, 16).ok()?;
        let low = u64::from_str_radix(low, 16).ok()?;
        Some(Lsn(high << 32 | low))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The name of the segment of `timeline` with number `segment`, for segments of
/// `segment_size` bytes: `000000010000000000000003`.
pub fn segment_name(timeline: u32, segment: u64, segment_size: u64) -> String {
    let per_id = 0x1_0000_0000 / segment_size;
    format!(
        "{timeline:08X}{:08X}{:08X}",
        segment / per_id,
        segment % per_id
    )
}

/// The number of the segment that holds `lsn`.
pub fn segment_of(lsn: Lsn, segment_size: u64) -> u64 {
    lsn.0 / segment_size
}

/// The segments a backup from `start` to `stop` on one timeline needs replayed, first and
/// last. The stop position is the end of the last record, so a stop exactly on a segment
/// boundary needs nothing from the segment that starts there.
pub fn segments_needed(start: Lsn, stop: Lsn, segment_size: u64) -> (u64, u64) {
    let first = segment_of(start, segment_size);
    let last = segment_of(Lsn(stop.0.saturating_sub(1)), segment_size).max(first);
    (first, last)
}

/// What kind of file `archive_command` or `restore_command` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalFileKind {
    Segment,
    /// `TTTTTTTT.history`: how a timeline branched off its parent.
    History,
    /// `SEGMENT.OFFSET.backup`: a base backup's start and stop, for people.
    BackupLabel,
    /// `SEGMENT.partial`: the last, incomplete segment of a timeline after promotion.
    Partial,
}

/// A WAL archive file name, validated: only these can become object keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalFile {
    pub name: String,
    pub kind: WalFileKind,
    pub timeline: u32,
}

fn is_upper_hex(text: &str, len: usize) -> bool {
    text.len() == len
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

impl WalFile {
    pub fn parse(name: &str) -> Option<WalFile> {
        let kind = if is_upper_hex(name, 24) {
            WalFileKind::Segment
        } else if let Some(timeline) = name.strip_suffix(".history") {
            is_upper_hex(timeline, 8).then_some(WalFileKind::History)?
        } else if let Some(segment) = name.strip_suffix(".partial") {
            is_upper_hex(segment, 24).then_some(WalFileKind::Partial)?
        } else if let Some(rest) = name.strip_suffix(".backup") {
            let (segment, offset) = rest.split_once('.')?;
            (is_upper_hex(segment, 24) && is_upper_hex(offset, 8))
                .then_some(WalFileKind::BackupLabel)?
        } else {
            return None;
        };
        let timeline = u32::from_str_radix(&name[..8], 16).ok()?;
        if timeline == 0 {
            return None;
        }
        Some(WalFile {
            name: name.to_string(),
            kind,
            timeline,
        })
    }
}

/// A size PostgreSQL allows for WAL segments: a power of two from 1 MiB to 1 GiB.
pub fn is_segment_size(size: u64) -> bool {
    size.is_power_of_two() && (1 << 20..=1 << 30).contains(&size)
}

impl WalFile {
    /// The number of the segment the file belongs to (for `.backup` and `.partial` files,
    /// the segment they name); None for timeline history files, and for a name no segment
    /// of that size has (its low part past the segments in 4 GiB).
    pub fn segment(&self, segment_size: u64) -> Option<u64> {
        if self.kind == WalFileKind::History || !is_segment_size(segment_size) {
            return None;
        }
        let per_log = 0x1_0000_0000 / segment_size;
        let log = u64::from_str_radix(self.name.get(8..16)?, 16).ok()?;
        let seg = u64::from_str_radix(self.name.get(16..24)?, 16).ok()?;
        (seg < per_log).then_some(log * per_log + seg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_parse_and_print_like_postgres() {
        assert_eq!(Lsn::parse("0/3000028"), Some(Lsn(0x3000028)));
        assert_eq!(Lsn::parse("1A/FF"), Some(Lsn(0x1A_0000_00FF)));
        assert_eq!(Lsn(0x1A_0000_00FF).to_string(), "1A/FF");
        for bad in ["", "0", "/1", "1/", "0/123456789", "g/1", "0/3 0"] {
            assert_eq!(Lsn::parse(bad), None, "{bad}");
        }
        assert!(Lsn::parse("0/3000100") > Lsn::parse("0/3000028"));
    }

    #[test]
    fn every_file_but_history_belongs_to_a_segment() {
        let mb16 = 16 * 1024 * 1024;
        let of = |name: &str| WalFile::parse(name).unwrap().segment(mb16);
        assert_eq!(of("000000020000000100000005"), Some(256 + 5));
        assert_eq!(of("000000020000000100000005.partial"), Some(256 + 5));
        assert_eq!(of("000000010000000000000003.00000028.backup"), Some(3));
        assert_eq!(of("00000002.history"), None);
        let name = segment_name(3, 4242, mb16);
        assert_eq!(of(&name), Some(4242));
        // Found by fuzzing: a low part past 0xFF is no 16 MiB segment, and must not alias
        // segment 0x2A80's number.
        assert_eq!(of("000030000028000000000280"), None);
        assert_eq!(of("0000000100000000000000FF"), Some(255));
        let file = WalFile::parse("000000010000000000000003").unwrap();
        assert_eq!(file.segment(0), None);
        assert_eq!(file.segment(3 << 20), None);
    }

    #[test]
    fn segment_names_follow_the_segment_size() {
        let mb16 = 16 * 1024 * 1024;
        assert_eq!(segment_name(1, 3, mb16), "000000010000000000000003");
        // 256 segments of 16 MiB per 4 GiB "xlogid".
        assert_eq!(segment_name(2, 256 + 5, mb16), "000000020000000100000005");
        assert_eq!(
            segment_name(1, 2 * 4096 + 1, 1024 * 1024),
            "000000010000000200000001"
        );
        assert_eq!(segment_of(Lsn::parse("1/5000000").unwrap(), mb16), 256 + 5);
    }

    #[test]
    fn a_backup_needs_the_segments_from_its_start_to_its_stop() {
        let mb16 = 16 * 1024 * 1024;
        let lsn = |t| Lsn::parse(t).unwrap();
        assert_eq!(
            segments_needed(lsn("0/3000028"), lsn("0/3000100"), mb16),
            (3, 3)
        );
        assert_eq!(
            segments_needed(lsn("0/3000028"), lsn("0/5000000"), mb16),
            (3, 4)
        );
        assert_eq!(
            segments_needed(lsn("0/3000028"), lsn("0/5000001"), mb16),
            (3, 5)
        );
    }

    #[test]
    fn only_archive_file_names_are_accepted() {
        let segment = WalFile::parse("000000010000000000000003").unwrap();
        assert_eq!((segment.kind, segment.timeline), (WalFileKind::Segment, 1));
        let history = WalFile::parse("0000000A.history").unwrap();
        assert_eq!((history.kind, history.timeline), (WalFileKind::History, 10));
        assert_eq!(
            WalFile::parse("000000010000000000000003.00000028.backup").map(|f| f.kind),
            Some(WalFileKind::BackupLabel)
        );
        assert_eq!(
            WalFile::parse("000000020000000000000003.partial").map(|f| f.kind),
            Some(WalFileKind::Partial)
        );
        for bad in [
            "",
            "00000001000000000000003",
            "0000000100000000000000030",
            "000000010000000000000003.zst",
            "00000001000000000000000a",
            "../../../../etc/passwd",
            "00000001/000000000000003",
            "000000000000000000000003",
            "00000001.history.x",
            "000000010000000000000003.backup",
            "RECOVERYHISTORY",
        ] {
            assert_eq!(WalFile::parse(bad), None, "{bad}");
        }
    }
}
